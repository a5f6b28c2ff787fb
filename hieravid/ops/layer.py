"""Layer level (SPEC §2.3): stage schedules and keep-index bookkeeping, plus the composite of one
frame-level stage (relevance → budgets → selector)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

from hieravid.ops.budget import SegmentBudgets, most_kept, segment_budgets
from hieravid.ops.dpp import plan_dpp_blocks
from hieravid.ops.relevance import RelevanceSign, normalize_relevance
from hieravid.ops.selectors import select_tokens
from hieravid.policy import DppSelector, DynamicBudget, SelectorConfig

__all__ = [
    "FrameLevelResult",
    "FrameStage",
    "compose_keep",
    "frame_level",
    "stage_budgets",
    "stage_keep_fractions",
    "stage_most_kept",
]


def compose_keep(previous: Tensor, local: Tensor) -> Tensor:
    """Map a stage's local keep indices back to original positions.

    Args:
        previous: ``[n]`` ascending original positions of the tokens entering the stage.
        local: ``[k]`` indices into ``previous`` of the tokens the stage keeps (sorted here if needed).

    Returns:
        ``[k]`` int64 ascending original positions ``previous[sorted(local)]``.
    """
    if previous.dim() != 1 or local.dim() != 1:
        raise ValueError(f"previous and local must be 1-D, got {tuple(previous.shape)} and {tuple(local.shape)}")
    local_sorted = torch.sort(local.to(torch.int64)).values
    return previous.to(torch.int64)[local_sorted.to(previous.device)]


def _check_ratios(prune_ratios: Sequence[float]) -> None:
    for r in prune_ratios:
        if not 0.0 <= float(r) < 1.0:
            raise ValueError(f"prune ratios must be in [0, 1), got {list(prune_ratios)}")


def stage_keep_fractions(prune_ratios: Sequence[float]) -> list[float]:
    """Static fraction of video tokens kept after each stage: cumulative products of ``1 - ρ``.

    ``[0.5, 0.3, 0.3, 0.57]`` → ``[0.5, 0.35, 0.245, 0.105]`` (SPEC §2.2 table).
    """
    _check_ratios(prune_ratios)
    out: list[float] = []
    keep = 1.0
    for r in prune_ratios:
        keep *= 1.0 - float(r)
        out.append(keep)
    return out


class FrameStage(Protocol):
    """What one frame-level stage needs (:class:`hieravid.plan.StagePlan` provides it)."""

    @property
    def prune_ratio(self) -> float: ...

    @property
    def selector(self) -> SelectorConfig: ...

    @property
    def relevance_sign(self) -> RelevanceSign: ...

    @property
    def budget(self) -> DynamicBudget | None: ...


@dataclass(frozen=True)
class FrameLevelResult:
    """Output of :func:`frame_level`.

    Attributes:
        local_keep: ``[k]`` ascending indices into the stage's video tokens.
        segment_ids_kept: ``[k]`` segment id of each kept token.
        budgets: ``[G]`` per-segment budgets used (computed on the host, returned on the tokens' device).
        host_budgets: the same budgets as the host (CPU) tensor they were computed in, so that callers
            read them without a device synchronisation.
    """

    local_keep: Tensor
    segment_ids_kept: Tensor
    budgets: Tensor
    host_budgets: Tensor


def frame_level(
    hidden: Tensor,
    attention: Tensor,
    segment_ids: Tensor,
    marginal_values: Tensor,
    stage: FrameStage,
    *,
    host_meta: tuple[Tensor, Tensor] | None = None,
    budgets: SegmentBudgets | None = None,
) -> FrameLevelResult:
    """One frame-level stage on the video tokens of one sample.

    Relevance = :func:`normalize_relevance` of ``attention`` with ``stage.relevance_sign``; per-segment counts
    (segments emptied by earlier stages count 0 and get budget 0); budgets by :func:`segment_budgets` (dynamic
    with ``stage.budget``, ``1 - ρ`` per segment without); then the operator bound to ``stage.selector``.

    Args:
        hidden: ``[n, D]`` post-attention hidden states of the stage's video tokens (may be ``[n, 0]`` when the
            selector reads no features).
        attention: ``[n]`` last-query attention over those tokens.
        segment_ids: ``[n]`` segment id of each token, in ``[0, G)``.
        marginal_values: ``[G]`` segment marginal values.
        stage: the stage (prune ratio, selector config, relevance sign, budget rule).
        host_meta: optional ``(counts, marginal_values)`` already on the host: ``[G]`` int64 token count of each
            segment (must equal the counts of ``segment_ids``) and ``[G]`` float64 marginal values; the call then
            does not synchronise (otherwise it reads both once).
        budgets: the stage's budgets computed ahead (:func:`stage_budgets`, uploaded with any selector plan); the
            call then neither reads nor copies anything to the device.

    Returns:
        A :class:`FrameLevelResult`.
    """
    n = hidden.shape[0]
    if attention.shape != (n,) or segment_ids.shape != (n,):
        raise ValueError(f"attention {tuple(attention.shape)} and segment_ids {tuple(segment_ids.shape)} must be [{n}]")
    device = hidden.device
    G = marginal_values.shape[0]
    seg = segment_ids.to(device=device, dtype=torch.int64)
    relevance = normalize_relevance(attention.to(device), stage.relevance_sign)
    if budgets is None:
        if host_meta is not None:
            counts_h, marginal_h = host_meta[0].to(torch.int64), host_meta[1].to(torch.float64)
            if counts_h.shape != (G,) or marginal_h.shape != (G,):
                raise ValueError(
                    f"host_meta must hold two [{G}] tensors, got {tuple(counts_h.shape)}, {tuple(marginal_h.shape)}"
                )
        else:
            counts = torch.zeros(G, dtype=torch.int64, device=device).index_add_(0, seg, torch.ones_like(seg))
            # One host sync: counts and marginal values come to the host, the budgets are computed there.
            meta = torch.cat([counts.double(), marginal_values.to(device=device, dtype=torch.float64)]).cpu()
            counts_h, marginal_h = meta[:G].long(), meta[G:]
        budgets = stage_budgets(stage, counts_h, marginal_h)
    local = select_tokens(stage.selector, hidden, relevance, seg, budgets, counts=budgets.counts)
    return FrameLevelResult(
        local_keep=local, segment_ids_kept=seg[local], budgets=budgets.on(device), host_budgets=budgets.host
    )


def stage_budgets(stage: FrameStage, counts: Tensor, marginal_values: Tensor) -> SegmentBudgets:
    """The per-segment budgets of a stage from the host counts and marginal values (``[G]`` each), with the
    selector's host-side plan when it has one (the DPP's blocks), ready to be uploaded."""
    host = segment_budgets(counts, marginal_values, stage.prune_ratio, **_budget_options(stage))
    budgets = SegmentBudgets(counts.to(torch.int64), host)
    if isinstance(stage.selector, DppSelector):
        budgets.prepared["dpp"] = plan_dpp_blocks(budgets.counts, host, stage.selector.max_block)
    return budgets


def stage_most_kept(stage: FrameStage, count: int, segments: int) -> int:
    """The most tokens a stage's budgets (:func:`stage_budgets`) can keep of ``count`` split into at most
    ``segments`` segments, whatever the split and the marginal values (:func:`~hieravid.ops.budget.most_kept`)."""
    return most_kept(count, stage.prune_ratio, segments=segments, **_budget_options(stage))


def _budget_options(stage: FrameStage) -> dict[str, Any]:
    """The budget rule's keyword arguments of :func:`segment_budgets` (static ``1 - ρ`` without a dynamic budget)."""
    budget = stage.budget
    if budget is None:
        return {"dynamic": False}
    return {"dynamic": True, "scale": budget.scale, "min_keep": budget.min_keep, "max_keep": budget.max_keep}
