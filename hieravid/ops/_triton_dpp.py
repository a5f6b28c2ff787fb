"""Fused Triton kernel for batched greedy DPP MAP inference (private; imported lazily on CUDA).

The whole greedy loop of Chen et al. (2018) runs inside one launch. Each block (segment) is served by ``P``
programs, each owning a slice of ``W`` columns (``P = 1``: one program holds the whole block). ``d²``, the relevance
fallback scores and the selection state of a slice live in registers; the Cholesky rows ``C`` live in a global
scratch buffer ``[G, T, LD]`` float32 (small enough to stay in L2), ``LD = P·W`` with ``W`` a multiple of 16 so
that column masks are constant over 16 columns and loads stay 16 bytes wide. The scratch is zero-initialised and
has a whole number of ``BLOCK_T``-row chunks, so the chunks of the per-step matrix–vector product
``C[:t, j]ᵀ C[:t, slice]`` need no row mask; the product is accumulated in a 2-D register tile and reduced once
per step.

Why split a block: the loop is sequential within a block, so with one program per block a 32-frame stage keeps
8 of 132 SMs busy, each re-reading all of ``C`` from L2 at every step. With ``P`` programs per block, each step
costs one exchange instead: every program publishes its best local candidate (and the largest diagonal entry, for
the exhaustion threshold), arrives at a per-block counter (release), waits for the other ``P - 1`` (acquire), and
all of them pick the same winner — the largest ``d²``, lowest column among ties, exactly the one-program choice.
The winner's column ``C[:t, j]`` is read from the scratch, written by its owner at earlier steps. Spinning on a
counter needs all ``G·P`` programs resident at once, so the launcher keeps ``G·P`` at or below the number of SMs.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl
from torch import Tensor

#: Fewest columns a program of a split block owns: below it the exchange costs more than the work it shares.
MIN_COLUMNS_PER_PROGRAM = 16
#: Most programs per block (the exchange reads one candidate per program at every step).
MAX_PROGRAMS_PER_BLOCK = 32
#: Floats per published candidate: d² max, its column, fallback max, its column, largest diagonal entry, padding.
_CANDIDATE_STRIDE = 8


@triton.jit
def _greedy_dpp_kernel(
    K_ptr,
    valid_ptr,
    budget_ptr,
    fb_ptr,
    C_ptr,
    order_ptr,
    cand_ptr,
    arrive_ptr,
    n,
    T,
    TR,
    LD,
    W,
    eps,
    P: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_W: tl.constexpr,
    BLOCK_T: tl.constexpr,
    CAND_STRIDE: tl.constexpr,
):
    pid = tl.program_id(0)
    g = (pid // P).to(tl.int64)
    p = pid % P
    lane = tl.arange(0, BLOCK_W)
    cols = p * W + lane
    own = lane < W  # this program's columns of the scratch (W is a multiple of 16: the mask keeps loads vectorised)
    inb = own & (cols < n)
    valid = (tl.load(valid_ptr + g * n + cols, mask=inb, other=0) != 0) & inb
    kbase = K_ptr + g * n * n
    cbase = C_ptr + g * TR * LD
    diag = tl.load(kbase + cols * (n + 1), mask=valid, other=0.0)
    ok = valid & (diag == diag)
    diag = tl.where(ok, diag, 0.0)
    diag_max = tl.max(diag, 0)
    thr = eps * tl.maximum(diag_max, 0.0)
    d2 = tl.where(ok, diag, float("-inf"))
    fb = tl.load(fb_ptr + g * n + cols, mask=valid, other=float("-inf"))
    fb = tl.where(valid, fb, float("-inf"))
    budget = tl.load(budget_ptr + g)
    steps = tl.minimum(budget, T)
    exhausted = budget * 0
    for t in range(0, T):
        if t < steps:
            dmax, jd = tl.max(d2, 0, return_indices=True, return_indices_tie_break_left=True)
            jd = jd + p * W
            jf = jd  # one program: the fallback's argmax is taken only once the block is exhausted
            if P > 1:
                fmax, jf = tl.max(fb, 0, return_indices=True, return_indices_tie_break_left=True)
                jf = jf + p * W
                # Publish this slice's candidates, arrive, wait for the block's other programs, take the best.
                # Two slots alternate: a program can be at most one step ahead of the slowest of its block.
                slot = cand_ptr + ((g * 2 + t % 2) * P + p) * CAND_STRIDE
                tl.store(slot, dmax)
                tl.store(slot + 1, jd.to(tl.float32))
                tl.store(slot + 2, fmax)
                tl.store(slot + 3, jf.to(tl.float32))
                tl.store(slot + 4, diag_max)
                tl.debug_barrier()
                tl.atomic_add(arrive_ptr + g, 1, sem="release", scope="gpu")
                seen = tl.atomic_add(arrive_ptr + g, 0, sem="acquire", scope="gpu")
                while seen < P * (t + 1):
                    seen = tl.atomic_add(arrive_ptr + g, 0, sem="acquire", scope="gpu")
                q = tl.arange(0, BLOCK_P)
                qm = q < P
                slots = cand_ptr + ((g * 2 + t % 2) * P + q) * CAND_STRIDE
                d_all = tl.load(slots, mask=qm, other=float("-inf"), volatile=True)
                jd_all = tl.load(slots + 1, mask=qm, other=0.0, volatile=True)
                f_all = tl.load(slots + 2, mask=qm, other=float("-inf"), volatile=True)
                jf_all = tl.load(slots + 3, mask=qm, other=0.0, volatile=True)
                diag_all = tl.load(slots + 4, mask=qm, other=0.0, volatile=True)
                # Slices are in column order and each reports its lowest column among ties: the lowest program
                # among equal maxima holds the lowest column.
                dmax, qd = tl.max(d_all, 0, return_indices=True, return_indices_tie_break_left=True)
                fmax, qf = tl.max(f_all, 0, return_indices=True, return_indices_tie_break_left=True)
                jd = tl.sum(tl.where(q == qd, jd_all, 0.0), 0).to(tl.int32)
                jf = tl.sum(tl.where(q == qf, jf_all, 0.0), 0).to(tl.int32)
                thr = eps * tl.maximum(tl.max(diag_all, 0), 0.0)
            exh = (exhausted != 0) | (dmax <= thr) | (dmax != dmax)
            if exh:
                if P == 1:
                    _fmax, jf = tl.max(fb, 0, return_indices=True, return_indices_tie_break_left=True)
                j = jf
            else:
                j = jd
                krow = tl.load(kbase + j * n + cols, mask=inb, other=0.0)
                # acc = C[:t, j]ᵀ C[:t, slice]. This slice's rows >= t of the zero-initialised scratch are still 0,
                # so whole chunks of rows load with no row mask (column j's row t may already hold a faster
                # program's next step: it meets a 0). Column j may belong to another program of the block: it was
                # written before the last exchange and is read from L2 (.cg), never from a stale L1 line.
                acc2 = tl.zeros([BLOCK_T, BLOCK_W], dtype=tl.float32)
                for t0 in range(0, t, BLOCK_T):
                    rows = t0 + tl.arange(0, BLOCK_T)
                    ct = tl.load(cbase + rows[:, None] * LD + cols[None, :], mask=own[None, :])
                    cj = tl.load(cbase + rows * LD + j, cache_modifier=".cg")
                    acc2 += cj[:, None] * ct
                acc = tl.sum(acc2, 0)
                e = (krow - acc) / tl.sqrt(dmax)
                e = tl.where(valid & (e == e) & (tl.abs(e) < float("inf")), e, 0.0)
                tl.store(cbase + t * LD + cols, e, mask=own)
                tl.debug_barrier()
                d2 = d2 - e * e
                d2 = tl.where(d2 == d2, d2, float("-inf"))
            pick = cols == j
            d2 = tl.where(pick, float("-inf"), d2)
            fb = tl.where(pick, float("-inf"), fb)
            if p == 0:
                tl.store(order_ptr + g * T + t, j.to(tl.int64))
            exhausted = exh.to(tl.int32)


def _streaming_multiprocessors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def programs_per_block(blocks: int, n: int, device: torch.device) -> int:
    """How many programs serve each block: as many as the idle SMs allow (all ``blocks · P`` programs must be
    resident at once), each owning at least :data:`MIN_COLUMNS_PER_PROGRAM` columns, at most
    :data:`MAX_PROGRAMS_PER_BLOCK`. One off CUDA (the Triton interpreter runs programs one after another)."""
    if device.type != "cuda" or blocks == 0:
        return 1
    spare = _streaming_multiprocessors(device) // blocks
    return max(1, min(spare, -(-n // MIN_COLUMNS_PER_PROGRAM), MAX_PROGRAMS_PER_BLOCK))


def launch_config(
    n: int, programs: int = 1, *, num_warps: int | None = None, tile_per_thread: int | None = None
) -> tuple[int, int, int, int, int]:
    """``(P, W, BLOCK_W, BLOCK_T, num_warps)`` for blocks of ``n`` items served by about ``programs`` programs each:
    ``W`` columns per program (a multiple of 16; ``P`` is trimmed so that no program is left without columns);
    each chunk of ``C`` rows holds about ``tile_per_thread`` elements per thread (64 with up to 8 warps, 16 with
    16 warps, where registers are scarcer); the accumulator tile doubles that. One program per block: 4 warps up
    to 256 columns, 8 up to 1024, 16 beyond (a sweep on an H100, bench_ops_gpu.py); split blocks: 2 warps (a sweep on
    an H200, bench_dpp_kernel.py)."""
    width = -(-n // max(1, programs))
    width = max(16, -(-width // 16) * 16)
    programs = max(1, -(-n // width))
    block_w = triton.next_power_of_2(width)
    if num_warps is None:
        num_warps = 2 if programs > 1 else (4 if block_w <= 256 else (8 if block_w <= 1024 else 16))
    if tile_per_thread is None:
        tile_per_thread = 16 if num_warps >= 16 else 64
    block_t = max(2, min(256 if programs > 1 else 128, tile_per_thread * 32 * num_warps // block_w))
    return programs, width, block_w, triton.next_power_of_2(block_t), num_warps


def greedy_dpp_triton(
    kernel: Tensor,
    valid: Tensor,
    budgets: Tensor,
    fallback: Tensor,
    steps: int,
    eps: float,
    *,
    programs: int | None = None,
    num_warps: int | None = None,
    tile_per_thread: int | None = None,
) -> Tensor:
    """Launch the fused kernel. Inputs must be prepared by :func:`hieravid.ops.dpp.greedy_map_dpp_order`:
    ``kernel`` float32 contiguous ``[G, n, n]``, ``valid`` ``[G, n]``, ``budgets`` ``[G]`` already clamped
    to the valid counts, ``fallback`` float32 ``[G, n]`` finite. ``programs`` per block defaults to
    :func:`programs_per_block`. Returns ``[G, steps]`` int64 (-1 padded).
    """
    G, n, _ = kernel.shape
    order = torch.full((G, steps), -1, dtype=torch.int64, device=kernel.device)
    if G == 0 or n == 0 or steps == 0:
        return order
    if programs is None or kernel.device.type != "cuda":  # the interpreter runs programs one after another
        programs = programs_per_block(G, n, kernel.device)
    P, width, block_w, block_t, num_warps = launch_config(
        n, programs, num_warps=num_warps, tile_per_thread=tile_per_thread
    )
    rows = (steps + block_t - 1) // block_t * block_t
    ld = P * width
    scratch = torch.zeros((G, rows, ld), dtype=torch.float32, device=kernel.device)
    candidates = torch.empty((G, 2, P, _CANDIDATE_STRIDE), dtype=torch.float32, device=kernel.device)
    arrivals = torch.zeros(G, dtype=torch.int32, device=kernel.device)
    # Triton launches on the current CUDA device's stream, not the tensors' device: on a model split over GPUs
    # the stage may run on another GPU, where launching from the current one would race with that GPU's stream.
    on_its_device = torch.cuda.device(kernel.device) if kernel.device.type == "cuda" else contextlib.nullcontext()
    with on_its_device:
        _greedy_dpp_kernel[(G * P,)](
            kernel,
            valid.to(torch.int8).contiguous(),
            budgets.to(torch.int32).contiguous(),
            fallback,
            scratch,
            order,
            candidates,
            arrivals,
            n,
            steps,
            rows,
            ld,
            width,
            float(eps),
            P=P,
            BLOCK_P=triton.next_power_of_2(P),
            BLOCK_W=block_w,
            BLOCK_T=block_t,
            CAND_STRIDE=_CANDIDATE_STRIDE,
            num_warps=num_warps,
        )
    return order
