"""Per-request state of the runtime and the statistics it exposes (``PruningHandle.last_request``)."""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor

__all__ = ["RequestStats", "StageStats"]

# Row kinds in a coordinate system.
TEXT, CONTENT, NEWLINE, PAD = 0, 1, 2, 3


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


@dataclass
class Coords:
    """Rows of one coordinate system (stage ``s``) of a pruned request, all ``[B, K]``.

    ``src`` indexes the previous system (stage 0: the original sequence), ``idx0`` the stage-0 rows,
    ``orig`` the original sequence. ``valid`` is False for padding slots that equalise lengths across
    the batch; ``kind`` is TEXT/CONTENT/NEWLINE/PAD; ``seg`` the segment id of content rows (else -1).
    """

    src: Tensor
    idx0: Tensor
    orig: Tensor
    valid: Tensor
    kind: Tensor
    seg: Tensor
    counts: tuple[int, ...] | None = None
    """Per sample, the video tokens (content + newlines) of the system, when known on the host."""
    all_valid: bool | None = None
    """Whether ``valid`` is all True, when known on the host by construction."""

    @property
    def length(self) -> int:
        return int(self.src.shape[1])

    def video_counts(self) -> tuple[int, ...]:
        if self.counts is not None:
            return self.counts
        video = (self.kind == CONTENT) | (self.kind == NEWLINE)
        return tuple(int(v) for v in video.sum(dim=1).tolist())


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
class Request:
    """Mutable state of one request (a prefill and the calls that continue its cache).

    Reset at every new prefill. ``phase`` is ``"prefill"`` or ``"continuation"`` while the language
    model runs, ``"idle"`` between calls; ``pruned`` says whether the prefill was pruned.
    """

    batch: int
    original_length: int = 0
    total_length: int = 0
    pruned: bool = False
    phase: Literal["idle", "prefill", "continuation"] = "idle"
    coords: list[Coords] = field(default_factory=list)
    marginal_values: list[Tensor] = field(default_factory=list)
    schedule: list[SampleCounts] = field(default_factory=list)
    """Per sample, its row counts on the host: what lets the frame-level stages run without a device sync."""
    mask2d: Tensor | None = None
    """The current call's 2-D attention mask in original coordinates (bool)."""
    prompt_unmasked: bool = False
    """The prefill's 2-D mask had no zero (no left padding)."""
    stage_all_valid: list[bool] = field(default_factory=list)
    """Per coordinate system: every prompt row is real and unmasked (no padding slot, no padding)."""
    cache: weakref.ReferenceType | None = None
    stage_inputs: dict[int, Any] = field(default_factory=dict)
    capture: dict[str, Any] | None = None
    pending: dict[str, Any] | None = None
    stats: dict[str, Any] = field(default_factory=dict)

    def holds_cache(self, cache: Any) -> bool:
        return self.cache is not None and cache is not None and self.cache() is cache

    def translate_mask(self, stage: int) -> Tensor:
        """The current call's 2-D mask in the coordinates of ``stage`` (kept prompt rows, then new tokens)."""
        assert self.mask2d is not None
        coords = self.coords[stage]
        prompt = self.mask2d[:, : self.original_length].gather(1, coords.orig) & coords.valid
        return torch.cat([prompt, self.mask2d[:, self.original_length :]], dim=1)
