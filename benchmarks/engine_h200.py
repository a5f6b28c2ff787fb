"""The engine on a GPU, every configuration next to its baseline in one run: stock, the exact vision speedups alone,
then each HieraVid policy eagerly and with CUDA graphs (the input level and whole prefills replayed per schedule),
with the FLOPs ideal and the floor (the model's own layers on the realised row counts, one CUDA graph), and a check
that a replayed prefill's logits and KV cache are bit-identical to the eager pruned forward's.

    python benchmarks/engine_h200.py --out benchmarks/results/engine-h200.json
    python benchmarks/engine_h200.py --size tiny --device cpu --models llava-onevision-7b --out /tmp/e.json  # smoke
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import time
from pathlib import Path
from typing import Any

import torch

from hieravid.apps import bench
from hieravid.compat import cache_from_output

ROOT = Path(__file__).resolve().parents[1]
POLICIES = ("hieravid-30", "hieravid-20", "hieravid-10")


def replay_is_exact(case: bench.SyntheticCase, policy: str) -> dict[str, Any]:
    """Logits and KV cache of a replayed prefill (third call: eager, capture, replay) against the eager handle's."""
    from hieravid.plan import compile_plan
    from hieravid.runtime import apply

    plan = compile_plan(ROOT / "policies" / f"{policy}.yaml", case.spec())
    with torch.inference_mode():
        with apply(case.model, plan) as handle:
            eager = case.model(**case.inputs, use_cache=True)
            eager_stats = handle.last_request
        with apply(case.model, plan, cuda_graphs=True) as handle:
            for _ in range(3):
                replayed = case.model(**case.inputs, use_cache=True)
            graphs = handle._prefill_graphs
            counts = (graphs.captures, graphs.replays) if graphs is not None else (0, 0)
            stats = handle.last_request
    caches = cache_from_output(eager), cache_from_output(replayed)
    same_cache = all(
        torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
        for a, b in zip(caches[0].layers, caches[1].layers)
    )
    return {
        "captures_replays": counts,
        "logits_bit_identical": bool(torch.equal(eager.logits, replayed.logits)),
        "kv_cache_bit_identical": bool(same_cache),
        "layer_lengths_equal": stats.layer_sequence_lengths == eager_stats.layer_sequence_lengths,
    }


def run_model(name: str, args: argparse.Namespace, log: Any, frames: int | None = None) -> dict[str, Any]:
    started = time.time()
    case = bench.build_case(name, frames=frames, size=args.size, device=args.device, dtype=args.dtype)
    timer = bench._Timer(args.device)
    lm_inputs = bench.language_model_inputs(case)
    options = dict(runs=args.runs, warmup=args.warmup, decode_tokens=0, device=args.device)
    stock, _ = bench.bench_policy(case, None, speedups="none", **options)
    exact, _ = bench.bench_policy(case, None, speedups="exact", **options)
    rows = [stock, exact]
    checks = {}
    for policy in args.policies:
        path = str(ROOT / "policies" / f"{policy}.yaml")
        for graphs in (False, True):
            try:
                result, plan = bench.bench_policy(case, path, cuda_graphs=graphs, **options)
            except Exception as error:  # a policy infeasible on this geometry: say so and go on
                log(f"  {policy} (graphs={graphs}): {type(error).__name__}: {error}")
                continue
            result.policy = f"{plan.policy.name}{' +graphs' if graphs else ''}"
            result.ideal_llm_prefill_ms = stock.llm_prefill_ms * plan.flops_ratio
            result.prefill_vs_ideal = result.llm_prefill_ms / result.ideal_llm_prefill_ms
            result.floor_llm_prefill_ms = bench.floor_prefill_ms(
                case, result.layer_sequence_lengths, timer, runs=args.runs, lm_inputs=lm_inputs
            )
            result.prefill_vs_floor = result.llm_prefill_ms / result.floor_llm_prefill_ms
            result.ttft_speedup = stock.ttft_ms / result.ttft_ms
            rows.append(result)
            log(
                f"  {result.policy}: prefill {result.llm_prefill_ms:.1f} ms, ideal {result.ideal_llm_prefill_ms:.1f}, "
                f"floor {result.floor_llm_prefill_ms:.1f} (×{result.prefill_vs_floor:.2f}), TTFT "
                f"{result.ttft_ms:.1f} (×{result.ttft_speedup:.2f}), vision {result.vision_ms:.1f}"
            )
        if timer.cuda and not args.no_checks:
            checks[policy] = replay_is_exact(case, policy)
            log(f"  {policy} replay: {checks[policy]}")
    peak = torch.cuda.max_memory_allocated() if timer.cuda else None
    out = {
        "model": name,
        "frames": case.sampled_frames,
        "prompt_tokens": int(case.inputs["input_ids"].shape[1]),
        "spec": case.spec().to_dict(),
        "results": [dataclasses.asdict(row) for row in rows],
        "replay_checks": checks,
        "process_peak_memory_bytes": peak,
        "seconds": round(time.time() - started, 1),
    }
    log(
        f"  stock: prefill {stock.llm_prefill_ms:.1f} ms, TTFT {stock.ttft_ms:.1f}, vision {stock.vision_ms:.1f}; "
        f"+exact: TTFT {exact.ttft_ms:.1f}, vision {exact.vision_ms:.1f}"
    )
    del case
    gc.collect()
    if timer.cuda:
        torch.cuda.empty_cache()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--models", nargs="+", default=list(bench.BENCH_MODELS))
    parser.add_argument("--size", default="full")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--policies", nargs="+", default=list(POLICIES))
    parser.add_argument("--frames", nargs="+", type=int, default=[None], help="frames sampled (default: the model's)")
    parser.add_argument("--no-checks", action="store_true", help="skip the replay bit-identity checks")
    args = parser.parse_args()
    report: dict[str, Any] = {"environment": bench.environment_info(args.device), "models": []}
    report["settings"] = {"runs": args.runs, "warmup": args.warmup, "size": args.size, "cudnn_sdp": False}
    with bench.sdpa_backends(cudnn=False):
        for name in args.models:
            for frames in args.frames:
                print(name, frames or "default frames", flush=True)
                report["models"].append(run_model(name, args, lambda line: print(line, flush=True), frames))
                Path(args.out).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
