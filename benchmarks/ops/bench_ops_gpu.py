"""GPU benchmark of the HieraVid operators (one H100, bf16, hidden 3584).

Scenario: a 32-frame LLaVA-OneVision prefill under hieravid-30 — 6,272 video tokens (32 frames × 196) at
the segment level, ≈3,136 tokens entering layer 7 in ≈8 segments, then frame-level stages with ratios
0.3, 0.3, 0.57 at layers 7 / 14 / 21. Synthetic videos are made of ``frames / 4`` scenes (noisy copies of
a base frame), so that segmentation finds about one segment per scene as real videos do.

Measured (CUDA events, median of many runs after warm-up; host syncs inside the operators included):
segment level; each DPP stage with the greedy loop as PyTorch eager, CUDA-graph replay and fused Triton;
the greedy core alone; the full pruning work of a prefill (segment level, last-query relevance, three
stages, keep-index bookkeeping and gathers); 64 frames; the worst case of one segment holding the whole
video with several ``max_block`` caps; scaling over 32/64/128/256 frames. Also checks that the Triton and
PyTorch greedy selections are identical on random inputs. Writes JSON to ``--out``.

Usage: ``PYTHONPATH=. python benchmarks/ops/bench_ops_gpu.py --out results.json``
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

from hieravid.ops import (
    SegmentLevelGraphs,
    compose_keep,
    dpp_select,
    frame_level,
    greedy_map_dpp_order,
    last_query_attention,
    segment_level,
    triton_available,
)

HIDDEN = 3584
HEADS, KV_HEADS, HEAD_DIM = 28, 4, 128
TOKENS_PER_FRAME = 196
DEVICE = "cuda"
TEXT_TOKENS = 64
STAGE_RATIOS = (0.3, 0.3, 0.57)
TARGETS_MS = {"dpp_stage": 1.5, "prefill_32": 5.0, "prefill_64": 10.0}


def log(*args: Any) -> None:
    print(*args, flush=True)


def bench(fn: Callable[[], Any], *, warmup: int = 5, iters: int = 30, max_seconds: float = 20.0) -> dict[str, float]:
    """Median / p10 / p90 milliseconds of ``fn`` with CUDA events (one event pair per run)."""
    for _ in range(warmup):
        fn()
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    times: list[float] = []
    t_start = time.perf_counter()
    for _ in range(iters):
        if DEVICE == "cuda":
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        if time.perf_counter() - t_start > max_seconds and len(times) >= 3:
            break
    times.sort()
    q = lambda p: times[min(len(times) - 1, int(p * len(times)))]  # noqa: E731
    return {"median_ms": statistics.median(times), "p10_ms": q(0.1), "p90_ms": q(0.9), "runs": len(times)}


def scene_video(frames: int, scenes: int, seed: int) -> torch.Tensor:
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    base = torch.randn(scenes, TOKENS_PER_FRAME, HIDDEN, device=DEVICE, generator=g)
    scene_of = torch.arange(frames, device=DEVICE) * scenes // frames
    noise = 0.5 * torch.randn(frames, TOKENS_PER_FRAME, HIDDEN, device=DEVICE, generator=g)
    return (base[scene_of] + noise).to(torch.bfloat16)


class Prefill:
    """Inputs of one simulated prefill: video embeddings plus stand-ins for the stage layers' tensors."""

    def __init__(self, frames: int, seed: int = 0) -> None:
        self.frames = scene_video(frames, max(1, frames // 4), seed)
        self.graphs = SegmentLevelGraphs()
        n_video = frames * TOKENS_PER_FRAME
        g = torch.Generator(device=DEVICE).manual_seed(seed + 1)
        seq = n_video + TEXT_TOKENS
        # post-attention hidden states of a stage layer (video part correlated with the frames)
        self.hidden = torch.randn(seq, HIDDEN, device=DEVICE, generator=g).to(torch.bfloat16)
        self.query = torch.randn(1, HEADS, 1, HEAD_DIM, device=DEVICE, generator=g).to(torch.bfloat16)
        self.key = torch.randn(1, KV_HEADS, seq, HEAD_DIM, device=DEVICE, generator=g).to(torch.bfloat16)

    def run(self, *, backend: str = "auto", max_block: int | None = None, graph: bool = False) -> dict[str, Any]:
        """All pruning work of the prefill; returns the final keep indices (original positions)."""
        seg = segment_level(self.frames, cuda_graphs=self.graphs if graph else None)
        keep = seg.kept_index  # original video positions kept after the segment level
        seg_ids = seg.token_segment_ids
        n_text = TEXT_TOKENS
        hidden = self.hidden
        sizes = [int(keep.numel())]
        for ratio in STAGE_RATIOS:
            n_cur = keep.numel()
            # the sequence at this stage: kept video tokens then the text tokens
            h = hidden[: n_cur + n_text]
            k = self.key[:, :, : n_cur + n_text]
            attn = last_query_attention(self.query, k, scaling=HEAD_DIM**-0.5)[0, :n_cur]
            opts: dict[str, Any] = {"backend": backend}
            res = frame_level(h[:n_cur], attn, seg_ids, seg.marginal_values, ratio, max_block=max_block, **opts)
            keep = compose_keep(keep, res.local_keep)
            seg_ids = res.segment_ids_kept
            # gather the surviving rows of the residual stream (video part; text rows are appended as is)
            hidden = torch.cat([h.index_select(0, res.local_keep), h[n_cur:]], dim=0)
            sizes.append(int(res.local_keep.numel()))
        return {"keep": keep, "sizes": sizes, "segments": seg.num_segments}


def stage_inputs(prefill: Prefill, stage: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Hidden states, attention, segment ids and marginal values of the tokens entering ``stage`` (0-based)."""
    seg = segment_level(prefill.frames)
    keep_local = torch.arange(seg.kept_index.numel(), device=DEVICE)
    seg_ids = seg.token_segment_ids
    g = torch.Generator(device=DEVICE).manual_seed(7)
    attn_all = torch.softmax(torch.randn(seg.kept_index.numel(), device=DEVICE, generator=g), 0)
    hidden = prefill.hidden[: seg.kept_index.numel()]
    for ratio in STAGE_RATIOS[:stage]:
        res = frame_level(hidden, attn_all, seg_ids, seg.marginal_values, ratio)
        hidden, attn_all, seg_ids = hidden[res.local_keep], attn_all[res.local_keep], res.segment_ids_kept
        keep_local = keep_local[res.local_keep]
    return hidden, attn_all, seg_ids, seg.marginal_values


def build_kernels(hidden, relevance, seg_ids, budgets):
    """The packed per-segment kernels exactly as dpp_select builds them (for timing the greedy core)."""
    G = budgets.numel()
    counts = torch.bincount(seg_ids, minlength=G)
    n_max = int(counts.max())
    order = torch.sort(seg_ids, stable=True).indices
    start = torch.cumsum(counts, 0) - counts
    pos = torch.empty_like(seg_ids)
    pos[order] = torch.arange(seg_ids.numel(), device=DEVICE) - start[seg_ids[order]]
    x = torch.nn.functional.normalize(hidden.float(), dim=-1)
    xp = torch.zeros(G, n_max, hidden.shape[1], device=DEVICE)
    xp[seg_ids, pos] = x
    rp = torch.zeros(G, n_max, device=DEVICE)
    rp[seg_ids, pos] = relevance
    valid = torch.zeros(G, n_max, dtype=torch.bool, device=DEVICE)
    valid[seg_ids, pos] = True
    K = torch.bmm(xp, xp.transpose(1, 2)) * rp[:, :, None] * rp[:, None, :]
    return K, valid, torch.minimum(budgets.to(counts.device), counts), rp


def bench_stage(prefill: Prefill, stage: int, backends: list[str], iters: int, sweep: bool) -> dict[str, Any]:
    """One frame-level stage end to end per backend, plus kernel build and greedy core alone."""
    h, attn, seg_ids, mv = stage_inputs(prefill, stage)
    ratio = STAGE_RATIOS[stage]
    key = f"stage{stage + 1}"
    out: dict[str, Any] = {"tokens": int(h.shape[0]), "segments": int(mv.numel())}
    for be in backends:
        it = 3 if be == "torch" else iters
        out[be] = bench(lambda be=be: frame_level(h, attn, seg_ids, mv, ratio, backend=be), iters=it, warmup=2)
        log(key, be, out[be])
    rel = torch.rand(h.shape[0], device=DEVICE)
    budgets_all = frame_level(h, attn, seg_ids, mv, ratio).budgets
    K, valid, budgets, rp = build_kernels(h, rel, seg_ids, budgets_all)
    steps = int(budgets.max())
    out["kept"] = int(budgets.sum())
    out["kernel_build"] = bench(lambda: build_kernels(h, rel, seg_ids, budgets_all), iters=iters)
    for be in backends:
        it = 3 if be == "torch" else iters
        out[f"greedy_{be}"] = bench(
            lambda be=be: greedy_map_dpp_order(K, valid, budgets, rp, max_steps=steps, backend=be),
            iters=it,
            warmup=2,
        )
    log(key, {k: v for k, v in out.items() if k.startswith("greedy") or k == "kernel_build"})
    if sweep:
        from hieravid.ops._triton_dpp import greedy_dpp_triton

        fb = rp.contiguous()
        kf = K.contiguous()
        out["triton_sweep"] = {}
        for nw in (4, 8, 16):
            for tpt in (32, 64):
                name = f"warps{nw}_tile{tpt}"
                try:
                    ref = greedy_dpp_triton(kf, valid, budgets, fb, steps, 1e-4)
                    got = greedy_dpp_triton(kf, valid, budgets, fb, steps, 1e-4, num_warps=nw, tile_per_thread=tpt)
                    res = bench(
                        lambda nw=nw, tpt=tpt: greedy_dpp_triton(
                            kf, valid, budgets, fb, steps, 1e-4, num_warps=nw, tile_per_thread=tpt
                        ),
                        iters=iters,
                        warmup=2,
                    )
                    res["equal"] = bool(torch.equal(ref, got))
                except Exception as exc:  # a config that fails to compile or run is reported, not fatal
                    res = {"error": repr(exc)[:200]}
                out["triton_sweep"][name] = res
                log("sweep", name, res)
    return out


def check_triton_vs_torch(results: dict[str, Any]) -> None:
    checks = []
    for seed, (G, n, D, frac) in enumerate(
        [(8, 392, 3584, 0.7), (8, 274, 3584, 0.7), (16, 192, 512, 0.43), (3, 1024, 256, 0.7), (40, 37, 64, 1.0)]
    ):
        g = torch.Generator(device=DEVICE).manual_seed(seed)
        X = torch.nn.functional.normalize(torch.randn(G, n, D, device=DEVICE, generator=g), dim=-1)
        r = torch.rand(G, n, device=DEVICE, generator=g) + 0.05
        K = r[:, :, None] * (X @ X.transpose(1, 2)) * r[:, None, :]
        valid = torch.rand(G, n, device=DEVICE, generator=g) > 0.03
        budgets = (valid.sum(1) * frac).long()
        a = greedy_map_dpp_order(K, valid, budgets, r, backend="torch")
        b = greedy_map_dpp_order(K, valid, budgets, r, backend="triton")
        checks.append({"G": G, "n": n, "D": D, "equal": bool(torch.equal(a, b))})
    # end-to-end through dpp_select with blocks
    p = Prefill(32, seed=3)
    h, a_, s, mv = stage_inputs(p, 0)
    counts = torch.bincount(s, minlength=mv.numel())
    budgets = (counts * 0.7).long()
    for mb in (None, 128):
        x = dpp_select(h, a_, s, budgets, max_block=mb, backend="torch")
        y = dpp_select(h, a_, s, budgets, max_block=mb, backend="triton")
        checks.append({"dpp_select_max_block": mb, "equal": bool(torch.equal(x, y))})
    results["checks"]["triton_equals_torch"] = checks
    log("triton == torch:", all(c["equal"] for c in checks), checks)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--quick", action="store_true", help="fewer runs and sizes")
    parser.add_argument("--smoke", action="store_true", help="tiny CPU run that only checks the script works")
    args = parser.parse_args()
    global DEVICE, HIDDEN, TOKENS_PER_FRAME, HEADS, KV_HEADS, HEAD_DIM
    if args.smoke:
        DEVICE, HIDDEN, TOKENS_PER_FRAME, HEADS, KV_HEADS, HEAD_DIM = "cpu", 32, 16, 4, 2, 8
        args.quick = True
    elif not torch.cuda.is_available():
        print("CUDA is required (or pass --smoke)", file=sys.stderr)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = False
    iters = 10 if args.quick else 30
    results: dict[str, Any] = {
        "gpu": torch.cuda.get_device_name(0) if DEVICE == "cuda" else "cpu (smoke)",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": None,
        "python": platform.python_version(),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "dtype": "bfloat16",
        "hidden": HIDDEN,
        "stage_ratios": list(STAGE_RATIOS),
        "targets_ms": TARGETS_MS,
        "timings": {},
        "checks": {},
    }
    if triton_available():
        import triton

        results["triton"] = triton.__version__
    T = results["timings"]

    def save() -> None:  # after every section, so that a run cut short still leaves its numbers
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)

    gpu_triton = DEVICE == "cuda" and triton_available()
    backends = ["torch", "torch_graph"] + (["triton"] if gpu_triton else [])
    auto = "triton" if gpu_triton else "torch_graph"

    # host cost of launching one small operator (this bounds everything made of many small launches)
    a_small = torch.zeros(16, device=DEVICE)
    b_small = torch.zeros(16, device=DEVICE)
    for _ in range(100):
        torch.add(a_small, 1, out=b_small)
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(2000):
        torch.add(a_small, 1, out=b_small)
    results["host_us_per_small_op"] = (time.perf_counter() - t0) / 2000 * 1e6
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    log("host us per small op:", results["host_us_per_small_op"])

    if gpu_triton:
        check_triton_vs_torch(results)

    # --- 32 frames: segment level, stages, full prefill -------------------------------------------
    p32 = Prefill(32)
    T["segment_level_32f"] = bench(lambda: segment_level(p32.frames), iters=iters)
    log("segment level 32f", T["segment_level_32f"])
    sizes = p32.run()["sizes"]
    results["checks"]["sizes_32f"] = sizes
    results["checks"]["segments_32f"] = p32.run()["segments"]
    log("tokens per stage (32f):", sizes, "segments:", results["checks"]["segments_32f"])

    for stage in range(3):
        T[f"stage{stage + 1}_32f"] = bench_stage(p32, stage, backends, iters, sweep=gpu_triton)

    T["prefill_32f"] = {be: bench(lambda be=be: p32.run(backend=be), iters=iters) for be in {"torch_graph", auto}}
    graph_ok = True
    graphs = SegmentLevelGraphs()
    try:
        T["segment_level_32f_graph"] = bench(lambda: segment_level(p32.frames, cuda_graphs=graphs), iters=iters)
        log("segment level 32f (CUDA graph)", T["segment_level_32f_graph"])
        T["prefill_32f"][f"{auto}+segment_graph"] = bench(lambda: p32.run(backend=auto, graph=True), iters=iters)
    except Exception as exc:  # report and go on with the eager segment level
        graph_ok = False
        results["checks"]["segment_graph_error"] = repr(exc)[:300]
        log("segment graph failed:", exc)
    log("prefill 32f", T["prefill_32f"])
    T["relevance_32f"] = bench(lambda: last_query_attention(p32.query, p32.key, scaling=HEAD_DIM**-0.5), iters=iters)

    save()
    # --- 64 frames ----------------------------------------------------------------------------------
    p64 = Prefill(64, seed=1)
    results["checks"]["sizes_64f"] = p64.run()["sizes"]
    results["checks"]["segments_64f"] = p64.run()["segments"]
    T["segment_level_64f"] = bench(lambda: segment_level(p64.frames), iters=iters)
    T["prefill_64f"] = {auto: bench(lambda: p64.run(backend=auto), iters=iters)}
    if graph_ok:
        T["prefill_64f"][f"{auto}+segment_graph"] = bench(lambda: p64.run(backend=auto, graph=True), iters=iters)
    log("prefill 64f", T["prefill_64f"], results["checks"]["sizes_64f"], results["checks"]["segments_64f"])

    save()
    # --- worst case: one segment holds the whole 32-frame video -------------------------------------
    h, attn, seg_ids, _ = stage_inputs(p32, 0)
    one = torch.zeros_like(seg_ids)
    mv1 = torch.zeros(1, device=DEVICE)
    T["worst_one_segment_32f"] = {"tokens": int(h.shape[0])}
    for mb in (None, 1024, 512, 256):
        name = f"max_block_{mb}"
        be = auto
        if be == "torch_graph" and mb is None:
            continue
        cap = 1 << 30 if mb is None else mb  # frame_level's None means "the DPP default"; this is no cap
        T["worst_one_segment_32f"][name] = bench(
            lambda cap=cap, be=be: frame_level(h, attn, one, mv1, 0.3, max_block=cap, backend=be),
            iters=3 if mb is None else max(3, iters // 3),
            warmup=1,
        )
        log("worst case", name, T["worst_one_segment_32f"][name])

    save()
    # --- scaling ------------------------------------------------------------------------------------
    T["scaling"] = {}
    for frames in (32, 64, 128) if args.quick else (32, 64, 128, 256):
        pf = Prefill(frames, seed=frames)
        info = pf.run(backend=auto)
        T["scaling"][f"{frames}f"] = {
            "sizes": info["sizes"],
            "segments": info["segments"],
            "segment_level": bench(lambda pf=pf: segment_level(pf.frames), iters=max(5, iters // 2)),
            "prefill": bench(lambda pf=pf: pf.run(backend=auto), iters=max(5, iters // 2)),
            "prefill_segment_graph": bench(lambda pf=pf: pf.run(backend=auto, graph=True), iters=max(5, iters // 2))
            if graph_ok
            else None,
        }
        log("scaling", frames, T["scaling"][f"{frames}f"])
        save()
        del pf
        torch.cuda.empty_cache()

    save()
    # number of kernel launches of the segment level and of one stage (host launch cost is per launch)
    try:
        from torch.profiler import ProfilerActivity, profile

        h, attn, seg_ids, mv = stage_inputs(p32, 0)
        counts: dict[str, int] = {}
        for name, fn in (
            ("segment_level", lambda: segment_level(p32.frames)),
            ("segment_level_graph", lambda: segment_level(p32.frames, cuda_graphs=graphs if graph_ok else None)),
            ("stage1", lambda: frame_level(h, attn, seg_ids, mv, STAGE_RATIOS[0])),
        ):
            fn()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                fn()
                torch.cuda.synchronize()
            counts[name] = sum(e.count for e in prof.key_averages() if e.device_type.name == "CUDA")
        results["checks"]["gpu_kernels_per_call"] = counts
        log("kernels per call", counts)
    except Exception as exc:  # profiling is informative only
        results["checks"]["gpu_kernels_per_call"] = repr(exc)[:200]

    # determinism of the whole pipeline
    a = p32.run(backend=auto)["keep"]
    b = p32.run(backend=auto)["keep"]
    results["checks"]["deterministic"] = bool(torch.equal(a, b))

    # summary against the targets
    s1 = [T[f"stage{i}_32f"][auto]["median_ms"] for i in (1, 2, 3)]
    best32 = min(v["median_ms"] for k, v in T["prefill_32f"].items() if k.startswith(auto))
    best64 = min(v["median_ms"] for v in T["prefill_64f"].values())
    results["summary"] = {
        "backend": auto,
        "dpp_stage_ms_32f": s1,
        "dpp_stage_target_met": all(v <= TARGETS_MS["dpp_stage"] for v in s1),
        "prefill_32f_ms": T["prefill_32f"][auto]["median_ms"],
        "prefill_32f_ms_segment_graph": T["prefill_32f"].get(f"{auto}+segment_graph", {}).get("median_ms"),
        "prefill_32f_target_met": best32 <= TARGETS_MS["prefill_32"],
        "prefill_64f_ms": T["prefill_64f"][auto]["median_ms"],
        "prefill_64f_ms_segment_graph": T["prefill_64f"].get(f"{auto}+segment_graph", {}).get("median_ms"),
        "prefill_64f_target_met": best64 <= TARGETS_MS["prefill_64"],
        "host_us_per_small_op": results["host_us_per_small_op"],
    }
    log(json.dumps(results["summary"], indent=1))
    save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
