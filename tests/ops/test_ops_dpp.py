"""Greedy DPP MAP selection vs an O(k·n²) reference straight from Chen et al. (2018)."""

from __future__ import annotations

import math
import os

import pytest
import torch
from ops_reference import ref_dpp_select, ref_greedy

from hieravid.ops import DPP_EPS, dpp_select, greedy_map_dpp, greedy_map_dpp_order, triton_available

BACKENDS = ["torch"]
if torch.cuda.is_available():
    BACKENDS += ["triton"] if triton_available() else []


def random_stage(n: int, D: int, G: int, seed: int, device, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(n, D, generator=g).to(dtype)
    rel = torch.rand(n, generator=g) + 0.05
    seg = torch.sort(torch.randint(0, G, (n,), generator=g)).values
    counts = torch.bincount(seg, minlength=G)
    budgets = (counts.double() * (0.2 + 0.7 * torch.rand(G, generator=g, dtype=torch.float64))).long()
    return feats.to(device), rel.to(device), seg.to(device), budgets.to(device)


def replay_is_greedy(K: torch.Tensor, order: list[int], fallback: list[float], eps: float, tol: float) -> None:
    """Replay an order in float64: every DPP step must pick a maximal d² (up to ``tol`` times the largest
    diagonal entry); once the largest remaining d² is at most ``eps`` times it, every pick must be the best
    remaining fallback score (lowest index among ties)."""
    K = K.double()
    n = K.shape[0]
    scale = float(torch.diagonal(K).max())
    c = torch.zeros(len(order), n, dtype=torch.float64)
    d2 = torch.diagonal(K).clone()
    free = torch.ones(n, dtype=torch.bool)
    exhausted = False
    for t, j in enumerate(order):
        assert free[j], "duplicate pick"
        best = float(d2[free].max())
        exhausted = exhausted or best <= eps * scale
        if exhausted:
            remaining = [i for i in range(n) if free[i]]
            assert j == max(remaining, key=lambda i: (fallback[i], -i)), (t, j)
        else:
            assert float(d2[j]) >= best - tol * scale, (t, j, float(d2[j]), best)
            e = (K[j] - c[:t, j] @ c[:t]) / math.sqrt(float(d2[j]))
            c[t] = e
            d2 -= e**2
        free[j] = False


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("seed", range(10))
def test_greedy_matches_reference(device, backend, seed):
    if backend != "torch" and device.type != "cuda":
        pytest.skip("GPU backend")
    g = torch.Generator().manual_seed(seed)
    G, n, D = 4, 23, 40
    X = torch.nn.functional.normalize(torch.randn(G, n, D, generator=g), dim=-1)
    r = torch.rand(G, n, generator=g) + 0.1
    K = r[:, :, None] * (X @ X.transpose(1, 2)) * r[:, None, :]
    valid = torch.ones(G, n, dtype=torch.bool)
    valid[1, 17:] = False
    valid[3, :5] = False
    budgets = torch.tensor([0, 17, 23, 9])
    order = greedy_map_dpp_order(K.to(device), valid.to(device), budgets.to(device), r.to(device), backend=backend)
    mask = greedy_map_dpp(K.to(device), valid.to(device), budgets.to(device), r.to(device), backend=backend)
    assert order.shape == (G, 23)  # clamped budgets: 0, 17, 23, 9
    for b in range(G):
        idx = valid[b].nonzero().flatten().tolist()
        sub = K[b][idx][:, idx]
        ref = [idx[i] for i in ref_greedy(sub, int(budgets[b]), [float(r[b, i]) for i in idx], DPP_EPS)]
        got = [j for j in order[b].tolist() if j >= 0]
        assert got == ref
        assert sorted(mask[b].nonzero().flatten().tolist()) == sorted(ref)


@pytest.mark.parametrize("backend", BACKENDS)
def test_greedy_large_replay(device, backend):
    """Stage-sized blocks: every pick must be a valid greedy step (robust to float32 near-ties)."""
    if backend != "torch" and device.type != "cuda":
        pytest.skip("GPU backend")
    g = torch.Generator().manual_seed(7)
    G, n, D = 3, 160, 48  # rank 48 < budget: exercises numerical exhaustion too
    X = torch.nn.functional.normalize(torch.randn(G, n, D, generator=g), dim=-1)
    r = torch.rand(G, n, generator=g) + 0.1
    K = r[:, :, None] * (X @ X.transpose(1, 2)) * r[:, None, :]
    budgets = torch.tensor([112, 40, 160])
    valid = torch.ones(G, n, dtype=torch.bool)
    order = greedy_map_dpp_order(K.to(device), valid.to(device), budgets.to(device), r.to(device), backend=backend)
    for b in range(G):
        got = [j for j in order[b].tolist() if j >= 0]
        assert len(got) == int(budgets[b]) and len(set(got)) == len(got)
        replay_is_greedy(K[b], got, r[b].tolist(), DPP_EPS, tol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available() or not triton_available(), reason="needs CUDA and Triton")
@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize(
    ("G", "n", "D", "frac"), [(8, 392, 256, 0.7), (3, 1000, 128, 0.5), (20, 50, 64, 1.0), (4, 30, 512, 0.5)]
)
@pytest.mark.parametrize("programs", [None, 1, 3, 32])
def test_triton_vs_torch(seed, G, n, D, frac, programs):
    """Fused kernel (one program per block, or a block split over several programs that exchange their candidates
    at every step; ``None``: as many as the SMs allow) against the eager loop. The fused kernel sums in another
    order, so near-ties may break differently at these sizes: small problems must match exactly, large ones must
    be valid greedy runs (float64 replay). Budgets of 1.0 exhaust blocks, so the fallback is exchanged too."""
    from hieravid.ops._triton_dpp import greedy_dpp_triton

    g = torch.Generator().manual_seed(seed)
    X = torch.nn.functional.normalize(torch.randn(G, n, D, generator=g), dim=-1).cuda()
    r = (torch.rand(G, n, generator=g) + 0.05).cuda()
    K = r[:, :, None] * (X @ X.transpose(1, 2)) * r[:, None, :]
    valid = torch.rand(G, n, generator=g).cuda() > 0.05
    budgets = (valid.sum(1) * frac).long()
    a = greedy_map_dpp_order(K, valid, budgets, r, backend="torch")
    steps = int(budgets.max())
    b = greedy_dpp_triton(K.contiguous(), valid, budgets, r.contiguous(), steps, DPP_EPS, programs=programs)
    if n <= 64:
        assert torch.equal(a, b)
    for blk in range(G):
        idx = valid[blk].nonzero().flatten()
        local = {int(v): i for i, v in enumerate(idx.tolist())}
        got = [local[j] for j in b[blk].tolist() if j >= 0]
        assert len(got) == int(budgets[blk])
        sub = K[blk][idx][:, idx].cpu()
        replay_is_greedy(sub, got, r[blk][idx].cpu().tolist(), DPP_EPS, tol=1e-5)


@pytest.mark.skipif(torch.cuda.device_count() < 2 or not triton_available(), reason="needs two CUDA devices and Triton")
def test_triton_on_a_second_gpu_equals_the_first():
    """A stage of a model split over GPUs runs on a GPU that is not the current one: the kernel must run there,
    ordered with that GPU's stream (a launch on the current device raced with it: index out of bounds)."""
    g = torch.Generator().manual_seed(0)
    X = torch.nn.functional.normalize(torch.randn(8, 392, 256, generator=g), dim=-1)
    r = torch.rand(8, 392, generator=g) + 0.05
    valid = torch.rand(8, 392, generator=g) > 0.05
    budgets = (valid.sum(1) * 0.5).long()
    orders = []
    for device in ("cuda:0", "cuda:1"):
        with torch.cuda.device(0):
            Xd, rd = X.to(device), r.to(device)
            K = rd[:, :, None] * (Xd @ Xd.transpose(1, 2)) * rd[:, None, :]
            orders.append(greedy_map_dpp_order(K, valid.to(device), budgets.to(device), rd, backend="triton").cpu())
    assert torch.equal(orders[0], orders[1])


@pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1" or not triton_available(), reason="Triton interpreter not enabled"
)
def test_triton_interpreter_equals_torch():
    g = torch.Generator().manual_seed(3)
    G, n, D = 3, 37, 24
    X = torch.nn.functional.normalize(torch.randn(G, n, D, generator=g), dim=-1)
    r = torch.rand(G, n, generator=g) + 0.1
    K = r[:, :, None] * (X @ X.transpose(1, 2)) * r[:, None, :]
    valid = torch.rand(G, n, generator=g) > 0.2
    budgets = torch.tensor([10, 30, 0])
    a = greedy_map_dpp_order(K, valid, budgets, r, backend="torch")
    b = greedy_map_dpp_order(K, valid, budgets, r, backend="triton")
    assert torch.equal(a, b)
    feats, rel, seg, budgets = random_stage(90, 48, 4, 1, "cpu")
    for max_block in (None, 13):
        x = dpp_select(feats, rel, seg, budgets, max_block=max_block, backend="torch")
        y = dpp_select(feats, rel, seg, budgets, max_block=max_block, backend="triton")
        assert torch.equal(x, y)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("max_block", [None, 16, 7])
