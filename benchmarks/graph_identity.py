"""Which operators of a pruned stage give other bits inside a CUDA graph than eagerly (diagnostic)."""

from __future__ import annotations

import json
import sys

import torch

from hieravid.ops.dpp import dpp_select
from hieravid.ops.relevance import last_query_attention


def graphed(fn):
    fn()
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    graph.replay()
    torch.cuda.synchronize()
    return out


def main() -> None:
    g = torch.Generator(device="cuda").manual_seed(0)
    report = {}
    n, D, G = 3136, 3584, 8
    feats = torch.randn(n, D, device="cuda", generator=g, dtype=torch.bfloat16)
    rel = torch.rand(n, device="cuda", generator=g)
    seg = torch.arange(n, device="cuda") // (n // G)
    x = feats.float().view(G, n // G, D)
    eager_k = torch.bmm(x, x.transpose(1, 2))
    graph_k = graphed(lambda: torch.bmm(x, x.transpose(1, 2)))
    report["fp32_bmm_identical"] = bool(torch.equal(eager_k, graph_k))
    report["fp32_bmm_max_abs_diff"] = float((eager_k - graph_k).abs().max())
    q = torch.randn(1, 28, 1, 128, device="cuda", generator=g, dtype=torch.bfloat16)
    k = torch.randn(1, 4, 6300, 128, device="cuda", generator=g, dtype=torch.bfloat16)
    a = last_query_attention(q, k, scaling=128**-0.5)
    b = graphed(lambda: last_query_attention(q, k, scaling=128**-0.5))
    report["last_query_attention_identical"] = bool(torch.equal(a, b))
    w = torch.randn(3584, 3584, device="cuda", generator=g, dtype=torch.bfloat16)
    h = torch.randn(1, 2196, 3584, device="cuda", generator=g, dtype=torch.bfloat16)
    report["bf16_linear_identical"] = bool(torch.equal(h @ w, graphed(lambda: h @ w)))
    from hieravid.ops.budget import SegmentBudgets
    from hieravid.ops.dpp import plan_dpp_blocks

    counts = torch.full((G,), n // G, dtype=torch.long)
    host = torch.full((G,), 274, dtype=torch.long)
    budgets = SegmentBudgets(counts, host, host.cuda())
    budgets.prepared["dpp"] = plan = plan_dpp_blocks(counts, host, 512)
    plan.device = plan.small.cuda()
    eager = dpp_select(feats, rel, seg, budgets)
    in_graph = graphed(lambda: dpp_select(feats, rel, seg, budgets))
    report["dpp_selection_identical"] = bool(torch.equal(eager, in_graph))
    print(json.dumps(report, indent=1))
    json.dump(report, open(sys.argv[1], "w"), indent=1)


if __name__ == "__main__":
    main()
