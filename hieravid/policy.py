"""The policy schema: strict, frozen, versioned pydantic models loaded from YAML.

A policy says *what* to prune at each of the three HieraVid levels; the planner
(:mod:`hieravid.plan`) turns it into a concrete per-layer plan for one model.
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)

from hieravid.errors import PolicyError

POLICY_VERSION = 1
POLICY_KIND = "PruningPolicy"

UnitFraction = Annotated[float, Field(ge=0.0, le=1.0)]
PruneRatio = Annotated[float, Field(ge=0.0, lt=1.0)]

#: Added before flooring ``n * ratio`` (as the operators do, ``hieravid.ops._util.FLOOR_GUARD``) so that
#: decimal ratios floor to the value a person computes by hand (0.57 · 100 = 57).
_FLOOR_GUARD = 1e-9


def _floor_product(n: int, ratio: float) -> int:
    return math.floor(n * ratio + _FLOOR_GUARD)


class _Strict(BaseModel):
    """Base of every policy section: unknown keys rejected, immutable, no silent coercion of strings."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, validate_default=True)


class SegmentLevel(_Strict):
    """Segment level (SPEC §2.1): temporal segmentation, segment values and merging before layer 0."""

    enabled: bool = True
    kind: Literal["hieravid"] = "hieravid"
    similarity_threshold: UnitFraction = Field(
        0.6, description="τ: same-position cosine above which a token is redundant"
    )
    segment_threshold: UnitFraction = Field(0.4, description="β: a frame less redundant than this opens a new segment")
    merge_ratio: PruneRatio = Field(0.5, description="ρ0: fraction of video tokens merged into anchors")
    marginal_value_weight: UnitFraction = Field(0.5, description="λ: weight of novelty vs. the past in MV")

    @property
    def static_prune_ratio(self) -> float:
        """Fraction of frame tokens this level removes (for the planner's static estimate)."""
        return self.merge_ratio

    def removed_tokens(self, frames: int, tokens_per_frame: int) -> int:
        """Tokens the merge absorbs in a video of ``frames × tokens_per_frame``: ``min(⌊ρ0·F·P⌋, (F-1)·P)``
        (frame 0 is never absorbed; ``hieravid.ops.num_merged_tokens``)."""
        return min(_floor_product(frames * tokens_per_frame, self.merge_ratio), (frames - 1) * tokens_per_frame)


class _InputPruner(_Strict):
    """Base of the peer methods' input-level operators: each removes ``prune_ratio`` of the frame tokens
    before layer 0 and leaves the whole video as one segment for the frame level."""

    enabled: bool = True
    prune_ratio: PruneRatio = Field(0.5, description="fraction of frame tokens removed before layer 0")

    @property
    def static_prune_ratio(self) -> float:
        return self.prune_ratio

    def removed_tokens(self, frames: int, tokens_per_frame: int) -> int:
        """Tokens the operator removes from a video of ``frames × tokens_per_frame`` (``⌊ρ·F·P⌋`` unless an
        operator documents a cap; exact, except an upper bound for FrameFusion). The planner's estimate."""
        return _floor_product(frames * tokens_per_frame, self.prune_ratio)


class EvsInput(_InputPruner):
    """EVS (vLLM): drop the tokens least different from the previous frame's same-position token."""

    kind: Literal["evs"]

    def removed_tokens(self, frames: int, tokens_per_frame: int) -> int:
        """``min(⌊ρ·F·P⌋, (F-1)·P)``: frame 0 is always kept."""
        return min(super().removed_tokens(frames, tokens_per_frame), (frames - 1) * tokens_per_frame)


