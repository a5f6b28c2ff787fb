"""Frame-level DPP selection (SPEC §2.2 steps 3–4), batched over all segments of a stage.

Each segment (or block of a segment, see ``max_block``) gets its own kernel
``K = diag(r) · X Xᵀ · diag(r)`` with ``X`` the L2-normalised float32 rows of its tokens; the full
``N × N`` kernel is never built. All blocks are packed into ``[B, n_blk]`` padded tensors and the greedy
MAP inference of Chen et al. (NeurIPS 2018, incremental Cholesky) runs for every block at once:

* on CUDA, when Triton is importable, as one fused kernel launch (one program per block);
* otherwise as a batched PyTorch loop over greedy steps (vectorised over blocks, no host sync per
  step).

Tie-breaking: each step picks the lowest index among equal maximal ``d²``. Numerical exhaustion: when
the largest remaining ``d²`` of a block is ``<= eps · max(diag K)`` (or not finite), that block is
*exhausted* for good and the rest of its budget is filled by the highest fallback score (relevance)
among unselected valid tokens, lowest index first among ties. No NaN ever reaches a decision and no
token is picked twice.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from hieravid.ops._util import NORM_EPS, sanitize_scores
from hieravid.ops.budget import SegmentBudgets, as_budgets

__all__ = [
    "DEFAULT_MAX_BLOCK",
    "DPP_EPS",
    "DppBackend",
    "DppBlocks",
    "dpp_select",
    "greedy_map_dpp",
    "greedy_map_dpp_order",
    "plan_dpp_blocks",
    "triton_available",
]

#: Default cap on the number of tokens in one DPP block (larger segments are split, see :func:`dpp_select`).
DEFAULT_MAX_BLOCK = 512

#: Default relative exhaustion threshold of the greedy inference: a block is exhausted when its largest
#: remaining ``d²`` is at most ``DPP_EPS · max(diag K)``. Chosen well above float32 round-off in ``d²``
#: (about ``steps · 6e-8`` relative), so that float32 and exact arithmetic agree on when to stop.
DPP_EPS = 1e-4

DppBackend = Literal["auto", "triton", "torch"]


def triton_available() -> bool:
    """Whether Triton can be imported (checked without importing it)."""
    return importlib.util.find_spec("triton") is not None


def _resolve_backend(backend: str, device: torch.device) -> str:
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"unknown DPP backend {backend!r}; expected auto, triton or torch")
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    if backend == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "torch"
    if backend == "triton":
        if not triton_available():
            raise RuntimeError("backend='triton' needs the triton package")
        if device.type != "cuda" and not interpret:
            raise RuntimeError("backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1)")
    return backend


def _greedy_torch(kernel: Tensor, valid: Tensor, budgets: Tensor, fallback: Tensor, steps: int, eps: float) -> Tensor:
    """Batched greedy MAP loop in plain PyTorch (reference for the fused kernel). Returns ``[G, steps]``."""
    G, n, _ = kernel.shape
    device = kernel.device
    neg_inf = float("-inf")
    rows = torch.arange(G, device=device)
    cols = torch.arange(n, device=device)
    diag = torch.diagonal(kernel, dim1=1, dim2=2)
    ok = valid & ~torch.isnan(diag)
    diag = torch.where(ok, diag, torch.zeros_like(diag))
    thr = eps * diag.amax(dim=1).clamp_min(0.0)
    d2 = torch.where(ok, diag, torch.full_like(diag, neg_inf))
    fb = torch.where(valid, fallback, torch.full_like(fallback, neg_inf))
    C = kernel.new_zeros((G, steps, n))
    order = torch.full((G, steps), -1, dtype=torch.int64, device=device)
    exhausted = torch.zeros(G, dtype=torch.bool, device=device)
    for t in range(steps):
        active = budgets > t
        jd = d2.argmax(dim=1)
        dmax = d2.gather(1, jd.unsqueeze(1)).squeeze(1)
        exh = exhausted | ~(dmax > thr)
        jf = fb.argmax(dim=1)
        j = torch.where(exh, jf, jd)
        krow = kernel[rows, j]  # [G, n]
        if t > 0:
            cj = C[rows, :t, j]  # [G, t]
            krow = krow - torch.bmm(cj.unsqueeze(1), C[:, :t]).squeeze(1)
        e = krow * torch.rsqrt(torch.where(exh, torch.ones_like(dmax), dmax)).unsqueeze(1)
        upd = (active & ~exh).unsqueeze(1) & valid & torch.isfinite(e)
        e = torch.where(upd, e, torch.zeros_like(e))
        C[:, t] = e
        d2 = d2 - e * e
        d2 = torch.where(torch.isnan(d2), torch.full_like(d2, neg_inf), d2)
        pick = (cols.unsqueeze(0) == j.unsqueeze(1)) & active.unsqueeze(1)
        d2 = d2.masked_fill(pick, neg_inf)
        fb = fb.masked_fill(pick, neg_inf)
        order[:, t] = torch.where(active, j, torch.full_like(j, -1))
        exhausted = exh & active
    return order


def _run_greedy(
    kernel: Tensor, valid: Tensor, budgets: Tensor, fallback: Tensor, steps: int, eps: float, mode: str
) -> Tensor:
    """Greedy inference on prepared inputs (float32 contiguous kernel, bool valid, int64 budgets clamped
    to the valid counts, finite float32 fallback)."""
    G, n, _ = kernel.shape
    if G == 0 or n == 0 or steps == 0:
        return torch.full((G, steps), -1, dtype=torch.int64, device=kernel.device)
    if mode == "triton":
        from hieravid.ops._triton_dpp import greedy_dpp_triton

        return greedy_dpp_triton(kernel, valid, budgets, fallback, steps, eps)
    return _greedy_torch(kernel, valid, budgets, fallback, steps, eps)


def greedy_map_dpp_order(
    kernel: Tensor,
    valid: Tensor,
    budgets: Tensor,
    fallback_scores: Tensor,
    *,
    eps: float = DPP_EPS,
    max_steps: int | None = None,
    backend: DppBackend = "auto",
) -> Tensor:
    """Greedy DPP MAP inference for a batch of kernels; returns the selection order.

    Per block ``g``: ``d² = diag K``; each step picks ``j = argmax d²`` over valid unselected items
    (lowest index among ties), computes ``e = (K[j, :] - Cᵀ C[:, j]) / sqrt(d²[j])``, appends ``e`` to
    ``C``, sets ``d² -= e²`` and removes ``j``; ``budgets[g]`` steps (clamped to the number of valid
    items). Exhaustion (largest ``d² <= eps·max(diag K)``) switches the block to the fallback for the rest
    of its budget (see the module docstring).

    Args:
        kernel: ``[G, n, n]`` symmetric PSD kernels (converted to float32).
        valid: ``[G, n]`` bool, False for padding.
        budgets: ``[G]`` int number of items to select per block.
        fallback_scores: ``[G, n]`` scores used after exhaustion (higher first; NaN counts as lowest).
        eps: relative exhaustion threshold.
        max_steps: width of the returned order; must be ``>= max(budgets)`` after clamping. When omitted
            it is read from the budgets (one host sync).
        backend: ``"auto"`` (Triton on CUDA when importable, else PyTorch), ``"triton"`` or ``"torch"``.

    Returns:
        ``[G, max_steps]`` int64: the item picked at each step, ``-1`` after the block's budget.
    """
    if kernel.dim() != 3 or kernel.shape[1] != kernel.shape[2]:
        raise ValueError(f"kernel must have shape [G, n, n], got {tuple(kernel.shape)}")
    G, n, _ = kernel.shape
    if valid.shape != (G, n) or fallback_scores.shape != (G, n) or budgets.shape != (G,):
        raise ValueError(
            f"valid {tuple(valid.shape)}, fallback_scores {tuple(fallback_scores.shape)} and budgets "
            f"{tuple(budgets.shape)} must be [G, n], [G, n] and [G] for kernel {tuple(kernel.shape)}"
        )
    device = kernel.device
    valid = valid.to(device=device, dtype=torch.bool)
    b = torch.minimum(budgets.to(device=device, dtype=torch.int64, non_blocking=True).clamp_min(0), valid.sum(dim=1))
    steps = int(b.max()) if (max_steps is None and G > 0) else int(max_steps or 0)
    if steps < 0:
        raise ValueError(f"max_steps must be >= 0, got {steps}")
    kf = kernel.to(torch.float32).contiguous()
    fb = sanitize_scores(fallback_scores.to(device)).contiguous()
    return _run_greedy(kf, valid, b, fb, steps, eps, _resolve_backend(backend, device))


def _order_to_mask(order: Tensor, n: int) -> Tensor:
    G = order.shape[0]
    mask = torch.zeros((G, n + 1), dtype=torch.bool, device=order.device)
    idx = torch.where(order < 0, torch.full_like(order, n), order)
    mask.scatter_(1, idx, True)
    return mask[:, :n]


def greedy_map_dpp(
    kernel: Tensor,
    valid: Tensor,
    budgets: Tensor,
    fallback_scores: Tensor,
    *,
    eps: float = DPP_EPS,
    max_steps: int | None = None,
    backend: DppBackend = "auto",
) -> Tensor:
    """Greedy DPP MAP inference for a batch of kernels; returns the selection mask.

    Same arguments and semantics as :func:`greedy_map_dpp_order`.

    Returns:
        ``[G, n]`` bool; row ``g`` has exactly ``min(budgets[g], valid[g].sum())`` True entries, all valid.
    """
    order = greedy_map_dpp_order(kernel, valid, budgets, fallback_scores, eps=eps, max_steps=max_steps, backend=backend)
    return _order_to_mask(order, kernel.shape[1])


@dataclass
class DppBlocks:
    """The block plan of one DPP selection, computed on the host from the segment sizes and budgets (see
    :func:`dpp_select`): blocks, their size and budgets. ``device`` is its uploaded copy, when made ahead."""

    max_block: int | None
    total: int
    blocks: int
    block_size: int
    steps: int
    split: bool
    small: Tensor
    """Host int64: segment starts, block offsets, blocks per segment, sizes (min 1) — ``[G]`` each — then the
    ``[blocks]`` block budgets."""
    device: Tensor | None = None

    def on(self, device: torch.device) -> Tensor:
        if self.device is not None and self.device.device == device:
            return self.device
        # Host-to-device without waiting for the device (the host tensor is not reused afterwards).
        return self.small.to(device, non_blocking=True)


def plan_dpp_blocks(counts: Tensor, budgets: Tensor, max_block: int | None) -> DppBlocks:
    """The block plan for segments of ``counts`` tokens keeping ``budgets`` (both ``[G]`` int64 on the host, budgets
    already clamped to the counts). Plain integer arithmetic on Python ints: the plan is a few numbers per segment,
    and tensor operations on them cost the host ~10 µs each (the plan runs for every stage before a prefill)."""
    sizes, keeps = counts.tolist(), budgets.tolist()
    n = sum(sizes)
    mb = max(n, 1) if max_block is None else max(1, min(int(max_block), max(n, 1)))
    seg_start: list[int] = []
    block_offset: list[int] = []
    per_segment: list[int] = []
    block_budget: list[int] = []
    start = offset = block_size = 0
    for size, keep in zip(sizes, keeps):
        blocks = (size + mb - 1) // mb  # 0 when empty
        seg_start.append(start)
        block_offset.append(offset)
        per_segment.append(blocks)
        for block in range(blocks):
            first, end = (block * size) // blocks, ((block + 1) * size) // blocks
            block_budget.append((keep * end) // size - (keep * first) // size)  # cumulative floors: sum to keep
            block_size = max(block_size, end - first)
        start += size
        offset += blocks
    small = torch.tensor(
        seg_start + block_offset + per_segment + [max(size, 1) for size in sizes] + block_budget, dtype=torch.int64
    )
    split = any(blocks > 1 for blocks in per_segment)
    return DppBlocks(max_block, sum(keeps), offset, block_size, max(block_budget, default=0), split, small)


def dpp_select(
    features: Tensor,
    relevance: Tensor,
    segment_ids: Tensor,
    budgets: Tensor | SegmentBudgets,
    *,
    max_block: int | None = DEFAULT_MAX_BLOCK,
    eps: float = DPP_EPS,
    backend: DppBackend = "auto",
    counts: Tensor | None = None,
) -> Tensor:
    """Select ``budgets[g]`` tokens per segment by greedy DPP MAP inference, all segments at once.

    Kernel per segment only: rows of ``features`` are L2-normalised in float32 (norm clamped at 1e-12, so
    zero vectors give zero rows, never NaN; NaN/inf features count as 0), ``S = X Xᵀ`` with its diagonal set
    to exactly 1 (0 for zero rows) so that equal relevances give exactly equal initial ``d²`` and the
    documented lowest-index tie-break applies, ``K = diag(r) S diag(r)`` with ``r = relevance``
    (NaN → 0). The fallback after exhaustion is the relevance.

    Blocks: a segment with more than ``max_block`` tokens is split into ``ceil(n_g / max_block)``
    contiguous (in token order within the segment) blocks of near-equal size
    (block ``b`` of ``nb`` holds in-segment positions ``[⌊b·n_g/nb⌋, ⌊(b+1)·n_g/nb⌋)``), and the budget is
    split proportionally with cumulative floors (block ``b`` gets ``⌊k_g·e_b/n_g⌋ - ⌊k_g·s_b/n_g⌋``,
    which sum to ``k_g``). This bounds the worst-case cost (greedy DPP is cubic in the block size);
    ``None`` disables splitting.

    Budgets above a segment's size are clamped to it; empty segments and zero budgets select nothing.
    One host synchronisation per call sizes the padded blocks and the output; none when ``counts`` and
    ``budgets`` are given as CPU tensors or ``budgets`` is a :class:`~hieravid.ops.budget.SegmentBudgets`; nothing
    is copied to the device either when it carries its device copy and the block plan (``prepared["dpp"]``,
    :func:`plan_dpp_blocks`) uploaded ahead.

    Args:
        features: ``[n, D]`` hidden states of the stage's video tokens (any float dtype).
        relevance: ``[n]`` relevance (quality) scores, e.g. from :func:`normalize_relevance`.
        segment_ids: ``[n]`` int segment id of each token in ``[0, G)`` (need not be sorted).
        budgets: ``[G]`` int tokens to keep per segment.
        max_block: block size cap (default :data:`DEFAULT_MAX_BLOCK`), or None.
        eps: relative exhaustion threshold of the greedy inference.
        backend: greedy inference backend, see :func:`greedy_map_dpp_order`.
        counts: optional ``[G]`` token count of each segment, if the caller already has it (must equal
            the counts of ``segment_ids``).

    Returns:
        ``[k]`` int64 ascending indices into the ``n`` tokens, ``k = Σ_g min(budgets[g], n_g)``.
    """
    if features.dim() != 2:
        raise ValueError(f"features must have shape [n, D], got {tuple(features.shape)}")
    n, D = features.shape
    if relevance.shape != (n,) or segment_ids.shape != (n,):
        raise ValueError(f"relevance {tuple(relevance.shape)} and segment_ids {tuple(segment_ids.shape)} must be [{n}]")
    if not isinstance(budgets, SegmentBudgets) and budgets.dim() != 1:
        raise ValueError(f"budgets must be 1-D, got shape {tuple(budgets.shape)}")
    if max_block is not None and max_block < 1:
        raise ValueError(f"max_block must be >= 1 or None, got {max_block}")
    device = features.device
    known = as_budgets(budgets, counts)
    G = (known.host if known is not None else budgets).shape[0]
    if n == 0 or G == 0:
        return torch.zeros(0, dtype=torch.int64, device=device)
    seg = segment_ids.to(device=device, dtype=torch.int64)
    if known is None:
        dev_counts = torch.zeros(G, dtype=torch.int64, device=device).index_add_(0, seg, torch.ones_like(seg))
        k = torch.minimum(budgets.to(device=device, dtype=torch.int64).clamp_min(0), dev_counts)
        meta = torch.cat([dev_counts, k]).cpu()  # the one host sync: G counts and G clamped budgets
        known = SegmentBudgets(meta[:G], meta[G:])
    blocks = known.prepared.get("dpp")
    if blocks is None or blocks.max_block != max_block:
        blocks = plan_dpp_blocks(known.counts, known.host, max_block)
    if blocks.total == 0:
        return torch.zeros(0, dtype=torch.int64, device=device)
    small = blocks.on(device)
    seg_start, block_offset, nb, counts_safe = small[:G], small[G : 2 * G], small[2 * G : 3 * G], small[3 * G : 4 * G]
    block_budget = small[4 * G :]
    B, n_blk, steps, split, total = blocks.blocks, blocks.block_size, blocks.steps, blocks.split, blocks.total

    # Position of every token inside its segment (stable by token index), then its block and slot.
    order = torch.sort(seg, stable=True).indices
    pos = torch.empty_like(seg)
    pos[order] = torch.arange(n, device=device) - seg_start[seg[order]]
    if split:
        n_tok, nb_tok = counts_safe[seg], nb[seg]
        b_local = ((pos + 1) * nb_tok - 1) // n_tok
        slot = pos - (b_local * n_tok) // nb_tok
        block_id = block_offset[seg] + b_local
    else:
        slot, block_id = pos, block_offset[seg]

    # Packed rows r_i · x_i / |x_i| (float32), so that one batched product gives K = diag(r) S diag(r);
    # the diagonal is then set exactly to r_i² (0 for zero rows).
    x = torch.nan_to_num(features.float(), nan=0.0, posinf=0.0, neginf=0.0)
    norms = torch.linalg.vector_norm(x, dim=-1)
    r = torch.nan_to_num(relevance.to(device=device, dtype=torch.float32), nan=0.0, posinf=0.0, neginf=0.0)
    xp = torch.zeros((B, n_blk, D), dtype=torch.float32, device=device)
    xp[block_id, slot] = x * (r / norms.clamp_min(NORM_EPS)).unsqueeze(1)
    aux = torch.stack([r, torch.where(norms > 0, r * r, 0.0), torch.arange(n, device=device, dtype=torch.float32)], 1)
    auxp = torch.full((B, n_blk, 3), -1.0, dtype=torch.float32, device=device)
    auxp[block_id, slot] = aux
    token = auxp[:, :, 2].long()  # token index of every slot, -1 for padding (exact below 2**24 tokens)
    valid = token >= 0
    kernel = torch.bmm(xp, xp.transpose(1, 2))
    kernel.diagonal(dim1=1, dim2=2).copy_(auxp[:, :, 1])

    sel = _run_greedy(
        kernel, valid, block_budget, auxp[:, :, 0].contiguous(), steps, eps, _resolve_backend(backend, device)
    )
    picked = torch.where(sel >= 0, token.gather(1, sel.clamp_min(0)), n).flatten()
    return torch.sort(picked).values[:total]
