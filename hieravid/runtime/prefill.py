"""The input level of a prefill: locate each sample's video, run the input-level operator, build stage 0.

This is the only part of a pruned prefill that reads the device: the adapter locating the video, then one
read of the mask's padding, the number of segments and the per-segment counts and marginal values. From then on
every count is known on the host, so the frame-level stages never wait for the device.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from hieravid.ops.budget import SegmentBudgets
from hieravid.ops.peers import input_level_unread
from hieravid.ops.segment import UnreadSegmentLevel
from hieravid.runtime.packing import CONTENT, NEWLINE, PAD, TEXT, gather_positions, gather_rows, pack_rows
from hieravid.runtime.state import Coords, Request, SampleCounts, SampleRecord

if TYPE_CHECKING:
    from hieravid.adapters.base import Adapter, VideoLayout
    from hieravid.ops import GraphCache
    from hieravid.plan import PruningPlan

__all__ = ["prune_inputs", "schedule_stages"]


def prune_inputs(
    request: Request,
    plan: PruningPlan,
    adapter: Adapter,
    kwargs: dict[str, Any],
    inputs_embeds: Tensor,
    mask2d: Tensor | None,
    layouts: list[VideoLayout | None],
    *,
    graphs: GraphCache | None,
) -> None:
    """Build the request's stage-0 coordinates and, when the input level is on, rewrite the language model's
    inputs in place (``kwargs``: gathered ``inputs_embeds`` with merged features, original ``position_ids``,
    the 2-D mask in stage-0 coordinates or None when nothing is padded).

    Args:
        mask2d: the prefill's 2-D mask (bool, original coordinates), or None when the caller passed none.
    """
    batch, length = inputs_embeds.shape[:2]
    device = inputs_embeds.device
    position_ids = kwargs.get("position_ids")
    if position_ids is None:
        position_ids = adapter.default_position_ids(inputs_embeds, 0)
    segment = plan.segment
    query_rows = max((stage.query_rows for stage in plan.stages), default=1)
    keeps: list[Tensor] = []
    kinds: list[Tensor] = []
    segs: list[Tensor] = []
    merged: list[tuple[Tensor, Tensor] | None] = []
    counts: list[int] = []
    # What the one sync below reads, per sample: the segment count still on the device, and with per-segment
    # budgets the per-segment counts and marginal values.
    to_read: list[_SegmentRead] = []
    for sample, layout in enumerate(layouts):
        kind = torch.full((length,), TEXT, dtype=torch.int8, device=device)
        seg = torch.full((length,), -1, dtype=torch.long, device=device)
        keep = torch.ones(length, dtype=torch.bool, device=device)
        if layout is None:
            request.marginal_values.append(torch.zeros(1, device=device))
            request.schedule.append(
                SampleCounts(torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.float64), 0, length)
            )
            request.samples.append(None)
            counts.append(length)
            merged.append(None)
        else:
            content = layout.frame_index.flatten()
            segment_count: Tensor | None = None
            if segment.config is not None:
                result = input_level_unread(segment.config, inputs_embeds[sample][layout.frame_index], graphs=graphs)
                if isinstance(result, UnreadSegmentLevel):
                    segment_count = result.segment_count  # marginal values padded to F until it is read
                frame_segments, token_segments = result.frame_segment_ids, result.token_segment_ids
                marginal = result.marginal_values
                kept_content = content[result.kept_index]
                merged.append((kept_content, result.features))
                merge_target, redundancy = result.merge_target, result.redundancy
            else:  # level off: one segment, nothing merged or dropped
                frame_segments = torch.zeros(layout.frames, dtype=torch.long, device=device)
                token_segments = torch.zeros(content.numel(), dtype=torch.long, device=device)
                marginal = torch.zeros(1, device=device)
                kept_content = content
                merged.append(None)
                merge_target = redundancy = None
            request.marginal_values.append(marginal.to(device))
            # Shapes are known on the host: rows kept, content kept, newlines.
            kept, newlines = int(kept_content.numel()), int(layout.newline_index.numel())
            counts.append(length - int(content.numel()) + kept)
            groups = int(marginal.numel())  # G, or F while the segment count is unread
            request.schedule.append(
                SampleCounts(
                    torch.tensor([kept]), torch.zeros(1, dtype=torch.float64), newlines, counts[-1] - kept - newlines
                )
            )
            per_segment = segment.makes_segments and groups > 1 and any(stage.per_segment for stage in plan.stages)
            tokens = None
            if per_segment:
                tokens = torch.zeros(groups, dtype=torch.long, device=device)
                tokens.index_add_(0, token_segments.to(device), torch.ones_like(token_segments, device=device))
            if per_segment or segment_count is not None:
                to_read.append(_SegmentRead(sample, segment_count, tokens, marginal))
            # index_fill_, not ``x[index] = scalar``: that copies the scalar to the device and waits for it.
            keep.index_fill_(0, content, False).index_fill_(0, kept_content, True)
            kind.index_fill_(0, kept_content, CONTENT).index_fill_(0, layout.newline_index, NEWLINE)
            seg[kept_content] = token_segments.to(device)
            request.samples.append(
                SampleRecord(
                    layout=layout,
                    num_segments=groups if segment.config is not None else 1,
                    frame_segment_ids=frame_segments,
                    marginal_values=marginal,
                    input_kept_positions=torch.cat([kept_content, layout.newline_index]).sort().values,
                    merge_target=merge_target,
                    redundancy=redundancy,
                )
            )
        keeps.append(keep)
        kinds.append(kind)
        segs.append(seg)

    keep_all, kind_stack = torch.stack(keeps), torch.stack(kinds)
    right_padded, prompt_unmasked = _read_segment_meta(request, mask2d, to_read)
    if right_padded:
        raise NotImplementedError("right-padded batches are not supported; pad on the left (generate's default)")
    schedule_stages(request, plan, device)
    index, valid = pack_rows(keep_all, kind_stack, counts, query_rows, slots_first=request.padding_slots_first)
    positions0 = torch.arange(index.shape[1], device=device).unsqueeze(0).expand(batch, -1)
    request.coords = [
        Coords(
            src=index,
            idx0=positions0.contiguous(),
            orig=index,
            valid=valid,
            kind=torch.where(valid, kind_stack.gather(1, index), PAD),
            seg=torch.where(valid, torch.stack(segs).gather(1, index), -1),
            counts=tuple(sample.video for sample in request.schedule),
            all_valid=min(counts) == max(counts),
        )
    ]
    request.mask2d = mask2d if mask2d is not None else torch.ones(batch, length, dtype=torch.bool, device=device)
    request.prompt_unmasked = prompt_unmasked
    # valid is False exactly at padding slots, which exist only when the samples keep unequal counts.
    request.stage_all_valid = [prompt_unmasked and min(counts) == max(counts)]
    request.pruned = True
    if segment.config is None:
        return  # nothing changes before the first stage: the language model's inputs stay untouched
    embeds = gather_rows(inputs_embeds, index)
    for sample, item in enumerate(merged):
        if item is None:
            continue
        kept_content, features = item
        target = torch.searchsorted(index[sample].contiguous(), kept_content.contiguous())
        # Padding slots copy the previous row; searchsorted returns the first occurrence (the real row).
        embeds[sample, target] = features.to(embeds.dtype)
    kwargs["inputs_embeds"] = embeds
    kwargs["position_ids"] = gather_positions(position_ids, index)
    adapter.gather_extra_inputs(kwargs, index, valid, counts)


def schedule_stages(request: Request, plan: PruningPlan, device: torch.device) -> None:
    """Every stage's per-segment budgets of every sample, computed on the host from the counts and marginal values
    the input level read (a selector keeps exactly its budgets, so each stage's counts are the previous stage's
    budgets), then copied to the device in one transfer with the selectors' plans: the stages neither read nor
    copy anything to the device, which is what lets a prefill be captured in a CUDA graph."""
    from hieravid.ops.layer import stage_budgets

    counts = [sample.segment_tokens for sample in request.schedule]
    for stage in plan.stages:
        row: list[SegmentBudgets | None] = []
        for sample, sample_counts in enumerate(request.schedule):
            if not sample_counts.content:
                row.append(None)
                continue
            if stage.per_segment:
                budgets = stage_budgets(stage, counts[sample], sample_counts.marginal_values)
                counts[sample] = budgets.host
            else:
                total = counts[sample].sum().view(1)
                budgets = stage_budgets(stage, total, torch.zeros(1, dtype=torch.float64))
                counts[sample] = budgets.host
            row.append(budgets)
        request.budgets.append(row)
    host: list[Tensor] = []
    for row in request.budgets:
        for budgets in row:
            if budgets is not None:
                host.append(budgets.host)
                host.extend(plan.small for plan in budgets.prepared.values())
    if not host:
        return
    flat = torch.cat([tensor.to(torch.int64).flatten() for tensor in host])
    if device.type == "cuda":
        flat = flat.pin_memory()
    uploaded = flat.to(device, non_blocking=True)  # the one copy of every stage's budgets and plans
    offset = 0
    for row in request.budgets:
        for budgets in row:
            if budgets is None:
                continue
            budgets.device = uploaded[offset : offset + budgets.host.numel()]
            offset += budgets.host.numel()
            for prepared in budgets.prepared.values():
                prepared.device = uploaded[offset : offset + prepared.small.numel()]
                offset += prepared.small.numel()


@dataclass(frozen=True)
class _SegmentRead:
    """What the input level's one sync reads for one sample."""

    sample: int
    segment_count: Tensor | None
    """``[1]`` on the device while the operator left the number of segments unread, else None."""
    tokens: Tensor | None
    """Content tokens of each segment (per-segment budgets only), as long as ``marginal``."""
    marginal: Tensor
    """The marginal values: ``[G]``, or padded to ``[F]`` while the segment count is unread."""