class DycokeInput(_InputPruner):
    """DyCoke's temporal token merging (TTM), as its authors' code does it (``hieravid.ops.dycoke``): frames
    in pairs, the second of a pair keeps its ``⌊(1 − k)·P⌋`` positions least similar to the first; then in
    windows of 4 (starts ``i < F − 4``) frame ``i + 2`` is pruned the same way against frame ``i``.

    ``prune_ratio`` is DyCoke's ``k``: the fraction of each *pruned frame's* tokens removed (default 0.7, the
    authors'), not a fraction of the whole video."""

    kind: Literal["dycoke"]
    prune_ratio: PruneRatio = Field(
        0.7, description="k: fraction of each pruned frame's tokens removed (DyCoke's pruning rate)"
    )
    odd_last_frame: Literal["keep", "drop"] = Field(
        "keep",
        description="the last frame of an odd frame count has no partner: keep it whole, or drop it entirely "
        "(what the authors' code does)",
    )

    def removed_tokens(self, frames: int, tokens_per_frame: int) -> int:
        """``(⌊F/2⌋ + ⌊(F−1)/4⌋)·(P − ⌊(1 − k)·P⌋)``, plus ``P`` when an odd last frame is dropped (``F >= 3``).

        ``⌊F/2⌋`` frames are pruned in pairs and ``⌊(F−1)/4⌋`` re-pruned in windows of 4 (none for ``F <= 4``,
        where the authors' code fails; a single frame is kept whole)."""
        pruned = frames // 2 + (frames - 1) // 4
        removed = pruned * (tokens_per_frame - _floor_product(tokens_per_frame, 1.0 - self.prune_ratio))
        if self.odd_last_frame == "drop" and frames % 2 == 1 and frames >= 3:
            removed += tokens_per_frame
        return removed


class VidCom2Input(_InputPruner):
    """VidCom2, as its authors' code does it (``hieravid.ops.vidcom2``): per-frame budgets from how unlike the
    video a frame is, then each frame's tokens least similar to their frame and to the video (multi-scale
    Gaussian on the lower-variance half of the channels), corrected globally to an exact total."""

    kind: Literal["vidcom2"]
    temperature: float = Field(0.01, gt=0.0, description="softmax temperature of the frame budgets")

    def removed_tokens(self, frames: int, tokens_per_frame: int) -> int:
        """``N − R`` with ``R = max(F, min(⌊N·(1 − q)⌋, N))`` kept, ``N = F·P`` (at least one token per frame
        on average)."""
        total = frames * tokens_per_frame
        return total - max(frames, min(_floor_product(total, 1.0 - self.prune_ratio), total))


class FrameFusionInput(_InputPruner):
    """FrameFusion's merging stage: merge tokens whose same-position similarity to the previous frame
    exceeds a threshold, at most ``prune_ratio`` of the tokens."""

    kind: Literal["framefusion"]
    similarity_threshold: UnitFraction = 0.6

    def removed_tokens(self, frames: int, tokens_per_frame: int) -> int:
        """Upper bound ``min(⌊ρ·F·P⌋, (F-1)·P)``: only pairs above the threshold are merged."""
        return min(super().removed_tokens(frames, tokens_per_frame), (frames - 1) * tokens_per_frame)


class UniformInput(_InputPruner):
    """Keep evenly spaced tokens of every frame (baseline)."""

    kind: Literal["uniform"]


class RandomInput(_InputPruner):
    """Keep random tokens (seeded, deterministic; baseline)."""

    kind: Literal["random"]
    seed: int = 0


def _input_level_kind(value: Any) -> str:
    if isinstance(value, dict):
        return str(value.get("kind", "hieravid"))
    return str(getattr(value, "kind", "hieravid"))


InputLevel = Annotated[
    Annotated[SegmentLevel, Tag("hieravid")]
    | Annotated[EvsInput, Tag("evs")]
    | Annotated[DycokeInput, Tag("dycoke")]
    | Annotated[VidCom2Input, Tag("vidcom2")]
    | Annotated[FrameFusionInput, Tag("framefusion")]
    | Annotated[UniformInput, Tag("uniform")]
    | Annotated[RandomInput, Tag("random")],
    Discriminator(_input_level_kind),
]
"""The segment (input) level: HieraVid's by default (``kind`` may be omitted), or a peer method's."""


class DppSelector(_Strict):
    """Greedy MAP DPP per segment on relevance-weighted cosine kernels (the HieraVid selector)."""

    kind: Literal["dpp"] = "dpp"
    max_block: int | None = Field(
        512, ge=2, description="segments larger than this are split into blocks of at most this many tokens"
    )


class TopkRelevanceSelector(_Strict):
    """Keep the k most relevant tokens of each segment."""

    kind: Literal["topk_relevance"]


class BinnedRelevanceSelector(_Strict):
    """Split each segment into k equal bins and keep the most relevant token of each (fast variant)."""

    kind: Literal["binned_relevance"]


class UniformSelector(_Strict):
    """Keep k evenly spaced tokens of each segment."""

    kind: Literal["uniform"]


class RandomSelector(_Strict):
    """Keep k random tokens of each segment (seeded, deterministic)."""

    kind: Literal["random"]
    seed: int = 0


