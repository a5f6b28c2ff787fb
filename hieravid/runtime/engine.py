"""The pruning engine: runs a :class:`~hieravid.plan.PruningPlan` inside a model through instance-local hooks.

Coordinates. The multimodal module builds the *original* sequence (``S`` rows). The input level (a forward
pre-hook on the language model, :mod:`hieravid.runtime.prefill`) gathers the rows entering layer 0: text,
newlines and the kept (merged) video tokens, with their original position ids — *stage-0 coordinates*. Each
frame-level stage at layer ``l`` selects rows of the current coordinates (:mod:`hieravid.runtime.stages`);
layers after ``l`` run in the new coordinates: a forward pre-hook on each of them swaps in that system's mask
(:mod:`hieravid.runtime.masks`), the gathered RoPE ``(cos, sin)`` and neutral ``position_ids=None`` (gaps in
position ids would look like packed sequences to flash attention). Each layer's KV cache therefore holds exactly
the rows that layer saw.

Batches. Samples are pruned on their own content; a coordinate system has the length of its longest sample and
shorter samples hold padding slots (copies of a real row, masked) inserted after their last video row (before all
their rows when the model has recurrent layers, where only leading masked rows are neutral).

Stage layer (prefill only). Forward hooks on the query/key projections keep their outputs; a forward pre-hook on
``post_attention_layernorm`` (whose input is the post-attention residual stream) computes the last-query
relevance and runs the stage. With ``after_attention`` the MLP runs on the kept rows only (a pre-hook gathers its
input, a forward hook scatters its output back with zeros) and a forward hook on the layer gathers its output;
with ``after_mlp`` only the layer's output is gathered. No layer ever runs twice.

State. A prefill's :class:`~hieravid.runtime.state.Request` lives in the calling thread while the language model
runs (two threads can prefill on one hooked model), and on the KV cache it fills (an attribute of that cache
instance), so every call that continues a cache reads the state of *that* cache. Continuation calls read no host
value that changes from step to step, so ``torch.compile`` can run decode steps without recompiling.

Host syncs. A prefill reads the device only before layer 0 (locating the video; one read of the padding and the
per-segment counts and marginal values). Decode and continuation calls are never pruned.
"""

from __future__ import annotations

import threading
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from hieravid.compat import cache_from_kwargs, cache_from_output, causal_mask
from hieravid.errors import AdapterError
from hieravid.runtime import hooks
from hieravid.runtime.calls import KeywordBinder
from hieravid.runtime.masks import (
    input_mask_2d,
    is_static_cache,
    most_rows,
    regrow_static_cache,
    shrink_static_cache,
    static_mask,
    static_slots,
    with_mask,
)
from hieravid.runtime.packing import gather_rows
from hieravid.runtime.prefill import prune_inputs
from hieravid.runtime.state import Request, RequestStats, StageInputs

if TYPE_CHECKING:
    from hieravid.adapters.base import Adapter, MultimodalCall
    from hieravid.ops import GraphCache
    from hieravid.plan import PruningPlan

__all__ = ["REQUEST_ATTRIBUTE", "HookSite", "Pruner"]

#: Attribute of a KV cache instance that holds the request which filled it.
REQUEST_ATTRIBUTE = "_hieravid_request"


@dataclass(frozen=True)
class HookSite:
    """One hook to install: ``module.register_forward_pre_hook`` or ``register_forward_hook`` with ``options``."""

    module: nn.Module
    kind: str
    hook: Any
    options: tuple[tuple[str, Any], ...] = ()


