"""Checks the conformance kit applies to a pruned request, usable on their own."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

__all__ = ["check_realised_counts", "hook_snapshot", "module_attributes", "real_rows"]

_HOOK_TABLES = (
    "_forward_hooks",
    "_forward_pre_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_pre_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_backward_hooks",
    "_backward_pre_hooks",
)


def hook_snapshot(model: nn.Module) -> dict[str, tuple[tuple[Any, ...], ...]]:
    """The hook ids of every module of ``model``, per hook table (to compare before ``apply`` and after
    ``remove``)."""
    return {
        name: tuple(tuple(getattr(module, table).keys()) for table in _HOOK_TABLES)
        for name, module in model.named_modules()
    }


def module_attributes(model: nn.Module) -> dict[str, frozenset[str]]:
    """The instance attribute names of every module of ``model`` (an uninstalled handle leaves none behind)."""
    return {name: frozenset(vars(module)) for name, module in model.named_modules()}


def real_rows(positions: Tensor, attention_mask: Tensor) -> Tensor:
    """Which rows of one sample's pruned sequence are real tokens: ``positions`` are the rows' original positions
    (-1 for none), ``attention_mask`` the sample's original ``[S]`` mask."""
    return (positions >= 0) & attention_mask.bool()[positions.clamp_min(0)]


def check_realised_counts(plan: Any, stats: Any, input_ids: Tensor, *, input_exact: bool = True) -> None:
    """Assert that a batch-1 pruned prefill (``stats = handle.last_request``) realised ``plan``'s token counts.

    Input level: exactly the plan's layer-0 count (``input_exact=False``: at most the plan's removals, for
    operators that document an upper bound, e.g. FrameFusion). Frame-level stages: per-segment floors (and the
    one-token floor per segment) move the realised count by at most G per stage from ⌊n·(1-ρ)⌋; dynamic
    budgets move it by at most R·Σ_g n_g·|MV_g| more. Every layer's sequence is text + its video tokens.
    """
    layout = stats.layouts[0]
    text = input_ids.shape[1] - layout.video_tokens
    newlines = int(layout.newline_index.numel())
    for index in range(plan.spec.num_layers):
        assert stats.layer_sequence_lengths[index] == text + stats.layer_video_tokens[index][0]
    realised_input = stats.layer_video_tokens[0][0] - newlines
    planned_input = plan.layer_video_tokens[0] - plan.spec.newline_tokens
    if input_exact:
        assert realised_input == planned_input, (realised_input, planned_input)
    else:
        content = layout.frames * layout.tokens_per_frame
        assert planned_input <= realised_input <= content, (realised_input, planned_input)
    for stage_plan, stage in zip(plan.stages, stats.stages, strict=True):
        before = stage.video_tokens_before[0]
        after = stage.video_tokens_after[0]
        kept_newlines = newlines if plan.keep_newlines else 0
        content_before = before - (newlines if stage is stats.stages[0] or plan.keep_newlines else 0)
        content_after = after - kept_newlines
        assert content_after == sum(stage.budgets[0]) or not stage.budgets[0]
        slack = max(1, len(stage.budgets[0]))
        if stage_plan.budget is not None:
            slack += stage_plan.budget.scale * float(stats.marginal_values[0].abs().max()) * content_before
        target = content_before * (1.0 - stage_plan.prune_ratio)
        assert abs(content_after - target) <= slack + 1, (stage_plan.layer, content_before, content_after, slack)
        assert len(stage.kept_positions[0]) == after
