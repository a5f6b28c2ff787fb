"""Decode ms/token, eager and compiled (static cache + torch.compile, transformers' own path), unpruned vs pruned,
in one run on one model: what HieraVid's per-layer caches cost or save once generation is compiled, and a check
that a second request of the same shape runs without recompiling. Each row also gives the slots of every layer's
static cache after the prompt (a pruned prefill right-sizes them) and the compiled ms/token relative to the first
policy's (issue 15's targets: pruned <= unpruned at 2k context, <= 0.85x at the 6.4k-token LLaVA-OV prompt).

    python benchmarks/decode_compiled.py --model llava-onevision-7b --tokens 64 --out decode-compiled.json
    python benchmarks/decode_compiled.py --model llava-onevision-7b --frames 10 --out decode-compiled-2k.json

A policy written ``hieravid-30@buckets=16@headroom=0`` runs with other static-cache capacity settings than the
defaults (``CAPACITY_BUCKETS`` and ``CAPACITY_HEADROOM_BUCKETS`` of ``hieravid.runtime.masks``), and
``hieravid-30@capacity=bound`` with ``apply(..., static_capacity="bound")``, to measure what they cost in the same run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from hieravid.apps import bench
from hieravid.compat import cache_from_output
from hieravid.plan import compile_plan
from hieravid.runtime import apply, masks

ROOT = Path(__file__).resolve().parents[1]


def per_token_ms(case: bench.SyntheticCase, tokens: int, runs: int, compiled: bool) -> float:
    """(time of generate(1 + tokens) − time of generate(1)) / tokens, medians, static cache."""
    timer = bench._Timer("cuda")
    options: dict[str, Any] = {"cache_implementation": "static", "do_sample": False}
    if not compiled:
        options["disable_compile"] = True

    def generate(count: int) -> Any:
        return case.model.generate(**case.inputs, max_new_tokens=count, min_new_tokens=count, **options)

    short = statistics.median(timer.time(lambda: generate(1)) for _ in range(runs))
    long = statistics.median(timer.time(lambda: generate(1 + tokens)) for _ in range(runs))
    return (long - short) / tokens


def static_cache_slots(case: bench.SyntheticCase) -> list[int]:
    """Slots of each layer's static cache once an eager ``generate`` of 2 tokens has prefilled the prompt."""
    output = case.model.generate(
        **case.inputs,
        max_new_tokens=2,
        do_sample=False,
        cache_implementation="static",
        disable_compile=True,
        return_dict_in_generate=True,
    )
    return [int(layer.keys.shape[-2]) for layer in cache_from_output(output).layers]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llava-onevision-7b")
    parser.add_argument("--policies", nargs="+", default=["unpruned", "hieravid-30"])
    parser.add_argument("--frames", type=int, default=None, help="frames of the prompt (default: the model's)")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    case = bench.build_case(args.model, frames=args.frames)
    report: dict[str, Any] = {
        "environment": bench.environment_info("cuda"),
        "model": args.model,
        "prompt_tokens": int(case.inputs["input_ids"].shape[1]),
        "tokens": args.tokens,
        "results": [],
    }
    with bench.sdpa_backends(cudnn=False), torch.inference_mode():
        for policy in args.policies:
            name, *settings = policy.split("@")
            defaults = {"buckets": masks.CAPACITY_BUCKETS, "headroom": masks.CAPACITY_HEADROOM_BUCKETS}
            options = dict(item.split("=") for item in settings)
            capacity = options.pop("capacity", "observed")
            chosen = defaults | {key: int(value) for key, value in options.items()}
            masks.CAPACITY_BUCKETS, masks.CAPACITY_HEADROOM_BUCKETS = chosen["buckets"], chosen["headroom"]
            handle = None
            if name != "unpruned":
                plan = compile_plan(ROOT / "policies" / f"{name}.yaml", case.spec())
                handle = apply(case.model, plan, static_capacity=capacity)
            try:
                row: dict[str, Any] = {"policy": policy}
                row["static_cache_slots_per_layer"] = static_cache_slots(case)
                row["eager_ms_per_token"] = per_token_ms(case, args.tokens, args.runs, compiled=False)
                torch._dynamo.reset()
                started = time.time()
                case.model.generate(**case.inputs, max_new_tokens=8, do_sample=False, cache_implementation="static")
                row["compile_warmup_s"] = round(time.time() - started, 1)
                torch._dynamo.config.error_on_recompile = True
                try:
                    row["compiled_ms_per_token"] = per_token_ms(case, args.tokens, args.runs, compiled=True)
                    row["recompiled_after_warmup"] = False
                except Exception as error:  # a recompile raised: report it
                    row["recompiled_after_warmup"] = f"{type(error).__name__}: {str(error)[:300]}"
                finally:
                    torch._dynamo.config.error_on_recompile = False
            finally:
                masks.CAPACITY_BUCKETS, masks.CAPACITY_HEADROOM_BUCKETS = defaults["buckets"], defaults["headroom"]
                if handle is not None:
                    handle.remove()
            first = report["results"][0] if report["results"] else row
            if "compiled_ms_per_token" in first and "compiled_ms_per_token" in row:
                ratio = row["compiled_ms_per_token"] / first["compiled_ms_per_token"]
                row["compiled_vs_first_policy"] = round(ratio, 3)
            report["results"].append(row)
            print(json.dumps(row), flush=True)
            Path(args.out).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
