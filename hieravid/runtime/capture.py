"""CUDA graphs of whole pruned prefills: from the first decoder layer to the language model's output.

After the input level, every count, budget and block plan of a prefill is known on the host and already on the
device (:func:`hieravid.runtime.prefill.schedule_stages`), and nothing from layer 0 to the output reads or copies
anything to the device (``tests/runtime/test_sync_free.py``). So a prefill of one *schedule* — batch, rows entering
layer 0, and every stage's per-segment budgets — always runs the same kernels on the same shapes: it is captured
once and replayed for every later request of that schedule. That removes the host's launch time, which dominates
once pruning leaves few rows per layer (deep stages, small models).

How it is wired: the language model's ``forward`` is wrapped on the instance (a
:class:`~hieravid.adapters.base.Speedup` installed and removed by the handle); the language model's pre-hooks —
the input level — still run eagerly before it. A schedule seen for the second time is captured (the first run
warms every kernel up), with the request's device state copied into static buffers and a private KV cache; a
replay copies the new request's state into those buffers, replays, copies the KV rows into the caller's cache and
gives the request the stage records the graph computed. Replays are bit-identical to the eager pruned forward
(the same kernels on the same values).

Scope: CUDA, SDPA attention, a dynamic KV cache (``generate``'s default), no padding anywhere (batches of
equal-length prompts, e.g. batch 1), no random selector (its draw is made on the host), no requested attentions or
hidden states, an adapter whose language model never reads the device in its forward
(:meth:`~hieravid.adapters.base.Adapter.prefill_capturable`; transformers' Qwen3-VL deepstack step does), and a
schedule whose first, eager run gave every decoder layer no mask (the recording gives them none). Anything else runs
eagerly. A recurrent (linear-attention) layer's conv and recurrent states are handed over with the key and
value rows of the attention layers. At most ``size`` schedules are kept (least recently used dropped): each holds the
prefill's activations and KV cache in its private memory pool, about the eager prefill's peak activation memory
plus one KV cache, until the handle is removed.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from hieravid.compat import CACHE_KEYS, cache_argument, cache_from_kwargs
from hieravid.policy import RandomSelector
from hieravid.runtime.masks import row_lengths
from hieravid.runtime.state import COORD_TENSORS, Coords, Request, StageStats

if TYPE_CHECKING:
    from hieravid.adapters.base import Speedup
    from hieravid.runtime.engine import Pruner

__all__ = ["CudaGraph", "PrefillGraphs"]


def _device_state(request: Request) -> list[tuple[Any, Any]]:
    """``(holder, key)`` of every device tensor of the request that the layers read: stage-0 coordinates, marginal
    values, the 2-D mask, the uploaded budgets and selector plans."""
    items: list[tuple[Any, Any]] = [(request.coords[0], name) for name in COORD_TENSORS]
    items += [(request.marginal_values, index) for index in range(len(request.marginal_values))]
    items.append((request, "mask2d"))
    for row in request.budgets:
        for budgets in row:
            if budgets is not None:
                items.append((budgets, "device"))
                items += [(prepared, "device") for prepared in budgets.prepared.values()]
    return [(holder, key) for holder, key in items if isinstance(_get(holder, key), Tensor)]


def _cache_key(kwargs: dict[str, Any], language_model: Any) -> str:
    """The argument the language model reads its cache from in this call: the name that holds one, else the name
    present in the call (transformers >= 5.24 passes ``cache``), else the name its forward takes."""
    for name in CACHE_KEYS:
        if kwargs.get(name) is not None:
            return name
    for name in CACHE_KEYS:
        if name in kwargs:
            return name
    return next(iter(cache_argument(language_model, None)))


def _inputs(kwargs: dict[str, Any]) -> list[tuple[str, list[Tensor]]]:
    """The language model call's tensor arguments (a tensor, or a list of them such as Qwen3-VL's deepstack rows),
    by name in call order: a replay copies each into the recording's static buffers."""
    found = []
    for name, value in kwargs.items():
        if isinstance(value, Tensor):
            found.append((name, [value]))
        elif isinstance(value, (list, tuple)) and value and all(isinstance(item, Tensor) for item in value):
            found.append((name, list(value)))
    return found


def _get(holder: Any, key: Any) -> Any:
    return holder[key] if isinstance(key, int) else getattr(holder, key)


def _set(holder: Any, key: Any, value: Any) -> None:
    if isinstance(key, int):
        holder[key] = value
    else:
        setattr(holder, key, value)


