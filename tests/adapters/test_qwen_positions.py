"""Qwen2-VL / Qwen2.5-VL: locating a video from its M-RoPE positions (issue 17.3).

transformers >= 5.24's ``generate`` encodes the video before the first forward and does not pass ``video_grid_thw``
to it, so the adapter reads the video's frames from the M-RoPE positions. Qwen2.5-VL's temporal positions advance by
``tokens_per_second × second_per_grid_t`` per temporal patch (2 × 1.0 for the released checkpoints with their
processor; the config class's default is 4), not by 1. The tiny Qwen2.5-VL of ``tests/conftest.py`` uses the
released value and passes ``second_per_grid_ts``, so the whole conformance suite runs with them; this file adds the
class default, the positions alone, and the inputs without ``mm_token_type_ids``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from hieravid.adapters.base import MultimodalCall
from hieravid.adapters.qwen2_vl import Qwen2_5_VLAdapter, Qwen2VLAdapter
from hieravid.errors import AdapterError
from hieravid.plan import compile_plan
from hieravid.policy import load_policy
from hieravid.runtime import apply
from hieravid.testing.reference import capture_lm_inputs, reference_run

ROOT = Path(__file__).resolve().parents[2]
HIERAVID_30 = load_policy(ROOT / "policies" / "hieravid-30.yaml")


def _rows(frames: int, rows: int, cols: int, *, start: int = 6, step: float = 1) -> torch.Tensor:
    """``[3, N]`` M-RoPE rows of one video as ``get_rope_index`` lays them out (temporal ``step`` per patch)."""
    t = (torch.arange(frames) * step).long().repeat_interleave(rows * cols)
    h = torch.arange(rows).repeat_interleave(cols).repeat(frames)
    w = torch.arange(cols).repeat(rows * frames)
    return torch.stack([t, h, w]) + start


def _call(kwargs: dict | None = None) -> MultimodalCall:
    return MultimodalCall(input_ids=None, video_mask=None, kwargs=kwargs or {})


@pytest.mark.parametrize("step", [1, 2, 4, 0.5, 50], ids=lambda s: f"step{s}")
@pytest.mark.parametrize(("frames", "rows", "cols"), [(4, 4, 4), (3, 2, 5), (1, 3, 3), (5, 1, 1), (2, 1, 6)])
def test_a_raster_is_found_whatever_the_temporal_step(step, frames, rows, cols):
    t, h, w = _rows(frames, rows, cols, step=step)
    assert Qwen2VLAdapter._raster_layout(0, t, h, w, _call()) == (frames, rows, cols)


def test_positions_that_are_not_a_video_are_refused():
    t, h, w = _rows(4, 4, 4, step=2)
    with pytest.raises(AdapterError, match="temporal positions"):  # decreasing across frames
        Qwen2VLAdapter._raster_layout(0, t.flip(0), h, w, _call())
    broken = t.clone()
    broken[5] += 1  # not constant within a frame
    with pytest.raises(AdapterError, match="temporal positions"):
        Qwen2VLAdapter._raster_layout(0, broken, h, w, _call())
    with pytest.raises(AdapterError, match="not a raster"):
        Qwen2VLAdapter._raster_layout(0, t, h.flip(0), w, _call())
    # Text positions (what transformers >= 5.24 gives a video without mm_token_type_ids).
    text = torch.arange(64) + 6
    with pytest.raises(AdapterError, match=r"mm_token_type_ids is passed with the inputs \(this call has none\)"):
        Qwen2VLAdapter._raster_layout(0, text, text, text, _call())


@pytest.fixture
def qwen2_5(tiny_builders):
    """A tiny Qwen2.5-VL whose vision config keeps the class's default tokens_per_second."""
    from transformers import Qwen2_5_VLConfig

    config = tiny_builders.tiny_case("qwen2_5_vl").model.config.to_dict()
    config["vision_config"].pop("tokens_per_second")
    config = Qwen2_5_VLConfig.from_dict(config)
    assert config.vision_config.tokens_per_second == Qwen2_5_VLConfig().vision_config.tokens_per_second != 2
    torch.manual_seed(0)
    model = tiny_builders.model_class("qwen2_5_vl")._from_config(config, attn_implementation="sdpa")
    model = model.to(tiny_builders.DEVICE).eval()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield tiny_builders, model
    torch.set_num_threads(threads)


@pytest.mark.parametrize("seconds", [None, 1.0, 0.5], ids=["no-second_per_grid_ts", "1.0s", "0.5s"])
def test_qwen2_5_generate_with_the_class_default_tokens_per_second(qwen2_5, seconds):
    """The failing case of 17.3: an 8-frame video (grid 4×8×8), the config class's tokens_per_second."""
    builders, model = qwen2_5
    case = builders.tiny_case("qwen2_5_vl")
    case = type(case)(case.architecture, case.attention, model)
    inputs = case.inputs(batch=2, pads=(3, 0), frames=(4, 6), seed=5)
    if seconds is None:
        inputs.pop("second_per_grid_ts")
    else:
        inputs["second_per_grid_ts"] = torch.full((2,), seconds)
    plan = compile_plan(HIERAVID_30, case.spec(frames=4))
    new_tokens = 4
    with apply(model, plan) as handle, torch.no_grad():
        result = model.generate(
            **inputs,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
        )
        stats = handle.last_request
        adapter = handle.adapter
    assert [(v["frames"], v["rows"], v["cols"]) for v in stats.videos] == [(4, 4, 4), (6, 4, 4)]
    lm_inputs = capture_lm_inputs(adapter, model, inputs, generate=True)
    length = inputs["input_ids"].shape[1]
    for sample in range(2):
        generated = result.sequences[sample, length:]
        reference = reference_run(model, adapter, plan, stats, lm_inputs, sample, extra_ids=generated[:-1])
        step_logits = torch.stack([step[sample] for step in result.logits])
        torch.testing.assert_close(step_logits, reference.logits[-new_tokens:], atol=1e-4, rtol=1e-4)


def test_without_mm_token_type_ids_the_error_says_what_to_pass(tiny_builders):
    """transformers >= 5.24 gives the video text positions when mm_token_type_ids is missing (the unpruned model
    too): hieravid cannot find frames in them and says why, instead of asking for the video_grid_thw it was given.
    transformers 5.17 passes video_grid_thw to the first forward and derives positions from the token ids."""
    case = tiny_builders.tiny_case("qwen2_5_vl")
    inputs = case.inputs(batch=1, seed=1, frames=(4,))
    inputs.pop("mm_token_type_ids")
    torch.set_num_threads(1)
    with apply(case.model, compile_plan(HIERAVID_30, case.spec(frames=4))) as handle, torch.no_grad():
        try:
            case.model.generate(**inputs, max_new_tokens=2, do_sample=False)
        except AdapterError as error:
            assert "received text positions" in str(error) and "mm_token_type_ids" in str(error)
        else:
            assert handle.last_request.pruned
            assert handle.last_request.videos[0]["frames"] == 4


def test_the_adapter_classes_share_the_locator():
    assert Qwen2_5_VLAdapter._raster_layout is Qwen2VLAdapter._raster_layout
