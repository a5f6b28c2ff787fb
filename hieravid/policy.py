"""The policy schema: strict, frozen, versioned pydantic models loaded from YAML.

A policy says *what* to prune at each of the three HieraVid levels; the planner
(:mod:`hieravid.plan`) turns it into a concrete per-layer plan for one model.
"""

from __future__ import annotations

import importlib.metadata
import itertools
import math
import reprlib
import typing
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializeAsAny,
    ValidationError,
    WrapValidator,
    field_validator,
    model_validator,
)

from hieravid.errors import PolicyError

POLICY_VERSION = 1
POLICY_KIND = "PruningPolicy"

UnitFraction = Annotated[float, Field(ge=0.0, le=1.0)]
#: Largest DPP block (the kernel of a block is ``max_block²`` values).
MAX_DPP_BLOCK = 1 << 16
#: Stage layers are below this (no VideoLLM comes close; the planner checks the model's own depth).
MAX_LAYERS = 1024
PruneRatio = Annotated[float, Field(ge=0.0, lt=1.0)]

#: Added before flooring ``n * ratio`` (as the operators do, ``hieravid.ops._util.FLOOR_GUARD``) so that
#: decimal ratios floor to the value a person computes by hand (0.57 · 100 = 57).
_FLOOR_GUARD = 1e-9


def _floor_product(n: int, ratio: float) -> int:
    return math.floor(n * ratio + _FLOOR_GUARD)


class _Strict(BaseModel):
    """Base of every policy section: unknown keys rejected, immutable, no silent coercion of strings."""

    # Every numeric field has a range (``tests/test_policy.py`` checks); infinities and NaN are refused everywhere.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, validate_default=True, allow_inf_nan=False)


# ------------------------------------------------------------------------------------------ open registries
class _KindRegistry:
    """The config classes of one extensible policy field, by ``kind`` tag.

    A config class registers itself when it is defined (any subclass of the field's base class that fixes
    ``kind`` to one ``Literal`` value), so built-in and third-party classes are alike. A YAML ``kind`` that no
    loaded class declares is looked up in the entry-point group ``group`` (entry-point name = the kind, value =
    ``"package.module:ConfigClass"``); loading that module also registers the operator bound to the class.
    """

    def __init__(self, what: str, group: str) -> None:
        self.what = what
        self.group = group
        self._classes: dict[str, type] = {}

    def add(self, kind: str, cls: type) -> None:
        current = self._classes.get(kind)
        if current is not None and current.__qualname__ != cls.__qualname__:
            raise TypeError(
                f"{self.what} kind {kind!r} is already declared by {current.__module__}.{current.__qualname__}; "
                f"{cls.__module__}.{cls.__qualname__} cannot declare it too"
            )
        self._classes[kind] = cls

    def kinds(self) -> tuple[str, ...]:
        """Every declared kind (built-in and loaded third-party ones)."""
        return tuple(self._classes)

    def classes(self) -> tuple[type, ...]:
        return tuple(self._classes.values())

    def get(self, kind: str) -> type:
        """The config class declaring ``kind``, loading it from its entry point if needed."""
        cls = self._classes.get(kind)
        if cls is None:
            cls = self._from_entry_point(kind)
        if cls is None:
            known = ", ".join(sorted(self._classes))
            raise ValueError(
                f"unknown {self.what} kind {kind!r}; known kinds: {known} (third-party kinds register through the "
                f"{self.group!r} entry-point group)"
            )
        return cls

    def _from_entry_point(self, kind: str) -> type | None:
        try:
            found = [entry for entry in importlib.metadata.entry_points(group=self.group) if entry.name == kind]
        except Exception:  # a broken environment must not break built-in kinds
            return None
        if not found:
            return None
        try:
            loaded = found[0].load()
        except Exception as error:
            raise ValueError(
                f"{self.what} kind {kind!r}: entry point {found[0].value!r} ({self.group!r}) failed to load: "
                f"{type(error).__name__}: {error}"
            ) from error
        cls = self._classes.get(kind)
        if cls is None or (isinstance(loaded, type) and loaded is not cls):
            raise ValueError(
                f"{self.what} kind {kind!r}: entry point {found[0].value!r} ({self.group!r}) did not declare a config "
                f"class with kind {kind!r}"
            )
        return cls


