"""Peer methods' input-level operators (hieravid.ops.peers) against plain loop references (float64)."""

from __future__ import annotations

import math

import pytest
import torch
from ops_reference import cos64, floor_ratio, ref_similarity

from hieravid.errors import HieravidError
from hieravid.ops import (
    DROPPED,
    INPUT_OPERATORS,
    SegmentLevelResult,
    UnknownInputOperatorError,
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
from hieravid.ops.peers import _allocate
from hieravid.policy import policy_from_dict

PEERS = ("evs", "dycoke", "vidcom2", "framefusion", "uniform", "random")


def scene_video(F: int, P: int, D: int, seed: int, noise: float = 0.4) -> torch.Tensor:
    """Three scenes of noisy copies, so adjacent frames are partly similar and partly not."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(3, P, D, generator=g)
    return torch.stack([base[min(2, f * 3 // F)] + noise * torch.randn(P, D, generator=g) for f in range(F)])


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


def ref_dycoke(frames: torch.Tensor, q: float, window: int) -> list[int]:
    F, P, _ = frames.shape
    compared = [f for f in range(F) if f % window]
    m = min(floor_ratio(F * P, q), len(compared) * P)
    kept: list[int] = []
    for f in range(F):
        offset = f % window
        if offset == 0:
            kept += [f * P + p for p in range(P)]
            continue
        reference = f - 1 if offset % 2 else f - offset
        c = compared.index(f)
        drops = m // len(compared) + (1 if c < m % len(compared) else 0)
        sims = [cos64(frames[f, p], frames[reference, p]) for p in range(P)]
        dropped = ref_topk(sims, drops)
        kept += [f * P + p for p in range(P) if p not in dropped]
    return kept


def ref_allocate(weights: list[float], total: int, cap: int) -> list[int]:
    """Water filling by repeated capping, then largest remainders (ties → lower frame index)."""
    F = len(weights)
    capped: set[int] = set()
    while True:
        free = [f for f in range(F) if f not in capped]
        share = (total - cap * len(capped)) / sum(weights[f] for f in free) if free else 0.0
        over = [f for f in free if share * weights[f] > cap * (1 + 1e-12)]
        if not over:
            break
        capped.add(max(over, key=lambda f: (weights[f], -f)))
    ideal = [float(cap) if f in capped else min(cap, share * weights[f]) for f in range(F)]
    base = [min(cap, math.floor(x)) for x in ideal]
    order = sorted(range(F), key=lambda f: (-(ideal[f] - base[f]) if base[f] < cap else 1.0, f))
    for f in order[: total - sum(base)]:
        base[f] += 1
    return base


def ref_vidcom2(frames: torch.Tensor, q: float, temperature: float) -> list[int]:
    F, P, _ = frames.shape
    x = frames.double()
    g = [x[f].mean(0) for f in range(F)]
    video = torch.stack(g).mean(0)
    u = [-cos64(g[f], video) for f in range(F)]
    top = max(v / temperature for v in u)
    e = [math.exp(v / temperature - top) for v in u]
    sigma = [v / sum(e) for v in e]
    budgets = ref_allocate([1 + s - 1 / F for s in sigma], F * P - floor_ratio(F * P, q), P)
    kept: list[int] = []
    for f in range(F):
        scores = [-(cos64(x[f, p], g[f]) + cos64(x[f, p], video)) for p in range(P)]
        chosen = ref_topk(scores, budgets[f])
        kept += [f * P + p for p in range(P) if p in chosen]
    return kept


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
@pytest.mark.parametrize(("F", "window", "q"), [(8, 4, 0.5), (8, 4, 0.72), (10, 4, 0.6), (9, 3, 0.3), (7, 2, 0.45)])
def test_dycoke_matches_reference(device, seed, F, window, q):
    frames = scene_video(F, 6, 10, seed).to(device)
    result = dycoke(frames, prune_ratio=q, window=window)
    check_dropping(result, frames, ref_dycoke(frames.cpu(), q, window))
    anchors = {f * 6 + p for f in range(0, F, window) for p in range(6)}
    assert anchors <= set(result.kept_index.tolist())


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize(("q", "temperature"), [(0.72, 0.01), (0.5, 0.1), (0.2, 1.0), (0.05, 0.01)])
def test_vidcom2_matches_reference(device, seed, q, temperature):
    frames = scene_video(7, 8, 12, seed).to(device)
    result = vidcom2(frames, prune_ratio=q, temperature=temperature)
    check_dropping(result, frames, ref_vidcom2(frames.cpu(), q, temperature))


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize(("total", "cap"), [(0, 5), (7, 5), (20, 5), (34, 5), (35, 5), (12, 3)])
def test_allocation_is_capped_proportional_and_exact(seed, total, cap):
    g = torch.Generator().manual_seed(seed)
    F = 7 if cap == 5 else 4
    weights = torch.rand(F, generator=g).double() ** 4 + 0.01  # skewed: some frames hit the cap
    budgets = _allocate(weights, min(total, F * cap), cap)
    assert budgets.tolist() == ref_allocate(weights.tolist(), min(total, F * cap), cap)
    assert int(budgets.sum()) == min(total, F * cap) and int(budgets.max()) <= cap and int(budgets.min()) >= 0


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
@pytest.mark.parametrize(("F", "P"), [(1, 5), (2, 3), (5, 4), (8, 6), (13, 7)])
@pytest.mark.parametrize("q", [0.0, 0.25, 0.5, 0.72, 0.8, 0.95])
def test_counts_match_the_planner(kind, F, P, q):
    """Each operator removes exactly what the policy reports to the planner (FrameFusion: at most)."""
    frames = scene_video(F, P, 6, F * P, noise=0.05)
    result = input_level(kind, frames, prune_ratio=q)
    removed = F * P - result.kept_index.numel()
    planned = removed_by_policy(kind, F, P, q)
    if kind == "framefusion":
        assert removed <= planned
    else:
        assert removed == planned
        if kind not in ("evs", "dycoke"):
            assert removed == floor_ratio(F * P, q)
    assert len(set(result.kept_index.tolist())) == result.kept_index.numel()


@pytest.mark.parametrize("kind", PEERS)
def test_deterministic_and_nan_free_on_zero_and_constant_frames(device, kind):
    frames = scene_video(8, 9, 8, 5).to(device)
    frames[2] = 0.0  # zero vectors: cosines are 0, never NaN
    frames[5] = frames[4]  # an exact repeat: ties everywhere
    first = input_level(kind, frames, prune_ratio=0.6)
    second = input_level(kind, frames.clone(), prune_ratio=0.6)
    for name in ("kept_index", "features", "merge_target", "similarity", "redundancy"):
        assert torch.equal(getattr(first, name), getattr(second, name)), name
    assert not first.features.isnan().any() and not first.similarity.isnan().any()


@pytest.mark.parametrize("kind", PEERS)
def test_bfloat16_inputs_keep_their_dtype(kind):
    frames = scene_video(4, 6, 8, 2).to(torch.bfloat16)
    result = input_level(kind, frames, prune_ratio=0.5)
    assert result.features.dtype == torch.bfloat16
    assert result.kept_index.dtype == torch.int64


def test_invalid_arguments_are_rejected():
    frames = scene_video(4, 3, 4, 0)
    for kind in PEERS:
        with pytest.raises(ValueError, match="prune_ratio"):
            input_level(kind, frames, prune_ratio=1.0)
    with pytest.raises(ValueError, match="window"):
        dycoke(frames, prune_ratio=0.5, window=1)
    with pytest.raises(ValueError, match="temperature"):
        vidcom2(frames, prune_ratio=0.5, temperature=0.0)
    with pytest.raises(ValueError, match="shape"):
        evs(frames[0], prune_ratio=0.5)


# ---------------------------------------------------------------------------------------------- registry
def test_registry_dispatches_every_policy_kind():
    assert set(INPUT_OPERATORS) == {"hieravid", *PEERS}
    assert INPUT_OPERATORS["hieravid"] is segment_level
    frames = scene_video(6, 5, 8, 0)
    hv = input_level(
        "hieravid", frames, similarity_threshold=0.6, segment_threshold=0.4, merge_ratio=0.5, marginal_value_weight=0.5
    )
    assert torch.equal(hv.kept_index, segment_level(frames).kept_index)
    assert torch.equal(input_level("evs", frames, prune_ratio=0.3).kept_index, evs(frames, prune_ratio=0.3).kept_index)


def test_unknown_operator_lists_the_known_ones():
    with pytest.raises(UnknownInputOperatorError, match="known: dycoke, evs") as info:
        input_level("nope", scene_video(2, 2, 2, 0))
    assert isinstance(info.value, KeyError) and isinstance(info.value, HieravidError)
    assert "'nope'" in str(info.value)


def test_register_input_operator_adds_and_replaces():
    calls: list[float] = []

    def keep_all(frames: torch.Tensor, *, prune_ratio: float = 0.0) -> SegmentLevelResult:
        calls.append(prune_ratio)
        return uniform_input(frames, prune_ratio=0.0)

    try:
        assert register_input_operator("keep-all-test")(keep_all) is keep_all
        result = input_level("keep-all-test", scene_video(3, 2, 2, 0), prune_ratio=0.25)
        assert calls == [0.25] and result.kept_index.numel() == 6
    finally:
        INPUT_OPERATORS.pop("keep-all-test", None)
    with pytest.raises(ValueError):
        register_input_operator("")
