"""Whole pruned prefills replayed per schedule (``hieravid.runtime.capture``).

With ``HIERAVID_TEST_DEVICE=cuda`` the recorder is a real CUDA graph, and these tests check replays bit-identical
to the eager pruned forward on the GPU. On a CPU an eager stand-in re-runs the recorded prefill on the static
buffers and writes its results into the recorded tensors, as a graph replay does, so everything around the graph —
which calls are captured, how a new request's state reaches the static buffers, how its records, cache and output
come back — is checked against the plain pruned forward on a CPU.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from torch.utils._pytree import tree_leaves

from hieravid.compat import cache_from_output
from hieravid.plan import compile_plan
from hieravid.runtime import apply

POLICIES = Path(__file__).resolve().parents[2] / "policies"


class EagerReplay:
    """Stand-in for :class:`hieravid.runtime.capture.CudaGraph` on a CPU: a replay re-runs the recorded function and
    writes its tensors into those the recording returned."""

    def record(self, fn):
        self.fn = fn
        self.outputs = fn()
        return self.outputs

    def replay(self):
        fresh = self.fn()
        for recorded, value in zip(tree_leaves(self.outputs[:4]), tree_leaves(fresh[:4])):
            recorded.copy_(value)


def _cache_state(cache) -> list[torch.Tensor]:
    """Every tensor the cache's layers hold: key/value rows, or a recurrent layer's conv and recurrent states."""
    tensors = []
    for layer in cache.layers:
        for name in ("keys", "values", "conv_states", "recurrent_states"):
            value = getattr(layer, name, None)
            tensors += list(value.values()) if isinstance(value, dict) else [value]
    return [tensor for tensor in tensors if isinstance(tensor, torch.Tensor)]


def _on_cpu(handle):
    """On a CPU run, the eager stand-in replaces the CUDA graph (``HIERAVID_TEST_DEVICE=cuda`` runs the real one)."""
    graphs = handle._prefill_graphs
    if os.environ.get("HIERAVID_TEST_DEVICE", "cpu") != "cuda":
        graphs.backend = EagerReplay
        graphs.device_types = ("cpu",)
    return graphs


@pytest.mark.parametrize("policy", ["hieravid-30", "hieravid-10", "ablations/frame-topk"])
def test_replayed_prefills_equal_the_eager_pruned_forward(tiny_sdpa, policy):
    case = tiny_sdpa
    plan = compile_plan(POLICIES / f"{policy}.yaml", case.spec(frames=64))
    first, second = case.inputs(seed=1), case.inputs(seed=2)  # one shape (one schedule when the counts agree)
    with apply(case.model, plan) as handle, torch.no_grad():
        expected = {seed: case.model(**inputs) for seed, inputs in ((1, first), (2, first), (3, second))}
        stats = handle.last_request
        expected_stats = {}
        for seed, inputs in ((1, first), (3, second)):
            case.model(**inputs)
            expected_stats[seed] = handle.last_request
        expected_generation = case.model.generate(**first, max_new_tokens=4, do_sample=False)
    assert stats.pruned
    with apply(case.model, plan, cuda_graphs=True) as handle, torch.no_grad():
        graphs = _on_cpu(handle)
        outputs = [case.model(**first) for _ in range(3)]  # eager (first sight), capture + replay, replay
        assert (graphs.captures, graphs.replays) == (1, 2)
        replayed_stats = handle.last_request
        other = case.model(**second)
        other_stats = handle.last_request
        same_schedule = graphs.replays == 3
        generation = case.model.generate(**first, max_new_tokens=4, do_sample=False)
    for output in outputs:
        assert torch.equal(output.logits, expected[1].logits)
        states = _cache_state(cache_from_output(output)), _cache_state(cache_from_output(expected[1]))
        assert [tensor.shape for tensor in states[0]] == [tensor.shape for tensor in states[1]]
        assert all(torch.equal(a, b) for a, b in zip(*states))
    assert torch.equal(other.logits, expected[3].logits)
    assert torch.equal(generation, expected_generation)
    for got, want in ((replayed_stats, expected_stats[1]), (other_stats, expected_stats[3])):
        assert got.layer_sequence_lengths == want.layer_sequence_lengths
        assert got.layer_video_tokens == want.layer_video_tokens
        for a, b in zip(got.stages, want.stages):
            assert a.budgets == b.budgets and all(torch.equal(x, y) for x, y in zip(a.kept_positions, b.kept_positions))
        assert all(torch.equal(a, b) for a, b in zip(got.stage_positions, want.stage_positions))
    assert same_schedule or other_stats.stages[0].budgets != replayed_stats.stages[0].budgets


def test_calls_that_cannot_be_captured_run_eagerly(tiny_llava):
    case = tiny_llava
    plan = compile_plan(POLICIES / "hieravid-30.yaml", case.spec())
    padded = case.inputs(batch=2, pads=(0, 4), seed=1)
    plain = case.inputs(seed=1)
    with apply(case.model, plan, cuda_graphs=True) as handle, torch.no_grad():
        graphs = _on_cpu(handle)
        for _ in range(3):
            case.model(**padded)  # padding: masks are built on the fly
            case.model(**plain, use_cache=False)  # no cache to fill
            case.model(**plain, output_hidden_states=True)
        assert (graphs.captures, graphs.replays) == (0, 0)


class CapturingEagerReplay(EagerReplay):
    """:class:`EagerReplay` run as under a capturing CUDA stream, as transformers sees it: some versions then build
    a dense causal mask even for an unpadded prompt (5.17 does; 5.24 does not)."""

    def __init__(self, monkeypatch):
        self.monkeypatch = monkeypatch

    def _capturing(self, fn):
        from transformers.utils import import_utils

        with self.monkeypatch.context() as patch:
            patch.setattr(import_utils, "is_cuda_stream_capturing", lambda: True)
            return fn()

    def record(self, fn):
        self.fn = lambda: self._capturing(fn)
        self.outputs = self.fn()
        return self.outputs


def test_a_language_model_that_takes_one_mask_tensor_is_captured_with_the_eager_masks(tiny_llava, monkeypatch):
    """Llama-style decoders take one mask tensor, built by transformers inside the recording: every layer gets None
    there, as in the eager unpadded prefill, so the recorded attention runs the eager (causal) kernel. A dense mask
    gives other bits on a GPU, and on a CPU the replay would then differ from the eager forward too."""
    import dataclasses

    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration

    data = tiny_llava.model.config.to_dict()
    data["text_config"]["model_type"] = "llama"
    torch.manual_seed(0)
    model = LlavaOnevisionForConditionalGeneration._from_config(
        LlavaOnevisionConfig.from_dict(data), attn_implementation="sdpa"
    )
    model = model.to(tiny_llava.model.device).eval()
    assert type(model.model.language_model).__name__ == "LlamaModel"
    case = dataclasses.replace(tiny_llava, model=model)
    plan = compile_plan(POLICIES / "hieravid-30.yaml", case.spec())
    inputs = case.inputs(seed=1)
    with apply(model, plan) as handle, torch.no_grad():
        expected = model(**inputs).logits
    seen = []

    def record_mask(module, args, kwargs):
        seen.append(kwargs.get("attention_mask"))

    with apply(model, plan, cuda_graphs=True) as handle, torch.no_grad():
        graphs = _on_cpu(handle)
        if graphs.backend is EagerReplay:
            graphs.backend = lambda: CapturingEagerReplay(monkeypatch)
        hook = model.model.language_model.layers[0].register_forward_pre_hook(record_mask, with_kwargs=True)
        try:
            outputs = [model(**inputs).logits for _ in range(3)]
        finally:
            hook.remove()
        assert (graphs.captures, graphs.replays) == (1, 2)
    assert all(torch.equal(output, expected) for output in outputs)
    assert seen and all(mask is None for mask in seen)


def test_a_schedule_whose_eager_layers_got_a_mask_is_never_captured(tiny_llava):
    """The recording gives every decoder layer no mask, as the eager unpadded prefill does; a schedule whose eager run
    gave some layer a mask (here a hook of the user's, standing for e.g. a sliding window) stays eager."""
    model = tiny_llava.model
    plan = compile_plan(POLICIES / "hieravid-30.yaml", tiny_llava.spec())
    inputs = tiny_llava.inputs(seed=1)

    def explicit_mask(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        rows = hidden.shape[1]
        causal = torch.ones(rows, rows, dtype=torch.bool, device=hidden.device).tril()
        kwargs["attention_mask"] = causal[None, None].expand(hidden.shape[0], 1, rows, rows)
        return args, kwargs

    layer = model.model.language_model.layers[1]
    with apply(model, plan) as handle, torch.no_grad():
        plain = model(**inputs).logits
        hook = layer.register_forward_pre_hook(explicit_mask, with_kwargs=True)
        try:
            expected = model(**inputs).logits
        finally:
            hook.remove()
    with apply(model, plan, cuda_graphs=True) as handle, torch.no_grad():
        graphs = _on_cpu(handle)
        hook = layer.register_forward_pre_hook(explicit_mask, with_kwargs=True)
        try:
            outputs = [model(**inputs).logits for _ in range(3)]
        finally:
            hook.remove()
        assert (graphs.captures, graphs.replays) == (0, 0)
        later = [model(**inputs).logits for _ in range(2)]  # the hook gone, the schedule stays eager: it was masked
        assert (graphs.captures, graphs.replays) == (0, 0)
    assert all(torch.equal(output, expected) for output in outputs)
    assert all(torch.equal(output, plain) for output in later)


def test_removal_restores_the_language_models_forward(tiny_llava):
    model = tiny_llava.model
    language_model = model.model.language_model
    plan = compile_plan(POLICIES / "hieravid-30.yaml", tiny_llava.spec())
    assert "forward" not in vars(language_model)
    with apply(model, plan, cuda_graphs=True) as handle:
        assert "forward" in vars(language_model)
        assert [speedup.name for speedup in handle.speedups][-1] == "prefill-cuda-graphs"
    assert "forward" not in vars(language_model)


def test_qwen3_vl_prefills_run_eagerly_with_transformers_deepstack_step(tiny_builders):
    """Without the adapter's speedups, Qwen3-VL's text model adds its deepstack rows through transformers' boolean-mask
    index (a host sync): with ``cuda_graphs=True`` its prefills are then never captured and equal the eager pruned
    forward."""
    case = tiny_builders.tiny_case("qwen3_vl", "sdpa")
    plan = compile_plan(POLICIES / "hieravid-30.yaml", case.spec())
    inputs = case.inputs(seed=1)
    with apply(case.model, plan, speedups="none") as handle, torch.no_grad():
        expected = case.model(**inputs).logits
    with apply(case.model, plan, cuda_graphs=True, speedups="none") as handle, torch.no_grad():
        graphs = _on_cpu(handle)
        outputs = [case.model(**inputs).logits for _ in range(3)]
        assert (graphs.captures, graphs.replays) == (0, 0) and handle.last_request.pruned
    assert all(torch.equal(output, expected) for output in outputs)
