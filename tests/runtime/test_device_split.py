"""A model split over two devices by accelerate: hooks, masks and stage work follow each layer's device.

CI has one CPU, so the second "device" is ``meta`` (the first is the test device: the CPU, or the GPU of a
``HIERAVID_TEST_DEVICE=cuda`` run): accelerate's ``dispatch_model`` runs the later decoder layers
there (their weights and activations have shapes but no data), and any operation that mixes a CPU tensor with a
meta tensor raises the same "Expected all tensors to be on the same device" error that a split over two GPUs
does. That is the failure this file guards against (hieravid-30 on a LLaVA-OV-7B split over two H200s failed in
``apply_rotary_pos_emb``). Values on ``meta`` cannot be compared, so the checks are the ones that shapes carry: the
KV cache of every layer holds the rows a one-device run keeps, on that layer's device. Copying back from ``meta``
is impossible, and transformers reads a mask with padding (or padding slots, as batches have) on the host, so
continuing the cache (which moves the request's state back to the first device) and batches are checked on GPUs
only.
"""

from __future__ import annotations

import pytest
import torch

import hieravid
from hieravid.runtime.state import COORD_TENSORS, Coords, Request

ARCHITECTURES = ("llava_onevision", "llava_video_per_row", "llava_next_video", "qwen2_vl", "qwen2_5_vl")


def split_over_device_and_meta(model: torch.nn.Module, first_meta_layer: int) -> torch.nn.Module:
    """Decoder layers from ``first_meta_layer`` on (and the final norm and head) run on ``meta``, the rest on the
    model's device."""
    from accelerate import dispatch_model
    from accelerate.hooks import remove_hook_from_module

    first = str(model.device) if model.device.type != "cuda" else f"cuda:{model.device.index or 0}"
    inner = model.model
    prefix = "model.language_model"
    layers = len(inner.language_model.layers)
    device_map = {f"{prefix}.layers.{i}": first if i < first_meta_layer else "meta" for i in range(layers)}
    device_map |= {f"{prefix}.{name}": first for name, _ in inner.language_model.named_children() if name != "layers"}
    device_map |= {f"{prefix}.norm": "meta", "lm_head": "meta"}
    device_map |= {f"model.{name}": first for name, _ in inner.named_children() if name != "language_model"}
    device_map |= {f"model.{name}": first for name, _ in inner.named_parameters(recurse=False)}
    model = dispatch_model(model, device_map=device_map, main_device=first)
    remove_hook_from_module(model)  # the top-level hook would copy the (meta) logits back to the first device
    return model


def cache_lengths(cache) -> list[int]:
    return [int(layer.keys.shape[2]) for layer in cache.layers]


@pytest.mark.parametrize("first_meta_layer", [1, 4], ids=lambda n: f"layers{n}-on-meta")
@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_a_pruned_prefill_follows_each_layers_device(architecture, first_meta_layer, tiny_builders):
    case = tiny_builders.tiny_case(architecture)
    inputs = case.inputs()  # one sample: transformers reads a padded 2-D mask on the host, which meta cannot
    plan = hieravid.compile_plan("hieravid-30", case.spec())
    assert any(stage.layer >= first_meta_layer for stage in plan.stages)  # a stage runs on the second device

    reference = tiny_builders.build_model(architecture, "sdpa")
    with hieravid.apply(reference, plan) as handle:
        expected = cache_lengths(reference(**inputs).past_key_values)
        expected_stats = handle.last_request.layer_video_tokens

    model = split_over_device_and_meta(tiny_builders.build_model(architecture, "sdpa"), first_meta_layer)
    with hieravid.apply(model, plan) as handle:
        output = model(**inputs)
        assert handle.last_request.layer_video_tokens == expected_stats
    assert cache_lengths(output.past_key_values) == expected
    devices = [layer.keys.device.type for layer in output.past_key_values.layers]
    assert devices == [tiny_builders.DEVICE.type] * first_meta_layer + ["meta"] * (len(devices) - first_meta_layer)
    assert output.logits.device.type == "meta" and output.logits.shape[:2] == (1, expected[-1])


def test_request_follow_moves_every_tensor_the_layers_read_and_nothing_on_one_device():
    coords = Coords(*(torch.arange(6).view(2, 3) for _ in COORD_TENSORS), counts=(3, 3), all_valid=True)
    request = Request(batch=2, coords=[coords], marginal_values=[torch.ones(2)], mask2d=torch.ones(2, 3).bool())
    before = [getattr(coords, name) for name in COORD_TENSORS]
    request.follow(torch.device("cpu"))
    assert all(getattr(coords, name) is tensor for name, tensor in zip(COORD_TENSORS, before))

    request.follow(torch.device("meta"))
    assert request.coords[0] is coords  # moved in place: whoever holds the coordinates sees the move
    assert {getattr(coords, name).device.type for name in COORD_TENSORS} == {"meta"}
    assert request.marginal_values[0].device.type == "meta" and request.mask2d.device.type == "meta"
