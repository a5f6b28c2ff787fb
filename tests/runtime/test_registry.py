"""Adapter registry: built-ins, explicit registration, third-party discovery through entry points."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
import textwrap

import pytest

from hieravid.adapters import registry as registry_module
from hieravid.adapters.registry import ENTRY_POINT_GROUP, AdapterRegistry
from hieravid.errors import AdapterError

THIRD_PARTY = '''
from hieravid.adapters.llava_onevision import LlavaOnevisionAdapter


class TinyThirdPartyAdapter(LlavaOnevisionAdapter):
    """An adapter shipped by another package (here: reuses the LLaVA logic for a renamed model type)."""

    model_types = ("tiny_third_party",)
    default_query_rows = 2


NOT_AN_ADAPTER = object()
'''


@pytest.fixture
def third_party(tmp_path, monkeypatch):
    """A module on sys.path plus a faked entry-point table pointing at it, as an installed package would."""
    (tmp_path / "tiny_third_party_pkg.py").write_text(textwrap.dedent(THIRD_PARTY))
    monkeypatch.syspath_prepend(str(tmp_path))
    calls: list[dict] = []
    points = [
        importlib.metadata.EntryPoint(
            "tiny_third_party", "tiny_third_party_pkg:TinyThirdPartyAdapter", ENTRY_POINT_GROUP
        ),
        importlib.metadata.EntryPoint("broken_type", "tiny_third_party_pkg:NOT_AN_ADAPTER", ENTRY_POINT_GROUP),
        importlib.metadata.EntryPoint("missing_type", "no_such_module_xyz:Adapter", ENTRY_POINT_GROUP),
    ]

    real_entry_points = importlib.metadata.entry_points

    def fake_entry_points(**selection):
        if selection.get("group") != ENTRY_POINT_GROUP:
            # Other packages (e.g. Triton's backends, imported lazily by transformers) see the real table.
            return real_entry_points(**selection)
        calls.append(selection)
        return importlib.metadata.EntryPoints(points)

    monkeypatch.setattr(importlib.metadata, "entry_points", fake_entry_points)
    yield calls
    sys.modules.pop("tiny_third_party_pkg", None)


def test_builtins_resolve_lazily_to_adapter_classes():
    registry = AdapterRegistry()
    from hieravid.adapters.base import Adapter

    for model_type in ("llava_onevision", "qwen2_vl", "qwen2_5_vl"):
        adapter = registry.get(model_type)
        assert issubclass(adapter, Adapter) and model_type in adapter.model_types
    assert registry.get("qwen2_vl").default_query_rows == 4


def test_unknown_model_type_lists_supported_ones():
    with pytest.raises(AdapterError) as error:
        AdapterRegistry().get("llama")
    message = str(error.value)
    assert "'llama'" in message
    for model_type in ("llava_onevision", "qwen2_vl", "qwen2_5_vl"):
        assert model_type in message


def test_entry_point_adapter_is_discovered_lazily(third_party):
    registry = AdapterRegistry()
    assert third_party == []  # nothing read at construction
    adapter = registry.get("tiny_third_party")
    assert adapter.__name__ == "TinyThirdPartyAdapter"
    assert third_party == [{"group": ENTRY_POINT_GROUP}]
    registry.get("tiny_third_party")
    assert len(third_party) == 1  # discovery is cached
    assert "tiny_third_party" in registry.supported_model_types()


def test_bad_entry_points_raise_clear_errors(third_party):
    registry = AdapterRegistry()
    with pytest.raises(AdapterError, match=r"expected a subclass of hieravid\.adapters\.base\.Adapter"):
        registry.get("broken_type")
    with pytest.raises(AdapterError, match=r"failed to load.*no_such_module_xyz"):
        registry.get("missing_type")


def test_explicit_registration_wins_and_refuses_silent_override(third_party):
    from hieravid.adapters.qwen2_vl import Qwen2VLAdapter

    registry = AdapterRegistry()

    class Override(Qwen2VLAdapter):
        model_types = ("tiny_third_party",)

    registry.register(Override)
    assert registry.get("tiny_third_party") is Override

    class Another(Qwen2VLAdapter):
        model_types = ("tiny_third_party",)

    with pytest.raises(AdapterError, match="already has adapter Override"):
        registry.register(Another)
    registry.register(Another, replace=True)
    assert registry.get("tiny_third_party") is Another
    registry.unregister("tiny_third_party")
    assert registry.get("tiny_third_party").__name__ == "TinyThirdPartyAdapter"


def test_register_rejects_non_adapters_and_empty_types():
    registry = AdapterRegistry()
    with pytest.raises(AdapterError, match="subclass"):
        registry.register(object)  # type: ignore[arg-type]
    from hieravid.adapters.base import Adapter

    class NoTypes(Adapter):
        pass

    with pytest.raises(AdapterError, match="declares no model_types"):
        registry.register(NoTypes)
    registry.register(NoTypes, model_types=("some_type",))
    assert registry.get("some_type") is NoTypes


def test_module_level_helpers_use_the_process_registry(third_party):
    registry_module.registry.refresh()
    try:
        assert "tiny_third_party" in registry_module.supported_model_types()
        assert registry_module.get_adapter("tiny_third_party").__name__ == "TinyThirdPartyAdapter"
    finally:
        registry_module.registry.refresh()


def test_apply_uses_a_third_party_adapter_from_an_entry_point(third_party, tiny_builders):
    """End to end: a model whose model_type only an entry-point adapter serves gets pruned by it."""
    import torch

    from hieravid.plan import compile_plan
    from hieravid.runtime import apply

    registry_module.registry.refresh()
    model = tiny_builders.build_model("llava_onevision", "sdpa")
    model.config.model_type = "tiny_third_party"
    case = tiny_builders.tiny_case("llava_onevision")
    spec = case.spec()
    import dataclasses

    plan = compile_plan("hieravid-30", dataclasses.replace(spec, model_type="tiny_third_party"))
    inputs = case.inputs(seed=4)
    try:
        with apply(model, plan) as handle:
            assert type(handle.adapter).__name__ == "TinyThirdPartyAdapter"
            with torch.no_grad():
                model(**inputs)
            assert handle.last_request.pruned
    finally:
        registry_module.registry.refresh()


def test_import_hieravid_is_lean():
    code = (
        "import sys, hieravid, hieravid.runtime, hieravid.adapters\n"
        "from hieravid.runtime import apply, register_adapter, supported_model_types\n"
        "bad = [m for m in sys.modules if m.startswith('transformers')]\n"
        "assert not bad, bad\n"
        "assert hieravid.apply is apply\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_videollama3_is_refused_with_the_reason():
    """VideoLLaMA3's processor compresses video tokens per frame (CONTRIBUTING.md, "Architectures not supported"):
    apply and the planner say so instead of "no adapter"."""
    import torch
    from transformers import VideoLlama3Config, VideoLlama3ForConditionalGeneration

    from hieravid.errors import SpecError
    from hieravid.runtime import apply
    from hieravid.specs import spec_from_config

    text = dict(
        model_type="qwen2", hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, vocab_size=64,
    )  # fmt: skip
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, patch_size=2)
    config = VideoLlama3Config(text_config=text, vision_config=vision)
    torch.manual_seed(0)
    model = VideoLlama3ForConditionalGeneration(config).eval()
    reason = r"VideoLLaMA3 .* not supported: .*use_token_compression.*different token counts"
    with pytest.raises(AdapterError, match=reason):
        apply(model, "hieravid-30")
    assert not any(module._forward_hooks or module._forward_pre_hooks for module in model.modules())
    with pytest.raises(SpecError, match=reason):
        spec_from_config(config.to_dict())
    assert "video_llama_3" not in AdapterRegistry().supported_model_types()