class Pruner:
    """Owns the hooks and per-request state of one :class:`~hieravid.runtime.PruningHandle`.

    Args:
        graphs: CUDA graphs of the input level, owned by the handle (None: eager).
    """

    def __init__(
        self,
        model: nn.Module,
        adapter: Adapter,
        plan: PruningPlan,
        *,
        graphs: GraphCache | None,
        handle: Any = None,
        static_capacity: str = "observed",
    ) -> None:
        self.model = model
        #: How right-sized static cache layers choose their capacity (``masks.STATIC_CAPACITIES``).
        self.static_capacity = static_capacity
        self.handle = handle
        self.adapter = adapter
        self.plan = plan
        self.graphs = graphs
        self.multimodal = adapter.multimodal_module()
        self.language_model = adapter.language_model()
        self.layers = list(adapter.decoder_layers())
        self.stages = plan.stages
        stage_layers = [stage.layer for stage in plan.stages]
        #: Coordinate system each layer's attention runs in (number of stages before the layer).
        self.stage_of = [sum(1 for layer in stage_layers if layer < i) for i in range(len(self.layers))]
        #: First decoder layer of each coordinate system.
        self.first_layers = [0] + [layer + 1 for layer in stage_layers]
        #: Layers fed a 2-D padding mask instead of a causal one (linear attention), see Adapter.recurrent_layers.
        self.recurrent_layers = adapter.recurrent_layers()
        #: Their layer types: the keys of their entries in a mapping of prepared masks.
        layer_types = getattr(adapter.text_config(), "layer_types", None) or ()
        self.recurrent_mask_keys = frozenset(layer_types[i] for i in self.recurrent_layers if i < len(layer_types))
        #: Whether the language model takes a mapping of prepared masks, one per layer type (transformers' Qwen2
        #: family marks itself with ``has_sliding_layers``; a decoder with recurrent layers picks each layer's mask
        #: by its type) rather than one mask tensor (Llama-style decoders).
        self.takes_mask_mapping = hasattr(self.language_model, "has_sliding_layers") or bool(self.recurrent_mask_keys)
        #: The layer each system's causal mask is sized for: its first attention layer (None: it has none).
        ends = [*self.first_layers[1:], len(self.layers)]
        self.mask_layers = [
            next((i for i in range(first, end) if i not in self.recurrent_layers), None)
            for first, end in zip(self.first_layers, ends)
        ]
        self.multimodal_binder = KeywordBinder(self.multimodal.forward)
        self.language_binder = KeywordBinder(self.language_model.forward)
        self.local = threading.local()
        #: Prefills running in any thread: stage hooks return at once when there is none (decode steps).
        self.prefills_in_flight = 0
        self.last_stats: RequestStats | None = None
        self.warned_no_video = False
        #: Slots of each right-sized static cache system, by (system, batch, prompt length, full capacity); only
        #: grows, so that requests of one shape settle on one compiled decode step.
        self.static_capacities: dict[tuple[int, ...], int] = {}

    # ================================================================== installation
    def sites(self) -> list[HookSite]:
        """Every hook the plan needs, and nothing else (a plan that prunes nothing needs none)."""
        if not self.plan.prunes:
            return []
        sites = [
            HookSite(self.multimodal, "forward_pre", hooks.MultimodalPreHook(self), (("with_kwargs", True),)),
            HookSite(self.multimodal, "forward", hooks.MultimodalPostHook(self), (("always_call", True),)),
            HookSite(self.language_model, "forward_pre", hooks.LanguageModelPreHook(self), (("with_kwargs", True),)),
            HookSite(
                self.language_model,
                "forward",
                hooks.LanguageModelPostHook(self),
                (("with_kwargs", True), ("always_call", True)),
            ),
        ]
        # Layers of stage 0 need nothing, unless flash attention would read packed sequences from position gaps.
        flash = "flash" in str(getattr(self.adapter.text_config(), "_attn_implementation", ""))
        stage_layers = {stage.layer for stage in self.stages}
        for index, layer in enumerate(self.layers):
            if self.stage_of[index] > 0 or index in stage_layers or (flash and self.plan.segment.enabled):
                sites.append(
                    HookSite(layer, "forward_pre", hooks.LayerInputHook(self, index), (("with_kwargs", True),))
                )
        for stage_index, stage in enumerate(self.stages):
            layer = self.layers[stage.layer]
            q_proj, k_proj = self.adapter.query_key_projections(layer)
            sites.append(HookSite(q_proj, "forward", hooks.ProjectionHook(self, stage.layer, "query")))
            sites.append(HookSite(k_proj, "forward", hooks.ProjectionHook(self, stage.layer, "key")))
            sites.append(
                HookSite(self.adapter.post_attention_norm(layer), "forward_pre", hooks.SelectionHook(self, stage_index))
            )
            if stage.prune_point == "after_attention":
                mlp = self.adapter.mlp(layer)
                sites.append(HookSite(mlp, "forward_pre", hooks.MlpInputCut(self, stage.layer)))
                sites.append(HookSite(mlp, "forward", hooks.MlpOutputScatter(self, stage.layer)))
            sites.append(HookSite(layer, "forward", hooks.LayerOutputCut(self, stage_index)))
        return sites

    def new_cache(self) -> Any:
        """The dynamic cache the language model creates when called without one (None when its config does not
        cache)."""
        from transformers import DynamicCache

        config = self.adapter.text_config()
        return DynamicCache(config=config) if getattr(config, "use_cache", True) else None

    def reset(self) -> None:
        """Forget every in-flight call and request of this thread (after a removal or a failure)."""
        self.local.__dict__.clear()
        self.prefills_in_flight = 0

    # ================================================================== requests
    def active_request(self) -> Request | None:
        """The request of the prefill running in this thread, if any."""
        return getattr(self.local, "request", None)

    def request_of_cache(self, cache: Any) -> Request | None:
        """The request that filled ``cache`` through this engine, if any."""
        request = getattr(cache, REQUEST_ATTRIBUTE, None) if cache is not None else None
        if request is not None and request.owner is self:
            return request
        return None

    def request_for_call(self, kwargs: dict[str, Any]) -> Request | None:
        """The request a layer call belongs to: its cache's, else the prefill running in this thread."""
        request = self.request_of_cache(cache_from_kwargs(kwargs))
        return request if request is not None else self.active_request()

    def release_emptied_static_cache(self, request: Request, cache: Any, new_length: int) -> bool:
        """Whether ``cache``, a static cache ``request`` filled, was emptied since (``cache.reset()``) and now takes a
        new prompt; if so its layers get their full size back and ``request`` lets go of it (the call is a new
        prefill, not a continuation). Checked in eager calls of several tokens only (one host read): a decode step
        is neither."""
        if request.static is None or new_length < 2 or torch.compiler.is_compiling():
            return False
        if int(cache.get_seq_length()) != 0:
            return False
        if request.static.full_capacity is not None:
            regrow_static_cache(cache, request.static.full_capacity)
        delattr(cache, REQUEST_ATTRIBUTE)
        return True

    def take_call(self) -> MultimodalCall | None:
        call = getattr(self.local, "call", None)
        if call is not None:
            self.local.call = None
        return call

    # ================================================================== new prefill
    def start_prefill(self, kwargs: dict[str, Any], reference: torch.Tensor, cache: Any) -> None:
        """A prefill on an empty cache (or none): locate the video and prune the language model's inputs."""
        call = self.take_call()
        batch, length = int(reference.shape[0]), int(reference.shape[1])
        request = Request(
            batch=batch, original_length=length, phase="prefill", padding_slots_first=bool(self.recurrent_layers)
        )
        request.owner = self
        self.local.request = request
        self.prefills_in_flight += 1
        if cache is not None:
            previous = getattr(cache, REQUEST_ATTRIBUTE, None)
            if previous is not None and previous.static is not None and previous.static.full_capacity is not None:
                regrow_static_cache(cache, previous.static.full_capacity)  # a reused cache a pruned prefill resized
            setattr(cache, REQUEST_ATTRIBUTE, request)
        inputs_embeds = kwargs.get("inputs_embeds")
        layouts = [None] * batch
        if call is not None and inputs_embeds is not None:
            layouts = self.adapter.locate_videos(call, inputs_embeds)
        if all(layout is None for layout in layouts):
            if not self.warned_no_video:
                self.warned_no_video = True
                warnings.warn(
                    "hieravid: this prompt holds no video tokens; it runs unpruned (warned once per handle)",
                    UserWarning,
                    stacklevel=4,
                )
            self.last_stats = RequestStats(pruned=False, reason="no video", batch_size=batch, prompt_length=length)
            return
        assert inputs_embeds is not None
        self.check_query_rows(layouts, length)
        original_mask = kwargs.get("attention_mask")
        mask2d = input_mask_2d(original_mask, length)
        # Named profiler ranges let `hieravid bench` attribute pruning overhead per level (free when idle).
        with torch.profiler.record_function("hieravid/segment_level"):
            prune_inputs(request, self.plan, self.adapter, kwargs, inputs_embeds, mask2d, layouts, graphs=self.graphs)
        if self.plan.segment.enabled:
            caches = cache is not None or (
                kwargs.get("use_cache") is not False and getattr(self.adapter.text_config(), "use_cache", True)
            )
            if request.stage_all_valid[0] and caches:
                # No padding anywhere: no mask, as the model had none (building one from an all-ones mask syncs).
                mask = None
            else:
                # Without a cache, transformers reads gaps in the position ids as packed sequences unless a mask
                # is given: the mask (all ones without padding) keeps the prompt one sequence.
                mask = request.translate_mask(0)
                if isinstance(original_mask, torch.Tensor) and original_mask.dim() == 2:
                    mask = mask.to(original_mask.dtype)
            # A prepared mapping or 4-D mask is replaced too: the language model builds its masks from this one.
            kwargs["attention_mask"] = mask

    def check_query_rows(self, layouts: list[Any], length: int) -> None:
        """The relevance queries are the last prompt rows: a prompt must have that many rows after its video."""
        rows = max((stage.query_rows for stage in self.stages), default=0)
        for sample, layout in enumerate(layouts):
            if layout is None:
                continue
            after = length - layout.span[1]
            if rows > after:
                raise AdapterError(
                    f"sample {sample}: the plan averages the attention of the last {rows} prompt rows "
                    f"(relevance.query_rows), but only {after} rows follow the video; lower relevance.query_rows or "
                    "put the question after the video"
                )

    def finish_prefill(self, request: Request, cache: Any) -> None:
        """After a pruned prefill: statistics, and for a static cache its right-sized layers and the slot records its
        decode steps need."""
        if cache is not None and getattr(cache, REQUEST_ATTRIBUTE, None) is not request:
            setattr(cache, REQUEST_ATTRIBUTE, request)  # a cache the language model created itself
        if cache is not None and is_static_cache(cache):
            most = most_rows(request, self.stages) if self.static_capacity == "bound" else None
            full = shrink_static_cache(
                request, cache, self.stage_of, self.static_capacities, self.recurrent_layers, most=most
            )
            request.static = static_slots(request, cache, self.mask_layers[: len(request.coords)], full_capacity=full)
        self.last_stats = _request_stats(request, len(self.layers), self.stage_of)

    # ================================================================== continuation
    def start_continuation(self, request: Request, kwargs: dict[str, Any], reference: torch.Tensor, cache: Any) -> None:
        """A call that continues a pruned cache (decode step or later turn): never pruned; its mask in stage-0
        coordinates. Reads no host value that changes between decode steps."""
        request.phase = "continuation"
        request.stage_inputs.clear()
        batch, new_length = reference.shape[0], reference.shape[1]
        if batch != request.batch:
            raise AdapterError(f"a continuation of a pruned batch of {request.batch} got {batch} samples")
        request.follow(reference.device)  # the prefill may have left it on the last stage's device
        mask = kwargs.get("attention_mask")
        if request.static is not None:
            static = static_mask(request.static, 0, cache, new_length, mask)
            # A recurrent layer's entry only covers the new rows (None for one token): it stays as transformers made it.
            kwargs["attention_mask"] = with_mask(mask, static, keep=self.recurrent_mask_keys)
            return
        if isinstance(mask, dict) or (isinstance(mask, torch.Tensor) and mask.dim() != 2):
            raise NotImplementedError(
                "hieravid needs a 2-D attention mask (or none) when decoding a pruned dynamic cache; prepared 4-D "
                "masks are supported with static caches only"
            )
        if mask is None:
            if not torch.compiler.is_compiling() and new_length > 1:  # a new turn: check where it continues
                self.check_continuation_positions(request, kwargs.get("position_ids"), cache)
            if all(request.stage_all_valid):
                request.mask2d = None  # nothing is padded: every system's mask is the model's own (None)
                return
            mask2d = torch.ones(batch, request.total_length(cache) + new_length, dtype=torch.bool)
            mask2d = mask2d.to(reference.device)
        else:
            if not torch.compiler.is_compiling():
                expected = request.total_length(cache) + new_length
                if mask.shape[1] != expected:
                    raise AdapterError(
                        f"attention_mask covers {mask.shape[1]} positions, but the pruned request has seen "
                        f"{request.total_length(cache)} original positions and this call adds {new_length} (expected "
                        f"{expected}); pass the mask in original coordinates, as generate() does"
                    )
            mask2d = mask.bool()
        request.mask2d = mask2d
        if kwargs.get("position_ids") is None:
            kwargs["position_ids"] = self.adapter.default_position_ids(reference, request.total_length(cache))
        mask_dtype = mask.dtype if isinstance(mask, torch.Tensor) else torch.long
        kwargs["attention_mask"] = request.translate_mask(0).to(mask_dtype)

    def check_continuation_positions(self, request: Request, position_ids: Any, cache: Any) -> None:
        """Without a 2-D mask (no padding), the caller's positions must continue at the original length.

        ``generate`` drops an all-ones mask (transformers >= 5.24), so the mask-length check cannot catch a
        continuation sliced with the pruned cache length (full history passed as ``input_ids``); its positions
        then start at that length instead.
        """
        text = self.adapter.text_positions(position_ids)
        if text is None:
            return
        total = request.total_length(cache)
        first = [int(value) for value in text[..., 0].flatten().tolist()]
        if any(value != total for value in first):
            raise AdapterError(
                f"position_ids continue from {min(first)}, but the pruned request has seen {total} original "
                "positions; pass only the new tokens with the attention mask in original coordinates, as generate() "
                "does"
            )

    # ================================================================== per-layer inputs
    def stage_mask(self, request: Request, stage: int, hidden: torch.Tensor, kwargs: dict[str, Any]) -> Any:
        """The attention mask of coordinate system ``stage`` for this call (built once per call)."""
        cached = request.stage_inputs.get(stage)
        if cached is not None:
            return cached.mask
        cache = cache_from_kwargs(kwargs)
        given = kwargs.get("attention_mask")
        if request.static is not None and request.phase == "continuation":
            mask = static_mask(request.static, stage, cache, hidden.shape[1], given)
        elif self.mask_layers[stage] is None:
            mask = None  # only recurrent layers run in this system: they take the 2-D mask (recurrent_mask)
        elif given is None and request.stage_all_valid[stage]:
            # The language model's own (stage-0) mask is None: SDPA/flash rely on is_causal because no key is
            # masked. This system differs only in which prompt rows it holds, all real and unmasked, so its mask
            # is None too — decided without building it (mask creation syncs with the device).
            mask = None
        else:
            mask = causal_mask(
                self.adapter.text_config(),
                hidden,
                request.translate_mask(stage) if request.mask2d is not None else None,
                cache,
                layer_idx=self.mask_layers[stage],
            )
        request.stage_inputs[stage] = StageInputs(mask)
        return mask

    def recurrent_mask(self, request: Request, stage: int, hidden: torch.Tensor) -> torch.Tensor | None:
        """The 2-D mask a recurrent layer of system ``stage`` takes for this call's rows, as transformers'
        ``create_recurrent_attention_mask`` gives it: None for one new token or when no row is masked, else the
        system's 2-D mask cut to the call's rows (decided on the host: no sync)."""
        length = int(hidden.shape[1])
        if length == 1 or request.mask2d is None or request.stage_all_valid[stage]:
            return None
        return request.translate_mask(stage)[:, -length:]

    def stage_inputs(self, request: Request, stage: int, hidden: torch.Tensor, kwargs: dict[str, Any]) -> StageInputs:
        """Mask and gathered RoPE of coordinate system ``stage`` during its prefill (built once per call)."""
        cached = request.stage_inputs.get(stage)
        if cached is not None and cached.position_embeddings is not None:
            return cached
        mask = self.stage_mask(request, stage, hidden, kwargs)
        index0 = request.coords[stage].idx0
        cos, sin = (table.to(index0.device) for table in kwargs["position_embeddings"])  # made on the first device
        inputs = StageInputs(mask, (gather_rows(cos, index0), gather_rows(sin, index0)))
        request.stage_inputs[stage] = inputs
        return inputs

    # ================================================================== call end
    def end_call(self, output: Any) -> None:
        """After the language model's forward in this thread (also when it raised: ``output`` is None)."""
        request = self.active_request()
        if request is None:
            return
        self.local.request = None
        self.prefills_in_flight = max(0, self.prefills_in_flight - 1)
        phase, request.phase = request.phase, "idle"
        request.reset_call()
        if output is None or phase != "prefill" or not request.pruned:
            return
        self.finish_prefill(request, cache_from_output(output))


