"""Runtime behaviour on tiny models: errors, warnings, layouts, multi-turn, handle lifecycle (batches against single
samples: the conformance kit, ``tests/adapters/test_conformance.py``)."""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path

import pytest
import torch

from hieravid.compat import cache_argument, cache_from_kwargs, cache_from_output
from hieravid.errors import AdapterError, PlanError, PolicyError
from hieravid.plan import compile_plan
from hieravid.policy import policy_from_dict
from hieravid.runtime import apply, find_handle
from hieravid.testing.reference import capture_lm_inputs, continuation_positions, reference_run

#: tests/conftest.py's QWEN3_TIMESTAMP_TOKENS (``import conftest`` is ambiguous across test folders).
TIMESTAMP_TOKENS = 3
ROOT = Path(__file__).resolve().parents[2]
HIERAVID_30 = ROOT / "policies" / "hieravid-30.yaml"


def _snapshot(model):
    return {name: (tuple(m._forward_hooks), tuple(m._forward_pre_hooks)) for name, m in model.named_modules()}


# ------------------------------------------------------------------------------------------ errors
def test_double_apply_raises_and_replace_swaps_the_plan(tiny_llava):
    model = tiny_llava.model
    first = apply(model, compile_plan(HIERAVID_30, tiny_llava.spec()))
    with pytest.raises(AdapterError, match=r"already has a hieravid plan.*replace=True"):
        apply(model, compile_plan(HIERAVID_30, tiny_llava.spec()))
    assert find_handle(model) is first and first.active
    second = apply(model, compile_plan(ROOT / "policies" / "hieravid-20.yaml", tiny_llava.spec()), replace=True)
    assert not first.active and find_handle(model) is second
    assert second.num_hooks > 0
    second.remove()
    assert find_handle(model) is None
    second.remove()  # idempotent


def test_unsupported_model_type_lists_supported(tiny_llava):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    model = Qwen2ForCausalLM(
        Qwen2Config(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            vocab_size=64,
        )
    )
    before = _snapshot(model)
    with pytest.raises(AdapterError) as error:
        apply(model, HIERAVID_30)
    assert "'qwen2'" in str(error.value) and "llava_onevision" in str(error.value) and "qwen2_vl" in str(error.value)
    assert _snapshot(model) == before


def test_infeasible_or_mismatched_plans_fail_before_any_hook(tiny_llava):
    model = tiny_llava.model
    with torch.no_grad():
        model(**tiny_llava.inputs())  # let transformers install its lazy hooks first
    before = _snapshot(model)
    beyond_depth = policy_from_dict(
        {
            "version": 1,
            "kind": "PruningPolicy",
            "name": "deep",
            "layer": {"schedule": {"kind": "explicit", "stages": [{"layer": 12, "prune_ratio": 0.5}]}},
        }
    )
    with pytest.raises(PlanError, match="layer 12"):
        apply(model, beyond_depth)
    with pytest.raises(PlanError, match="leaves no video token"):
        apply(model, compile_plan(ROOT / "policies" / "hieravid-10.yaml", tiny_llava.spec()))
    with pytest.raises(PlanError, match="decoder layers"):
        apply(model, compile_plan(HIERAVID_30, "llava-onevision-7b"))
    with pytest.raises(PolicyError):
        apply(model, "version: 1\nkind: PruningPolicy\nname: x\nsegment: {bogus: 1}\n")
    assert _snapshot(model) == before
    assert find_handle(model) is None


def test_failed_install_leaves_model_untouched_and_keeps_replaced_plan(tiny_llava, monkeypatch):
    model = tiny_llava.model
    plan = compile_plan(HIERAVID_30, tiny_llava.spec())
    with torch.no_grad():
        model(**tiny_llava.inputs())
    before = _snapshot(model)
    from hieravid.runtime import engine

    original = engine.Pruner.sites

    class Exploding:
        def register_forward_hook(self, *args, **kwargs):
            raise RuntimeError("boom after installing every hook")

    def failing_sites(self):
        sites = original(self)
        if self.plan.policy.name == "hieravid-20":  # a last hook that cannot be installed
            sites.append(engine.HookSite(Exploding(), "forward", None))
        return sites

    failing_plan = compile_plan(ROOT / "policies" / "hieravid-20.yaml", tiny_llava.spec())
    monkeypatch.setattr(engine.Pruner, "sites", failing_sites)
    with pytest.raises(RuntimeError, match="boom"):
        apply(model, failing_plan)
    assert _snapshot(model) == before
    first = apply(model, plan)
    installed = _snapshot(model)
    with pytest.raises(RuntimeError, match="boom"):
        apply(model, failing_plan, replace=True)
    assert find_handle(model) is first and first.active
    assert sum(len(a) + len(b) for a, b in _snapshot(model).values()) == sum(
        len(a) + len(b) for a, b in installed.values()
    )
    first.remove()
    assert _snapshot(model) == before


