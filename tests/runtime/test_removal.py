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


def test_a_pruned_cache_refuses_the_unpruned_model_after_removal(tiny_sdpa):
    case = tiny_sdpa
    inputs = case.inputs(seed=41)
    with apply(case.model, compile_plan(HIERAVID_30, case.spec())) as handle:
        with torch.no_grad():
            first = case.model.generate(**inputs, max_new_tokens=2, do_sample=False, return_dict_in_generate=True)
        assert handle.last_request.pruned
        cache = cache_from_output(first)
        seen = first.sequences.shape[1] - 1
        if not case.is_qwen:  # the silent case of 17.4: layers of different lengths
            assert len({layer.keys.shape[-2] for layer in cache.layers}) > 1
        # Continuing while the handle is installed works.
        _continue(case, cache, seen)
        seen += 2 + 1
    lengths = [layer.keys.shape[-2] for layer in cache.layers]
    with pytest.raises(AdapterError, match="pruned by a hieravid handle that has since been removed"):
        _continue(case, cache, seen)
    with pytest.raises(AdapterError, match="prefill the prompt again"), torch.no_grad():
        case.model(
            input_ids=torch.tensor([[5]], device=case.device),
            attention_mask=torch.ones(1, seen + 1, dtype=torch.long, device=case.device),
            **cache_argument(case.model, cache),
        )
    assert [layer.keys.shape[-2] for layer in cache.layers] == lengths  # nothing was written
    # A new handle refuses it too, and the model itself runs unpruned as before.
    with apply(case.model, compile_plan(HIERAVID_30, case.spec())):
        with pytest.raises(AdapterError):
            _continue(case, cache, seen)
    with torch.no_grad():
        expected = case.model.generate(**inputs, max_new_tokens=3, do_sample=False)
        again = case.model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert torch.equal(expected, again)


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