def test_dpp_select_matches_reference(device, backend, seed, max_block):
    if backend != "torch" and device.type != "cuda":
        pytest.skip("GPU backend")
    feats, rel, seg, budgets = random_stage(70, 96, 5, seed, device)
    out = dpp_select(feats, rel, seg, budgets, max_block=max_block, backend=backend)
    ref = ref_dpp_select(feats.cpu(), rel.cpu(), seg.cpu(), budgets.cpu(), max_block=max_block)
    assert out.cpu().tolist() == ref
    assert out.dtype == torch.int64


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_dpp_select_low_precision(device, dtype):
    feats, rel, seg, budgets = random_stage(60, 128, 4, 11, device, dtype=dtype)
    out = dpp_select(feats, rel, seg, budgets)
    ref = ref_dpp_select(feats.cpu().float(), rel.cpu(), seg.cpu(), budgets.cpu())
    assert out.cpu().tolist() == ref


def test_dpp_select_unsorted_segments(device):
    feats, rel, seg, budgets = random_stage(50, 64, 3, 2, device)
    perm = torch.randperm(50, generator=torch.Generator().manual_seed(0)).to(device)
    out = dpp_select(feats[perm], rel[perm], seg[perm], budgets)
    ref = ref_dpp_select(feats[perm].cpu(), rel[perm].cpu(), seg[perm].cpu(), budgets.cpu())
    assert out.cpu().tolist() == ref


