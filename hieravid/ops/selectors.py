"""Registry of frame-level token selectors.

Every selector has the signature
``(features, relevance, segment_ids, budgets, *, generator=None, **options) -> LongTensor`` and returns
ascending local indices of the kept tokens, ``min(budgets[g], n_g)`` of them per segment ``g``.
Selectors are vectorised over segments (sorts and cumulative sums, no Python loop over segments). Sizing
the output needs the total ``Σ_g min(budgets[g], n_g)``: the built-in selectors take an optional ``counts``
keyword (``[G]`` segment sizes); with ``counts`` and ``budgets`` on the host they never synchronise with
the device, otherwise they read the total once. :func:`select_tokens` passes ``counts`` to the selectors
that declare it.

Built-in: ``dpp`` (HieraVid), ``topk_relevance``, ``binned_relevance``, ``uniform``, ``random``.
Register more with :func:`register_selector`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import torch
from torch import Tensor

from hieravid.errors import HieravidError
from hieravid.ops._util import accepts_keyword, mask_to_indices, sanitize_scores
from hieravid.ops.dpp import DEFAULT_MAX_BLOCK, DPP_EPS, dpp_select

__all__ = [
    "SELECTORS",
    "Selector",
    "UnknownSelectorError",
    "register_selector",
    "select_tokens",
]


class Selector(Protocol):
    """Signature shared by all selectors."""

    def __call__(
        self,
        features: Tensor,
        relevance: Tensor,
        segment_ids: Tensor,
        budgets: Tensor,
        *,
        generator: torch.Generator | None = None,
        **options: Any,
    ) -> Tensor: ...


class UnknownSelectorError(HieravidError, KeyError):
    """A selector name is not registered."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


#: Registered selectors by name.
SELECTORS: dict[str, Selector] = {}


def register_selector(name: str) -> Callable[[Selector], Selector]:
    """Decorator registering a selector under ``name`` in :data:`SELECTORS` (re-registering replaces)."""
    if not name or not isinstance(name, str):
        raise ValueError(f"selector name must be a non-empty string, got {name!r}")

    def deco(fn: Selector) -> Selector:
        SELECTORS[name] = fn
        return fn

    return deco


def select_tokens(
    name: str,
    features: Tensor,
    relevance: Tensor,
    segment_ids: Tensor,
    budgets: Tensor,
    *,
    generator: torch.Generator | None = None,
    counts: Tensor | None = None,
    **options: Any,
) -> Tensor:
    """Run the selector registered as ``name``.

    ``counts`` (``[G]`` token count of each segment, equal to the counts of ``segment_ids``) is passed on
    to selectors that take a ``counts`` keyword; with host ``counts`` and ``budgets`` they size their
    output without a device sync.

    Raises:
        UnknownSelectorError: (a ``KeyError``) when ``name`` is not registered; the message lists the
            known selectors.
    """
    try:
        fn = SELECTORS[name]
    except KeyError:
        known = ", ".join(sorted(SELECTORS))
        raise UnknownSelectorError(f"unknown selector {name!r}; known selectors: {known}") from None
    if counts is not None and accepts_keyword(fn, "counts"):
        options["counts"] = counts
    return fn(features, relevance, segment_ids, budgets, generator=generator, **options)


def _total(k: Tensor, budgets: Tensor, counts: Tensor | None) -> int:
    """``Σ_g min(budgets[g], n_g)``: on the host from host ``budgets`` and ``counts``, else read from ``k``."""
    if counts is not None and counts.device.type == "cpu" and budgets.device.type == "cpu":
        if counts.shape != budgets.shape:
            raise ValueError(f"counts must have shape {tuple(budgets.shape)}, got {tuple(counts.shape)}")
        return int(torch.minimum(budgets.to(torch.int64).clamp_min(0), counts.to(torch.int64)).sum())
    return int(k.sum())  # one host sync


def _positional_layout(
    name: str,
    features: Tensor,
    relevance: Tensor,
    segment_ids: Tensor,
    budgets: Tensor,
    options: dict[str, Any],
    counts: Tensor | None = None,
) -> tuple[int, torch.device, Tensor, Tensor, int, Tensor, Tensor, Tensor] | None:
    """Shared start of the position-based selectors: validate, then per token its in-segment position,
    segment id, the total budget, its segment's size and budget (None when nothing can be selected)."""
    n = _check(features, relevance, segment_ids, budgets)
    if options:
        raise TypeError(f"{name} selector got unknown options {sorted(options)}")
    device = features.device
    if n == 0 or budgets.shape[0] == 0:
        return None
    host_counts = counts
    pos, counts, k = _segment_layout(segment_ids, budgets, device)
    seg = segment_ids.to(device=device, dtype=torch.int64)
    return n, device, pos, seg, _total(k, budgets, host_counts), counts[seg], k[seg], k


