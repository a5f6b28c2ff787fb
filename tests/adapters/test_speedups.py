"""The adapters' vision-side speedups on CPU: bit-identity with the stock model, and exact removal.

* LLaVA-OneVision: ``apply_pooling`` without the NCHW copy (channels-last interpolate), against the stock method
  over grids, channels, frames and dtypes, and whole-model outputs with ``policies/none.yaml``;
* Qwen2-VL / Qwen2.5-VL: one SDPA call per window length (:func:`batched_window_attention`), tower outputs over
  grids that are and are not multiples of the window, several videos per call, fp32 and bf16, mixes of full
  and windowed blocks, and whole-model outputs;
* ``speedups="all"``: ``torch.compile`` of the vision tower, within the documented tolerance.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import types
from pathlib import Path

import pytest
import torch

from hieravid.errors import AdapterError
from hieravid.runtime import apply
from hieravid.runtime.overrides import Overrides, select_speedups

ROOT = Path(__file__).resolve().parents[2]
NONE = ROOT / "policies" / "none.yaml"


def _equal(a: object, b: object) -> bool:
    if isinstance(a, (tuple, list)):
        return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))
    return torch.equal(a, b)


# ============================================================================================ LLaVA-OneVision
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("side", [27, 14, 9, 2, 1])
@pytest.mark.parametrize("channels", [1, 3, 64, 3584])
def test_channels_last_pooling_equals_the_stock_method(side: int, channels: int, dtype: torch.dtype) -> None:
    from transformers.models.llava_onevision.modeling_llava_onevision import LlavaOnevisionModel

    from hieravid.adapters.llava_onevision import apply_pooling_channels_last

    # The method reads only config.vision_config (square grids: image_size // patch_size per side).
    holder = types.SimpleNamespace(
        config=types.SimpleNamespace(vision_config=types.SimpleNamespace(image_size=side * 14, patch_size=14))
    )
    generator = torch.Generator().manual_seed(side * channels)
    for frames in (1, 3):
        features = (torch.randn(frames, side * side, channels, generator=generator) * 4).to(dtype)
        stock = LlavaOnevisionModel.apply_pooling(holder, features)
        fast = apply_pooling_channels_last(holder, features)
        assert fast.shape == stock.shape == (frames, math.ceil(side / 2) ** 2, channels)
        assert fast.dtype == stock.dtype and torch.equal(fast, stock)
        assert fast.is_contiguous()


def _llava_inputs(model: torch.nn.Module, frames: int, seed: int) -> dict[str, torch.Tensor]:
    """A prompt with one video for any LLaVA-OneVision vision geometry (transformers' layout: one trailing newline)."""
    vision = model.config.vision_config
    side = -(-(vision.image_size // vision.patch_size) // 2)
    generator = torch.Generator().manual_seed(seed)
    token = model.config.video_token_id
    head, tail = torch.randint(3, 200, (5,), generator=generator), torch.randint(3, 200, (6,), generator=generator)
    ids = torch.cat([head, torch.full((frames * side * side + 1,), token), tail])[None]
    pixels = torch.randn(1, frames, 3, vision.image_size, vision.image_size, generator=generator)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values_videos": pixels}


@pytest.mark.parametrize("architecture", ["llava_onevision", "llava_video_per_row"])
def test_onevision_whole_model_is_bit_identical_and_remove_restores(architecture, tiny_builders):
    case = tiny_builders.tiny_case(architecture, "sdpa")
    model = case.model
    module = model.model
    inputs = case.inputs(batch=2, pads=(0, 3), seed=5)
    with torch.no_grad():
        logits = model(**inputs).logits
        features = module.get_video_features(inputs["pixel_values_videos"]).pooler_output
    with apply(model, NONE) as handle:
        assert [s.name for s in handle.speedups] == ["onevision-pooling-channels-last"]
        assert "apply_pooling" in vars(module)
        with torch.no_grad():
            assert torch.equal(model(**inputs).logits, logits)
            fast = module.get_video_features(inputs["pixel_values_videos"]).pooler_output
            assert torch.equal(fast, features)
    assert "apply_pooling" not in vars(module)
    assert module.apply_pooling.__func__ is type(module).apply_pooling


def test_onevision_odd_grid_whole_model(tiny_builders):
    """A 9×9 patch grid (pooled to 5×5) through the whole model."""
    config = copy.deepcopy(tiny_builders.tiny_case("llava_onevision", "sdpa").model.config)
    config.vision_config.image_size = 36
    torch.manual_seed(0)
    model = tiny_builders.model_class("llava_onevision")._from_config(config, attn_implementation="sdpa").eval()
    inputs = _llava_inputs(model, frames=3, seed=2)
    with torch.no_grad():
        logits = model(**inputs).logits
        with apply(model, NONE) as handle:
            assert [s.name for s in handle.speedups] == ["onevision-pooling-channels-last"]
            assert torch.equal(model(**inputs).logits, logits)
        with apply(model, NONE, speedups="none"):
            assert torch.equal(model(**inputs).logits, logits)


def test_a_model_with_its_own_pooling_is_left_alone(tiny_builders):
    from transformers import LlavaOnevisionModel

    from hieravid.adapters.llava_onevision import LlavaOnevisionAdapter

    case = tiny_builders.tiny_case("llava_onevision", "sdpa")

    class OwnPooling(LlavaOnevisionModel):
        def apply_pooling(self, image_features: torch.Tensor) -> torch.Tensor:
            return image_features

    adapter = LlavaOnevisionAdapter(case.model)
    original = type(case.model.model)
    try:
        case.model.model.__class__ = OwnPooling
        assert [s.name for s in select_speedups(adapter, "all")] == ["compile-vision-tower"]
    finally:
        case.model.model.__class__ = original
    assert [s.name for s in select_speedups(adapter, "exact")] == ["onevision-pooling-channels-last"]


# ============================================================================================ Qwen2-VL / 2.5-VL
QWEN_TOWERS = {
    "qwen2_vl": {},
    # The real config's mix (fullatt_block_indexes [7, 15, 23, 31] of 32) in small: windowed, full, windowed, full.
    "qwen2_5_vl": {"depth": 4, "fullatt_block_indexes": [1, 3]},
    # A window of 3 merged tokens per side (window_size 12 / patch 2 / merge 2): more mixed lengths.
    "qwen2_5_vl-w3": {"depth": 2, "fullatt_block_indexes": [1], "window_size": 12},
}
GRIDS = {
    "one-length": [[2, 8, 8]],  # Qwen2.5-VL: 4×4 merged tokens, 2×2-token windows: every window 16 tokens
    "mixed-run": [[1, 6, 10]],  # 3×5 merged tokens: 16, 16, 8 | 8, 8, 4 (equal lengths in runs)
    "mixed-scattered": [[1, 10, 10]],  # 5×5: 16, 16, 8, 16, 16, 8, 8, 8, 4 (equal lengths apart)
    "several-videos": [[3, 10, 6], [1, 4, 4], [2, 14, 8]],
    "repeated-size": [[1, 4, 4], [1, 6, 6], [1, 4, 4]],  # Qwen2-VL: equal lengths apart
    "tiny": [[1, 2, 2]],
}
_TOWERS: dict[str, torch.nn.Module] = {}


def _qwen_model(name: str, tiny_builders: object) -> torch.nn.Module:
    """A tiny Qwen model (the conftest configuration) with the vision settings of ``QWEN_TOWERS[name]``."""
    if name not in _TOWERS:
        architecture = name.split("-")[0]
        config = copy.deepcopy(tiny_builders.tiny_case(architecture, "sdpa").model.config)
        for key, value in QWEN_TOWERS[name].items():
            setattr(config.vision_config, key, value)
        torch.manual_seed(0)
        model_class = tiny_builders.model_class(architecture)
        _TOWERS[name] = model_class._from_config(config, attn_implementation="sdpa").eval()
    return _TOWERS[name]


def _adapter(model: torch.nn.Module) -> object:
    from hieravid.adapters.registry import get_adapter

    return get_adapter(model.config.model_type)(model)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("grid", list(GRIDS), ids=list(GRIDS))
@pytest.mark.parametrize("tower", list(QWEN_TOWERS))
def test_batched_window_attention_is_bit_identical(tower, grid, dtype, tiny_builders, monkeypatch):
    model = _qwen_model(tower, tiny_builders).to(dtype)
    visual = model.model.visual
    grid_thw = torch.tensor(GRIDS[grid])
    patches = int((grid_thw[:, 0] * grid_thw[:, 1] * grid_thw[:, 2]).sum())
    pixels = torch.randn(patches, 3 * 2 * 2 * 2, generator=torch.Generator().manual_seed(len(grid))).to(dtype)
    windows: list[list[int]] = []  # per block call: the window lengths its attention receives

    def record(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        windows.append(torch.diff(kwargs["cu_seqlens"]).tolist())

    calls: list[int] = []  # per SDPA call: its batch (windows stacked)
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def counting(query: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        calls.append(int(query.shape[0]))
        return sdpa(query, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counting)
    hooks = [block.attn.register_forward_pre_hook(record, with_kwargs=True) for block in visual.blocks]
    try:
        with torch.no_grad():
            stock = visual(pixels, grid_thw=grid_thw).pooler_output
            stock_calls, calls[:] = list(calls), []
            overrides = Overrides(select_speedups(_adapter(model), "exact"))
            overrides.install()
            try:
                assert model.config.vision_config._attn_implementation == "hieravid_flash_windows"
                assert model.config.text_config._attn_implementation == "sdpa"  # the language model is untouched
                fast = visual(pixels, grid_thw=grid_thw).pooler_output
            finally:
                overrides.remove()
    finally:
        for hook in hooks:
            hook.remove()
    assert model.config.vision_config._attn_implementation == "sdpa"
    assert fast.dtype == stock.dtype and torch.equal(fast, stock)
    per_block = windows[: len(visual.blocks)]
    assert windows[len(visual.blocks) :] == per_block  # both runs saw the same windows
    # Before: one SDPA call per window. Now: one per distinct window length and block, stacking every window.
    assert stock_calls == [1] * sum(len(lengths) for lengths in per_block)
    assert len(calls) == sum(len(set(lengths)) for lengths in per_block)
    assert sum(calls) == len(stock_calls)


def test_window_bounds_are_read_once_per_forward_and_kind(tiny_builders):
    """Four blocks (windowed, full, windowed, full): two host reads (the stock loop reads four times)."""
    from hieravid.diagnostics import SyncSpy

    model = _qwen_model("qwen2_5_vl", tiny_builders).float()
    grid_thw = torch.tensor([[2, 10, 10]])
    pixels = torch.randn(200, 3 * 2 * 2 * 2)
    overrides = Overrides(select_speedups(_adapter(model), "exact"))
    spy = SyncSpy()
    with torch.no_grad():
        stock_spy = SyncSpy()
        with stock_spy:
            model.model.visual(pixels, grid_thw=grid_thw)
        overrides.install()
        try:
            with spy:
                model.model.visual(pixels, grid_thw=grid_thw)
        finally:
            overrides.remove()
    reads = {site: n for site, n in spy.counts.items() if "(_window_bounds)" in site[0]}
    assert sum(reads.values()) == 2, spy.counts
    assert sum(stock_spy.counts.values()) > sum(spy.counts.values())


@pytest.mark.parametrize("architecture", ["qwen2_vl", "qwen2_5_vl"])
def test_qwen_whole_model_is_bit_identical_with_mixed_windows(architecture, tiny_builders):
    """``policies/none.yaml`` with exact speedups equals the unpatched model, on a grid (6×10 patches) whose
    Qwen2.5-VL windows have mixed lengths, and with two videos of different sizes in one batch."""
    base = tiny_builders.tiny_case(architecture, "sdpa")
    model = base.model
    for rows, cols in ((3, 5), (4, 4)):
        case = dataclasses.replace(base, rows=rows, cols=cols)
        inputs = case.inputs(batch=2, pads=(0, 4), frames=(8, 6), seed=9)
        with torch.no_grad():
            logits = model(**inputs).logits
            with apply(model, NONE) as handle:
                assert [s.name for s in handle.speedups] == ["vision-window-attention-batched"]
                assert torch.equal(model(**inputs).logits, logits)
                generated = model.generate(**inputs, max_new_tokens=3, do_sample=False)
            assert torch.equal(model.generate(**inputs, max_new_tokens=3, do_sample=False), generated)
    assert model.config.vision_config._attn_implementation == "sdpa"


def test_window_attention_only_where_it_is_exact(tiny_builders):
    from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl

    case = tiny_builders.tiny_case("qwen2_5_vl", "eager")
    assert [s.name for s in select_speedups(_adapter(case.model), "exact")] == []  # eager: nothing to batch
    model = tiny_builders.tiny_case("qwen2_5_vl", "sdpa").model
    attention = model.model.visual.blocks[0].attn

    class Patched(modeling_qwen2_5_vl.Qwen2_5_VLVisionAttention):
        pass

    attention.__class__ = Patched
    try:  # a subclass may route attention differently: not offered
        assert [s.name for s in select_speedups(_adapter(model), "exact")] == []
    finally:
        attention.__class__ = modeling_qwen2_5_vl.Qwen2_5_VLVisionAttention
    assert [s.name for s in select_speedups(_adapter(model), "exact")] == ["vision-window-attention-batched"]


def test_window_attention_refuses_unpacked_calls_and_foreign_registrations(monkeypatch):
    from transformers import AttentionInterface

    from hieravid.adapters.qwen2_vl import WINDOW_ATTENTION, batched_window_attention, register_window_attention

    query = torch.randn(1, 2, 4, 8)
    with pytest.raises(AdapterError, match="needs cu_seq_lens_q"):
        batched_window_attention(torch.nn.Module(), query, query, query)
    with pytest.raises(AdapterError, match="cover"):
        batched_window_attention(torch.nn.Module(), query, query, query, cu_seq_lens_q=torch.tensor([0, 3]))
    assert register_window_attention() == WINDOW_ATTENTION == register_window_attention()  # idempotent
    assert "flash" in WINDOW_ATTENTION and not any(c.isdigit() for c in WINDOW_ATTENTION)
    monkeypatch.setitem(AttentionInterface._global_mapping, WINDOW_ATTENTION, lambda *a, **k: None)
    with pytest.raises(AdapterError, match="registered to"):
        register_window_attention()


# ============================================================================================ torch.compile
@pytest.mark.slow
def test_compiled_vision_tower_within_tolerance_and_removed_exactly(tiny_builders):
    """``speedups="all"`` compiles the vision tower (with the exact window attention inside, whose host read
    breaks the graph): features within 1e-5 relative error (fp32, CPU; measured ~2e-7 for Qwen2.5-VL's and
    ~1e-7 for SigLIP's tower), and removing the handle restores eager execution bit for bit. One architecture:
    compiling takes ~30 s on a CPU."""
    case = tiny_builders.tiny_case("qwen2_5_vl", "sdpa")
    model = case.model
    inputs = case.inputs(seed=4)

    def features() -> torch.Tensor:
        with torch.no_grad():
            output = model.model.get_video_features(inputs["pixel_values_videos"], inputs["video_grid_thw"])
            output = output.pooler_output
        return torch.cat(output) if isinstance(output, (tuple, list)) else output

    stock = features()
    tower = _adapter(model).vision_tower()
    with apply(model, NONE, speedups="all") as handle:
        assert [s.exact for s in handle.speedups] == [True, False]
        assert "forward" in vars(tower)
        compiled = features()
    relative = float((compiled - stock).norm() / stock.norm())
    assert relative < 1e-5, relative
    assert "forward" not in vars(tower)
    assert torch.equal(features(), stock)


def test_every_speedup_is_described(tiny_sdpa):
    for speedup in select_speedups(_adapter(tiny_sdpa.model), "all"):
        assert speedup.reason and speedup.name and not isinstance(speedup.owner, type)
        assert speedup.exact == (speedup.name != "compile-vision-tower")