def _read_segment_meta(request: Request, mask2d: Tensor | None, to_read: list[_SegmentRead]) -> tuple[bool, bool]:
    """The one host sync of the input level (none when there is nothing to read): the mask's two checks (right
    padding, any padding) and, per sample, the number of segments when the operator left it on the device, and
    with per-segment budgets the per-segment content counts and marginal values, stored in ``request.schedule``;
    a sample's record and device marginal values are cut to its segments. Returns
    ``(right_padded, prompt_unmasked)``."""
    parts: list[Tensor] = []
    if mask2d is not None:
        parts.append(torch.stack([~mask2d[:, -1].all(), mask2d.all()]).double())
    for read in to_read:
        if read.segment_count is not None:
            parts.append(read.segment_count.double())
        if read.tokens is not None:
            parts += [read.tokens.double(), read.marginal.to(device=read.tokens.device, dtype=torch.float64)]
    if not parts:
        return False, True
    host = torch.cat([part.to(parts[0].device) for part in parts]).cpu()
    right_padded, prompt_unmasked = (bool(host[0]), bool(host[1])) if mask2d is not None else (False, True)
    offset = 2 if mask2d is not None else 0
    for read in to_read:
        padded = read.marginal.numel()
        groups = padded
        if read.segment_count is not None:
            groups = int(host[offset])
            offset += 1
            record = request.samples[read.sample]
            assert record is not None
            record.num_segments = groups
            record.marginal_values = read.marginal[:groups]
            request.marginal_values[read.sample] = request.marginal_values[read.sample][:groups]
        if read.tokens is not None:
            if groups > 1:
                counts = request.schedule[read.sample]
                counts.segment_tokens = host[offset : offset + groups].long()
                counts.marginal_values = host[offset + padded : offset + padded + groups].clone()
            offset += 2 * padded
    return right_padded, prompt_unmasked
