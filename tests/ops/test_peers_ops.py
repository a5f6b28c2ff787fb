"""Peer methods' input-level operators (hieravid.ops.peers) against plain loop references (float64)."""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Literal

import pytest
import torch
from ops_reference import cos64, floor_ratio, ref_similarity

from hieravid.diagnostics import SyncSpy
from hieravid.errors import HieravidError
from hieravid.ops import (
    DROPPED,
    INPUT_OPERATORS,
    SegmentLevelResult,
    UnregisteredOperatorError,
    dycoke,
    evs,
    framefusion,
    input_level,
    random_input,
    register_input_operator,
    segment_level,
    uniform_input,
    vidcom2,
)
from hieravid.policy import INPUT_LEVEL_KINDS, InputLevelConfig, SegmentLevel, policy_from_dict

PEERS = ("evs", "dycoke", "vidcom2", "framefusion", "uniform", "random")


def scene_video(F: int, P: int, D: int, seed: int, noise: float = 0.4) -> torch.Tensor:
    """Three scenes of noisy copies, so adjacent frames are partly similar and partly not."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(3, P, D, generator=g)
    return torch.stack([base[min(2, f * 3 // F)] + noise * torch.randn(P, D, generator=g) for f in range(F)])


def run_kind(kind: str, frames: torch.Tensor, **options: object) -> SegmentLevelResult:
    """The operator bound to the config class of ``kind``, with these options (validated like YAML)."""
    return input_level(INPUT_LEVEL_KINDS.get(kind).model_validate({"kind": kind, **options}), frames)


def removed_by_policy(kind: str, F: int, P: int, ratio: float, **options: object) -> int:
    """The planner's count for this operator (``policy.segment.removed_tokens``)."""
    policy = policy_from_dict(
        {"version": 1, "kind": "PruningPolicy", "name": "t", "segment": {"kind": kind, "prune_ratio": ratio, **options}}
    )
    return policy.segment.removed_tokens(F, P)


def ref_topk(scores: list[float], k: int) -> set[int]:
    """Indices of the k highest scores, ties → lower index."""
    return {i for _, i in sorted((-s, i) for i, s in enumerate(scores))[:k]}


# ---------------------------------------------------------------------------------------------- references
def ref_evs(frames: torch.Tensor, q: float) -> list[int]:
    F, P, _ = frames.shape
    sim = ref_similarity(frames)
    m = min(floor_ratio(F * P, q), (F - 1) * P)
    candidates = sorted((-sim[f][p], f * P + p) for f in range(1, F) for p in range(P))
    dropped = {idx for _, idx in candidates[:m]}
    return [i for i in range(F * P) if i not in dropped]


def ref_kept_per_pruned_frame(P: int, k: float) -> int:
    """Exact ⌊(1 − k)·P⌋ for a decimal k."""
    return math.floor((1 - Fraction(str(k))) * P)


def ref_dycoke(frames: torch.Tensor, k: float, odd_last_frame: str = "keep") -> list[int]:
    """DyCoke's TTM as its authors' loops run it (pairs, then windows of 4), on float64 cosines; a pruned frame
    keeps its ⌊(1 − k)·P⌋ positions least similar to the reference frame (ties → lower position). Where the
    authors' code fails (F <= 4: an empty stack) there are simply no windows; a single frame is kept whole."""
    F, P, _ = frames.shape
    K = ref_kept_per_pruned_frame(P, k)

    def least_similar(f: int, reference: int) -> list[int]:
        sims = [cos64(frames[f, p], frames[reference, p]) for p in range(P)]
        return sorted(range(P), key=lambda p: (sims[p], p))[:K]

    kept: dict[int, list[int]] = {0: list(range(P))} if F == 1 else {}
    for i in range(0, F - 1, 2):
        kept[i] = list(range(P))
        kept[i + 1] = least_similar(i + 1, i)
    for i in range(0, F - 4, 4):
        kept[i] = list(range(P))
        kept[i + 2] = least_similar(i + 2, i)
    if F % 2 == 1 and F >= 3 and odd_last_frame == "keep":
        kept[F - 1] = list(range(P))  # the authors' code drops it ("drop")
    return sorted(f * P + p for f, positions in kept.items() for p in positions)


VIDCOM2_BANDWIDTHS = (1 / 8, 1 / 4, 1 / 2, 1.0, 2.0)


