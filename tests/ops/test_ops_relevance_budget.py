"""Relevance (last-query attention, min–max normalisation) and per-segment budgets."""

from __future__ import annotations

import pytest
import torch
from ops_reference import ref_budgets, ref_last_query_attention

from hieravid.ops import last_query_attention, normalize_relevance, segment_budgets


@pytest.mark.parametrize(("Hq", "Hkv", "q"), [(4, 4, 1), (8, 2, 1), (6, 3, 4), (4, 1, 3)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_last_query_attention_matches_reference(device, Hq, Hkv, q, dtype):
    g = torch.Generator().manual_seed(Hq * 10 + q)
    B, S, d = 2, 11, 8
    query = torch.randn(B, Hq, q, d, generator=g).to(dtype)
    key = torch.randn(B, Hkv, S, d, generator=g).to(dtype)
    out = last_query_attention(query.to(device), key.to(device), scaling=d**-0.5)
    ref = ref_last_query_attention(query.float(), key.float(), d**-0.5)
    assert out.dtype == torch.float32 and out.shape == (B, S)
    torch.testing.assert_close(out.cpu().double(), ref, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out.sum(-1).cpu(), torch.ones(B), atol=1e-5, rtol=0)


def test_last_query_attention_causal_and_padding(device):
    g = torch.Generator().manual_seed(0)
    B, H, q, S, d = 2, 2, 3, 9, 4
    query = torch.randn(B, H, q, d, generator=g)
    key = torch.randn(B, H, S, d, generator=g)
    mask = torch.ones(B, S, dtype=torch.bool)
    mask[1, :3] = False  # left padding of sample 1
    mask[0, 4] = False
    out = last_query_attention(query.to(device), key.to(device), scaling=0.5, key_padding_mask=mask.to(device)).cpu()
    ref = ref_last_query_attention(query, key, 0.5, mask)
    torch.testing.assert_close(out.double(), ref, atol=1e-6, rtol=1e-5)
    assert out[1, :3].eq(0).all() and out[0, 4] == 0
    # the first of the q=3 rows sits at position 6: key 8 is seen by one row only, key 7 by two
    single = last_query_attention(query[:, :, :1].to(device), key[:, :, :7].to(device), scaling=0.5).cpu()
    assert single.shape == (B, 7)


def test_last_query_attention_fully_masked_rows_are_zero_not_nan(device):
    query = torch.randn(1, 2, 1, 4, device=device)
    key = torch.randn(1, 2, 5, 4, device=device)
    mask = torch.zeros(1, 5, dtype=torch.bool, device=device)
    out = last_query_attention(query, key, scaling=1.0, key_padding_mask=mask)
    assert torch.equal(out, torch.zeros(1, 5, device=device))


def test_last_query_attention_bad_heads():
    with pytest.raises(ValueError, match="multiple"):
        last_query_attention(torch.zeros(1, 3, 1, 4), torch.zeros(1, 2, 5, 4), scaling=1.0)
    with pytest.raises(ValueError, match="query rows"):
        last_query_attention(torch.zeros(1, 2, 6, 4), torch.zeros(1, 2, 5, 4), scaling=1.0)


def test_normalize_relevance_formula(device):
    a = torch.tensor([[0.1, 0.4, 0.2, 0.3], [0.5, 0.5, 0.0, 1.0]], device=device)
    neg = normalize_relevance(a).cpu()
    pos = normalize_relevance(a, "positive").cpu()
    v = -a.cpu().double()
    expect_neg = (v - v.amin(-1, keepdim=True) + 1e-6) / (v.amax(-1, keepdim=True) - v.amin(-1, keepdim=True))
    v = a.cpu().double()
    expect_pos = (v - v.amin(-1, keepdim=True) + 1e-6) / (v.amax(-1, keepdim=True) - v.amin(-1, keepdim=True))
    torch.testing.assert_close(neg.double(), expect_neg, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(pos.double(), expect_pos, atol=1e-6, rtol=1e-6)
    # negative sign: the least attended token is the most relevant
    assert int(neg[0].argmax()) == 0 and int(pos[0].argmax()) == 1


def test_normalize_relevance_degenerate(device):
    for a in (torch.full((5,), 0.2), torch.tensor([0.7]), torch.zeros(3), torch.tensor([float("nan"), 0.0])):
        r = normalize_relevance(a.to(device))
        assert torch.equal(r.cpu(), torch.ones_like(a)), a
    assert normalize_relevance(torch.zeros(0, device=device)).shape == (0,)
    r = normalize_relevance(torch.tensor([float("nan"), 0.5, 0.25], device=device))
    assert torch.isfinite(r).all() and int(r.argmax()) == 0
    with pytest.raises(ValueError, match="sign"):
        normalize_relevance(torch.zeros(3), "neg")  # type: ignore[arg-type]


@pytest.mark.parametrize("seed", range(10))
@pytest.mark.parametrize("rho", [0.0, 0.3, 0.57, 0.9])
@pytest.mark.parametrize("dynamic", [True, False])
def test_budgets_match_reference(device, seed, rho, dynamic):
    g = torch.Generator().manual_seed(seed)
    counts = torch.randint(0, 50, (9,), generator=g)
    counts[0] = 0
    counts[1] = 1
    mv = torch.randn(9, generator=g) * 2
    k = segment_budgets(counts.to(device), mv.to(device), rho, dynamic=dynamic)
    ref = ref_budgets(counts.tolist(), mv.double().tolist(), rho, dynamic=dynamic)
    assert k.dtype == torch.int64
    assert k.cpu().tolist() == ref


def test_budget_floor_guard_and_min_tokens(device):
    counts = torch.tensor([100, 10, 3, 1, 0], device=device)
    zeros = torch.zeros(5, device=device)
    assert segment_budgets(counts, zeros, 0.43, dynamic=False).tolist() == [57, 5, 1, 1, 0]
    assert segment_budgets(counts, zeros, 0.43, dynamic=False, min_tokens=0).tolist() == [57, 5, 1, 0, 0]
    assert segment_budgets(counts, zeros, 0.9, dynamic=False, min_tokens=0).tolist() == [10, 1, 0, 0, 0]
    assert segment_budgets(counts, zeros, 0.9, dynamic=False, min_tokens=5).tolist() == [10, 5, 3, 1, 0]
    # ratio 0: static keeps everything, dynamic clamps at max_keep
    assert segment_budgets(counts, zeros, 0.0, dynamic=False).tolist() == [100, 10, 3, 1, 0]
    assert segment_budgets(counts, zeros, 0.0).tolist() == [95, 9, 2, 1, 0]


def test_budget_clamps_and_nan(device):
    counts = torch.tensor([100, 100, 100], device=device)
    mv = torch.tensor([100.0, -100.0, float("nan")], device=device)
    assert segment_budgets(counts, mv, 0.5).tolist() == [95, 5, 50]


def test_budget_validation():
    with pytest.raises(ValueError, match="prune_ratio"):
        segment_budgets(torch.tensor([3]), torch.zeros(1), 1.0)
    with pytest.raises(ValueError, match="min_keep"):
        segment_budgets(torch.tensor([3]), torch.zeros(1), 0.5, min_keep=0.9, max_keep=0.1)
    with pytest.raises(ValueError, match="marginal_values"):
        segment_budgets(torch.tensor([3, 4]), torch.zeros(3), 0.5)
