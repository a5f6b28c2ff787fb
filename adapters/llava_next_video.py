"""Adapter for ``LlavaNextVideoForConditionalGeneration`` (LLaVA-NeXT-Video checkpoints).

Video layout entering the language model, as transformers builds it (``LlavaNextVideoModel.get_video_features``):
each frame goes through the vision tower on its own, the ``"default"`` feature strategy drops the CLS token, the
``vision_resampler`` pools the square patch grid with kernel = stride = ``spatial_pool_stride`` (average, max or
conv: ``⌊side / stride⌋`` per side), and the frames are concatenated frame-major, raster order inside a frame. No
newline tokens: ``image_newline`` is used for images only. ``F`` comes from ``pixel_values_videos``
(``[B, F, C, H, W]``); when ``generate`` passes the encoded video (``mm_encoder_outputs``, transformers >= 5.24)
it is the content tokens over the pooled grid. Modules, positions and relevance are the base class's
Llama/Qwen2 layout.
"""

from __future__ import annotations

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

__all__ = ["LlavaNextVideoAdapter"]


class LlavaNextVideoAdapter(Adapter):
    """LLaVA-NeXT-Video (``model_type == "llava_next_video"``)."""

    model_types = ("llava_next_video",)
    default_query_rows = 1
    position_rows = 0

    # ------------------------------------------------------------------ geometry
    @staticmethod
    def pooled_grid_of(config: Any) -> tuple[int, int]:
        """Rows and columns of a frame: ``⌊(image_size // patch_size) / spatial_pool_stride⌋`` per side."""
        vision = config_value(config, "vision_config")
        side = int(config_value(vision, "image_size")) // int(config_value(vision, "patch_size"))
        stride = int(config_value(config, "spatial_pool_stride", 2) or 2)
        return side // stride, side // stride

    @classmethod
    def video_geometry(
        cls, config: Any, *, sampled_frames: int | None = None, processor_config: Mapping[str, Any] | None = None
    ) -> VideoGeometry:
        """``sampled_frames`` frames of the pooled grid, no newline tokens."""
        cls._check_video_config(config)
        rows, cols = cls.pooled_grid_of(config)
        frames = cls.default_sampled_frames if sampled_frames is None else sampled_frames
        return VideoGeometry(frames, rows, cols, "none", cls.default_query_rows)

    @classmethod
    def inputs_geometry(cls, config: Any, inputs: Mapping[str, Any]) -> VideoGeometry:
        """Frames from ``pixel_values_videos`` ``[B, F, C, H, W]``, the pooled grid from the config."""
        cls._check_video_config(config)
        rows, cols = cls.pooled_grid_of(config)
        return VideoGeometry(int(inputs["pixel_values_videos"].shape[1]), rows, cols, "none", cls.default_query_rows)

    @classmethod
    def preprocess_video(cls, frames: Any, processor_config: Mapping[str, Any], config: Any) -> VideoInputs:
        """The video processor's steps: shortest edge to ``size``, centre crop to ``crop_size`` (both default to the
        vision tower's ``image_size``, which the crop must equal), rescale, normalise; ``frames × rows × cols``
        placeholder tokens."""
        side = int(config_value(config_value(config, "vision_config"), "image_size"))
        size = processor_setting(processor_config, "size", {"shortest_edge": side})
        crop = processor_setting(processor_config, "crop_size", {"height": side, "width": side})
        if (int(crop["height"]), int(crop["width"])) != (side, side):
            raise AdapterError(f"crop_size {crop} differs from the vision tower's image_size {side}")
        video = FramePixels(frames, processor_config)
        short = int(size.get("shortest_edge") or min(size["height"], size["width"]))
        scale = short / min(video.height, video.width)
        height, width = max(short, round(video.height * scale)), max(short, round(video.width * scale))
        pixels = video.resized(height, width)
        top, left = (height - int(crop["height"])) // 2, (width - int(crop["width"])) // 2
        pixels = pixels[..., top : top + int(crop["height"]), left : left + int(crop["width"])]
        rows, cols = cls.pooled_grid_of(config)
        return VideoInputs(
            {"pixel_values_videos": video.normalised(pixels).unsqueeze(0)}, int(frames.shape[0]) * rows * cols
        )

    # ------------------------------------------------------------------ modules
    def vision_tower(self) -> nn.Module | None:
        return getattr(self.multimodal_module(), "vision_tower", None)

    def speedups(self) -> list[Speedup]:
        """``torch.compile`` of the vision tower (opt-in, not exact)."""
        tower = self.vision_tower()
        return [compile_speedup(tower, "CLIP vision tower")] if isinstance(tower, nn.Module) else []

    # ------------------------------------------------------------------ video
    def locate_videos(self, call: MultimodalCall, inputs_embeds: Tensor) -> list[VideoLayout | None]:
        batch = inputs_embeds.shape[0]
        pixel_values_videos = call.kwargs.get("pixel_values_videos")
        if call.video_mask is None or (pixel_values_videos is None and call.encoded_video is None):
            return [None] * batch
        rows, cols = self.pooled_grid_of(self.config)
        if pixel_values_videos is not None and pixel_values_videos.dim() != 5:
            raise AdapterError(
                f"pixel_values_videos must be [batch, frames, channels, height, width], got "
                f"{tuple(pixel_values_videos.shape)}"
            )
        # One host sync reads every sample's video runs.
        edges = torch.stack([self.span_edges(call.video_mask[sample]) for sample in range(batch)]).cpu()
        layouts: list[VideoLayout | None] = []
        for sample in range(batch):
            span = self.single_span(sample, self.spans_from_edges(edges[sample]))
            if span is None:
                layouts.append(None)
                continue
            start, end = span
            count = end - start
            if pixel_values_videos is not None:
                frames = int(pixel_values_videos.shape[1])
                if count != frames * rows * cols:
                    raise AdapterError(
                        f"sample {sample}: {count} video tokens, but {frames} frames of the {rows}×{cols} pooled "
                        f"grid make {frames * rows * cols} (pixel_values_videos {tuple(pixel_values_videos.shape)})"
                    )
            else:  # encoded video: whole frames of the pooled grid
                if count % (rows * cols):
                    raise AdapterError(
                        f"sample {sample}: {count} video tokens are not whole {rows}×{cols} frames (the pooled grid "
                        "of the config; the encoded video carries no frame count)"
                    )
                frames = count // (rows * cols)
            positions = torch.arange(start, end).to(inputs_embeds.device, non_blocking=True)
            newlines = torch.zeros(0, dtype=torch.int64, device=inputs_embeds.device)
            layouts.append(
                VideoLayout(positions.view(frames, rows * cols), newlines, rows, cols, "none", known_span=(start, end))
            )
        return layouts
