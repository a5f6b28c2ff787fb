"""One frame-level stage of a prefill: per sample, the frame level on its video rows, then the new coordinates.

Every count and budget is known on the host and already on the device (``Request.budgets``, computed before layer
0): a selector keeps exactly its budgets, so the stage only enqueues device work — it neither waits for the device
nor copies anything to it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from hieravid.errors import AdapterError
from hieravid.ops.layer import frame_level
from hieravid.runtime.packing import CONTENT, NEWLINE, PAD, TEXT, compact, pack_rows
from hieravid.runtime.state import Coords, Request, StageStats

if TYPE_CHECKING:
    from hieravid.plan import StagePlan

__all__ = ["select_stage"]


def select_stage(
    request: Request,
    stage_index: int,
    stage: StagePlan,
    hidden: Tensor,
    attention: Tensor,
    *,
    keep_newlines: bool,
) -> tuple[Tensor, Coords, StageStats]:
    """Run stage ``stage_index`` on the request's current coordinates.

    Args:
        request: the prefill's state (its last coordinate system is the stage's input).
        stage: the stage's plan.
        hidden: ``[B, K, D]`` post-attention hidden states of the stage layer.
        attention: ``[B, K]`` relevance (last-query attention) of every row.
        keep_newlines: newline rows survive the stage (else they are dropped with the content).

    Returns:
        ``(selection, coords, stats)``: ``[B, K']`` rows of the input coordinates the next layers keep, the new
        coordinate system, and what the stage did.
    """
    coords = request.coords[-1]
    batch = coords.src.shape[0]
    kind = coords.kind
    keep = (kind == TEXT) | ((kind == NEWLINE) & keep_newlines)
    # Host counts of this stage's input: content from its budgets' counts, newlines from the input level.
    stage_budgets = request.budgets[stage_index]
    n_content = [int(budgets.counts.sum()) if budgets is not None else 0 for budgets in stage_budgets]
    newlines = [counts.newlines if stage_index == 0 or keep_newlines else 0 for counts in request.schedule]
    before = [content + lines for content, lines in zip(n_content, newlines)]
    n_base = [counts.text + (lines if keep_newlines else 0) for counts, lines in zip(request.schedule, newlines)]
    candidates_all = compact(kind == CONTENT, max(n_content))
    features_all = hidden if "post_attention_hidden" in stage.needs else hidden[..., :0]
    kept: list[int] = []
    budgets_used: list[tuple[int, ...]] = []
    for sample in range(batch):
        budgets = stage_budgets[sample]
        if budgets is None or not n_content[sample]:
            kept.append(0)
            budgets_used.append(())
            continue
        candidates = candidates_all[sample, : n_content[sample]]
        if stage.per_segment:
            segment_ids = coords.seg[sample, candidates]
            marginal = request.marginal_values[sample]
        else:
            segment_ids = torch.zeros_like(candidates)
            marginal = request.marginal_values[sample][:1]
        result = frame_level(
            features_all[sample, candidates],
            attention[sample, candidates],
            segment_ids,
            marginal,
            stage,
            budgets=budgets,
        )
        keep[sample].index_fill_(0, candidates[result.local_keep], True)
        kept.append(int(result.local_keep.numel()))
        if kept[-1] != budgets.total:
            # Later counts rely on it; a shape is known on the host, so checking costs no sync.
            raise AdapterError(
                f"selector {stage.selector.kind!r} kept {kept[-1]} tokens of sample {sample} at stage "
                f"{stage_index + 1} (layer {stage.layer}), but its budgets sum to {budgets.total}: a "
                "selector must keep exactly min(budgets[g], n_g) tokens of each segment g"
            )
        budgets_used.append(tuple(int(value) for value in budgets.host.tolist()))
    rows = [base + k for base, k in zip(n_base, kept)]
    after = [k + (lines if keep_newlines else 0) for k, lines in zip(kept, newlines)]
    selection, valid = pack_rows(keep, kind, rows, stage.query_rows, slots_first=request.padding_slots_first)
    kept_video = keep & (kind != TEXT)
    video_orig = coords.orig.gather(1, compact(kept_video, max(after)))
    new_coords = Coords(
        src=selection,
        idx0=coords.idx0.gather(1, selection),
        orig=coords.orig.gather(1, selection),
        valid=coords.valid.gather(1, selection) & valid,
        kind=torch.where(valid, kind.gather(1, selection), PAD),
        seg=torch.where(valid, coords.seg.gather(1, selection), -1),
        counts=tuple(after),
        all_valid=min(rows) == max(rows),
    )
    stats = StageStats(
        layer=stage.layer,
        prune_point=stage.prune_point,
        video_tokens_before=tuple(before),
        video_tokens_after=tuple(after),
        budgets=tuple(budgets_used),
        kept_positions=tuple(video_orig[sample, : after[sample]] for sample in range(batch)),
        sequence_length=int(selection.shape[1]),
    )
    return selection, new_coords, stats
