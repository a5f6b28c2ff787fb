"""Adapter conformance suite: every adapter × policy × attention implementation (sdpa, eager), on CPU.

Tolerance: pruned runs are compared with the unpatched model on the pruned sequence at
``atol = rtol = 1e-4`` in fp32 (observed differences are ~2e-7: the same kernels on differently shaped
inputs). The no-pruning checks are bit-exact (``torch.equal``).
"""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import torch
from hv_reference import capture_layer_outputs, capture_lm_inputs, reference_run, stage_of_output

from hieravid.compat import cache_argument, cache_from_output
from hieravid.plan import compile_plan
from hieravid.policy import load_policy, policy_from_dict
from hieravid.runtime import apply, find_handle

ROOT = Path(__file__).resolve().parents[2]
ATOL = RTOL = 1e-4


def _inline(name: str, **sections: object) -> object:
    return policy_from_dict({"version": 1, "kind": "PruningPolicy", "name": name, **sections})


POLICIES = {
    "none": load_policy(ROOT / "policies" / "none.yaml"),
    # Every level on, but nothing removed: exercises all gathers, masks and position paths.
    "keep-all": _inline(
        "keep-all",
        segment={"merge_ratio": 0.0},
        frame={"dynamic_budget": {"enabled": False}},
        layer={
            "schedule": {
                "kind": "explicit",
                "stages": [{"layer": 2, "prune_ratio": 0.0}, {"layer": 5, "prune_ratio": 0.0}],
            }
        },
    ),
    "hieravid-30": load_policy(ROOT / "policies" / "hieravid-30.yaml"),
    "hieravid-20": load_policy(ROOT / "policies" / "hieravid-20.yaml"),
    "no-frame": load_policy(ROOT / "policies" / "ablations" / "no-frame.yaml"),
    "no-layer": load_policy(ROOT / "policies" / "ablations" / "no-layer.yaml"),
    "no-segment": load_policy(ROOT / "policies" / "ablations" / "no-segment.yaml"),
    # A peer method: FrameFusion's merging input operator (one segment) and an attention top-k stage at layer 2.
    "peer-framefusion": load_policy(ROOT / "policies" / "peers" / "framefusion.yaml"),
    "after-mlp-uniform-drop-newlines": _inline(
        "after-mlp-uniform-drop-newlines",
        keep_newlines=False,
        frame={"selector": {"kind": "uniform"}},
        layer={
            "prune_point": "after_mlp",
            "schedule": {
                "kind": "explicit",
                "stages": [
                    {"layer": 0, "prune_ratio": 0.4},
                    {"layer": 3, "prune_ratio": 0.5},
                    {"layer": 7, "prune_ratio": 0.5},
                ],
            },
        },
    ),
    "random-positive-2rows": _inline(
        "random-positive-2rows",
        frame={"selector": {"kind": "random", "seed": 3}, "relevance": {"sign": "positive", "query_rows": 2}},
    ),
    "dpp-small-blocks": _inline(
        "dpp-small-blocks",
        segment={"segment_threshold": 0.9},
        frame={"selector": {"kind": "dpp", "max_block": 8}},
    ),
}
PRUNING = [name for name in POLICIES if name not in ("none", "keep-all")]
IDENTITY = ["none", "keep-all"]
GENERATE = ["hieravid-30", "no-segment", "after-mlp-uniform-drop-newlines", "random-positive-2rows"]


def _plan(case: object, name: str) -> object:
    return compile_plan(POLICIES[name], case.spec())


def _hook_snapshot(model: torch.nn.Module) -> dict:
    snapshot = {}
    for module_name, module in model.named_modules():
        snapshot[module_name] = tuple(
            tuple(getattr(module, attribute).keys())
            for attribute in (
                "_forward_hooks",
                "_forward_pre_hooks",
                "_forward_hooks_with_kwargs",
                "_forward_pre_hooks_with_kwargs",
                "_forward_hooks_always_called",
                "_backward_hooks",
                "_backward_pre_hooks",
            )
        )
    return snapshot


