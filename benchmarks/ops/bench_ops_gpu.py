"""GPU benchmark of the HieraVid operators (one GPU, bf16, hidden 3584), with a CPU smoke mode.

Scenario: a 32-frame LLaVA-OneVision-7B prefill under ``policies/hieravid-30.yaml`` — 6,272 video tokens
(32 frames × 196) at the segment level, ≈3,136 tokens entering layer 7 in ≈8 segments, then frame-level DPP
stages with ratios 0.3, 0.3, 0.57 at layers 7 / 14 / 21 (the stages are the planner's own
:class:`~hieravid.plan.StagePlan` objects). Synthetic videos are made of ``frames / 4`` scenes (noisy copies of a
base frame), so that segmentation finds about one segment per scene as real videos do.

The operators are called as the runtime calls them: the segment level through :func:`~hieravid.ops.input_level`
(eager, or through a :class:`~hieravid.ops.GraphCache`), then one host read of the per-segment counts and marginal
values, every stage's budgets computed on the host and uploaded in one copy
(:func:`hieravid.runtime.prefill.schedule_stages`), and each stage's :func:`~hieravid.ops.frame_level` given those
budgets (so the stages neither read nor copy anything to the device).

Measured (CUDA events on a GPU, wall clock on the CPU; median of many runs after warm-up; host syncs inside the
operators included): the segment level, eager and through CUDA graphs; each DPP stage through ``frame_level``
(budgets uploaded ahead, budgets from ``host_meta``, and with its own host read) and through ``dpp_select`` with
each greedy backend (PyTorch eager, fused Triton); the greedy core alone and everything of ``dpp_select`` but the
greedy core; the full pruning work of a 32- and a 64-frame prefill (segment level, last-query relevance, three
stages, keep-index bookkeeping and gathers); the worst case of one segment holding the whole video with several
``max_block`` caps; scaling over 32/64/128/256 frames. Also checks that the Triton and PyTorch greedy selections
are identical on random inputs. Writes JSON to ``--out`` (after every section, so a run cut short keeps its
numbers).

``--device cpu`` skips the CUDA-graph, Triton and kernel-count parts (listed under ``"skipped"`` in the JSON);
``--quick`` shrinks everything (hidden 32, 16 tokens per frame, 8 / 16 frames, scaling over 8/16/32 frames,
``max_block`` caps 32/16/8 for the worst case, 3 runs) so that the whole script runs in seconds: with
``--device cpu`` it is the smoke check of ``tests/test_bench_ops_script.py``.

Usage: ``PYTHONPATH=. python benchmarks/ops/bench_ops_gpu.py --out results.json [--device cpu] [--quick]``
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from unittest import mock

import torch
from torch import Tensor

import hieravid.ops.dpp as dpp_module
from hieravid.ops import (
    DPP_EPS,
    GraphCache,
    SegmentLevelResult,
    compose_keep,
    dpp_select,
    frame_level,
    greedy_map_dpp_order,
    input_level,
    last_query_attention,
    normalize_relevance,
    triton_available,
)
from hieravid.ops.budget import SegmentBudgets
from hieravid.plan import StagePlan, compile_plan
from hieravid.policy import DppSelector, SegmentLevel
from hieravid.runtime.prefill import schedule_stages
from hieravid.runtime.state import Request, SampleCounts

ROOT = Path(__file__).resolve().parents[2]
POLICY, MODEL = ROOT / "policies" / "hieravid-30.yaml", "llava-onevision-7b"
_PLAN = compile_plan(POLICY, MODEL)
assert isinstance(_PLAN.segment.config, SegmentLevel)
SEGMENT: SegmentLevel = _PLAN.segment.config
STAGES: tuple[StagePlan, ...] = _PLAN.stages
STAGE_RATIOS = tuple(stage.prune_ratio for stage in STAGES)

# Shapes of the full scenario (LLaVA-OneVision-7B); --quick replaces them in main().
HIDDEN = 3584
HEADS, KV_HEADS, HEAD_DIM = 28, 4, 128
TOKENS_PER_FRAME = 196
TEXT_TOKENS = 64
FRAMES, FRAMES_LONG, FRAMES_SCALING = 32, 64, (32, 64, 128, 256)
WORST_CASE_MAX_BLOCKS = (None, 1024, 512, 256)  # None: no cap (one block of every token)
DEVICE = "cuda"
MAX_WARMUP = 5  # --quick: 1
DTYPE = torch.bfloat16
TARGETS_MS = {"dpp_stage": 1.5, "prefill_32": 5.0, "prefill_64": 10.0}


def log(*args: Any) -> None:
    print(*args, flush=True)


def bench(fn: Callable[[], Any], *, warmup: int = 5, iters: int = 30, max_seconds: float = 20.0) -> dict[str, float]:
    """Median / p10 / p90 milliseconds of ``fn``: CUDA events on a GPU (one pair per run), wall clock on the CPU."""
    for _ in range(min(warmup, MAX_WARMUP)):
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


def scene_video(frames: int, scenes: int, seed: int) -> Tensor:
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    base = torch.randn(scenes, TOKENS_PER_FRAME, HIDDEN, device=DEVICE, generator=g)
    scene_of = torch.arange(frames, device=DEVICE) * scenes // frames
    noise = 0.5 * torch.randn(frames, TOKENS_PER_FRAME, HIDDEN, device=DEVICE, generator=g)
    return (base[scene_of] + noise).to(DTYPE)


def read_segment_meta(seg: SegmentLevelResult) -> tuple[Tensor, Tensor]:
    """Host ``[G]`` token counts and marginal values of the segments, in one read (as the runtime's input level)."""
    G = seg.num_segments
    ids = seg.token_segment_ids
    tokens = torch.zeros(G, dtype=torch.int64, device=ids.device).index_add_(0, ids, torch.ones_like(ids))
    host = torch.cat([tokens.double(), seg.marginal_values.to(torch.float64)]).cpu()
    return host[:G].long(), host[G:].clone()


def schedule(stages: Sequence[StagePlan], counts: Tensor, marginal: Tensor) -> list[SegmentBudgets]:
    """Every stage's budgets (and DPP block plan) from the host counts and marginal values, uploaded to the device in
    one copy: the runtime's own :func:`schedule_stages` on a one-sample request."""
    request = Request(batch=1, schedule=[SampleCounts(counts, marginal, newlines=0, text=0)])
    schedule_stages(request, SimpleNamespace(stages=tuple(stages)), torch.device(DEVICE))  # type: ignore[arg-type]
    return [row[0] for row in request.budgets]


class Prefill:
    """Inputs of one simulated prefill: video embeddings plus stand-ins for the stage layers' tensors."""

    def __init__(self, frames: int, seed: int = 0) -> None:
        self.frames = scene_video(frames, max(1, frames // 4), seed)
        self.graphs = GraphCache()
        n_video = frames * TOKENS_PER_FRAME
        g = torch.Generator(device=DEVICE).manual_seed(seed + 1)
        seq = n_video + TEXT_TOKENS
        # post-attention hidden states of a stage layer, and the last query / all keys of its attention
        self.hidden = torch.randn(seq, HIDDEN, device=DEVICE, generator=g).to(DTYPE)
        self.query = torch.randn(1, HEADS, 1, HEAD_DIM, device=DEVICE, generator=g).to(DTYPE)
        self.key = torch.randn(1, KV_HEADS, seq, HEAD_DIM, device=DEVICE, generator=g).to(DTYPE)

    def segment(self, *, graph: bool = False) -> SegmentLevelResult:
        """The segment level (HieraVid's input-level operator), eager or through this prefill's CUDA graphs."""
        return input_level(SEGMENT, self.frames, graphs=self.graphs if graph else None)

    def run(self, *, graph: bool = False) -> dict[str, Any]:
        """All pruning work of the prefill; returns the final keep indices (original positions)."""
        seg = self.segment(graph=graph)
        budgets = schedule(STAGES, *read_segment_meta(seg))
        keep = seg.kept_index  # original video positions kept after the segment level
        seg_ids = seg.token_segment_ids
        hidden = self.hidden
        sizes = [int(keep.numel())]
        for stage, stage_budgets in zip(STAGES, budgets):
            n_cur = int(keep.numel())  # a shape: known on the host
            # the sequence at this stage: kept video tokens then the text tokens
            h = hidden[: n_cur + TEXT_TOKENS]
            k = self.key[:, :, : n_cur + TEXT_TOKENS]
            attn = last_query_attention(self.query, k, scaling=HEAD_DIM**-0.5)[0, :n_cur]
            res = frame_level(h[:n_cur], attn, seg_ids, seg.marginal_values, stage, budgets=stage_budgets)
            keep = compose_keep(keep, res.local_keep)
            seg_ids = res.segment_ids_kept
            # gather the surviving rows of the residual stream (video part; text rows are appended as is)
            hidden = torch.cat([h.index_select(0, res.local_keep), h[n_cur:]], dim=0)
            sizes.append(int(res.local_keep.numel()))
        return {"keep": keep, "sizes": sizes, "segments": seg.num_segments}


@dataclasses.dataclass
class StageInputs:
    """What enters one frame-level stage, with its budgets three ways (uploaded ahead, host meta, nothing)."""

    hidden: Tensor
    attention: Tensor
    segment_ids: Tensor
    marginal_values: Tensor
    budgets: SegmentBudgets
    host_meta: tuple[Tensor, Tensor]


def stage_inputs(prefill: Prefill, stage: int) -> StageInputs:
    """Hidden states, attention, segment ids, marginal values and budgets of the tokens entering ``stage``."""
    seg = prefill.segment()
    counts, marginal = read_segment_meta(seg)
    budgets = schedule(STAGES, counts, marginal)
    n = int(seg.kept_index.numel())
    g = torch.Generator(device=DEVICE).manual_seed(7)
    attn = torch.softmax(torch.randn(n, device=DEVICE, generator=g), 0)
    hidden = prefill.hidden[:n]
    seg_ids = seg.token_segment_ids
    for earlier in range(stage):
        res = frame_level(hidden, attn, seg_ids, seg.marginal_values, STAGES[earlier], budgets=budgets[earlier])
        hidden, attn, seg_ids = hidden[res.local_keep], attn[res.local_keep], res.segment_ids_kept
    return StageInputs(hidden, attn, seg_ids, seg.marginal_values, budgets[stage], (budgets[stage].counts, marginal))


def run_stage(inp: StageInputs, stage: StagePlan) -> Tensor:
    """The stage as the runtime runs it (budgets uploaded ahead); returns its local keep indices."""
    return frame_level(
        inp.hidden, inp.attention, inp.segment_ids, inp.marginal_values, stage, budgets=inp.budgets
    ).local_keep


def select(inp: StageInputs, stage: StagePlan, backend: str) -> Tensor:
    """The stage's DPP selection with an explicit greedy backend (what ``frame_level``'s selector runs with "auto")."""
    assert isinstance(stage.selector, DppSelector)
    relevance = normalize_relevance(inp.attention, stage.relevance_sign)
    return dpp_select(
        inp.hidden, relevance, inp.segment_ids, inp.budgets, max_block=stage.selector.max_block, backend=backend
    )


def greedy_inputs(inp: StageInputs, stage: StagePlan) -> dict[str, Any]:
    """The packed per-block kernels, valid masks, block budgets and fallback scores exactly as ``dpp_select`` hands
    them to its greedy core (recorded from one call), for timing the greedy core alone."""
    seen: dict[str, Any] = {}
    real = dpp_module._run_greedy

    def spy(kernel: Tensor, valid: Tensor, budgets: Tensor, fallback: Tensor, steps: int, eps: float, mode: str):
        seen.update(kernel=kernel, valid=valid, budgets=budgets, fallback=fallback, steps=steps, eps=eps)
        return real(kernel, valid, budgets, fallback, steps, eps, mode)

    with mock.patch.object(dpp_module, "_run_greedy", spy):
        select(inp, stage, "auto")
    return seen


def _no_greedy(kernel: Tensor, valid: Tensor, budgets: Tensor, fallback: Tensor, steps: int, eps: float, mode: str):
    return torch.full((kernel.shape[0], steps), -1, dtype=torch.int64, device=kernel.device)


def bench_stage(prefill: Prefill, stage_index: int, backends: list[str], iters: int, sweep: bool) -> dict[str, Any]:
    """One frame-level stage end to end (three ways of passing budgets) and per greedy backend, plus everything of
    ``dpp_select`` but the greedy core, and the greedy core alone."""
    inp = stage_inputs(prefill, stage_index)
    stage = STAGES[stage_index]
    key = f"stage{stage_index + 1}"
    h, attn, seg_ids, mv = inp.hidden, inp.attention, inp.segment_ids, inp.marginal_values
    out: dict[str, Any] = {
        "tokens": int(h.shape[0]),
        "segments": int(mv.numel()),
        "kept": inp.budgets.total,
        "max_block": stage.selector.max_block,  # type: ignore[attr-defined]
    }
    slow = max(3, iters // 10)  # the PyTorch greedy loop is hundreds of dependent small steps
    # frame_level as the runtime calls it (budgets uploaded ahead: no host read, no copy), with only host_meta
    # (budgets computed and copied per call), and alone (one host read of counts and marginal values)
    for name, extra in (
        ("frame_level", {"budgets": inp.budgets}),
        ("frame_level_host_meta", {"host_meta": inp.host_meta}),
        ("frame_level_sync", {}),
    ):
        out[name] = bench(lambda extra=extra: frame_level(h, attn, seg_ids, mv, stage, **extra), iters=iters, warmup=2)
        log(key, name, out[name])
    out["dpp_select"] = {}
    for be in backends:
        it = slow if be == "torch" else iters
        out["dpp_select"][be] = bench(lambda be=be: select(inp, stage, be), iters=it, warmup=2)
        log(key, "dpp_select", be, out["dpp_select"][be])
    with mock.patch.object(dpp_module, "_run_greedy", _no_greedy):
        out["dpp_select_without_greedy"] = bench(lambda: select(inp, stage, "auto"), iters=iters, warmup=2)
    core = greedy_inputs(inp, stage)
    K, valid, budgets, fb, steps = core["kernel"], core["valid"], core["budgets"], core["fallback"], core["steps"]
    out["blocks"], out["block_size"], out["greedy_steps"] = int(K.shape[0]), int(K.shape[1]), int(steps)
    out["greedy"] = {}
    for be in backends:
        it = slow if be == "torch" else iters
        out["greedy"][be] = bench(
            lambda be=be: greedy_map_dpp_order(K, valid, budgets, fb, max_steps=steps, backend=be), iters=it, warmup=2
        )
    log(key, "without greedy", out["dpp_select_without_greedy"], "greedy", out["greedy"])
    if sweep:
        from hieravid.ops._triton_dpp import greedy_dpp_triton, programs_per_block

        out["triton_sweep"] = {}
        auto_programs = programs_per_block(int(K.shape[0]), int(K.shape[1]), K.device)
        out["programs_per_block_auto"] = auto_programs
        ref = greedy_map_dpp_order(K, valid, budgets, fb, max_steps=steps, backend="torch")
        split = sorted({2, 4, 8, auto_programs} - {1})
        configs = [(1, nw) for nw in (4, 8, 16)] + [(pr, nw) for pr in split for nw in (1, 2, 4, 8)]
        for programs, nw in configs:
            name = f"programs{programs}_warps{nw}"
            try:
                got = greedy_dpp_triton(K, valid, budgets, fb, steps, DPP_EPS, programs=programs, num_warps=nw)
                res: dict[str, Any] = bench(
                    lambda programs=programs, nw=nw: greedy_dpp_triton(
                        K, valid, budgets, fb, steps, DPP_EPS, programs=programs, num_warps=nw
                    ),
                    iters=iters,
                    warmup=2,
                )
                res["equal_to_torch"] = bool(torch.equal(ref, got))
            except Exception as exc:  # a config that fails to compile or run is reported, not fatal
                res = {"error": repr(exc)[:200]}
            out["triton_sweep"][name] = res
            log("sweep", name, res)
    return out


def check_backends_agree(results: dict[str, Any], a: str, b: str) -> None:
    """Greedy selections of backends ``a`` and ``b`` on random kernels, and ``dpp_select`` with and without blocks."""
    checks: list[dict[str, Any]] = []
    for seed, (G, n, D, frac) in enumerate(
        [(8, 392, HIDDEN, 0.7), (8, 274, HIDDEN, 0.7), (16, 192, 512, 0.43), (3, 1024, 256, 0.7), (40, 37, 64, 1.0)]
    ):
        g = torch.Generator(device=DEVICE).manual_seed(seed)
        X = torch.nn.functional.normalize(torch.randn(G, n, D, device=DEVICE, generator=g), dim=-1)
        r = torch.rand(G, n, device=DEVICE, generator=g) + 0.05
        K = r[:, :, None] * (X @ X.transpose(1, 2)) * r[:, None, :]
        valid = torch.rand(G, n, device=DEVICE, generator=g) > 0.03
        budgets = (valid.sum(1) * frac).long()
        x = greedy_map_dpp_order(K, valid, budgets, r, backend=a)
        y = greedy_map_dpp_order(K, valid, budgets, r, backend=b)
        checks.append({"G": G, "n": n, "D": D, "equal": bool(torch.equal(x, y))})
    # end to end through dpp_select, with blocks
    inp = stage_inputs(Prefill(FRAMES, seed=3), 0)
    counts = torch.bincount(inp.segment_ids, minlength=inp.marginal_values.numel())
    budgets = (counts * 0.7).long()
    for mb in (None, 128):
        x = dpp_select(inp.hidden, inp.attention, inp.segment_ids, budgets, max_block=mb, backend=a)
        y = dpp_select(inp.hidden, inp.attention, inp.segment_ids, budgets, max_block=mb, backend=b)
        checks.append({"dpp_select_max_block": mb, "equal": bool(torch.equal(x, y))})
    results["checks"][f"{b}_equals_{a}"] = checks
    log(f"{b} == {a}:", all(c["equal"] for c in checks), checks)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="JSON file written after every section")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--quick", action="store_true", help="tiny shapes, few frames and runs (a smoke check)")
    args = parser.parse_args(argv)
    global DEVICE, HIDDEN, TOKENS_PER_FRAME, HEADS, KV_HEADS, HEAD_DIM, FRAMES, FRAMES_LONG, FRAMES_SCALING, MAX_WARMUP
    global WORST_CASE_MAX_BLOCKS
    DEVICE = args.device
    if DEVICE == "cuda" and not torch.cuda.is_available():
        print("CUDA is not available (pass --device cpu)", file=sys.stderr)
        return 2
    if args.quick:
        HIDDEN, TOKENS_PER_FRAME, HEADS, KV_HEADS, HEAD_DIM = 32, 16, 4, 2, 8
        FRAMES, FRAMES_LONG, FRAMES_SCALING = 8, 16, (8, 16, 32)
        WORST_CASE_MAX_BLOCKS = (None, 32, 16, 8)  # the 64 tokens of 8 frames are split too
        MAX_WARMUP = 1
    iters = 3 if args.quick else 30
    torch.backends.cuda.matmul.allow_tf32 = False
    on_gpu = DEVICE == "cuda"
    gpu_triton = on_gpu and triton_available()
    skipped: dict[str, str] = {}
    if not on_gpu:
        skipped["cuda_graphs"] = "device is cpu: GraphCache captures CUDA work only"
        skipped["triton"] = "device is cpu: the fused greedy kernel runs on CUDA only"
        skipped["gpu_kernels_per_call"] = "device is cpu: counts CUDA kernel launches"
    elif not gpu_triton:
        skipped["triton"] = "triton is not importable"
    backends = ["torch"] + (["triton"] if gpu_triton else [])
    auto = "triton" if gpu_triton else "torch"  # what dpp_select's "auto" (frame_level's selector) resolves to
    results: dict[str, Any] = {
        "device": DEVICE,
        "gpu": torch.cuda.get_device_name(0) if on_gpu else None,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": None,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "quick": args.quick,
        "policy": POLICY.name,
        "model": MODEL,
        "dtype": str(DTYPE).removeprefix("torch."),
        "shapes": {
            "hidden": HIDDEN,
            "tokens_per_frame": TOKENS_PER_FRAME,
            "heads": HEADS,
            "kv_heads": KV_HEADS,
            "head_dim": HEAD_DIM,
            "text_tokens": TEXT_TOKENS,
            "frames": FRAMES,
            "frames_long": FRAMES_LONG,
            "frames_scaling": list(FRAMES_SCALING),
        },
        "stage_ratios": list(STAGE_RATIOS),
        "greedy_backends": backends,
        "auto_backend": auto,
        "targets_ms": TARGETS_MS,
        "skipped": skipped,
        "timings": {},
        "checks": {},
    }
    if gpu_triton:
        import triton

        results["triton"] = triton.__version__
    T = results["timings"]
    out_path = Path(args.out)

    def save() -> None:  # after every section, so that a run cut short still leaves its numbers
        out_path.write_text(json.dumps(results, indent=1))

    def sync() -> None:
        if on_gpu:
            torch.cuda.synchronize()

    # host cost of launching one small operator (this bounds everything made of many small launches)
    a_small = torch.zeros(16, device=DEVICE)
    b_small = torch.zeros(16, device=DEVICE)
    for _ in range(100):
        torch.add(a_small, 1, out=b_small)
    sync()
    t0 = time.perf_counter()
    for _ in range(2000):
        torch.add(a_small, 1, out=b_small)
    results["host_us_per_small_op"] = (time.perf_counter() - t0) / 2000 * 1e6
    sync()
    log("host us per small op:", results["host_us_per_small_op"])

    if gpu_triton:
        check_backends_agree(results, "torch", "triton")

    # --- main scenario: segment level, stages, full prefill -----------------------------------------
    p = Prefill(FRAMES)
    T["segment_level"] = {"frames": FRAMES, "eager": bench(lambda: p.segment(), iters=iters)}
    log("segment level", T["segment_level"])
    info = p.run()
    results["checks"]["sizes"] = info["sizes"]
    results["checks"]["segments"] = info["segments"]
    log(f"tokens per stage ({FRAMES}f):", info["sizes"], "segments:", info["segments"])

    for stage in range(len(STAGES)):
        T[f"stage{stage + 1}"] = bench_stage(p, stage, backends, iters, sweep=gpu_triton)
    save()

    T["prefill"] = {"frames": FRAMES, auto: bench(lambda: p.run(), iters=iters)}
    graph_ok = on_gpu
    if on_gpu:
        try:
            T["segment_level"]["cuda_graph"] = bench(lambda: p.segment(graph=True), iters=iters)
            log("segment level (CUDA graph)", T["segment_level"]["cuda_graph"])
            T["prefill"][f"{auto}+segment_graph"] = bench(lambda: p.run(graph=True), iters=iters)
        except Exception as exc:  # report and go on with the eager segment level
            graph_ok = False
            results["checks"]["segment_graph_error"] = repr(exc)[:300]
            log("segment graph failed:", exc)
    log("prefill", T["prefill"])
    T["relevance"] = bench(lambda: last_query_attention(p.query, p.key, scaling=HEAD_DIM**-0.5), iters=iters)
    save()

    # --- longer video -----------------------------------------------------------------------------------
    pl = Prefill(FRAMES_LONG, seed=1)
    info = pl.run()
    results["checks"]["sizes_long"] = info["sizes"]
    results["checks"]["segments_long"] = info["segments"]
    T["prefill_long"] = {
        "frames": FRAMES_LONG,
        "segment_level": bench(lambda: pl.segment(), iters=iters),
        auto: bench(lambda: pl.run(), iters=iters),
    }
    if graph_ok:
        T["prefill_long"][f"{auto}+segment_graph"] = bench(lambda: pl.run(graph=True), iters=iters)
    log("prefill long", T["prefill_long"], info["sizes"], info["segments"])
    save()

    # --- worst case: one segment holds the whole video ------------------------------------------------
    inp = stage_inputs(p, 0)
    n = int(inp.hidden.shape[0])
    one = torch.zeros_like(inp.segment_ids)
    mv1 = torch.zeros(1, device=DEVICE)
    T["worst_one_segment"] = {"frames": FRAMES, "tokens": n}
    for mb in WORST_CASE_MAX_BLOCKS:
        stage = dataclasses.replace(STAGES[0], selector=DppSelector(max_block=mb))
        (budgets,) = schedule([stage], torch.tensor([n]), torch.zeros(1, dtype=torch.float64))
        T["worst_one_segment"][f"max_block_{mb}"] = bench(
            lambda stage=stage, budgets=budgets: frame_level(
                inp.hidden, inp.attention, one, mv1, stage, budgets=budgets
            ),
            iters=3 if mb is None else max(3, iters // 3),
            warmup=1,
        )
        log("worst case", mb, T["worst_one_segment"][f"max_block_{mb}"])
    save()

    # --- scaling ------------------------------------------------------------------------------------
    T["scaling"] = {}
    for frames in FRAMES_SCALING:
        pf = Prefill(frames, seed=frames)
        info = pf.run()
        it = max(3, iters // 2)
        T["scaling"][f"{frames}f"] = {
            "sizes": info["sizes"],
            "segments": info["segments"],
            "segment_level": bench(lambda pf=pf: pf.segment(), iters=it),
            "prefill": bench(lambda pf=pf: pf.run(), iters=it),
            "prefill_segment_graph": bench(lambda pf=pf: pf.run(graph=True), iters=it) if graph_ok else None,
        }
        log("scaling", frames, T["scaling"][f"{frames}f"])
        save()
        del pf
        if on_gpu:
            torch.cuda.empty_cache()

    # number of kernel launches of the segment level and of one stage (host launch cost is per launch)
    if on_gpu:
        try:
            from torch.profiler import ProfilerActivity, profile

            kernels: dict[str, int] = {}
            for name, fn in (
                ("segment_level", lambda: p.segment()),
                ("segment_level_graph", lambda: p.segment(graph=graph_ok)),
                ("stage1", lambda: run_stage(inp, STAGES[0])),
            ):
                fn()
                with profile(activities=[ProfilerActivity.CUDA]) as prof:
                    fn()
                    torch.cuda.synchronize()
                kernels[name] = sum(e.count for e in prof.key_averages() if e.device_type.name == "CUDA")
            results["checks"]["gpu_kernels_per_call"] = kernels
            log("kernels per call", kernels)
        except Exception as exc:  # profiling is informative only
            results["checks"]["gpu_kernels_per_call"] = repr(exc)[:200]

    # determinism of the whole pipeline
    results["checks"]["deterministic"] = bool(torch.equal(p.run()["keep"], p.run()["keep"]))

    # summary (the targets are for the full-size scenario on a GPU)
    stage_ms = [T[f"stage{i + 1}"]["frame_level"]["median_ms"] for i in range(len(STAGES))]
    best = min(v["median_ms"] for k, v in T["prefill"].items() if k.startswith(auto))
    best_long = min(v["median_ms"] for k, v in T["prefill_long"].items() if k.startswith(auto))
    judged = on_gpu and not args.quick
    results["summary"] = {
        "backend": auto,
        "frames": [FRAMES, FRAMES_LONG],
        "dpp_stage_ms": stage_ms,
        "dpp_stage_target_met": all(v <= TARGETS_MS["dpp_stage"] for v in stage_ms) if judged else None,
        "prefill_ms": T["prefill"][auto]["median_ms"],
        "prefill_ms_segment_graph": T["prefill"].get(f"{auto}+segment_graph", {}).get("median_ms"),
        "prefill_target_met": best <= TARGETS_MS["prefill_32"] if judged else None,
        "prefill_long_ms": T["prefill_long"][auto]["median_ms"],
        "prefill_long_ms_segment_graph": T["prefill_long"].get(f"{auto}+segment_graph", {}).get("median_ms"),
        "prefill_long_target_met": best_long <= TARGETS_MS["prefill_64"] if judged else None,
        "host_us_per_small_op": results["host_us_per_small_op"],
    }
    log(json.dumps(results["summary"], indent=1))
    save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