def _declared_kind(cls: type[BaseModel]) -> str | None:
    """The one ``Literal`` value a config class fixes its ``kind`` to (None for abstract bases)."""
    field = cls.model_fields.get("kind")
    if field is None or typing.get_origin(field.annotation) is not Literal:
        return None
    values = typing.get_args(field.annotation)
    return str(values[0]) if len(values) == 1 else None


class _OperatorConfig(_Strict):
    """Base of the extensible config families: each concrete subclass fixes ``kind`` to one ``Literal``."""

    _registry: ClassVar[_KindRegistry]
    _default_kind: ClassVar[str | None] = None

    kind: str

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        super().__pydantic_init_subclass__(**kwargs)
        kind = _declared_kind(cls)
        if kind is not None:
            cls._registry.add(kind, cls)

    @classmethod
    def _validate_by_kind(cls, value: Any, handler: Any) -> Any:
        """Validate a mapping into the config class its ``kind`` names (the field's open union)."""
        if isinstance(value, cls):
            return value
        if not isinstance(value, dict):
            raise ValueError(f"expected a mapping with a 'kind' key, got {type(value).__name__}")
        kind = value.get("kind", cls._default_kind)
        if kind is None:
            raise ValueError(f"missing 'kind'; known kinds: {', '.join(sorted(cls._registry.kinds()))}")
        if not isinstance(kind, str):
            raise ValueError(f"'kind' must be a string, got {kind!r}")
        return cls._registry.get(kind).model_validate(value)


#: Config classes of frame-level selectors (``frame.selector``, ``layer.schedule.stages[i].selector``).
SELECTOR_KINDS = _KindRegistry("selector", "hieravid.selectors")
#: Config classes of input-level operators (``segment``): HieraVid's segment level and the peers'.
INPUT_LEVEL_KINDS = _KindRegistry("input-level operator", "hieravid.input_operators")


class SelectorConfig(_OperatorConfig):
    """Base of frame-level selector configs. A subclass with ``kind: Literal["name"] = "name"`` is a new
    selector kind in YAML; bind its operator with :func:`hieravid.ops.register_selector`."""

    _registry: ClassVar[_KindRegistry] = SELECTOR_KINDS
    #: Whether the operator reads the stage's hidden states (the runtime gathers them only then).
    uses_features: ClassVar[bool] = False


class InputLevelConfig(_OperatorConfig):
    """Base of input-level (``segment``) configs: what happens to the video before layer 0. A subclass with
    ``kind: Literal["name"] = "name"`` is a new kind in YAML; bind its operator with
    :func:`hieravid.ops.register_input_operator`."""

    _registry: ClassVar[_KindRegistry] = INPUT_LEVEL_KINDS
    _default_kind: ClassVar[str | None] = "hieravid"
    #: Whether the operator splits the video into temporal segments with marginal values (HieraVid's segment
    #: level); otherwise the whole video is one segment for the frame level.
    makes_segments: ClassVar[bool] = False

    enabled: bool = True

    @property
    def static_prune_ratio(self) -> float:
        """Fraction of frame tokens this level removes (for the planner's static estimate)."""
        raise NotImplementedError

    def removed_tokens(self, frames: int, tokens_per_frame: int) -> int:
        """Tokens the operator removes from a video of ``frames × tokens_per_frame`` (the planner's count)."""
        return _floor_product(frames * tokens_per_frame, self.static_prune_ratio)


SelectorField = Annotated[SerializeAsAny[SelectorConfig], WrapValidator(SelectorConfig._validate_by_kind)]
"""A selector config of any declared kind (the field validates into the class its ``kind`` names)."""
InputLevelField = Annotated[SerializeAsAny[InputLevelConfig], WrapValidator(InputLevelConfig._validate_by_kind)]
"""An input-level config of any declared kind (``kind`` may be omitted: HieraVid's segment level)."""


