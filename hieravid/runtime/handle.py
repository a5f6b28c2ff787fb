"""``apply``: install a pruning plan on a model; :class:`PruningHandle`: inspect and remove it."""

from __future__ import annotations

import weakref
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from hieravid.adapters.registry import get_adapter
from hieravid.compat import cache_from_kwargs, cache_from_output
from hieravid.errors import AdapterError, PlanError
from hieravid.ops import GraphCache
from hieravid.runtime.capture import PrefillGraphs
from hieravid.runtime.engine import Pruner
from hieravid.runtime.masks import STATIC_CAPACITIES
from hieravid.runtime.overrides import Overrides, check_speedup_mode, select_speedups
from hieravid.runtime.state import RequestStats

if TYPE_CHECKING:
    from torch.utils.hooks import RemovableHandle

    from hieravid.adapters.base import Adapter, Speedup
    from hieravid.plan import PruningPlan
    from hieravid.policy import Policy

__all__ = ["PruningHandle", "apply", "find_handle"]


class PruningHandle:
    """A plan installed on a model. Use :meth:`remove` (or a ``with`` block) to restore the model exactly.

    Attributes:
        model: the model the plan is installed on.
        plan: the :class:`~hieravid.plan.PruningPlan` being run.
        adapter: the adapter instance handling the architecture.
    """

    def __init__(
        self,
        model: nn.Module,
        adapter: Adapter,
        plan: PruningPlan,
        *,
        cuda_graphs: bool = False,
        speedups: str = "exact",
        static_capacity: str = "observed",
    ) -> None:
        self._speedup_mode = check_speedup_mode(speedups)
        if static_capacity not in STATIC_CAPACITIES:
            raise ValueError(
                f"static_capacity must be one of {', '.join(map(repr, STATIC_CAPACITIES))}, got {static_capacity!r}"
            )
        self.model = model
        self.adapter = adapter
        self.plan = plan
        # Owned here and dropped with the handle: CUDA graphs of the input level (one per video geometry) and of
        # whole prefills from layer 0 on (one per schedule).
        self._graphs = GraphCache() if cuda_graphs else None
        self._pruner = Pruner(model, adapter, plan, graphs=self._graphs, handle=self, static_capacity=static_capacity)
        self._prefill_graphs = PrefillGraphs(self._pruner) if cuda_graphs and plan.prunes else None
        self._hooks: list[RemovableHandle] = []
        self._overrides = Overrides()
        self._active = False
        #: Caches this handle filled with a pruned prompt, still alive: removal makes them refuse further use.
        self._pruned_caches: weakref.WeakSet[Any] = weakref.WeakSet()

    # -------------------------------------------------------------- lifecycle
    def _install(self) -> None:
        try:
            for site in self._pruner.sites():
                register = (
                    site.module.register_forward_pre_hook
                    if site.kind == "forward_pre"
                    else site.module.register_forward_hook
                )
                self._hooks.append(register(site.hook, **dict(site.options)))
            if self._hooks:  # after the engine's own language-model hooks, which tag the cache
                self._hooks.append(
                    self.adapter.language_model().register_forward_hook(self._record_cache, with_kwargs=True)
                )
            # After the hooks; chosen now (not at construction) so that a replaced handle's are already gone.
            speedups = select_speedups(self.adapter, self._speedup_mode)
            if self._prefill_graphs is not None:
                speedups.append(self._prefill_graphs.speedup())
            self._overrides = Overrides(speedups)
            self._overrides.install()
        except BaseException:
            self._remove_hooks()
            raise
        # A plain instance attribute (not a submodule, parameter or buffer), removed with the hooks.
        self.model.__dict__[HANDLE_ATTRIBUTE] = weakref.ref(self)
        self._active = True

    def _remove_hooks(self) -> None:
        hooks, self._hooks = self._hooks, []
        try:
            for hook in reversed(hooks):
                hook.remove()
        finally:
            try:
                self._overrides.remove()
            finally:
                reference = self.model.__dict__.get(HANDLE_ATTRIBUTE)
                if reference is not None and reference() is self:
                    del self.model.__dict__[HANDLE_ATTRIBUTE]
                self._pruner.reset()
                for graphs in (self._graphs, self._prefill_graphs):
                    if graphs is not None:
                        graphs.clear()

    def remove(self) -> None:
        """Remove every hook; the model is exactly as before :func:`apply`. Idempotent.

        A KV cache this handle filled with a pruned prompt cannot be continued by the unpruned model (its layers
        hold different rows, its positions are not its length): from now on it raises
        :class:`~hieravid.errors.AdapterError` when the model tries to write to it."""
        self._remove_hooks()
        self._active = False
        caches, self._pruned_caches = list(self._pruned_caches), weakref.WeakSet()
        for cache in caches:
            cache.__dict__["update"] = _refuse_pruned_cache

    def _record_cache(self, module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> None:
        """Remember a cache filled with a pruned prompt (a weak reference; decode steps find it there already)."""
        if torch.compiler.is_compiling():
            return
        cache = cache_from_output(output)
        if cache is None:
            cache = cache_from_kwargs(kwargs)
        request = self._pruner.request_of_cache(cache)
        if request is not None and request.pruned and cache not in self._pruned_caches:
            self._pruned_caches.add(cache)

    @property
    def active(self) -> bool:
        """Whether the plan is still installed."""
        return self._active

    def __enter__(self) -> PruningHandle:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.remove()

    # -------------------------------------------------------------- inspection
    @property
    def last_request(self) -> RequestStats | None:
        """Statistics of the latest prefill (realised kept counts per stage, segments, layouts, ...). A plan that
        prunes nothing installs no hook and sees no call: its statistics say so (batch size and prompt length 0)."""
        if not self.plan.prunes:
            return RequestStats(pruned=False, reason="plan prunes nothing", batch_size=0, prompt_length=0)
        return self._pruner.last_stats

    @property
    def speedups(self) -> tuple[Speedup, ...]:
        """The speedups installed with the plan (see ``apply(..., speedups=...)``)."""
        return self._overrides.installed

    @property
    def num_hooks(self) -> int:
        return len(self._hooks)

    def __repr__(self) -> str:
        state = "active" if self._active else "removed"
        return (
            f"<PruningHandle {state}: policy {self.plan.policy.name!r} on {type(self.model).__name__} via "
            f"{type(self.adapter).__name__}, {len(self._hooks)} hooks>"
        )


def _refuse_pruned_cache(*args: Any, **kwargs: Any) -> None:
    """What ``update`` of a cache becomes once the handle that pruned its prompt is removed."""
    raise AdapterError(
        "this KV cache holds a prompt pruned by a hieravid handle that has since been removed: its layers hold "
        "different rows and its positions are not its length, so the unpruned model cannot continue it. Continue a "
        "pruned request while its handle is installed (inside the `with hieravid.apply(...)` block), or prefill the "
        "prompt again with a new cache"
    )


#: Attribute of a model instance that refers (weakly) to the handle installed on it, while installed.
HANDLE_ATTRIBUTE = "_hieravid_handle"


def find_handle(model: nn.Module) -> PruningHandle | None:
    """The active :class:`PruningHandle` installed on ``model``, if any."""
    reference = model.__dict__.get(HANDLE_ATTRIBUTE)
    handle = reference() if reference is not None else None
    return handle if handle is not None and handle.active else None


def _model_type(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if not model_type:
        raise AdapterError(f"{type(model).__name__} has no config.model_type; hieravid needs a transformers model")
    return str(model_type)


def _resolve_plan(policy_or_plan: Any, model: nn.Module, adapter: Adapter, model_type: str) -> PruningPlan:
    from hieravid.plan import PruningPlan, compile_plan

    if isinstance(policy_or_plan, PruningPlan):
        plan = policy_or_plan
    else:
        plan = compile_plan(policy_or_plan, model)
    layers = len(adapter.decoder_layers())
    if plan.spec.num_layers != layers:
        raise PlanError(
            f"plan {plan.policy.name!r} was compiled for {plan.spec.name} ({plan.spec.num_layers} layers), but this "
            f"{type(model).__name__} has {layers} decoder layers; compile the policy for this model"
        )
    if plan.spec.model_type != model_type:
        raise PlanError(
            f"plan {plan.policy.name!r} was compiled for model_type {plan.spec.model_type!r}, not {model_type!r}"
        )
    adapter.check_plan(plan)
    return plan


def apply(
    model: nn.Module,
    policy_or_plan: Policy | PruningPlan | str | Path,
    *,
    replace: bool = False,
    cuda_graphs: bool = False,
    speedups: str = "exact",
    static_capacity: str = "observed",
) -> PruningHandle:
    """Install a pruning policy (or a compiled plan) on a transformers model.

    Args:
        model: e.g. ``LlavaOnevisionForConditionalGeneration`` or ``Qwen2VLForConditionalGeneration``
            (any model type with a registered adapter).
        policy_or_plan: a :class:`~hieravid.policy.Policy`, a YAML path or text, or a
            :class:`~hieravid.plan.PruningPlan` (compiled for this model's depth and type).
        replace: replace a plan already installed on ``model`` instead of raising.
        cuda_graphs: on CUDA, replay pruned prefills from CUDA graphs owned by the handle, bit-identical to the
            eager path: the input level (one graph per video geometry, ~200 kernel launches fewer) and, from the
            first decoder layer to the language model's output, whole prefills of a repeated schedule
            (:mod:`hieravid.runtime.capture`: no host launch time left, which matters most when pruning leaves few
            rows per layer). Each graph keeps its buffers
            until the handle is removed (input level ~0.1–0.2 GiB at 32 frames; a prefill graph about the eager
            prefill's activations plus one KV cache), which is why this is off by default: pruning then never needs
            more memory than the unpruned model.
        speedups: the adapter's vision-side speedups installed with the plan (even a plan that prunes
            nothing), removed with it: ``"exact"`` (default) installs those that keep outputs bit-identical
            (LLaVA-OneVision: pooling without a layout copy; Qwen2-VL / Qwen2.5-VL: one SDPA call per window
            length instead of one per window); ``"all"`` adds opt-in ones that change numerics within a
            documented tolerance (``torch.compile`` of the vision tower); ``"none"`` keeps the stock model.
            ``handle.speedups`` lists what was installed.
        static_capacity: how each layer of a static cache (``generate(..., cache_implementation="static")``) is
            right-sized after a pruned prefill: ``"observed"`` (default) keeps the rows the first request of a
            prompt shape kept, plus one bucket (1/64 of the prompt) of headroom, so that compiled decode attends over
            little more than what each layer kept; a later request of that shape whose content keeps more rows
            grows the capacity, and the compiled decode step recompiles once per capacity grown into. ``"bound"``
            keeps the most rows any content of the shape can keep under the plan (from the budgets' clamp and
            per-segment floors): compiled decode never recompiles for a shape it has seen, at the cost of more
            masked slots per decode step.

    Returns:
        A :class:`PruningHandle`; ``handle.remove()`` (or leaving a ``with`` block) restores the model.

    Raises:
        AdapterError: unsupported model type (the message lists the supported ones), a plan already
            installed and ``replace`` False, or a model the adapter cannot handle.
        PolicyError / PlanError: invalid policy, or a plan infeasible for this model — raised before any
            hook is installed. A speedup that cannot be installed (its attribute already overridden by
            someone else) raises AdapterError. A failure leaves the model exactly as it was.
    """
    model_type = _model_type(model)
    adapter_class = get_adapter(model_type)
    existing = find_handle(model)
    if existing is not None and not replace:
        raise AdapterError(
            f"{type(model).__name__} already has a hieravid plan ({existing.plan.policy.name!r}); call "
            "handle.remove() first or pass replace=True"
        )
    adapter = adapter_class(model)
    adapter.validate()
    plan = _resolve_plan(policy_or_plan, model, adapter, model_type)
    handle = PruningHandle(
        model, adapter, plan, cuda_graphs=cuda_graphs, speedups=speedups, static_capacity=static_capacity
    )
    if existing is not None:
        existing.remove()
    try:
        handle._install()
    except BaseException:
        if existing is not None:  # put the replaced plan back: a failed apply changes nothing
            existing._install()
        raise
    return handle
