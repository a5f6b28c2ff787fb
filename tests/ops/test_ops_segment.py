"""Segment level: similarity, redundancy, segmentation, marginal values, merging (vs loop references)."""

from __future__ import annotations

import pytest
import torch
from ops_reference import ref_marginal_values, ref_merge, ref_segments, ref_similarity

from hieravid.diagnostics import SyncSpy
from hieravid.ops import (
    FIRST_FRAME_SIMILARITY,
    GraphCache,
    adjacent_frame_similarity,
    frame_redundancy,
    merge_redundant_tokens,
    num_merged_tokens,
    segment_frames,
    segment_level,
    segment_marginal_values,
    unread_segment_level,
)


def scene_video(F: int, P: int, D: int, seed: int, scenes: int = 3, noise: float = 0.3) -> torch.Tensor:
    """Random video of a few scenes: frames of a scene are noisy copies of its base frame."""
    g = torch.Generator().manual_seed(seed)
    cuts = sorted(torch.randperm(F - 1, generator=g)[: scenes - 1].add(1).tolist()) if F > 1 else []
    base = torch.randn(scenes, P, D, generator=g)
    scene_of = [sum(1 for c in cuts if c <= f) for f in range(F)]
    return torch.stack([base[s] + noise * torch.randn(P, D, generator=g) for s in scene_of])


