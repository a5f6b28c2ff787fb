"""Property-based tests (hypothesis): shapes, invariants and degenerate inputs of every operator."""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from ops_reference import ref_dpp_select

from hieravid.ops import (
    dpp_select,
    most_kept,
    normalize_relevance,
    num_merged_tokens,
    segment_budgets,
    segment_level,
    select_tokens,
)
from hieravid.policy import SELECTOR_KINDS

SETTINGS = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])

dtypes = st.sampled_from([torch.float32, torch.float16, torch.bfloat16])


@st.composite
def videos(draw):
    F = draw(st.integers(1, 6))
    P = draw(st.integers(1, 5))
    D = draw(st.integers(1, 6))
    kind = draw(st.sampled_from(["random", "zeros", "identical", "constant_position", "mixed"]))
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    if kind == "random":
        x = torch.randn(F, P, D, generator=g)
    elif kind == "zeros":
        x = torch.zeros(F, P, D)
    elif kind == "identical":
        x = torch.randn(1, P, D, generator=g).expand(F, P, D).contiguous()
    elif kind == "constant_position":
        x = torch.randn(1, 1, D, generator=g).expand(F, P, D).contiguous()
    else:
        x = torch.randn(F, P, D, generator=g)
        x[torch.rand(F, P, generator=g) < 0.3] = 0.0
        x = x * torch.randint(0, 3, (F, 1, 1), generator=g)
    return x.to(draw(dtypes))