def _real_rows(positions: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (positions >= 0) & mask.bool()[positions.clamp_min(0)]


# ---------------------------------------------------------------------------------------------- (a)
@pytest.mark.parametrize("policy", IDENTITY)
def test_identity_policies_are_bit_identical_and_remove_restores(tiny, policy):
    model = tiny.model
    inputs = tiny.inputs(batch=2, pads=(0, 5), seed=7)
    with torch.no_grad():
        logits = model(**inputs).logits
        generated = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    # transformers installs its own output-capturing hooks lazily on a first call: snapshot afterwards.
    hooks_before = _hook_snapshot(model)
    signature = inspect.signature(model.forward)
    config_before = model.config.to_dict()
    weights_before = {k: v.clone() for k, v in model.state_dict().items()}

    handle = apply(model, _plan(tiny, policy))
    assert find_handle(model) is handle
    # The plan is really installed; a plan that prunes nothing needs (and installs) no hook at all.
    assert (_hook_snapshot(model) != hooks_before) == handle.plan.prunes
    with torch.no_grad():
        pruned_logits = model(**inputs).logits
        pruned_generated = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    stats = handle.last_request
    handle.remove()

    assert torch.equal(pruned_logits, logits)
    assert torch.equal(pruned_generated, generated)
    if policy == "keep-all":  # the machinery really ran: every layer saw every row
        assert stats.pruned and len(stats.stages) == 2
        assert stats.layer_sequence_lengths == (inputs["input_ids"].shape[1],) * 8
    # remove() restores the model exactly
    assert _hook_snapshot(model) == hooks_before
    assert find_handle(model) is None
    assert inspect.signature(model.forward) == signature
    assert "forward" not in vars(model)
    assert model.config.to_dict() == config_before
    assert all(torch.equal(v, weights_before[k]) for k, v in model.state_dict().items())
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, logits)


# ---------------------------------------------------------------------------------------------- (b)
@pytest.mark.parametrize("policy", PRUNING)
@pytest.mark.parametrize("batch", [1, 2], ids=["batch1", "batch2-leftpad"])
def test_pruned_forward_equals_reference_at_every_layer(tiny, policy, batch):
    model = tiny.model
    frames = (8, 6) if tiny.is_qwen and batch == 2 else None
    inputs = tiny.inputs(batch=batch, pads=(0, 7)[:batch], frames=frames, seed=11)
    plan = _plan(tiny, policy)
    handle = apply(model, plan)
    adapter = handle.adapter
    handle.remove()
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
    assert stats.pruned
    assert len(stats.stages) == len(plan.stages)

    for sample in range(batch):
        mask = inputs["attention_mask"][sample]
        reference = reference_run(model, adapter, plan, stats, lm_inputs, sample, qwen=tiny.is_qwen)
        # Layer-0 input: text rows untouched, video rows = the segment operator's merged features.
        first = stats.stage_positions[0][sample]
        assert torch.equal(first[_real_rows(first, mask)], reference.input_positions)
        for index, output in enumerate(outputs):
            positions = stats.stage_positions[stage_of_output(plan, index)][sample]
            rows = _real_rows(positions, mask)
            assert torch.equal(positions[rows], reference.layer_positions[index]), f"layer {index} rows"
            torch.testing.assert_close(
                output[sample][rows],
                reference.layer_outputs[index],
                atol=ATOL,
                rtol=RTOL,
                msg=lambda m, i=index: f"layer {i}: {m}",
            )
        rows = _real_rows(stats.output_positions[sample], mask)
        torch.testing.assert_close(logits[sample][rows], reference.logits, atol=ATOL, rtol=RTOL)


CALL_VARIANTS = {
    "use_cache=False": dict(use_cache=False),
    "return_dict=False": dict(return_dict=False),
    "output_hidden_states": dict(output_hidden_states=True),
    "output_attentions": dict(output_attentions=True),
    "logits_to_keep=1": dict(logits_to_keep=1),
}


@pytest.mark.parametrize("variant", CALL_VARIANTS)
@pytest.mark.parametrize("batch", [1, 2], ids=["batch1", "batch2-leftpad"])
def test_pruned_logits_do_not_depend_on_the_callers_arguments(tiny, variant, batch):
    """Whatever the caller asks of the forward (no cache, tuples, hidden states, attentions, last logits only), the
    pruned logits equal the reference on the pruned sequence. Without a cache, position-id gaps must not be read
    as packed sequences."""
    model = tiny.model
    frames = (8, 6) if tiny.is_qwen and batch == 2 else None
    inputs = tiny.inputs(batch=batch, pads=(0, 7)[:batch], frames=frames, seed=11)
    plan = _plan(tiny, "hieravid-30")
    handle = apply(model, plan)
    adapter = handle.adapter
    handle.remove()
    lm_inputs = capture_lm_inputs(adapter, model, inputs)
    options = CALL_VARIANTS[variant]
    with apply(model, plan) as handle, torch.no_grad():
        output = model(**inputs, **options)
        stats = handle.last_request
    logits = output[0] if isinstance(output, tuple) else output.logits
    for sample in range(batch):
        reference = reference_run(model, adapter, plan, stats, lm_inputs, sample, qwen=tiny.is_qwen)
        rows = _real_rows(stats.output_positions[sample], inputs["attention_mask"][sample])
        expected = reference.logits
        got = logits[sample][rows] if "logits_to_keep" not in options else logits[sample]
        if "logits_to_keep" in options:
            expected = expected[-1:]
        torch.testing.assert_close(got, expected, atol=ATOL, rtol=RTOL)


