"""Speedups: the override primitive (instance-local, all or nothing, exact removal) and its wiring into ``apply``."""

from __future__ import annotations

import types
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from hieravid.adapters.base import Adapter, Speedup
from hieravid.errors import AdapterError
from hieravid.runtime import apply, find_handle
from hieravid.runtime.overrides import SPEEDUP_MODES, Overrides, select_speedups

ROOT = Path(__file__).resolve().parents[2]
NONE = ROOT / "policies" / "none.yaml"
HIERAVID_30 = ROOT / "policies" / "hieravid-30.yaml"


class Box(nn.Module):
    scale = 2.0

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(1))
        self.child = nn.Identity()
        self.name = "box"

    def double(self, x: float) -> float:
        return self.scale * x

    @property
    def label(self) -> str:
        return self.name


def _fast_double(self: Box, x: float) -> float:
    return x + x


def _speedup(owner: object, attribute: str = "double", value: object = None, **options: object) -> Speedup:
    if value is None:
        value = types.MethodType(_fast_double, owner)
    return Speedup(name=f"test-{attribute}", owner=owner, attribute=attribute, value=value, exact=True, reason="test")


# ---------------------------------------------------------------------------------------------- Speedup
def test_a_class_is_never_an_owner() -> None:
    with pytest.raises(AdapterError, match="not the class Box"):
        _speedup(Box)
    with pytest.raises(AdapterError, match="not an attribute name"):
        _speedup(Box(), attribute="not valid")


def test_speedup_describes_its_target() -> None:
    speedup = _speedup(Box())
    assert speedup.target == "Box.double" and speedup.exact
    assert "owner" not in repr(speedup) and "test-double" in repr(speedup)


# ---------------------------------------------------------------------------------------------- Overrides
def test_install_is_instance_local_and_remove_deletes_the_instance_attribute() -> None:
    box, other = Box(), Box()
    overrides = Overrides([_speedup(box)])
    overrides.install()
    assert "double" in vars(box) and box.double(3.0) == 6.0 and box.double.__func__ is _fast_double
    assert "double" not in vars(other) and other.double.__func__ is Box.double
    assert overrides.installed == overrides.speedups
    overrides.remove()
    assert "double" not in vars(box) and box.double.__func__ is Box.double
    assert overrides.installed == ()
    overrides.remove()  # idempotent
    overrides.install()  # and installable again
    assert box.double.__func__ is _fast_double
    overrides.remove()
    assert "double" not in vars(box)


def test_an_instance_value_is_replaced_only_when_expected_and_restored() -> None:
    box = Box()
    config = types.SimpleNamespace(implementation="sdpa")
    refused = Speedup(name="s", owner=config, attribute="implementation", value="fast", exact=True, reason="r")
    with pytest.raises(AdapterError, match="already overridden on this instance by someone else"):
        Overrides([refused]).install()
    wrong = Speedup(
        name="s", owner=config, attribute="implementation", value="fast", exact=True, reason="r", replaces="eager"
    )
    with pytest.raises(AdapterError, match="'sdpa', not 'eager'"):
        Overrides([wrong]).install()
    missing = Speedup(name="s", owner=box, attribute="double", value=1, exact=True, reason="r", replaces="x")
    with pytest.raises(AdapterError, match="no instance value to replace"):
        Overrides([missing]).install()
    good = Speedup(
        name="s", owner=config, attribute="implementation", value="fast", exact=True, reason="r", replaces="sdpa"
    )
    overrides = Overrides([good])
    overrides.install()
    assert config.implementation == "fast"
    overrides.remove()
    assert config.implementation == "sdpa"


