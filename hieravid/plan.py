"""The planner: a pure function of (policy, model spec) → :class:`PruningPlan`.

The plan resolves every policy option into what the runtime does at which layer, and estimates
token counts, retention (SPEC §2.4) and prefill FLOPs. It needs no weights and runs on a laptop.

Conventions (documented in README): a decoder layer has two token-wise halves, attention and MLP;
the video tokens a layer "processes" are the mean of the counts entering its attention and its MLP.
A stage at layer ``l`` with ``prune_point: after_attention`` (the paper's) cuts between layer ``l``'s
attention and MLP, so that layer counts half before and half after the cut; with ``after_mlp`` the
cut follows the MLP and layer ``l`` counts wholly before it. FLOPs follow the same split.
Newline tokens are structure: never merged, kept at every stage when ``keep_newlines`` is set, and counted in N_v.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel

from hieravid.errors import PlanError
from hieravid.policy import (
    DepthFractionSchedule,
    DynamicBudget,
    InputLevelConfig,
    Policy,
    SegmentLevel,
    SelectorConfig,
    TopkRelevanceSelector,
    load_policy,
)
from hieravid.specs import ModelSpec, load_spec


@dataclass(frozen=True)
class SegmentPlan:
    """Resolved input level, before layer 0.

    ``config`` is the policy's input-level config object (HieraVid's :class:`~hieravid.policy.SegmentLevel` or a
    peer's), or None when the level is off (then the video is one segment and nothing is merged or dropped).
    """

    config: InputLevelConfig | None
    video_tokens_after: int
    """Static estimate of video tokens entering layer 0 (content + newlines): exact for every operator
    (``config.removed_tokens``) except FrameFusion, where it is a lower bound (it merges at most that many)."""

    @property
    def enabled(self) -> bool:
        return self.config is not None

    @property
    def kind(self) -> str:
        """The operator's kind (``"hieravid"``, ``"evs"``, ...), or ``"off"``."""
        return self.config.kind if self.config is not None else "off"

    @property
    def makes_segments(self) -> bool:
        """Whether the level yields temporal segments with marginal values (HieraVid's segment level)."""
        return self.config is not None and self.config.makes_segments

    @property
    def prune_ratio(self) -> float:
        """The level's ratio: fraction of frame tokens removed (merged or dropped), before any operator cap."""
        return self.config.static_prune_ratio if self.config is not None else 0.0


@dataclass(frozen=True)
class StagePlan:
    """One in-LLM pruning stage, fully resolved: every default is filled in by the planner."""

    layer: int
    prune_ratio: float
    prune_point: Literal["after_attention", "after_mlp"]
    selector: SelectorConfig
    """The selector config object this stage runs (frame level off: top-k relevance over the whole video)."""
    per_segment: bool
    """Budgets per segment (frame level on) or one global budget (frame level off)."""
    relevance_sign: Literal["negative", "positive"]
    query_rows: int
    budget: DynamicBudget | None
    """Per-segment budgets follow the segments' marginal values with this rule; None keeps ``1 - ρ`` of each."""
    video_tokens_before: int
    video_tokens_after: int

    @property
    def needs(self) -> tuple[str, ...]:
        """What the runtime captures at ``layer``: the last query rows' attention, and the post-attention hidden
        states when the selector reads features."""
        if self.selector.uses_features:
            return ("last_query_attention", "post_attention_hidden")
        return ("last_query_attention",)


