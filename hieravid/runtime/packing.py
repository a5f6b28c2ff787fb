"""Row packing and coordinate bookkeeping of the pruned sequence: pure tensor functions, no state.

A *coordinate system* is the list of rows one stretch of decoder layers runs on (stage 0: the rows entering
layer 0; stage ``s``: the rows kept by the ``s``-th frame-level stage). Within a batch every sample has the
same number of rows; a sample that keeps fewer holds *padding slots* (copies of a real row, masked out).
Nothing here synchronises with the device: every count is passed in from the host.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["compact", "gather_positions", "gather_rows", "pack_rows", "translate_mask"]

#: Row kinds in a coordinate system.
TEXT, CONTENT, NEWLINE, PAD = 0, 1, 2, 3


def gather_rows(tensor: Tensor, index: Tensor) -> Tensor:
    """``tensor[b, index[b, k]]`` for a ``[B or 1, S, ...]`` tensor and a ``[B, K]`` index."""
    batch = index.shape[0]
    if tensor.shape[0] != batch:
        tensor = tensor.expand(batch, *tensor.shape[1:])
    expanded = index.view(*index.shape, *([1] * (tensor.dim() - 2))).expand(*index.shape, *tensor.shape[2:])
    return tensor.gather(1, expanded)


def gather_positions(position_ids: Tensor, index: Tensor) -> Tensor:
    """Gather position ids (``[B, S]``, ``[1, S]``, ``[R, B, S]``) along the sequence with a ``[B, K]`` index."""
    batch = index.shape[0]
    if position_ids.dim() == 2:
        return position_ids.expand(batch, -1).gather(1, index)
    if position_ids.dim() == 3:
        rows = position_ids.shape[0]
        return position_ids.expand(rows, batch, -1).gather(2, index.unsqueeze(0).expand(rows, -1, -1))
    raise ValueError(f"position_ids of shape {tuple(position_ids.shape)} are not supported")


def compact(mask: Tensor, width: int) -> Tensor:
    """``[B, width]``: per row, the ascending column indices where ``mask`` (``[B, S]`` bool) is True; slots past
    a row's count hold 0. ``width`` must be at least every row's count (known on the host)."""
    batch, columns = mask.shape
    rank = mask.cumsum(1)
    target = torch.where(mask, rank - 1, torch.full_like(rank, width))
    out = torch.zeros(batch, width + 1, dtype=torch.long, device=mask.device)
    out.scatter_(1, target, torch.arange(columns, device=mask.device).expand(batch, -1))
    return out[:, :width]


def pack_rows(
    keep: Tensor, kind: Tensor, counts: list[int], query_rows: int, *, slots_first: bool = False
) -> tuple[Tensor, Tensor]:
    """Pack the kept rows of each sample into ``[B, K]`` ascending indices, ``K = max(counts)``, with padding slots.

    Args:
        keep: ``[B, S]`` bool, the rows each sample keeps.
        kind: ``[B, S]`` row kinds (``TEXT`` rows are never video).
        counts: per sample, ``keep``'s row sum, known on the host.
        query_rows: trailing rows that must stay last (the relevance queries and the logits' row).
        slots_first: put a shorter sample's padding slots before all of its rows (copies of its first kept row)
            instead. A recurrent layer (linear attention) zeroes masked rows, which leaves its state untouched only
            before the first real row: a masked slot between real rows would still decay the state and shift the
            causal convolution's window.

    Returns:
        ``(index, valid)``: ``index`` ``[B, K]`` into ``S``; ``valid`` ``[B, K]`` False at padding slots. A shorter
        sample gets its ``K - count`` padding slots at ``max(1, min(last video row + 1, count - query_rows))`` of its
        kept rows (the count when it keeps no video row); a padding slot copies the row just before it.
    """
    length = max(counts)
    device = keep.device
    rows = compact(keep, length)
    if min(counts) == length:  # no padding slot (e.g. batch 1): a dozen launches fewer
        return rows, torch.ones_like(rows, dtype=torch.bool)
    rank = keep.cumsum(1)
    count = rank[:, -1:]
    video = keep & (kind != TEXT)
    last_video = torch.where(video, rank, torch.zeros_like(rank)).amax(dim=1, keepdim=True)
    last_video = torch.where(last_video > 0, last_video, count)
    at = torch.minimum(last_video, count - query_rows).clamp_min(1)
    pad = length - count
    slot = torch.arange(length, device=device).unsqueeze(0)
    if slots_first:
        return rows.gather(1, (slot - pad).clamp_min(0)), slot >= pad
    source = torch.where(slot < at, slot, torch.where(slot < at + pad, at - 1, slot - pad))
    valid = (slot < at) | (slot >= at + pad)
    return rows.gather(1, source), valid


def translate_mask(mask2d: Tensor, original_length: int, orig: Tensor, valid: Tensor) -> Tensor:
    """A 2-D mask in original coordinates (the prompt's ``original_length`` positions, then new tokens) expressed
    in a coordinate system whose rows are the original positions ``orig`` (``[B, K]``, ``valid`` False at padding
    slots): the kept prompt rows, then the new tokens."""
    prompt = mask2d[:, :original_length].gather(1, orig) & valid
    return torch.cat([prompt, mask2d[:, original_length:]], dim=1)