# ---------------------------------------------------------------------------------------------- (c)
@pytest.mark.parametrize("policy", GENERATE)
def test_generate_with_cache_equals_cache_free_recomputation(tiny, policy):
    model = tiny.model
    frames = (8, 6) if tiny.is_qwen else None
    inputs = tiny.inputs(batch=2, pads=(3, 0), frames=frames, seed=5)
    plan = _plan(tiny, policy)
    new_tokens = 5
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
        reference = reference_run(
            model, adapter, plan, stats, lm_inputs, sample, qwen=tiny.is_qwen, extra_ids=generated[:-1]
        )
        step_logits = torch.stack([step[sample] for step in result.logits])
        torch.testing.assert_close(step_logits, reference.logits[-new_tokens:], atol=ATOL, rtol=RTOL)
        # min_new_tokens bars EOS from generate's choice (not from its raw output_logits): bar it here too.
        choices = reference.logits[-new_tokens:].clone()
        choices[:, model.generation_config.eos_token_id] = float("-inf")
        assert torch.equal(choices.argmax(-1), generated)


# ---------------------------------------------------------------------------------------------- (d)
@pytest.mark.parametrize("policy", PRUNING)
def test_cache_lengths_equal_realised_counts_which_match_the_plan(tiny, policy, realised_counts):
    model = tiny.model
    inputs = tiny.inputs(batch=1, seed=3)
    plan = _plan(tiny, policy)
    with apply(model, plan) as handle:
        with torch.no_grad():
            out = model(**inputs, use_cache=True)
            stats = handle.last_request
            cache = cache_from_output(out)
            # Linear-attention layers (Qwen3.5) keep a fixed-size state, no rows.
            attention = [index for index, layer in enumerate(cache.layers) if hasattr(layer, "keys")]
            lengths = [cache.layers[index].keys.shape[-2] for index in attention]
            assert lengths == [stats.layer_sequence_lengths[index] for index in attention]
            assert out.logits.shape[1] == stats.output_positions.shape[1]
            # A decode step appends exactly one row to every layer.
            step = model(
                input_ids=torch.tensor([[5]], device=tiny.device),
                **cache_argument(model, cache),
                attention_mask=torch.ones(1, inputs["input_ids"].shape[1] + 1, dtype=torch.long, device=tiny.device),
            )
            step_layers = cache_from_output(step).layers
            assert [step_layers[index].keys.shape[-2] for index in attention] == [n + 1 for n in lengths]
    # Segment level exact (⌊ρ0·F·P⌋ merged; FrameFusion at most its ratio); stages within the per-segment
    # rounding (see the fixture in tests/conftest.py).
    realised_counts(plan, stats, inputs["input_ids"], input_exact=plan.segment.kind != "framefusion")


# ---------------------------------------------------------------------------------------------- (e)
def test_save_pretrained_from_pretrained_apply_generate(tiny_sdpa, tiny_builders, tmp_path):
    model_class = tiny_builders.model_class
    model = tiny_sdpa.model
    inputs = tiny_sdpa.inputs(batch=1, seed=2)
    plan = _plan(tiny_sdpa, "hieravid-30")
    with apply(model, plan):
        with torch.no_grad():
            expected = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    model.save_pretrained(tmp_path)
    assert list(tmp_path.glob("*.safetensors"))
    reloaded = model_class(tiny_sdpa.architecture).from_pretrained(tmp_path, attn_implementation="sdpa")
    reloaded = reloaded.to(tiny_sdpa.device).eval()
    with apply(reloaded, plan) as handle:
        with torch.no_grad():
            generated = reloaded.generate(**inputs, max_new_tokens=4, do_sample=False)
        assert handle.last_request.pruned
    assert torch.equal(generated, expected)
    # A policy file compiled against the reloaded model's own config works too.
    with apply(reloaded, ROOT / "policies" / "hieravid-30.yaml") as handle:
        with torch.no_grad():
            generated = reloaded.generate(**inputs, max_new_tokens=4, do_sample=False)
        assert handle.last_request.pruned and generated.shape == expected.shape