def test_refuses_what_an_instance_attribute_cannot_override_exactly() -> None:
    box = Box()
    box.double = lambda x: x  # someone else's patch
    with pytest.raises(AdapterError, match="already overridden on this instance by someone else"):
        Overrides([_speedup(box)]).install()
    assert vars(box)["double"](5) == 5  # untouched
    for attribute, message in (
        ("label", "property of the class"),
        ("weight", "_parameters"),
        ("child", "_modules"),
    ):
        with pytest.raises(AdapterError, match=message):
            Overrides([_speedup(Box(), attribute=attribute, value=1)]).install()
    owner = types.SimpleNamespace()
    with pytest.raises(AdapterError, match="overridden twice"):
        Overrides([_speedup(owner, value=1), _speedup(owner, value=2)]).install()
    assert not vars(owner)
    with pytest.raises(AdapterError, match="no __dict__"):
        Overrides([_speedup(1.5, attribute="real", value=1)]).install()


def test_nothing_is_left_half_installed() -> None:
    first, second = Box(), Box()
    second.double = lambda x: x
    with pytest.raises(AdapterError):
        Overrides([_speedup(first), _speedup(second)]).install()  # refused before anything is set
    assert "double" not in vars(first)

    class FailingDict(dict):
        def __setitem__(self, key: str, value: object) -> None:
            if key == "double":
                raise RuntimeError("cannot set")
            super().__setitem__(key, value)

    class Plain:
        pass

    good, failing = Plain(), Plain()
    failing.__dict__ = FailingDict()
    config = types.SimpleNamespace(mode="a")
    overrides = Overrides(
        [
            Speedup(name="a", owner=config, attribute="mode", value="b", exact=True, reason="r", replaces="a"),
            _speedup(good, value=1),
            _speedup(failing, value=2),
        ]
    )
    with pytest.raises(RuntimeError, match="cannot set"):
        overrides.install()
    assert config.mode == "a" and "double" not in vars(good) and overrides.installed == ()


def test_remove_restores_even_after_someone_changed_the_value() -> None:
    box = Box()
    overrides = Overrides([_speedup(box)])
    overrides.install()
    box.double = lambda x: -x
    with pytest.warns(RuntimeWarning, match="was changed while speedup"):
        overrides.remove()
    assert "double" not in vars(box)


def test_select_speedups_by_mode() -> None:
    class TwoSpeedups(Adapter):
        model_types = ("two",)

        def speedups(self) -> list[Speedup]:
            exact = _speedup(self.model)
            opt_in = Speedup(name="o", owner=self.model, attribute="name", value="x", exact=False, reason="r")
            return [exact, opt_in]

    adapter = TwoSpeedups(Box())
    assert SPEEDUP_MODES == ("exact", "all", "none")
    assert [s.name for s in select_speedups(adapter, "exact")] == ["test-double"]
    assert [s.name for s in select_speedups(adapter, "all")] == ["test-double", "o"]
    assert select_speedups(adapter, "none") == []
    assert Adapter(Box()).speedups() == []
    with pytest.raises(ValueError, match="speedups must be one of 'exact', 'all', 'none'"):
        select_speedups(adapter, "fast")


# ---------------------------------------------------------------------------------------------- apply
def _instance_state(model: nn.Module) -> dict[str, object]:
    """Every module's and config's instance attribute names and values (by identity): what a speedup may touch
    (besides the model's reference to its installed handle, which ``find_handle`` reads)."""
    from hieravid.runtime.handle import HANDLE_ATTRIBUTE

    state: dict[str, object] = {}
    for name, module in model.named_modules():
        state[f"module:{name}"] = {key: id(value) for key, value in vars(module).items() if key != HANDLE_ATTRIBUTE}
        config = getattr(module, "config", None)
        if config is not None:
            for key, sub in [("", config), *((k, getattr(config, k, None)) for k in ("vision_config", "text_config"))]:
                if sub is not None:
                    state[f"config:{name}:{key}"] = dict(vars(sub))
    return state


