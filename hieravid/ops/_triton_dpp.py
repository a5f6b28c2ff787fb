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
costs one exchange instead: every program publishes its best local candidates (largest ``d²``, largest fallback
score) as 64-bit words tagged with the step, after a release fence that makes its earlier rows of ``C`` visible,
then reads the block's ``P`` words until all carry the step's tag. All programs pick the same winner — the largest
value, lowest column among ties, exactly the one-program choice — and read its column ``C[:t, j]`` from L2. The
largest diagonal entry (for the exhaustion threshold) is exchanged once the same way. Waiting for the other
programs needs all ``G·P`` programs resident at once, so the launcher keeps ``G·P`` at or below the number of SMs.
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
#: Largest block a split can serve: a published candidate packs its column into 16 bits.
MAX_SPLIT_COLUMNS = 1 << 16


@triton.jit
def _fence(x):
    """``x``, returned by a ``fence.acq_rel.gpu``: this thread's earlier stores (and those it saw through a CTA
    barrier) are visible GPU-wide before any store issued after the fence."""
    return tl.inline_asm_elementwise(
        "fence.acq_rel.gpu;\n\tmov.b32 $0, $1;", "=r,r", [x], dtype=tl.int32, is_pure=False, pack=1
    )


@triton.jit
def _slot(cand_ptr, g, P, p, t, kind):
    """Where program ``p`` of block ``g`` publishes its word of ``kind`` (0: best d², 1: best fallback score, 2: its
    column's entry in the last row of ``C``, 3: largest diagonal entry) for step ``t``. Two buffers alternate: a
    program runs at most one step ahead of the slowest of its block."""
    return cand_ptr + ((g * 2 + t % 2) * 4 + kind) * P + p


@triton.jit
def _publish(slot, tag, column, value):
    """Store ``value`` (float32) and its ``column`` (< 2**16) as one 64-bit word tagged with ``tag`` (< 2**16): a
    reader sees tag and payload together."""
    bits = value.to(tl.int32, bitcast=True).to(tl.int64) & 0xFFFFFFFF
    tl.store(slot, (tag.to(tl.int64) << 48) | (column.to(tl.int64) << 32) | bits)


@triton.jit
def _not_tagged(words, present, tag):
    return tl.sum(tl.where(present & (((words >> 48) & 0xFFFF) != tag), 1, 0), 0)


@triton.jit
def _unpack(words, present):
    values = (words & 0xFFFFFFFF).to(tl.int32).to(tl.float32, bitcast=True)
    return tl.where(present, values, float("-inf")), ((words >> 32) & 0xFFFF).to(tl.int32)


@triton.jit
def _gather(slots_a, slots_b, slots_c, present, tag):
    """The words at three ``[BLOCK_P]`` slot vectors (``present`` masks the block's programs), read until every one
    carries ``tag``: ``(values, columns)`` of each, ``-inf`` and 0 where not present."""
    words_a = tl.load(slots_a, mask=present, other=0, volatile=True)
    words_b = tl.load(slots_b, mask=present, other=0, volatile=True)
    words_c = tl.load(slots_c, mask=present, other=0, volatile=True)
    waiting = _not_tagged(words_a, present, tag) + _not_tagged(words_b, present, tag)
    waiting += _not_tagged(words_c, present, tag)
    while waiting > 0:
        words_a = tl.load(slots_a, mask=present, other=0, volatile=True)
        words_b = tl.load(slots_b, mask=present, other=0, volatile=True)
        words_c = tl.load(slots_c, mask=present, other=0, volatile=True)
        waiting = _not_tagged(words_a, present, tag) + _not_tagged(words_b, present, tag)
        waiting += _not_tagged(words_c, present, tag)
    values_a, columns_a = _unpack(words_a, present)
    values_b, columns_b = _unpack(words_b, present)
    values_c, _columns_c = _unpack(words_c, present)
    return values_a, columns_a, values_b, columns_b, values_c


