"""The adapters' vision-side speedups on CPU: bit-identity with the stock model, and exact removal.

* LLaVA-OneVision: ``apply_pooling`` without the NCHW copy (channels-last interpolate), against the stock method
  over grids, channels, frames and dtypes, and whole-model outputs with ``policies/none.yaml``;
"""

from __future__ import annotations

import copy
import math
import types
from pathlib import Path

import pytest
import torch

from hieravid.runtime import apply
from hieravid.runtime.overrides import select_speedups

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
        assert select_speedups(adapter, "all") == []
    finally:
        case.model.model.__class__ = original
    assert [s.name for s in select_speedups(adapter, "exact")] == ["onevision-pooling-channels-last"]


def test_every_speedup_is_described(tiny_sdpa):
    from hieravid.runtime.registry import get_adapter

    for speedup in select_speedups(get_adapter(tiny_sdpa.model.config.model_type)(tiny_sdpa.model), "all"):
        assert speedup.reason and speedup.name and not isinstance(speedup.owner, type)
        assert speedup.exact