def test_apply_installs_exact_speedups_even_when_nothing_is_pruned_and_remove_restores(tiny):
    model = tiny.model
    inputs = tiny.inputs(seed=3)
    with torch.no_grad():
        reference = model(**inputs).logits
    with apply(model, NONE), torch.no_grad():
        assert torch.equal(model(**inputs).logits, reference)
    before = _instance_state(model)  # (a forward may set attributes of its own, e.g. Qwen2-VL's rope_deltas)
    handle = apply(model, NONE)
    names = [speedup.name for speedup in handle.speedups]
    if tiny.architecture in ("llava_onevision", "llava_video_per_row"):
        assert names == ["onevision-pooling-channels-last"]
    elif tiny.architecture in ("llava_next_video", "internvl"):  # no exact speedup
        assert names == []
    elif tiny.architecture == "qwen3_5":  # batched window attention not checked on its tower: none offered
        assert names == []
    elif tiny.attention == "sdpa":  # Qwen2-VL, Qwen2.5-VL and Qwen3-VL towers share the per-window SDPA loop
        assert tiny.architecture in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
        deepstack = ["deepstack-without-host-sync"] if tiny.architecture == "qwen3_vl" else []
        assert names == ["vision-window-attention-batched", *deepstack]
    elif tiny.architecture == "qwen3_vl":  # its deepstack step, whatever the attention
        assert names == ["deepstack-without-host-sync"]
    else:  # eager vision attention has no per-window SDPA loop to batch
        assert names == []
    assert all(speedup.exact for speedup in handle.speedups)
    if names:
        assert _instance_state(model) != before
    handle.remove()
    assert _instance_state(model) == before
    assert handle.speedups == ()


def test_a_plan_that_prunes_nothing_installs_no_hook(tiny):
    """``policies/none.yaml`` costs nothing per call: no module gets a hook (only the exact speedups, which replace
    attributes), so neither a prefill nor a decode step runs any of hieravid's code."""
    model = tiny.model

    def hooks() -> dict[str, tuple]:  # transformers may have hooks of its own (output recording): compared, not zero
        return {name: (tuple(m._forward_hooks), tuple(m._forward_pre_hooks)) for name, m in model.named_modules()}

    before = hooks()
    with apply(model, NONE):
        assert hooks() == before


def test_speedups_none_is_the_stock_model(tiny_sdpa):
    model = tiny_sdpa.model
    before = _instance_state(model)
    with apply(model, NONE, speedups="none") as handle:
        assert handle.speedups == ()
        assert _instance_state(model) == before


def test_bad_speedup_mode_is_refused_before_any_hook(tiny_llava):
    model = tiny_llava.model
    with pytest.raises(ValueError, match="speedups must be one of"):
        apply(model, NONE, speedups="fastest")
    assert find_handle(model) is None


def test_a_speedup_already_overridden_by_someone_else_fails_apply_cleanly(tiny_llava):
    model = tiny_llava.model
    module = model.model
    module.apply_pooling = types.MethodType(type(module).apply_pooling, module)  # another library's patch
    try:
        before = _instance_state(model)
        hooks = {name: (tuple(m._forward_hooks), tuple(m._forward_pre_hooks)) for name, m in model.named_modules()}
        with pytest.raises(AdapterError, match=r"onevision-pooling-channels-last.*already overridden"):
            apply(model, NONE)
        assert find_handle(model) is None and _instance_state(model) == before
        assert hooks == {
            name: (tuple(m._forward_hooks), tuple(m._forward_pre_hooks)) for name, m in model.named_modules()
        }
        with apply(model, NONE, speedups="none") as handle:  # the stock path still works
            assert handle.speedups == ()
    finally:
        del module.apply_pooling


def test_replace_moves_the_speedups_to_the_new_handle(tiny_llava):
    model = tiny_llava.model
    first = apply(model, NONE)
    assert [s.name for s in first.speedups] == ["onevision-pooling-channels-last"]
    second = apply(model, HIERAVID_30, replace=True)
    assert first.speedups == () and [s.name for s in second.speedups] == ["onevision-pooling-channels-last"]
    second.remove()
    assert "apply_pooling" not in vars(model.model)


def test_warnings_free_lifecycle(tiny_sdpa):
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        for mode in ("exact", "none"):
            apply(tiny_sdpa.model, NONE, speedups=mode).remove()
