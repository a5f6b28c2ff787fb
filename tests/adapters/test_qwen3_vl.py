"""Qwen3-VL specifics: deepstack features pruned with the tokens, stages before the last deepstack injection
refused, the relevance score's queries and keys through ``q_norm``/``k_norm``, and the MoE variant."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from hieravid.errors import PlanError
from hieravid.plan import compile_plan
from hieravid.policy import policy_from_dict
from hieravid.runtime import apply, find_handle
from hieravid.testing.reference import capture_lm_inputs, reference_run

ROOT = Path(__file__).resolve().parents[2]
HIERAVID_30 = ROOT / "policies" / "hieravid-30.yaml"


def _stages(*layers: int) -> object:
    stages = [{"layer": layer, "prune_ratio": 0.3} for layer in layers]
    return policy_from_dict(
        {
            "version": 1,
            "kind": "PruningPolicy",
            "name": "stages",
            "layer": {"schedule": {"kind": "explicit", "stages": stages}},
        }
    )


def _language_model_calls(model: torch.nn.Module) -> tuple[list[dict], object]:
    """Records the language model's call kwargs *after* hieravid's pre-hook rewrote them (registered later)."""
    calls: list[dict] = []
    hook = model.model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: calls.append(dict(kwargs)), with_kwargs=True
    )
    return calls, hook


def test_deepstack_features_are_pruned_like_the_tokens(tiny_builders):
    case = tiny_builders.tiny_case("qwen3_vl", "sdpa")
    model = case.model
    inputs = case.inputs(batch=2, pads=(0, 7), frames=(8, 6), seed=11)
    original, hook = _language_model_calls(model)
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        hook.remove()
    mask, features = original[0]["visual_pos_masks"], original[0]["deepstack_visual_embeds"]
    assert len(features) == 2 and mask.sum() == features[0].shape[0] == (8 + 6) * 16
    row_of = (mask.flatten().long().cumsum(0) - 1).view(mask.shape)

    with apply(model, compile_plan(HIERAVID_30, case.spec())) as handle:
        pruned, hook = _language_model_calls(model)
        try:
            with torch.no_grad():
                model(**inputs)
        finally:
            hook.remove()
        stats = handle.last_request
    kept_mask, kept_features = pruned[0]["visual_pos_masks"], pruned[0]["deepstack_visual_embeds"]
    assert kept_mask.shape == pruned[0]["inputs_embeds"].shape[:2]
    positions = stats.stage_positions[0]  # original position of each stage-0 row, -1 at padding slots
    expected_rows = []
    for sample in range(2):
        kept_video = set(stats.input_kept_positions[sample].tolist())
        row_positions = positions[sample].tolist()
        # Exactly the kept video tokens receive deepstack features (timestamps and padding slots do not) ...
        assert [p in kept_video for p in row_positions] == kept_mask[sample].tolist()
        expected_rows += [int(row_of[sample, p]) for p in row_positions if p in kept_video]
    # ... each its own original deepstack row, for every injected layer.
    assert len(expected_rows) == sum(len(stats.input_kept_positions[s]) for s in range(2)) < mask.sum()
    for original_feature, kept_feature in zip(features, kept_features, strict=True):
        assert torch.equal(kept_feature, original_feature[expected_rows])


def test_deepstack_without_the_input_level_reaches_the_model_untouched(tiny_builders):
    case = tiny_builders.tiny_case("qwen3_vl", "sdpa")
    inputs = case.inputs(seed=3)
    policy = policy_from_dict({**_stages(2, 5).to_dict(), "segment": {"enabled": False}})
    with apply(case.model, compile_plan(policy, case.spec())):
        calls, hook = _language_model_calls(case.model)
        try:
            with torch.no_grad():
                case.model(**inputs)
        finally:
            hook.remove()
    assert calls[0]["visual_pos_masks"].shape == inputs["input_ids"].shape
    assert calls[0]["deepstack_visual_embeds"][0].shape[0] == 8 * 16


@pytest.mark.parametrize("layer", [0, 1])
def test_stages_before_the_last_deepstack_injection_are_refused(tiny_builders, layer):
    case = tiny_builders.tiny_case("qwen3_vl", "sdpa")
    with pytest.raises(PlanError, match=rf"stage at layer {layer}\b.*decoder layers 0\.\.1"):
        compile_plan(_stages(layer, 4), case.spec())
    # A plan compiled from a spec that does not know the constraint is refused by apply, before any hook.
    unconstrained = compile_plan(_stages(layer, 4), dataclasses.replace(case.spec(), first_stage_layer=0))
    with pytest.raises(PlanError, match=rf"stage at layer {layer}\b.*deepstack.*layer 2 or later"):
        apply(case.model, unconstrained)
    assert find_handle(case.model) is None
    # The model's own config gives the planner the constraint too.
    with pytest.raises(PlanError, match=rf"stage at layer {layer}\b"):
        compile_plan(_stages(layer, 4), case.model)
    with apply(case.model, compile_plan(_stages(2, 4), case.model)) as handle, torch.no_grad():
        case.model(**case.inputs(seed=1))
        assert [stage.layer for stage in handle.plan.stages] == [2, 4] and handle.last_request.pruned


def test_stage_queries_and_keys_are_the_attentions_own(tiny_builders):
    """The relevance queries/keys (through q_norm/k_norm, then RoPE) give exactly eager attention's probabilities
    of the last rows."""
    case = tiny_builders.tiny_case("qwen3_vl", "eager")
    model, layer_index, rows = case.model, 2, 4
    inputs = case.inputs(seed=5)
    handle = apply(model, compile_plan(HIERAVID_30, case.spec()))
    adapter = handle.adapter
    handle.remove()
    layer = adapter.decoder_layers()[layer_index]
    captured: dict = {}

    def keep(name: str, value: object) -> None:  # hooks must return None (a value would replace the output)
        captured.setdefault(name, value)

    q_norm, k_norm = adapter.query_key_projections(layer)
    removables = [
        q_norm.register_forward_hook(lambda m, a, out: keep("query", out)),
        k_norm.register_forward_hook(lambda m, a, out: keep("key", out)),
        layer.register_forward_pre_hook(lambda m, a, kw: keep("rope", kw["position_embeddings"]), with_kwargs=True),
    ]
    try:
        with torch.no_grad():
            attentions = model(**inputs, output_attentions=True).attentions[layer_index]
    finally:
        for removable in removables:
            removable.remove()
    query, key = adapter.stage_query_key(layer, captured["query"], captured["key"], captured["rope"], rows)
    key = key.repeat_interleave(query.shape[1] // key.shape[1], dim=1)
    scores = query @ key.transpose(-1, -2) * adapter.attention_scaling(layer)
    length = key.shape[2]
    columns = torch.arange(length, device=scores.device)
    causal = columns > columns[length - rows :, None]
    probabilities = scores.masked_fill(causal, float("-inf")).softmax(-1)
    torch.testing.assert_close(probabilities, attentions[:, :, -rows:], atol=1e-6, rtol=1e-5)


def test_moe_variant_equals_the_reference(tiny_builders):
    """Qwen3-VL-MoE: same adapter (sparse MoE blocks are token-wise, so the after-attention MLP cut holds)."""
    torch.manual_seed(0)
    model = tiny_builders.build_model("qwen3_vl_moe", "sdpa")
    case = dataclasses.replace(tiny_builders.tiny_case("qwen3_vl", "sdpa"), architecture="qwen3_vl_moe", model=model)
    inputs = case.inputs(batch=2, pads=(0, 7), frames=(8, 6), seed=11)
    spec = dataclasses.replace(case.spec(), model_type="qwen3_vl_moe")
    plan = compile_plan(HIERAVID_30, spec)
    handle = apply(model, plan)
    adapter = handle.adapter
    handle.remove()
    lm_inputs = capture_lm_inputs(adapter, model, inputs)
    with apply(model, plan) as handle, torch.no_grad():
        logits = model(**inputs).logits
        stats = handle.last_request
    assert stats.pruned and len(stats.stages) == 3
    for sample in range(2):
        reference = reference_run(model, adapter, plan, stats, lm_inputs, sample)
        rows = stats.output_positions[sample] >= 0
        rows &= inputs["attention_mask"][sample].bool()[stats.output_positions[sample].clamp_min(0)]
        torch.testing.assert_close(logits[sample][rows], reference.logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("visual", ["some", "none", "all"])
def test_deepstack_rows_are_added_as_transformers_adds_them_without_a_host_sync(tiny_builders, dtype, visual):
    from hieravid.adapters.qwen3_vl import add_deepstack_rows
    from hieravid.diagnostics import SyncSpy

    text_model = tiny_builders.tiny_case("qwen3_vl", "sdpa").model.model.language_model
    generator = torch.Generator().manual_seed(3)
    hidden = torch.randn(2, 9, 8, generator=generator).to(dtype)
    mask = {
        "some": torch.rand(2, 9, generator=generator) < 0.5,
        "none": torch.zeros(2, 9, dtype=torch.bool),
        "all": torch.ones(2, 9, dtype=torch.bool),
    }[visual]
    embeds = torch.randn(int(mask.sum()), 8, generator=generator)  # float32 rows, cast as transformers casts them
    expected = type(text_model)._deepstack_process(text_model, hidden, mask, embeds)
    spy = SyncSpy()
    with spy:
        got = add_deepstack_rows(hidden, mask, embeds)
    assert torch.equal(got, expected) and got.dtype == dtype
    assert dict(spy.counts) == {}


def test_the_deepstack_speedup_is_installed_on_the_instance_and_removed(tiny_builders):
    from hieravid.adapters.qwen3_vl import add_deepstack_rows

    case = tiny_builders.tiny_case("qwen3_vl", "sdpa")
    text_model = case.model.model.language_model
    plan = compile_plan(HIERAVID_30, case.spec())
    with apply(case.model, plan) as handle:
        assert vars(text_model)["_deepstack_process"] is add_deepstack_rows
        assert "deepstack-without-host-sync" in [speedup.name for speedup in handle.speedups]
        assert handle.adapter.prefill_capturable()
    assert "_deepstack_process" not in vars(text_model)
    with apply(case.model, plan, speedups="none") as handle:
        assert "_deepstack_process" not in vars(text_model)
        assert not handle.adapter.prefill_capturable()
