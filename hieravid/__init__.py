"""hieravid: hierarchical (segment → frame → layer) video-token pruning for Video LLMs.

    import hieravid
    policy = hieravid.load_policy("policies/hieravid-30.yaml")
    plan = hieravid.compile_plan(policy, "llava-onevision-7b")   # pure, no weights
    with hieravid.apply(model, policy):                          # hooks on a real HF model
        model.generate(**inputs)

Importing this package is lean: names are resolved lazily, and nothing here imports transformers
model code or initialises CUDA.
"""

from __future__ import annotations

from hieravid._lazy import lazy_exports

__version__ = "0.1.0"

_EXPORTS: dict[str, str] = {
    "load_policy": "hieravid.policy",
    "policy_from_dict": "hieravid.policy",
    "Policy": "hieravid.policy",
    "compile_plan": "hieravid.plan",
    "PruningPlan": "hieravid.plan",
    "StagePlan": "hieravid.plan",
    "ModelSpec": "hieravid.specs",
    "load_spec": "hieravid.specs",
    "CATALOGUE": "hieravid.specs",
    "apply": "hieravid.runtime",
    "PruningHandle": "hieravid.runtime",
    "register_adapter": "hieravid.runtime",
    "HieravidError": "hieravid.errors",
    "PolicyError": "hieravid.errors",
    "PlanError": "hieravid.errors",
    "SpecError": "hieravid.errors",
    "AdapterError": "hieravid.errors",
}

__all__ = [*_EXPORTS, "__version__"]

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals(), extra=("__version__",))
