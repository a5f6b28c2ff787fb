"""Adapter for ``Qwen3_5ForConditionalGeneration`` (transformers' ``qwen3_5``, in 5.17 and 5.24).

Video layout. The processor (``Qwen3VLProcessor``) writes each temporal patch of a video as its own block,
``<t seconds><|vision_start|>`` + ``(h/m)·(w/m)`` video tokens + ``<|vision_end|>``: a video is ``t`` runs of
placeholders separated by text, one run per language-model frame, and ``get_rope_index`` splits
``video_grid_thw`` the same way (one grid of ``t = 1`` per run; a single run of ``t`` frames fails there). The
adapter maps run ``f`` to frame ``f`` of the ``[F, P]`` frame map; the timestamps and vision start/end tokens
between frames are text, never pruned. Positions are M-RoPE ``[3, B, S]`` as in Qwen2-VL (no DeepStack features
in this model).

Decoder. ``config.layer_types`` mixes ``"full_attention"`` layers (gated attention: ``q_proj`` also yields an
output gate, RMS norms on query and key heads, partial RoPE) with ``"linear_attention"`` layers (Gated DeltaNet: a
short causal convolution and a gated delta-rule recurrence, both carried in the cache for decoding). What makes
pruning exact on the recurrent layers:

* Dropping rows after a stage layer: a later recurrent layer simply runs on the shorter sequence, which is what
  the model itself computes on the pruned sequence (the reference). Its conv and recurrent states after the
  prefill are those of the pruned sequence, so cached decoding equals a cache-free run on it.
* Padding: a recurrent layer multiplies masked rows by zero (``apply_mask_to_padding_states``). A zero row adds
  nothing to the state, but the state still decays by ``exp(g)`` at that step and the convolution's window still
  covers it, so a masked row is neutral only before the first real row (the state is zero there). Left padding
  is therefore exact, and the runtime puts the padding slots of shorter samples first
  (:meth:`recurrent_layers` is not empty) and gives these layers the 2-D mask of their coordinate system.
* Relevance: a recurrent layer has no attention probabilities to score tokens with, so stages placed on a
  ``"linear_attention"`` layer are refused (:meth:`query_key_projections`) with the full-attention layers listed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from hieravid.errors import AdapterError

from .base import (
    MultimodalCall,
    Speedup,
    VideoGeometry,
    VideoInputs,
    VideoLayout,
    compile_speedup,
    config_value,
)
from .qwen2_vl import Qwen2VLAdapter

__all__ = ["Qwen3_5Adapter"]

FULL_ATTENTION, LINEAR_ATTENTION = "full_attention", "linear_attention"


class Qwen3_5Adapter(Qwen2VLAdapter):
    """Qwen3.5 (``model_type == "qwen3_5"``): per-frame video runs, hybrid full/linear-attention decoder."""

    model_types = ("qwen3_5",)

    # ------------------------------------------------------------------ geometry
    @classmethod
    def video_geometry(
        cls, config: Any, *, sampled_frames: int | None = None, processor_config: Mapping[str, Any] | None = None
    ) -> VideoGeometry:
        geometry = super().video_geometry(config, sampled_frames=sampled_frames, processor_config=processor_config)
        return dataclasses.replace(geometry, recurrent_layers=cls.linear_attention_layers(config))

    @classmethod
    def inputs_geometry(cls, config: Any, inputs: Mapping[str, Any]) -> VideoGeometry:
        geometry = super().inputs_geometry(config, inputs)
        return dataclasses.replace(geometry, recurrent_layers=cls.linear_attention_layers(config))

    @staticmethod
    def linear_attention_layers(config: Any) -> tuple[int, ...]:
        """The linear-attention layers named by the language model's ``layer_types`` (a config object or mapping)."""
        text = config_value(config, "text_config") or config
        types = config_value(text, "layer_types") or ()
        return tuple(index for index, kind in enumerate(types) if kind == LINEAR_ATTENTION)

    @classmethod
    def preprocess_video(cls, frames: Any, processor_config: Mapping[str, Any], config: Any) -> VideoInputs:
        """Not offered: the prompt needs a timestamp and vision start/end tokens around every frame's tokens,
        which only the model's own processor (``Qwen3VLProcessor``) writes."""
        raise AdapterError(
            "Qwen3.5 prompts hold a timestamp block around every frame's video tokens; use the model's own processor "
            "(Qwen3VLProcessor, which needs torchvision) to prepare the video"
        )

    # ------------------------------------------------------------------ modules
    def layer_types(self) -> list[str]:
        """``config.layer_types`` of the language model, one per decoder layer."""
        types = getattr(self.text_config(), "layer_types", None)
        return list(types) if types else [FULL_ATTENTION] * len(self.decoder_layers())

    def recurrent_layers(self) -> frozenset[int]:
        return frozenset(index for index, kind in enumerate(self.layer_types()) if kind == LINEAR_ATTENTION)

    def full_attention_layers(self) -> list[int]:
        return [index for index, kind in enumerate(self.layer_types()) if kind == FULL_ATTENTION]

    def validate(self) -> None:
        layers = self.decoder_layers()
        types = self.layer_types()
        unsupported = sorted(set(types) - {FULL_ATTENTION, LINEAR_ATTENTION})
        if unsupported:
            raise AdapterError(f"{type(self.model).__name__}: layer types {unsupported} are not supported")
        if len(types) != len(layers):
            raise AdapterError(
                f"{type(self.model).__name__}: config.layer_types names {len(types)} layers; the model has "
                f"{len(layers)}"
            )
        for index, (layer, kind) in enumerate(zip(layers, types)):
            mixer = "self_attn" if kind == FULL_ATTENTION else "linear_attn"
            for name in (mixer, "mlp", "post_attention_layernorm"):
                if not hasattr(layer, name):
                    raise AdapterError(f"{type(self.model).__name__}: decoder layer {index} ({kind}) has no .{name}")

    def query_key_projections(self, layer: nn.Module) -> tuple[nn.Module, nn.Module]:
        """The full-attention layer's projections; a stage on a linear-attention layer is refused here."""
        if not hasattr(layer, "self_attn"):
            index = next((i for i, candidate in enumerate(self.decoder_layers()) if candidate is layer), None)
            raise AdapterError(
                f"a frame-level stage at layer {index} of this Qwen3.5 model: that layer is linear attention (Gated "
                "DeltaNet, a recurrence) and has no attention probabilities to score relevance with; place stages on "
                f"full-attention layers {self.full_attention_layers()}"
            )
        return super().query_key_projections(layer)

    def stage_query_key(
        self,
        layer: nn.Module,
        query_states: Tensor,
        key_states: Tensor,
        position_embeddings: tuple[Tensor, Tensor],
        query_rows: int,
    ) -> tuple[Tensor, Tensor]:
        """As ``Qwen3_5Attention``: the query half of ``q_proj``'s ``[query | gate]`` pairs per head, RMS norms
        on query and key heads, then (partial) RoPE with the model's ``apply_rotary_pos_emb``."""
        attention = self.attention(layer)
        head_dim = int(attention.head_dim)
        batch, length = key_states.shape[:2]
        rows = query_states[:, -query_rows:].reshape(batch, query_rows, -1, head_dim * 2)
        query = attention.q_norm(rows[..., :head_dim]).transpose(1, 2)
        key = attention.k_norm(key_states.reshape(batch, length, -1, head_dim)).transpose(1, 2)
        cos, sin = position_embeddings
        rotate = self.rotary_function(layer)
        query, _ = rotate(query, query, cos[:, -query_rows:], sin[:, -query_rows:])
        key, _ = rotate(key, key, cos, sin)
        return query, key

    # ------------------------------------------------------------------ video
    def locate_videos(self, call: MultimodalCall, inputs_embeds: Tensor) -> list[VideoLayout | None]:
        """Frame ``f`` of a sample's video is its ``f``-th run of video tokens (one video per sample)."""
        batch = inputs_embeds.shape[0]
        grid_thw = call.kwargs.get("video_grid_thw")
        if call.video_mask is None or (grid_thw is None and call.encoded_video is None):
            return [None] * batch
        merge = self.spatial_merge_size()
        # One host sync reads every sample's runs (and the grid, or the M-RoPE positions of pre-encoded videos).
        edges = torch.stack([self.span_edges(call.video_mask[sample]) for sample in range(batch)]).long()
        if grid_thw is not None:
            extra = grid_thw.to(device=edges.device, dtype=torch.long).flatten()
        else:
            positions = call.kwargs.get("position_ids")
            if not isinstance(positions, Tensor) or positions.dim() != 3 or positions.shape[0] < 3:
                raise AdapterError(
                    "the video was passed pre-encoded (mm_encoder_outputs) without video_grid_thw or M-RoPE "
                    "position_ids [3 or 4, batch, sequence]; pass video_grid_thw to locate the video's frames"
                )
            extra = positions[-3:].to(edges.device).expand(3, batch, -1).flatten()
        host = torch.cat([edges.flatten(), extra]).cpu()
        edges_h = host[: edges.numel()].view(edges.shape)
        grids = host[edges.numel() :].view(-1, 3).tolist() if grid_thw is not None else None
        position_rows = host[edges.numel() :].view(3, batch, -1) if grid_thw is None else None
        layouts: list[VideoLayout | None] = []
        next_grid = 0
        for sample in range(batch):
            runs = self.spans_from_edges(edges_h[sample])
            if not runs:
                layouts.append(None)
                continue
            if grids is not None:
                if next_grid >= len(grids):
                    raise AdapterError(f"video_grid_thw has {len(grids)} rows but sample {sample} holds another video")
                frames, height, width = (int(value) for value in grids[next_grid])
                next_grid += 1
                rows, cols = height // merge, width // merge
            else:
                assert position_rows is not None
                # Each run is one frame: a raster of M-RoPE height and width positions (checked per run).
                shapes = {
                    self._raster_layout(sample, *position_rows[:, sample, start:end], call)[1:] for start, end in runs
                }
                if len(shapes) != 1:
                    raise AdapterError(f"sample {sample}: its video frames have different shapes {sorted(shapes)}")
                (rows, cols), frames = shapes.pop(), len(runs)
            if len(runs) != frames or any(end - start != rows * cols for start, end in runs):
                lengths = [end - start for start, end in runs]
                raise AdapterError(
                    f"sample {sample}: video token runs of lengths {lengths}, but its video is {frames} frames of "
                    f"{rows}×{cols} tokens, each in its own run (Qwen3.5's processor separates frames by timestamps); "
                    "hieravid prunes one video per sample"
                )
            frame_index = torch.tensor(
                [list(range(start, end)) for start, end in runs], dtype=torch.long, device=inputs_embeds.device
            )
            empty = torch.empty(0, dtype=torch.long, device=inputs_embeds.device)
            span = (runs[0][0], runs[-1][1])
            layouts.append(VideoLayout(frame_index, empty, rows, cols, "none", known_span=span))
        return layouts

    def speedups(self) -> list[Speedup]:
        """Only the opt-in ``torch.compile`` of the vision tower: Qwen2-VL's batched window attention was not
        checked bit-identical on this tower."""
        tower = self.vision_tower()
        return [compile_speedup(tower, "vision transformer")] if isinstance(tower, nn.Module) else []
