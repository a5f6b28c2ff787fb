"""Sweep the fused greedy DPP kernel's launch configurations on the block shapes of a 32-frame LLaVA-OneVision
prefill under ``policies/hieravid-30.yaml`` (8 blocks per stage; sizes and steps as measured on the H200 by
``bench_ops_gpu.py``), one GPU.

For each stage and configuration — programs per block (1 = the whole block in one program), warps per program —
it reports the median of CUDA-event timings and
whether the selection equals the PyTorch greedy loop's. Random kernels from unit-norm features of width 1,024
(wider than any block, so no block is exhausted early; the kernel's cost does not depend on the width).

Usage: ``python benchmarks/ops/bench_dpp_kernel.py --out dpp-kernel.json``
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
from pathlib import Path
from typing import Any

import torch

from hieravid.ops import DPP_EPS, greedy_map_dpp_order

#: (blocks, block size, greedy steps) of the three frame-level stages (bench_ops_gpu.py on the H200).
STAGES = {"stage1": (8, 429, 331), "stage2": (8, 331, 256), "stage3": (8, 256, 130)}


def time_ms(fn, iters: int = 30, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def sweep_stage(G: int, n: int, steps: int) -> dict[str, Any]:
    """Every configuration on one stage's blocks: median ms and equality with the PyTorch loop."""
    from hieravid.ops._triton_dpp import greedy_dpp_triton, programs_per_block

    gen = torch.Generator(device="cuda").manual_seed(0)
    X = torch.nn.functional.normalize(torch.randn(G, n, 1024, device="cuda", generator=gen), dim=-1)
    r = torch.rand(G, n, device="cuda", generator=gen) + 0.05
    K = (r[:, :, None] * (X @ X.transpose(1, 2)) * r[:, None, :]).contiguous()
    valid = torch.ones(G, n, dtype=torch.bool, device="cuda")
    budgets = torch.full((G,), steps, dtype=torch.int64, device="cuda")
    ref = greedy_map_dpp_order(K, valid, budgets, r, max_steps=steps, backend="torch")
    auto = programs_per_block(G, n, K.device)
    stage: dict[str, Any] = {"blocks": G, "block_size": n, "steps": steps, "programs_auto": auto, "configs": {}}
    configs: list[tuple[int | None, int | None]] = [(None, None)]
    configs += [(1, w) for w in (4, 8)] + [(pr, w) for pr in sorted({8, auto}) for w in (1, 2, 4, 8)]
    for programs, warps in configs:
        key = "default" if programs is None else f"programs{programs}_warps{warps}"

        def run(programs=programs, warps=warps):
            return greedy_dpp_triton(K, valid, budgets, r, steps, DPP_EPS, programs=programs, num_warps=warps)

        try:
            equal = bool(torch.equal(run(), ref))
            stage["configs"][key] = {"median_ms": time_ms(run), "equal_to_torch": equal}
        except Exception as exc:  # a configuration that does not compile is reported, not fatal
            stage["configs"][key] = {"error": repr(exc)[:300]}
        print(G, n, steps, key, stage["configs"][key], flush=True)
    return stage


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    results: dict[str, Any] = {
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "date": dt.date.today().isoformat(),
        "stages": {},
    }
    for name, shape in STAGES.items():
        results["stages"][name] = sweep_stage(*shape)
        args.out.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
