"""Adapter for ``Qwen3VLForConditionalGeneration`` and ``Qwen3VLMoeForConditionalGeneration``.

Video layout. Qwen3-VL's processor writes each temporal patch (``temporal_patch_size`` frames) as
``<t seconds><|vision_start|>`` + ``(h/m)·(w/m)`` video tokens + ``<|vision_end|>``: the video is one run of
placeholder tokens per temporal patch, with timestamp text between the runs. ``video_grid_thw = [t, h, w]``
gives ``t`` runs of the same raster. :class:`~hieravid.adapters.base.VideoLayout` maps the ``[F, P]`` frame
tokens to their sequence positions explicitly, so the text between frames is text to the runtime: never
pruned, and it keeps its positions. M-RoPE positions (interleaved ``mrope_section``) come from the model
(``get_rope_index``: each temporal patch is laid out as its own ``t = 1`` grid) and are gathered, never
recomputed; the rotary embedding's interleaving happens inside the model on the gathered positions.

Deepstack. The vision tower also returns features of some of its intermediate blocks
(``deepstack_visual_indexes``); the text model adds feature ``k`` to the hidden states at the visual positions
(``visual_pos_masks``) after decoder layer ``k``, for ``k < len(deepstack_visual_embeds)``
(``Qwen3VLTextModel._deepstack_process``). Both are arguments of the language model's call, so the input level
prunes them with the tokens (:meth:`Qwen3VLAdapter.gather_extra_inputs`): the rows of the kept video tokens are
gathered and the mask rebuilt in stage-0 coordinates. A merged token (segment level, FrameFusion) keeps its own
deepstack rows: the merge averages the LLM input embeddings, which are what the operators see. A frame-level
stage at a layer ``< len(deepstack_visual_indexes)`` would shorten the sequence before an injection whose mask
the text model holds in a local variable: such stages are refused (planner: ``ModelSpec.first_stage_layer``;
``apply``: :meth:`Qwen3VLAdapter.check_plan`). Qwen3-VL-8B injects after layers 0-2 of 36, so HieraVid's stages
(every L/4 layers: 9, 18, 27) are unaffected. transformers adds the rows through a boolean-mask index, a host
sync; the adapter's exact speedup :func:`add_deepstack_rows` adds the same rows without one, and the input level
knows how many visual rows it keeps, so a prefill has no host sync from layer 0 on and ``cuda_graphs=True`` can
capture it.

Relevance. Qwen3's attention normalises each head's query and key (``q_norm``/``k_norm``, RMSNorm) before RoPE:
the stage score reads those norms' outputs (:meth:`Qwen3VLAdapter.query_key_projections`), so the base
:meth:`~hieravid.adapters.base.Adapter.stage_query_key` applies RoPE to exactly the tensors attention uses.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from hieravid.errors import AdapterError, PlanError
from hieravid.ops._util import mask_to_indices

from .base import MultimodalCall, Speedup, VideoGeometry, VideoInputs, VideoLayout, config_value
from .qwen2_vl import Qwen2VLAdapter

__all__ = ["Qwen3VLAdapter", "add_deepstack_rows"]


def add_deepstack_rows(hidden_states: Tensor, visual_pos_masks: Tensor, visual_embeds: Tensor) -> Tensor:
    """``Qwen3VLTextModel._deepstack_process`` without its host sync: row ``i`` of ``visual_embeds`` is added at the
    ``i``-th visual position, gathered by each position's rank among the visual positions and kept where the mask is
    set. The same additions as transformers' boolean-mask index, so the same bits, but no row count for the host to
    read: a prefill of Qwen3-VL can then be captured in a CUDA graph."""
    mask = visual_pos_masks.to(hidden_states.device).bool()
    embeds = visual_embeds.to(hidden_states.device, hidden_states.dtype)
    if embeds.shape[0] == 0:
        return hidden_states.clone()
    rows = (mask.flatten().long().cumsum(0) - 1).clamp_min(0).view(mask.shape)
    return torch.where(mask.unsqueeze(-1), hidden_states + embeds[rows], hidden_states)


class Qwen3VLAdapter(Qwen2VLAdapter):
    """Qwen3-VL (``model_type`` ``"qwen3_vl"``) and its mixture-of-experts variant (``"qwen3_vl_moe"``)."""

    model_types = ("qwen3_vl", "qwen3_vl_moe")

    # ------------------------------------------------------------------ geometry
    @classmethod
    def deepstack_layers(cls, config: Any) -> int:
        """Decoder layers after which the text model adds deepstack features (0..n-1): one per deepstack index."""
        vision = config_value(config, "vision_config")
        indexes = config_value(vision, "deepstack_visual_indexes", ()) if vision is not None else ()
        return len(indexes or ())

    @classmethod
    def video_geometry(
        cls, config: Any, *, sampled_frames: int | None = None, processor_config: Mapping[str, Any] | None = None
    ) -> VideoGeometry:
        """Qwen2-VL's geometry (16 px patches by default), with stages allowed from the first layer after the
        deepstack injections."""
        geometry = super().video_geometry(config, sampled_frames=sampled_frames, processor_config=processor_config)
        return dataclasses.replace(geometry, first_stage_layer=cls.deepstack_layers(config))

    @classmethod
    def inputs_geometry(cls, config: Any, inputs: Mapping[str, Any]) -> VideoGeometry:
        geometry = super().inputs_geometry(config, inputs)
        return dataclasses.replace(geometry, first_stage_layer=cls.deepstack_layers(config))

    @classmethod
    def preprocess_video(cls, frames: Any, processor_config: Mapping[str, Any], config: Any) -> VideoInputs:
        """Not offered: a Qwen3-VL prompt needs the processor's per-frame timestamps between the frames."""
        raise AdapterError(
            f"{cls.__name__}: no built-in video preprocessing (the prompt needs the processor's timestamps between "
            "frames); install torchvision so that the model's own processor can be used"
        )

    # ------------------------------------------------------------------ modules
    def query_key_projections(self, layer: nn.Module) -> tuple[nn.Module, nn.Module]:
        """The per-head query and key norms: their outputs (``[B, S, H, d]``, before RoPE) are what attention
        rotates, so the stage's relevance score reproduces attention's queries and keys exactly."""
        attention = self.attention(layer)
        return attention.q_norm, attention.k_norm

    def validate(self) -> None:
        super().validate()
        attention = self.attention(self.decoder_layers()[0])
        if not (hasattr(attention, "q_norm") and hasattr(attention, "k_norm")):
            raise AdapterError(f"{type(self.model).__name__}: Qwen3-VL attention without q_norm/k_norm")

    def _stock_vision_attention(self) -> tuple[type, ...]:
        from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLVisionAttention

        found: tuple[type, ...] = (Qwen3VLVisionAttention,)
        try:
            from transformers.models.qwen3_vl_moe.modeling_qwen3_vl_moe import Qwen3VLMoeVisionAttention
        except ImportError:  # a transformers build without the MoE model
            return found
        return (*found, Qwen3VLMoeVisionAttention)

    # ------------------------------------------------------------------ plans
    def check_plan(self, plan: Any) -> None:
        """Refuse frame-level stages before the last deepstack injection (see the module docstring)."""
        first = self.deepstack_layers(self.config)
        for stage in plan.stages:
            if stage.layer < first:
                raise PlanError(
                    f"plan {plan.policy.name!r} has a frame-level stage at layer {stage.layer}, but "
                    f"{type(self.model).__name__} adds deepstack visual features at the video positions after "
                    f"decoder layers 0..{first - 1}; a stage there would prune before that injection. Put stages at "
                    f"layer {first} or later"
                )

    # ------------------------------------------------------------------ video
    def locate_videos(self, call: MultimodalCall, inputs_embeds: Tensor) -> list[VideoLayout | None]:
        """One layout per sample from its runs of video tokens (one run per temporal patch) and
        ``video_grid_thw``, or, for a pre-encoded video, from the runs' M-RoPE positions."""
        batch = inputs_embeds.shape[0]
        grid_thw = call.kwargs.get("video_grid_thw")
        if call.video_mask is None or (grid_thw is None and call.encoded_video is None):
            return [None] * batch
        edges = torch.stack([self.span_edges(call.video_mask[sample]) for sample in range(batch)]).long()
        if grid_thw is None:
            return self._locate_runs_from_positions(call, inputs_embeds, edges)
        merge = self.spatial_merge_size()
        # One host sync reads every sample's video runs and the grid together.
        host = torch.cat([edges.flatten(), grid_thw.to(device=edges.device, dtype=torch.long).flatten()]).cpu()
        edges_h = host[: edges.numel()].view(edges.shape)
        grids = [tuple(int(v) for v in row) for row in host[edges.numel() :].view(-1, 3).tolist()]
        next_grid = 0
        layouts: list[VideoLayout | None] = []
        for sample in range(batch):
            runs = self.spans_from_edges(edges_h[sample])
            if not runs:
                layouts.append(None)
                continue
            if next_grid >= len(grids):
                raise AdapterError(f"sample {sample}: video tokens but no row of video_grid_thw left for them")
            frames, height, width = grids[next_grid]
            next_grid += 1
            rows, cols = height // merge, width // merge
            if len(runs) != frames:
                what = "several videos" if len(runs) > frames else "fewer runs than temporal patches"
                raise NotImplementedError(
                    f"sample {sample} holds {len(runs)} runs of video tokens for a video of {frames} temporal patches "
                    f"({what}); hieravid prunes one video per sample"
                )
            layouts.append(self._layout(sample, runs, rows, cols, inputs_embeds.device))
        return layouts

    def _layout(
        self, sample: int, runs: list[tuple[int, int]], rows: int, cols: int, device: torch.device
    ) -> VideoLayout:
        """The layout of one video whose temporal patches are ``runs`` of ``rows × cols`` tokens each."""
        lengths = {end - start for start, end in runs}
        if lengths != {rows * cols}:
            raise AdapterError(
                f"sample {sample}: runs of video tokens of lengths {sorted(lengths)}, expected {rows * cols} per "
                f"temporal patch ({rows}×{cols})"
            )
        frame_index = torch.tensor([list(range(start, end)) for start, end in runs], dtype=torch.long)
        empty = torch.empty(0, dtype=torch.long, device=device)
        span = (runs[0][0], runs[-1][1])
        return VideoLayout(frame_index.to(device, non_blocking=True), empty, rows, cols, "none", known_span=span)

    def _locate_runs_from_positions(
        self, call: MultimodalCall, inputs_embeds: Tensor, edges: Tensor
    ) -> list[VideoLayout | None]:
        """Layouts of pre-encoded videos: each run's M-RoPE height and width rows must be one raster (checked)."""
        positions = call.kwargs.get("position_ids")
        if not isinstance(positions, Tensor) or positions.dim() != 3 or positions.shape[0] < 3:
            raise AdapterError(
                "the video was passed pre-encoded (mm_encoder_outputs) without video_grid_thw or M-RoPE "
                "position_ids [3 or 4, batch, sequence]; pass video_grid_thw to locate the video's frames"
            )
        host_edges = edges.cpu()
        host = positions[-3:].cpu()  # temporal, height, width (a leading text row is generate's extra)
        layouts: list[VideoLayout | None] = []
        for sample in range(inputs_embeds.shape[0]):
            runs = self.spans_from_edges(host_edges[sample])
            if not runs:
                layouts.append(None)
                continue
            shapes = set()
            for start, end in runs:
                temporal, height, width = host[:, 0 if host.shape[1] == 1 else sample, start:end]
                frames, rows, cols = self._raster_layout(sample, temporal, height, width, call)
                shapes.add((frames, rows, cols))
            if len(shapes) != 1 or next(iter(shapes))[0] != 1:
                raise AdapterError(
                    f"sample {sample}: its runs of video tokens are not temporal patches of one raster "
                    f"({sorted(shapes)}); pass video_grid_thw"
                )
            _, rows, cols = shapes.pop()
            layouts.append(self._layout(sample, runs, rows, cols, inputs_embeds.device))
        return layouts

    # ------------------------------------------------------------------ deepstack
    def speedups(self) -> list[Speedup]:
        """Qwen2-VL's vision speedups, and the deepstack step without its host sync (:func:`add_deepstack_rows`),
        which also lets ``cuda_graphs=True`` capture whole prefills."""
        found = super().speedups()
        text_model = self.language_model()
        if hasattr(text_model, "_deepstack_process") and "_deepstack_process" not in vars(text_model):
            found.append(
                Speedup(
                    name="deepstack-without-host-sync",
                    owner=text_model,
                    attribute="_deepstack_process",
                    value=add_deepstack_rows,
                    exact=True,
                    reason="the deepstack rows are added at the visual positions through a gather by rank instead of "
                    "a boolean-mask index (the same additions; no row count read by the host, so a prefill can be "
                    "captured)",
                )
            )
        return found

    def prefill_capturable(self) -> bool:
        """Only with :func:`add_deepstack_rows` installed: transformers' own deepstack step reads the device."""
        return vars(self.language_model()).get("_deepstack_process") is add_deepstack_rows

    def gather_extra_inputs(
        self, kwargs: dict[str, Any], index: Tensor, valid: Tensor, kept_rows: Sequence[int]
    ) -> None:
        """Prune the deepstack features with the tokens: keep the rows of the visual positions that stage 0 keeps.

        ``deepstack_visual_embeds[k]`` holds one row per True entry of ``visual_pos_masks`` in row-major order
        (images and videos alike); the new mask is the old one gathered at the kept rows (padding slots excluded),
        and the rows follow it in the same order. Every row the input level drops is a video row, so the number
        of visual positions kept is known on the host and nothing waits for the device.
        """
        mask = kwargs.get("visual_pos_masks")
        features = kwargs.get("deepstack_visual_embeds")
        if mask is None or not features:
            return
        mask = mask.to(index.device).bool()
        row_of = (mask.flatten().long().cumsum(0) - 1).view(mask.shape)  # deepstack row of each visual position
        kept_mask = mask.gather(1, index) & valid
        dropped = sum(mask.shape[1] - rows for rows in kept_rows)
        kept_positions = mask_to_indices(kept_mask.flatten(), int(features[0].shape[0]) - dropped)
        rows = row_of.gather(1, index).flatten()[kept_positions]
        kwargs["visual_pos_masks"] = kept_mask
        kwargs["deepstack_visual_embeds"] = [feature.index_select(0, rows.to(feature.device)) for feature in features]