# ------------------------------------------------------------------------------------------ input level
class SegmentLevel(InputLevelConfig):
    """Segment level (SPEC §2.1): temporal segmentation, segment values and merging before layer 0."""

    makes_segments: ClassVar[bool] = True

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


class InputPruner(InputLevelConfig):
    """Base of the peer methods' input-level operators: each removes ``prune_ratio`` of the frame tokens
    before layer 0 and leaves the whole video as one segment for the frame level."""

    prune_ratio: PruneRatio = Field(0.5, description="fraction of frame tokens removed before layer 0")

    @property
    def static_prune_ratio(self) -> float:
        return self.prune_ratio

    def removed_tokens(self, frames: int, tokens_per_frame: int) -> int:
        """Tokens the operator removes from a video of ``frames × tokens_per_frame`` (``⌊ρ·F·P⌋`` unless an
        operator documents a cap; exact, except an upper bound for FrameFusion). The planner's estimate."""
        return _floor_product(frames * tokens_per_frame, self.prune_ratio)


class EvsInput(InputPruner):
    """EVS (vLLM): drop the tokens least different from the previous frame's same-position token."""

    kind: Literal["evs"] = "evs"

    def removed_tokens(self, frames: int, tokens_per_frame: int) -> int:
        """``min(⌊ρ·F·P⌋, (F-1)·P)``: frame 0 is always kept."""
        return min(super().removed_tokens(frames, tokens_per_frame), (frames - 1) * tokens_per_frame)


class DycokeInput(InputPruner):
    """DyCoke's temporal token merging (TTM), as its authors' code does it (``hieravid.ops.dycoke``): frames
    in pairs, the second of a pair keeps its ``⌊(1 − k)·P⌋`` positions least similar to the first; then in
    windows of 4 (starts ``i < F − 4``) frame ``i + 2`` is pruned the same way against frame ``i``.

    ``prune_ratio`` is DyCoke's ``k``: the fraction of each *pruned frame's* tokens removed (default 0.7, the
    authors'), not a fraction of the whole video."""

    kind: Literal["dycoke"] = "dycoke"
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


class VidCom2Input(InputPruner):
    """VidCom2, as its authors' code does it (``hieravid.ops.vidcom2``): per-frame budgets from how unlike the
    video a frame is, then each frame's tokens least similar to their frame and to the video (multi-scale
    Gaussian on the lower-variance half of the channels), corrected globally to an exact total."""

    kind: Literal["vidcom2"] = "vidcom2"
    temperature: float = Field(0.01, gt=0.0, le=1000.0, description="softmax temperature of the frame budgets")

    def removed_tokens(self, frames: int, tokens_per_frame: int) -> int:
        """``N − R`` with ``R = max(F, min(⌊N·(1 − q)⌋, N))`` kept, ``N = F·P`` (at least one token per frame
        on average)."""
        total = frames * tokens_per_frame
        return total - max(frames, min(_floor_product(total, 1.0 - self.prune_ratio), total))


class FrameFusionInput(InputPruner):
    """FrameFusion's merging stage: merge tokens whose same-position similarity to the previous frame
    exceeds a threshold, at most ``prune_ratio`` of the tokens."""

    kind: Literal["framefusion"] = "framefusion"
    similarity_threshold: UnitFraction = 0.6

    def removed_tokens(self, frames: int, tokens_per_frame: int) -> int:
        """Upper bound ``min(⌊ρ·F·P⌋, (F-1)·P)``: only pairs above the threshold are merged."""
        return min(super().removed_tokens(frames, tokens_per_frame), (frames - 1) * tokens_per_frame)


class UniformInput(InputPruner):
    """Keep evenly spaced tokens of every frame (baseline)."""

    kind: Literal["uniform"] = "uniform"


class RandomInput(InputPruner):
    """Keep random tokens (seeded, deterministic; baseline)."""

    kind: Literal["random"] = "random"
    seed: int = Field(0, ge=0, lt=2**63, description="seed of the random draw (a 64-bit signed integer)")


