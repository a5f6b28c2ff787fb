"""The pruning engine: instance-local hooks that run a :class:`~hieravid.plan.PruningPlan` inside a model.

Coordinates. The multimodal module builds the *original* sequence (``S`` rows). The segment level
(a forward pre-hook on the language model) gathers the rows entering layer 0: text, newlines and the
kept (merged) video tokens, with their original position ids and an explicit 2-D mask — *stage-0
coordinates*. Each frame-level stage at layer ``l`` selects rows of the current coordinates; layers
after ``l`` run in the new coordinates: a forward pre-hook on each of them swaps in that stage's 4-D
mask (built with ``create_causal_mask(..., layer_idx=first layer of the stage)`` from the 2-D mask in
stage coordinates), the gathered RoPE ``(cos, sin)`` and neutral ``position_ids=None`` (gaps in
position ids would look like packed sequences to flash attention). Each layer's KV cache therefore
holds exactly the rows that layer saw.

Batches. Samples are pruned on their own content; a coordinate system has the length of its longest
sample and shorter samples hold padding slots (copies of a real row, 2-D mask 0) inserted after their
last video row, so no real query ever attends to them and they never become an all-masked first row.

Stage layer (prefill only). Forward hooks on the query/key projections keep their outputs; a forward
pre-hook on ``post_attention_layernorm`` (whose input is the post-attention residual stream) computes
the last-query relevance from those projections and the layer's RoPE (adapter), runs the frame level
per sample and records the selection. With ``after_attention`` the MLP runs on the kept rows only (a
pre-hook gathers its input, a forward hook scatters its output back to full length with zeros) and a
forward hook on the layer gathers its output; with ``after_mlp`` only the layer's output is gathered.
No layer ever runs twice.

Host syncs. A prefill reads the device only before layer 0 (the adapter locating the video, the segment
level's number of segments, and one read of the per-segment counts and marginal values). From then on every
count is known on the host (``Request.schedule``: a selector keeps exactly its budgets), so the stages only
enqueue work and the host stays ahead of the GPU (``tests/runtime/test_sync_free.py``).

Decode and continuation calls are never pruned: the 2-D mask (original coordinates, as ``generate``
grows it) is translated into each stage's coordinates and the masks rebuilt against each stage's
first cache layer; positions are the caller's (``generate`` extends the original ones) or continue from
the original length.
"""

from __future__ import annotations

import functools
import inspect
import warnings
import weakref
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from hieravid.errors import AdapterError
from hieravid.runtime.compat import cache_from_kwargs, cache_from_output, causal_mask
from hieravid.runtime.state import (
    CONTENT,
    NEWLINE,
    PAD,
    TEXT,
    Coords,
    Request,
    RequestStats,
    SampleCounts,
    StageStats,
)

if TYPE_CHECKING:
    from hieravid.adapters.base import Adapter, MultimodalCall, VideoLayout
    from hieravid.plan import PruningPlan, StagePlan

__all__ = ["Pruner"]


def _gather_rows(tensor: Tensor, index: Tensor) -> Tensor:
    """``tensor[b, index[b, k]]`` for a ``[B or 1, S, ...]`` tensor and ``[B, K]`` index."""
    batch = index.shape[0]
    if tensor.shape[0] != batch:
        tensor = tensor.expand(batch, *tensor.shape[1:])
    expanded = index.view(*index.shape, *([1] * (tensor.dim() - 2))).expand(*index.shape, *tensor.shape[2:])
    return tensor.gather(1, expanded)


def _gather_positions(position_ids: Tensor, index: Tensor) -> Tensor:
    """Gather position ids (``[B, S]``, ``[1, S]``, ``[R, B, S]``) along the sequence with ``[B, K]`` index."""
    batch = index.shape[0]
    if position_ids.dim() == 2:
        return position_ids.expand(batch, -1).gather(1, index)
    if position_ids.dim() == 3:
        rows = position_ids.shape[0]
        return position_ids.expand(rows, batch, -1).gather(2, index.unsqueeze(0).expand(rows, -1, -1))
    raise AdapterError(f"position_ids of shape {tuple(position_ids.shape)} are not supported")


def _compact(mask: Tensor, rank: Tensor, width: int) -> Tensor:
    """``[B, width]``: per row, the ascending column indices where ``mask`` is True (``rank`` is
    ``mask.cumsum(1)``), without a device sync; slots past a row's count hold 0."""
    batch, columns = mask.shape
    target = torch.where(mask, rank - 1, torch.full_like(rank, width))
    out = torch.zeros(batch, width + 1, dtype=torch.long, device=mask.device)
    out.scatter_(1, target, torch.arange(columns, device=mask.device).expand(batch, -1))
    return out[:, :width]


