"""Compiled generation with hieravid applied: static caches, torch.compile, no recompilation.

Each layer's static cache holds its kept rows (per-layer fill counters), decode steps write at each layer's own next
slot and keep the original positions, and a continuation step reads no host value that changes from step to step:
after a warm-up request, a second request of the same shape runs with ``torch._dynamo.config.error_on_recompile``.
After a pruned prefill every layer of the static cache is right-sized (its kept rows, bucketed, plus the decode
slots), so that compiled decode steps attend over what each layer kept only.
On a CPU the ``aot_eager`` backend traces exactly what a GPU backend would compile.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from hieravid.compat import cache_argument, cache_from_output
from hieravid.plan import compile_plan
from hieravid.runtime import apply
from hieravid.runtime.engine import REQUEST_ATTRIBUTE
from hieravid.runtime.masks import CAPACITY_HEADROOM_BUCKETS, static_capacity

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
    ("llava_next_video", "hieravid-30", 1),
    ("qwen3_vl", "hieravid-30", 1),
    ("internvl", "hieravid-30", 1),
    ("qwen3_5", "hieravid-30", 1),
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


def _assert_right_sized(output, stats, prompt_length: int) -> None:
    """Every layer of the first pruned request of its shape holds its kept rows (bucketed, with the headroom that
    later requests of the shape may need) plus the decode slots, and its fill counter says the kept rows and the
    decode tokens were written there."""
    cache = cache_from_output(output)
    full = getattr(cache, REQUEST_ATTRIBUTE).static.full_capacity
    assert full is not None and full >= prompt_length + NEW_TOKENS - 1
    new_slots = full - prompt_length
    for layer, kept in zip(cache.layers, stats.layer_sequence_lengths, strict=True):
        if not hasattr(layer, "max_cache_len"):  # a linear-attention layer (Qwen3.5): a fixed-size state, no rows
            continue
        capacity = static_capacity(kept, prompt_length, new_slots, CAPACITY_HEADROOM_BUCKETS)
        assert kept + new_slots <= capacity < full
        assert layer.keys.shape[-2] == layer.values.shape[-2] == layer.max_cache_len == capacity
        assert layer.get_mask_sizes(1) == (capacity, 0)
        assert int(layer.cumulative_length) == kept + NEW_TOKENS - 1


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
            _assert_right_sized(eager, stats, inputs["input_ids"].shape[1])
        else:  # nothing pruned: transformers' cache as it made it
            layers = cache_from_output(eager).layers
            assert len({layer.keys.shape[-2] for layer in layers if hasattr(layer, "max_cache_len")}) == 1
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
                position = torch.full((1, 1), length + step, dtype=torch.long, device=token.device)
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


def _decode_by_hand(model, inputs, cache) -> list[int]:
    """Greedy tokens of a prefill into ``cache`` and ``NEW_TOKENS - 1`` eager decode steps (LLaVA positions)."""
    length = inputs["input_ids"].shape[1]
    with torch.no_grad():
        out = model(**inputs, **cache_argument(model, cache), use_cache=True)
        token = out.logits[:, -1:].argmax(-1)
        tokens = [int(token)]
        for step in range(NEW_TOKENS - 1):
            position = torch.full((1, 1), length + step, dtype=torch.long, device=token.device)
            out = model(input_ids=token, position_ids=position, **cache_argument(model, cache), use_cache=True)
            token = out.logits[:, -1:].argmax(-1)
            tokens.append(int(token))
    return tokens


@pytest.mark.slow
def test_consecutive_requests_of_other_lengths_and_a_reused_static_cache(fresh_dynamo, tiny_builders):
    """Each compiled request right-sizes its own static cache (prompts of other lengths, one after the other), and a
    static cache the caller empties (``reset()``) and reuses for a longer prompt is sized for it again."""
    from transformers import StaticCache

    case = tiny_builders.tiny_case("llava_onevision")
    model = case.model
    plan = compile_plan(POLICIES / "hieravid-30.yaml", case.spec(frames=64))
    short, long = case.inputs(seed=6, frames=(5,)), case.inputs(seed=7)
    assert short["input_ids"].shape[1] < long["input_ids"].shape[1]
    with apply(model, plan) as handle:
        for inputs in (short, long):
            eager = _generate(model, inputs, disable_compile=True)
            _assert_right_sized(eager, handle.last_request, inputs["input_ids"].shape[1])
            compiled = _generate(model, inputs, compile_config=_compile_config())
            assert torch.equal(compiled.sequences, eager.sequences)
            for a, b in zip(compiled.logits, eager.logits):
                torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)
        capacity = long["input_ids"].shape[1] + NEW_TOKENS
        reused = StaticCache(config=model.config, max_cache_len=capacity)
        _decode_by_hand(model, short, reused)
        assert max(layer.max_cache_len for layer in reused.layers) < capacity  # right-sized for the short prompt
        reused.reset()
        again = _decode_by_hand(model, long, reused)
        stats = handle.last_request  # a new pruned prefill, not a turn
        assert stats.pruned and stats.prompt_length == long["input_ids"].shape[1]
        fresh = _decode_by_hand(model, long, StaticCache(config=model.config, max_cache_len=capacity))
    assert again == fresh


def test_a_static_cache_that_cannot_be_right_sized_keeps_every_slot(tiny_builders):
    """A cache of a kind the resize does not know (here one sliding-window layer wider than the cache, which
    attends like a full one) keeps transformers' sizes, and decodes as a right-sized cache does."""
    from transformers import StaticCache
    from transformers.cache_utils import StaticSlidingWindowLayer

    case = tiny_builders.tiny_case("llava_onevision")
    model = case.model
    inputs = case.inputs(seed=8)
    capacity = inputs["input_ids"].shape[1] + NEW_TOKENS
    plan = compile_plan(POLICIES / "hieravid-30.yaml", case.spec(frames=64))
    mixed = StaticCache(config=model.config, max_cache_len=capacity)
    mixed.layers[1] = StaticSlidingWindowLayer(max_cache_len=capacity, sliding_window=capacity + 1)
    with apply(model, plan) as handle:
        expected = _decode_by_hand(model, inputs, StaticCache(config=model.config, max_cache_len=capacity))
        tokens = _decode_by_hand(model, inputs, mixed)
        assert handle.last_request.pruned
    assert tokens == expected
    assert [layer.keys.shape[-2] for layer in mixed.layers] == [capacity] * len(mixed.layers)


