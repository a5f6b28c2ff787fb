"""Fused Triton kernel for batched greedy DPP MAP inference (private; imported lazily on CUDA).

One program per block (segment): the whole greedy loop of Chen et al. (2018) runs inside one launch.
``d²``, the relevance fallback scores and the selection state live in registers; the Cholesky rows ``C``
live in a global scratch buffer ``[G, T, LD]`` float32 (small enough to stay in L2), ``LD`` = ``n``
rounded up to 16 so that column masks are constant over 16 columns and loads stay 16 bytes wide. The
scratch is zero-initialised and has a whole number of ``BLOCK_T``-row chunks, so the chunks of the
per-step matrix–vector product ``C[:t, j]ᵀ C[:t, :]`` need no row mask; the product is accumulated in a
2-D register tile and reduced once per step.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def _greedy_dpp_kernel(
    K_ptr,
    valid_ptr,
    budget_ptr,
    fb_ptr,
    C_ptr,
    order_ptr,
    n,
    T,
    TR,
    LD,
    eps,
    BLOCK_N: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    g = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_N)
    inb = offs < n
    valid = (tl.load(valid_ptr + g * n + offs, mask=inb, other=0) != 0) & inb
    kbase = K_ptr + g * n * n
    cbase = C_ptr + g * TR * LD
    cmask = offs < LD  # LD is a multiple of 16: the mask is constant over 16 columns, loads stay vectorised
    diag = tl.load(kbase + offs * (n + 1), mask=valid, other=0.0)
    ok = valid & (diag == diag)
    diag = tl.where(ok, diag, 0.0)
    thr = eps * tl.maximum(tl.max(diag, 0), 0.0)
    d2 = tl.where(ok, diag, float("-inf"))
    fb = tl.load(fb_ptr + g * n + offs, mask=valid, other=float("-inf"))
    fb = tl.where(valid, fb, float("-inf"))
    budget = tl.load(budget_ptr + g)
    steps = tl.minimum(budget, T)
    exhausted = budget * 0
    for t in range(0, T):
        if t < steps:
            dmax, jd = tl.max(d2, 0, return_indices=True, return_indices_tie_break_left=True)
            exh = (exhausted != 0) | (dmax <= thr) | (dmax != dmax)
            if exh:
                _fmax, j = tl.max(fb, 0, return_indices=True, return_indices_tie_break_left=True)
            else:
                j = jd
                krow = tl.load(kbase + j * n + offs, mask=inb, other=0.0)
                # acc = C[:t, j]ᵀ C[:t, :]. Rows >= t of the zero-initialised scratch are still 0, so whole
                # chunks of rows load with no row mask; columns >= LD are not loaded (their values are
                # undefined and never used: e is zeroed outside the valid columns).
                acc2 = tl.zeros([BLOCK_T, BLOCK_N], dtype=tl.float32)
                for t0 in range(0, t, BLOCK_T):
                    rows = t0 + tl.arange(0, BLOCK_T)
                    ct = tl.load(cbase + rows[:, None] * LD + offs[None, :], mask=cmask[None, :])
                    cj = tl.load(cbase + rows * LD + j)
                    acc2 += cj[:, None] * ct
                acc = tl.sum(acc2, 0)
                e = (krow - acc) / tl.sqrt(dmax)
                e = tl.where(valid & (e == e) & (tl.abs(e) < float("inf")), e, 0.0)
                tl.store(cbase + t * LD + offs, e, mask=cmask)
                tl.debug_barrier()
                d2 = d2 - e * e
                d2 = tl.where(d2 == d2, d2, float("-inf"))
            pick = offs == j
            d2 = tl.where(pick, float("-inf"), d2)
            fb = tl.where(pick, float("-inf"), fb)
            tl.store(order_ptr + g * T + t, j.to(tl.int64))
            exhausted = exh.to(tl.int32)


def launch_config(n: int, *, num_warps: int | None = None, tile_per_thread: int | None = None) -> tuple[int, int, int]:
    """``(BLOCK_N, BLOCK_T, num_warps)`` for blocks of ``n`` items: each chunk of ``C`` rows holds about
    ``tile_per_thread`` elements per thread (64 with up to 8 warps, 16 with 16 warps, where registers are
    scarcer); the accumulator tile doubles that. Defaults from a sweep on an H100 (bench_ops_gpu.py):
    4 warps up to 256 columns, 8 warps up to 1024, 16 beyond."""
    block_n = max(16, triton.next_power_of_2(n))
    if num_warps is None:
        num_warps = 4 if block_n <= 256 else (8 if block_n <= 1024 else 16)
    if tile_per_thread is None:
        tile_per_thread = 16 if num_warps >= 16 else 64
    block_t = max(2, min(128, tile_per_thread * 32 * num_warps // block_n))
    return block_n, triton.next_power_of_2(block_t), num_warps


def greedy_dpp_triton(
    kernel: Tensor,
    valid: Tensor,
    budgets: Tensor,
    fallback: Tensor,
    steps: int,
    eps: float,
    *,
    num_warps: int | None = None,
    tile_per_thread: int | None = None,
) -> Tensor:
    """Launch the fused kernel. Inputs must be prepared by :func:`hieravid.ops.dpp.greedy_map_dpp_order`:
    ``kernel`` float32 contiguous ``[G, n, n]``, ``valid`` ``[G, n]``, ``budgets`` ``[G]`` already clamped
    to the valid counts, ``fallback`` float32 ``[G, n]`` finite. Returns ``[G, steps]`` int64 (-1 padded).
    """
    G, n, _ = kernel.shape
    order = torch.full((G, steps), -1, dtype=torch.int64, device=kernel.device)
    if G == 0 or n == 0 or steps == 0:
        return order
    block_n, block_t, num_warps = launch_config(n, num_warps=num_warps, tile_per_thread=tile_per_thread)
    rows = (steps + block_t - 1) // block_t * block_t
    ld = (n + 15) // 16 * 16
    scratch = torch.zeros((G, rows, ld), dtype=torch.float32, device=kernel.device)
    # Triton launches on the current CUDA device's stream, not the tensors' device: on a model split over GPUs
    # the stage may run on another GPU, where launching from the current one would race with that GPU's stream.
    with torch.cuda.device(kernel.device):
        _greedy_dpp_kernel[(G,)](
            kernel,
            valid.to(torch.int8).contiguous(),
            budgets.to(torch.int32).contiguous(),
            fallback,
            scratch,
            order,
            n,
            steps,
            rows,
            ld,
            float(eps),
            BLOCK_N=block_n,
            BLOCK_T=block_t,
            num_warps=num_warps,
        )
    return order