# ------------------------------------------------------------------------------------------ frame level
class DppSelector(SelectorConfig):
    """Greedy MAP DPP per segment on relevance-weighted cosine kernels (the HieraVid selector)."""

    uses_features: ClassVar[bool] = True

    kind: Literal["dpp"] = "dpp"
    max_block: int | None = Field(
        512,
        ge=2,
        le=MAX_DPP_BLOCK,
        description="segments larger than this are split into blocks of at most this many tokens (null: never)",
    )


class TopkRelevanceSelector(SelectorConfig):
    """Keep the k most relevant tokens of each segment."""

    kind: Literal["topk_relevance"] = "topk_relevance"


class BinnedRelevanceSelector(SelectorConfig):
    """Split each segment into k equal bins and keep the most relevant token of each (fast variant)."""

    kind: Literal["binned_relevance"] = "binned_relevance"


class UniformSelector(SelectorConfig):
    """Keep k evenly spaced tokens of each segment."""

    kind: Literal["uniform"] = "uniform"


class RandomSelector(SelectorConfig):
    """Keep k random tokens of each segment (seeded, deterministic)."""

    kind: Literal["random"] = "random"
    seed: int = Field(0, ge=0, lt=2**63, description="seed of the random draw (a 64-bit signed integer)")


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
    selector: SelectorField = Field(default_factory=DppSelector)
    relevance: Relevance = Field(default_factory=Relevance)
    dynamic_budget: DynamicBudget = Field(default_factory=DynamicBudget)


class Stage(_Strict):
    """One pruning stage: after decoder layer ``layer``, remove ``prune_ratio`` of the current video tokens.

    ``selector`` optionally overrides ``frame.selector`` at this stage only (e.g. a cheap binned selector
    at the first, largest stage); it has no effect when the frame level is off.
    """

    layer: int = Field(ge=0, lt=MAX_LAYERS)
    prune_ratio: PruneRatio
    selector: SelectorField | None = Field(None, description="this stage's selector; null = frame.selector")


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
    segment: InputLevelField = Field(default_factory=SegmentLevel)
    frame: FrameLevel = Field(default_factory=FrameLevel)
    layer: LayerLevel = Field(default_factory=LayerLevel)

    @field_validator("version", mode="before")
    @classmethod
    def _integer_version(cls, value: Any) -> Any:
        # YAML's `true` and `1.0` equal 1 in Python; a version is written as the integer 1.
        if type(value) is not int:
            raise ValueError(f"version must be the integer {POLICY_VERSION}, got {type(value).__name__} {value!r}")
        return value

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


def _union_tags(annotation: Any) -> frozenset[str]:
    """The ``kind`` tags of a closed discriminated union of config classes (pydantic adds them to error paths)."""
    members = typing.get_args(typing.get_args(annotation)[0]) if typing.get_origin(annotation) is Annotated else ()
    return frozenset(tag for member in members if (tag := _declared_kind(member)) is not None)


#: Tags pydantic inserts after ``schedule`` in error locations (the closed union of schedule kinds); the open
#: selector and input-level fields validate by ``kind`` themselves and add none.
_SCHEDULE_TAGS = _union_tags(Schedule)


#: Bounded ``repr`` for values shown in error messages: a huge or deeply aliased YAML value costs no more than
#: its first few items.
class _ShortRepr(reprlib.Repr):
    def repr_int(self, x: int, level: int) -> str:
        # Python refuses to print integers of more than 4300 digits (and printing a huge one is slow).
        if x.bit_length() > 200:
            return f"<an integer of {x.bit_length()} bits>"
        return super().repr_int(x, level)


_SHORT_REPR = _ShortRepr()
_SHORT_REPR.maxlevel, _SHORT_REPR.maxstring, _SHORT_REPR.maxother = 2, 60, 60
_SHORT_REPR.maxdict = _SHORT_REPR.maxlist = _SHORT_REPR.maxtuple = _SHORT_REPR.maxset = 4


