"""Adapter for ``LlavaOnevisionForConditionalGeneration`` (LLaVA-OneVision and LLaVA-Video checkpoints).

Video layout entering the language model (SPEC §3), read from what the model actually built:

* transformers' OneVision path: ``F`` frames of pooled ``rows × cols`` tokens, then ONE newline token
  (the model's ``image_newline`` vector) after the whole video;
* the original LLaVA-NeXT / LLaVA-Video inference layout: a newline after every row of every frame
  (optionally with a trailing newline), as produced by models that build per-row newlines.

The frame count comes from ``pixel_values_videos`` (``[B, F, C, H, W]``); newline tokens are the video
positions whose embedding equals the model's ``image_newline``; the remaining positions are content,
frame-major. Rows and columns come from the per-row newlines when present, otherwise from the vision
config's pooled grid (``ceil(image_size / patch_size / 2)`` per side, the model's ``apply_pooling``).
When ``generate`` passes the encoded video (``mm_encoder_outputs``, transformers >= 5.24) instead of the
pixels, the frame count is the content tokens over the pooled grid's ``rows × cols`` (the encoder's
output keeps no frame axis). Nothing is hard-coded.

Speedups (:meth:`LlavaOnevisionAdapter.speedups`): transformers' ``apply_pooling`` copies the projected
features to NCHW (``.contiguous()``) before the bilinear ``interpolate``, which then runs its NCHW kernel
— 46.5 ms of bf16 work at 32 frames on an H200 on a 3,584-channel 27×27 grid. Interpolating the permuted
view instead (channels-last memory) computes the same values with the channels-last kernel in 0.25 ms:
:func:`apply_pooling_channels_last` is installed on the model instance by default (exact, checked
bit-identical on CPU and GPU). ``speedups="all"`` also compiles the SigLIP tower (not exact).
"""

from __future__ import annotations

import dataclasses
import math
import types
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from hieravid.errors import AdapterError

from .base import (
    Adapter,
    FramePixels,
    MultimodalCall,
    Speedup,
    VideoGeometry,
    VideoInputs,
    VideoLayout,
    compile_speedup,
    config_value,
    processor_setting,
)

__all__ = ["LlavaOnevisionAdapter", "apply_pooling_channels_last"]


def apply_pooling_channels_last(self: nn.Module, image_features: Tensor) -> Tensor:
    """``LlavaOnevisionModel.apply_pooling`` without its NCHW copy: bit-identical values, ~200× faster on a GPU.

    The same steps as transformers 5.17–5.24 (grid side ``image_size // patch_size`` from the vision config,
    output ``ceil(side / 2)`` per side, ``mode="bilinear"``, default ``align_corners``), but ``interpolate``
    receives the permuted view, whose memory is channels-last, instead of a ``.contiguous()`` NCHW copy: its
    channels-last kernel computes the same interpolation weights and sums per channel. The result is
    contiguous ``[frames, tokens, channels]`` (transformers' is a strided view of an NCHW tensor; the next
    ``reshape`` in ``get_video_features`` copies it into the same contiguous values).
    """
    height = width = self.config.vision_config.image_size // self.config.vision_config.patch_size
    batch_frames, _, dim = image_features.shape
    image_features = image_features.view(batch_frames, height, width, -1).permute(0, 3, 1, 2)
    scaled_shape = [math.ceil(height / 2), math.ceil(width / 2)]
    image_features = nn.functional.interpolate(image_features, size=scaled_shape, mode="bilinear")
    return image_features.permute(0, 2, 3, 1).reshape(batch_frames, -1, dim)


