"""The adapter conformance suite as a base class: subclass :class:`AdapterConformance`, set ``case``, and pytest
collects every check for that architecture.

Tolerance: pruned runs are compared with the unpatched model on the pruned sequence at ``atol = rtol = 1e-4`` in
fp32 (observed differences are ~2e-7: the same kernels on differently shaped inputs). The no-pruning checks are
bit-exact (``torch.equal``).
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import pytest
import torch
from torch import nn

from hieravid.compat import cache_argument, cache_from_output
from hieravid.errors import AdapterError, HieravidError, PlanError
from hieravid.plan import PruningPlan, compile_plan
from hieravid.policy import Policy, load_policy, policy_from_dict
from hieravid.runtime import apply, find_handle
from hieravid.testing.case import AdapterCase
from hieravid.testing.checks import check_realised_counts, hook_snapshot, module_attributes, real_rows
from hieravid.testing.reference import capture_layer_outputs, capture_lm_inputs, reference_run, stage_of_output

__all__ = [
    "ATOL",
    "CALL_VARIANTS",
    "CONFORMANCE_POLICIES",
    "GENERATE_POLICIES",
    "IDENTITY_POLICIES",
    "PRUNING_POLICIES",
    "RTOL",
    "AdapterConformance",
]

ATOL = RTOL = 1e-4


def _inline(name: str, **sections: object) -> Policy:
    return policy_from_dict({"version": 1, "kind": "PruningPolicy", "name": name, **sections})


#: The policies the kit runs: shipped ones by name, plus inline ones that reach the other code paths.
CONFORMANCE_POLICIES: dict[str, Policy] = {
    "none": load_policy("none"),
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
    "hieravid-30": load_policy("hieravid-30"),
    "hieravid-20": load_policy("hieravid-20"),
    "no-frame": load_policy("ablations/no-frame"),
    "no-layer": load_policy("ablations/no-layer"),
    "no-segment": load_policy("ablations/no-segment"),
    # A peer method: FrameFusion's merging input operator (one segment) and an attention top-k stage at layer 2.
    "peer-framefusion": load_policy("peers/framefusion"),
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
#: Policies that must leave the model's outputs bit-identical.
IDENTITY_POLICIES = ("none", "keep-all")
#: Policies that prune (every level, each level off in turn, a peer, every selector family and prune point).
PRUNING_POLICIES = tuple(name for name in CONFORMANCE_POLICIES if name not in IDENTITY_POLICIES)
#: Policies whose cached ``generate`` is checked against a cache-free recomputation.
GENERATE_POLICIES = ("hieravid-30", "no-segment", "after-mlp-uniform-drop-newlines", "random-positive-2rows")
#: What a caller may ask of a forward; the pruned logits must not depend on it.
CALL_VARIANTS: dict[str, dict[str, Any]] = {
    "use_cache=False": dict(use_cache=False),
    "return_dict=False": dict(return_dict=False),
    "output_hidden_states": dict(output_hidden_states=True),
    "output_attentions": dict(output_attentions=True),
    "logits_to_keep=1": dict(logits_to_keep=1),
}
BATCHES = (1, 2)
_BATCH_IDS = ("batch1", "batch2-leftpad")

#: Where a test class keeps its models (one per attention implementation).
_MODELS = pytest.StashKey[dict[str, nn.Module]]()

_Test = TypeVar("_Test", bound=Callable[..., Any])


def _first_attention_only(test: _Test) -> _Test:
    """Run ``test`` on the case's first attention implementation only (it checks no attention kernel)."""
    test._first_attention_only = True  # type: ignore[attr-defined]
    return test


def _eos_ids(model: nn.Module) -> list[int]:
    """The token ids ``generate`` treats as end of sequence (none, one or several)."""
    eos = model.generation_config.eos_token_id
    return [] if eos is None else [eos] if isinstance(eos, int) else list(eos)