@pytest.mark.slow
@pytest.mark.parametrize(("architecture", "policy"), [("llava_onevision", "hieravid-30"), ("qwen2_vl", "hieravid-10")])
def test_bound_capacities_are_the_shapes_own_so_no_content_recompiles(
    fresh_dynamo, tiny_builders, architecture, policy
):
    """``static_capacity="bound"``: every request of a shape gets the same capacities — the most rows any content can
    keep under the plan, which no request exceeds — so the compiled decode step never recompiles for the shape, even
    for content the first request's headroom would not cover. Compiled tokens still equal eager ones."""
    from hieravid.runtime.masks import most_rows

    case = tiny_builders.tiny_case(architecture)
    model = case.model
    plan = compile_plan(POLICIES / f"{policy}.yaml", case.spec(frames=64))
    requests = [case.inputs(seed=seed) for seed in (3, 4, 5, 6)]
    capacities, realised = [], []
    with apply(model, plan, static_capacity="bound") as handle:
        for index, inputs in enumerate(requests):
            eager = _generate(model, inputs, disable_compile=True)
            request = getattr(cache_from_output(eager), REQUEST_ATTRIBUTE)
            layers = [layer for layer in cache_from_output(eager).layers if hasattr(layer, "max_cache_len")]
            capacities.append([layer.max_cache_len for layer in layers])
            realised.append(handle.last_request.layer_sequence_lengths)
            most = most_rows(request, plan.stages)
            assert all(kept <= bound for kept, bound in zip((c.length for c in request.coords), most))
            if index == 0:  # the bound is the shape's, whatever the content
                first_most = most
            assert most == first_most
            torch._dynamo.config.error_on_recompile = index > 0  # the first request compiles
            compiled = _generate(model, inputs, compile_config=_compile_config())
            torch._dynamo.config.error_on_recompile = False
            assert torch.equal(compiled.sequences, eager.sequences)
    assert len({tuple(lengths) for lengths in realised}) > 1  # the content moved the counts
    assert all(capacity == capacities[0] for capacity in capacities)
    for lengths in realised:
        assert all(kept + NEW_TOKENS - 1 <= capacity for kept, capacity in zip(lengths, capacities[0]))


def test_an_unknown_static_capacity_is_refused_before_any_hook(tiny_llava):
    model = tiny_llava.model
    plan = compile_plan(POLICIES / "hieravid-30.yaml", tiny_llava.spec())
    with pytest.raises(ValueError, match=r"static_capacity must be one of 'observed', 'bound', got 'largest'"):
        apply(model, plan, static_capacity="largest")
    assert not model.model.language_model._forward_pre_hooks