@SETTINGS
@given(
    frames=videos(),
    ratio=st.sampled_from([0.0, 0.3, 0.5, 0.75, 0.95]),
    tau=st.floats(-1.0, 1.0),
    beta=st.floats(0.0, 1.0),
)
def test_segment_level_invariants(frames, ratio, tau, beta):
    F, P, D = frames.shape
    out = segment_level(frames, merge_ratio=ratio, similarity_threshold=tau, segment_threshold=beta)
    N = F * P
    K = N - num_merged_tokens(F, P, ratio)
    assert out.kept_index.shape == (K,) and out.features.shape == (K, D)
    assert out.features.dtype == frames.dtype
    assert torch.all(out.kept_index[1:] > out.kept_index[:-1])
    assert set(range(P)) <= set(out.kept_index.tolist())  # frame 0 is never absorbed
    assert torch.isin(out.merge_target, out.kept_index).all()
    assert torch.all(out.merge_target[out.kept_index] == out.kept_index)
    assert torch.all(out.merge_target % P == torch.arange(N) % P)
    assert torch.all(out.merge_target <= torch.arange(N))
    fs = out.frame_segment_ids
    assert fs[0] == 0 and torch.all((fs[1:] - fs[:-1] >= 0) & (fs[1:] - fs[:-1] <= 1))
    assert out.num_segments == int(fs[-1]) + 1 == out.marginal_values.numel()
    assert torch.equal(out.token_segment_ids, fs[out.kept_index // P])
    for t in (out.similarity, out.redundancy, out.marginal_values, out.features.float()):
        assert not torch.isnan(t).any()


@st.composite
def stages(draw):
    n = draw(st.integers(0, 40))
    G = draw(st.integers(1, 5))
    D = draw(st.integers(1, 12))
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    kind = draw(st.sampled_from(["random", "duplicates", "zeros", "low_rank"]))
    if kind == "random":
        x = torch.randn(n, D, generator=g)
    elif kind == "duplicates":
        x = torch.randn(3, D, generator=g)[torch.randint(0, 3, (n,), generator=g)]
    elif kind == "zeros":
        x = torch.zeros(n, D)
    else:
        x = torch.randn(n, 1, generator=g) @ torch.randn(1, D, generator=g)
    rel_kind = draw(st.sampled_from(["random", "ties", "constant"]))
    if rel_kind == "random":
        rel = torch.rand(n, generator=g)
    elif rel_kind == "ties":
        rel = torch.randint(0, 3, (n,), generator=g).float()
    else:
        rel = torch.ones(n)
    seg = torch.randint(0, G, (n,), generator=g)
    budgets = torch.randint(-1, 15, (G,), generator=g)
    max_block = draw(st.sampled_from([None, 3, 8, 512]))
    return x.to(draw(dtypes)), rel, seg, budgets, max_block, kind


@SETTINGS
@given(stage=stages())
def test_dpp_select_properties(stage):
    x, rel, seg, budgets, max_block, kind = stage
    out = dpp_select(x, rel, seg, budgets, max_block=max_block)
    counts = torch.bincount(seg, minlength=budgets.numel())
    expected = torch.minimum(budgets.clamp_min(0), counts)
    assert out.dtype == torch.int64
    assert torch.all(out[1:] > out[:-1])
    assert torch.bincount(seg[out], minlength=budgets.numel()).tolist() == expected.tolist()
    if kind in ("random", "zeros"):
        assert out.tolist() == ref_dpp_select(x.float(), rel, seg, budgets, max_block=max_block)
    elif kind == "duplicates" and max_block is None and rel.numel() and float(rel.min()) >= 0.1 * float(rel.max()) > 0:
        # exact ties between copies are broken by float rounding, but diversity is not: every segment
        # holds as many distinct vectors as its budget allows (3 directions, linearly independent if D >= 3)
        for g in range(budgets.numel()):
            members = (seg == g).nonzero().flatten()
            picked = out[seg[out] == g]
            distinct_all = torch.unique(x[members].float(), dim=0).shape[0]
            distinct_picked = torch.unique(x[picked].float(), dim=0).shape[0]
            if x.shape[1] >= 3:
                assert distinct_picked == min(int(expected[g]), distinct_all)


@SETTINGS
@given(stage=stages(), name=st.sampled_from(["topk_relevance", "binned_relevance", "uniform", "random"]))
def test_selector_properties(stage, name):
    x, rel, seg, budgets, _, _ = stage
    out = select_tokens(SELECTOR_KINDS.get(name)(), x, rel, seg, budgets)
    counts = torch.bincount(seg, minlength=budgets.numel())
    assert torch.all(out[1:] > out[:-1])
    assert (
        torch.bincount(seg[out], minlength=budgets.numel()).tolist()
        == torch.minimum(budgets.clamp_min(0), counts).tolist()
    )


@SETTINGS
@given(
    counts=st.lists(st.integers(0, 500), min_size=1, max_size=8),
    rho=st.floats(0.0, 0.99),
    mv_scale=st.floats(0.0, 50.0),
    dynamic=st.booleans(),
    min_tokens=st.integers(0, 3),
)
def test_budget_properties(counts, rho, mv_scale, dynamic, min_tokens):
    c = torch.tensor(counts)
    mv = torch.linspace(-1, 1, len(counts)) * mv_scale
    k = segment_budgets(c, mv, rho, dynamic=dynamic, min_tokens=min_tokens)
    assert torch.all(k >= torch.minimum(c, torch.tensor(min_tokens)))
    assert torch.all(k <= c)
    if dynamic:
        assert torch.all(k <= torch.floor(c * 0.95 + 1e-6).long().clamp_min(torch.minimum(c, torch.tensor(min_tokens))))


@settings(max_examples=300, deadline=None)
@given(
    counts=st.lists(st.integers(0, 400), min_size=1, max_size=40),
    rho=st.sampled_from([0.0, 0.3, 0.43, 0.5, 0.57, 0.7, 0.85, 0.9]),
    values=st.data(),
    dynamic=st.booleans(),
    min_tokens=st.integers(0, 2),
)
def test_most_kept_bounds_every_split_and_every_marginal_value(counts, rho, values, dynamic, min_tokens):
    """The bound a static cache is sized with holds for any split of the tokens and any z-scored marginal values,
    the extreme ones included (one segment far from all others: z = sqrt(G - 1))."""
    c = torch.tensor(counts)
    groups = len(counts)
    kind = values.draw(st.sampled_from(["outlier", "random"]))
    raw = torch.zeros(groups)
    if kind == "outlier":
        raw[values.draw(st.integers(0, groups - 1))] = 1.0
    else:
        raw = torch.tensor(values.draw(st.lists(st.floats(-100, 100), min_size=groups, max_size=groups)))
    mv = (raw - raw.mean()) / (raw.std(unbiased=False) + 1e-8) if groups > 1 else torch.zeros(1)
    kept = int(segment_budgets(c, mv.float(), rho, dynamic=dynamic, min_tokens=min_tokens).sum())
    bound = most_kept(int(c.sum()), rho, segments=groups, dynamic=dynamic, min_tokens=min_tokens)
    assert kept <= bound <= int(c.sum())


def test_most_kept_by_hand():
    assert most_kept(0, 0.3, segments=5) == 0
    assert most_kept(100, 0.3, segments=1) == 71  # one segment: MV = 0, ⌊100·0.7⌋ + its floor of one token
    assert most_kept(100, 0.57, segments=32) == 100  # 32 segments: κ may reach 0.95, plus 32 floors
    assert most_kept(1000, 0.3, segments=4, dynamic=False) == 704


@SETTINGS
@given(
    values=st.lists(st.floats(0.0, 1.0, allow_nan=False), min_size=1, max_size=20),
    sign=st.sampled_from(["negative", "positive"]),
)
def test_normalize_relevance_properties(values, sign):
    a = torch.tensor(values)
    r = normalize_relevance(a, sign)
    assert r.shape == a.shape and torch.isfinite(r).all() and torch.all(r > 0)
    # monotone: non-increasing in the attention (negative) or non-decreasing (positive)
    order = torch.argsort(a, stable=True)
    steps = r[order][1:] - r[order][:-1]
    assert torch.all(steps <= 0) if sign == "negative" else torch.all(steps >= 0)
    if float(a.max()) - float(a.min()) > 1e-3:
        assert float(r.max()) >= 1.0 and float(r.min()) < 1e-3