class AdapterConformance:
    """The conformance suite for one architecture. Subclass it in a test module and set ``case``::

        from hieravid.testing import AdapterCase, AdapterConformance

        class TestMyAdapter(AdapterConformance):
            case = AdapterCase(name="my_model", model_class=MyModelForConditionalGeneration,
                               config=tiny_config(), sample=one_prompt)

    pytest then runs, per attention implementation of the case: the identity policies bit-identical to the
    unpatched model and ``remove()`` restoring it exactly; every pruning policy equal to :mod:`the reference
    <hieravid.testing.reference>` on the pruned sequence at every decoder layer (batch 1 and a left-padded batch
    of 2), also whatever the caller asks of the forward; cached ``generate`` equal to a cache-free recomputation;
    per-layer KV-cache lengths equal to the realised counts, which match the plan. Once per case: a
    ``save_pretrained`` (safetensors) / ``from_pretrained`` round trip, and a batch equal to each of its samples
    alone. The adapter under test is the one ``hieravid`` resolves for ``case.config.model_type`` (built-in,
    entry point or ``register_adapter``).
    """

    case: ClassVar[AdapterCase]

    def pytest_generate_tests(self, metafunc: pytest.Metafunc) -> None:
        """Parametrise ``attention`` (class-scoped, so each model is built once per implementation)."""
        case = getattr(type(self), "case", None)
        if not isinstance(case, AdapterCase):
            raise HieravidError(
                f"{type(self).__name__}: set the class attribute case = AdapterCase(...) (got {case!r})"
            )
        if "attention" in metafunc.fixturenames:
            first_only = getattr(metafunc.function, "_first_attention_only", False)
            metafunc.parametrize("attention", case.attention[:1] if first_only else case.attention, scope="class")

    # ------------------------------------------------------------------------------------------ fixtures
    @pytest.fixture
    def model(self, request: pytest.FixtureRequest, attention: str) -> nn.Module:
        """The case's tiny model with ``attention``, built once per test class (kept on the class's node)."""
        models = request.node.getparent(pytest.Class).stash.setdefault(_MODELS, {})
        if attention not in models:
            models[attention] = self.case.build_model(attention)
        return models[attention]

    @pytest.fixture(autouse=True)
    def _kit_session(self, model: nn.Module) -> Iterator[None]:
        threads = torch.get_num_threads()
        if self.case.torch_threads is not None:
            torch.set_num_threads(self.case.torch_threads)
        tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # fp32 references
        try:
            yield
        finally:
            while (handle := find_handle(model)) is not None:  # a failed test must not leak into the next
                handle.remove()
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
            torch.set_num_threads(threads)

    def plan(self, model: nn.Module, policy: str) -> PruningPlan | None:
        """``CONFORMANCE_POLICIES[policy]`` compiled for ``model`` seeing the case's single-sample prompts.

        ``None`` when the model refuses the policy's stages (stages before its ``first_stage_layer``, e.g. where
        Qwen3-VL still adds deepstack features, or on its ``recurrent_layers``, e.g. Qwen3.5's linear attention):
        then the planner and ``apply`` (given a plan compiled without that constraint) must both refuse it naming the
        layer, and ``apply`` must leave no handle behind.
        """
        spec = self.case.spec(model)
        chosen = CONFORMANCE_POLICIES[policy]
        unconstrained = compile_plan(chosen, dataclasses.replace(spec, first_stage_layer=0, recurrent_layers=()))
        refused = [
            stage.layer
            for stage in unconstrained.stages
            if stage.layer < spec.first_stage_layer or stage.layer in spec.recurrent_layers
        ]
        if not refused:
            return compile_plan(chosen, spec)
        with pytest.raises(PlanError, match=f"stage at layer {refused[0]}"):
            compile_plan(chosen, spec)
        with pytest.raises((PlanError, AdapterError), match=f"stage at layer {refused[0]}"):
            apply(model, unconstrained)
        assert find_handle(model) is None
        return None

    def _two_samples(self, seed: int, pads: tuple[int, int]) -> dict[str, torch.Tensor]:
        return self.case.inputs(seed=seed, batch=2, pads=pads, frames=self.case.two_sample_frames)

    def _inputs(self, batch: int, seed: int, pads: tuple[int, int]) -> dict[str, torch.Tensor]:
        return self._two_samples(seed, pads) if batch == 2 else self.case.inputs(seed=seed)

    # ------------------------------------------------------------------------------------------ (a)
    @pytest.mark.parametrize("policy", IDENTITY_POLICIES)
    def test_identity_policies_are_bit_identical_and_remove_restores(self, model: nn.Module, policy: str) -> None:
        inputs = self._two_samples(seed=7, pads=(0, 5))
        with torch.no_grad():
            logits = model(**inputs).logits
            generated = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        # transformers installs its own output-capturing hooks lazily on a first call: snapshot afterwards.
        hooks_before = hook_snapshot(model)
        attributes_before = module_attributes(model)
        signature = inspect.signature(model.forward)
        config_before = model.config.to_dict()
        weights_before = {k: v.clone() for k, v in model.state_dict().items()}

        handle = apply(model, self.plan(model, policy))
        assert find_handle(model) is handle
        # The plan is really installed; a plan that prunes nothing needs (and installs) no hook at all.
        assert (hook_snapshot(model) != hooks_before) == handle.plan.prunes
        with torch.no_grad():
            pruned_logits = model(**inputs).logits
            pruned_generated = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        stats = handle.last_request
        layers = len(list(handle.adapter.decoder_layers()))
        handle.remove()

        assert torch.equal(pruned_logits, logits)
        assert torch.equal(pruned_generated, generated)
        if policy == "keep-all":  # the machinery really ran: every layer saw every row
            assert stats.pruned and len(stats.stages) == 2
            assert stats.layer_sequence_lengths == (inputs["input_ids"].shape[1],) * layers
        # remove() restores the model exactly
        assert hook_snapshot(model) == hooks_before
        assert module_attributes(model) == attributes_before
        assert find_handle(model) is None
        assert inspect.signature(model.forward) == signature
        assert "forward" not in vars(model)
        assert model.config.to_dict() == config_before
        assert all(torch.equal(v, weights_before[k]) for k, v in model.state_dict().items())
        with torch.no_grad():
            assert torch.equal(model(**inputs).logits, logits)

    # ------------------------------------------------------------------------------------------ (b)
    @pytest.mark.parametrize("policy", PRUNING_POLICIES)
    @pytest.mark.parametrize("batch", BATCHES, ids=_BATCH_IDS)
    def test_pruned_forward_equals_reference_at_every_layer(self, model: nn.Module, policy: str, batch: int) -> None:
        inputs = self._inputs(batch, seed=11, pads=(0, 7))
        plan = self.plan(model, policy)
        if plan is None:  # refused, as plan() asserts
            return
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
            reference = reference_run(model, adapter, plan, stats, lm_inputs, sample)
            # Layer-0 input: text rows untouched, video rows = the segment operator's merged features.
            first = stats.stage_positions[0][sample]
            assert torch.equal(first[real_rows(first, mask)], reference.input_positions)
            for index, output in enumerate(outputs):
                positions = stats.stage_positions[stage_of_output(plan, index)][sample]
                rows = real_rows(positions, mask)
                assert torch.equal(positions[rows], reference.layer_positions[index]), f"layer {index} rows"
                torch.testing.assert_close(
                    output[sample][rows],
                    reference.layer_outputs[index],
                    atol=ATOL,
                    rtol=RTOL,
                    msg=lambda m, i=index: f"layer {i}: {m}",
                )
            rows = real_rows(stats.output_positions[sample], mask)
            torch.testing.assert_close(logits[sample][rows], reference.logits, atol=ATOL, rtol=RTOL)

    @pytest.mark.parametrize("variant", CALL_VARIANTS)
    @pytest.mark.parametrize("batch", BATCHES, ids=_BATCH_IDS)
    def test_pruned_logits_do_not_depend_on_the_callers_arguments(
        self, model: nn.Module, variant: str, batch: int
    ) -> None:
        """Whatever the caller asks of the forward (no cache, tuples, hidden states, attentions, last logits only),
        the pruned logits equal the reference on the pruned sequence. Without a cache, position-id gaps must not be
        read as packed sequences."""
        inputs = self._inputs(batch, seed=11, pads=(0, 7))
        plan = self.plan(model, "hieravid-30")
        if plan is None:  # refused, as plan() asserts
            return
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
            reference = reference_run(model, adapter, plan, stats, lm_inputs, sample)
            rows = real_rows(stats.output_positions[sample], inputs["attention_mask"][sample])
            expected = reference.logits
            got = logits[sample][rows] if "logits_to_keep" not in options else logits[sample]
            if "logits_to_keep" in options:
                expected = expected[-1:]
            torch.testing.assert_close(got, expected, atol=ATOL, rtol=RTOL)

    # ------------------------------------------------------------------------------------------ (c)
    @pytest.mark.parametrize("policy", GENERATE_POLICIES)
    def test_generate_with_cache_equals_cache_free_recomputation(self, model: nn.Module, policy: str) -> None:
        inputs = self._two_samples(seed=5, pads=(3, 0))
        plan = self.plan(model, policy)
        if plan is None:  # refused, as plan() asserts
            return
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
            reference = reference_run(model, adapter, plan, stats, lm_inputs, sample, extra_ids=generated[:-1])
            step_logits = torch.stack([step[sample] for step in result.logits])
            torch.testing.assert_close(step_logits, reference.logits[-new_tokens:], atol=ATOL, rtol=RTOL)
            # min_new_tokens bars EOS from generate's choice (not from its raw output_logits): bar it here too.
            choices = reference.logits[-new_tokens:].clone()
            choices[:, _eos_ids(model)] = float("-inf")
            assert torch.equal(choices.argmax(-1), generated)

    # ------------------------------------------------------------------------------------------ (d)
    @pytest.mark.parametrize("policy", PRUNING_POLICIES)
    def test_cache_lengths_equal_realised_counts_which_match_the_plan(self, model: nn.Module, policy: str) -> None:
        inputs = self.case.inputs(seed=3)
        plan = self.plan(model, policy)
        if plan is None:  # refused, as plan() asserts
            return
        device = inputs["input_ids"].device
        with apply(model, plan) as handle:
            recurrent = handle.adapter.recurrent_layers()
            with torch.no_grad():
                out = model(**inputs, use_cache=True)
                stats = handle.last_request
                cache = cache_from_output(out)
                # Recurrent (linear-attention) layers keep a fixed-size state, no rows: only attention layers count.
                attention = [index for index in range(len(cache.layers)) if index not in recurrent]
                lengths = [cache.layers[index].keys.shape[-2] for index in attention]
                assert lengths == [stats.layer_sequence_lengths[index] for index in attention]
                assert out.logits.shape[1] == stats.output_positions.shape[1]
                # A decode step appends exactly one row to every layer.
                step = model(
                    input_ids=torch.tensor([[5]], device=device),
                    **cache_argument(model, cache),
                    attention_mask=torch.ones(1, inputs["input_ids"].shape[1] + 1, dtype=torch.long, device=device),
                )
                step_layers = cache_from_output(step).layers
                assert [step_layers[index].keys.shape[-2] for index in attention] == [n + 1 for n in lengths]
        # Segment level exact (⌊ρ0·F·P⌋ merged; FrameFusion at most its ratio); stages within the per-segment
        # rounding (see check_realised_counts).
        check_realised_counts(plan, stats, inputs["input_ids"], input_exact=plan.segment.kind != "framefusion")

    # ------------------------------------------------------------------------------------------ (e)
    @_first_attention_only
    def test_save_pretrained_from_pretrained_apply_generate(
        self, model: nn.Module, attention: str, tmp_path: Path
    ) -> None:
        inputs = self.case.inputs(seed=2)
        plan = self.plan(model, "hieravid-30")
        if plan is None:  # refused, as plan() asserts
            return
        with apply(model, plan):
            with torch.no_grad():
                expected = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        model.save_pretrained(tmp_path)
        assert list(tmp_path.glob("*.safetensors"))
        reloaded = self.case.model_class.from_pretrained(tmp_path, attn_implementation=attention)
        reloaded = reloaded.to(self.case.device).eval()
        with apply(reloaded, plan) as handle:
            with torch.no_grad():
                generated = reloaded.generate(**inputs, max_new_tokens=4, do_sample=False)
            assert handle.last_request.pruned
        assert torch.equal(generated, expected)
        # A shipped policy by name, compiled against the reloaded model's own config, works too.
        with apply(reloaded, "hieravid-30") as handle:
            with torch.no_grad():
                generated = reloaded.generate(**inputs, max_new_tokens=4, do_sample=False)
            assert handle.last_request.pruned and generated.shape == expected.shape

    # ------------------------------------------------------------------------------------------ (f)
    @_first_attention_only
    def test_each_sample_of_a_batch_is_pruned_as_if_alone(self, model: nn.Module) -> None:
        """A left-padded batch of two prompts (different lengths where the case allows) keeps, per sample, the same
        tokens and computes the same logits as the sample alone, unpadded."""
        frames = self.case.two_sample_frames
        batch = self._two_samples(seed=21, pads=(4, 0))
        plan = self.plan(model, "hieravid-30")
        if plan is None:  # refused, as plan() asserts
            return
        with apply(model, plan) as handle:
            with torch.no_grad():
                batched = model(**batch).logits
            batched_stats = handle.last_request
            for sample in range(2):
                single = self.case.inputs(seed=21 + sample, frames=frames[sample : sample + 1])
                mask = batch["attention_mask"][sample].bool()
                assert torch.equal(batch["input_ids"][sample][mask], single["input_ids"][0])
                with torch.no_grad():
                    alone = model(**single).logits
                stats = handle.last_request
                offset = int((~mask).sum())
                for got, want in zip(batched_stats.stages, stats.stages, strict=True):
                    assert torch.equal(got.kept_positions[sample] - offset, want.kept_positions[0])
                rows = real_rows(batched_stats.output_positions[sample], mask)
                torch.testing.assert_close(batched[sample][rows], alone[0], atol=ATOL, rtol=RTOL)
