"""Limits that depend on the prompt are checked before any decoder layer runs (issue 17.6).

``relevance.query_rows`` averages the attention of the last prompt rows: a prompt needs that many rows after its
video. A prompt with fewer fails with a clear error before layer 0, and the failed call leaves nothing behind: the
same handle then prunes a prompt that has enough rows, and removing it restores the model.
"""

from __future__ import annotations

import pytest
import torch

from hieravid.adapters.registry import get_adapter
from hieravid.errors import AdapterError
from hieravid.plan import compile_plan
from hieravid.policy import policy_from_dict
from hieravid.runtime import apply

QUERY_64 = policy_from_dict(
    {"version": 1, "kind": "PruningPolicy", "name": "query-64", "frame": {"relevance": {"query_rows": 64}}}
)


def _with_longer_tail(case, inputs: dict, extra: int) -> dict:
    """The same request with ``extra`` more text tokens after the video (the question grows)."""
    tail = torch.randint(3, 200, (inputs["input_ids"].shape[0], extra), generator=torch.Generator().manual_seed(1))
    out = dict(inputs)
    out["input_ids"] = torch.cat([inputs["input_ids"], tail.to(case.device)], dim=1)
    out["attention_mask"] = torch.cat([inputs["attention_mask"], torch.ones_like(tail).to(case.device)], dim=1)
    if "mm_token_type_ids" in inputs:
        out["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(tail).to(case.device)], 1)
    return out


def _snapshot(model):
    return {name: (tuple(m._forward_hooks), tuple(m._forward_pre_hooks)) for name, m in model.named_modules()}


def test_too_many_query_rows_fail_before_any_layer_and_leave_nothing_behind(tiny_sdpa):
    case = tiny_sdpa
    model = case.model
    inputs = case.inputs(seed=51)
    longer = _with_longer_tail(case, inputs, 64)
    with torch.no_grad():
        model(**inputs)  # transformers installs its lazy hooks on a first call
        expected = model(**inputs).logits
    layer_calls = []
    first_layer = get_adapter(model.config.model_type)(model).decoder_layers()[0]
    counting = first_layer.register_forward_pre_hook(lambda module, args: layer_calls.append(1))
    before = _snapshot(model)
    try:
        handle = apply(model, compile_plan(QUERY_64, case.spec()))
        # Rows after the video in these prompts (Qwen: <|vision_end|> too; InternVL: the last frame's </img>).
        after = 7 if case.is_qwen or case.is_internvl else 6
        with torch.no_grad():
            with pytest.raises(AdapterError) as caught:
                model(**inputs)
            assert not layer_calls
            message = str(caught.value)
            assert "last 64 prompt rows (relevance.query_rows)" in message
            assert f"only {after} rows follow the video" in message and "lower relevance.query_rows" in message
            with pytest.raises(AdapterError, match=r"relevance\.query_rows"):
                model.generate(**inputs, max_new_tokens=2, do_sample=False)
            assert not layer_calls
            # The failed calls left no state: the same handle prunes a prompt with enough rows after its video.
            model(**longer)
            stats = handle.last_request
            assert stats.pruned and stats.stages[0].video_tokens_after[0] < stats.stages[0].video_tokens_before[0]
        assert layer_calls  # the counter sees the pruned call
        handle.remove()
        assert _snapshot(model) == before
    finally:
        counting.remove()
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, expected)


def test_apply_takes_a_shipped_policy_by_name(tiny_llava):
    with apply(tiny_llava.model, "hieravid-30") as handle, torch.no_grad():
        tiny_llava.model(**tiny_llava.inputs(seed=52))
        assert handle.plan.policy.name == "hieravid-30" and handle.last_request.pruned