def test_prompt_without_video_runs_unpruned_and_warns_once(tiny):
    model = tiny.model
    inputs = tiny.inputs(video=False, seed=9)
    with torch.no_grad():
        expected = model(**inputs).logits
    with apply(model, compile_plan(HIERAVID_30, tiny.spec())) as handle:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with torch.no_grad():
                first = model(**inputs).logits
                model.generate(**inputs, max_new_tokens=3, do_sample=False)
        assert [str(w.message) for w in caught if "no video" in str(w.message)] == [
            "hieravid: this prompt holds no video tokens; it runs unpruned (warned once per handle)"
        ]
        assert not handle.last_request.pruned and handle.last_request.reason == "no video"
    assert torch.equal(first, expected)


# ------------------------------------------------------------------------------------------ layouts
def test_video_layout_is_derived_from_inputs(tiny_sdpa):
    case = tiny_sdpa
    with apply(case.model, compile_plan(HIERAVID_30, case.spec())) as handle:
        for frames in ((8,), (4,)):
            inputs = case.inputs(frames=frames, seed=1)
            with torch.no_grad():
                case.model(**inputs)
            video = handle.last_request.videos[0]
            layout = handle.last_request.layouts[0]
            assert (video["frames"], video["rows"], video["cols"]) == (frames[0], 4, 4)
            assert video["newline_layout"] == case.newline_layout
            assert video["video_tokens"] == case.video_tokens(frames[0])
            ids = inputs["input_ids"][0]
            token = case.placeholder_token
            assert bool((ids[layout.frame_index] == token).all())
            # Every video token is a frame or newline token of the layout, and the span runs from the first video
            # token to the last (text between frames: Qwen3-VL's and Qwen3.5's timestamps, InternVL's frame labels).
            video_positions = torch.nonzero(ids == token).flatten()
            located = torch.cat([layout.frame_index.flatten(), layout.newline_index]).sort().values
            assert torch.equal(located.cpu(), video_positions.cpu())
            assert layout.span == (int(video_positions[0]), int(video_positions[-1]) + 1)
            if case.architecture.startswith("qwen3_vl"):  # <t seconds> <end> <start> between temporal patches
                gaps = layout.frame_index[1:, 0] - layout.frame_index[:-1, -1] - 1
                assert gaps.tolist() == [TIMESTAMP_TOKENS + 2] * (frames[0] - 1)