def _segment_layout(segment_ids: Tensor, budgets: Tensor, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """Per-token in-segment position (by token index), segment size, and clamped per-segment budgets."""
    G = budgets.shape[0]
    n = segment_ids.shape[0]
    seg = segment_ids.to(device=device, dtype=torch.int64)
    counts = torch.zeros(G, dtype=torch.int64, device=device).index_add_(0, seg, torch.ones_like(seg))
    k = torch.minimum(budgets.to(device=device, dtype=torch.int64, non_blocking=True).clamp_min(0), counts)
    order = torch.sort(seg, stable=True).indices
    seg_start = torch.cumsum(counts, 0) - counts
    pos = torch.empty_like(seg)
    pos[order] = torch.arange(n, device=device) - seg_start[seg[order]]
    return pos, counts, k


def _check(features: Tensor, relevance: Tensor, segment_ids: Tensor, budgets: Tensor) -> int:
    n = segment_ids.shape[0]
    if segment_ids.dim() != 1 or relevance.shape != (n,) or features.shape[:1] != (n,):
        raise ValueError(
            f"features {tuple(features.shape)}, relevance {tuple(relevance.shape)} and segment_ids "
            f"{tuple(segment_ids.shape)} must agree on the token count"
        )
    if budgets.dim() != 1:
        raise ValueError(f"budgets must be 1-D, got shape {tuple(budgets.shape)}")
    return n


def _topk_by_score(scores: Tensor, segment_ids: Tensor, budgets: Tensor, host_counts: Tensor | None = None) -> Tensor:
    """Per segment, the ``k_g`` highest scores (ties → lower index); ascending indices."""
    device = scores.device
    n = scores.shape[0]
    G = budgets.shape[0]
    if n == 0 or G == 0:
        return torch.zeros(0, dtype=torch.int64, device=device)
    seg = segment_ids.to(device=device, dtype=torch.int64)
    counts = torch.zeros(G, dtype=torch.int64, device=device).index_add_(0, seg, torch.ones_like(seg))
    k = torch.minimum(budgets.to(device=device, dtype=torch.int64, non_blocking=True).clamp_min(0), counts)
    total = _total(k, budgets, host_counts)
    by_score = torch.sort(sanitize_scores(scores), descending=True, stable=True).indices
    by_seg = by_score[torch.sort(seg[by_score], stable=True).indices]  # (segment, score desc, index)
    seg_start = torch.cumsum(counts, 0) - counts
    rank = torch.arange(n, device=device) - seg_start[seg[by_seg]]
    keep = torch.zeros(n, dtype=torch.bool, device=device)
    keep[by_seg] = rank < k[seg[by_seg]]
    return mask_to_indices(keep, total)


@register_selector("dpp")
def dpp_selector(
    features: Tensor,
    relevance: Tensor,
    segment_ids: Tensor,
    budgets: Tensor,
    *,
    generator: torch.Generator | None = None,
    max_block: int | None = DEFAULT_MAX_BLOCK,
    eps: float = DPP_EPS,
    backend: str = "auto",
    counts: Tensor | None = None,
    **options: Any,
) -> Tensor:
    """HieraVid's greedy DPP per segment (:func:`hieravid.ops.dpp.dpp_select`); ``generator`` is unused."""
    _check(features, relevance, segment_ids, budgets)
    if options:
        raise TypeError(f"dpp selector got unknown options {sorted(options)}")
    return dpp_select(
        features,
        relevance,
        segment_ids,
        budgets,
        max_block=max_block,
        eps=eps,
        backend=backend,  # type: ignore[arg-type]
        counts=counts,
    )


@register_selector("topk_relevance")
def topk_relevance_selector(
    features: Tensor,
    relevance: Tensor,
    segment_ids: Tensor,
    budgets: Tensor,
    *,
    generator: torch.Generator | None = None,
    counts: Tensor | None = None,
    **options: Any,
) -> Tensor:
    """Per segment, the ``k_g`` tokens of highest relevance (ties → lower index; NaN lowest)."""
    _check(features, relevance, segment_ids, budgets)
    if options:
        raise TypeError(f"topk_relevance selector got unknown options {sorted(options)}")
    return _topk_by_score(relevance.to(features.device), segment_ids, budgets, counts)


@register_selector("binned_relevance")
def binned_relevance_selector(
    features: Tensor,
    relevance: Tensor,
    segment_ids: Tensor,
    budgets: Tensor,
    *,
    generator: torch.Generator | None = None,
    counts: Tensor | None = None,
    **options: Any,
) -> Tensor:
    """Per segment, split its tokens (in index order) into ``k_g`` contiguous near-equal bins
    (bin ``b`` = in-segment positions ``[⌊b·n_g/k_g⌋, ⌊(b+1)·n_g/k_g⌋)``) and keep the highest-relevance
    token of each bin (ties → lower index)."""
    layout = _positional_layout("binned_relevance", features, relevance, segment_ids, budgets, options, counts)
    if layout is None:
        return torch.zeros(0, dtype=torch.int64, device=features.device)
    n, device, pos, seg, total, n_tok, k_tok, k = layout
    has = k_tok > 0
    b = torch.where(has, ((pos + 1) * k_tok - 1) // n_tok, torch.zeros_like(pos))
    bin_offset = torch.cumsum(k, 0) - k
    bin_id = torch.where(has, bin_offset[seg] + b, torch.full_like(pos, total))  # total = "no bin"
    by_score = torch.sort(sanitize_scores(relevance.to(device)), descending=True, stable=True).indices
    by_bin = by_score[torch.sort(bin_id[by_score], stable=True).indices]
    sorted_bins = bin_id[by_bin]
    first = torch.ones(n, dtype=torch.bool, device=device)
    first[1:] = sorted_bins[1:] != sorted_bins[:-1]
    keep = torch.zeros(n, dtype=torch.bool, device=device)
    keep[by_bin] = first & (sorted_bins < total)
    return mask_to_indices(keep, total)


@register_selector("uniform")
def uniform_selector(
    features: Tensor,
    relevance: Tensor,
    segment_ids: Tensor,
    budgets: Tensor,
    *,
    generator: torch.Generator | None = None,
    counts: Tensor | None = None,
    **options: Any,
) -> Tensor:
    """Per segment, ``k_g`` evenly spaced tokens: in-segment positions ``⌊(2i+1)·n_g / (2k_g)⌋`` for
    ``i = 0..k_g-1`` (the centres of ``k_g`` equal bins). Ignores features and relevance."""
    layout = _positional_layout("uniform", features, relevance, segment_ids, budgets, options, counts)
    if layout is None:
        return torch.zeros(0, dtype=torch.int64, device=features.device)
    _, _, pos, _, total, n_tok, k_tok, _ = layout
    # The centre formula hits ``pos`` for at most one i, which is i_lo or i_lo + 1 below.
    k_safe = k_tok.clamp_min(1)
    i_lo = torch.div(2 * pos * k_safe - n_tok, 2 * n_tok, rounding_mode="floor").clamp_min(0)
    i_hi = i_lo + 1
    hit_lo = (i_lo < k_tok) & (torch.div((2 * i_lo + 1) * n_tok, 2 * k_safe, rounding_mode="floor") == pos)
    hit_hi = (i_hi < k_tok) & (torch.div((2 * i_hi + 1) * n_tok, 2 * k_safe, rounding_mode="floor") == pos)
    hit = hit_lo | hit_hi
    return mask_to_indices(hit & (k_tok > 0), total)


@register_selector("random")
def random_selector(
    features: Tensor,
    relevance: Tensor,
    segment_ids: Tensor,
    budgets: Tensor,
    *,
    generator: torch.Generator | None = None,
    counts: Tensor | None = None,
    **options: Any,
) -> Tensor:
    """Per segment, ``k_g`` tokens chosen uniformly at random without replacement.

    Reproducible through ``generator`` (a ``torch.Generator`` on any device; the draws are moved to the
    tokens' device). Without a generator the global RNG is used.
    """
    n = _check(features, relevance, segment_ids, budgets)
    if options:
        raise TypeError(f"random selector got unknown options {sorted(options)}")
    gen_device = generator.device if generator is not None else features.device
    keys = torch.rand(n, generator=generator, device=gen_device).to(features.device, non_blocking=True)
    return _topk_by_score(keys, segment_ids, budgets, counts)