def test_dpp_select_edge_budgets(device):
    feats, rel, seg, _ = random_stage(40, 64, 4, 5, device)
    counts = torch.bincount(seg, minlength=6)  # segments 4 and 5 are empty
    # k = 0 everywhere
    assert dpp_select(feats, rel, seg, torch.zeros(6, dtype=torch.long, device=device)).numel() == 0
    # k = n everywhere (and budgets above the segment size are clamped)
    assert dpp_select(feats, rel, seg, counts).tolist() == list(range(40))
    assert dpp_select(feats, rel, seg, counts + 5).tolist() == list(range(40))
    # negative budgets count as 0
    out = dpp_select(feats, rel, seg, torch.tensor([-3, 2, 0, 1, 4, 4], device=device))
    assert out.numel() == 3
    # no tokens at all
    empty = torch.zeros(0, 8, device=device)
    assert (
        dpp_select(
            empty,
            torch.zeros(0, device=device),
            torch.zeros(0, dtype=torch.long, device=device),
            torch.tensor([3], device=device),
        ).numel()
        == 0
    )


def test_dpp_identical_tokens_fall_back_to_relevance(device):
    n = 12
    feats = torch.randn(1, 16).expand(n, 16).contiguous().to(device)
    rel = torch.tensor([0.5, 0.9, 0.1, 0.9, 0.3, 0.2, 0.8, 0.7, 0.6, 0.4, 0.9, 0.0], device=device)
    seg = torch.zeros(n, dtype=torch.long, device=device)
    out = dpp_select(feats, rel, seg, torch.tensor([5], device=device))
    # first pick: largest d² = r², lowest index among ties (1); then exhausted -> by relevance: 3, 10, 6, 7
    assert out.tolist() == [1, 3, 6, 7, 10]


def test_dpp_zero_vectors_and_nan_inputs(device):
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(30, 32, generator=g)
    feats[3] = 0.0
    feats[7] = float("nan")
    feats[9, 4] = float("inf")
    rel = torch.rand(30, generator=g)
    rel[11] = float("nan")
    seg = torch.arange(30) // 10
    budgets = torch.tensor([10, 10, 10])
    out = dpp_select(feats.to(device), rel.to(device), seg.to(device), budgets.to(device))
    assert out.tolist() == list(range(30))  # k = n: every token, no NaN trouble
    out = dpp_select(feats.to(device), rel.to(device), seg.to(device), (budgets - 3).to(device))
    ref = ref_dpp_select(feats, rel, seg, budgets - 3)
    assert out.cpu().tolist() == ref
    assert out.unique().numel() == out.numel() == 21


def test_dpp_all_zero_features_is_relevance_topk(device):
    feats = torch.zeros(8, 4, device=device)
    rel = torch.tensor([0.1, 0.5, 0.5, 0.2, 0.9, 0.3, 0.3, 0.0], device=device)
    out = dpp_select(feats, rel, torch.zeros(8, dtype=torch.long, device=device), torch.tensor([4], device=device))
    assert out.tolist() == [1, 2, 4, 5]