def _format_location(location: tuple[int | str, ...]) -> str:
    path = ""
    for part in location:
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            path += f".{part}" if path else str(part)
    return path or "<root>"


def _describe_validation_error(error: ValidationError, source: str) -> str:
    count = error.error_count()
    lines = [f"{source}: invalid policy ({count} problem{'s' if count > 1 else ''})"]
    for item in error.errors()[:MAX_LISTED_PROBLEMS]:
        # The schedule union adds its tag (e.g. "explicit") after the field; a YAML reader never wrote it.
        location = tuple(
            part
            for index, part in enumerate(item["loc"])
            if not (index > 0 and item["loc"][index - 1] == "schedule" and part in _SCHEDULE_TAGS)
        )
        value = item.get("input")
        shown = _SHORT_REPR.repr(value) if not isinstance(value, dict) else "{...}"
        if len(shown) > 80:
            shown = shown[:77] + "..."
        message = item["msg"]
        if item["type"] == "extra_forbidden":
            message = "unknown key (not part of the schema)"
        lines.append(f"  - {_format_location(location)}: {message} (got {shown})")
    if count > MAX_LISTED_PROBLEMS:
        lines.append(f"  - ... and {count - MAX_LISTED_PROBLEMS} more")
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


# ------------------------------------------------------------------------------------------ hostile input
#: Largest policy accepted (file or text), in bytes; shipped policies are about 1 kB.
MAX_POLICY_BYTES = 1 << 20
#: Deepest nesting of mappings and lists accepted (a policy nests 6 levels: ``layer.schedule.stages[i].selector``).
MAX_POLICY_DEPTH = 32
#: Most YAML nodes (scalars, mappings, lists) a policy may hold (a shipped policy has about 50).
MAX_POLICY_NODES = 5_000
#: Problems listed in a validation error (the rest are counted).
MAX_LISTED_PROBLEMS = 20


class _PolicyComposer(yaml.composer.Composer):
    """Builds the node tree from parser events, refusing what a policy never needs and a hostile file abuses:
    anchors and aliases (an alias "bomb" expands a few hundred bytes into gigabytes once traversed), nesting
    deeper than :data:`MAX_POLICY_DEPTH` and more than :data:`MAX_POLICY_NODES` nodes."""

    def __init__(self) -> None:
        super().__init__()
        self._depth = 0
        self._nodes = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            what = f"alias *{event.anchor}" if isinstance(event, yaml.AliasEvent) else f"anchor &{event.anchor}"
            raise yaml.composer.ComposerError(
                None, None, f"found {what}: anchors and aliases are not allowed in a policy", event.start_mark
            )
        self._nodes += 1
        if self._nodes > MAX_POLICY_NODES:
            raise yaml.composer.ComposerError(
                None, None, f"more than {MAX_POLICY_NODES} values: not a policy", event.start_mark
            )
        self._depth += 1
        try:
            if self._depth > MAX_POLICY_DEPTH:
                raise yaml.composer.ComposerError(
                    None, None, f"nested more than {MAX_POLICY_DEPTH} levels deep: not a policy", event.start_mark
                )
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


class _PolicyConstructor(yaml.constructor.SafeConstructor):
    """``yaml.safe_load``'s constructor, refusing duplicate keys (YAML says keys are unique; PyYAML silently keeps
    the last one) and merge keys (``<<``)."""

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, Any] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    raise yaml.constructor.ConstructorError(
                        None, None, "merge keys (<<) are not allowed in a policy", key_node.start_mark
                    )
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.get(key)
                except TypeError:  # unhashable: the base class reports it
                    break
                if first is not None:
                    raise yaml.constructor.ConstructorError(
                        f"in a mapping (its key {_SHORT_REPR.repr(key)} first at line {first.line + 1})",
                        node.start_mark,
                        f"found the key {_SHORT_REPR.repr(key)} again: duplicate keys are not allowed",
                        key_node.start_mark,
                    )
                seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)