def _pack(keep: Tensor, kind: Tensor, counts: list[int], query_rows: int) -> tuple[Tensor, Tensor]:
    """Pack the kept rows of each sample (``keep`` ``[B, S]``, ``counts`` its per-sample sums read on the
    host) into ``[B, K]`` ascending indices, ``K = max(counts)``, with padding slots.

    A shorter sample gets its ``K - count`` padding slots at ``max(1, min(last video row + 1,
    count - query_rows))`` of its kept rows (the count when it keeps no video row); a padding slot copies
    the row just before it and is marked invalid. Vectorised over the batch, no device sync.
    """
    length = max(counts)
    device = keep.device
    rank = keep.cumsum(1)
    rows = _compact(keep, rank, length)
    if min(counts) == length:  # no padding slot (e.g. batch 1): a dozen launches fewer
        return rows, torch.ones_like(rows, dtype=torch.bool)
    count = rank[:, -1:]
    video = keep & (kind != TEXT)
    last_video = torch.where(video, rank, torch.zeros_like(rank)).amax(dim=1, keepdim=True)
    last_video = torch.where(last_video > 0, last_video, count)
    at = torch.minimum(last_video, count - query_rows).clamp_min(1)
    pad = length - count
    slot = torch.arange(length, device=device).unsqueeze(0)
    source = torch.where(slot < at, slot, torch.where(slot < at + pad, at - 1, slot - pad))
    valid = (slot < at) | (slot >= at + pad)
    return rows.gather(1, source), valid


def _to_list(tensor: Tensor) -> list[int]:
    return [int(v) for v in tensor.tolist()]


