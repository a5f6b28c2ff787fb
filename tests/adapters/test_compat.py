"""What differs across the supported transformers range, checked on whichever version is installed.

* :mod:`hieravid.compat` reads the KV cache under either name (``cache`` / ``past_key_values``).
* Adapters locate a video from the encoded features that transformers >= 5.24's ``generate`` passes
  instead of the pixels (no ``pixel_values_videos``; Qwen2-VL: no ``video_grid_thw``, M-RoPE positions
  instead) exactly as from the pixels: built here by hand, so the path runs on every version.
* A continuation without a 2-D mask (``generate`` drops an all-ones mask from 5.24) whose positions do
  not continue the original length is refused, as a mask of the wrong length is.
"""

from __future__ import annotations

import inspect
import types
from pathlib import Path

import pytest
import torch

from hieravid.adapters.base import MultimodalCall
from hieravid.compat import cache_argument, cache_from_kwargs, cache_from_output, video_encoder_output
from hieravid.errors import AdapterError
from hieravid.plan import compile_plan
from hieravid.runtime import apply, get_adapter
from hieravid.testing.reference import capture_lm_inputs

ROOT = Path(__file__).resolve().parents[2]
HIERAVID_30 = ROOT / "policies" / "hieravid-30.yaml"


def test_cache_is_read_under_either_name():
    old, new = object(), object()
    assert cache_from_kwargs({"past_key_values": old}) is old
    assert cache_from_kwargs({"cache": new, "past_key_values": None}) is new
    assert cache_from_kwargs({"cache": new, "past_key_values": old}) is new
    assert cache_from_kwargs({"use_cache": True}) is None
    assert cache_from_output({"past_key_values": old}) is old
    assert cache_from_output(types.SimpleNamespace(cache=new)) is new
    assert cache_from_output(types.SimpleNamespace(past_key_values=old)) is old
    assert cache_from_output(None) is None and cache_from_output((1, 2)) is None
    assert video_encoder_output({"mm_encoder_outputs": {"video": old}}) is old
    assert video_encoder_output({"mm_encoder_outputs": None, "pixel_values_videos": new}) is None


def test_cache_argument_names_what_the_model_takes(tiny_llava):
    (name,) = cache_argument(tiny_llava.model, None)
    assert name in inspect.signature(tiny_llava.model.forward).parameters


def _encoded_call(case, inputs, lm_inputs):
    """The multimodal call ``generate`` makes from transformers 5.24: encoded video, no pixels (or grid)."""
    adapter_call = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"]}
    with torch.no_grad():
        if case.is_qwen:
            encoded = case.model.model.get_video_features(inputs["pixel_values_videos"], inputs["video_grid_thw"])
            adapter_call["position_ids"] = lm_inputs.position_ids  # generate's [4, B, S] M-RoPE positions
            adapter_call["mm_token_type_ids"] = inputs["mm_token_type_ids"]
        else:
            encoded = types.SimpleNamespace(pooler_output=torch.zeros(inputs["input_ids"].shape[0], 1, 1))
    adapter_call["mm_encoder_outputs"] = {"video": encoded}
    return adapter_call


@pytest.mark.parametrize("batched", [False, True], ids=["single", "padded-batch"])
def test_encoded_video_is_located_as_from_the_pixels(tiny_sdpa, batched):
    case = tiny_sdpa
    frames = (8, 6) if batched and case.is_qwen else (8,) * (2 if batched else 1)
    inputs = case.inputs(batch=len(frames), seed=5, pads=(0, 3)[: len(frames)], frames=frames)
    adapter = get_adapter(case.model.config.model_type)(case.model)
    lm_inputs = capture_lm_inputs(adapter, case.model, inputs, generate=True)
    embeds = lm_inputs.inputs_embeds
    video_mask = adapter.video_mask(inputs["input_ids"], None)
    from_pixels = adapter.locate_videos(MultimodalCall(inputs["input_ids"], video_mask, dict(inputs)), embeds)
    call = MultimodalCall(inputs["input_ids"], video_mask, _encoded_call(case, inputs, lm_inputs))
    assert call.encoded_video is not None and "pixel_values_videos" not in call.kwargs
    from_encoded = adapter.locate_videos(call, embeds)
    assert len(from_encoded) == len(from_pixels) == len(frames)
    for got, want, count in zip(from_encoded, from_pixels, frames):
        assert torch.equal(got.frame_index, want.frame_index) and torch.equal(got.newline_index, want.newline_index)
        assert (got.frames, got.rows, got.cols, got.newline_layout) == (
            count,
            case.rows,
            case.cols,
            want.newline_layout,
        )


def test_encoded_qwen_video_without_grid_or_positions_is_refused(tiny_sdpa):
    case = tiny_sdpa
    if not case.is_qwen:
        pytest.skip("Qwen2-VL: the grid is consumed by the encoder")
    inputs = case.inputs(seed=5)
    adapter = get_adapter(case.model.config.model_type)(case.model)
    lm_inputs = capture_lm_inputs(adapter, case.model, inputs, generate=True)
    kwargs = _encoded_call(case, inputs, lm_inputs)
    video_mask = adapter.video_mask(inputs["input_ids"], None)
    kwargs["position_ids"] = None
    with pytest.raises(AdapterError, match="video_grid_thw"):
        adapter.locate_videos(MultimodalCall(inputs["input_ids"], video_mask, kwargs), lm_inputs.inputs_embeds)
    kwargs["position_ids"] = lm_inputs.position_ids.flip(-1)  # not a raster of frames
    with pytest.raises(AdapterError, match="raster"):
        adapter.locate_videos(MultimodalCall(inputs["input_ids"], video_mask, kwargs), lm_inputs.inputs_embeds)


def test_maskless_continuation_must_continue_the_original_positions(tiny_sdpa):
    case = tiny_sdpa
    model = case.model
    inputs = case.inputs(seed=7)
    inputs.pop("attention_mask")
    new_ids = torch.tensor([[17, 18, 19]], device=case.device)
    with apply(model, compile_plan(HIERAVID_30, case.spec())) as handle, torch.no_grad():
        out = model(**inputs, use_cache=True)
        cache = cache_from_output(out)
        pruned, original = cache.get_seq_length(), handle.last_request.prompt_length
        assert pruned < original

        def positions(start):
            text = torch.arange(start, start + new_ids.shape[1], device=case.device).unsqueeze(0)
            if not case.is_qwen:
                return text
            return (text + handle.adapter.multimodal_module().rope_deltas.to(text.device)).unsqueeze(0)

        step = model(input_ids=new_ids, **cache_argument(model, cache), position_ids=positions(original))
        assert cache_from_output(step).get_seq_length() == pruned + new_ids.shape[1]
        # Positions counted from the pruned cache length (what generate gives a full history sliced at it).
        with pytest.raises(AdapterError, match="original coordinates"):
            model(input_ids=new_ids, **cache_argument(model, cache), position_ids=positions(cache.get_seq_length()))