# ------------------------------------------------------------------------------------------ multi-turn
@pytest.mark.parametrize("second_turn_video", [False, True], ids=["text-turn", "video-turn"])
def test_multi_turn_continues_the_pruned_cache_without_pruning_again(tiny_sdpa, second_turn_video):
    case = tiny_sdpa
    model = case.model
    inputs = case.inputs(seed=31)
    plan = compile_plan(HIERAVID_30, case.spec())
    with apply(model, plan) as handle:
        # Record the positions the language model receives in continuation calls (the model's own, e.g.
        # Qwen2.5-VL's rope deltas between turns), to give the reference the same ones.
        positions: list[torch.Tensor] = []

        def record(module, args, kwargs):
            past = cache_from_kwargs(kwargs)
            if past is not None and past.get_seq_length() > 0:
                positions.append(kwargs.get("position_ids"))

        recorder = handle.adapter.language_model().register_forward_pre_hook(record, with_kwargs=True)
        with torch.no_grad():
            first = model.generate(**inputs, max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
        stats = handle.last_request
        cache = cache_from_output(first)
        # Linear-attention layers (Qwen3.5) keep a fixed-size state, no rows.
        lengths = [layer.keys.shape[-2] for layer in cache.layers if hasattr(layer, "keys")]
        seen = inputs["input_ids"].shape[1] + 2  # the last generated token is not in the cache yet
        if second_turn_video:
            turn = case.inputs(seed=32)
            new_ids = torch.cat([first.sequences[:, -1:], turn["input_ids"]], dim=1)
            # No mm_token_type_ids: a continuation's M-RoPE positions are text positions + the stored rope deltas
            # (transformers 5.17 ignores the types here; >= 5.24 recomputes positions from the full history when
            # the types mark vision tokens past the cache length, which pruning shortens; see docs).
            extra = {k: v for k, v in turn.items() if k not in ("input_ids", "attention_mask", "mm_token_type_ids")}
        else:
            new_ids = torch.cat([first.sequences[:, -1:], torch.tensor([[17, 18, 19, 20]], device=case.device)], dim=1)
            extra = {}
        mask = torch.ones(1, seen + new_ids.shape[1], dtype=torch.long, device=case.device)
        with torch.no_grad():
            second = model.generate(
                input_ids=new_ids,
                attention_mask=mask,
                **cache_argument(model, cache),
                max_new_tokens=3,
                do_sample=False,
                output_logits=True,
                return_dict_in_generate=True,
                **extra,
            )
        assert handle.last_request is stats  # no new prefill statistics: nothing was pruned again
        grown = [layer.keys.shape[-2] for layer in cache_from_output(second).layers if hasattr(layer, "keys")]
        assert grown == [n + new_ids.shape[1] + 2 for n in lengths]
        # Misuse (full history as input_ids, sliced by generate with the pruned cache length) is refused clearly.
        history = torch.cat(
            [inputs["input_ids"], first.sequences[:, inputs["input_ids"].shape[1] :], new_ids[:, 1:]], 1
        )
        recorder.remove()
        with pytest.raises(AdapterError, match="original coordinates"):
            model.generate(
                input_ids=history,
                attention_mask=torch.ones_like(history),
                **cache_argument(model, cache_from_output(second)),
                max_new_tokens=1,
            )
    if second_turn_video:
        return
    adapter = handle.adapter
    lm_inputs = capture_lm_inputs(adapter, model, inputs, generate=True)
    continuation = torch.cat(
        [first.sequences[0, inputs["input_ids"].shape[1] :], new_ids[0, 1:], second.sequences[0, new_ids.shape[1] : -1]]
    )
    reference = reference_run(
        model,
        adapter,
        plan,
        stats,
        lm_inputs,
        0,
        extra_ids=continuation,
        extra_positions=continuation_positions(positions, 0, adapter.position_rows),
    )
    steps = torch.stack([step[0] for step in second.logits])
    torch.testing.assert_close(steps, reference.logits[-3:], atol=1e-4, rtol=1e-4)


def test_forward_without_cache_prunes_every_call_and_stats_are_consistent(tiny_llava):
    case = tiny_llava
    plan = compile_plan(HIERAVID_30, case.spec())
    with apply(case.model, plan) as handle:
        with torch.no_grad():
            a = case.model(**case.inputs(seed=1), use_cache=False).logits
            first = handle.last_request
            b = case.model(**case.inputs(seed=1), use_cache=False).logits
        assert handle.last_request is not first and torch.equal(a, b)  # deterministic decisions
        stats = handle.last_request
        assert stats.output_positions.shape[1] == a.shape[1]
        assert stats.layer_sequence_lengths[-1] == a.shape[1]
        assert "stage @ layer 2" in stats.summary()
        assert len(stats.stage_positions) == 1 + len(plan.stages)


def test_query_rows_default_comes_from_the_adapter_spec(tiny_sdpa):
    plan = compile_plan(HIERAVID_30, tiny_sdpa.model)
    expected = 4 if tiny_sdpa.is_qwen else 1
    assert {stage.query_rows for stage in plan.stages} == {expected}
    spec = dataclasses.replace(tiny_sdpa.spec(), default_query_rows=expected)
    assert compile_plan(HIERAVID_30, spec).stages[0].query_rows == expected