def _clone_coords(coords: Coords) -> Coords:
    return replace(coords, **{name: getattr(coords, name).clone() for name in COORD_TENSORS})


def _clone_stats(stats: StageStats) -> StageStats:
    return replace(stats, kept_positions=tuple(tensor.clone() for tensor in stats.kept_positions))


#: What one layer of the private cache holds after a recorded prefill: an attention layer's key and value rows, or a
#: recurrent layer's conv and recurrent states by state index (transformers' ``LinearAttentionLayer``).
LayerState = tuple[Tensor, Tensor] | tuple[dict[int, Tensor], dict[int, Tensor]]


def _unmasked(module: Any, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
    """A recording's pre-hook on every decoder layer: the layer's mask is None, as in the eager unpadded prefill."""
    kwargs["attention_mask"] = None
    return args, kwargs


def _layer_state(layer: Any) -> LayerState:
    if hasattr(layer, "conv_states"):
        return (
            {index: state for index, state in layer.conv_states.items() if state is not None},
            {index: state for index, state in layer.recurrent_states.items() if state is not None},
        )
    return layer.keys, layer.values


def _hand_over(cache: Any, index: int, state: LayerState) -> None:
    """Give layer ``index`` of the caller's (empty) cache what the replay left in the private cache's layer, through
    the layer's own update methods (a recurrent layer's first conv update keeps the states it is given)."""
    first, second = state
    if isinstance(first, dict):
        assert isinstance(second, dict)
        layer = cache.layers[index]
        for state_index, conv in first.items():
            layer.update_conv_state(conv.clone(), state_index)
        for state_index, recurrent in second.items():
            layer.update_recurrent_state(recurrent.clone(), state_index)
    else:
        assert isinstance(second, Tensor)
        cache.update(first.clone(), second.clone(), index)


class CudaGraph:
    """Records ``fn`` into a CUDA graph (``record``) and replays it (``replay``): the outputs ``record`` returned are
    rewritten in place by every replay."""

    def __init__(self) -> None:
        self.graph = torch.cuda.CUDAGraph()

    def record(self, fn: Callable[[], Any]) -> Any:
        # Warm up on a side stream first (PyTorch's recipe): libraries set up per-stream state (e.g. cuBLAS
        # workspaces) on first use; set up during capture instead, they pick other kernels — slower ones, and not
        # bit-identical to the eager path.
        current = torch.cuda.current_stream()
        side = torch.cuda.Stream()
        side.wait_stream(current)
        with torch.cuda.stream(side):
            fn()
        current.wait_stream(side)
        torch.cuda.synchronize()
        with torch.cuda.graph(self.graph):
            return fn()

    def replay(self) -> None:
        self.graph.replay()


@dataclass
class _Captured:
    """One schedule's graph: static inputs and request state, and what the recorded prefill produced (rewritten
    by every replay): the language model's output, the private cache's layers, the stage records."""

    graph: Any
    inputs: dict[str, list[Tensor]]
    state: list[Tensor]
    output: Any
    cache_layers: list[LayerState]
    coords: list[Coords]
    stages: list[StageStats]
    stage_all_valid: list[bool]


class PrefillGraphs:
    """Captured pruned prefills of one engine's language model, by schedule (see the module docstring).

    Args:
        pruner: the engine whose requests are replayed.
        size: schedules kept (least recently used dropped).
    """

    def __init__(self, pruner: Pruner, size: int = 2, *, backend: Callable[[], Any] = CudaGraph) -> None:
        if size < 1:
            raise ValueError(f"size must be >= 1, got {size}")
        self.pruner = pruner
        self.size = size
        #: Makes the recorder of one schedule (:class:`CudaGraph`; tests use an eager stand-in on a CPU).
        self.backend = backend
        #: Device types whose prefills are captured.
        self.device_types = ("cuda",)
        self._graphs: OrderedDict[Hashable, _Captured] = OrderedDict()
        #: Schedules run once eagerly, with whether every decoder layer got no mask there (then they can be captured).
        self._seen: OrderedDict[Hashable, bool] = OrderedDict()
        self.replays = 0
        self.captures = 0

    def __len__(self) -> int:
        return len(self._graphs)

    def speedup(self) -> Speedup:
        """The wrap of the language model's ``forward`` that replays captured prefills (installed by the handle)."""
        from hieravid.adapters.base import Speedup

        language_model = self.pruner.language_model
        original = type(language_model).forward.__get__(language_model)

        def forward(*args: Any, **kwargs: Any) -> Any:
            if not args and cache_from_kwargs(kwargs) is None and kwargs.get("use_cache") is not False:
                # The cache the language model would create itself, made here so that a replay can fill it.
                cache = self.pruner.new_cache()
                if cache is not None:
                    kwargs[_cache_key(kwargs, language_model)] = cache
            key = None if args else self.key(self.pruner.active_request(), kwargs)
            if key is None:
                return original(*args, **kwargs)
            request = self.pruner.active_request()
            assert request is not None
            return self.run(key, request, kwargs, original)

        return Speedup(
            name="prefill-cuda-graphs",
            owner=language_model,
            attribute="forward",
            value=forward,
            exact=True,
            reason="pruned prefills of a repeated schedule replay from a CUDA graph (the same kernels on the same "
            "values; no host launch time from layer 0 on)",
        )

    def clear(self) -> None:
        """Drop every graph and the memory it holds."""
        self._graphs.clear()
        self._seen.clear()

    # ------------------------------------------------------------------ eligibility and keys
    def key(self, request: Request | None, kwargs: dict[str, Any]) -> Hashable | None:
        """The schedule of this language-model call, or None when it must run eagerly."""
        if request is None or request.phase != "prefill" or not request.pruned:
            return None
        embeds = kwargs.get("inputs_embeds")
        cache = cache_from_kwargs(kwargs)
        if not isinstance(embeds, Tensor) or embeds.device.type not in self.device_types:
            return None
        if cache is None or not hasattr(cache, "layers"):
            return None
        if getattr(cache, "is_compileable", False) or any(row_lengths(cache).values()):
            return None  # static caches and caches that already hold rows run eagerly
        if kwargs.get("output_attentions") or kwargs.get("output_hidden_states") or kwargs.get("return_dict") is False:
            return None
        if kwargs.get("attention_mask") is not None:
            return None
        if getattr(self.pruner.adapter.text_config(), "_attn_implementation", None) != "sdpa":
            return None  # eager attention needs the mask materialised; flash variants read position ids instead
        if not self.pruner.adapter.prefill_capturable():
            return None  # the adapter's language model reads the device inside its forward
        if not request.prompt_unmasked or not all(coords.all_valid for coords in request.coords):
            return None
        if any(isinstance(stage.selector, RandomSelector) for stage in self.pruner.stages):
            return None
        budgets = tuple(
            tuple(tuple(budgets.host.tolist()) if budgets is not None else None for budgets in row)
            for row in request.budgets
        )
        counts = tuple((sample.newlines, sample.text) for sample in request.schedule)
        return (
            tuple(
                (name, *((tuple(t.shape), t.dtype, str(t.device)) for t in tensors))
                for name, tensors in _inputs(kwargs)
            ),
            budgets,
            counts,
            tuple(request.coords[0].counts),
            type(cache),
        )

    # ------------------------------------------------------------------ run
    def run(self, key: Hashable, request: Request, kwargs: dict[str, Any], forward: Callable[..., Any]) -> Any:
        """The language model's output for this call: replayed, captured then replayed, or eager (first sight)."""
        captured = self._graphs.get(key)
        if captured is None:
            if key not in self._seen:  # first sight: run eagerly, which also warms every kernel up
                output, unmasked = self._eager_and_unmasked(forward, kwargs)
                # The recording gives every layer no mask: only a schedule whose eager layers all had none (no
                # sliding window reaching into the prompt, no masked row) can be captured; the others stay eager.
                self._seen[key] = unmasked
                while len(self._seen) > 4 * self.size:
                    self._seen.popitem(last=False)
                return output
            if not self._seen[key]:
                return forward(**kwargs)
            captured = self._capture(request, kwargs, forward)
            self._graphs[key] = captured
            while len(self._graphs) > self.size:
                self._graphs.popitem(last=False)
        else:
            self._graphs.move_to_end(key)
        return self._replay(captured, request, kwargs)

    def _eager_and_unmasked(self, forward: Callable[..., Any], kwargs: dict[str, Any]) -> tuple[Any, bool]:
        """The eager output of this call, and whether every decoder layer received no mask (after hieravid's own
        per-layer hooks, which give later coordinate systems their masks)."""
        masks: list[bool] = []

        def record(module: Any, args: tuple, layer_kwargs: dict[str, Any]) -> None:
            masks.append(layer_kwargs.get("attention_mask") is None)

        hooks = [layer.register_forward_pre_hook(record, with_kwargs=True) for layer in self.pruner.layers]
        try:
            output = forward(**kwargs)
        finally:
            for hook in hooks:
                hook.remove()
        return output, bool(masks) and all(masks)

    def _capture(self, request: Request, kwargs: dict[str, Any], forward: Callable[..., Any]) -> _Captured:
        from transformers import DynamicCache

        inputs = {name: [tensor.clone() for tensor in tensors] for name, tensors in _inputs(kwargs)}
        state = [_get(holder, key).clone() for holder, key in _device_state(request)]
        records: dict[str, Any] = {}

        def prefill() -> Any:
            """The pruned prefill of the running request on the static buffers, with a private cache; the request
            keeps only what it had before (the records are returned, and given to each replayed request)."""
            live = self.pruner.active_request()
            assert live is not None
            # The cache the language model would make (with its config: transformers then skips the causal mask and
            # SDPA runs its causal kernel; an empty config-less cache makes it build a dense mask instead).
            cache = self.pruner.new_cache() or DynamicCache()
            static = {
                name: tensors[0] if isinstance(kwargs[name], Tensor) else list(tensors)
                for name, tensors in inputs.items()
            }
            call = {**kwargs, **static, _cache_key(kwargs, self.pruner.language_model): cache}
            # Some transformers versions build a dense causal mask while a CUDA stream captures (they cannot prove
            # the mask unneeded then), where the eager prefill of an unpadded prompt gives every layer None (SDPA's
            # causal kernel; a recurrent layer's 2-D padding mask is None too): every layer gets None, as eagerly,
            # so the recorded kernels are the eager ones. Decoders that take a mask mapping (one mask per layer
            # type) are handed the eager path's mapping, so that they build no mask at all.
            if self.pruner.takes_mask_mapping:
                call["attention_mask"] = {"full_attention": None, **dict.fromkeys(self.pruner.recurrent_mask_keys)}
            unmasked = [
                layer.register_forward_pre_hook(_unmasked, with_kwargs=True, prepend=True)
                for layer in self.pruner.layers
            ]
            items = _device_state(live)
            originals = [_get(holder, key) for holder, key in items]
            prefix = (len(live.coords), len(live.stages), len(live.stage_all_valid))
            for (holder, key), value in zip(items, state):
                _set(holder, key, value)
            try:
                output = forward(**call)
            finally:
                for hook in unmasked:
                    hook.remove()
                for (holder, key), value in zip(items, originals):
                    _set(holder, key, value)
            records["coords"] = live.coords[prefix[0] :]
            records["stages"] = live.stages[prefix[1] :]
            records["stage_all_valid"] = live.stage_all_valid[prefix[2] :]
            del live.coords[prefix[0] :], live.stages[prefix[1] :], live.stage_all_valid[prefix[2] :]
            live.pending = live.capture = None
            live.stage_inputs.clear()
            layers = [_layer_state(layer) for layer in cache.layers]
            stage_tensors = [[getattr(coords, name) for name in COORD_TENSORS] for coords in records["coords"]]
            kept = [list(stats.kept_positions) for stats in records["stages"]]
            return output["last_hidden_state"], layers, stage_tensors, kept, output

        graph = self.backend()
        _, layers, _, _, output = graph.record(prefill)
        self.captures += 1
        return _Captured(
            graph=graph,
            inputs=inputs,
            state=state,
            output=output,
            cache_layers=layers,
            coords=list(records["coords"]),
            stages=list(records["stages"]),
            stage_all_valid=list(records["stage_all_valid"]),
        )

    def _replay(self, captured: _Captured, request: Request, kwargs: dict[str, Any]) -> Any:
        for name, tensors in _inputs(kwargs):  # the same names and shapes as recorded (the schedule's key)
            for static, tensor in zip(captured.inputs[name], tensors):
                static.copy_(tensor)
        for static, (holder, key) in zip(captured.state, _device_state(request)):
            static.copy_(_get(holder, key))
        captured.graph.replay()
        self.replays += 1
        request.coords.extend(_clone_coords(coords) for coords in captured.coords)
        request.stages.extend(_clone_stats(stats) for stats in captured.stages)
        request.stage_all_valid.extend(captured.stage_all_valid)
        cache = cache_from_kwargs(kwargs)
        for index, state in enumerate(captured.cache_layers):
            _hand_over(cache, index, state)
        output = copy.copy(captured.output)
        output["last_hidden_state"] = captured.output["last_hidden_state"].clone()
        for name in CACHE_KEYS:
            if name in output.keys():
                output[name] = cache
        return output
