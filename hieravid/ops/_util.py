"""Small private helpers shared by the operators (no public API)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

#: Added before flooring ``n * ratio`` so that ratios written in decimal (0.57 * 100 = 56.999...)
#: floor to the value a person computes by hand (57).
FLOOR_GUARD = 1e-9

#: Norm clamp used for every L2 normalisation (zero vectors stay zero instead of becoming NaN).
NORM_EPS = 1e-12


def floor_product(n: int, ratio: float) -> int:
    """``floor(n * ratio)`` with :data:`FLOOR_GUARD` against decimal representation error."""
    return math.floor(n * ratio + FLOOR_GUARD)


def mask_to_indices(mask: Tensor, count: int) -> Tensor:
    """Ascending positions of the ``True`` entries of a 1-D ``mask``, known to number ``count``.

    Unlike :func:`torch.nonzero` this does not synchronise with the device: the caller already knows
    how many entries are set. Deterministic (no entry is written twice except a discarded dummy slot,
    always with the same value).
    """
    n = mask.shape[0]
    pos = torch.cumsum(mask.to(torch.int64), 0) - 1
    target = torch.where(mask, pos, torch.full_like(pos, count))
    out = torch.full((count + 1,), -1, dtype=torch.int64, device=mask.device)
    src = torch.where(mask, torch.arange(n, device=mask.device), torch.full_like(pos, -1))
    out.index_put_((target,), src)
    return out[:count]


def sanitize_scores(scores: Tensor) -> Tensor:
    """float32 copy of ``scores`` with NaN → lowest finite value and ±inf → ±largest finite value."""
    s = scores.float()
    big = torch.finfo(torch.float32).max
    return torch.nan_to_num(s, nan=-big, posinf=big, neginf=-big)