class LlavaOnevisionAdapter(Adapter):
    """LLaVA-OneVision / LLaVA-Video (``model_type == "llava_onevision"``)."""

    model_types = ("llava_onevision",)
    default_query_rows = 1
    position_rows = 0

    def vision_tower(self) -> nn.Module | None:
        return getattr(self.multimodal_module(), "vision_tower", None)

    def speedups(self) -> list[Speedup]:
        """Channels-last pooling (exact), when the model uses transformers' own ``apply_pooling``; ``torch.compile``
        of the vision tower (opt-in)."""
        from transformers.models.llava_onevision.modeling_llava_onevision import LlavaOnevisionModel

        module = self.multimodal_module()
        found: list[Speedup] = []
        # A subclass with its own apply_pooling computes something else: leave it alone.
        if getattr(type(module), "apply_pooling", None) is LlavaOnevisionModel.apply_pooling:
            found.append(
                Speedup(
                    name="onevision-pooling-channels-last",
                    owner=module,
                    attribute="apply_pooling",
                    value=types.MethodType(apply_pooling_channels_last, module),
                    exact=True,
                    reason="video pooling interpolates the channels-last view instead of an NCHW copy (the same "
                    "values; 46.5 → 0.25 ms at 32 frames on an H200)",
                )
            )
        tower = self.vision_tower()
        if isinstance(tower, nn.Module):
            found.append(compile_speedup(tower, "SigLIP vision tower"))
        return found

    @classmethod
    def video_geometry(
        cls, config: Any, *, sampled_frames: int | None = None, processor_config: Mapping[str, Any] | None = None
    ) -> VideoGeometry:
        """``sampled_frames`` frames of the pooled grid, one newline after the video (transformers' OneVision path;
        checkpoints that build per-row newlines are read from the sequence at run time)."""
        rows, cols = cls.pooled_grid_of(cls._check_video_config(config))
        frames = cls.default_sampled_frames if sampled_frames is None else sampled_frames
        return VideoGeometry(frames, rows, cols, "per_video", cls.default_query_rows)

    @classmethod
    def inputs_geometry(cls, config: Any, inputs: Mapping[str, Any]) -> VideoGeometry:
        """Frames from ``pixel_values_videos`` ``[B, F, C, H, W]``, the pooled grid from the config."""
        rows, cols = cls.pooled_grid_of(cls._check_video_config(config))
        return VideoGeometry(
            int(inputs["pixel_values_videos"].shape[1]), rows, cols, "per_video", cls.default_query_rows
        )

    @classmethod
    def preprocess_video(cls, frames: Any, processor_config: Mapping[str, Any], config: Any) -> VideoInputs:
        """A fixed resize to the processor's size (default 384²); ``frames × ⌈n/2⌉² + 1`` placeholder tokens."""
        size = processor_setting(processor_config, "size", {"height": 384, "width": 384})
        height = int(size.get("height") or size.get("shortest_edge"))
        width = int(size.get("width") or size.get("shortest_edge"))
        video = FramePixels(frames, processor_config)
        pixels = video.normalised(video.resized(height, width))
        rows, cols = cls.pooled_grid_of(config_value(config, "vision_config"))
        return VideoInputs({"pixel_values_videos": pixels.unsqueeze(0)}, int(frames.shape[0]) * rows * cols + 1)

    @staticmethod
    def pooled_grid_of(vision_config: Any) -> tuple[int, int]:
        """Rows and columns of a pooled frame: ``ceil(image_size / patch_size / 2)`` (the model's ``apply_pooling``)."""
        side = int(config_value(vision_config, "image_size")) // int(config_value(vision_config, "patch_size"))
        return math.ceil(side / 2), math.ceil(side / 2)

    def pooled_grid(self) -> tuple[int, int]:
        """Rows and columns of a pooled frame according to this model's vision config."""
        return self.pooled_grid_of(self.config.vision_config)

    def newline_embedding(self, like: Tensor) -> Tensor | None:
        newline = getattr(self.multimodal_module(), "image_newline", None)
        if newline is None:
            return None
        return newline.detach().to(device=like.device, dtype=like.dtype)

    def locate_videos(self, call: MultimodalCall, inputs_embeds: Tensor) -> list[VideoLayout | None]:
        batch = inputs_embeds.shape[0]
        pixel_values_videos = call.kwargs.get("pixel_values_videos")
        if call.video_mask is None or (pixel_values_videos is None and call.encoded_video is None):
            return [None] * batch
        frames = 0
        if pixel_values_videos is not None:
            if pixel_values_videos.dim() != 5:
                raise AdapterError(
                    f"pixel_values_videos must be [batch, frames, channels, height, width], got "
                    f"{tuple(pixel_values_videos.shape)}"
                )
            frames = int(pixel_values_videos.shape[1])
        newline = self.newline_embedding(inputs_embeds)
        layouts: list[VideoLayout | None] = []
        for sample in range(batch):
            # One host sync per sample reads the video runs and the newline flags together.
            edges = self.span_edges(call.video_mask[sample])
            if newline is not None:
                flags = (inputs_embeds[sample] == newline).all(-1).to(torch.int8)
                host = torch.cat([edges, flags]).cpu()
                edges, flags = host[: edges.numel()], host[edges.numel() :].bool()
            else:
                edges = edges.cpu()
            span = self.single_span(sample, self.spans_from_edges(edges))
            if span is None:
                layouts.append(None)
                continue
            start, end = span
            # Split the span on the host, then copy the two index lists to the device without waiting for it.
            positions = torch.arange(start, end)
            if newline is not None:
                is_newline = flags[start:end]
            else:
                is_newline = torch.zeros(end - start, dtype=torch.bool)
            content_h, newlines_h = positions[~is_newline], positions[is_newline]
            content = content_h.to(inputs_embeds.device, non_blocking=True)
            newlines = newlines_h.to(inputs_embeds.device, non_blocking=True)
            if pixel_values_videos is None:  # encoded video: whole frames of the pooled grid
                rows, cols = self.pooled_grid()
                if content.numel() == 0 or content.numel() % (rows * cols):
                    raise AdapterError(
                        f"sample {sample}: {content.numel()} video content tokens are not whole {rows}×{cols} frames "
                        "(the pooled grid of the vision config; the encoded video carries no frame count)"
                    )
                frames = content.numel() // (rows * cols)
            elif content.numel() == 0 or content.numel() % frames:
                raise AdapterError(
                    f"sample {sample}: {content.numel()} video content tokens do not split into {frames} frames "
                    f"(pixel_values_videos {tuple(pixel_values_videos.shape)})"
                )
            per_frame = content.numel() // frames
            # The span holds only content and newline tokens: it is known on the host.
            layout = self._layout(content.view(frames, per_frame), newlines, host=(content_h, newlines_h))
            layouts.append(dataclasses.replace(layout, known_span=(start, end)))
        return layouts

    def _layout(self, frame_index: Tensor, newlines: Tensor, host: tuple[Tensor, Tensor] | None = None) -> VideoLayout:
        """The layout of a video; ``host`` holds the same content and newline positions on the host, so
        that classifying the newlines needs no device sync (read from the device otherwise)."""
        frames, per_frame = frame_index.shape
        rows, cols = self.pooled_grid()
        if rows * cols != per_frame:
            rows, cols = 1, per_frame
        if newlines.numel() == 0:
            return VideoLayout(frame_index, newlines, rows, cols, "none")
        # Content tokens preceding each newline tell where it sits in the frame grid.
        content_h, newlines_h = host if host is not None else (frame_index.cpu(), newlines.cpu())
        before = torch.searchsorted(content_h.flatten().contiguous(), newlines_h.flatten().contiguous())

        def grid(counts: Tensor) -> tuple[str, int] | None:
            n = counts.numel()
            if n == 0 or n % frames or per_frame % (n // frames):
                return None
            per = n // frames
            step = per_frame // per
            if not torch.equal(counts, torch.arange(1, n + 1, device=counts.device) * step):
                return None
            return ("per_frame" if per == 1 else "per_row"), per

        found = grid(before)
        layout = "irregular"
        if found is not None:
            layout = found[0]
        elif int(before[-1]) == frames * per_frame:
            if before.numel() == 1:
                layout = "per_video"
            elif (found := grid(before[:-1])) is not None:
                layout = f"{found[0]}+per_video"
        if found is not None and found[0] == "per_row":
            rows, cols = found[1], per_frame // found[1]
        return VideoLayout(frame_index, newlines, rows, cols, layout)
