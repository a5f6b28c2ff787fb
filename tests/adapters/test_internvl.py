"""InternVL specifics: a video is several one-tile image spans with text between frames; still images in the same
prompt are not frames; Qwen3's per-head q/k norms enter the stage relevance; the Qwen2 (InternVL3) text model too.

The shared conformance suite runs the Qwen3 model (``internvl`` in ``ARCHITECTURES``) on video-only prompts.
"""

from __future__ import annotations

import pytest
import torch

from hieravid.adapters.base import MultimodalCall
from hieravid.adapters.internvl import InternVLAdapter, video_frame_spans
from hieravid.errors import AdapterError
from hieravid.plan import compile_plan
from hieravid.runtime import apply
from hieravid.testing.conformance import CONFORMANCE_POLICIES as POLICIES
from hieravid.testing.conformance import PRUNING_POLICIES as PRUNING
from hieravid.testing.reference import capture_lm_inputs, reference_run

ATOL = RTOL = 1e-4


@pytest.fixture
def internvl(tiny_builders):
    case = tiny_builders.tiny_case("internvl")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield case
    finally:
        torch.set_num_threads(threads)


def _not_frames(layout, length: int) -> torch.Tensor:
    """Original positions of every row that is not a video frame token (text, labels, still images)."""
    is_frame = torch.zeros(length, dtype=torch.bool)
    is_frame[layout.frame_index.flatten().cpu()] = True
    return torch.nonzero(~is_frame).flatten()


def test_frame_rule_reads_chains_of_one_tile_spans() -> None:
    gap = InternVLAdapter.frame_gap
    frames = [(10, 26), (32, 48), (54, 70)]  # 6 tokens between frames: </img>\nFrameN:<img>
    assert video_frame_spans(frames, 16, gap) == frames
    # A two-tile image before and a one-tile image right after (</img>\n<img>: 3 tokens) are not frames.
    assert video_frame_spans([(0, 32), *frames, (73, 89)], 16, gap) == frames
    assert video_frame_spans([(0, 16)], 16, gap) == []  # one frame cannot be told from an image
    assert video_frame_spans([(0, 16), (19, 35)], 16, gap) == []  # images back to back
    with pytest.raises(AdapterError, match="2 runs of one-tile image spans read as videos"):
        video_frame_spans([*frames, (100, 116), (122, 138)], 16, gap)


def test_text_between_frames_and_still_images_survive_every_policy(internvl) -> None:
    """Every pruning policy on a prompt with a two-tile image, a video and a one-tile image: each layer keeps every
    non-frame row (text, frame labels, both images) at its original position, and equals the unpatched model on the
    pruned sequence."""
    case, model = internvl, internvl.model
    inputs = case.inputs(seed=11, still_images=True)
    ids = inputs["input_ids"][0].cpu()
    length = ids.numel()
    adapter = InternVLAdapter(model)
    lm_inputs = capture_lm_inputs(adapter, model, inputs)
    for name in PRUNING:
        plan = compile_plan(POLICIES[name], case.spec())
        with apply(model, plan) as handle, torch.no_grad():
            logits = model(**inputs).logits[0]
        stats = handle.last_request
        layout = stats.layouts[0]
        assert layout.frames == case.frames and bool((ids[layout.frame_index.cpu()] == case.placeholder_token).all())
        # 16 + 32 image tokens that are not frames; the labels between frames are text.
        assert int((ids == case.placeholder_token).sum()) == layout.content_tokens + 48
        keep = _not_frames(layout, length)
        for positions in stats.stage_positions:
            rows = positions[0].cpu()
            assert bool(torch.isin(keep, rows).all()), name
        assert stats.stage_positions[-1].shape[1] < length, name  # frames were pruned
        reference = reference_run(model, adapter, plan, stats, lm_inputs, 0)
        torch.testing.assert_close(logits[-1], reference.logits[-1], atol=ATOL, rtol=RTOL)


