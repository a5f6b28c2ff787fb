"""Compiled generation with hieravid applied: static caches, torch.compile, no recompilation.

Each layer's static cache holds its kept rows (per-layer fill counters), decode steps write at each layer's own next
slot and keep the original positions, and a continuation step reads no host value that changes from step to step:
after a warm-up request, a second request of the same shape runs with ``torch._dynamo.config.error_on_recompile``.
On a CPU the ``aot_eager`` backend traces exactly what a GPU backend would compile.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from hieravid.plan import compile_plan
from hieravid.runtime import apply

POLICIES = Path(__file__).resolve().parents[2] / "policies"
NEW_TOKENS = 5

#: (architecture, policy, batch): every adapter, and every shipped HieraVid policy on one of them; batch 2 is
#: left-padded (padding slots and masked rows in every system).
CASES = [
    ("llava_onevision", "none", 1),
    ("llava_onevision", "hieravid-30", 1),
    ("llava_onevision", "hieravid-20", 1),
    ("llava_onevision", "hieravid-10", 1),
    ("llava_video_per_row", "hieravid-10", 2),
    ("qwen2_vl", "none", 1),
    ("qwen2_vl", "hieravid-30", 2),
    ("qwen2_5_vl", "hieravid-30", 1),
]


def _compile_config():
    from transformers import CompileConfig

    config = CompileConfig(backend="aot_eager", fullgraph=True)
    config._compile_all_devices = True  # transformers compiles on CUDA only unless asked
    return config


def _generate(model, inputs, **options):
    with torch.no_grad():
        return model.generate(
            **inputs,
            max_new_tokens=NEW_TOKENS,
            do_sample=False,
            cache_implementation="static",
            output_logits=True,
            return_dict_in_generate=True,
            **options,
        )


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.config.error_on_recompile = False
    torch._dynamo.reset()


@pytest.mark.slow
@pytest.mark.parametrize(("architecture", "policy", "batch"), CASES)
def test_compiled_static_generation_equals_eager_and_never_recompiles(
    fresh_dynamo, tiny_builders, architecture, policy, batch
):
    case = tiny_builders.tiny_case(architecture)
    model = case.model
    # Planned at 64 frames so that every stage of hieravid-10 keeps a token (the engine counts the real video).
    plan = compile_plan(POLICIES / f"{policy}.yaml", case.spec(frames=64))
    frames = (8, 6) if case.is_qwen and batch == 2 else None
    inputs = case.inputs(batch=batch, pads=(0, 5)[:batch], frames=frames, seed=3)
    other = case.inputs(batch=batch, pads=(0, 5)[:batch], frames=frames, seed=4)  # same shape, other content
    with apply(model, plan) as handle:
        dynamic = model.generate(
            **inputs, max_new_tokens=NEW_TOKENS, do_sample=False, output_logits=True, return_dict_in_generate=True
        )
        eager = _generate(model, inputs, disable_compile=True)
        if plan.prunes:
            stats = handle.last_request
            assert stats.pruned and len(stats.stages) == len(plan.stages)
        compiled = _generate(model, inputs, compile_config=_compile_config())  # warm-up: compiles
        torch._dynamo.config.error_on_recompile = True
        again = _generate(model, other, compile_config=_compile_config())
        torch._dynamo.config.error_on_recompile = False
        other_eager = _generate(model, other, disable_compile=True)
    # The static cache (per-layer fill counters, masks built from them) gives what the dynamic cache gives.
    assert torch.equal(eager.sequences, dynamic.sequences)
    for a, b in zip(eager.logits, dynamic.logits):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)
    # Compiled decode equals eager decode (the compiler reorders float operations: within the tolerance).
    assert torch.equal(compiled.sequences, eager.sequences)
    assert torch.equal(again.sequences, other_eager.sequences)
    for a, b in zip(compiled.logits, eager.logits):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)
    if policy == "none":  # and with nothing to prune, the compiled model is bit for bit the unpatched compiled model
        unpatched = _generate(model, inputs, compile_config=_compile_config())
        assert all(torch.equal(a, b) for a, b in zip(compiled.logits, unpatched.logits))


@pytest.mark.slow
def test_a_compiled_forward_decodes_a_pruned_static_cache_with_fullgraph(fresh_dynamo, tiny_builders):
    """``torch.compile(model.forward, fullgraph=True)`` driving decode steps by hand: no graph break in any hook,
    no recompilation after the first step, the same tokens as the eager forward."""
    from transformers import StaticCache

    case = tiny_builders.tiny_case("llava_onevision")
    model = case.model
    inputs = case.inputs(seed=5)
    length = inputs["input_ids"].shape[1]
    plan = compile_plan(POLICIES / "hieravid-30.yaml", case.spec(frames=64))

    def decode(forward) -> list[int]:
        cache = StaticCache(config=model.config, max_cache_len=length + NEW_TOKENS)
        with torch.no_grad():
            out = model(**inputs, past_key_values=cache, use_cache=True)
            token = out.logits[:, -1:].argmax(-1)
            tokens = [int(token)]
            for step in range(NEW_TOKENS - 1):
                position = torch.full((1, 1), length + step, dtype=torch.long)
                out = forward(input_ids=token, position_ids=position, past_key_values=cache, use_cache=True)
                token = out.logits[:, -1:].argmax(-1)
                tokens.append(int(token))
        return tokens

    with apply(model, plan):
        eager = decode(model.forward)
        compiled_forward = torch.compile(model.forward, backend="aot_eager", fullgraph=True)
        first = decode(compiled_forward)
        torch._dynamo.config.error_on_recompile = True
        second = decode(compiled_forward)
    assert first == eager and second == eager
