"""After ``handle.remove()`` a KV cache that holds a pruned prompt refuses to be continued (issue 17.4).

Its layers hold different rows (LLaVA: different lengths) and its positions are not its length, so the unpruned model
would continue it silently and wrongly; a new handle already refused it. Caches of unpruned requests, and the model
itself, are untouched.
"""

from __future__ import annotations

import gc
from pathlib import Path

import pytest
import torch

from hieravid.compat import cache_argument, cache_from_output
from hieravid.errors import AdapterError
from hieravid.plan import compile_plan
from hieravid.runtime import apply
from hieravid.runtime.masks import row_lengths

ROOT = Path(__file__).resolve().parents[2]
HIERAVID_30 = ROOT / "policies" / "hieravid-30.yaml"
NONE = ROOT / "policies" / "none.yaml"


def _continue(case, cache, prompt_length: int, new_tokens: int = 2):
    """``generate`` continuing ``cache`` with two new tokens (mask in original coordinates)."""
    new_ids = torch.tensor([[17, 18]], device=case.device)
    mask = torch.ones(1, prompt_length + new_ids.shape[1], dtype=torch.long, device=case.device)
    with torch.no_grad():
        return case.model.generate(
            input_ids=new_ids,
            attention_mask=mask,
            **cache_argument(case.model, cache),
            max_new_tokens=new_tokens,
            do_sample=False,
            return_dict_in_generate=True,
        )


def _recurrent_states(cache) -> list[torch.Tensor]:
    """The conv and recurrent states of the cache's linear-attention layers (none on attention-only models)."""
    return [
        tensor
        for layer in cache.layers
        for states in (getattr(layer, "conv_states", {}), getattr(layer, "recurrent_states", {}))
        for tensor in states.values()
        if tensor is not None
    ]


def test_a_pruned_cache_refuses_the_unpruned_model_after_removal(tiny_sdpa):
    case = tiny_sdpa
    inputs = case.inputs(seed=41)
    with apply(case.model, compile_plan(HIERAVID_30, case.spec())) as handle:
        with torch.no_grad():
            first = case.model.generate(**inputs, max_new_tokens=2, do_sample=False, return_dict_in_generate=True)
        assert handle.last_request.pruned
        position_rows = handle.adapter.position_rows
        cache = cache_from_output(first)
        seen = first.sequences.shape[1] - 1
        if not case.is_qwen:  # the silent case of 17.4: layers of different lengths
            assert len({layer.keys.shape[-2] for layer in cache.layers}) > 1
        # Continuing while the handle is installed works.
        _continue(case, cache, seen)
        seen += 2 + 1
    lengths = row_lengths(cache)  # recurrent layers (Qwen3.5) hold states, not rows: their states are checked too
    states = [tensor.clone() for tensor in _recurrent_states(cache)]
    with pytest.raises(AdapterError, match="pruned by a hieravid handle that has since been removed"):
        _continue(case, cache, seen)
    # Explicit positions: Qwen3.5's own forward derives one position per mask column from a cache, which fails on
    # one new row before any layer writes to the cache (unpruned caches too).
    position = torch.full((1, 1), seen, device=case.device)
    with pytest.raises(AdapterError, match="prefill the prompt again"), torch.no_grad():
        case.model(
            input_ids=torch.tensor([[5]], device=case.device),
            attention_mask=torch.ones(1, seen + 1, dtype=torch.long, device=case.device),
            position_ids=position.expand(position_rows, 1, 1) if position_rows else position,
            **cache_argument(case.model, cache),
        )
    assert row_lengths(cache) == lengths  # nothing was written
    assert all(torch.equal(a, b) for a, b in zip(_recurrent_states(cache), states, strict=True))
    # A new handle refuses it too, and the model itself runs unpruned as before.
    with apply(case.model, compile_plan(HIERAVID_30, case.spec())):
        with pytest.raises(AdapterError, match="layers of different lengths"):
            _continue(case, cache, seen)
    with torch.no_grad():
        expected = case.model.generate(**inputs, max_new_tokens=3, do_sample=False)
        again = case.model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert torch.equal(expected, again)


def test_a_handle_continues_an_unpruned_cache_it_did_not_fill_unpruned(tiny_sdpa):
    """A cache the plain model filled (every attention layer the same length; recurrent layers hold no rows) is
    continued as the plain model would, not refused and not pruned."""
    case = tiny_sdpa
    inputs = case.inputs(seed=44)
    with torch.no_grad():
        plain = case.model.generate(**inputs, max_new_tokens=2, do_sample=False, return_dict_in_generate=True)
        again = case.model.generate(**inputs, max_new_tokens=2, do_sample=False, return_dict_in_generate=True)
    seen = plain.sequences.shape[1] - 1
    expected = _continue(case, cache_from_output(plain), seen).sequences
    with apply(case.model, compile_plan(HIERAVID_30, case.spec())) as handle:
        continued = _continue(case, cache_from_output(again), seen).sequences
        assert handle.last_request is None  # no prefill of this handle: nothing was pruned
    assert torch.equal(continued, expected)


def test_unpruned_caches_are_untouched_and_caches_are_not_kept_alive(tiny_llava):
    case = tiny_llava
    inputs = case.inputs(seed=42)
    with torch.no_grad():
        plain = case.model.generate(**inputs, max_new_tokens=2, do_sample=False, return_dict_in_generate=True)
    plain_cache = cache_from_output(plain)
    with apply(case.model, compile_plan(HIERAVID_30, case.spec())) as handle:
        with torch.no_grad():
            pruned = case.model.generate(**inputs, max_new_tokens=2, do_sample=False, return_dict_in_generate=True)
            without_video = case.model.generate(
                **case.inputs(seed=42, video=False), max_new_tokens=2, do_sample=False, return_dict_in_generate=True
            )
        assert len(handle._pruned_caches) == 1  # only the pruned one; weakly
        pruned_cache = cache_from_output(pruned)
    # A cache filled without pruning (no video, or before apply) continues as usual after removal.
    _continue(case, plain_cache, plain.sequences.shape[1] - 1)
    _continue(case, cache_from_output(without_video), without_video.sequences.shape[1] - 1)
    with pytest.raises(AdapterError):
        _continue(case, pruned_cache, pruned.sequences.shape[1] - 1)
    # The handle holds caches weakly: dropping them frees them.
    with apply(case.model, compile_plan(HIERAVID_30, case.spec())) as handle:
        with torch.no_grad():
            case.model.generate(**inputs, max_new_tokens=2, do_sample=False)
        gc.collect()
        assert len(handle._pruned_caches) == 0


def test_a_plan_that_prunes_nothing_leaves_caches_alone(tiny_llava):
    case = tiny_llava
    inputs = case.inputs(seed=43)
    with apply(case.model, NONE), torch.no_grad():
        out = case.model.generate(**inputs, max_new_tokens=2, do_sample=False, return_dict_in_generate=True)
    continued = _continue(case, cache_from_output(out), out.sequences.shape[1] - 1)
    assert continued.sequences.shape[1] == 4
