"""The hook objects the engine installs, one class per site. Each is small and reads the engine's typed state.

Sites: the multimodal module (records the call, so the video can be found), the language model (starts and
ends requests), decoder layers after the first stage (swap in their coordinate system's mask and RoPE), and,
at each stage layer, the query/key projections (captured), the post-attention norm (runs the stage), the MLP
(``after_attention``: runs on the kept rows) and the layer's output (cut to the kept rows).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from hieravid.compat import cache_from_kwargs
from hieravid.errors import AdapterError
from hieravid.ops.relevance import last_query_attention
from hieravid.runtime.masks import row_lengths
from hieravid.runtime.packing import gather_rows
from hieravid.runtime.stages import select_stage
from hieravid.runtime.state import PendingCut, Request, StageCapture

if TYPE_CHECKING:
    from hieravid.runtime.engine import Pruner

__all__ = [
    "LanguageModelPostHook",
    "LanguageModelPreHook",
    "LayerInputHook",
    "LayerOutputCut",
    "MlpInputCut",
    "MlpOutputScatter",
    "MultimodalPostHook",
    "MultimodalPreHook",
    "ProjectionHook",
    "SelectionHook",
]


class _Hook:
    def __init__(self, pruner: Pruner) -> None:
        self.pruner = pruner

    def prefill_request(self) -> Request | None:
        """The prefill running in this thread (stage work happens only there; decode steps return at once)."""
        if not self.pruner.prefills_in_flight:
            return None
        return self.pruner.active_request()


# ---------------------------------------------------------------------------------------------- multimodal
class MultimodalPreHook(_Hook):
    """Records a new prompt's call (input ids, video placeholders, pixel inputs), so the video can be located;
    lets the adapter give a continuation of a pruned cache the positions the model would derive wrongly."""

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple | None:
        from hieravid.adapters.base import MultimodalCall

        pruner = self.pruner
        changed = bool(args)
        kwargs = pruner.multimodal_binder(args, kwargs)
        input_ids, inputs_embeds = kwargs.get("input_ids"), kwargs.get("inputs_embeds")
        cache = cache_from_kwargs(kwargs)
        request = pruner.request_of_cache(cache)
        reference = inputs_embeds if inputs_embeds is not None else input_ids
        if request is not None and reference is not None:
            if pruner.release_emptied_static_cache(request, cache, int(reference.shape[1])):
                request = None  # a reused static cache: this call is a new prompt
        if request is not None and request.pruned:
            if reference is not None and kwargs.get("position_ids") is None:
                before = kwargs.get("attention_mask"), kwargs.get("position_ids")
                pruner.adapter.prepare_continuation_call(
                    kwargs,
                    total_length=request.total_length(cache),
                    new_length=int(reference.shape[1]),
                    batch=int(reference.shape[0]),
                    device=reference.device,
                )
                changed = changed or any(
                    a is not b for a, b in zip((kwargs.get("attention_mask"), kwargs.get("position_ids")), before)
                )
        else:
            pruner.local.call = MultimodalCall(
                input_ids=input_ids, video_mask=pruner.adapter.video_mask(input_ids, inputs_embeds), kwargs=kwargs
            )
        return ((), kwargs) if changed else None


class MultimodalPostHook(_Hook):
    """Forgets the recorded call once the multimodal module returns (or raises)."""

    def __call__(self, module: nn.Module, args: tuple, output: Any) -> None:
        if getattr(self.pruner.local, "call", None) is not None:
            self.pruner.local.call = None


# ---------------------------------------------------------------------------------------------- language model
class LanguageModelPreHook(_Hook):
    """Starts a pruned prefill, continues a pruned cache, or lets the call run unpruned."""

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple | None:
        pruner = self.pruner
        changed = bool(args)
        kwargs = pruner.language_binder(args, kwargs)
        reference = kwargs.get("inputs_embeds")
        if reference is None:
            reference = kwargs.get("input_ids")
        if reference is None:
            return ((), kwargs) if changed else None
        cache = cache_from_kwargs(kwargs)
        request = pruner.request_of_cache(cache)
        if request is not None and pruner.release_emptied_static_cache(request, cache, int(reference.shape[1])):
            request = None  # a reused static cache: this call is a new prompt's prefill
        if request is not None:
            if request.pruned:
                pruner.start_continuation(request, kwargs, reference, cache)
                return ((), kwargs)
            return ((), kwargs) if changed else None
        past_length = int(cache.get_seq_length()) if cache is not None else 0
        if past_length == 0:
            pruner.start_prefill(kwargs, reference, cache)
            return ((), kwargs)
        # A cache this handle did not fill: run unpruned, but refuse caches pruned by another request.
        if len(set(row_lengths(cache).values())) > 1:
            raise AdapterError(
                "the cache holds layers of different lengths (a pruned prompt) that this handle did not produce; "
                "continue a pruned request with the cache object its prefill returned"
            )
        return ((), kwargs) if changed else None


class LanguageModelPostHook(_Hook):
    """Ends this thread's prefill: statistics, static-cache slot records, state cleared (also on failure)."""

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> None:
        if self.pruner.prefills_in_flight:
            self.pruner.end_call(output)


