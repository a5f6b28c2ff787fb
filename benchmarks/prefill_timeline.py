"""Where a pruned prefill leaves the GPU idle: profile one prefill and list the gaps in its kernel timeline.

Builds a full-size bench case (random weights), applies a policy, warms up, profiles one prefill with
Python stacks, then walks the exported trace: GPU busy time vs. wall span, idle gaps longer than
``--gap-us`` attributed to the ``hieravid/…`` range and the innermost repository Python frame that was
running on the host when the gap ended (the launch that refilled the queue), and the host syncs.

    python benchmarks/prefill_timeline.py --out $OUT/timeline.json [--trace $OUT/trace.json.gz]
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import os
import tempfile
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_GPU_CATEGORIES = {"kernel", "gpu_memcpy", "gpu_memset"}
_SYNC_CALLS = {"cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize"}


def _interval_index(events: list[dict[str, Any]]) -> list[tuple[float, float, dict[str, Any]]]:
    return sorted(((e["ts"], e["ts"] + e.get("dur", 0.0), e) for e in events), key=lambda item: item[0])


def _active(intervals: list[tuple[float, float, dict[str, Any]]], when: float) -> list[dict[str, Any]]:
    """Events whose span holds ``when``, innermost (shortest) last."""
    hits = [event for start, end, event in intervals if start <= when <= end]
    return sorted(hits, key=lambda event: -event.get("dur", 0.0))


def _in_repository(name: str) -> bool:
    return ("hieravid/" in name or "adapters/" in name) and ".py(" in name and "benchmarks/" not in name


def _repo_frame(stack: list[dict[str, Any]]) -> str:
    """The innermost repository frame of a stack of Python events (``<outside>`` if none)."""
    if not stack:
        return "<outside>"
    name = stack[-1]["name"]
    return name.split(ROOT + "/")[-1] if ROOT in name else name


def analyse(trace: dict[str, Any], gap_us: float) -> dict[str, Any]:
    """Summarise GPU busy time, idle gaps and host syncs of one exported prefill trace."""
    events = [e for e in trace["traceEvents"] if e.get("ph") == "X"]
    kernels = sorted((e for e in events if e.get("cat") in _GPU_CATEGORIES), key=lambda e: e["ts"])
    ranges = _interval_index(
        [e for e in events if e.get("cat") == "user_annotation" and e["name"].startswith("hieravid/")]
    )
    python = _interval_index([e for e in events if e.get("cat") == "python_function" and _in_repository(e["name"])])
    runtime = [e for e in events if e.get("cat") == "cuda_runtime"]
    launches = {e["args"].get("correlation"): e for e in runtime if "correlation" in e.get("args", {})}
    if not kernels:
        raise SystemExit("the trace holds no GPU kernels: run this on a CUDA device")
    span = kernels[-1]["ts"] + kernels[-1]["dur"] - kernels[0]["ts"]
    busy = 0.0
    cursor = kernels[0]["ts"]
    gaps = []
    for kernel in kernels:
        start, end = kernel["ts"], kernel["ts"] + kernel["dur"]
        if start - cursor > gap_us:
            launch = launches.get(kernel.get("args", {}).get("correlation"))
            host_time = launch["ts"] if launch else start
            where = [r["name"] for r in _active(ranges, host_time)]
            gaps.append(
                {
                    "gap_us": start - cursor,
                    "at_us": cursor - kernels[0]["ts"],
                    "range": where[-1] if where else "-",
                    "next_kernel": kernel["name"][:80],
                    "host_frame": _repo_frame(_active(python, host_time)),
                }
            )
        busy += max(0.0, end - max(start, cursor))
        cursor = max(cursor, end)
    by_range: dict[str, float] = collections.defaultdict(float)
    by_frame: dict[str, float] = collections.defaultdict(float)
    for gap in gaps:
        by_range[gap["range"]] += gap["gap_us"] / 1000.0
        by_frame[gap["host_frame"]] += gap["gap_us"] / 1000.0
    range_spans = collections.defaultdict(float)
    for start, end, event in ranges:
        range_spans[event["name"]] += (end - start) / 1000.0
    syncs = collections.Counter(_repo_frame(_active(python, e["ts"])) for e in runtime if e["name"] in _SYNC_CALLS)
    return {
        "gpu_span_ms": span / 1000.0,
        "gpu_busy_ms": busy / 1000.0,
        "gpu_idle_ms": (span - busy) / 1000.0,
        "kernels": len(kernels),
        "gaps_over_threshold": len(gaps),
        "gap_threshold_us": gap_us,
        "idle_ms_by_range": dict(sorted(by_range.items(), key=lambda item: -item[1])),
        "idle_ms_by_host_frame": dict(sorted(by_frame.items(), key=lambda item: -item[1])[:25]),
        "host_range_spans_ms": dict(range_spans),
        "syncs_by_host_frame": dict(syncs.most_common(25)),
        "largest_gaps": sorted(gaps, key=lambda gap: -gap["gap_us"])[:25],
    }


def host_and_device_marks(case: Any, runs: int = 3) -> list[dict[str, Any]]:
    """Without the profiler: when the host reached each decoder layer (and the language model) and when the
    GPU did, in ms from the forward's start (median of ``runs``). Where ``gpu_ms - host_ms`` is near 0 the GPU
    was waiting for the host; a large positive lead means the host was ahead (launch cost hidden)."""
    import time

    import torch

    language_model = case.model.model.language_model
    points: list[tuple[str, Any]] = [("language_model", language_model)]
    points += [(f"layer_{index}", layer) for index, layer in enumerate(language_model.layers)]
    rows: dict[str, list[tuple[float, float]]] = {name: [] for name, _ in points}
    rows["end"] = []
    for _ in range(runs):
        marks: list[tuple[str, float, Any]] = []

        def mark(name: str, marks: list[tuple[str, float, Any]] = marks) -> None:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            marks.append((name, time.perf_counter(), event))

        handles = [
            module.register_forward_pre_hook(lambda *_, name=name: mark(name), prepend=name == "language_model")
            for name, module in points
        ]
        try:
            torch.cuda.synchronize()
            mark("start")
            case.model(**case.inputs, use_cache=True, logits_to_keep=1)
            mark("end")
            torch.cuda.synchronize()
        finally:
            for handle in handles:
                handle.remove()
        _, host0, event0 = marks[0]
        for name, host, event in marks[1:]:
            rows[name].append(((host - host0) * 1000.0, event0.elapsed_time(event)))
    out = []
    for name, values in rows.items():
        if values:
            host = sorted(v[0] for v in values)[len(values) // 2]
            gpu = sorted(v[1] for v in values)[len(values) // 2]
            out.append(
                {"mark": name, "host_ms": round(host, 3), "gpu_ms": round(gpu, 3), "gpu_lead_ms": round(gpu - host, 3)}
            )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llava-onevision-7b")
    parser.add_argument("--frames", type=int, default=None)
    parser.add_argument(
        "--policy",
        default=os.path.join(ROOT, "policies", "hieravid-30.yaml"),
        help="policy YAML, or 'none' for the unpruned model",
    )
    parser.add_argument("--size", choices=["full", "tiny"], default="full")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--gap-us", type=float, default=20.0)
    parser.add_argument("--out", required=True, help="summary JSON")
    parser.add_argument("--trace", default=None, help="also keep the gzipped Chrome trace here")
    args = parser.parse_args(argv)

    import contextlib

    import torch
    from torch.profiler import ProfilerActivity, profile

    from hieravid.apps.bench import build_case, sdpa_backends
    from hieravid.runtime import apply

    case = build_case(args.model, frames=args.frames, size=args.size, device=args.device)
    cuda = args.device.startswith("cuda")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    handle = apply(case.model, args.policy) if args.policy != "none" else contextlib.nullcontext()
    with sdpa_backends(False), handle, torch.inference_mode():
        for _ in range(3):
            case.model(**case.inputs, use_cache=True, logits_to_keep=1)
        if cuda:
            torch.cuda.synchronize()
        marks = host_and_device_marks(case) if cuda else []
        with profile(activities=activities, with_stack=True) as profiler:
            case.model(**case.inputs, use_cache=True, logits_to_keep=1)
            if cuda:
                torch.cuda.synchronize()
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "trace.json")
        profiler.export_chrome_trace(path)
        with open(path) as handle_file:
            trace = json.load(handle_file)
        if args.trace:
            with open(path, "rb") as source, gzip.open(args.trace, "wb") as target:
                target.write(source.read())
    summary = {"model": args.model, "policy": args.policy, **analyse(trace, args.gap_us), "marks": marks}
    with open(args.out, "w") as out:
        json.dump(summary, out, indent=2)
    print(json.dumps({k: v for k, v in summary.items() if k not in ("largest_gaps", "marks")}, indent=2))
    for row in marks:
        print(
            f"{row['mark']:>16}  host {row['host_ms']:8.2f}  gpu {row['gpu_ms']:8.2f}  lead {row['gpu_lead_ms']:7.2f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