def test_two_videos_are_refused_and_images_alone_run_unpruned(internvl) -> None:
    case, model = internvl, internvl.model
    inputs = case.inputs(seed=3)
    ids = inputs["input_ids"]
    # The video a second time, after 20 more text tokens (closer, two videos would read as one: module docstring).
    twice = torch.cat([ids, torch.full((1, 20), 7, device=ids.device), ids], dim=1)
    adapter = InternVLAdapter(model)
    call = MultimodalCall(twice, adapter.video_mask(twice, None), {})
    with pytest.raises(AdapterError, match="read as videos"):
        adapter.locate_videos(call, torch.zeros(1, twice.shape[1], 64))
    images = case.inputs(seed=3, video=False, still_images=True)
    with torch.no_grad():
        expected = model(**images).logits
        with apply(model, compile_plan(POLICIES["hieravid-30"], case.spec())) as handle:
            with pytest.warns(UserWarning, match="no video tokens"):
                assert torch.equal(model(**images).logits, expected)
            assert handle.last_request.reason == "no video"


def test_stage_query_key_is_the_attention_modules_own(tiny_builders) -> None:
    """The relevance query and key (Qwen3: per-head q_norm/k_norm before RoPE) reproduce the eager attention's
    probabilities of the last row."""
    model = tiny_builders.build_model("internvl", "eager")
    case = tiny_builders.tiny_case("internvl")
    inputs = case.inputs(seed=4)
    adapter = InternVLAdapter(model)
    layer = adapter.decoder_layers()[3]
    attention = adapter.attention(layer)
    assert hasattr(attention, "q_norm")
    captured: dict[str, torch.Tensor] = {}
    q_proj, k_proj = adapter.query_key_projections(layer)

    def keep(name: str, value: object) -> None:
        captured.setdefault(name, value)

    hooks = [
        q_proj.register_forward_hook(lambda module, args, out: keep("query", out)),
        k_proj.register_forward_hook(lambda module, args, out: keep("key", out)),
        attention.register_forward_pre_hook(
            lambda module, args, kwargs: keep("rope", kwargs["position_embeddings"]), with_kwargs=True
        ),
    ]
    try:
        with torch.no_grad():
            out = model(**inputs, output_attentions=True)
    finally:
        for hook in hooks:
            hook.remove()
    query, key = adapter.stage_query_key(layer, captured["query"], captured["key"], captured["rope"], 1)
    key = key.repeat_interleave(query.shape[1] // key.shape[1], dim=1)
    scores = (query @ key.transpose(-1, -2) * adapter.attention_scaling(layer)).softmax(-1)
    torch.testing.assert_close(scores[:, :, -1], out.attentions[3][:, :, -1], atol=1e-5, rtol=1e-5)


def test_qwen2_text_model_is_exact_unpruned_and_matches_the_reference(tiny_builders) -> None:
    """InternVL3's layout (Qwen2 language model, no q/k norms): bit-identical with policies/none.yaml and equal to
    the unpatched model on the pruned sequence under hieravid-30."""
    model = tiny_builders.build_model("internvl_qwen2", "sdpa")
    case = tiny_builders.tiny_case("internvl")
    inputs = case.inputs(seed=9, still_images=True)
    adapter = InternVLAdapter(model)
    assert not hasattr(adapter.attention(adapter.decoder_layers()[0]), "q_norm")
    lm_inputs = capture_lm_inputs(adapter, model, inputs)
    with torch.no_grad():
        expected = model(**inputs).logits
        with apply(model, POLICIES["none"]):
            assert torch.equal(model(**inputs).logits, expected)
        plan = compile_plan(POLICIES["hieravid-30"], case.spec())
        with apply(model, plan) as handle:
            logits = model(**inputs).logits[0]
    stats = handle.last_request
    assert stats.pruned and stats.layer_video_tokens[-1][0] < case.video_tokens()
    reference = reference_run(model, adapter, plan, stats, lm_inputs, 0)
    torch.testing.assert_close(logits[-1], reference.logits[-1], atol=ATOL, rtol=RTOL)