@triton.jit
def _greedy_dpp_kernel(
    K_ptr,
    valid_ptr,
    budget_ptr,
    fb_ptr,
    C_ptr,
    order_ptr,
    cand_ptr,
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
    C_IN_REGISTERS: tl.constexpr,
    BLOCK_S: tl.constexpr,
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
    if C_IN_REGISTERS:  # this program's columns of C, all steps: the scratch only serves the other programs
        srow = tl.arange(0, BLOCK_S)
        c_own = tl.zeros([BLOCK_S, BLOCK_W], dtype=tl.float32)
    e_last = tl.zeros([BLOCK_W], dtype=tl.float32)  # this program's entries of the last row of C
    if P > 1:
        if steps > 0:  # the exhaustion threshold needs the largest diagonal entry of the whole block
            first = steps * 0 + 1
            _publish(_slot(cand_ptr, g, P, p, 0, 3), first, first * 0, diag_max)
            q = tl.arange(0, BLOCK_P)
            theirs = _slot(cand_ptr, g, P, q, 0, 3)
            diag_all, _c, _v, _c2, _v2 = _gather(theirs, theirs, theirs, q < P, first)
            thr = eps * tl.maximum(tl.max(diag_all, 0), 0.0)
    for t in range(0, T):
        if t < steps:
            dmax, jd = tl.max(d2, 0, return_indices=True, return_indices_tie_break_left=True)
            c_last = dmax * 0.0
            if P > 1:
                c_last = tl.sum(tl.where(lane == jd, e_last, 0.0), 0)  # C[t - 1, jd]
            jd = jd + p * W
            jf = jd  # one program: the fallback's argmax is taken only once the block is exhausted
            if P > 1:
                # Publish this slice's candidates tagged with the step, and read the block's other programs' ones
                # until all carry this step's tag; every program then takes the same best candidate. The winner's
                # entry in row t - 1 of C travels in the exchange: that row may not be visible yet (see below).
                fmax, jf = tl.max(fb, 0, return_indices=True, return_indices_tie_break_left=True)
                jf = jf + p * W
                tag = t + 1
                _publish(_slot(cand_ptr, g, P, p, t, 0), tag, jd, dmax)
                _publish(_slot(cand_ptr, g, P, p, t, 1), tag, jf, fmax)
                _publish(_slot(cand_ptr, g, P, p, t, 2), tag, jd * 0, c_last)
                q = tl.arange(0, BLOCK_P)
                d_all, jd_all, f_all, jf_all, c_all = _gather(
                    _slot(cand_ptr, g, P, q, t, 0),
                    _slot(cand_ptr, g, P, q, t, 1),
                    _slot(cand_ptr, g, P, q, t, 2),
                    q < P,
                    tag,
                )
                # Slices are in column order and each reports its lowest column among ties: the lowest program
                # among equal maxima holds the lowest column.
                dmax, qd = tl.max(d_all, 0, return_indices=True, return_indices_tie_break_left=True)
                fmax, qf = tl.max(f_all, 0, return_indices=True, return_indices_tie_break_left=True)
                jd = tl.sum(tl.where(q == qd, jd_all, 0), 0)
                jf = tl.sum(tl.where(q == qf, jf_all, 0), 0)
                c_last = tl.sum(tl.where(q == qd, c_all, 0.0), 0)
                # Row t - 1 of C was stored at the end of the last step, long enough ago for this fence to cost
                # little; it orders that row before the next step's words, whose readers take it from the scratch.
                jd = _fence(jd)
            exh = (exhausted != 0) | (dmax <= thr) | (dmax != dmax)
            if exh:
                if P == 1:
                    _fmax, jf = tl.max(fb, 0, return_indices=True, return_indices_tie_break_left=True)
                j = jf
                e_last = tl.zeros([BLOCK_W], dtype=tl.float32)
            else:
                j = jd
                krow = tl.load(kbase + j * n + cols, mask=inb, other=0.0)
                # acc = C[:t, j]ᵀ C[:t, slice]; column j may belong to another program of the block and is read
                # from L2 (.cg), never from a stale L1 line. Its row t - 1 comes from the exchange; rows >= t of
                # the scratch may already hold a faster program's next row, but this slice's rows >= t are 0.
                if C_IN_REGISTERS:
                    cj = tl.load(cbase + srow * LD + j, mask=srow < t - 1, other=0.0, cache_modifier=".cg")
                    cj = tl.where(srow == t - 1, c_last, cj)
                    acc = tl.sum(cj[:, None] * c_own, 0)
                else:
                    # Rows >= t of the zero-initialised scratch are 0 for this slice, so whole chunks of rows load
                    # with no row mask.
                    acc2 = tl.zeros([BLOCK_T, BLOCK_W], dtype=tl.float32)
                    for t0 in range(0, t, BLOCK_T):
                        rows = t0 + tl.arange(0, BLOCK_T)
                        ct = tl.load(cbase + rows[:, None] * LD + cols[None, :], mask=own[None, :])
                        cj = tl.load(cbase + rows * LD + j, cache_modifier=".cg")
                        if P > 1:
                            cj = tl.where(rows == t - 1, c_last, cj)
                        acc2 += cj[:, None] * ct
                    acc = tl.sum(acc2, 0)
                e = (krow - acc) / tl.sqrt(dmax)
                e = tl.where(valid & (e == e) & (tl.abs(e) < float("inf")), e, 0.0)
                tl.store(cbase + t * LD + cols, e, mask=own)
                if C_IN_REGISTERS:
                    c_own = tl.where(srow[:, None] == t, e[None, :], c_own)
                e_last = e
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
    if device.type != "cuda" or blocks == 0 or n >= MAX_SPLIT_COLUMNS:
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
    to 256 columns, 8 up to 1024, 16 beyond (a sweep on an H100, bench_ops_gpu.py); split blocks: 4 warps."""
    if n >= MAX_SPLIT_COLUMNS:
        programs = 1
    width = -(-n // max(1, programs))
    width = max(16, -(-width // 16) * 16)
    programs = max(1, -(-n // width))
    block_w = triton.next_power_of_2(width)
    if num_warps is None:
        num_warps = 4 if (programs > 1 or block_w <= 256) else (8 if block_w <= 1024 else 16)
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
    c_in_registers: bool | None = None,
) -> Tensor:
    """Launch the fused kernel. Inputs must be prepared by :func:`hieravid.ops.dpp.greedy_map_dpp_order`:
    ``kernel`` float32 contiguous ``[G, n, n]``, ``valid`` ``[G, n]``, ``budgets`` ``[G]`` already clamped
    to the valid counts, ``fallback`` float32 ``[G, n]`` finite. ``programs`` per block defaults to
    :func:`programs_per_block`. A split block keeps its programs' columns of ``C`` in registers when they fit
    (``c_in_registers=None``: at most 64 floats per thread). Returns ``[G, steps]`` int64 (-1 padded).
    """
    G, n, _ = kernel.shape
    order = torch.full((G, steps), -1, dtype=torch.int64, device=kernel.device)
    if G == 0 or n == 0 or steps == 0:
        return order
    if programs is None:
        programs = programs_per_block(G, n, kernel.device)
    P, width, block_w, block_t, num_warps = launch_config(
        n, programs, num_warps=num_warps, tile_per_thread=tile_per_thread
    )
    rows = (steps + block_t - 1) // block_t * block_t
    ld = P * width
    scratch = torch.zeros((G, rows, ld), dtype=torch.float32, device=kernel.device)
    # Tags start at 1, so zeroed slots read as "not yet published".
    candidates = torch.zeros((G, 2, 4, P), dtype=torch.int64, device=kernel.device)
    block_s = triton.next_power_of_2(steps)
    if c_in_registers is None:
        c_in_registers = block_s * block_w <= 64 * 32 * num_warps
    c_in_registers = c_in_registers and P > 1
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
            C_IN_REGISTERS=c_in_registers,
            BLOCK_S=block_s,
            num_warps=num_warps,
        )
    return order