class _PyPolicyLoader(
    yaml.reader.Reader,
    yaml.scanner.Scanner,
    yaml.parser.Parser,
    _PolicyComposer,
    _PolicyConstructor,
    yaml.resolver.Resolver,
):
    """The pure-Python loader (when PyYAML was built without LibYAML)."""

    def __init__(self, stream: str) -> None:
        yaml.reader.Reader.__init__(self, stream)
        yaml.scanner.Scanner.__init__(self)
        yaml.parser.Parser.__init__(self)
        _PolicyComposer.__init__(self)
        _PolicyConstructor.__init__(self)
        yaml.resolver.Resolver.__init__(self)


_PolicyLoader: type = _PyPolicyLoader
if getattr(yaml, "__with_libyaml__", False):
    from yaml.cyaml import CParser

    class _CPolicyLoader(_PolicyComposer, CParser, _PolicyConstructor, yaml.resolver.Resolver):
        """LibYAML's scanner and parser (C: linear time on a megabyte), then the checks above on its events."""

        def __init__(self, stream: str) -> None:
            CParser.__init__(self, stream)
            _PolicyComposer.__init__(self)
            _PolicyConstructor.__init__(self)
            yaml.resolver.Resolver.__init__(self)

    _PolicyLoader = _CPolicyLoader


def parse_policy_yaml(text: str) -> Any:
    """YAML text → Python data, for policies: safe tags only, no anchors, aliases, merge or duplicate keys, at most
    :data:`MAX_POLICY_BYTES`, :data:`MAX_POLICY_DEPTH` levels and :data:`MAX_POLICY_NODES` values.

    Raises:
        yaml.YAMLError: the text is not such a document; ValueError: a value YAML cannot build (an integer of more
            digits than Python converts, an impossible date).
    """
    loader = _PolicyLoader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def _read_policy_file(path: Path) -> str:
    source = str(path)
    try:
        if path.is_dir():
            raise PolicyError(f"{source}: is a directory, expected a YAML policy file")
        if not path.exists():
            raise PolicyError(f"{source}: policy file not found")
        if not path.is_file():
            raise PolicyError(f"{source}: not a regular file, expected a YAML policy file")
        with path.open("rb") as handle:
            data = handle.read(MAX_POLICY_BYTES + 1)
    except PolicyError:
        raise
    except (OSError, ValueError) as error:
        raise PolicyError(f"{source}: cannot read policy file ({error})") from None
    if len(data) > MAX_POLICY_BYTES:
        raise PolicyError(f"{source}: larger than {MAX_POLICY_BYTES} bytes: not a policy file")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise PolicyError(f"{source}: not UTF-8 text ({error})") from None


def load_policy(path_or_text: str | Path | Policy) -> Policy:
    """Load a policy from a YAML file path, YAML text or the name of a shipped policy (``"hieravid-30"``,
    ``"peers/fastv"``; :func:`shipped_policies` lists them).

    A :class:`Policy` passes through unchanged. YAML is read with safe tags only (Python tags are refused), and
    without anchors, aliases, merge keys or duplicate keys; files larger than :data:`MAX_POLICY_BYTES` or nested
    deeper than :data:`MAX_POLICY_DEPTH` are refused. Every error is a :class:`~hieravid.errors.PolicyError` whose
    message names the file, the field path and the offending value.
    """
    if isinstance(path_or_text, Policy):
        return path_or_text
    if not isinstance(path_or_text, (str, Path)):
        raise PolicyError(
            "expected a Policy, a YAML file path, YAML text or a shipped policy name, got "
            f"{type(path_or_text).__name__}"
        )
    if isinstance(path_or_text, Path) or not _looks_like_yaml_text(path_or_text):
        return load_policy_file(path_or_text)
    if len(path_or_text.encode("utf-8", "surrogatepass")) > MAX_POLICY_BYTES:
        raise PolicyError(f"<policy text>: larger than {MAX_POLICY_BYTES} bytes: not a policy")
    return _parse(path_or_text, "<policy text>")