def ref_vidcom2_kept(F: int, P: int, q: float) -> int:
    """R = max(F, min(⌊N(1 − q)⌋, N)), exact for a decimal q."""
    N = F * P
    return max(F, min(math.floor((1 - Fraction(str(q))) * N), N))


def ref_vidcom2(frames: torch.Tensor, q: float, temperature: float) -> list[int]:
    """VidCom2 as its authors' code does it, one plain loop per step, float64 throughout (ties → lower index)."""
    F, P, D = frames.shape
    N = F * P
    R = ref_vidcom2_kept(F, P, q)
    x = frames.double().tolist()
    tokens = [x[f][p] for f in range(F) for p in range(P)]  # flat index f·P + p
    # 2. population variance of each channel over the video's tokens; the lower half (at least one) is kept.
    variance = []
    for c in range(D):
        values = [t[c] for t in tokens]
        mean = sum(values) / N
        variance.append(sum((v - mean) ** 2 for v in values) / N)
    channels = sorted(range(D), key=lambda c: (variance[c], c))[: max(1, D // 2)]
    # 3. unit tokens on those channels, video and frame centres.
    units = []
    for t in tokens:
        v = [t[c] for c in channels]
        norm = max(math.sqrt(sum(a * a for a in v)), 1e-12)
        units.append([a / norm for a in v])
    width = len(channels)
    video = [sum(u[j] for u in units) / N for j in range(width)]
    frame_centre = [[sum(units[f * P + p][j] for p in range(P)) / P for j in range(width)] for f in range(F)]

    def s(u: list[float], c: list[float]) -> float:
        d2 = sum((a - b) ** 2 for a, b in zip(u, c))
        return sum(math.exp(-d2 / (2 * a)) for a in VIDCOM2_BANDWIDTHS)

    # 4. redundancy; 5. frame budgets.
    to_video = [s(units[i], video) for i in range(N)]
    redundancy = [to_video[i] + s(units[i], frame_centre[i // P]) for i in range(N)]
    score = [-sum(to_video[f * P : (f + 1) * P]) / P for f in range(F)]
    top = max(score)
    e = [math.exp((v - top) / temperature) for v in score]
    p = [v / sum(e) for v in e]
    mean_p = sum(p) / F
    budgets = []
    for f in range(F):
        y = min(1.0, (1 - q) * (1 + p[f] - mean_p)) * P
        if abs(y - (math.floor(y) + 0.5)) < 1e-9:
            y = math.floor(y) + 0.5
        budgets.append(min(P, max(1, round(y))))  # Python's round: half to even
    # 6. per frame, the k_t least redundant tokens.
    keep: set[int] = set()
    for f in range(F):
        ranked = sorted(range(f * P, (f + 1) * P), key=lambda i: (redundancy[i], i))
        keep.update(ranked[: budgets[f]])
    # 7. exact total, globally.
    ascending = sorted(range(N), key=lambda i: (redundancy[i], i))
    if len(keep) > R:
        keep = set([i for i in ascending if i in keep][:R])
    elif len(keep) < R:
        keep |= set([i for i in ascending if i not in keep][: R - len(keep)])
    return sorted(keep)


def ref_framefusion(frames: torch.Tensor, q: float, tau: float) -> tuple[list[int], torch.Tensor, list[int]]:
    F, P, _ = frames.shape
    sim = ref_similarity(frames)
    above = sorted((-sim[f][p], f * P + p) for f in range(1, F) for p in range(P) if sim[f][p] > tau)
    selected = {idx for _, idx in above[: min(floor_ratio(F * P, q), (F - 1) * P)]}
    x = frames.double()
    target = list(range(F * P))
    groups: dict[int, list[int]] = {}
    for p in range(P):
        anchor = p
        for f in range(F):
            idx = f * P + p
            if idx in selected:
                target[idx] = anchor
                groups[anchor].append(idx)
            else:
                anchor = idx
                groups[idx] = [idx]
    kept = sorted(groups)
    features = torch.stack([torch.stack([x[i // P, i % P] for i in groups[a]]).mean(0) for a in kept])
    return kept, features, target


def ref_uniform(F: int, P: int, q: float) -> list[int]:
    K = F * P - floor_ratio(F * P, q)
    kept: list[int] = []
    for f in range(F):
        k = (f + 1) * K // F - f * K // F
        kept += sorted(f * P + (2 * i + 1) * P // (2 * k) for i in range(k))
    return kept


# ---------------------------------------------------------------------------------------------- vs references
def check_common(result: SegmentLevelResult, frames: torch.Tensor, kept: list[int]) -> None:
    F, P, D = frames.shape
    index = result.kept_index.cpu().tolist()
    assert index == kept
    assert index == sorted(set(index))  # ascending, no duplicates
    assert result.features.shape == (len(kept), D) and result.features.dtype == frames.dtype
    assert result.num_segments == 1
    assert result.frame_segment_ids.tolist() == [0] * F
    assert result.token_segment_ids.tolist() == [0] * len(kept)
    assert result.marginal_values.tolist() == [0.0]
    assert result.similarity.shape == (F, P) and result.redundancy.shape == (F,)
    target = result.merge_target.cpu().tolist()
    assert all(target[i] == i for i in kept)


def check_dropping(result: SegmentLevelResult, frames: torch.Tensor, kept: list[int]) -> None:
    check_common(result, frames, kept)
    F, P, D = frames.shape
    assert torch.equal(result.features, frames.reshape(F * P, D)[result.kept_index])
    target = result.merge_target.cpu().tolist()
    assert all(target[i] == DROPPED for i in set(range(F * P)) - set(kept))
    removed = 1 - torch.tensor([sum(1 for i in kept if i // P == f) / P for f in range(F)])
    torch.testing.assert_close(result.redundancy.cpu(), removed)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("q", [0.0, 0.3, 0.72, 0.9])
def test_evs_matches_reference_and_keeps_frame_0(device, seed, q):
    frames = scene_video(6, 7, 12, seed).to(device)
    result = evs(frames, prune_ratio=q)
    check_dropping(result, frames, ref_evs(frames.cpu(), q))
    assert set(range(7)) <= set(result.kept_index.tolist())


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("odd_last_frame", ["keep", "drop"])
@pytest.mark.parametrize(
    ("F", "k"), [(1, 0.7), (2, 0.7), (3, 0.5), (4, 0.7), (5, 0.7), (8, 0.7), (9, 0.72), (13, 0.9), (16, 0.0)]
)
def test_dycoke_matches_reference(device, seed, odd_last_frame, F, k):
    frames = scene_video(F, 10, 10, seed).to(device)
    result = dycoke(frames, prune_ratio=k, odd_last_frame=odd_last_frame)
    kept = ref_dycoke(frames.cpu(), k, odd_last_frame)
    check_dropping(result, frames, kept)
    assert F * 10 - len(kept) == removed_by_policy("dycoke", F, 10, k, odd_last_frame=odd_last_frame)
    per_frame = [sum(1 for i in kept if i // 10 == f) for f in range(F)]
    K = ref_kept_per_pruned_frame(10, k)
    assert set(per_frame) <= {0, K, 10}  # whole, pruned to exactly K, or (odd last, "drop") dropped
    assert per_frame[0] == 10


def test_dycoke_frame_roles():
    """Which frames the authors' loops prune (p), keep whole (W) and drop (-, odd count with "drop")."""
    expected = {
        1: "W",
        2: "Wp",
        3: "Wp-",
        4: "WpWp",
        5: "Wppp-",  # window 0 (0 < F − 4): frame 2 re-cut against frame 0
        8: "WpppWpWp",  # a window at 4 would need 4 < F − 4: the last window's third frame stays whole
        9: "WpppWppp-",
        13: "WpppWpppWppp-",
    }
    for F, roles in expected.items():
        counts = dycoke(scene_video(F, 4, 6, F), prune_ratio=0.5, odd_last_frame="drop").redundancy.tolist()
        assert "".join({0.0: "W", 0.5: "p", 1.0: "-"}[c] for c in counts) == roles, F


def test_dycoke_degenerate_inputs():
    P = 6
    # identical frames: every similarity is 1, so ties keep the lowest positions of each pruned frame.
    same = scene_video(1, P, 8, 0).expand(8, P, 8).contiguous()
    kept = dycoke(same, prune_ratio=0.5).kept_index.tolist()
    assert kept == ref_dycoke(same, 0.5)
    assert [i % P for i in kept if i // P == 1] == [0, 1, 2]
    # zero vectors: cosines are 0, never NaN; ties again.
    frames = scene_video(6, P, 8, 1)
    frames[1] = 0.0
    frames[4] = 0.0
    result = dycoke(frames, prune_ratio=0.7)
    assert result.kept_index.tolist() == ref_dycoke(frames, 0.7)
    # k = 0 keeps everything; a k that keeps 0 tokens per pruned frame keeps the whole frames only.
    assert dycoke(frames, prune_ratio=0.0).kept_index.tolist() == list(range(6 * P))
    assert dycoke(frames, prune_ratio=0.9).kept_index.tolist() == [f * P + p for f in (0, 4) for p in range(P)]
    # bf16: decided on the bf16 values (cast up), features returned in bf16.
    low = scene_video(9, P, 8, 2).to(torch.bfloat16)
    out = dycoke(low, prune_ratio=0.72, odd_last_frame="drop")
    assert out.kept_index.tolist() == ref_dycoke(low, 0.72, "drop") and out.features.dtype == torch.bfloat16


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize(
    ("F", "P", "D", "q", "temperature"),
    [
        (7, 8, 12, 0.72, 0.01),
        (7, 8, 12, 0.5, 0.1),
        (7, 8, 13, 0.2, 1.0),  # odd width: ⌊13/2⌋ channels
        (7, 8, 12, 0.05, 0.01),
        (5, 9, 6, 0.9, 0.01),
        (13, 7, 6, 0.95, 0.01),  # R = F: one token per frame on average
        (6, 5, 4, 0.0, 0.01),
        (1, 11, 8, 0.6, 0.01),
        (4, 6, 1, 0.5, 0.01),  # one channel
    ],
)
def test_vidcom2_matches_reference(device, seed, F, P, D, q, temperature):
    frames = scene_video(F, P, D, seed).to(device)
    result = vidcom2(frames, prune_ratio=q, temperature=temperature)
    kept = ref_vidcom2(frames.cpu(), q, temperature)
    check_dropping(result, frames, kept)
    assert len(kept) == ref_vidcom2_kept(F, P, q) == F * P - removed_by_policy("vidcom2", F, P, q)


def test_vidcom2_degenerate_inputs():
    # identical frames: equal budgets round((1 − q)·P), then exact total with ties → lower flat index.
    same = scene_video(1, 6, 8, 0).expand(5, 6, 8).contiguous()
    for q in (0.0, 0.5, 0.75, 0.72, 0.95, 0.99):  # (1 − 0.75)·6 = 1.5: half to even → 2 per frame
        assert vidcom2(same, prune_ratio=q).kept_index.tolist() == ref_vidcom2(same, q, 0.01), q
    kept = vidcom2(same, prune_ratio=0.75).kept_index
    # 10 budgeted, R = ⌊30·0.25⌋ = 7: the 3 most redundant kept tokens go, the later frame's first on ties.
    assert sorted(torch.bincount(kept // 6, minlength=5).tolist()) == [1, 1, 1, 2, 2]
    # all-zero video: every token ties; one frame; zero vectors among others.
    zeros = torch.zeros(4, 5, 6)
    assert vidcom2(zeros, prune_ratio=0.6).kept_index.tolist() == ref_vidcom2(zeros, 0.6, 0.01)
    frames = scene_video(6, 7, 8, 3)
    frames[2] = 0.0
    frames[4, 3] = 0.0
    result = vidcom2(frames, prune_ratio=0.72)
    assert result.kept_index.tolist() == ref_vidcom2(frames, 0.72, 0.01)
    assert not result.features.isnan().any()
    one = scene_video(1, 9, 8, 4)
    assert vidcom2(one, prune_ratio=0.5).kept_index.tolist() == ref_vidcom2(one, 0.5, 0.01)
    # bf16: decided on the bf16 values (cast up), features returned in bf16.
    low = scene_video(6, 7, 8, 5).to(torch.bfloat16)
    out = vidcom2(low, prune_ratio=0.72)
    assert out.kept_index.tolist() == ref_vidcom2(low, 0.72, 0.01) and out.features.dtype == torch.bfloat16


def test_vidcom2_ignores_high_variance_channels_and_favours_unlike_frames():
    """The high-variance half of the channels plays no part; a frame unlike the rest gets the most tokens."""
    g = torch.Generator().manual_seed(1)
    frames = scene_video(6, 8, 8, 0, noise=0.1)
    noisy = frames.clone()
    noisy[..., 4:] = 50 * torch.randn(6, 8, 4, generator=g)
    other = noisy.clone()
    other[..., 4:] = 50 * torch.randn(6, 8, 4, generator=g)
    assert torch.equal(vidcom2(noisy, prune_ratio=0.5).kept_index, vidcom2(other, prune_ratio=0.5).kept_index)
    video = scene_video(1, 8, 8, 2, noise=0.0).expand(6, 8, 8) + 0.01 * torch.randn(6, 8, 8, generator=g)
    video[3] = torch.randn(8, 8, generator=g)
    kept = vidcom2(video, prune_ratio=0.6).kept_index
    assert int(torch.bincount(kept // 8, minlength=6).argmax()) == 3


@pytest.mark.parametrize("kind", ["dycoke", "vidcom2", "evs", "uniform"])
def test_input_operators_do_not_synchronise(kind):
    """Static output sizes: nothing in these operators reads the device (SyncSpy: tensors made outside count
    as device tensors)."""
    frames = scene_video(9, 7, 8, 0)
    spy = SyncSpy()
    with spy:
        run_kind(kind, frames, prune_ratio=0.72)
    assert {site: n for site, n in spy.counts.items() if "ops/" in site[0]} == {}


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize(("q", "tau"), [(0.5, 0.6), (0.3, 0.0), (0.9, 0.6), (0.5, 0.99)])
def test_framefusion_merges_only_above_threshold(device, seed, q, tau):
    frames = scene_video(6, 5, 16, seed).to(device)
    result = framefusion(frames, prune_ratio=q, similarity_threshold=tau)
    kept, features, target = ref_framefusion(frames.cpu(), q, tau)
    check_common(result, frames, kept)
    assert result.merge_target.cpu().tolist() == target
    torch.testing.assert_close(result.features.cpu().double(), features, atol=1e-5, rtol=1e-5)
    # At most the planner's upper bound; as many as the pairs above τ allow.
    removed = 30 - len(kept)
    assert removed <= removed_by_policy("framefusion", 6, 5, q, similarity_threshold=tau)
    above = int((result.similarity[1:] > tau).sum())
    assert removed == min(floor_ratio(30, q), above)


def test_framefusion_equals_the_segment_merge_when_the_threshold_does_not_bind():
    frames = scene_video(6, 5, 16, 0)
    peer = framefusion(frames, prune_ratio=0.4, similarity_threshold=0.0)
    assert int((peer.similarity[1:] > 0.0).sum()) >= floor_ratio(30, 0.4)
    hv = segment_level(frames, merge_ratio=0.4)
    assert torch.equal(peer.kept_index, hv.kept_index)
    assert torch.equal(peer.features, hv.features)
    assert torch.equal(peer.merge_target, hv.merge_target)


@pytest.mark.parametrize(("F", "P", "q"), [(5, 7, 0.72), (8, 16, 0.5), (3, 4, 0.9), (6, 6, 0.0)])
def test_uniform_matches_reference(device, F, P, q):
    frames = scene_video(F, P, 4, 0).to(device)
    result = uniform_input(frames, prune_ratio=q)
    kept = ref_uniform(F, P, q)
    check_dropping(result, frames, kept)
    per_frame = [sum(1 for i in kept if i // P == f) for f in range(F)]
    assert max(per_frame) - min(per_frame) <= 1


@pytest.mark.parametrize("seed", [0, 3])
def test_random_is_seeded_and_device_independent(device, seed):
    frames = scene_video(6, 7, 4, 1).to(device)
    result = random_input(frames, prune_ratio=0.6, seed=seed)
    keys = torch.rand(42, generator=torch.Generator().manual_seed(seed)).tolist()
    check_dropping(result, frames, sorted(ref_topk(keys, 42 - floor_ratio(42, 0.6))))
    on_cpu = random_input(frames.cpu(), prune_ratio=0.6, seed=seed)
    assert torch.equal(result.kept_index.cpu(), on_cpu.kept_index)
    other = random_input(frames, prune_ratio=0.6, seed=seed + 1)
    assert not torch.equal(result.kept_index, other.kept_index)


# ---------------------------------------------------------------------------------------------- properties
@pytest.mark.parametrize("kind", PEERS)
@pytest.mark.parametrize(("F", "P"), [(1, 5), (2, 3), (3, 4), (4, 4), (5, 4), (8, 6), (9, 5), (13, 7)])
@pytest.mark.parametrize("q", [0.0, 0.25, 0.5, 0.72, 0.8, 0.95])
def test_counts_match_the_planner(kind, F, P, q):
    """Each operator removes exactly what the policy reports to the planner (FrameFusion: at most)."""
    frames = scene_video(F, P, 6, F * P, noise=0.05)
    variants: list[dict[str, object]] = [{"odd_last_frame": "keep"}, {"odd_last_frame": "drop"}]
    for options in variants if kind == "dycoke" else [{}]:
        result = run_kind(kind, frames, prune_ratio=q, **options)
        removed = F * P - result.kept_index.numel()
        planned = removed_by_policy(kind, F, P, q, **options)
        if kind == "framefusion":
            assert removed <= planned
        else:
            assert removed == planned
        if kind == "vidcom2":
            assert removed == F * P - ref_vidcom2_kept(F, P, q)
        elif kind == "dycoke":
            pruned = len(range(1, F, 2)) + len(range(0, F - 4, 4))  # pairs' second frames, windows' third
            dropped = P if options["odd_last_frame"] == "drop" and F % 2 and F >= 3 else 0
            assert removed == pruned * (P - ref_kept_per_pruned_frame(P, q)) + dropped
        elif kind in ("uniform", "random"):
            assert removed == floor_ratio(F * P, q)
        assert len(set(result.kept_index.tolist())) == result.kept_index.numel()


@pytest.mark.parametrize("kind", PEERS)
def test_deterministic_and_nan_free_on_zero_and_constant_frames(device, kind):
    frames = scene_video(8, 9, 8, 5).to(device)
    frames[2] = 0.0  # zero vectors: cosines are 0, never NaN
    frames[5] = frames[4]  # an exact repeat: ties everywhere
    first = run_kind(kind, frames, prune_ratio=0.6)
    second = run_kind(kind, frames.clone(), prune_ratio=0.6)
    for name in ("kept_index", "features", "merge_target", "similarity", "redundancy"):
        assert torch.equal(getattr(first, name), getattr(second, name)), name
    assert not first.features.isnan().any() and not first.similarity.isnan().any()


@pytest.mark.parametrize("kind", PEERS)
def test_bfloat16_inputs_keep_their_dtype(kind):
    frames = scene_video(4, 6, 8, 2).to(torch.bfloat16)
    result = run_kind(kind, frames, prune_ratio=0.5)
    assert result.features.dtype == torch.bfloat16
    assert result.kept_index.dtype == torch.int64


def test_invalid_arguments_are_rejected():
    frames = scene_video(4, 3, 4, 0)
    for kind in PEERS:
        with pytest.raises(ValueError, match="prune_ratio"):
            run_kind(kind, frames, prune_ratio=1.0)
    with pytest.raises(ValueError, match="odd_last_frame"):
        dycoke(frames, prune_ratio=0.5, odd_last_frame="first")
    with pytest.raises(ValueError, match="temperature"):
        vidcom2(frames, prune_ratio=0.5, temperature=0.0)
    with pytest.raises(ValueError, match="shape"):
        evs(frames[0], prune_ratio=0.5)


# ---------------------------------------------------------------------------------------------- registry
def test_registry_dispatches_every_policy_kind():
    assert {cls.model_fields["kind"].default for cls in INPUT_OPERATORS.config_classes()} == {"hieravid", *PEERS}
    frames = scene_video(6, 5, 8, 0)
    assert torch.equal(input_level(SegmentLevel(), frames).kept_index, segment_level(frames).kept_index)
    assert torch.equal(run_kind("evs", frames, prune_ratio=0.3).kept_index, evs(frames, prune_ratio=0.3).kept_index)


def test_a_config_without_operator_is_a_clear_error():
    class Unbound(InputLevelConfig):
        kind: Literal["unbound_test"] = "unbound_test"

        @property
        def static_prune_ratio(self) -> float:
            return 0.0

    with pytest.raises(UnregisteredOperatorError, match=r"@register_input_operator\(Unbound\)") as info:
        input_level(Unbound(), scene_video(2, 2, 2, 0))
    assert isinstance(info.value, HieravidError)


def test_register_input_operator_binds_a_config_class():
    class KeepAll(InputLevelConfig):
        kind: Literal["keep_all_test"] = "keep_all_test"
        note: str = "x"

        @property
        def static_prune_ratio(self) -> float:
            return 0.0

    calls: list[str] = []

    @register_input_operator(KeepAll)
    def keep_all(frames: torch.Tensor, config: InputLevelConfig, /, *, graphs=None) -> SegmentLevelResult:
        calls.append(config.note)
        return uniform_input(frames, prune_ratio=0.0)

    result = input_level(KeepAll(note="y"), scene_video(3, 2, 2, 0))
    assert calls == ["y"] and result.kept_index.numel() == 6
    with pytest.raises(TypeError, match="InputLevelConfig"):
        register_input_operator(dict)
