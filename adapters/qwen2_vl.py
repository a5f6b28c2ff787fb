"""Adapters for ``Qwen2VLForConditionalGeneration`` and ``Qwen2_5_VLForConditionalGeneration``.

Video layout (SPEC §3): each video occupies ``t · (h/m) · (w/m)`` consecutive placeholder tokens
(``video_grid_thw = [t, h, w]`` per video, ``m`` the vision config's ``spatial_merge_size``), temporal
patch by temporal patch, raster order inside a patch; no newline tokens. Positions are 3-D M-RoPE
``[3, B, S]`` (or ``[4, B, S]`` with text positions first, as ``generate`` passes them), computed by the
model itself (``get_rope_index`` / ``compute_3d_position_ids``); the runtime gathers them and never
recomputes them.

The grid comes from ``video_grid_thw``. When ``generate`` passes the encoded video instead
(``mm_encoder_outputs``, transformers >= 5.24, which consumes ``video_grid_thw``), it comes from the
M-RoPE positions ``generate`` computed from that grid before encoding: a video's height and width
position rows span ``h/m`` and ``w/m`` values (raster order, checked), and ``t`` is the rest; the
temporal row is only checked to be constant within a temporal patch and non-decreasing (Qwen2.5-VL
advances it by ``tokens_per_second × second_per_grid_t``). transformers >= 5.24 computes those
positions only when ``mm_token_type_ids`` is passed (its processors return it); without it the video
gets text positions, even unpruned, and hieravid says so.

During decoding ``generate`` passes positions extended from the original ones. A manual continuation
call without ``position_ids`` would make the model derive them from the (pruned) cache length; such a
call gets explicit positions from the model's own rule (text position + its stored ``rope_deltas``)
with the original length. A later turn that adds a video to a pruned cache through ``generate`` must
not pass ``mm_token_type_ids``: transformers >= 5.24 then recomputes the turn's M-RoPE positions from
the full history, sliced at the cache length (which pruning shortens), and fails; without the types it
gives the new tokens text positions + ``rope_deltas``, as transformers 5.17 does either way.

Speedups (:meth:`Qwen2VLAdapter.speedups`). With SDPA, the vision attention of both towers (5.17–5.24)
splits the packed sequence at ``cu_seqlens`` and calls SDPA once per window in a Python loop: per temporal
patch in Qwen2-VL (512 calls for 32 frames), per 112-pixel window in Qwen2.5-VL's windowed blocks (7,232
calls; 16,025 kernel launches for one 32-frame tower forward). For an attention implementation whose name
contains "flash" the same module passes ``cu_seq_lens_q`` (and ``max_length_q``) to the attention
function instead. :func:`batched_window_attention` is registered under such a name
(:data:`WINDOW_ATTENTION`) and, installed on the vision config *instance* (its
``_attn_implementation_internal``, which the ``_attn_implementation`` property reads), runs transformers'
own ``sdpa_attention_forward`` once per distinct window length on the stacked windows: the same SDPA
kernel on the same per-window inputs, so bit-identical outputs. What the name changes besides, in both
versions: the tower computes ``max_seqlen`` of its ``cu_seqlens`` (one ``.item()`` per forward and
``cu_seqlens`` kind), which only the flash branch reads; nothing else reads the vision config's attention
implementation (the language model has its own config), and the name has no digit, so no
``is_flash_attention_requested(version=N)`` check matches it. It is installed only when the vision
attention is SDPA and the towers' attention classes are transformers' own.
"""

from __future__ import annotations

import itertools
import math
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

__all__ = ["WINDOW_ATTENTION", "Qwen2VLAdapter", "Qwen2_5_VLAdapter", "batched_window_attention"]

WINDOW_ATTENTION = "hieravid_flash_windows"
"""The attention implementation name :func:`batched_window_attention` is registered under. It contains
"flash" (the vision attention then passes ``cu_seq_lens_q``) and no digit (``is_flash_attention_requested``
with a ``version`` matches ``flash.*<version>``)."""


