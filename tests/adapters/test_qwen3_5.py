"""Qwen3.5's linear-attention (Gated DeltaNet) layers under pruning.

The conformance suite runs Qwen3.5 with one linear-attention layer before every stage (its policies put stages on
layers 0 and 2-7). Here a model whose stages sit on its only full-attention layers, with linear-attention layers
after them, checks what pruning must keep exact on a recurrence: the layers after a stage run on the shorter
sequence (equal to the model on the pruned sequence), the conv and recurrent states cached for decoding, and a
left-padded batch whose samples keep different counts (padding slots must not enter the recurrent state).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

from hieravid.errors import AdapterError, PlanError
from hieravid.plan import compile_plan
from hieravid.policy import policy_from_dict
from hieravid.runtime import apply
from hieravid.runtime.packing import pack_rows
from hieravid.testing.checks import real_rows
from hieravid.testing.reference import capture_layer_outputs, capture_lm_inputs, reference_run, stage_of_output

ATOL = RTOL = 1e-4
#: Full attention at 0, 2 and 5 only: stages at 0 and 2, then linear-attention layers 3, 4, 6 and 7 run pruned.
LAYER_TYPES = ["linear_attention" if index not in (0, 2, 5) else "full_attention" for index in range(8)]


def _policy(*stages: int) -> object:
    return policy_from_dict(
        {
            "version": 1,
            "kind": "PruningPolicy",
            "name": "qwen3-5-stages",
            "layer": {"schedule": {"kind": "explicit", "stages": [{"layer": s, "prune_ratio": 0.4} for s in stages]}},
        }
    )


def _tiny_models() -> ModuleType:
    """``tests/conftest.py`` by path, under the name test_conformance.py gives it (``import conftest`` is ambiguous:
    other test folders have their own)."""
    name = "hieravid_tests_tiny_models"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parents[1] / "conftest.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


@pytest.fixture(scope="module")
def hybrid():
    from transformers import Qwen3_5ForConditionalGeneration

    tiny = _tiny_models()
    config = tiny.qwen3_5_config(LAYER_TYPES)
    torch.manual_seed(1)
    model = Qwen3_5ForConditionalGeneration._from_config(config, attn_implementation="sdpa").to(tiny.DEVICE).eval()
    case = tiny.TinyCase("qwen3_5", "sdpa", model)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield case
    torch.set_num_threads(threads)


def test_linear_attention_layers_after_stages_equal_the_model_on_the_pruned_sequence(hybrid):
    model = hybrid.model
    inputs = hybrid.inputs(batch=2, pads=(0, 7), frames=(8, 6), seed=11)
    plan = compile_plan(_policy(0, 2), hybrid.spec())
    with apply(model, plan) as handle:
        adapter = handle.adapter
        assert adapter.recurrent_layers() == frozenset({1, 3, 4, 6, 7})
    lm_inputs = capture_lm_inputs(adapter, model, inputs)
    with apply(model, plan) as handle:
        outputs, removables = capture_layer_outputs(handle.adapter)
        try:
            with torch.no_grad():
                logits = model(**inputs).logits
        finally:
            for removable in removables:
                removable.remove()
        stats = handle.last_request
    counts = [int(real_rows(p, m).sum()) for p, m in zip(stats.output_positions, inputs["attention_mask"])]
    assert counts[0] != counts[1]  # the samples keep different counts: the shorter one holds padding slots
    for sample in range(2):
        mask = inputs["attention_mask"][sample]
        reference = reference_run(model, adapter, plan, stats, lm_inputs, sample)
        for index, output in enumerate(outputs):
            positions = stats.stage_positions[stage_of_output(plan, index)][sample]
            rows = real_rows(positions, mask)
            # Padding slots come first in every coordinate system (a recurrence only ignores leading masked rows).
            assert bool(rows[int((~rows).sum()) :].all()), f"layer {index}: a masked row between real rows"
            assert torch.equal(positions[rows], reference.layer_positions[index])
            torch.testing.assert_close(output[sample][rows], reference.layer_outputs[index], atol=ATOL, rtol=RTOL)
        rows = real_rows(stats.output_positions[sample], mask)
        torch.testing.assert_close(logits[sample][rows], reference.logits, atol=ATOL, rtol=RTOL)


def test_cached_decoding_of_linear_attention_states_equals_a_cache_free_recomputation(hybrid):
    model = hybrid.model
    inputs = hybrid.inputs(batch=2, pads=(3, 0), frames=(8, 6), seed=5)
    plan = compile_plan(_policy(0, 2), hybrid.spec())
    new_tokens = 4
    with apply(model, plan) as handle:
        adapter = handle.adapter
        with torch.no_grad():
            result = model.generate(
                **inputs,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                output_logits=True,
                return_dict_in_generate=True,
            )
        stats = handle.last_request
    lm_inputs = capture_lm_inputs(adapter, model, inputs, generate=True)
    length = inputs["input_ids"].shape[1]
    for sample in range(2):
        generated = result.sequences[sample, length:]
        reference = reference_run(model, adapter, plan, stats, lm_inputs, sample, extra_ids=generated[:-1])
        step_logits = torch.stack([step[sample] for step in result.logits])
        torch.testing.assert_close(step_logits, reference.logits[-new_tokens:], atol=ATOL, rtol=RTOL)


def test_a_stage_on_a_linear_attention_layer_is_refused(hybrid):
    """The planner refuses it from the model's layer types; ``apply`` refuses a plan compiled without them."""
    spec = hybrid.spec()
    assert spec.recurrent_layers == (1, 3, 4, 6, 7)
    with pytest.raises(PlanError, match=r"stage at layer 3, .*linear attention.*valid stage layers: \[0, 2, 5\]"):
        compile_plan(_policy(2, 3), spec)
    unaware = compile_plan(_policy(2, 3), dataclasses.replace(spec, recurrent_layers=()))
    with pytest.raises(AdapterError, match=r"stage at layer 3 .*linear attention.*full-attention layers \[0, 2, 5\]"):
        apply(hybrid.model, unaware)
    assert not any(module._forward_hooks or module._forward_pre_hooks for module in hybrid.model.modules())


