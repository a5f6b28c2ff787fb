"""Where a pruned prefill's GPU time goes, and whether a replayed prefill computes what the eager one does.

For a full-size random-weight model and a policy: the kernels of one eager pruned prefill grouped by the runtime's
profiler ranges (``hieravid/segment_level``, ``hieravid/stage_k``, the rest); the kernels of one prefill replayed
from its CUDA graph; the largest difference between their logits; and whether the model's own decoder stack gives
bit-identical outputs eagerly and inside a CUDA graph (which tells kernel choices under capture from an error of
the replay machinery).

    python benchmarks/prefill_profile.py --model llava-onevision-7b --policy hieravid-30 --out prefill-profile.json
"""

from __future__ import annotations

import argparse
import collections
import json
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

from hieravid.apps import bench
from hieravid.plan import compile_plan
from hieravid.runtime import apply

ROOT = Path(__file__).resolve().parents[1]


def _range_of(event: Any) -> str:
    """The outermost ``hieravid/`` range an operator ran in (``layers`` otherwise)."""
    found = "layers"
    node = event
    while node is not None:
        if node.name.startswith("hieravid/"):
            found = node.name
        node = node.cpu_parent
    return found


def kernel_table(run: Any, top: int = 12) -> dict[str, Any]:
    run()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as profiler:
        run()
        torch.cuda.synchronize()
    per_range: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    calls: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for event in profiler.events():
        for kernel in getattr(event, "kernels", []):
            where = _range_of(event)
            per_range[where][kernel.name[:80]] += kernel.duration / 1000.0
            calls[where][kernel.name[:80]] += 1
    out = {}
    for where, kernels in per_range.items():
        out[where] = {
            "gpu_ms": round(sum(kernels.values()), 3),
            "launches": sum(calls[where].values()),
            "top": [[name, round(ms, 3), calls[where][name]] for name, ms in kernels.most_common(top)],
        }
    return out


def stack_graph_identity(case: bench.SyntheticCase, lengths: list[int]) -> dict[str, Any]:
    """The decoder stack on sliced rows, eagerly and replayed from a CUDA graph: bit-identical or not."""
    stack = bench.floor_stack(case, lengths)
    with torch.inference_mode():
        eager = stack().clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            on_side = stack().clone()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static = stack()
        graph.replay()
        torch.cuda.synchronize()
    return {
        "side_stream_bit_identical": bool(torch.equal(eager, on_side)),
        "graph_bit_identical": bool(torch.equal(eager, static)),
        "graph_max_abs_diff": float((eager.float() - static.float()).abs().max()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llava-onevision-7b")
    parser.add_argument("--policy", default="hieravid-30")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    case = bench.build_case(args.model)
    plan = compile_plan(ROOT / "policies" / f"{args.policy}.yaml", case.spec())
    report: dict[str, Any] = {"environment": bench.environment_info("cuda"), "model": args.model, "policy": args.policy}

    def forward() -> Any:
        return case.model(**case.inputs, use_cache=True, logits_to_keep=1)

    with bench.sdpa_backends(cudnn=False), torch.inference_mode():
        with apply(case.model, plan) as handle:
            eager = forward()
            lengths = list(handle.last_request.layer_sequence_lengths)
            report["eager"] = kernel_table(forward)
        with apply(case.model, plan, cuda_graphs=True) as handle:
            for _ in range(3):
                replayed = forward()
            report["replayed"] = kernel_table(forward)
            report["captures_replays"] = [handle._prefill_graphs.captures, handle._prefill_graphs.replays]
        report["logits_max_abs_diff"] = float((eager.logits.float() - replayed.logits.float()).abs().max())
        report["logits_bit_identical"] = bool(torch.equal(eager.logits, replayed.logits))
    report["stack"] = stack_graph_identity(case, lengths)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(json.dumps({k: v for k, v in report.items() if k not in ("eager", "replayed")}, indent=1))
    for name in ("eager", "replayed"):
        for where, table in sorted(report[name].items()):
            print(name, where, table["gpu_ms"], "ms", table["launches"], "launches")
            for row in table["top"][:8]:
                print("     ", row)


if __name__ == "__main__":
    main()
