"""Frame-level token selectors, each bound to its config class (:mod:`hieravid.policy`).

Every selector has the signature
``(features, relevance, segment_ids, budgets, config, *, counts=None) -> LongTensor`` and returns
ascending local indices of the kept tokens, ``min(budgets[g], n_g)`` of them per segment ``g``.
Selectors are vectorised over segments (sorts and cumulative sums, no Python loop over segments). Sizing
the output needs the total ``Σ_g min(budgets[g], n_g)``: ``budgets`` is a ``[G]`` tensor, or a
:class:`~hieravid.ops.budget.SegmentBudgets` holding the host budgets and counts with their device copy (what the
runtime passes: then a selector neither reads nor copies anything to the device, and the stage can be captured in a
CUDA graph); with host ``counts`` and host ``budgets`` a selector never reads the device, otherwise it reads the
total once.

Built-in: :class:`~hieravid.policy.DppSelector` (HieraVid), ``TopkRelevanceSelector``,
``BinnedRelevanceSelector``, ``UniformSelector``, ``RandomSelector``. A new selector is a config class
(``kind: Literal["name"] = "name"``, deriving from :class:`~hieravid.policy.SelectorConfig`) plus a function
decorated with :func:`register_selector`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch
from torch import Tensor

from hieravid.ops._registry import OperatorRegistry
from hieravid.ops._util import mask_to_indices, sanitize_scores
from hieravid.ops.budget import SegmentBudgets, as_budgets
from hieravid.ops.dpp import dpp_select
from hieravid.policy import (
    BinnedRelevanceSelector,
    DppSelector,
    RandomSelector,
    SelectorConfig,
    TopkRelevanceSelector,
    UniformSelector,
)

__all__ = [
    "SELECTORS",
    "Selector",
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
        config: SelectorConfig,
        *,
        counts: Tensor | None = None,
    ) -> Tensor: ...


#: Selectors by config class.
SELECTORS: OperatorRegistry[Selector] = OperatorRegistry("selector", SelectorConfig, "register_selector")


#: Selectors that take :class:`~hieravid.ops.budget.SegmentBudgets` (host budgets, no device read) as ``budgets``.
_TAKES_SEGMENT_BUDGETS: set[Selector] = set()


def register_selector(
    config_class: type[SelectorConfig], *, segment_budgets: bool = False
) -> Callable[[Selector], Selector]:
    """Decorator binding a selector config class to its operator (re-registering replaces).

    The operator receives ``budgets`` as a ``[G]`` int64 tensor on the tokens' device and ``counts`` as the ``[G]``
    host segment sizes; with ``segment_budgets=True`` it receives a :class:`~hieravid.ops.budget.SegmentBudgets`
    instead (host and device budgets: it can size its output without reading the device).
    """
    bind = SELECTORS.register(config_class)

    def register(operator: Selector) -> Selector:
        (_TAKES_SEGMENT_BUDGETS.add if segment_budgets else _TAKES_SEGMENT_BUDGETS.discard)(operator)
        return bind(operator)

    return register


def select_tokens(
    config: SelectorConfig,
    features: Tensor,
    relevance: Tensor,
    segment_ids: Tensor,
    budgets: Tensor,
    *,
    counts: Tensor | None = None,
) -> Tensor:
    """Run the selector bound to ``config``'s class.

    ``counts`` (``[G]`` token count of each segment, equal to the counts of ``segment_ids``) lets a selector
    size its output without a device sync when it and ``budgets`` are on the host.

    Raises:
        UnregisteredOperatorError: no operator is bound to ``config``'s class.
    """
    operator = SELECTORS.lookup(config)
    if isinstance(budgets, SegmentBudgets) and operator not in _TAKES_SEGMENT_BUDGETS:
        counts, budgets = budgets.counts, budgets.on(features.device)
    return operator(features, relevance, segment_ids, budgets, config, counts=counts)


Budgets = Tensor | SegmentBudgets


def _groups(budgets: Budgets) -> Tensor:
    return budgets.host if isinstance(budgets, SegmentBudgets) else budgets


def _clamped(budgets: Budgets, counts: Tensor | None, sizes: Tensor) -> tuple[Tensor, int]:
    """Per-segment budgets clamped to the segment ``sizes`` (on the tokens' device) and their total: from the host
    when the budgets and counts are known there (no device read), else read once from the device."""
    known = as_budgets(budgets, counts)
    if known is not None:
        return known.on(sizes.device), known.total
    k = torch.minimum(budgets.to(device=sizes.device, dtype=torch.int64).clamp_min(0), sizes)
    return k, int(k.sum())  # one host sync


def _positional_layout(
    features: Tensor,
    relevance: Tensor,
    segment_ids: Tensor,
    budgets: Budgets,
    counts: Tensor | None = None,
) -> tuple[int, torch.device, Tensor, Tensor, int, Tensor, Tensor, Tensor] | None:
    """Shared start of the position-based selectors: validate, then per token its in-segment position,
    segment id, the total budget, its segment's size and budget (None when nothing can be selected)."""
    n = _check(features, relevance, segment_ids, budgets)
    device = features.device
    G = _groups(budgets).shape[0]
    if n == 0 or G == 0:
        return None
    seg = segment_ids.to(device=device, dtype=torch.int64)
    sizes = torch.zeros(G, dtype=torch.int64, device=device).index_add_(0, seg, torch.ones_like(seg))
    k, total = _clamped(budgets, counts, sizes)
    order = torch.sort(seg, stable=True).indices
    seg_start = torch.cumsum(sizes, 0) - sizes
    pos = torch.empty_like(seg)
    pos[order] = torch.arange(n, device=device) - seg_start[seg[order]]
    return n, device, pos, seg, total, sizes[seg], k[seg], k


def _check(features: Tensor, relevance: Tensor, segment_ids: Tensor, budgets: Budgets) -> int:
    n = segment_ids.shape[0]
    if segment_ids.dim() != 1 or relevance.shape != (n,) or features.shape[:1] != (n,):
        raise ValueError(
            f"features {tuple(features.shape)}, relevance {tuple(relevance.shape)} and segment_ids "
            f"{tuple(segment_ids.shape)} must agree on the token count"
        )
    if _groups(budgets).dim() != 1:
        raise ValueError(f"budgets must be 1-D, got shape {tuple(_groups(budgets).shape)}")
    return n


def _topk_by_score(scores: Tensor, segment_ids: Tensor, budgets: Budgets, host_counts: Tensor | None = None) -> Tensor:
    """Per segment, the ``k_g`` highest scores (ties → lower index); ascending indices."""
    device = scores.device
    n = scores.shape[0]
    G = _groups(budgets).shape[0]
    if n == 0 or G == 0:
        return torch.zeros(0, dtype=torch.int64, device=device)
    seg = segment_ids.to(device=device, dtype=torch.int64)
    sizes = torch.zeros(G, dtype=torch.int64, device=device).index_add_(0, seg, torch.ones_like(seg))
    k, total = _clamped(budgets, host_counts, sizes)
    by_score = torch.sort(sanitize_scores(scores), descending=True, stable=True).indices
    by_seg = by_score[torch.sort(seg[by_score], stable=True).indices]  # (segment, score desc, index)
    seg_start = torch.cumsum(sizes, 0) - sizes
    rank = torch.arange(n, device=device) - seg_start[seg[by_seg]]
    keep = torch.zeros(n, dtype=torch.bool, device=device)
    keep[by_seg] = rank < k[seg[by_seg]]
    return mask_to_indices(keep, total)


@register_selector(DppSelector, segment_budgets=True)
def dpp_selector(
    features: Tensor,
    relevance: Tensor,
    segment_ids: Tensor,
    budgets: Tensor,
    config: SelectorConfig,
    *,
    counts: Tensor | None = None,
) -> Tensor:
    """HieraVid's greedy DPP per segment (:func:`hieravid.ops.dpp.dpp_select`), blocks capped at
    ``config.max_block`` tokens (``None``: no split)."""
    assert isinstance(config, DppSelector)
    _check(features, relevance, segment_ids, budgets)
    return dpp_select(features, relevance, segment_ids, budgets, max_block=config.max_block, counts=counts)


@register_selector(TopkRelevanceSelector, segment_budgets=True)
def topk_relevance_selector(
    features: Tensor,
    relevance: Tensor,
    segment_ids: Tensor,
    budgets: Tensor,
    config: SelectorConfig,
    *,
    counts: Tensor | None = None,
) -> Tensor:
    """Per segment, the ``k_g`` tokens of highest relevance (ties → lower index; NaN lowest)."""
    _check(features, relevance, segment_ids, budgets)
    return _topk_by_score(relevance.to(features.device), segment_ids, budgets, counts)


@register_selector(BinnedRelevanceSelector, segment_budgets=True)
def binned_relevance_selector(
    features: Tensor,
    relevance: Tensor,
    segment_ids: Tensor,
    budgets: Tensor,
    config: SelectorConfig,
    *,
    counts: Tensor | None = None,
) -> Tensor:
    """Per segment, split its tokens (in index order) into ``k_g`` contiguous near-equal bins
    (bin ``b`` = in-segment positions ``[⌊b·n_g/k_g⌋, ⌊(b+1)·n_g/k_g⌋)``) and keep the highest-relevance
    token of each bin (ties → lower index)."""
    layout = _positional_layout(features, relevance, segment_ids, budgets, counts)
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


@register_selector(UniformSelector, segment_budgets=True)
def uniform_selector(
    features: Tensor,
    relevance: Tensor,
    segment_ids: Tensor,
    budgets: Tensor,
    config: SelectorConfig,
    *,
    counts: Tensor | None = None,
) -> Tensor:
    """Per segment, ``k_g`` evenly spaced tokens: in-segment positions ``⌊(2i+1)·n_g / (2k_g)⌋`` for
    ``i = 0..k_g-1`` (the centres of ``k_g`` equal bins). Ignores features and relevance."""
    layout = _positional_layout(features, relevance, segment_ids, budgets, counts)
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


@register_selector(RandomSelector, segment_budgets=True)
def random_selector(
    features: Tensor,
    relevance: Tensor,
    segment_ids: Tensor,
    budgets: Tensor,
    config: SelectorConfig,
    *,
    counts: Tensor | None = None,
) -> Tensor:
    """Per segment, ``k_g`` tokens chosen uniformly at random without replacement, reproducibly: the draw is
    made on the host from ``config.seed`` (the same on every device) and moved to the tokens' device."""
    assert isinstance(config, RandomSelector)
    n = _check(features, relevance, segment_ids, budgets)
    generator = torch.Generator().manual_seed(config.seed)
    keys = torch.rand(n, generator=generator).to(features.device, non_blocking=True)
    return _topk_by_score(keys, segment_ids, budgets, counts)