def test_the_catalogue_geometry_names_the_linear_attention_layers():
    """`hieravid plan` on a Qwen3.5 config knows where stages may go, without a model."""
    from hieravid.specs import spec_from_config

    config = _tiny_models().qwen3_5_config(["linear_attention", "full_attention"] * 4)
    spec = spec_from_config(config, name="hybrid", frames=4)
    assert spec.recurrent_layers == (0, 2, 4, 6)
    with pytest.raises(PlanError, match=r"stage at layer 2, .*valid stage layers: \[1, 3, 5, 7\]"):
        compile_plan("hieravid-30", spec)


def test_a_masked_row_is_neutral_to_gated_deltanet_only_before_the_first_real_row(hybrid):
    """Why padding slots go first: the layer zeroes a masked row, but its state still decays there and its causal
    convolution still sees the zero, so a masked row between real rows changes the rows after it."""
    layer = hybrid.model.model.language_model.layers[1].linear_attn
    device = layer.in_proj_qkv.weight.device
    torch.manual_seed(0)
    rows = torch.randn(1, 6, 64, device=device)
    filler = torch.randn(1, 1, 64, device=device)
    with torch.no_grad():
        plain = layer(rows)
        first = layer(torch.cat([filler, rows], 1), attention_mask=torch.tensor([[0, 1, 1, 1, 1, 1, 1]], device=device))
        middle = layer(
            torch.cat([rows[:, :3], filler, rows[:, 3:]], 1),
            attention_mask=torch.tensor([[1, 1, 1, 0, 1, 1, 1]], device=device),
        )
    torch.testing.assert_close(first[:, 1:], plain, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(middle[:, :3], plain[:, :3], atol=1e-6, rtol=1e-5)
    assert (middle[:, 4:] - plain[:, 3:]).abs().max() > 1e-3


def test_pack_rows_puts_padding_slots_first_when_asked():
    keep = torch.tensor([[True, True, False, True, True], [True, False, False, True, True]])
    kind = torch.tensor([[0, 1, 1, 1, 0], [0, 1, 1, 1, 0]])
    index, valid = pack_rows(keep, kind, [4, 3], 1, slots_first=True)
    assert index.tolist() == [[0, 1, 3, 4], [0, 0, 3, 4]]
    assert valid.tolist() == [[True, True, True, True], [False, True, True, True]]


def test_a_static_cache_decodes_as_the_dynamic_cache_does(hybrid):
    """Static caches on a hybrid model: the attention layers are right-sized to their kept rows, the linear-attention
    layers keep their fixed-size states, and a left-padded batch (samples keeping different counts) decodes the same
    tokens as with a dynamic cache."""
    model = hybrid.model
    inputs = hybrid.inputs(batch=2, pads=(3, 0), frames=(8, 6), seed=9)
    options = dict(
        max_new_tokens=4, min_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True
    )
    with apply(model, compile_plan(_policy(0, 2), hybrid.spec())) as handle, torch.no_grad():
        dynamic = model.generate(**inputs, **options)
        static = model.generate(**inputs, cache_implementation="static", **options)
        stats = handle.last_request
    assert torch.equal(static.sequences, dynamic.sequences)
    for a, b in zip(static.logits, dynamic.logits):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=RTOL)
    layers = static.past_key_values.layers
    full = inputs["input_ids"].shape[1] + 4
    for index, layer in enumerate(layers):
        if index in (1, 3, 4, 6, 7):
            assert not hasattr(layer, "max_cache_len")  # a recurrent state, not rows
        else:
            assert stats.layer_sequence_lengths[index] < layer.max_cache_len < full