Selector = Annotated[
    DppSelector | TopkRelevanceSelector | BinnedRelevanceSelector | UniformSelector | RandomSelector,
    Field(discriminator="kind"),
]


class Relevance(_Strict):
    """How the relevance of each video token to the question is measured at a stage layer."""

    source: Literal["last_query_attention"] = "last_query_attention"
    sign: Literal["negative", "positive"] = Field(
        "negative",
        description="negative: the authors' choice (least-attended tokens get the largest quality term); "
        "positive: the +a ablation",
    )
    query_rows: int | None = Field(
        None, ge=1, le=64, description="last prompt rows averaged; null = the adapter's default (Qwen2-VL: 4)"
    )


class DynamicBudget(_Strict):
    """Per-segment budgets κ_g = clamp((1 − ρ) + R·MV_g, min_keep, max_keep) (SPEC §2.2 step 2)."""

    enabled: bool = True
    scale: float = Field(0.1, ge=0.0, le=1.0, description="R: how much segment marginal value moves the budget")
    min_keep: UnitFraction = 0.05
    max_keep: UnitFraction = 0.95

    @model_validator(mode="after")
    def _bounds_ordered(self) -> DynamicBudget:
        if self.min_keep > self.max_keep:
            raise ValueError(f"min_keep ({self.min_keep}) must not exceed max_keep ({self.max_keep})")
        return self


class FrameLevel(_Strict):
    """Frame level (SPEC §2.2): per-segment selection of video tokens at each stage layer."""

    enabled: bool = True
    selector: Selector = Field(default_factory=DppSelector)
    relevance: Relevance = Field(default_factory=Relevance)
    dynamic_budget: DynamicBudget = Field(default_factory=DynamicBudget)


class Stage(_Strict):
    """One pruning stage: after decoder layer ``layer``, remove ``prune_ratio`` of the current video tokens.

    ``selector`` optionally overrides ``frame.selector`` at this stage only (e.g. a cheap binned selector
    at the first, largest stage); it has no effect when the frame level is off.
    """

    layer: int = Field(ge=0)
    prune_ratio: PruneRatio
    selector: Selector | None = Field(None, description="this stage's selector; null = frame.selector")


class ExplicitSchedule(_Strict):
    """Stages listed one by one."""

    kind: Literal["explicit"] = "explicit"
    stages: list[Stage] = Field(min_length=1)

    @field_validator("stages")
    @classmethod
    def _strictly_increasing(cls, stages: list[Stage]) -> list[Stage]:
        layers = [stage.layer for stage in stages]
        for previous, current in itertools.pairwise(layers):
            if current <= previous:
                raise ValueError(f"stage layers must be strictly increasing without duplicates, got {layers}")
        return stages


class DepthFractionSchedule(_Strict):
    """Stages at fixed fractions of the model depth: layer = floor(fraction · L) (e.g. every L/4 layers)."""

    kind: Literal["depth_fraction"]
    fractions: list[Annotated[float, Field(gt=0.0, lt=1.0)]] = Field(min_length=1)
    prune_ratios: list[PruneRatio] = Field(min_length=1)

    @model_validator(mode="after")
    def _consistent(self) -> DepthFractionSchedule:
        if len(self.fractions) != len(self.prune_ratios):
            raise ValueError(
                f"fractions ({len(self.fractions)} values) and prune_ratios ({len(self.prune_ratios)} values) "
                "must have the same length"
            )
        for previous, current in zip(self.fractions, self.fractions[1:]):
            if current <= previous:
                raise ValueError(f"fractions must be strictly increasing, got {self.fractions}")
        return self


Schedule = Annotated[ExplicitSchedule | DepthFractionSchedule, Field(discriminator="kind")]


class LayerLevel(_Strict):
    """Layer level (SPEC §2.3): the schedule of stages along depth.

    When disabled, the schedule collapses to its first stage: all frame-level pruning happens at
    that one layer, removing as much as the whole schedule would (no gradual shrinkage).
    """

    enabled: bool = True
    prune_point: Literal["after_attention", "after_mlp"] = Field(
        "after_attention",
        description="where a stage cuts: between the stage layer's attention and MLP, or after its MLP "
        "(identical kept outputs; the DPP features are the post-attention residual either way)",
    )
    schedule: Schedule = Field(
        default_factory=lambda: DepthFractionSchedule(
            kind="depth_fraction", fractions=[0.25, 0.5, 0.75], prune_ratios=[0.3, 0.3, 0.57]
        )
    )


