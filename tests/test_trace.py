"""Request traces: save/load round trips, validation, errors, and building one from runtime statistics."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from hieravid.apps.run import build_trace
from hieravid.apps.trace import RequestTrace, StageTrace, TraceError, load_trace, save_trace


def _trace(frames: int = 6, rows: int = 2, cols: int = 3, **overrides: object) -> RequestTrace:
    n = frames * rows * cols
    merge_target = torch.arange(n)
    merge_target[6:12] -= 6  # frame 1 merged into frame 0
    fields = dict(
        frames=frames,
        rows=rows,
        cols=cols,
        newline_tokens=1,
        frame_segment_ids=torch.tensor([0, 0, 1, 1, 1, 2]),
        segment_values=torch.tensor([0.5, -1.25, 0.75]),
        input_kept=torch.unique(merge_target),
        merge_target=merge_target,
        stages=[
            StageTrace(layer=1, kept=torch.tensor([0, 3, 12, 20, 30]), newlines_kept=1),
            StageTrace(layer=3, kept=torch.tensor([3, 30]), newlines_kept=0),
        ],
        layer_video_tokens=[31, 31, 6, 6],
        frame_redundancy=torch.tensor([0.0, 1.0, 0.1, 0.9, 0.8, 0.0]),
        thumbnails=torch.randint(0, 255, (frames, 8, 12, 3), dtype=torch.uint8),
        policy={"name": "p", "segment": {"enabled": True}},
        plan={"retention": 0.3, "stages": [{"layer": 1}]},
        info={"question": "what?", "answer": "¡nada!", "ttft_ms": 12.5},
    )
    fields.update(overrides)
    return RequestTrace(**fields)  # type: ignore[arg-type]


def _assert_equal(a: RequestTrace, b: RequestTrace) -> None:
    for name in ("frames", "rows", "cols", "newline_tokens", "layer_video_tokens", "policy", "plan", "info"):
        assert getattr(a, name) == getattr(b, name), name
    for name in ("frame_segment_ids", "segment_values", "input_kept", "merge_target", "frame_redundancy", "thumbnails"):
        left, right = getattr(a, name), getattr(b, name)
        assert (left is None) == (right is None), name
        if left is not None:
            assert torch.equal(left, right), name
            assert left.dtype == right.dtype, name
    assert [(s.layer, s.newlines_kept, s.kept.tolist()) for s in a.stages] == [
        (s.layer, s.newlines_kept, s.kept.tolist()) for s in b.stages
    ]


def test_round_trip_every_field(tmp_path: Path) -> None:
    trace = _trace()
    path = save_trace(tmp_path / "deep" / "t.safetensors", trace)
    (loaded,) = load_trace(path)
    _assert_equal(trace, loaded)


def test_round_trip_several_requests_and_optional_fields(tmp_path: Path) -> None:
    minimal = _trace(
        merge_target=None,
        input_kept=None,
        frame_redundancy=None,
        thumbnails=None,
        stages=[],
        layer_video_tokens=None,
        policy=None,
        plan=None,
        info={},
    )
    traces = [_trace(), minimal]
    loaded = load_trace(save_trace(tmp_path / "t.safetensors", traces))
    assert len(loaded) == 2
    for a, b in zip(traces, loaded):
        _assert_equal(a, b)
    assert loaded[1].merged_kept().tolist() == list(range(36))


def test_metadata_is_json_with_policy_and_plan(tmp_path: Path) -> None:
    from safetensors import safe_open

    path = save_trace(tmp_path / "t.safetensors", _trace())
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    assert metadata["format"] == "hieravid-trace" and metadata["num_requests"] == "1"
    request = json.loads(metadata["request.0"])
    assert request["policy"]["name"] == "p" and request["plan"]["retention"] == 0.3


def test_segments_cuts_and_summary() -> None:
    trace = _trace()
    assert trace.segments() == [(0, 1), (2, 4), (5, 5)]
    assert trace.cuts() == [2, 5]
    assert trace.num_segments == 3
    assert trace.merged_kept().numel() == 30
    summary = trace.summary()
    assert "segments (3): 0-1, 2-4, 5" in summary and "after stage @ layer 3: 2 tokens" in summary


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        ({"frame_segment_ids": torch.tensor([0, 0, 1])}, "frame_segment_ids"),
        ({"segment_values": torch.tensor([0.0])}, "segment_values"),
        ({"merge_target": torch.arange(5)}, "merge_target"),
        ({"stages": [StageTrace(layer=1, kept=torch.tensor([36]))]}, "kept indices"),
        ({"input_kept": torch.tensor([-1])}, "input_kept"),
        ({"thumbnails": torch.zeros(2, 4, 4, 3, dtype=torch.uint8)}, "thumbnails"),
        ({"info": {"x": object()}}, "JSON"),
    ],
)
def test_inconsistent_traces_are_refused(tmp_path: Path, overrides: dict, fragment: str) -> None:
    with pytest.raises(TraceError, match=fragment):
        save_trace(tmp_path / "t.safetensors", _trace(**overrides))
    assert not (tmp_path / "t.safetensors").exists()


def test_load_errors(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    with pytest.raises(TraceError, match="not found"):
        load_trace(tmp_path / "missing.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file at all")
    with pytest.raises(TraceError, match="not a safetensors file"):
        load_trace(junk)
    other = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(2)}, str(other), metadata={"format": "pt"})
    with pytest.raises(TraceError, match="not a hieravid trace"):
        load_trace(other)
    future = tmp_path / "future.safetensors"
    save_file({"w": torch.zeros(2)}, str(future), metadata={"format": "hieravid-trace", "version": "99"})
    with pytest.raises(TraceError, match="version"):
        load_trace(future)
    broken = tmp_path / "broken.safetensors"
    save_file(
        {"w": torch.zeros(2)}, str(broken), metadata={"format": "hieravid-trace", "version": "1", "num_requests": "1"}
    )
    with pytest.raises(TraceError, match="request 0 is incomplete"):
        load_trace(broken)


def test_build_trace_from_runtime_statistics() -> None:
    from hieravid.runtime.state import RequestStats, StageStats

    # Prompt: 3 text tokens, 2 frames × 2×2 content + 1 newline (per_video) at positions 3..11, 2 text tokens.
    video = {
        "frames": 2,
        "rows": 2,
        "cols": 2,
        "newline_layout": "per_video",
        "content_tokens": 8,
        "newline_tokens": 1,
        "video_tokens": 9,
        "span": (3, 12),
    }
    stage = StageStats(
        layer=1,
        prune_point="after_attention",
        video_tokens_before=(6,),
        video_tokens_after=(3,),
        budgets=((2, 1),),
        kept_positions=(torch.tensor([3, 8, 11]),),
        sequence_length=8,
    )
    from hieravid.adapters.base import VideoLayout

    per_video = VideoLayout(
        frame_index=torch.tensor([[3, 4, 5, 6], [7, 8, 9, 10]]),
        newline_index=torch.tensor([11]),
        rows=2,
        cols=2,
        newline_layout="per_video",
    )
    stats = RequestStats(
        pruned=True,
        reason="pruned",
        batch_size=1,
        prompt_length=14,
        layouts=(per_video,),
        videos=(video,),
        num_segments=(2,),
        frame_segment_ids=(torch.tensor([0, 1]),),
        marginal_values=(torch.tensor([1.0, -1.0]),),
        input_kept_positions=(torch.tensor([3, 4, 5, 6, 8, 11]),),
        stages=(stage,),
        layer_video_tokens=((6,), (6,), (3,)),
        layer_sequence_lengths=(11, 11, 8),
    )
    trace = build_trace(stats, None, info={"k": 1})
    assert (trace.frames, trace.rows, trace.cols, trace.newline_tokens) == (2, 2, 2, 1)
    assert trace.input_kept.tolist() == [0, 1, 2, 3, 5]  # position 11 is the newline
    assert trace.stages[0].kept.tolist() == [0, 5] and trace.stages[0].newlines_kept == 1
    assert trace.cuts() == [1] and trace.segment_values.tolist() == [1.0, -1.0]
    assert trace.layer_video_tokens == [6, 6, 3] and trace.info == {"k": 1}
    trace.validate()
    # With a newline after every row, positions map through that layout's frame index.
    layout = VideoLayout(
        frame_index=torch.tensor([[3, 4, 6, 7], [9, 10, 12, 13]]),
        newline_index=torch.tensor([5, 8, 11, 14]),
        rows=2,
        cols=2,
        newline_layout="per_row",
    )
    rows_video = {**video, "newline_layout": "per_row", "newline_tokens": 4, "video_tokens": 12, "span": (3, 15)}
    stats_rows = dataclasses.replace(
        stats,
        videos=(rows_video,),
        layouts=(layout,),
        prompt_length=17,
        input_kept_positions=(torch.tensor([3, 5, 9, 13]),),
        stages=(),
    )
    trace_rows = build_trace(stats_rows, None)
    assert trace_rows.input_kept.tolist() == [0, 4, 7]
    with pytest.raises(TraceError, match="no pruned video request"):
        build_trace(RequestStats(pruned=False, reason="no video", batch_size=1, prompt_length=5), None)