@dataclass(frozen=True)
class PruningPlan:
    """Everything the runtime needs, plus static estimates. Immutable; ``to_dict()`` is JSON."""

    policy: Policy
    spec: ModelSpec
    segment: SegmentPlan
    stages: tuple[StagePlan, ...]
    keep_newlines: bool
    layer_video_tokens: tuple[int, ...]
    """Static estimate of the video tokens entering each decoder layer's attention."""
    layer_mlp_video_tokens: tuple[int, ...]
    """Static estimate of the video tokens entering each decoder layer's MLP."""
    retention: float
    input_keep_fraction: float
    flops_ratio: float
    prefill_tflops: float
    unpruned_prefill_tflops: float
    notes: tuple[str, ...] = field(default=())

    @property
    def prunes(self) -> bool:
        """Whether the plan removes any token."""
        return self.segment.enabled or bool(self.stages)

    @property
    def stage_layers(self) -> tuple[int, ...]:
        return tuple(stage.layer for stage in self.stages)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable mapping of the whole plan (policy and spec included)."""
        return {
            "policy": self.policy.to_dict(),
            "spec": self.spec.to_dict(),
            "segment": _dataclass_dict(self.segment, ("enabled", "kind")),
            "stages": [_dataclass_dict(stage, ("needs",)) for stage in self.stages],
            "keep_newlines": self.keep_newlines,
            "layer_video_tokens": list(self.layer_video_tokens),
            "layer_mlp_video_tokens": list(self.layer_mlp_video_tokens),
            "retention": self.retention,
            "input_keep_fraction": self.input_keep_fraction,
            "flops_ratio": self.flops_ratio,
            "prefill_tflops": self.prefill_tflops,
            "unpruned_prefill_tflops": self.unpruned_prefill_tflops,
            "notes": list(self.notes),
        }

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def summary(self) -> str:
        """One line: policy, model, retention, FLOPs ratio."""
        return (
            f"{self.policy.name} on {self.spec.name} ({self.spec.frames} frames, N_v={self.spec.video_tokens}): "
            f"retention {self.retention:.3f}, input keep {self.input_keep_fraction:.3f}, "
            f"FLOPs ratio {self.flops_ratio:.3f}"
        )

    def __str__(self) -> str:
        spec = self.spec
        lines = [
            f"Pruning plan: policy {self.policy.name!r} on {spec.name} ({spec.model_type})",
            f"  video: {spec.frames} frames × {spec.rows}×{spec.cols} + {spec.newline_tokens} newline(s) "
            f"= N_v {spec.video_tokens} tokens; text {spec.text_tokens} tokens; {spec.num_layers} layers",
        ]
        seg = self.segment
        if isinstance(seg.config, SegmentLevel):
            config = seg.config
            lines.append(
                f"  segment level: τ={config.similarity_threshold} β={config.segment_threshold} "
                f"merge ρ0={config.merge_ratio} λ={config.marginal_value_weight} → {seg.video_tokens_after} tokens"
            )
        elif seg.config is not None:
            options = ", ".join(
                f"{key}={value}" for key, value in seg.config.model_dump(exclude={"kind", "enabled"}).items()
            )
            lines.append(f"  input level: {seg.kind} ({options}) → {seg.video_tokens_after} tokens")
        else:
            lines.append("  segment level: off (one segment, no merging)")
        if not self.stages:
            lines.append("  stages: none")
        for stage in self.stages:
            budget = "dynamic" if stage.budget is not None else "fixed"
            scope = "per segment" if stage.per_segment else "global"
            lines.append(
                f"  stage @ layer {stage.layer} ({stage.prune_point}): prune {stage.prune_ratio:.2f} "
                f"{stage.video_tokens_before} → {stage.video_tokens_after} via {stage.selector.kind} ({scope}, "
                f"{budget} budget, relevance {stage.relevance_sign}, {stage.query_rows} query row(s))"
            )
        stage_at = {stage.layer: stage for stage in self.stages}
        lines.append("")
        lines.append("  layer  attn video  mlp video   keep")
        lines.append("  -----  ----------  ---------  -----")
        for index, (tokens, mlp_tokens) in enumerate(zip(self.layer_video_tokens, self.layer_mlp_video_tokens)):
            marker = f"  ← stage (prune {stage_at[index].prune_ratio:.2f})" if index in stage_at else ""
            keep = (tokens + mlp_tokens) / (2 * spec.video_tokens)
            lines.append(f"  {index:>5}  {tokens:>10}  {mlp_tokens:>9}  {keep:5.3f}{marker}")
        lines.append("")
        lines.append(f"  retention (mean over layers): {self.retention:.3f}")
        lines.append(f"  input-level keep fraction:    {self.input_keep_fraction:.3f}")
        lines.append(
            f"  prefill FLOPs: {self.prefill_tflops:.2f} TFLOP vs {self.unpruned_prefill_tflops:.2f} unpruned "
            f"(ratio {self.flops_ratio:.3f})"
        )
        lines.extend(f"  note: {note}" for note in self.notes)
        return "\n".join(lines)


def _plain(value: Any) -> Any:
    """JSON form of a plan field: config objects as their YAML mapping, tuples as lists."""
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, tuple):
        return [_plain(item) for item in value]
    return value


def _dataclass_dict(value: Any, extra: tuple[str, ...] = ()) -> dict[str, Any]:
    fields = {name: _plain(item) for name, item in vars(value).items()}
    fields.update({name: _plain(getattr(value, name)) for name in extra})
    return fields


def _resolve_schedule(policy: Policy, spec: ModelSpec) -> list[tuple[int, float, SelectorConfig | None]]:
    """``(layer, prune_ratio, selector override)`` of each stage."""
    schedule = policy.layer.schedule
    stages: list[tuple[int, float, SelectorConfig | None]]
    if isinstance(schedule, DepthFractionSchedule):
        stages = [
            (math.floor(fraction * spec.num_layers), ratio, None)
            for fraction, ratio in zip(schedule.fractions, schedule.prune_ratios)
        ]
        layers = [layer for layer, _, _ in stages]
        if len(set(layers)) != len(layers):
            raise PlanError(
                f"policy {policy.name!r}: layer.schedule fractions {schedule.fractions} give duplicate stage layers "
                f"{layers} on {spec.name} ({spec.num_layers} layers)"
            )
    else:
        stages = [(stage.layer, stage.prune_ratio, stage.selector) for stage in schedule.stages]
    for layer, _, _ in stages:
        if layer >= spec.num_layers:
            raise PlanError(
                f"policy {policy.name!r}: layer.schedule has a stage at layer {layer}, but {spec.name} has "
                f"{spec.num_layers} decoder layers (valid stage layers: 0..{spec.num_layers - 1})"
            )
        if layer < spec.first_stage_layer:
            raise PlanError(
                f"policy {policy.name!r}: layer.schedule has a stage at layer {layer}, but {spec.name} "
                f"({spec.model_type}) still adds features at the video positions after decoder layers "
                f"0..{spec.first_stage_layer - 1} (e.g. Qwen3-VL's deepstack), which a frame-level stage cannot follow "
                f"(valid stage layers: {spec.first_stage_layer}..{spec.num_layers - 1})"
            )
        if layer in spec.recurrent_layers:
            valid = [i for i in range(spec.first_stage_layer, spec.num_layers) if i not in spec.recurrent_layers]
            raise PlanError(
                f"policy {policy.name!r}: layer.schedule has a stage at layer {layer}, but {spec.name} "
                f"({spec.model_type}) mixes tokens there by linear attention (a recurrence), which has no attention "
                f"to score relevance with; place stages on its attention layers (valid stage layers: {valid})"
            )
    if not policy.layer.enabled and stages:
        kept = math.prod(1.0 - ratio for _, ratio, _ in stages)
        stages = [(stages[0][0], 1.0 - kept, stages[0][2])]
    return stages


def _layer_flops(spec: ModelSpec, attention_tokens: int, mlp_tokens: int) -> float:
    hidden, inter = spec.hidden_size, spec.intermediate_size
    kv_dim = spec.num_key_value_heads * spec.head_dim
    projections = 2 * attention_tokens * (2 * hidden * hidden + 2 * hidden * kv_dim)
    # Causal attention: QKᵀ and AV each cost about S²/2 · hidden multiply-adds.
    attention = 2 * attention_tokens * attention_tokens * hidden
    mlp = 2 * mlp_tokens * 3 * hidden * inter
    return float(projections + attention + mlp)


def compile_plan(policy: Policy | str, model_or_spec: Any, *, frames: int | None = None) -> PruningPlan:
    """Compile ``policy`` for a model: a catalogue name, config path, spec, config or model object.

    Raises :class:`~hieravid.errors.PlanError` for infeasible plans (stage beyond depth, nothing left).
    """
    policy = load_policy(policy)
    spec = load_spec(model_or_spec, frames=frames)
    newlines = spec.newline_tokens if policy.keep_newlines else 0
    content = spec.frame_tokens
    notes: list[str] = []

    seg = policy.segment
    removed = seg.removed_tokens(spec.frames, spec.tokens_per_frame) if seg.enabled else 0
    content -= removed
    segment_plan = SegmentPlan(config=seg if seg.enabled else None, video_tokens_after=content + spec.newline_tokens)

    frame = policy.frame
    stages: list[StagePlan] = []
    raw_stages = _resolve_schedule(policy, spec) if (frame.enabled or policy.layer.enabled) else []
    if not policy.layer.enabled and len(raw_stages) == 1 and policy.layer.schedule is not None:
        notes.append("layer level off: the whole schedule is applied at its first stage layer")
    if not frame.enabled and raw_stages:
        notes.append("frame level off: stages keep the globally most relevant tokens (no segments, no diversity)")
    query_rows = frame.relevance.query_rows or spec.default_query_rows
    # Dynamic budgets need segment marginal values, which only HieraVid's segment level produces.
    budget = frame.dynamic_budget if frame.dynamic_budget.enabled and segment_plan.makes_segments else None
    for layer, ratio, override in raw_stages:
        before = content
        content = math.floor(content * (1.0 - ratio))
        if content == 0:
            raise PlanError(
                f"policy {policy.name!r}: the stage at layer {layer} (prune_ratio {ratio}) leaves no video token "
                f"of {spec.name}'s {spec.frame_tokens} ({spec.frames} frames); lower the prune ratios"
            )
        selector = (override or frame.selector) if frame.enabled else TopkRelevanceSelector()
        stages.append(
            StagePlan(
                layer=layer,
                prune_ratio=ratio,
                prune_point=policy.layer.prune_point,
                selector=selector,
                per_segment=frame.enabled,
                relevance_sign=frame.relevance.sign,
                query_rows=query_rows,
                budget=budget if frame.enabled else None,
                video_tokens_before=before + newlines if stages else before + spec.newline_tokens,
                video_tokens_after=content + newlines,
            )
        )

    layer_tokens: list[int] = []
    layer_mlp_tokens: list[int] = []
    flops = 0.0
    current = segment_plan.video_tokens_after
    stage_at = {stage.layer: stage for stage in stages}
    for index in range(spec.num_layers):
        layer_tokens.append(current)
        stage = stage_at.get(index)
        after = stage.video_tokens_after if stage is not None else current
        mlp_tokens = after if stage is not None and stage.prune_point == "after_attention" else current
        layer_mlp_tokens.append(mlp_tokens)
        flops += _layer_flops(spec, spec.text_tokens + current, spec.text_tokens + mlp_tokens)
        current = after
    unpruned = spec.num_layers * _layer_flops(
        spec, spec.text_tokens + spec.video_tokens, spec.text_tokens + spec.video_tokens
    )
    retention = (sum(layer_tokens) + sum(layer_mlp_tokens)) / (2 * spec.num_layers * spec.video_tokens)
    return PruningPlan(
        policy=policy,
        spec=spec,
        segment=segment_plan,
        stages=tuple(stages),
        keep_newlines=policy.keep_newlines,
        layer_video_tokens=tuple(layer_tokens),
        layer_mlp_video_tokens=tuple(layer_mlp_tokens),
        retention=retention,
        input_keep_fraction=segment_plan.video_tokens_after / spec.video_tokens,
        flops_ratio=flops / unpruned,
        prefill_tflops=flops / 1e12,
        unpruned_prefill_tflops=unpruned / 1e12,
        notes=tuple(notes),
    )