def batched_window_attention(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None = None,
    scaling: float | None = None,
    dropout: float = 0.0,
    cu_seq_lens_q: Tensor | None = None,
    cu_seq_lens_k: Tensor | None = None,
    max_length_q: int | None = None,
    max_length_k: int | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[Tensor, None]:
    """Block-diagonal attention over the ``cu_seq_lens_q`` windows of ``[1, H, S, D]`` packed inputs.

    Bit-identical to the SDPA loop of transformers' vision attention, which calls
    ``sdpa_attention_forward`` on each window's ``[1, H, L, D]`` slice: windows of one length ``L`` are
    stacked into ``[W, H, L, D]`` and passed to the same function in one call, with the same arguments.
    Each window meets the same kernel in the same ``[heads, tokens, dim]`` layout (the windows of one
    contiguous run are a view of the packed tensor, scattered windows of one length are gathered by row),
    and SDPA computes batch entries independently. Returns ``[1, S, H, D]`` (what the loop's ``torch.cat``
    returns). The window bounds are read on the host once per ``cu_seq_lens_q`` tensor (see
    :func:`_window_bounds`): one read per forward and kind of window instead of the loop's one per block.
    """
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if cu_seq_lens_q is None or query.shape[0] != 1:
        raise AdapterError(
            f"{WINDOW_ATTENTION} runs packed vision attention: it needs cu_seq_lens_q and [1, heads, tokens, dim] "
            f"inputs (got {'no cu_seq_lens_q' if cu_seq_lens_q is None else tuple(query.shape)}); it must not be "
            "the attention implementation of a language model"
        )
    if (
        cu_seq_lens_k is not None
        and cu_seq_lens_k is not cu_seq_lens_q
        and not torch.equal(cu_seq_lens_k, cu_seq_lens_q)
    ):
        raise AdapterError(f"{WINDOW_ATTENTION}: query and key windows differ (cross attention is not supported)")
    sdpa = ALL_ATTENTION_FUNCTIONS["sdpa"]
    bounds = _window_bounds(cu_seq_lens_q)
    total, heads, dim = query.shape[2], query.shape[1], value.shape[-1]
    if bounds[0] != 0 or bounds[-1] != total:
        raise AdapterError(f"{WINDOW_ATTENTION}: windows cover [{bounds[0]}, {bounds[-1]}) of {total} tokens")
    # [S, H, D] views of the packed [1, H, S, D] inputs: one window is a run of rows.
    rows = [tensor[0].transpose(0, 1) for tensor in (query, key, value)]
    by_length: dict[int, list[int]] = {}
    for start, end in itertools.pairwise(bounds):
        if end > start:
            by_length.setdefault(end - start, []).append(start)

    def attend(windows: list[Tensor]) -> Tensor:  # [W, L, H, D] each → [W, L, H, D]
        q, k, v = (w.transpose(1, 2) for w in windows)
        out, _ = sdpa(module, q, k, v, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs)
        return out

    if len(by_length) == 1:
        ((length, starts),) = by_length.items()
        if len(starts) * length == total:  # every window has one length: one call on views, no copy
            out = attend([r.view(len(starts), length, heads, -1) for r in rows])
            return out.reshape(1, total, heads, dim), None
    output = query.new_empty(total, heads, dim)
    for length, starts in by_length.items():
        count = len(starts)
        if starts[-1] - starts[0] == (count - 1) * length:  # one contiguous run: a view
            span = slice(starts[0], starts[0] + count * length)
            out = attend([r[span].view(count, length, heads, -1) for r in rows])
            output[span] = out.reshape(count * length, heads, dim)
        else:  # scattered windows of this length: one gather of their rows
            index = torch.tensor(starts, device=query.device).unsqueeze(1) + torch.arange(length, device=query.device)
            flat = index.flatten()
            out = attend([r.index_select(0, flat).view(count, length, heads, -1) for r in rows])
            output.index_copy_(0, flat, out.reshape(count * length, heads, dim))
    return output.unsqueeze(0), None


_BOUNDS_ATTRIBUTE = "_hieravid_window_bounds"


def _window_bounds(cu_seqlens: Tensor) -> list[int]:
    """``cu_seqlens.tolist()``, read once per tensor: every block of a tower forward receives the same ``cu_seqlens``
    object (Qwen2.5-VL: one for its full-attention blocks, one for its windowed blocks), so the host reads the
    device once per forward and kind instead of once per block, and can queue the next blocks' kernels without
    waiting. The list is kept on the tensor itself (it lives as long as the forward's tensor); transformers never
    modifies ``cu_seqlens`` in place."""
    bounds = getattr(cu_seqlens, _BOUNDS_ATTRIBUTE, None)
    if bounds is None or len(bounds) != cu_seqlens.numel():
        bounds = cu_seqlens.tolist()
        setattr(cu_seqlens, _BOUNDS_ATTRIBUTE, bounds)
    return bounds


def register_window_attention() -> str:
    """Register :func:`batched_window_attention` with transformers' ``AttentionInterface`` (idempotent);
    returns its name. Raises :class:`AdapterError` if another function holds the name."""
    from transformers import AttentionInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    current = ALL_ATTENTION_FUNCTIONS.get(WINDOW_ATTENTION)
    if current is not batched_window_attention:
        same = getattr(current, "__module__", None) == __name__ and getattr(current, "__qualname__", None) == (
            batched_window_attention.__qualname__
        )
        if current is not None and not same:
            raise AdapterError(
                f"the attention implementation name {WINDOW_ATTENTION!r} is registered to {current!r}, not hieravid's"
            )
        AttentionInterface.register(WINDOW_ATTENTION, batched_window_attention)
    return WINDOW_ATTENTION


class Qwen2VLAdapter(Adapter):
    """Qwen2-VL (``model_type == "qwen2_vl"``)."""

    model_types = ("qwen2_vl",)
    default_query_rows = 4
    position_rows = 3
    #: Side in pixels a video frame is resized to when the processor's settings are unknown (448 × 448).
    default_frame_side = 448

    @classmethod
    def video_geometry(
        cls, config: Any, *, sampled_frames: int | None = None, processor_config: Mapping[str, Any] | None = None
    ) -> VideoGeometry:
        """Temporal patches of ``temporal_patch_size`` frames, ``(side / patch / merge)²`` tokens each, no newlines.

        The side is the processor's fixed resize target when its settings give one (``size.height/width``),
        else :attr:`default_frame_side`; real processors keep the aspect ratio, so this is the planner's estimate.
        """
        vision = cls._check_video_config(config)
        patch = int(config_value(vision, "patch_size", 14))
        merge = int(config_value(vision, "spatial_merge_size", 2))
        step = int(config_value(vision, "temporal_patch_size", 2))
        height = width = cls.default_frame_side
        size = (processor_config or {}).get("size")
        if isinstance(size, Mapping) and "height" in size and "width" in size:
            height, width = int(size["height"]), int(size["width"])
        rows, cols = max(1, height // (patch * merge)), max(1, width // (patch * merge))
        frames = cls.default_sampled_frames if sampled_frames is None else sampled_frames
        return VideoGeometry(-(-frames // step), rows, cols, "none", cls.default_query_rows, step)

    @classmethod
    def inputs_geometry(cls, config: Any, inputs: Mapping[str, Any]) -> VideoGeometry:
        """Temporal patches and merged rows and columns from the first row of ``video_grid_thw``."""
        vision = cls._check_video_config(config)
        merge = int(config_value(vision, "spatial_merge_size", 2))
        step = int(config_value(vision, "temporal_patch_size", 2))
        frames, height, width = (int(value) for value in inputs["video_grid_thw"][0])
        return VideoGeometry(frames, height // merge, width // merge, "none", cls.default_query_rows, step)

    @classmethod
    def preprocess_video(cls, frames: Any, processor_config: Mapping[str, Any], config: Any) -> VideoInputs:
        """Smart resize to multiples of patch × merge within the processor's pixel bounds, temporal patches of
        ``temporal_patch_size`` frames (the last frame repeated to fill one), flattened patches and
        ``video_grid_thw``."""
        patch = int(processor_setting(processor_config, "patch_size", 14))
        merge = int(processor_setting(processor_config, "merge_size", 2))
        temporal = int(processor_setting(processor_config, "temporal_patch_size", 2))
        size = processor_setting(processor_config, "size", {})
        min_pixels = int(processor_config.get("min_pixels") or size.get("shortest_edge") or 128 * 28 * 28)
        max_pixels = int(processor_config.get("max_pixels") or size.get("longest_edge") or 28 * 28 * 768)
        video = FramePixels(frames, processor_config)
        height, width = video.height, video.width
        factor = patch * merge
        h_bar, w_bar = max(factor, round(height / factor) * factor), max(factor, round(width / factor) * factor)
        if h_bar * w_bar > max_pixels:
            beta = math.sqrt(height * width / max_pixels)
            h_bar = max(factor, math.floor(height / beta / factor) * factor)
            w_bar = max(factor, math.floor(width / beta / factor) * factor)
        elif h_bar * w_bar < min_pixels:
            beta = math.sqrt(min_pixels / (height * width))
            h_bar, w_bar = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
        pixels = video.normalised(video.resized(h_bar, w_bar)).unsqueeze(0)  # [1, T, C, H, W]
        if pad := -pixels.shape[1] % temporal:
            pixels = torch.cat([pixels, pixels[:, -1:].expand(-1, pad, -1, -1, -1)], dim=1)
        _, count, channels = pixels.shape[:3]
        grid_t, grid_h, grid_w = count // temporal, h_bar // patch, w_bar // patch
        patches = pixels.view(
            1, grid_t, temporal, channels, grid_h // merge, merge, patch, grid_w // merge, merge, patch
        )
        patches = patches.permute(0, 1, 4, 7, 5, 8, 3, 2, 6, 9).reshape(
            grid_t * grid_h * grid_w, channels * temporal * patch * patch
        )
        grid = torch.tensor([[grid_t, grid_h, grid_w]])
        return VideoInputs(
            {"pixel_values_videos": patches, "video_grid_thw": grid}, grid_t * grid_h * grid_w // (merge * merge)
        )

    def vision_tower(self) -> nn.Module | None:
        return getattr(self.multimodal_module(), "visual", None)

    def _stock_vision_attention(self) -> tuple[type, ...]:
        """transformers' vision attention classes whose SDPA loop :func:`batched_window_attention` replaces."""
        from transformers.models.qwen2_vl.modeling_qwen2_vl import VisionAttention

        return (VisionAttention,)

    def speedups(self) -> list[Speedup]:
        """Batched window attention (exact) when the vision tower runs transformers' own attention with SDPA;
        ``torch.compile`` of the vision tower (opt-in)."""
        tower = self.vision_tower()
        if not isinstance(tower, nn.Module):
            return []
        found: list[Speedup] = []
        config = getattr(tower, "config", None)
        attentions = [getattr(block, "attn", None) for block in getattr(tower, "blocks", ())]
        stock = self._stock_vision_attention()
        if (
            config is not None
            and attentions
            # transformers' own attention (its flash branch passes cu_seq_lens_q), unpatched, reading this config
            and all(type(a) in stock and "forward" not in vars(a) for a in attentions)
            and all(getattr(a, "config", None) is config for a in attentions)
            and vars(config).get("_attn_implementation_internal") == "sdpa"
        ):
            found.append(
                Speedup(
                    name="vision-window-attention-batched",
                    owner=config,
                    attribute="_attn_implementation_internal",
                    value=register_window_attention(),
                    exact=True,
                    reason="the vision attention calls SDPA once per window length on stacked windows instead of "
                    "once per window (the same kernel on the same rows; Qwen2.5-VL-7B tower at 32 frames: "
                    "365 → 147 ms on an H200)",
                    replaces="sdpa",
                )
            )
        found.append(compile_speedup(tower, "vision transformer"))
        return found

    def spatial_merge_size(self) -> int:
        return int(self.config.vision_config.spatial_merge_size)

    def locate_videos(self, call: MultimodalCall, inputs_embeds: Tensor) -> list[VideoLayout | None]:
        batch = inputs_embeds.shape[0]
        grid_thw = call.kwargs.get("video_grid_thw")
        if call.video_mask is None or (grid_thw is None and call.encoded_video is None):
            return [None] * batch
        if grid_thw is None:
            return self._locate_from_positions(call, inputs_embeds)
        merge = self.spatial_merge_size()
        # One host sync reads every sample's video runs and the grid together.
        edges = torch.stack([self.span_edges(call.video_mask[sample]) for sample in range(batch)]).long()
        host = torch.cat([edges.flatten(), grid_thw.to(device=edges.device, dtype=torch.long).flatten()]).cpu()
        edges_h = host[: edges.numel()].view(edges.shape)
        grids = [tuple(int(v) for v in row) for row in host[edges.numel() :].view(-1, 3).tolist()]
        next_grid = 0
        layouts: list[VideoLayout | None] = []
        for sample in range(batch):
            span = self.single_span(sample, self.spans_from_edges(edges_h[sample]))
            if span is None:
                layouts.append(None)
                continue
            if next_grid >= len(grids):
                raise AdapterError(f"video_grid_thw has {len(grids)} rows but sample {sample} holds another video")
            frames, height, width = grids[next_grid]
            next_grid += 1
            rows, cols = height // merge, width // merge
            start, end = span
            if end - start != frames * rows * cols:
                raise AdapterError(
                    f"sample {sample}: {end - start} video tokens but video_grid_thw {grids[next_grid - 1]} with "
                    f"spatial_merge_size {merge} gives {frames}×{rows}×{cols}"
                )
            frame_index = torch.arange(start, end, device=inputs_embeds.device).view(frames, rows * cols)
            empty = torch.empty(0, dtype=torch.long, device=inputs_embeds.device)
            layouts.append(VideoLayout(frame_index, empty, rows, cols, "none", known_span=span))
        return layouts

    def _locate_from_positions(self, call: MultimodalCall, inputs_embeds: Tensor) -> list[VideoLayout | None]:
        """Layouts of pre-encoded videos (no ``video_grid_thw``) from the call's M-RoPE position ids.

        Within one video the height and width rows are rasters (row-major over each frame: they give rows and
        columns); the temporal row is constant within a temporal patch and non-decreasing from one patch to the
        next. It is checked, never assumed consecutive: Qwen2-VL advances it by 1 per patch, Qwen2.5-VL by
        ``tokens_per_second × second_per_grid_t`` (2 × 1.0 with the released checkpoints and their processor), so
        it can repeat a value or skip several. One host read per call (the video rows of every sample).
        """
        assert call.video_mask is not None
        positions = call.kwargs.get("position_ids")
        if not isinstance(positions, Tensor) or positions.dim() != 3 or positions.shape[0] < 3:
            raise AdapterError(
                "the video was passed pre-encoded (mm_encoder_outputs) without video_grid_thw or M-RoPE "
                "position_ids [3 or 4, batch, sequence]; pass video_grid_thw to locate the video's frames"
            )
        device = inputs_embeds.device
        spans = [
            self.single_span(sample, self.video_spans(call.video_mask[sample]))
            for sample in range(len(call.video_mask))
        ]
        # The last three rows are temporal, height and width (a leading text row is generate's extra).
        host = positions[-3:].cpu()
        layouts: list[VideoLayout | None] = []
        for sample, span in enumerate(spans):
            if span is None:
                layouts.append(None)
                continue
            start, end = span
            temporal, height, width = host[:, 0 if host.shape[1] == 1 else sample, start:end]
            layout = self._raster_layout(sample, temporal, height, width, call)
            frames, rows, cols = layout
            frame_index = torch.arange(start, end, device=device).view(frames, rows * cols)
            empty = torch.empty(0, dtype=torch.long, device=device)
            layouts.append(VideoLayout(frame_index, empty, rows, cols, "none"))
        return layouts

    @staticmethod
    def _raster_layout(
        sample: int, temporal: Tensor, height: Tensor, width: Tensor, call: MultimodalCall
    ) -> tuple[int, int, int]:
        """``(frames, rows, cols)`` of one video from its ``[N]`` M-RoPE rows (on the host), or AdapterError."""
        count = int(width.numel())
        steps = torch.arange(count)
        if (
            count > 1
            and torch.equal(temporal, height)
            and torch.equal(height, width)
            and torch.equal(width - width[0], steps)
        ):
            missing = "" if call.kwargs.get("mm_token_type_ids") is not None else " (this call has none)"
            raise AdapterError(
                f"sample {sample}: its {count} video tokens received text positions, not M-RoPE ones: transformers "
                "≥ 5.24 computes a video's 3-D positions only when mm_token_type_ids is passed with the inputs"
                f"{missing} (the processor returns it), and otherwise runs even the unpruned model with the video "
                "laid out as text; pass the processor's mm_token_type_ids"
            )
        rows = int(height.max() - height.min()) + 1
        cols = int(width.max() - width.min()) + 1
        if (
            count % (rows * cols)
            or not torch.equal(height - height.min(), (steps // cols) % rows)
            or not torch.equal(width - width.min(), steps % cols)
        ):
            raise AdapterError(
                f"sample {sample}: the M-RoPE height and width positions of its {count} video tokens are not a raster "
                f"of {rows}×{cols}-token frames; pass video_grid_thw"
            )
        frames = count // (rows * cols)
        per_frame = temporal.view(frames, rows * cols)
        if not bool((per_frame == per_frame[:, :1]).all()) or bool((per_frame[1:, 0] < per_frame[:-1, 0]).any()):
            raise AdapterError(
                f"sample {sample}: the M-RoPE temporal positions of its {count} video tokens are not constant within "
                f"each {rows}×{cols}-token frame and non-decreasing across frames; pass video_grid_thw"
            )
        return frames, rows, cols

    def prepare_continuation_call(
        self, kwargs: dict[str, Any], *, total_length: int, new_length: int, batch: int, device: torch.device
    ) -> None:
        """Give a continuation call explicit M-RoPE positions when the caller passed none.

        Without ``position_ids`` the model derives decode positions from ``rope_deltas`` and either the
        cache length (shortened by pruning) or the cumsum of the full 2-D mask (not sliced to the new
        tokens). This applies the model's own rule — text positions plus its stored ``rope_deltas`` —
        with the original length: ``position = (mask cumsum - 1 or total_length + i) + rope_delta``.
        """
        if kwargs.get("position_ids") is not None:
            return
        deltas = getattr(self.multimodal_module(), "rope_deltas", None)
        if deltas is None:
            return
        mask = kwargs.get("attention_mask")
        if isinstance(mask, Tensor) and mask.dim() == 2:
            positions = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)[:, -new_length:]
        else:
            positions = torch.arange(total_length, total_length + new_length, device=device).expand(batch, -1)
        deltas = deltas.to(device).repeat_interleave(batch // deltas.shape[0], dim=0)
        kwargs["position_ids"] = (positions + deltas).unsqueeze(0).expand(3, -1, -1)

    def text_positions(self, position_ids: Tensor | None) -> Tensor | None:
        """Also reads M-RoPE positions of text tokens (equal rows: text position + the stored ``rope_deltas``)."""
        text = super().text_positions(position_ids)
        if text is not None or not isinstance(position_ids, Tensor) or position_ids.dim() != 3:
            return text
        deltas = getattr(self.multimodal_module(), "rope_deltas", None)
        if deltas is None or position_ids.shape[0] > self.position_rows:
            return None
        if not bool((position_ids[:, :, :1] == position_ids[:1, :, :1]).all()):
            return None  # the first token is not text
        return position_ids[0] - deltas.to(position_ids.device).view(-1, 1)


class Qwen2_5_VLAdapter(Qwen2VLAdapter):
    """Qwen2.5-VL (``model_type == "qwen2_5_vl"``): the Qwen2-VL layout and positions."""

    model_types = ("qwen2_5_vl",)

    def _stock_vision_attention(self) -> tuple[type, ...]:
        from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLVisionAttention

        return (Qwen2_5_VLVisionAttention,)
