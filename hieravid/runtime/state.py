"""Per-request state of the runtime and the statistics it exposes (``PruningHandle.last_request``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor

__all__ = ["RequestStats", "StageStats"]


@dataclass(frozen=True)
class StageStats:
    """What one frame-level stage did in the latest prefill.

    Attributes:
        layer: the stage layer.
        prune_point: ``"after_attention"`` or ``"after_mlp"``.
        video_tokens_before: per sample, video tokens (content + newlines) entering the stage.
        video_tokens_after: per sample, video tokens kept by the stage.
        budgets: per sample, the per-segment budgets the selector received.
        kept_positions: per sample, ascending original sequence positions of the video tokens kept.
        sequence_length: rows of every layer after the stage (equal across the batch; samples that keep
            fewer rows hold masked padding slots).
    """

    layer: int
    prune_point: str
    video_tokens_before: tuple[int, ...]
    video_tokens_after: tuple[int, ...]
    budgets: tuple[tuple[int, ...], ...]
    kept_positions: tuple[Tensor, ...]
    sequence_length: int


@dataclass(frozen=True)
class RequestStats:
    """Statistics of the latest prefill seen by a :class:`~hieravid.runtime.PruningHandle`.

    Attributes:
        pruned: whether the prefill was pruned.
        reason: ``"pruned"``, ``"no video"``, ``"plan prunes nothing"``.
        batch_size: samples in the batch.
        prompt_length: original sequence length of the prefill.
        videos: per sample, a description of its video layout (frames, rows, cols, newline layout,
            span) or None.
        num_segments: per sample, the number of temporal segments (0 without video).
        frame_segment_ids: per sample, ``[F]`` segment id of each frame (None without video).
        marginal_values: per sample, ``[G]`` segment marginal values (None without video).
        input_kept_positions: per sample, ascending original positions of the video tokens entering
            layer 0 (after the segment level).
        stages: one :class:`StageStats` per frame-level stage.
        layer_video_tokens: per layer, per sample, the video tokens entering the layer's attention.
        layer_sequence_lengths: per layer, the rows entering its attention (the per-layer KV-cache
            length after the prefill).
        output_positions: ``[B, K]`` original positions of the language model's output rows (-1 for
            padding slots); the prefill's logits cover these rows only.
        stage_positions: per coordinate system (0: rows entering layer 0; ``s``: rows after stage ``s``),
            ``[B, K_s]`` original positions of its rows (-1 for padding slots).
        layouts: per sample, the :class:`~hieravid.adapters.base.VideoLayout` found (None without video).
        merge_targets: per sample, ``[F*P]`` the flat content index each content token went to at the input level
            (itself when kept, the anchor it was merged into, -1 when dropped); None without video or input level.
        frame_redundancy: per sample, ``[F]`` the input level's per-frame redundancy (None likewise).
    """

    pruned: bool
    reason: str
    batch_size: int
    prompt_length: int
    videos: tuple[dict[str, Any] | None, ...] = ()
    num_segments: tuple[int, ...] = ()
    frame_segment_ids: tuple[Tensor | None, ...] = ()
    marginal_values: tuple[Tensor | None, ...] = ()
    input_kept_positions: tuple[Tensor | None, ...] = ()
    stages: tuple[StageStats, ...] = ()
    layer_video_tokens: tuple[tuple[int, ...], ...] = ()
    layer_sequence_lengths: tuple[int, ...] = ()
    output_positions: Tensor | None = None
    stage_positions: tuple[Tensor, ...] = ()
    layouts: tuple[Any, ...] = ()
    merge_targets: tuple[Tensor | None, ...] = ()
    frame_redundancy: tuple[Tensor | None, ...] = ()

    def summary(self) -> str:
        """One line per level, for logs."""
        if not self.pruned:
            return f"not pruned ({self.reason}); batch {self.batch_size}, prompt {self.prompt_length} tokens"
        lines = [f"pruned batch {self.batch_size}, prompt {self.prompt_length} tokens"]
        for index, video in enumerate(self.videos):
            if video is None:
                lines.append(f"  sample {index}: no video")
                continue
            lines.append(
                f"  sample {index}: {video['frames']}×{video['rows']}×{video['cols']} ({video['newline_layout']}), "
                f"N_v {video['video_tokens']}, {self.num_segments[index]} segment(s), "
                f"layer 0 keeps {int(self.input_kept_positions[index].numel())}"  # type: ignore[union-attr]
            )
        for stage in self.stages:
            lines.append(
                f"  stage @ layer {stage.layer} ({stage.prune_point}): {list(stage.video_tokens_before)} → "
                f"{list(stage.video_tokens_after)}"
            )
        return "\n".join(lines)


COORD_TENSORS = ("src", "idx0", "orig", "valid", "kind", "seg")
"""The tensor fields of :class:`Coords` (all ``[B, K]``, on the device of the layers that read them)."""


@dataclass
class Coords:
    """Rows of one coordinate system (stage ``s``) of a pruned request, all ``[B, K]``.

    ``src`` indexes the previous system (stage 0: the original sequence), ``idx0`` the stage-0 rows,
    ``orig`` the original sequence. ``valid`` is False for padding slots that equalise lengths across
    the batch; ``kind`` is TEXT/CONTENT/NEWLINE/PAD; ``seg`` the segment id of content rows (else -1).
    ``counts`` holds, per sample, the video tokens (content + newlines) of the system; ``all_valid`` whether
    ``valid`` is all True — both known on the host by construction.
    """

    src: Tensor
    idx0: Tensor
    orig: Tensor
    valid: Tensor
    kind: Tensor
    seg: Tensor
    counts: tuple[int, ...]
    all_valid: bool

    @property
    def length(self) -> int:
        return int(self.src.shape[1])


@dataclass
class SampleCounts:
    """Host-side counts of one sample in the current coordinate system, known from the segment level on.

    The frame-level budgets depend only on the per-segment counts and the marginal values (both read once at
    the segment level), and a selector keeps exactly its budgets, so every later count follows on the host:
    the stages never wait for the device.
    """

    segment_tokens: Tensor
    """``[G]`` int64 (CPU) content tokens of each segment (``[1]`` when budgets are not per segment)."""
    marginal_values: Tensor
    """``[G]`` float64 (CPU) segment marginal values (zeros when budgets are not per segment)."""
    newlines: int
    """Newline rows of the video still in the sequence."""
    text: int
    """Rows that are neither video content nor newlines (text and other special tokens)."""

    @property
    def content(self) -> int:
        return int(self.segment_tokens.sum())

    @property
    def video(self) -> int:
        return self.content + self.newlines


@dataclass
class SampleRecord:
    """What the input level found and did for one sample of a prefill (the request's record)."""

    layout: Any
    """The adapter's :class:`~hieravid.adapters.base.VideoLayout`."""
    num_segments: int
    frame_segment_ids: Tensor
    marginal_values: Tensor
    input_kept_positions: Tensor
    """Ascending original positions of the video tokens (content and newlines) entering layer 0."""
    merge_target: Tensor | None
    """``[F*P]`` where each content token went (itself, its anchor, or -1 when dropped); None: level off."""
    redundancy: Tensor | None
    """``[F]`` per-frame redundancy of the input level; None: level off."""


@dataclass
class StageCapture:
    """What the query/key projection hooks of a stage layer collect for its selection."""

    stage: int
    layer: int
    position_embeddings: tuple[Tensor, Tensor]
    query: Tensor | None = None
    key: Tensor | None = None


@dataclass
class PendingCut:
    """A stage's selection, waiting for the stage layer's MLP (``after_attention``) and output to be cut."""

    layer: int
    selection: Tensor
    """``[B, K]`` rows of the stage's input coordinates the following layers keep."""
    valid: Tensor
    """``[B, K]`` False at padding slots."""
    length: int
    """Rows of the stage's input coordinates."""


@dataclass
class StageInputs:
    """What every layer of one coordinate system receives instead of the language model's own inputs."""

    mask: Any
    """The attention mask in the system's coordinates (None: causal without padding, as the model's own)."""
    position_embeddings: tuple[Tensor, Tensor] | None = None
    """RoPE ``(cos, sin)`` gathered at the system's original positions (prefill only)."""


@dataclass
class StaticSlots:
    """Per coordinate system, which slots of a static (pre-allocated) KV cache hold real rows, so that decode
    steps build each system's mask from the cache's own fill counter, without any host value."""

    slot_valid: list[Tensor | None]
    """Per system, ``[B, max_cache_len]`` bool (its layers' ``max_cache_len``): real prompt rows, and every slot past
    the prompt (decode tokens); None for a system of recurrent layers only."""
    mask_layers: list[int | None]
    """Per system, its first attention layer (whose cache counter says how many slots are filled); None for a system
    of recurrent layers only."""
    full_capacity: int | None = None
    """Slots every layer had before the cache was right-sized (None: not resized)."""


@dataclass
class Request:
    """State of one request: a prefill and the calls that continue its cache. Replaced at every new prefill.

    ``phase`` is ``"prefill"`` or ``"continuation"`` while the language model runs, ``"idle"`` between calls.
    """

    batch: int
    original_length: int = 0
    pruned: bool = False
    phase: Literal["idle", "prefill", "continuation"] = "idle"
    #: Padding slots of shorter samples go before their rows (the model has recurrent layers; see ``pack_rows``).
    padding_slots_first: bool = False
    coords: list[Coords] = field(default_factory=list)
    marginal_values: list[Tensor] = field(default_factory=list)
    schedule: list[SampleCounts] = field(default_factory=list)
    """Per sample, its row counts on the host as the input level left them."""
    budgets: list[list[Any]] = field(default_factory=list)
    """Per stage, per sample, its :class:`~hieravid.ops.budget.SegmentBudgets` (None without video), computed before
    layer 0 and uploaded in one copy: what lets the stages run without reading or copying to the device."""
    mask2d: Tensor | None = None
    """The current call's 2-D attention mask in original coordinates (bool)."""
    prompt_unmasked: bool = False
    """The prefill's 2-D mask had no zero (no left padding)."""
    stage_all_valid: list[bool] = field(default_factory=list)
    """Per coordinate system: every prompt row is real and unmasked (no padding slot, no padding)."""
    static: StaticSlots | None = None
    """Set when the cache is a static one (decode masks come from its fill counters)."""
    samples: list[SampleRecord | None] = field(default_factory=list)
    stages: list[StageStats] = field(default_factory=list)
    stage_inputs: dict[int, StageInputs] = field(default_factory=dict)
    capture: StageCapture | None = None
    pending: PendingCut | None = None
    owner: Any = None
    """The engine that runs the request (a cache filled by another handle is not continued as pruned)."""
    device: torch.device | None = None
    """Where the tensors the layers read live (see :meth:`follow`); None until the first layer reads them."""

    def total_length(self, cache: Any) -> int:
        """Original positions seen so far: the prompt, then every token the cache took since (host read)."""
        if cache is None or not self.coords:
            return self.original_length
        return self.original_length + int(cache.get_seq_length()) - self.coords[0].length

    def follow(self, device: torch.device) -> None:
        """Move what the layers read (coordinates, marginal values, 2-D mask, static-slot masks) to ``device``.

        A model split over devices (accelerate's ``dispatch_model``, ``device_map=...``) runs its later layers on
        another device; the hooks call this with the device of the rows they work on, so stage work and masks
        follow each layer. A no-op on one device. Tensors are moved in place, so holders stay valid.
        """
        if not self.coords:
            return
        # The device is kept as a plain object: reading it from a tensor would make a compiled decode step guard
        # on that tensor's shape, which changes with every request's kept counts.
        if self.device is None:
            self.device = self.coords[-1].src.device
        if self.device == device:
            return
        for coords in self.coords:
            for name in COORD_TENSORS:
                setattr(coords, name, getattr(coords, name).to(device))
        self.marginal_values = [values.to(device) for values in self.marginal_values]
        if self.mask2d is not None:
            self.mask2d = self.mask2d.to(device)
        if self.static is not None:
            self.static.slot_valid = [None if valid is None else valid.to(device) for valid in self.static.slot_valid]
        self.device = device

    def reset_call(self) -> None:
        """Forget what belongs to one language-model call (masks and stage work in flight)."""
        self.stage_inputs.clear()
        self.capture = None
        self.pending = None

    def translate_mask(self, stage: int) -> Tensor:
        """The current call's 2-D mask in the coordinates of ``stage`` (kept prompt rows, then new tokens)."""
        from hieravid.runtime.packing import translate_mask

        assert self.mask2d is not None
        coords = self.coords[stage]
        return translate_mask(self.mask2d, self.original_length, coords.orig, coords.valid)
