"""Adapter for ``InternVLForConditionalGeneration`` (InternVL3 with a Qwen2 language model, InternVL3.5 with Qwen3).

Video layout entering the language model, as transformers 5.17–5.24 builds it: the config has no video token.
``InternVLProcessor(videos=...)`` writes each frame as its own one-tile *image*, labelled in text::

    Frame1: <img><IMG_CONTEXT>×P</img>
    Frame2: <img><IMG_CONTEXT>×P</img>
    ...

and concatenates the frames' pixels into ``pixel_values`` with the still images' tiles, in prompt order. Each
tile becomes ``P = (side · downsample_ratio)²`` tokens (``side = image_size // patch_size``; the CLS token is
dropped, then a pixel shuffle folds 2×2 patches into one token: 256 tokens per 448² frame), raster order. So one
video is ``F`` spans of ``P`` context tokens with text between them; that text (the ``</img>``, the newline, the
``FrameN:`` label, the ``<img>``) is never pruned and keeps its positions.

**Which image spans are a video.** Token ids alone carry no "video" mark (the frame labels are ordinary text),
so the adapter reads the processor's layout:

* a *frame span* is a run of exactly ``P`` context tokens (one tile; a still image split into tiles has a
  multiple of ``P`` plus a thumbnail);
* consecutive frame spans belong to one video when the tokens between two of them number
  :attr:`InternVLAdapter.frame_gap` (inclusive range, ``</img>`` and ``<img>`` counted): the processor's
  ``</img>\\nFrameN: <img>`` is 6–9 tokens; two images written back to back by the chat template
  (``<image>\\n<image>``: ``</img>\\n<img>``, 3 tokens) are not frames of one video;
* a video is a chain of at least two such frames. Every other image span (multi-tile images, a lone one-tile
  image, one-tile images placed right after each other) is a still image: never pruned.

A sample with two or more such chains (two videos, or one-tile images listed with short labels beside the
video, which read exactly like frames) is ambiguous: :meth:`InternVLAdapter.locate_videos` refuses it with an
:class:`~hieravid.errors.AdapterError` rather than guess. A one-frame video cannot be told from an image: it
runs unpruned. One-tile images labelled like frames *right next to* the video read as more frames of it, and two
videos separated by fewer than ``frame_gap[1]`` tokens read as one video: give them text of their own in between.

Language models: Qwen2 (InternVL3) and Qwen3 (InternVL3.5) with 1-D RoPE; Qwen3's attention normalises each
head's query and key (``q_norm``/``k_norm``) before RoPE, which :meth:`InternVLAdapter.stage_query_key`
reproduces.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from hieravid.errors import AdapterError, SpecError

from .base import Adapter, MultimodalCall, Speedup, VideoGeometry, VideoLayout, compile_speedup, config_value

__all__ = ["InternVLAdapter", "video_frame_spans"]


def _pair(value: Any) -> tuple[int, int]:
    """An ``image_size``/``patch_size`` setting (an int or a pair) as a pair of ints."""
    if isinstance(value, (list, tuple)):
        return int(value[0]), int(value[1])
    return int(value), int(value)


def video_frame_spans(
    spans: Sequence[tuple[int, int]], tokens_per_frame: int, frame_gap: tuple[int, int], *, sample: int = 0
) -> list[tuple[int, int]]:
    """The frame spans of the one video among a sample's image-token runs (empty when it holds no video).

    Args:
        spans: ``[start, end)`` runs of image context tokens, in sequence order.
        tokens_per_frame: tokens of one tile (a frame is exactly one tile).
        frame_gap: inclusive range of ``next_start - end`` between two frames of one video.
        sample: the sample's index, for messages.

    Raises:
        AdapterError: several chains of frames (several videos, or one-tile images that read as frames).
    """
    chains: list[list[tuple[int, int]]] = []
    low, high = frame_gap
    for span in spans:
        if span[1] - span[0] != tokens_per_frame:
            chains.append([])  # a multi-tile image ends any chain
            continue
        if chains and chains[-1] and low <= span[0] - chains[-1][-1][1] <= high:
            chains[-1].append(span)
        else:
            chains.append([span])
    videos = [chain for chain in chains if len(chain) >= 2]
    if len(videos) > 1:
        found = ", ".join(f"{len(chain)} frames at {chain[0][0]}..{chain[-1][1]}" for chain in videos)
        raise AdapterError(
            f"sample {sample}: {len(videos)} runs of one-tile image spans read as videos ({found}); hieravid prunes "
            "one video per sample, and one-tile images listed with short labels look exactly like video frames. "
            "Put one video per prompt, or separate still images from the video by longer text"
        )
    return videos[0] if videos else []


class InternVLAdapter(Adapter):
    """InternVL3 / InternVL3.5 (``model_type == "internvl"``); see the module docstring for the video rule."""

    model_types = ("internvl",)
    default_query_rows = 1
    position_rows = 0
    #: Tokens from the end of one frame's context tokens to the start of the next one's, both ends inclusive:
    #: ``</img>``, a newline, ``FrameN:`` (label, 1–4 digit tokens, colon, space) and ``<img>``, with slack for
    #: tokenizers that merge the newline or the colon.
    frame_gap: ClassVar[tuple[int, int]] = (5, 16)

    # ------------------------------------------------------------------ geometry
    @staticmethod
    def frame_grid_of(config: Any) -> tuple[int, int]:
        """Rows and columns of one tile's tokens: ``(image_size // patch_size) · downsample_ratio`` per side.

        Raises:
            SpecError: no vision config, a grid the pixel shuffle cannot fold, or an ``image_seq_length`` that
                disagrees with the vision config.
        """
        vision = config_value(config, "vision_config")
        if vision is None or config_value(config, "image_token_id") is None:
            missing = "vision_config" if vision is None else "image_token_id"
            raise SpecError(f"config of model_type {config_value(config, 'model_type')!r} has no {missing}")
        (height, width) = _pair(config_value(vision, "image_size", 448))
        (patch_h, patch_w) = _pair(config_value(vision, "patch_size", 14))
        ratio = float(config_value(config, "downsample_ratio", 0.5))
        rows, cols = (height // patch_h) * ratio, (width // patch_w) * ratio
        if rows != int(rows) or cols != int(cols) or rows < 1 or cols < 1:
            raise SpecError(
                f"InternVL: a {height // patch_h}×{width // patch_w} patch grid does not fold by downsample_ratio "
                f"{ratio} into whole tokens"
            )
        seq_length = config_value(config, "image_seq_length")
        if seq_length is not None and int(seq_length) != int(rows) * int(cols):
            raise SpecError(
                f"InternVL: image_seq_length {seq_length} disagrees with the vision config's {int(rows)}×{int(cols)} "
                "tokens per tile"
            )
        return int(rows), int(cols)

    @classmethod
    def video_geometry(
        cls, config: Any, *, sampled_frames: int | None = None, processor_config: Mapping[str, Any] | None = None
    ) -> VideoGeometry:
        """``sampled_frames`` one-tile frames, no newline tokens (the text between frames is text, not video)."""
        rows, cols = cls.frame_grid_of(config)
        frames = cls.default_sampled_frames if sampled_frames is None else sampled_frames
        return VideoGeometry(frames, rows, cols, "none", cls.default_query_rows)

    @classmethod
    def inputs_geometry(cls, config: Any, inputs: Mapping[str, Any]) -> VideoGeometry:
        """Frames of the first sample's video, read from ``input_ids`` by the adapter's rule."""
        rows, cols = cls.frame_grid_of(config)
        ids = inputs.get("input_ids")
        if not isinstance(ids, Tensor) or ids.dim() != 2:
            raise AdapterError("InternVL inputs need input_ids [batch, length]: the video's frames are read from them")
        mask = ids[0] == int(config_value(config, "image_token_id"))
        frames = video_frame_spans(cls.video_spans(mask), rows * cols, cls.frame_gap)
        if not frames:
            raise AdapterError("InternVL inputs hold no video: no chain of two or more one-tile frame spans")
        return VideoGeometry(len(frames), rows, cols, "none", cls.default_query_rows)

    # ------------------------------------------------------------------ modules
    def vision_tower(self) -> nn.Module | None:
        return getattr(self.multimodal_module(), "vision_tower", None)

    def speedups(self) -> list[Speedup]:
        """``torch.compile`` of the vision tower (opt-in, not exact)."""
        tower = self.vision_tower()
        return [compile_speedup(tower, "InternViT vision tower")] if isinstance(tower, nn.Module) else []

    # ------------------------------------------------------------------ video
    def video_token_id(self) -> int:
        """The image context token: video frames are images in InternVL's prompts."""
        token_id = getattr(self.config, "image_token_id", None)
        if token_id is None:
            raise AdapterError(f"{type(self.model).__name__}: config has no image_token_id")
        return int(token_id)

    def locate_videos(self, call: MultimodalCall, inputs_embeds: Tensor) -> list[VideoLayout | None]:
        """Per sample, the one chain of one-tile frame spans (module docstring); still images stay text."""
        batch = inputs_embeds.shape[0]
        if call.video_mask is None:
            return [None] * batch
        rows, cols = self.frame_grid_of(self.config)
        # One host sync reads every sample's image-token runs.
        edges = torch.stack([self.span_edges(call.video_mask[sample]) for sample in range(batch)]).cpu()
        layouts: list[VideoLayout | None] = []
        for sample in range(batch):
            frames = video_frame_spans(self.spans_from_edges(edges[sample]), rows * cols, self.frame_gap, sample=sample)
            if not frames:
                layouts.append(None)
                continue
            starts = torch.tensor([start for start, _ in frames])
            positions = starts[:, None] + torch.arange(rows * cols)
            newlines = torch.zeros(0, dtype=torch.int64, device=inputs_embeds.device)
            layouts.append(
                VideoLayout(
                    positions.to(inputs_embeds.device, non_blocking=True),
                    newlines,
                    rows,
                    cols,
                    "none",
                    known_span=(frames[0][0], frames[-1][1]),
                )
            )
        return layouts

    # ------------------------------------------------------------------ relevance
    def stage_query_key(
        self,
        layer: nn.Module,
        query_states: Tensor,
        key_states: Tensor,
        position_embeddings: tuple[Tensor, Tensor],
        query_rows: int,
    ) -> tuple[Tensor, Tensor]:
        """The base class's post-RoPE query and key, after Qwen3's per-head ``q_norm``/``k_norm`` when the attention
        has them (applied to ``[B, S, H, d]`` before the transpose, as ``Qwen3Attention`` does)."""
        attention = self.attention(layer)
        q_norm, k_norm = getattr(attention, "q_norm", None), getattr(attention, "k_norm", None)
        if q_norm is None and k_norm is None:
            return super().stage_query_key(layer, query_states, key_states, position_embeddings, query_rows)
        head_dim = int(attention.head_dim)
        batch, length = key_states.shape[:2]
        query = query_states[:, -query_rows:].reshape(batch, query_rows, -1, head_dim)
        key = key_states.reshape(batch, length, -1, head_dim)
        query = (q_norm(query) if q_norm is not None else query).transpose(1, 2)
        key = (k_norm(key) if k_norm is not None else key).transpose(1, 2)
        cos, sin = position_embeddings
        rotate = self.rotary_function(layer)
        query, _ = rotate(query, query, cos[:, -query_rows:], sin[:, -query_rows:])
        key, _ = rotate(key, key, cos, sin)
        return query, key
