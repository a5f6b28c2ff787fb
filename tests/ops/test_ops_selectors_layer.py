"""Selector registry, baseline selectors and layer-level helpers."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass, field
from typing import Literal

import pytest
import torch
from ops_reference import ref_binned, ref_dpp_select, ref_topk, ref_uniform

from hieravid.ops import (
    SELECTORS,
    UnregisteredOperatorError,
    compose_keep,
    frame_level,
    register_selector,
    segment_budgets,
    select_tokens,
    stage_keep_fractions,
)
from hieravid.policy import (
    BinnedRelevanceSelector,
    DppSelector,
    DynamicBudget,
    RandomSelector,
    SelectorConfig,
    TopkRelevanceSelector,
    UniformSelector,
)

TOPK, BINNED, UNIFORM = TopkRelevanceSelector(), BinnedRelevanceSelector(), UniformSelector()
DPP, RANDOM = DppSelector(max_block=None), RandomSelector()


@dataclass(frozen=True)
class Stage:
    """What frame_level reads of a stage (hieravid.plan.StagePlan provides the same)."""

    prune_ratio: float
    selector: SelectorConfig = field(default_factory=DppSelector)
    relevance_sign: str = "negative"
    budget: DynamicBudget | None = field(default_factory=DynamicBudget)


def stage(n: int, G: int, seed: int, device, ties: bool = False):
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(n, 16, generator=g)
    rel = torch.randint(0, 4, (n,), generator=g).float() if ties else torch.rand(n, generator=g)
    seg = torch.randint(0, G, (n,), generator=g)  # unsorted on purpose
    counts = torch.bincount(seg, minlength=G)
    budgets = torch.randint(0, 12, (G,), generator=g)
    budgets[0] = counts[0]  # k = n
    budgets[1] = 0  # k = 0
    budgets[2] = counts[2] + 3  # larger than the segment
    return feats.to(device), rel.to(device), seg.to(device), budgets.to(device), counts


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("ties", [False, True])
def test_relevance_selectors_match_reference(device, seed, ties):
    feats, rel, seg, budgets, counts = stage(57, 6, seed, device, ties)
    clamped = torch.minimum(budgets.cpu(), counts).tolist()
    scores, ids = rel.cpu().tolist(), seg.cpu().tolist()
    assert select_tokens(TOPK, feats, rel, seg, budgets).cpu().tolist() == ref_topk(scores, ids, clamped)
    assert select_tokens(BINNED, feats, rel, seg, budgets).cpu().tolist() == ref_binned(scores, ids, clamped)
    assert select_tokens(UNIFORM, feats, rel, seg, budgets).cpu().tolist() == ref_uniform(ids, clamped)
    assert select_tokens(DPP, feats, rel, seg, budgets).cpu().tolist() == ref_dpp_select(
        feats.cpu(), rel.cpu(), seg.cpu(), budgets.cpu()
    )


@pytest.mark.parametrize("n", [1, 2, 5, 17, 64])
@pytest.mark.parametrize("k", [0, 1, 2, 3, 5, 17, 64])
def test_uniform_and_binned_exhaustive_small(n, k):
    feats = torch.zeros(n, 2)
    rel = torch.arange(n, dtype=torch.float32).flip(0)  # lowest index is best
    seg = torch.zeros(n, dtype=torch.long)
    b = torch.tensor([k])
    kk = min(k, n)
    uni = select_tokens(UNIFORM, feats, rel, seg, b).tolist()
    assert uni == ref_uniform([0] * n, [kk])
    assert len(set(uni)) == kk
    binned = select_tokens(BINNED, feats, rel, seg, b).tolist()
    assert binned == [i * n // kk for i in range(kk)]  # first token of each bin


def test_random_selector_seeded(device):
    feats, rel, seg, budgets, counts = stage(80, 5, 1, device)
    sel = lambda s: select_tokens(RandomSelector(seed=s), feats, rel, seg, budgets)  # noqa: E731
    a, b, c = sel(0), sel(0), sel(1)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    per_seg = torch.bincount(seg[a].cpu(), minlength=5)
    assert per_seg.tolist() == torch.minimum(budgets.cpu(), counts).tolist()
    assert torch.all(a[1:] > a[:-1])


def test_selectors_common_contract(device):
    feats, rel, seg, budgets, counts = stage(90, 7, 3, device)
    expected = torch.minimum(budgets.cpu(), counts)
    for name in (DPP, TOPK, BINNED, UNIFORM, RANDOM):
        out = select_tokens(name, feats, rel, seg, budgets)
        assert out.dtype == torch.int64 and out.device.type == device.type
        assert torch.all(out[1:] > out[:-1]), name
        assert torch.bincount(seg[out].cpu(), minlength=7).tolist() == expected.tolist(), name
        empty = select_tokens(name, feats[:0], rel[:0], seg[:0], budgets)
        assert empty.numel() == 0


def test_a_config_without_operator_is_a_clear_error():
    class Unbound(SelectorConfig):
        kind: Literal["unbound_test"] = "unbound_test"

    with pytest.raises(UnregisteredOperatorError) as info:
        select_tokens(Unbound(), torch.zeros(1, 1), torch.zeros(1), torch.zeros(1, dtype=torch.long), torch.ones(1))
    message = str(info.value)
    assert "Unbound" in message and "unbound_test" in message and "@register_selector(Unbound)" in message


def test_register_selector_binds_a_config_class():
    class FirstK(SelectorConfig):
        kind: Literal["first_k_test"] = "first_k_test"
        offset: int = 0

    @register_selector(FirstK)
    def first_k(features, relevance, segment_ids, budgets, config, *, counts=None):
        return torch.arange(int(budgets.sum())) + config.offset

    assert SELECTORS.lookup(FirstK()) is first_k
    out = select_tokens(
        FirstK(offset=1), torch.zeros(5, 1), torch.zeros(5), torch.zeros(5, dtype=torch.long), torch.tensor([2])
    )
    assert out.tolist() == [1, 2]
    with pytest.raises(TypeError, match="SelectorConfig"):
        register_selector(int)


def test_compose_keep(device):
    previous = torch.tensor([2, 5, 6, 9, 14, 20], device=device)
    assert compose_keep(previous, torch.tensor([0, 3, 5], device=device)).tolist() == [2, 9, 20]
    assert compose_keep(previous, torch.tensor([4, 1], device=device)).tolist() == [5, 14]
    assert compose_keep(previous, torch.zeros(0, dtype=torch.long, device=device)).numel() == 0
    # chaining three stages keeps original positions
    keep = torch.arange(100, device=device)
    for local in (torch.arange(0, 100, 2), torch.arange(0, 50, 5), torch.tensor([1, 3])):
        keep = compose_keep(keep, local.to(device))
    assert keep.tolist() == [10, 30]


def test_stage_keep_fractions():
    assert stage_keep_fractions([0.5, 0.3, 0.3, 0.57]) == pytest.approx([0.5, 0.35, 0.245, 0.10535])
    assert stage_keep_fractions([0.5, 0.5, 0.7, 0.8]) == pytest.approx([0.5, 0.25, 0.075, 0.015])


@pytest.mark.parametrize("selector", [DPP, TOPK, UNIFORM], ids=["dpp", "topk", "uniform"])
def test_frame_level_composite(device, selector):
    g = torch.Generator().manual_seed(4)
    n, G = 120, 6
    hidden = torch.randn(n, 32, generator=g).to(device)
    attn = torch.rand(n, generator=g).to(device)
    seg = torch.sort(torch.randint(0, G, (n,), generator=g)).values
    seg[seg == 3] = 2  # segment 3 emptied by an earlier stage
    seg = seg.to(device)
    mv = torch.randn(G, generator=g).to(device)
    res = frame_level(hidden, attn, seg, mv, Stage(0.3, selector))
    counts = torch.bincount(seg.cpu(), minlength=G)
    assert res.budgets.cpu().tolist() == segment_budgets(counts, mv.cpu(), 0.3).tolist()
    assert res.budgets[3] == 0
    assert torch.equal(res.segment_ids_kept, seg[res.local_keep])
    assert torch.bincount(res.segment_ids_kept.cpu(), minlength=G).tolist() == res.budgets.cpu().tolist()
    if selector == TOPK:  # default sign: least attended first
        scores = (-attn).cpu().tolist()
        assert res.local_keep.cpu().tolist() == ref_topk(scores, seg.cpu().tolist(), res.budgets.cpu().tolist())
    pos = frame_level(hidden, attn, seg, mv, Stage(0.3, TOPK, "positive", None))
    assert pos.local_keep.cpu().tolist() == ref_topk(
        attn.cpu().tolist(), seg.cpu().tolist(), segment_budgets(counts, mv.cpu(), 0.3, dynamic=False).tolist()
    )


def test_frame_level_max_block(device):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(64, 8, generator=g).to(device)
    attn = torch.rand(64, generator=g).to(device)
    seg = torch.zeros(64, dtype=torch.long, device=device)
    mv = torch.zeros(1, device=device)
    a = frame_level(hidden, attn, seg, mv, Stage(0.5, DppSelector(max_block=16)))
    assert a.local_keep.numel() == 32
    # four blocks of 16, 8 kept in each
    assert torch.bincount(a.local_keep.cpu() // 16, minlength=4).tolist() == [8, 8, 8, 8]
    with pytest.raises(ValueError):
        frame_level(hidden, attn[:5], seg, mv, Stage(0.5))


def test_import_is_light():
    code = (
        "import sys, torch, hieravid.ops\n"
        "assert 'transformers' not in sys.modules, 'transformers imported'\n"
        "assert 'triton' not in sys.modules, 'triton imported'\n"
        "assert not torch.cuda.is_initialized(), 'CUDA initialised'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_frame_level_outputs_share_the_device(device):
    hidden = torch.randn(20, 4, device=device)
    res = frame_level(
        hidden,
        torch.rand(20, device=device),
        torch.arange(20, device=device) // 5,
        torch.zeros(4, device=device),
        Stage(0.5),
    )
    for t in (res.local_keep, res.segment_ids_kept, res.budgets):
        assert t.device == hidden.device
