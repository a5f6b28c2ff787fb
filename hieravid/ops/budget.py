"""Per-segment token budgets of the frame level (SPEC §2.2 step 2)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from hieravid.ops._util import FLOOR_GUARD

__all__ = ["SegmentBudgets", "as_budgets", "most_kept", "segment_budgets"]


@dataclass
class SegmentBudgets:
    """The per-segment budgets of one selection, known on the host, with their device copy when uploaded ahead.

    A runtime that knows every budget before the first decoder layer uploads them all at once (and with them any
    selector's host-side plan, e.g. the DPP's blocks, in ``prepared``): the stages then copy nothing to the device
    and can be captured in a CUDA graph. Without ``device``, selectors copy the host budgets themselves (without
    waiting for the device).

    Attributes:
        counts: ``[G]`` int64 (CPU) token count of each segment.
        host: ``[G]`` int64 (CPU) budgets, already clamped to ``[0, counts]``.
        device: the same budgets on the tokens' device, or None.
        prepared: per selector kind, host-side preparations made ahead (with their device copies).
    """

    counts: Tensor
    host: Tensor
    device: Tensor | None = None
    prepared: dict[str, Any] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return int(self.host.sum())

    def on(self, device: torch.device) -> Tensor:
        """The budgets on ``device`` (the uploaded copy when there is one)."""
        if self.device is not None and self.device.device == device:
            return self.device
        return self.host.to(device, non_blocking=True)


def as_budgets(budgets: Tensor | SegmentBudgets, counts: Tensor | None) -> SegmentBudgets | None:
    """``budgets`` as :class:`SegmentBudgets` when the host counts and budgets are known (no device read needed),
    else None (a plain device tensor without host counts: the caller reads the total once)."""
    if isinstance(budgets, SegmentBudgets):
        return budgets
    if counts is not None and counts.device.type == "cpu" and budgets.device.type == "cpu":
        if counts.shape != budgets.shape:
            raise ValueError(f"counts must have shape {tuple(budgets.shape)}, got {tuple(counts.shape)}")
        host = torch.minimum(budgets.to(torch.int64).clamp_min(0), counts.to(torch.int64))
        return SegmentBudgets(counts.to(torch.int64), host)
    return None


def segment_budgets(
    counts: Tensor,
    marginal_values: Tensor,
    prune_ratio: float,
    *,
    scale: float = 0.1,
    min_keep: float = 0.05,
    max_keep: float = 0.95,
    dynamic: bool = True,
    min_tokens: int = 1,
) -> Tensor:
    """Number of tokens each segment keeps at one frame-level stage.

    Dynamic (default): ``κ_g = clamp((1 - ρ) + scale·MV_g, min_keep, max_keep)``; static
    (``dynamic=False``): ``κ_g = 1 - ρ`` for every segment (no clamp, so ρ = 0 keeps everything).
    Then ``k_g = ⌊n_g·κ_g + 1e-9⌋`` (float64; the guard makes 0.57·100 give 57), raised to the floor
    ``min(n_g, min_tokens)`` (by default every non-empty segment keeps at least one token, so no segment
    disappears) and never above ``n_g``. Empty segments get 0. Computed on ``counts``' device without
    synchronising.

    Args:
        counts: ``[G]`` int current token count ``n_g`` of each segment (may contain zeros).
        marginal_values: ``[G]`` z-scored marginal values ``MV_g`` (ignored when ``dynamic`` is False).
            NaN is treated as 0.
        prune_ratio: ρ of this stage, in ``[0, 1)``.
        scale: ``R``.
        min_keep, max_keep: clamp bounds of κ, ``0 <= min_keep <= max_keep <= 1``.
        dynamic: use marginal values (True) or the static ratio (False).
        min_tokens: per-segment floor (0 disables it).

    Returns:
        ``[G]`` int64 budgets ``k_g`` with ``0 <= k_g <= n_g``.
    """
    if not 0.0 <= prune_ratio < 1.0:
        raise ValueError(f"prune_ratio must be in [0, 1), got {prune_ratio}")
    if not 0.0 <= min_keep <= max_keep <= 1.0:
        raise ValueError(f"need 0 <= min_keep <= max_keep <= 1, got {min_keep}, {max_keep}")
    if min_tokens < 0:
        raise ValueError(f"min_tokens must be >= 0, got {min_tokens}")
    if counts.dim() != 1:
        raise ValueError(f"counts must be 1-D, got shape {tuple(counts.shape)}")
    n = counts.to(torch.int64).clamp_min(0)
    if dynamic:
        if marginal_values.shape != counts.shape:
            raise ValueError(
                f"marginal_values shape {tuple(marginal_values.shape)} must match counts {tuple(counts.shape)}"
            )
        mv = torch.nan_to_num(marginal_values.to(device=n.device, dtype=torch.float64), nan=0.0)
        kappa = ((1.0 - prune_ratio) + scale * mv).clamp(min_keep, max_keep)
    else:
        kappa = torch.full_like(n, 1.0 - prune_ratio, dtype=torch.float64)
    k = torch.floor(n.double() * kappa + FLOOR_GUARD).to(torch.int64)
    k = torch.maximum(k, n.clamp_max(min_tokens))
    return torch.minimum(k, n)


def most_kept(
    count: int,
    prune_ratio: float,
    *,
    segments: int,
    scale: float = 0.1,
    min_keep: float = 0.05,
    max_keep: float = 0.95,
    dynamic: bool = True,
    min_tokens: int = 1,
) -> int:
    """The most tokens :func:`segment_budgets` can keep in all, from ``count`` tokens split into at most ``segments``
    segments, whatever the split and the marginal values (same arguments): an upper bound known from the shape.

    Marginal values are z-scored (population std), so none exceeds ``sqrt(G - 1)`` (Samuelson's inequality):
    ``κ_g <= hi = clamp((1 - ρ) + scale·sqrt(G - 1), min_keep, max_keep)``; each segment keeps at most
    ``⌊n_g·hi⌋`` or its ``min_tokens`` floor, so all keep at most ``⌊count·hi⌋ + segments·min_tokens``.
    """
    if count <= 0:
        return 0
    groups = max(1, min(segments, count))
    if dynamic:
        spread = scale * math.sqrt(groups - 1) + 1e-6  # float32 z-scores can round past the bound
        hi = min(max_keep, max(min_keep, (1.0 - prune_ratio) + spread))
    else:
        hi = 1.0 - prune_ratio
    return min(count, math.floor(count * hi + groups * FLOOR_GUARD) + groups * min_tokens)