class Policy(_Strict):
    """A complete pruning policy. Load with :func:`load_policy`; compile with :func:`hieravid.compile_plan`."""

    version: Literal[1]
    kind: Literal["PruningPolicy"]
    name: str = Field(min_length=1)
    description: str = ""
    keep_newlines: bool = Field(True, description="keep layout newline tokens at every stage (they are structure)")
    segment: InputLevel = Field(default_factory=SegmentLevel)
    frame: FrameLevel = Field(default_factory=FrameLevel)
    layer: LayerLevel = Field(default_factory=LayerLevel)

    @property
    def prunes(self) -> bool:
        """Whether this policy removes any token at all."""
        segment_prunes = self.segment.enabled and self.segment.static_prune_ratio > 0
        return segment_prunes or self.frame.enabled or self.layer.enabled

    def to_dict(self) -> dict[str, Any]:
        """A plain, JSON/YAML-serialisable mapping that :func:`policy_from_dict` reads back unchanged."""
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        """YAML text that :func:`load_policy` reads back into an equal policy."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


_UNION_FIELDS = ("selector", "schedule", "segment")
_UNION_TAGS = (
    "dpp",
    "topk_relevance",
    "binned_relevance",
    "uniform",
    "random",
    "explicit",
    "depth_fraction",
    "hieravid",
    "evs",
    "dycoke",
    "vidcom2",
    "framefusion",
)


def _format_location(location: tuple[int | str, ...]) -> str:
    path = ""
    for part in location:
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            path += f".{part}" if path else str(part)
    return path or "<root>"


def _describe_validation_error(error: ValidationError, source: str) -> str:
    lines = [f"{source}: invalid policy ({error.error_count()} problem{'s' if error.error_count() > 1 else ''})"]
    for item in error.errors():
        # Discriminated unions add the tag (e.g. "dpp") after the union's field; a YAML reader never wrote it.
        location = tuple(
            part
            for index, part in enumerate(item["loc"])
            if not (index > 0 and item["loc"][index - 1] in _UNION_FIELDS and part in _UNION_TAGS)
        )
        value = item.get("input")
        shown = repr(value) if not isinstance(value, dict) else "{...}"
        if len(shown) > 80:
            shown = shown[:77] + "..."
        message = item["msg"]
        if item["type"] == "extra_forbidden":
            message = "unknown key (not part of the schema)"
        lines.append(f"  - {_format_location(location)}: {message} (got {shown})")
    return "\n".join(lines)


def policy_from_dict(data: Any, *, source: str = "<policy>") -> Policy:
    """Validate a mapping into a :class:`Policy`; errors name ``source``, the field path and the value."""
    if not isinstance(data, dict):
        kind = "empty document" if data is None else f"a {type(data).__name__}"
        raise PolicyError(f"{source}: a policy must be a YAML mapping of keys to values, got {kind}")
    try:
        return Policy.model_validate(data)
    except ValidationError as error:
        raise PolicyError(_describe_validation_error(error, source)) from None


def _looks_like_yaml_text(text: str) -> bool:
    return "\n" in text or (":" in text and not text.endswith((".yaml", ".yml")))


def load_policy(path_or_text: str | Path | Policy) -> Policy:
    """Load a policy from a YAML file path or YAML text (``yaml.safe_load``; Python tags are refused).

    A :class:`Policy` passes through unchanged. Every error is a :class:`~hieravid.errors.PolicyError`
    whose message names the file, the field path and the offending value.
    """
    if isinstance(path_or_text, Policy):
        return path_or_text
    if isinstance(path_or_text, Path) or not _looks_like_yaml_text(str(path_or_text)):
        path = Path(path_or_text)
        source = str(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise PolicyError(f"{source}: policy file not found") from None
        except IsADirectoryError:
            raise PolicyError(f"{source}: is a directory, expected a YAML policy file") from None
        except (OSError, UnicodeDecodeError) as error:
            raise PolicyError(f"{source}: cannot read policy file ({error})") from None
    else:
        source, text = "<policy text>", str(path_or_text)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        detail = str(error).replace("\n", " ")
        raise PolicyError(f"{source}: not valid YAML (or uses Python tags, which are refused): {detail}") from None
    return policy_from_dict(data, source=source)