class Pruner:
    """Owns the hooks and per-request state of one :class:`~hieravid.runtime.PruningHandle`."""

    def __init__(self, model: nn.Module, adapter: Adapter, plan: PruningPlan, *, cuda_graphs: bool = False) -> None:
        from hieravid.ops.segment import SegmentLevelGraphs

        self.model = model
        self.adapter = adapter
        self.plan = plan
        self.multimodal = adapter.multimodal_module()
        self.language_model = adapter.language_model()
        self.layers = list(adapter.decoder_layers())
        self.stages: tuple[StagePlan, ...] = plan.stages
        self.stage_layers = [stage.layer for stage in plan.stages]
        # stage_of[i]: coordinate system layer i's attention runs in (number of stages before layer i).
        self.stage_of = [sum(1 for layer in self.stage_layers if layer < i) for i in range(len(self.layers))]
        self.request: Request | None = None
        self.pending_call: MultimodalCall | None = None
        self.last_stats: RequestStats | None = None
        self.warned_no_video = False
        self._lm_signature = inspect.signature(self.language_model.forward)
        # Owned here, dropped with the handle: the segment level's CUDA graphs (one per video geometry).
        self.segment_graphs = SegmentLevelGraphs() if cuda_graphs else None

    # ================================================================== installation
    def install(self, register: Any) -> None:
        """Register every hook through ``register(module, kind, fn, **options)`` (the handle tracks them)."""
        register(self.multimodal, "forward_pre", self._multimodal_pre_hook, with_kwargs=True)
        register(self.multimodal, "forward", self._multimodal_hook, always_call=True)
        register(self.language_model, "forward_pre", self._lm_pre_hook, with_kwargs=True)
        register(self.language_model, "forward", self._lm_hook, with_kwargs=True, always_call=True)
        for index, layer in enumerate(self.layers):
            register(layer, "forward_pre", functools.partial(self._layer_pre_hook, index), with_kwargs=True)
        for stage_index, stage in enumerate(self.stages):
            layer = self.layers[stage.layer]
            q_proj, k_proj = self.adapter.query_key_projections(layer)
            register(q_proj, "forward", functools.partial(self._projection_hook, stage.layer, "query"))
            register(k_proj, "forward", functools.partial(self._projection_hook, stage.layer, "key"))
            register(
                self.adapter.post_attention_norm(layer),
                "forward_pre",
                functools.partial(self._select_hook, stage_index),
            )
            if stage.prune_point == "after_attention":
                mlp = self.adapter.mlp(layer)
                register(mlp, "forward_pre", functools.partial(self._mlp_pre_hook, stage.layer))
                register(mlp, "forward", functools.partial(self._mlp_hook, stage.layer))
            register(layer, "forward", functools.partial(self._layer_hook, stage_index))

    # ================================================================== multimodal module
    def _multimodal_pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple | None:
        from hieravid.adapters.base import MultimodalCall

        changed = False
        if args:
            bound = inspect.signature(module.forward).bind_partial(*args, **kwargs)
            kwargs = dict(bound.arguments)
            kwargs.update(kwargs.pop("kwargs", {}) if isinstance(kwargs.get("kwargs"), dict) else {})
            args, changed = (), True
        input_ids = kwargs.get("input_ids")
        inputs_embeds = kwargs.get("inputs_embeds")
        past = cache_from_kwargs(kwargs)
        request = self.request
        if request is not None and request.pruned and past is not None and request.holds_cache(past):
            reference = inputs_embeds if inputs_embeds is not None else input_ids
            if reference is not None:
                before = (kwargs.get("attention_mask"), kwargs.get("position_ids"))
                self.adapter.prepare_continuation_call(
                    kwargs,
                    total_length=request.total_length,
                    new_length=int(reference.shape[1]),
                    batch=int(reference.shape[0]),
                    device=reference.device,
                )
                after = (kwargs.get("attention_mask"), kwargs.get("position_ids"))
                changed = changed or any(a is not b for a, b in zip(after, before))
        self.pending_call = MultimodalCall(
            input_ids=input_ids,
            video_mask=self.adapter.video_mask(input_ids, inputs_embeds),
            kwargs=kwargs,
        )
        return (args, kwargs) if changed else None

    def _multimodal_hook(self, module: nn.Module, args: tuple, output: Any) -> None:
        self.pending_call = None

    # ================================================================== language model
    def _lm_pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple | None:
        if args:
            kwargs = dict(self._lm_signature.bind_partial(*args, **kwargs).arguments)
            extra = kwargs.pop("kwargs", None)
            if isinstance(extra, dict):
                kwargs.update(extra)
            args = ()
            result: tuple | None = (args, kwargs)
        else:
            result = None
        inputs_embeds = kwargs.get("inputs_embeds")
        reference = inputs_embeds if inputs_embeds is not None else kwargs.get("input_ids")
        if reference is None:
            return result
        past = cache_from_kwargs(kwargs)
        past_length = int(past.get_seq_length()) if past is not None else 0
        call, self.pending_call = self.pending_call, None
        if past_length == 0:
            return self._new_request(kwargs, inputs_embeds, call, int(reference.shape[0])) or result
        request = self.request
        if request is not None and request.holds_cache(past):
            return self._continue(request, kwargs, reference) or result
        # A cache this handle did not fill: run unpruned, but refuse caches pruned by another request.
        lengths = {layer.get_seq_length() for layer in getattr(past, "layers", [])}
        if len(lengths) > 1:
            raise AdapterError(
                "the cache holds layers of different lengths (a pruned prompt) that this handle did not "
                "produce; continue a pruned request with the cache object its prefill returned"
            )
        self.request = Request(
            batch=int(reference.shape[0]), original_length=past_length, total_length=past_length, phase="continuation"
        )
        return result

    def _lm_hook(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        request = self.request
        if request is None:
            return
        phase, request.phase = request.phase, "idle"
        request.stage_inputs.clear()
        request.capture = request.pending = None
        if output is None:  # the forward raised: forget the request so that nothing stale is reused
            self.request = None
            return
        reference = kwargs.get("inputs_embeds")
        if reference is None:
            reference = kwargs.get("input_ids")
        new_length = int(reference.shape[1]) if reference is not None else 0
        cache = cache_from_output(output)
        if phase == "prefill":
            request.total_length = request.original_length
            if cache is not None:
                request.cache = weakref.ref(cache)
            if request.pruned:
                self.last_stats = self._finish_stats(request)
        elif phase == "continuation":
            request.total_length += new_length
            if cache is not None and request.cache is None:
                request.cache = weakref.ref(cache)

    # ------------------------------------------------------------------ new prefill
    def _new_request(
        self, kwargs: dict, inputs_embeds: Tensor | None, call: MultimodalCall | None, batch: int
    ) -> tuple | None:
        length = int((inputs_embeds if inputs_embeds is not None else kwargs["input_ids"]).shape[1])
        request = self.request = Request(batch=batch, original_length=length, total_length=0, phase="prefill")
        layouts: list[VideoLayout | None] = [None] * batch
        if call is not None and inputs_embeds is not None:
            layouts = self.adapter.locate_videos(call, inputs_embeds)
        if all(layout is None for layout in layouts):
            if not self.warned_no_video:
                self.warned_no_video = True
                warnings.warn(
                    "hieravid: this prompt holds no video tokens; it runs unpruned (warned once per handle)",
                    UserWarning,
                    stacklevel=2,
                )
            self.last_stats = RequestStats(pruned=False, reason="no video", batch_size=batch, prompt_length=length)
            return None
        if not self.plan.prunes:
            self.last_stats = RequestStats(
                pruned=False,
                reason="plan prunes nothing",
                batch_size=batch,
                prompt_length=length,
                videos=tuple(layout.describe() if layout is not None else None for layout in layouts),
            )
            return None
        assert inputs_embeds is not None
        # Named profiler ranges let `hieravid bench` attribute pruning overhead per level (free when idle).
        with torch.profiler.record_function("hieravid/segment_level"):
            return self._segment_level(request, kwargs, inputs_embeds, layouts)

    def _segment_level(
        self, request: Request, kwargs: dict, inputs_embeds: Tensor, layouts: list[VideoLayout | None]
    ) -> tuple:
        from hieravid.ops.peers import input_level

        batch, length = inputs_embeds.shape[:2]
        device = inputs_embeds.device
        mask = kwargs.get("attention_mask")
        if isinstance(mask, dict) or (isinstance(mask, Tensor) and mask.dim() != 2):
            raise NotImplementedError(
                "hieravid needs a 2-D attention mask (or none) at prefill; prepared 4-D masks (static/compiled "
                "caches) are not supported"
            )
        mask2d = torch.ones(batch, length, dtype=torch.bool, device=device) if mask is None else mask.bool()
        position_ids = kwargs.get("position_ids")
        if position_ids is None:
            position_ids = self.adapter.default_position_ids(inputs_embeds, 0)

        segment = self.plan.segment
        query_rows = max((stage.query_rows for stage in self.stages), default=1)
        keeps: list[Tensor] = []
        kinds: list[Tensor] = []
        segs: list[Tensor] = []
        merged: list[tuple[Tensor, Tensor] | None] = []
        stats: dict[str, list[Any]] = {
            "videos": [],
            "num_segments": [],
            "frame_segment_ids": [],
            "marginal_values": [],
            "input_kept_positions": [],
            "layouts": [],
        }
        counts: list[int] = []
        # Per sample, what the frame-level budgets need, read from the device in the one sync below.
        to_read: list[tuple[int, Tensor, Tensor]] = []
        for sample, layout in enumerate(layouts):
            kind = torch.full((length,), TEXT, dtype=torch.int8, device=device)
            seg = torch.full((length,), -1, dtype=torch.long, device=device)
            keep = torch.ones(length, dtype=torch.bool, device=device)
            if layout is None:
                request.marginal_values.append(torch.zeros(1, device=device))
                request.schedule.append(
                    SampleCounts(torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.float64), 0, length)
                )
                counts.append(length)
                for key in stats:
                    stats[key].append(0 if key == "num_segments" else None)
                merged.append(None)
            else:
                content = layout.frame_index.flatten()
                frames = inputs_embeds[sample][layout.frame_index]
                if segment.enabled:  # HieraVid's segment level or a peer's input operator (one segment)
                    result = input_level(segment.kind, frames, cuda_graphs=self.segment_graphs, **segment.options)
                    frame_segments, token_segments = result.frame_segment_ids, result.token_segment_ids
                    marginal = result.marginal_values
                    kept_content = content[result.kept_index]
                    merged.append((kept_content, result.features))
                else:  # SegmentPlan.enabled False: one segment, no merging
                    frame_segments = torch.zeros(layout.frames, dtype=torch.long, device=device)
                    token_segments = torch.zeros(content.numel(), dtype=torch.long, device=device)
                    marginal = torch.zeros(1, device=device)
                    kept_content = content
                    merged.append(None)
                request.marginal_values.append(marginal.to(device))
                # Shapes are known on the host: rows kept, content kept, newlines.
                kept, newlines = int(kept_content.numel()), int(layout.newline_index.numel())
                counts.append(length - int(content.numel()) + kept)
                groups = int(marginal.numel())
                request.schedule.append(
                    SampleCounts(
                        torch.tensor([kept]),
                        torch.zeros(1, dtype=torch.float64),
                        newlines,
                        counts[-1] - kept - newlines,
                    )
                )
                if segment.enabled and groups > 1 and any(stage.per_segment for stage in self.stages):
                    tokens = torch.zeros(groups, dtype=torch.long, device=device)
                    tokens.index_add_(0, token_segments.to(device), torch.ones_like(token_segments, device=device))
                    to_read.append((sample, tokens, marginal))
                # index_fill_, not ``x[index] = scalar``: that copies the scalar to the device and waits for it.
                keep.index_fill_(0, content, False).index_fill_(0, kept_content, True)
                kind.index_fill_(0, kept_content, CONTENT).index_fill_(0, layout.newline_index, NEWLINE)
                seg[kept_content] = token_segments.to(device)
                video_positions = torch.cat([kept_content, layout.newline_index]).sort().values
                stats["videos"].append(layout.describe())
                stats["num_segments"].append(int(marginal.numel()) if segment.enabled else 1)
                stats["frame_segment_ids"].append(frame_segments)
                stats["marginal_values"].append(marginal)
                stats["input_kept_positions"].append(video_positions)
                stats["layouts"].append(layout)
            keeps.append(keep)
            kinds.append(kind)
            segs.append(seg)

        keep_all, kind_stack = torch.stack(keeps), torch.stack(kinds)
        right_padded, prompt_unmasked = self._read_segment_meta(request, mask2d if mask is not None else None, to_read)
        if right_padded:
            raise NotImplementedError("right-padded batches are not supported; pad on the left (generate's default)")
        index, valid = _pack(keep_all, kind_stack, counts, query_rows)
        kind_all = torch.where(valid, kind_stack.gather(1, index), PAD)
        seg_all = torch.where(valid, torch.stack(segs).gather(1, index), -1)
        positions0 = torch.arange(index.shape[1], device=device).unsqueeze(0).expand(batch, -1)
        coords = Coords(
            src=index,
            idx0=positions0.contiguous(),
            orig=index,
            valid=valid,
            kind=kind_all,
            seg=seg_all,
            counts=tuple(sample.video for sample in request.schedule),
            all_valid=min(counts) == max(counts),
        )
        request.coords = [coords]
        request.mask2d = mask2d
        request.prompt_unmasked = prompt_unmasked
        # valid is False exactly at padding slots, which exist only when the samples keep unequal counts.
        request.stage_all_valid = [prompt_unmasked and min(counts) == max(counts)]
        request.pruned = True
        request.stats = stats
        request.stats["stages"] = []

        if not segment.enabled:
            # Nothing changes before the first stage: leave the language model's inputs untouched.
            return None
        embeds = _gather_rows(inputs_embeds, index)
        for sample, item in enumerate(merged):
            if item is None:
                continue
            kept_content, features = item
            target = torch.searchsorted(index[sample].contiguous(), kept_content.contiguous())
            # Padding slots copy the previous row; searchsorted returns the first occurrence (the real row).
            embeds[sample, target] = features.to(embeds.dtype)
        mask_dtype = mask.dtype if isinstance(mask, Tensor) else torch.long
        kwargs["inputs_embeds"] = embeds
        # No padding anywhere: no mask, as the model had none (building one from an all-ones mask syncs).
        kwargs["attention_mask"] = None if request.stage_all_valid[0] else request.translate_mask(0).to(mask_dtype)
        kwargs["position_ids"] = _gather_positions(position_ids, index)
        return ((), kwargs)

    @staticmethod
    def _read_segment_meta(
        request: Request, mask2d: Tensor | None, to_read: list[tuple[int, Tensor, Tensor]]
    ) -> tuple[bool, bool]:
        """The one host sync of the segment level (none when there is nothing to read): the mask's two checks
        (right padding, any padding) and, per sample with several segments, its per-segment content counts and
        marginal values, stored in ``request.schedule``. Returns ``(right_padded, prompt_unmasked)``."""
        parts: list[Tensor] = []
        if mask2d is not None:
            parts.append(torch.stack([~mask2d[:, -1].all(), mask2d.all()]).double())
        for _, tokens, marginal in to_read:
            parts += [tokens.double(), marginal.to(device=tokens.device, dtype=torch.float64)]
        if not parts:
            return False, True
        host = torch.cat([part.to(parts[0].device) for part in parts]).cpu()
        right_padded, prompt_unmasked = (bool(host[0]), bool(host[1])) if mask2d is not None else (False, True)
        offset = 2 if mask2d is not None else 0
        for sample, tokens, _ in to_read:
            groups = tokens.numel()
            counts = request.schedule[sample]
            counts.segment_tokens = host[offset : offset + groups].long()
            counts.marginal_values = host[offset + groups : offset + 2 * groups].clone()
            offset += 2 * groups
        return right_padded, prompt_unmasked

    # ------------------------------------------------------------------ continuation
    def _continue(self, request: Request, kwargs: dict, reference: Tensor) -> tuple | None:
        request.phase = "continuation"
        if not request.pruned:
            return None
        batch, new_length = int(reference.shape[0]), int(reference.shape[1])
        if batch != request.batch:
            raise AdapterError(f"a continuation of a pruned batch of {request.batch} got {batch} samples")
        mask = kwargs.get("attention_mask")
        if isinstance(mask, dict) or (isinstance(mask, Tensor) and mask.dim() != 2):
            raise NotImplementedError(
                "hieravid needs a 2-D attention mask (or none) when decoding a pruned cache; prepared 4-D masks "
                "(static/compiled caches) are not supported"
            )
        expected = request.total_length + new_length
        if mask is None:
            if new_length > 1:  # a new turn (decode steps add one token: no device sync for them)
                self._check_continuation_positions(request, kwargs.get("position_ids"))
            mask2d = torch.ones(batch, expected, dtype=torch.bool, device=reference.device)
        else:
            if mask.shape[1] != expected:
                raise AdapterError(
                    f"attention_mask covers {mask.shape[1]} positions, but the pruned request has seen "
                    f"{request.total_length} original positions and this call adds {new_length} (expected "
                    f"{expected}); pass the mask in original coordinates, as generate() does"
                )
            mask2d = mask.bool()
        request.mask2d = mask2d
        if kwargs.get("position_ids") is None:
            kwargs["position_ids"] = self.adapter.default_position_ids(reference, request.total_length).to(
                reference.device
            )
        mask_dtype = mask.dtype if isinstance(mask, Tensor) else torch.long
        kwargs["attention_mask"] = request.translate_mask(0).to(mask_dtype)
        return ((), kwargs)

    def _check_continuation_positions(self, request: Request, position_ids: Any) -> None:
        """Without a 2-D mask (no padding), the caller's positions must continue at the original length.

        ``generate`` drops an all-ones mask (transformers >= 5.24), so the mask-length check cannot catch a
        continuation sliced with the pruned cache length (full history passed as ``input_ids``); its
        positions then start at that length instead.
        """
        text = self.adapter.text_positions(position_ids)
        if text is None:
            return
        first = _to_list(text[..., 0].flatten())
        if any(value != request.total_length for value in first):
            raise AdapterError(
                f"position_ids continue from {min(first)}, but the pruned request has seen {request.total_length} "
                "original positions; pass only the new tokens with the attention mask in original coordinates, as "
                "generate() does"
            )

    # ================================================================== decoder layers
    def _layer_pre_hook(self, index: int, module: nn.Module, args: tuple, kwargs: dict) -> tuple | None:
        request = self.request
        if request is None or not request.pruned or request.phase == "idle":
            return None
        stage = self.stage_of[index]
        hidden = args[0] if args else kwargs["hidden_states"]
        if request.phase == "prefill":
            if stage > 0:
                mask, embeddings = self._stage_inputs(request, stage, index, hidden, kwargs)
                kwargs["attention_mask"] = mask
                kwargs["position_embeddings"] = embeddings
            if stage > 0 or self.plan.segment.enabled:
                kwargs["position_ids"] = None
            if stage < len(self.stages) and self.stages[stage].layer == index:
                request.capture = {"layer": index, "stage": stage, "position_embeddings": kwargs["position_embeddings"]}
            return args, kwargs
        # continuation: never prune; masks in each stage's coordinates
        if stage == 0:
            return None
        kwargs["attention_mask"] = self._stage_mask(request, stage, index, hidden, kwargs)
        return args, kwargs

    def _first_layer(self, stage: int) -> int:
        return self.stage_layers[stage - 1] + 1

    def _stage_mask(self, request: Request, stage: int, index: int, hidden: Tensor, kwargs: dict) -> Any:
        cached = request.stage_inputs.get(stage)
        if cached is not None:
            return cached[0]
        if kwargs.get("attention_mask") is None and request.stage_all_valid[stage]:
            # The language model's own (stage-0) mask is None: SDPA/flash rely on is_causal because no key
            # is masked. Stage `stage` differs only in which prompt rows it holds, all real and unmasked,
            # so its mask is None too — decided without building it (mask creation syncs with the device).
            mask = None
        else:
            mask = causal_mask(
                self.adapter.text_config(),
                hidden,
                request.translate_mask(stage),
                cache_from_kwargs(kwargs),
                layer_idx=self._first_layer(stage),
            )
        request.stage_inputs[stage] = (mask, None)
        return mask

    def _stage_inputs(self, request: Request, stage: int, index: int, hidden: Tensor, kwargs: dict) -> tuple:
        cached = request.stage_inputs.get(stage)
        if cached is not None and cached[1] is not None:
            return cached
        mask = self._stage_mask(request, stage, index, hidden, kwargs)
        cos, sin = kwargs["position_embeddings"]
        index0 = request.coords[stage].idx0
        embeddings = (_gather_rows(cos, index0), _gather_rows(sin, index0))
        request.stage_inputs[stage] = (mask, embeddings)
        return mask, embeddings

    def _projection_hook(self, layer: int, name: str, module: nn.Module, args: tuple, output: Tensor) -> None:
        capture = self.request.capture if self.request is not None else None
        if capture is not None and capture["layer"] == layer:
            # Only the last query rows are needed: do not keep the whole query projection alive.
            capture[name] = output[:, -self.stages[capture["stage"]].query_rows :] if name == "query" else output

    def _select_hook(self, stage_index: int, module: nn.Module, args: tuple) -> None:
        request = self.request
        if request is None or request.capture is None or request.capture["stage"] != stage_index:
            return
        capture, request.capture = request.capture, None
        with torch.profiler.record_function(f"hieravid/stage_{stage_index + 1}"):
            self._select(request, capture, stage_index, args[0])

    def _select(self, request: Request, capture: dict, stage_index: int, hidden: Tensor) -> None:
        stage = self.stages[stage_index]
        layer = self.layers[stage.layer]
        coords = request.coords[stage_index]
        key_mask = request.translate_mask(stage_index)
        query, key = self.adapter.stage_query_key(
            layer, capture["query"], capture["key"], capture["position_embeddings"], stage.query_rows
        )
        from hieravid.ops.relevance import last_query_attention

        attention = last_query_attention(
            query, key, scaling=self.adapter.attention_scaling(layer), key_padding_mask=key_mask
        )
        selection, new_coords, stage_stats = self._frame_level(stage_index, stage, coords, hidden, attention)
        request.coords.append(new_coords)
        # Kept rows are never padding slots, so the new system is all valid iff it has no padding slot.
        request.stage_all_valid.append(request.prompt_unmasked and bool(new_coords.all_valid))
        request.stats["stages"].append(stage_stats)
        request.pending = {
            "layer": stage.layer,
            "selection": selection,
            "valid": new_coords.valid,
            "length": coords.length,
        }

    def _frame_level(
        self, stage_index: int, stage: StagePlan, coords: Coords, hidden: Tensor, attention: Tensor
    ) -> tuple[Tensor, Coords, StageStats]:
        from hieravid.ops.layer import frame_level

        request = self.request
        assert request is not None
        device = hidden.device
        options = dict(stage.selector_options)
        seed = options.pop("seed", None)
        max_block = options.pop("max_block", "unset")
        drop_newlines = not self.plan.keep_newlines
        batch = coords.src.shape[0]
        kind = coords.kind
        content = kind == CONTENT
        keep = (kind == TEXT) | ((kind == NEWLINE) & (not drop_newlines))
        # Every count is known on the host (request.schedule): the stage never waits for the device.
        schedule = request.schedule
        n_content = [counts.content for counts in schedule]
        before = [counts.video for counts in schedule]
        n_base = [counts.text + (0 if drop_newlines else counts.newlines) for counts in schedule]
        candidates_all = _compact(content, content.cumsum(1), max(n_content))
        kept: list[int] = []
        budgets: list[tuple[int, ...]] = []
        for sample in range(batch):
            counts = schedule[sample]
            if not n_content[sample]:
                kept.append(0)
                budgets.append(())
                continue
            candidates = candidates_all[sample, : n_content[sample]]
            if stage.per_segment:
                segment_ids = coords.seg[sample, candidates]
                sample_marginal = request.marginal_values[sample]
                host_meta = (counts.segment_tokens, counts.marginal_values)
            else:
                segment_ids = torch.zeros_like(candidates)
                sample_marginal = torch.zeros(1, device=device)
                host_meta = (counts.segment_tokens.sum().view(1), torch.zeros(1, dtype=torch.float64))
            generator = torch.Generator().manual_seed(int(seed)) if seed is not None else None
            block = n_content[sample] if max_block is None else (None if max_block == "unset" else max_block)
            result = frame_level(
                hidden[sample, candidates],
                attention[sample, candidates],
                segment_ids,
                sample_marginal,
                stage.prune_ratio,
                selector=stage.selector,
                sign=stage.relevance_sign,
                dynamic=stage.dynamic_budget,
                scale=stage.budget_scale,
                min_keep=stage.min_keep,
                max_keep=stage.max_keep,
                generator=generator,
                max_block=block,
                host_meta=host_meta,
                **options,
            )
            keep[sample].index_fill_(0, candidates[result.local_keep], True)
            kept.append(int(result.local_keep.numel()))
            host_budgets = result.host_budgets if result.host_budgets is not None else result.budgets.cpu()
            if kept[-1] != int(host_budgets.sum()):
                # The schedule below relies on it; a shape is known on the host, so checking costs no sync.
                raise AdapterError(
                    f"selector {stage.selector!r} kept {kept[-1]} tokens of sample {sample} at stage {stage_index + 1} "
                    f"(layer {stage.layer}), but its budgets sum to {int(host_budgets.sum())}: a selector must keep "
                    "exactly min(budgets[g], n_g) tokens of each segment g"
                )
            budgets.append(tuple(_to_list(host_budgets)))
            # A selector keeps exactly its (clamped) budgets: the next stage's counts follow on the host.
            counts.segment_tokens = host_budgets.to(torch.int64) if stage.per_segment else torch.tensor([kept[-1]])
        if drop_newlines:
            for counts in schedule:
                counts.newlines = 0
        # Kept rows, kept video tokens (content and, unless dropped, newlines) known on the host by count.
        rows = [base + k for base, k in zip(n_base, kept)]
        after = [
            k + (0 if drop_newlines else video_count - content_count)
            for k, video_count, content_count in zip(kept, before, n_content)
        ]
        selection, valid = _pack(keep, kind, rows, stage.query_rows)
        kept_video = keep & (kind != TEXT)
        video_orig = coords.orig.gather(1, _compact(kept_video, kept_video.cumsum(1), max(after)))
        kept_positions = [video_orig[sample, : after[sample]] for sample in range(batch)]
        if coords.counts is None:
            coords.counts = tuple(before)
        kind_all = torch.where(valid, coords.kind.gather(1, selection), PAD)
        seg_all = torch.where(valid, coords.seg.gather(1, selection), -1)
        new_coords = Coords(
            src=selection,
            idx0=coords.idx0.gather(1, selection),
            orig=coords.orig.gather(1, selection),
            valid=coords.valid.gather(1, selection) & valid,
            kind=kind_all,
            seg=seg_all,
            counts=tuple(after),
            all_valid=min(rows) == max(rows),
        )
        stats = StageStats(
            layer=stage.layer,
            prune_point=stage.prune_point,
            video_tokens_before=tuple(before),
            video_tokens_after=tuple(after),
            budgets=tuple(budgets),
            kept_positions=tuple(kept_positions),
            sequence_length=int(selection.shape[1]),
        )
        return selection, new_coords, stats

    def _mlp_pre_hook(self, layer: int, module: nn.Module, args: tuple) -> tuple | None:
        pending = self.request.pending if self.request is not None else None
        if pending is None or pending["layer"] != layer:
            return None
        return (_gather_rows(args[0], pending["selection"]), *args[1:])

    def _mlp_hook(self, layer: int, module: nn.Module, args: tuple, output: Tensor) -> Tensor | None:
        pending = self.request.pending if self.request is not None else None
        if pending is None or pending["layer"] != layer:
            return None
        batch, _, width = output.shape
        length = pending["length"]
        # Padding slots write into a dummy row so that each real row is written exactly once.
        target = torch.where(pending["valid"], pending["selection"], torch.full_like(pending["selection"], length))
        full = output.new_zeros(batch, length + 1, width)
        full.scatter_(1, target.unsqueeze(-1).expand(-1, -1, width), output)
        return full[:, :length]

    def _layer_hook(self, stage_index: int, module: nn.Module, args: tuple, output: Any) -> Any:
        request = self.request
        if request is None or request.pending is None or request.pending["layer"] != self.stages[stage_index].layer:
            return None
        pending, request.pending = request.pending, None
        if isinstance(output, tuple):
            return (_gather_rows(output[0], pending["selection"]), *output[1:])
        return _gather_rows(output, pending["selection"])

    # ================================================================== statistics
    def _finish_stats(self, request: Request) -> RequestStats:
        stats = request.stats
        counts = [coords.video_counts() for coords in request.coords]
        layer_tokens: list[tuple[int, ...]] = []
        layer_lengths: list[int] = []
        for index in range(len(self.layers)):
            system = min(self.stage_of[index], len(request.coords) - 1)
            layer_tokens.append(counts[system])
            layer_lengths.append(request.coords[system].length)
        positions = tuple(
            torch.where(coords.valid, coords.orig, torch.full_like(coords.orig, -1)) for coords in request.coords
        )
        return RequestStats(
            pruned=True,
            reason="pruned",
            batch_size=request.batch,
            prompt_length=request.original_length,
            videos=tuple(stats["videos"]),
            num_segments=tuple(stats["num_segments"]),
            frame_segment_ids=tuple(stats["frame_segment_ids"]),
            marginal_values=tuple(stats["marginal_values"]),
            input_kept_positions=tuple(stats["input_kept_positions"]),
            stages=tuple(stats["stages"]),
            layer_video_tokens=tuple(layer_tokens),
            layer_sequence_lengths=tuple(layer_lengths),
            output_positions=positions[-1],
            stage_positions=positions,
            layouts=tuple(stats["layouts"]),
        )