# ---------------------------------------------------------------------------------------------- decoder layers
class LayerInputHook(_Hook):
    """Gives one decoder layer its coordinate system's mask and RoPE, and opens a stage layer's capture."""

    def __init__(self, pruner: Pruner, index: int) -> None:
        super().__init__(pruner)
        self.index = index
        self.system = pruner.stage_of[index]
        self.stage = next((i for i, stage in enumerate(pruner.stages) if stage.layer == index), None)

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple | None:
        pruner = self.pruner
        request = pruner.request_for_call(kwargs)
        if request is None or not request.pruned or request.phase == "idle":
            return None
        hidden = args[0] if args else kwargs["hidden_states"]
        request.follow(hidden.device)
        recurrent = self.index in pruner.recurrent_layers
        if request.phase == "continuation":  # never pruned: only the mask of this layer's system
            if self.system == 0:
                return None
            if recurrent:
                kwargs["attention_mask"] = pruner.recurrent_mask(request, self.system, hidden)
            else:
                kwargs["attention_mask"] = pruner.stage_mask(request, self.system, hidden, kwargs)
            return args, kwargs
        if self.system > 0 and recurrent:  # no RoPE, and its mask is not the one attention layers share
            kwargs["attention_mask"] = pruner.recurrent_mask(request, self.system, hidden)
        elif self.system > 0:
            inputs = pruner.stage_inputs(request, self.system, hidden, kwargs)
            kwargs["attention_mask"] = inputs.mask
            kwargs["position_embeddings"] = inputs.position_embeddings
        if self.system > 0 or pruner.plan.segment.enabled:
            kwargs["position_ids"] = None
        if self.stage is not None:
            request.capture = StageCapture(self.stage, self.index, kwargs["position_embeddings"])
        return args, kwargs


class ProjectionHook(_Hook):
    """Keeps a stage layer's query (last rows only) or key projection output for the relevance score."""

    def __init__(self, pruner: Pruner, layer: int, name: str) -> None:
        super().__init__(pruner)
        self.layer = layer
        self.name = name

    def __call__(self, module: nn.Module, args: tuple, output: Tensor) -> None:
        request = self.prefill_request()
        capture = request.capture if request is not None else None
        if capture is None or capture.layer != self.layer:
            return
        if self.name == "query":
            # Only the last query rows are needed: do not keep the whole query projection alive.
            capture.query = output[:, -self.pruner.stages[capture.stage].query_rows :]
        else:
            capture.key = output


class SelectionHook(_Hook):
    """Runs a stage on the post-attention residual stream (the input of ``post_attention_layernorm``)."""

    def __init__(self, pruner: Pruner, stage_index: int) -> None:
        super().__init__(pruner)
        self.stage_index = stage_index

    def __call__(self, module: nn.Module, args: tuple) -> None:
        request = self.prefill_request()
        if request is None or request.capture is None or request.capture.stage != self.stage_index:
            return
        capture, request.capture = request.capture, None
        pruner = self.pruner
        stage = pruner.stages[self.stage_index]
        layer = pruner.layers[stage.layer]
        with torch.profiler.record_function(f"hieravid/stage_{self.stage_index + 1}"):
            assert capture.query is not None and capture.key is not None
            device = args[0].device  # this layer's device, where a model split over devices runs it
            request.follow(device)
            cos, sin = (table.to(device) for table in capture.position_embeddings)
            query, key = pruner.adapter.stage_query_key(layer, capture.query, capture.key, (cos, sin), stage.query_rows)
            attention = last_query_attention(
                query,
                key,
                scaling=pruner.adapter.attention_scaling(layer),
                key_padding_mask=request.translate_mask(self.stage_index),
            )
            length = request.coords[-1].length
            selection, coords, stats = select_stage(
                request, self.stage_index, stage, args[0], attention, keep_newlines=pruner.plan.keep_newlines
            )
        request.coords.append(coords)
        # Kept rows are never padding slots, so the new system is all valid iff it has no padding slot.
        request.stage_all_valid.append(request.prompt_unmasked and coords.all_valid)
        request.stages.append(stats)
        request.pending = PendingCut(stage.layer, selection, coords.valid, length)


class MlpInputCut(_Hook):
    """``after_attention``: the stage layer's MLP runs on the kept rows only."""

    def __init__(self, pruner: Pruner, layer: int) -> None:
        super().__init__(pruner)
        self.layer = layer

    def __call__(self, module: nn.Module, args: tuple) -> tuple | None:
        request = self.prefill_request()
        pending = request.pending if request is not None else None
        if pending is None or pending.layer != self.layer:
            return None
        return (gather_rows(args[0], pending.selection), *args[1:])


class MlpOutputScatter(_Hook):
    """``after_attention``: the MLP's output on the kept rows goes back to full length (zeros elsewhere), so the
    layer's residual add stays the model's own; the layer's output is then cut (:class:`LayerOutputCut`)."""

    def __init__(self, pruner: Pruner, layer: int) -> None:
        super().__init__(pruner)
        self.layer = layer

    def __call__(self, module: nn.Module, args: tuple, output: Tensor) -> Tensor | None:
        request = self.prefill_request()
        pending = request.pending if request is not None else None
        if pending is None or pending.layer != self.layer:
            return None
        batch, _, width = output.shape
        # Padding slots write into a dummy row so that each real row is written exactly once.
        target = torch.where(pending.valid, pending.selection, torch.full_like(pending.selection, pending.length))
        full = output.new_zeros(batch, pending.length + 1, width)
        full.scatter_(1, target.unsqueeze(-1).expand(-1, -1, width), output)
        return full[:, : pending.length]


class LayerOutputCut(_Hook):
    """Cuts a stage layer's output to the rows the stage kept."""

    def __init__(self, pruner: Pruner, stage_index: int) -> None:
        super().__init__(pruner)
        self.layer = pruner.stages[stage_index].layer

    def __call__(self, module: nn.Module, args: tuple, output: Any) -> Any:
        request = self.prefill_request()
        if request is None or request.pending is None or request.pending.layer != self.layer:
            return None
        pending, request.pending = request.pending, None
        if isinstance(output, tuple):
            return (gather_rows(output[0], pending.selection), *output[1:])
        return gather_rows(output, pending.selection)
