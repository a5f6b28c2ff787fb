"""Every built-in adapter through the conformance kit (:mod:`hieravid.testing`), one class per architecture of
``ARCHITECTURES``: the tiny models and prompts of ``tests/conftest.py``."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

from hieravid.testing import AdapterCase, AdapterConformance


def _tiny_models() -> ModuleType:
    """``tests/conftest.py``, loaded by path under its own name: ``import conftest`` finds whichever conftest pytest
    loaded last (``tests/ops`` has one too)."""
    name = "hieravid_tests_tiny_models"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parents[1] / "conftest.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def builtin_case(architecture: str) -> AdapterCase:
    """The kit's case for one tiny architecture: conftest's model class, config and single-sample prompts."""
    tiny = _tiny_models()
    prompts = tiny.TinyCase(architecture, "sdpa", model=None)  # builds inputs only: needs no model

    def sample(*, seed: int, frames: int) -> dict:
        return prompts.inputs(batch=1, seed=seed, frames=(frames,))

    return AdapterCase(
        name=architecture,
        model_class=tiny.model_class(architecture),
        config=tiny.model_config(architecture),
        sample=sample,
        frames=prompts.frames,
        # Qwen2-VL batches videos of different lengths; LLaVA batches share one frame count.
        batch_frames=(8, 6) if prompts.is_qwen else None,
        attention=tiny.ATTENTION,
        device=tiny.DEVICE,
    )


# Test_<architecture>: `pytest -k <architecture>` selects an architecture's tests here as everywhere else.
for _architecture in _tiny_models().ARCHITECTURES:
    _name = f"Test_{_architecture}"
    globals()[_name] = type(_name, (AdapterConformance,), {"case": builtin_case(_architecture), "__module__": __name__})