def _request_stats(request: Request, num_layers: int, stage_of: list[int]) -> RequestStats:
    """The public statistics of a finished pruned prefill."""
    layer_tokens: list[tuple[int, ...]] = []
    layer_lengths: list[int] = []
    for index in range(num_layers):
        system = min(stage_of[index], len(request.coords) - 1)
        layer_tokens.append(request.coords[system].counts)
        layer_lengths.append(request.coords[system].length)
    positions = tuple(
        torch.where(coords.valid, coords.orig, torch.full_like(coords.orig, -1)) for coords in request.coords
    )
    samples = request.samples
    return RequestStats(
        pruned=True,
        reason="pruned",
        batch_size=request.batch,
        prompt_length=request.original_length,
        videos=tuple(sample.layout.describe() if sample else None for sample in samples),
        num_segments=tuple(sample.num_segments if sample else 0 for sample in samples),
        frame_segment_ids=tuple(sample.frame_segment_ids if sample else None for sample in samples),
        marginal_values=tuple(sample.marginal_values if sample else None for sample in samples),
        input_kept_positions=tuple(sample.input_kept_positions if sample else None for sample in samples),
        stages=tuple(request.stages),
        layer_video_tokens=tuple(layer_tokens),
        layer_sequence_lengths=tuple(layer_lengths),
        output_positions=positions[-1],
        stage_positions=positions,
        layouts=tuple(sample.layout if sample else None for sample in samples),
        merge_targets=tuple(sample.merge_target if sample else None for sample in samples),
        frame_redundancy=tuple(sample.redundancy if sample else None for sample in samples),
    )