@pytest.mark.parametrize("seed", range(6))
def test_similarity_matches_reference(device, seed):
    frames = scene_video(7, 5, 16, seed)
    frames[2, 1] = 0.0  # zero vector
    sim = adjacent_frame_similarity(frames.to(device))
    assert sim.dtype == torch.float32 and sim.shape == (7, 5)
    ref = torch.tensor(ref_similarity(frames), dtype=torch.float32)
    torch.testing.assert_close(sim.cpu(), ref, atol=1e-5, rtol=0)
    assert torch.all(sim[0] == FIRST_FRAME_SIMILARITY)
    assert sim[2, 1] == 0 and sim[3, 1] == 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_similarity_low_precision(device, dtype):
    frames = scene_video(6, 4, 32, 3).to(dtype)
    sim = adjacent_frame_similarity(frames.to(device)).cpu()
    ref = torch.tensor(ref_similarity(frames.float()), dtype=torch.float32)
    assert sim.dtype == torch.float32
    torch.testing.assert_close(sim, ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize(("tau", "beta"), [(0.6, 0.4), (0.3, 0.7), (0.9, 0.1)])
def test_segmentation_matches_reference(device, seed, tau, beta):
    frames = scene_video(12, 6, 8, seed, scenes=4, noise=0.6)
    sim = adjacent_frame_similarity(frames.to(device))
    red = frame_redundancy(sim, tau)
    ids = segment_frames(red, beta)
    assert ids.dtype == torch.int64
    ref = ref_segments(sim.cpu().double().tolist(), tau, beta)
    assert ids.cpu().tolist() == ref
    assert red[0] == 0


def test_redundancy_and_segments_by_hand():
    sim = torch.tensor([[-1.0, -1.0], [0.7, 0.1], [0.9, 0.8], [0.0, 0.0], [0.61, 0.6]])
    red = frame_redundancy(sim, 0.6)
    assert red.tolist() == [0.0, 0.5, 1.0, 0.0, 0.5]
    assert segment_frames(red, 0.4).tolist() == [0, 0, 0, 1, 1]
    assert segment_frames(red, 0.6).tolist() == [0, 1, 1, 2, 3]


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("lam", [0.5, 0.0, 0.8])
def test_marginal_values_match_reference(device, seed, lam):
    frames = scene_video(10, 4, 12, seed, scenes=4, noise=0.8)
    g = torch.Generator().manual_seed(100 + seed)
    opens = torch.rand(10, generator=g) < 0.4
    opens[0] = True
    ids = torch.cumsum(opens.long(), 0) - 1
    mv = segment_marginal_values(frames.to(device), ids.to(device), lam)
    ref = torch.tensor(ref_marginal_values(frames, ids.tolist(), lam), dtype=torch.float32)
    assert mv.shape == ref.shape and mv.dtype == torch.float32
    torch.testing.assert_close(mv.cpu(), ref, atol=2e-4, rtol=1e-4)


def test_marginal_values_single_segment_and_zero_frames(device):
    frames = torch.randn(5, 3, 4, device=device)
    assert segment_marginal_values(frames, torch.zeros(5, dtype=torch.long, device=device)).tolist() == [0.0]
    zeros = torch.zeros(4, 3, 4, device=device)
    mv = segment_marginal_values(zeros, torch.arange(4, device=device))
    assert torch.isfinite(mv).all()
    # explicit num_segments gives the same result as reading it from the ids
    ids = torch.tensor([0, 0, 1, 2, 2], device=device)
    torch.testing.assert_close(
        segment_marginal_values(frames, ids), segment_marginal_values(frames, ids, num_segments=3)
    )


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("ratio", [0.0, 0.25, 0.5, 0.7, 0.9])
def test_merge_matches_reference(device, seed, ratio):
    frames = scene_video(6, 5, 8, seed, scenes=2, noise=0.5)
    sim = adjacent_frame_similarity(frames.to(device))
    res = merge_redundant_tokens(frames.to(device), sim, ratio)
    kept, feats, target = ref_merge(frames, sim.cpu().double().tolist(), ratio)
    assert res.kept_index.cpu().tolist() == kept
    assert res.merge_target.cpu().tolist() == target
    assert res.features.dtype == frames.dtype
    torch.testing.assert_close(res.features.cpu().double(), feats, atol=1e-5, rtol=1e-5)
    assert len(kept) == 30 - num_merged_tokens(6, 5, ratio)


def test_merge_ties_break_by_lower_flat_index(device):
    F, P = 4, 3
    frames = torch.randn(F, P, 5, device=device)
    sim = torch.full((F, P), 0.5, device=device)
    sim[0] = -1.0
    res = merge_redundant_tokens(frames, sim, 0.25)  # m = 3: flat 3, 4, 5 (frame 1)
    absorbed = sorted(set(range(F * P)) - set(res.kept_index.tolist()))
    assert absorbed == [3, 4, 5]
    assert res.merge_target.tolist()[3:6] == [0, 1, 2]


def test_merge_chain_into_anchor_by_hand():
    # one position, 5 frames; pairs of frames 1, 2 and 4 selected -> groups {0,1,2}, {3,4}
    frames = torch.tensor([1.0, 2.0, 6.0, 10.0, 20.0]).view(5, 1, 1)
    sim = torch.tensor([-1.0, 0.9, 0.8, 0.1, 0.7]).view(5, 1)
    res = merge_redundant_tokens(frames, sim, 0.6)  # m = 3
    assert res.kept_index.tolist() == [0, 3]
    assert res.features.flatten().tolist() == pytest.approx([3.0, 15.0])
    assert res.merge_target.tolist() == [0, 0, 0, 3, 3]


def test_merge_never_absorbs_frame_zero(device):
    frames = torch.randn(3, 4, 6, device=device)
    sim = torch.full((3, 4), -1.0, device=device)
    sim[0] = 1.0  # even a maximal row-0 value must be ignored
    res = merge_redundant_tokens(frames, sim, 0.5)  # m = 6
    kept = set(res.kept_index.tolist())
    assert {0, 1, 2, 3} <= kept


def test_merge_kept_tokens_keep_exact_values(device):
    frames = torch.randn(5, 6, 7, device=device, dtype=torch.bfloat16)
    sim = adjacent_frame_similarity(frames)
    res = merge_redundant_tokens(frames, sim, 0.3)
    flat = frames.reshape(-1, 7)
    alone = torch.bincount(res.merge_target, minlength=30)[res.kept_index] == 1
    assert torch.equal(res.features[alone], flat[res.kept_index][alone])


def test_identical_frames_one_segment_everything_toward_frame_zero(device):
    F, P, D = 6, 7, 16
    frame = torch.randn(P, D)
    frames = frame.expand(F, P, D).contiguous().to(device)
    out = segment_level(frames, merge_ratio=0.5)
    assert out.num_segments == 1
    assert out.frame_segment_ids.tolist() == [0] * F
    assert out.marginal_values.tolist() == [0.0]
    N = F * P
    assert out.kept_index.numel() == N - N // 2
    target = out.merge_target.view(F, P)
    # every merge target is kept, is at the same position, and is not later than the token
    f_of = torch.arange(F, device=device).view(F, 1)
    assert torch.all(target % P == torch.arange(P, device=device))
    assert torch.all(target // P <= f_of)
    assert torch.isin(out.merge_target, out.kept_index).all()
    torch.testing.assert_close(out.features.float(), frame.to(device)[out.kept_index % P], atol=1e-5, rtol=1e-5)
    # the largest ratio absorbs everything into frame 0
    full = segment_level(frames, merge_ratio=(F - 1) / F)
    assert full.kept_index.tolist() == list(range(P))
    assert torch.all(full.merge_target.view(F, P) == torch.arange(P, device=device))


def test_all_different_frames_one_segment_per_frame(device):
    frames = torch.randn(9, 8, 256, generator=torch.Generator().manual_seed(1)).to(device)
    out = segment_level(frames)
    assert out.num_segments == 9
    assert out.frame_segment_ids.tolist() == list(range(9))
    assert out.marginal_values.shape == (9,)
    assert torch.isfinite(out.marginal_values).all()
    assert abs(float(out.marginal_values.mean())) < 1e-5


def test_single_frame(device):
    frames = torch.randn(1, 10, 4, device=device)
    out = segment_level(frames)
    assert out.num_segments == 1
    assert out.kept_index.tolist() == list(range(10))
    assert torch.equal(out.features, frames[0])
    assert out.token_segment_ids.tolist() == [0] * 10


def test_zero_video_no_nan(device):
    frames = torch.zeros(4, 5, 8, device=device, dtype=torch.float16)
    out = segment_level(frames)
    for t in (out.similarity, out.redundancy, out.marginal_values, out.features.float()):
        assert torch.isfinite(t).all()
    assert out.kept_index.unique().numel() == out.kept_index.numel()


def test_merge_disabled(device):
    frames = scene_video(5, 4, 8, 0).to(device)
    for out in (segment_level(frames, merge=False), segment_level(frames, merge_ratio=0.0)):
        assert out.kept_index.tolist() == list(range(20))
        assert torch.equal(out.features, frames.reshape(20, 8))
        assert out.merge_target.tolist() == list(range(20))


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_segment_level_end_to_end_vs_reference(device, seed, dtype):
    frames = scene_video(8, 6, 16, seed, scenes=3, noise=0.5).to(dtype)
    out = segment_level(frames.to(device))
    f64 = frames.double()
    sim = ref_similarity(f64)
    # segmentation decisions are compared on the operator's own similarity (float32 rounding at tau)
    seg = ref_segments(out.similarity.cpu().double().tolist(), 0.6, 0.4)
    assert out.frame_segment_ids.cpu().tolist() == seg
    torch.testing.assert_close(out.similarity.cpu().double(), torch.tensor(sim, dtype=torch.float64), atol=2e-4, rtol=0)
    mv = ref_marginal_values(f64, seg, 0.5)
    torch.testing.assert_close(
        out.marginal_values.cpu().double(), torch.tensor(mv, dtype=torch.float64), atol=2e-3, rtol=1e-3
    )
    kept, feats, _ = ref_merge(f64, out.similarity.cpu().double().tolist(), 0.5)
    assert out.kept_index.cpu().tolist() == kept
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(out.features.cpu().double(), feats, atol=tol, rtol=tol)
    assert out.features.dtype == dtype
    assert out.token_segment_ids.cpu().tolist() == [seg[i // 6] for i in kept]


def test_the_unread_segment_level_leaves_its_one_read_to_the_caller(device):
    """The runtime reads the segment count with its other reads: nothing of the unread result syncs, its count
    and padded marginal values give segment_level's result exactly, and resolving reads once."""
    frames = scene_video(8, 6, 16, 3, scenes=3, noise=0.5).to(device)
    expected = segment_level(frames)
    assert expected.num_segments > 1
    spy = SyncSpy()
    with spy:
        unread = unread_segment_level(frames, 0.6, 0.4, 0.5, 0.5)  # segment_level's defaults
        count, padded = unread.segment_count, unread.marginal_values
    assert dict(spy.counts) == {}
    assert padded.shape == (8,) and count.shape == (1,)
    assert int(count) == expected.num_segments
    assert torch.equal(padded[: expected.num_segments], expected.marginal_values)
    assert not padded[expected.num_segments :].any()
    resolved = unread.resolve(int(count))
    for name in ("kept_index", "features", "merge_target", "frame_segment_ids", "token_segment_ids", "marginal_values"):
        assert torch.equal(getattr(resolved, name), getattr(expected, name)), name
    assert resolved.num_segments == expected.num_segments
    with spy:
        assert unread.resolve().num_segments == expected.num_segments
    assert sum(spy.counts.values()) == 1


def test_deterministic(device):
    frames = scene_video(10, 12, 32, 5).to(device)
    a = segment_level(frames)
    b = segment_level(frames)
    assert torch.equal(a.kept_index, b.kept_index)
    assert torch.equal(a.features, b.features)
    assert torch.equal(a.marginal_values, b.marginal_values)


def test_bad_inputs():
    with pytest.raises(ValueError, match="shape"):
        adjacent_frame_similarity(torch.zeros(3, 4))
    with pytest.raises(ValueError, match="ratio"):
        merge_redundant_tokens(torch.zeros(2, 2, 2), torch.zeros(2, 2), 1.0)
    with pytest.raises(ValueError, match="similarity"):
        merge_redundant_tokens(torch.zeros(2, 2, 2), torch.zeros(3, 2), 0.5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_segment_level_cuda_graph_matches_eager(dtype):
    graphs = GraphCache()
    for seed in range(3):  # the second and third calls replay the captured graph on new inputs
        frames = scene_video(12, 9, 32, seed, scenes=4).to("cuda", dtype)
        eager = segment_level(frames)
        graphed = segment_level(frames, graphs=graphs)
        assert len(graphs) == 1
        assert graphed.num_segments == eager.num_segments
        for name in (
            "kept_index",
            "features",
            "merge_target",
            "frame_segment_ids",
            "token_segment_ids",
            "marginal_values",
            "similarity",
            "redundancy",
        ):
            assert torch.equal(getattr(graphed, name), getattr(eager, name)), name


def test_segment_level_cuda_graphs_are_ignored_on_cpu():
    frames = scene_video(5, 4, 8, 0)
    graphs = GraphCache()
    a = segment_level(frames, graphs=graphs)
    b = segment_level(frames)
    assert torch.equal(a.kept_index, b.kept_index) and torch.equal(a.features, b.features)
    assert len(graphs) == 0


def test_segment_level_graphs_reject_an_empty_cache():
    with pytest.raises(ValueError, match="size must be >= 1"):
        GraphCache(size=0)
