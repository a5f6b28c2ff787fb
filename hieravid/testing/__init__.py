"""The adapter author's conformance kit: the suite every built-in adapter passes, for any adapter.

    from hieravid.testing import AdapterCase, AdapterConformance

    class TestMyAdapter(AdapterConformance):
        case = AdapterCase(name="my_model", model_class=MyModelForConditionalGeneration,
                           config=tiny_config(), sample=one_prompt)

``pytest`` then collects every check of :class:`~hieravid.testing.conformance.AdapterConformance` for the
architecture (see its docstring and ``docs/testing.md``). The kit needs ``pytest`` (the ``dev`` extra) and
transformers model code; ``import hieravid`` never imports it. Its parts:

* :mod:`hieravid.testing.case`: :class:`AdapterCase` (a tiny model and prompts with a video) and
  :func:`left_padded_batch`;
* :mod:`hieravid.testing.reference`: the unpatched model run layer by layer on a pruned sequence (torch only);
* :mod:`hieravid.testing.checks`: the realised token counts against a plan, hook and attribute snapshots;
* :mod:`hieravid.testing.conformance`: :class:`AdapterConformance` and the policies it runs.

Names are imported lazily, so ``hieravid.testing.reference`` loads without pytest.
"""

from __future__ import annotations

from hieravid._lazy import lazy_exports

_EXPORTS: dict[str, str] = {
    "AdapterCase": "hieravid.testing.case",
    "SampleBuilder": "hieravid.testing.case",
    "left_padded_batch": "hieravid.testing.case",
    "AdapterConformance": "hieravid.testing.conformance",
    "CONFORMANCE_POLICIES": "hieravid.testing.conformance",
    "check_realised_counts": "hieravid.testing.checks",
    "reference_run": "hieravid.testing.reference",
    "capture_lm_inputs": "hieravid.testing.reference",
}

__all__ = list(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
