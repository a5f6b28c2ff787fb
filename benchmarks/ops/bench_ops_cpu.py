"""CPU microbenchmarks of the operators (small sizes; pytest-benchmark).

Run: ``.venv/bin/python -m pytest benchmarks/ops/bench_ops_cpu.py --benchmark-enable``
(the project's pytest options disable benchmarks by default, so plain test runs stay fast).
"""

from __future__ import annotations

import pytest
import torch

from hieravid.ops import (
    dpp_select,
    frame_level,
    greedy_map_dpp_order,
    last_query_attention,
    segment_level,
    select_tokens,
)
from hieravid.plan import compile_plan
from hieravid.policy import SELECTOR_KINDS

F, P, D = 16, 49, 256  # a small video: 16 frames of 7x7 tokens


@pytest.fixture(scope="module")
def frames() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    base = torch.randn(4, P, D, generator=g)
    return base[torch.arange(F) // 4] + 0.5 * torch.randn(F, P, D, generator=g)


@pytest.fixture(scope="module")
def stage(frames):
    seg = segment_level(frames)
    g = torch.Generator().manual_seed(1)
    n = seg.kept_index.numel()
    return seg.features, torch.rand(n, generator=g), seg.token_segment_ids, seg.marginal_values


def test_segment_level(benchmark, frames):
    out = benchmark(segment_level, frames)
    assert out.kept_index.numel() == F * P - F * P // 2


def test_last_query_attention(benchmark):
    q = torch.randn(1, 28, 1, 128)
    k = torch.randn(1, 4, 1024, 128)
    out = benchmark(last_query_attention, q, k, scaling=128**-0.5)
    assert out.shape == (1, 1024)


def test_frame_level_dpp(benchmark, stage):
    hidden, attn, seg_ids, mv = stage
    stage = compile_plan("policies/hieravid-30.yaml", "llava-onevision-7b").stages[0]
    res = benchmark(frame_level, hidden, attn, seg_ids, mv, stage)
    assert res.local_keep.numel() > 0


@pytest.mark.parametrize("name", ["topk_relevance", "binned_relevance", "uniform", "random"])
def test_selectors(benchmark, stage, name):
    hidden, attn, seg_ids, _ = stage
    budgets = (torch.bincount(seg_ids) * 0.5).long()
    out = benchmark(select_tokens, SELECTOR_KINDS.get(name)(), hidden, attn, seg_ids, budgets)
    assert out.numel() == int(budgets.sum())


def test_dpp_select_one_big_segment(benchmark):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(600, 128, generator=g)
    r = torch.rand(600, generator=g)
    seg = torch.zeros(600, dtype=torch.long)
    out = benchmark(dpp_select, x, r, seg, torch.tensor([300]), max_block=200)
    assert out.numel() == 300


def test_greedy_core(benchmark):
    g = torch.Generator().manual_seed(3)
    X = torch.nn.functional.normalize(torch.randn(8, 98, 128, generator=g), dim=-1)
    r = torch.rand(8, 98, generator=g) + 0.1
    K = r[:, :, None] * (X @ X.transpose(1, 2)) * r[:, None, :]
    valid = torch.ones(8, 98, dtype=torch.bool)
    budgets = torch.full((8,), 68)
    out = benchmark(greedy_map_dpp_order, K, valid, budgets, r, max_steps=68, backend="torch")
    assert out.shape == (8, 68)


def test_schedule_stages_host(benchmark):
    """Host time of every stage's budgets and DPP block plan before a 32-frame LLaVA-OV-7B prefill under hieravid-30
    (8 segments, 3 stages): on a GPU it runs after the segment level's one device read, with the GPU idle."""
    from hieravid.runtime.prefill import schedule_stages
    from hieravid.runtime.state import Request, SampleCounts

    plan = compile_plan("policies/hieravid-30.yaml", "llava-onevision-7b")
    counts = torch.tensor([392, 380, 401, 395, 390, 388, 396, 394])
    marginal = torch.linspace(-1.5, 1.5, 8, dtype=torch.float64)

    def schedule() -> Request:
        request = Request(batch=1, schedule=[SampleCounts(counts, marginal, newlines=0, text=0)])
        schedule_stages(request, plan, torch.device("cpu"))
        return request

    request = benchmark(schedule)
    assert len(request.budgets) == 3 and all(row[0].prepared["dpp"].blocks == 8 for row in request.budgets)