def load_policy_file(reference: str | Path) -> Policy:
    """A policy file, or (a string that names no file) a shipped policy by name — never YAML text: what a
    command-line argument or a configuration value names.

    Raises:
        PolicyError: no such file and no such shipped policy (the message lists them), or an invalid policy.
    """
    path = Path(reference)
    if isinstance(reference, str) and not _exists(path):
        shipped = shipped_policy_path(reference)
        if shipped is not None:
            return _load_shipped(reference, shipped)
        if not reference.endswith((".yaml", ".yml")) and "/" not in reference and "\\" not in reference:
            raise PolicyError(
                f"{reference}: no such policy file, and not the name of a shipped policy (shipped: "
                f"{', '.join(shipped_policies())}; `hieravid policies` lists them)"
            )
    return _parse(_read_policy_file(path), str(path))


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except (OSError, ValueError):
        return False


def _parse(text: str, source: str) -> Policy:
    try:
        data = parse_policy_yaml(text)
    except yaml.YAMLError as error:
        detail = " ".join(str(error).split())
        if len(detail) > 400:
            detail = detail[:397] + "..."
        refused = "tag" in detail and "constructor" in detail
        why = " (Python tags and other custom tags are refused)" if refused else ""
        raise PolicyError(f"{source}: not valid YAML for a policy{why}: {detail}") from None
    except (ValueError, OverflowError, RecursionError) as error:
        detail = " ".join(str(error).split())[:200]
        raise PolicyError(f"{source}: a value cannot be read ({type(error).__name__}: {detail})") from None
    return policy_from_dict(data, source=source)


# ------------------------------------------------------------------------------------------ shipped policies
#: The package (``hieravid.policies``, the repository's ``policies/`` folder) that holds the shipped policies.
SHIPPED_PACKAGE = "hieravid.policies"


def _shipped_root() -> Any:
    from importlib import resources

    try:
        return resources.files(SHIPPED_PACKAGE)
    except (ModuleNotFoundError, TypeError):  # pragma: no cover - hieravid imported from a checkout, not installed
        folder = Path(__file__).resolve().parents[1] / "policies"
        return folder if folder.is_dir() else None


def shipped_policies() -> dict[str, Any]:
    """The policies shipped with hieravid, by name: the file's path under ``policies/`` without ``.yaml``
    (``"hieravid-30"``, ``"none"``, ``"peers/fastv"``, ``"ablations/no-frame"``), in that order → a
    :class:`importlib.resources.abc.Traversable` of the file (read it with :func:`load_policy`).

    Installed with the package (a wheel carries them), so names work outside the repository."""
    root = _shipped_root()
    found: dict[str, Any] = {}
    if root is None:
        return found

    def walk(folder: Any, prefix: str) -> None:
        entries = sorted(folder.iterdir(), key=lambda entry: entry.name)
        for entry in entries:
            if entry.is_file() and entry.name.endswith(".yaml"):
                found[prefix + entry.name[: -len(".yaml")]] = entry
        for entry in entries:
            if entry.is_dir() and not entry.name.startswith(("_", ".")):
                walk(entry, f"{prefix}{entry.name}/")

    walk(root, "")
    return found


def shipped_policy_path(name: str) -> Any:
    """The shipped policy named ``name`` (see :func:`shipped_policies`; the policy's own ``name:`` works too, e.g.
    ``"hieravid-30-no-frame"`` for ``"ablations/no-frame"``), or None."""
    name = name.removesuffix(".yaml")
    shipped = shipped_policies()
    if name in shipped:
        return shipped[name]
    by_policy_name = {_declared_name(entry): entry for entry in shipped.values()}
    return by_policy_name.get(name)


def _declared_name(entry: Any) -> str | None:
    for line in entry.read_text(encoding="utf-8").splitlines():
        if line.startswith("name:"):
            return line.partition(":")[2].strip().strip("'\"")
    return None


def _load_shipped(name: str, entry: Any) -> Policy:
    return _parse(entry.read_text(encoding="utf-8"), f"{name} (shipped policy)")
