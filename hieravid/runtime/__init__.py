"""Runtime: applies a :class:`~hieravid.plan.PruningPlan` to a model through instance-local hooks.

    from hieravid.runtime import apply
    with apply(model, "policies/hieravid-30.yaml") as handle:
        model.generate(**inputs)
        print(handle.last_request.summary())

Names are resolved lazily: importing this package imports neither transformers nor model code.
"""

from __future__ import annotations

from hieravid._lazy import lazy_exports

_EXPORTS: dict[str, str] = {
    "apply": "hieravid.runtime.handle",
    "PruningHandle": "hieravid.runtime.handle",
    "find_handle": "hieravid.runtime.handle",
    "Overrides": "hieravid.runtime.overrides",
    "SPEEDUP_MODES": "hieravid.runtime.overrides",
    "RequestStats": "hieravid.runtime.state",
    "StageStats": "hieravid.runtime.state",
    "register_adapter": "hieravid.adapters.registry",
    "unregister_adapter": "hieravid.adapters.registry",
    "get_adapter": "hieravid.adapters.registry",
    "supported_model_types": "hieravid.adapters.registry",
    "AdapterRegistry": "hieravid.adapters.registry",
    "ENTRY_POINT_GROUP": "hieravid.adapters.registry",
}

__all__ = list(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