def test_dpp_diversity_beats_duplicates(device):
    # two clusters of near-duplicates plus one distinct token: DPP picks one per direction first
    base = torch.eye(3, 8)
    feats = torch.cat([base[0].expand(4, 8), base[1].expand(4, 8), base[2:3]]) + 1e-3 * torch.randn(9, 8)
    rel = torch.ones(9)
    out = dpp_select(
        feats.to(device),
        rel.to(device),
        torch.zeros(9, dtype=torch.long, device=device),
        torch.tensor([3], device=device),
    )
    picked = out.cpu().tolist()
    assert len({0 if i < 4 else 1 if i < 8 else 2 for i in picked}) == 3


def test_dpp_block_split_budget(device):
    feats, rel, _, _ = random_stage(100, 32, 1, 4, device)
    seg = torch.zeros(100, dtype=torch.long, device=device)
    out = dpp_select(feats, rel, seg, torch.tensor([31], device=device), max_block=40)
    # blocks [0,33), [33,66), [66,100); budgets 10, 10, 11
    assert out.numel() == 31
    assert [(out < 33).sum().item(), ((out >= 33) & (out < 66)).sum().item(), (out >= 66).sum().item()] == [10, 10, 11]


def test_dpp_deterministic(device):
    feats, rel, seg, budgets = random_stage(200, 64, 6, 9, device)
    a = dpp_select(feats, rel, seg, budgets)
    b = dpp_select(feats, rel, seg, budgets)
    assert torch.equal(a, b)


def test_dpp_validation():
    with pytest.raises(ValueError, match="kernel"):
        greedy_map_dpp(torch.zeros(2, 3, 4), torch.ones(2, 3, dtype=torch.bool), torch.ones(2), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="backend"):
        greedy_map_dpp(
            torch.zeros(1, 2, 2), torch.ones(1, 2, dtype=torch.bool), torch.ones(1), torch.zeros(1, 2), backend="cuda"
        )  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_block"):
        dpp_select(torch.zeros(3, 2), torch.zeros(3), torch.zeros(3, dtype=torch.long), torch.ones(1), max_block=0)


def test_dpp_select_with_host_counts(device):
    feats, rel, seg, budgets = random_stage(80, 32, 5, 6, device)
    counts = torch.bincount(seg.cpu(), minlength=5)
    a = dpp_select(feats, rel, seg, budgets)
    b = dpp_select(feats, rel, seg, budgets.cpu(), counts=counts)
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="counts"):
        dpp_select(feats, rel, seg, budgets.cpu(), counts=counts[:3])


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("max_block", [None, 1, 7, 64])
def test_block_plan_follows_its_definition(seed, max_block):
    """The host-side block plan, field by field, against the definition in ``dpp_select``'s docstring: segment g of
    n_g tokens splits into ceil(n_g / cap) blocks, block b holding [⌊b·n_g/nb⌋, ⌊(b+1)·n_g/nb⌋) and keeping
    ⌊k_g·end/n_g⌋ - ⌊k_g·start/n_g⌋ tokens; empty segments have no block; the cap is clamped to [1, Σ n_g]."""
    from hieravid.ops.dpp import plan_dpp_blocks

    g = torch.Generator().manual_seed(seed)
    counts = torch.randint(0, 150, (int(torch.randint(1, 12, (1,), generator=g)),), generator=g)
    counts[0] = 0  # an empty segment
    budgets = (counts.double() * torch.rand(counts.shape, generator=g, dtype=torch.float64)).long()
    plan = plan_dpp_blocks(counts, budgets, max_block)
    total = int(counts.sum())
    cap = max(total, 1) if max_block is None else max(1, min(max_block, max(total, 1)))
    starts, offsets, per_segment, widths, block_budgets = [], [], [], [], []
    for n_g, k_g in zip(counts.tolist(), budgets.tolist()):
        blocks = math.ceil(n_g / cap)
        starts.append(sum(counts.tolist()[: len(starts)]))
        offsets.append(sum(per_segment))
        per_segment.append(blocks)
        bounds = [(b * n_g // blocks, (b + 1) * n_g // blocks) for b in range(blocks)]
        widths += [end - start for start, end in bounds]
        block_budgets += [k_g * end // n_g - k_g * start // n_g for start, end in bounds]
        assert sum(block_budgets[len(block_budgets) - blocks :]) == (k_g if blocks else 0)
    expected = starts + offsets + per_segment + counts.clamp_min(1).tolist() + block_budgets
    assert plan.small.dtype == torch.int64 and plan.small.tolist() == expected
    assert (plan.total, plan.blocks, plan.split) == (int(budgets.sum()), sum(per_segment), max(per_segment) > 1)
    assert plan.block_size == max(widths, default=0) and plan.steps == max(block_budgets, default=0)
