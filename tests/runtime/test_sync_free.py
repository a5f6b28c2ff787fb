"""Frame-level stages never wait for the device: every count they need is known on the host from the
segment level on (``Request.schedule``). A host sync inside a stage leaves the GPU idle while Python runs
(measured ~5–10 ms per stage on an H100), so this is checked for every architecture, several selectors and
a left-padded batch, with the CPU :class:`~hieravid.diagnostics.SyncSpy`."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from hieravid.diagnostics import SyncSpy
from hieravid.errors import PlanError
from hieravid.plan import compile_plan
from hieravid.runtime import apply

POLICIES = Path(__file__).resolve().parents[2] / "policies"
#: Call sites inside a frame-level stage: relevance, budgets, selectors, row packing, coordinates.
STAGE_SITES = (
    "runtime/stages.py",
    "runtime/hooks.py",
    "runtime/packing.py",
    "runtime/masks.py",
    "(stage_mask)",
    "(stage_inputs)",
    "ops/layer.py",
    "ops/selectors.py",
    "ops/dpp.py",
    "ops/budget.py",
    "ops/relevance.py",
    "(stage_query_key)",
)


def _syncs(case, policy: str, **inputs_options) -> dict[tuple[str, str], int]:
    inputs = case.inputs(**inputs_options)
    spy = SyncSpy()
    # Planned for 64 frames so that every stage of hieravid-10 keeps a token; the engine's counts are the video's.
    with apply(case.model, compile_plan(policy, case.spec(frames=64))) as handle, torch.inference_mode():
        case.model(**inputs, use_cache=True)
        with spy:
            case.model(**inputs, use_cache=True)
        stats = handle.last_request
    assert stats is not None and stats.pruned and len(stats.stages) >= 1
    return dict(spy.counts)


@pytest.mark.parametrize(
    "policy",
    [
        "hieravid-30.yaml",
        "hieravid-10.yaml",
        "peers/fastv.yaml",
        "ablations/frame-topk.yaml",
        "ablations/no-segment.yaml",
    ],
)
def test_stages_do_not_synchronise(tiny_sdpa, policy: str) -> None:
    spec = tiny_sdpa.spec(frames=64)
    if policy == "peers/fastv.yaml" and (spec.first_stage_layer > 1 or 1 in spec.recurrent_layers):
        # FastV decides at layer 1: before Qwen3-VL's last deepstack layer, on the tiny Qwen3.5's linear attention.
        with pytest.raises(PlanError, match=r"stage at layer 1,.*(deepstack|linear attention)"):
            compile_plan(str(POLICIES / policy), spec)
        return
    counts = _syncs(tiny_sdpa, str(POLICIES / policy))
    in_stages = {site: n for site, n in counts.items() if any(part in site[0] for part in STAGE_SITES)}
    assert in_stages == {}
    # What remains of hieravid's own is before layer 0: the adapter locating the video and the segment
    # level's reads (transformers' own checks come on top). Qwen's batched window attention (an exact vision
    # speedup) reads the window bounds in the vision tower, once per forward and kind of window, where
    # transformers' loop read them once per block: counted apart.
    vision = {
        site: n
        for site, n in counts.items()
        if "(batched_window_attention)" in site[0] or "(_window_bounds)" in site[0]
    }
    assert sum(vision.values()) <= 2, vision
    ours = {site: n for site, n in counts.items() if site[0] != "<outside hieravid>" and site not in vision}
    # The adapter reads where the video is, then the input level reads once: the prompt's padding, the number of
    # segments, and each segment's token count and marginal value, together (the operators leave it to it).
    assert sum(n for site, n in ours.items() if "(locate_videos)" in site[0]) <= 1, ours
    assert sum(n for site, n in ours.items() if "(locate_videos)" not in site[0]) <= 1, ours


@pytest.mark.parametrize("policy", ["hieravid-30.yaml", "hieravid-10.yaml", "ablations/frame-topk.yaml"])
def test_from_layer_0_to_the_logits_a_prefill_is_capturable(tiny_sdpa, policy: str) -> None:
    """What a CUDA graph of the pruned prefill needs: from the first decoder layer to the language model's output,
    no host sync, no host-to-device copy (not even an asynchronous one) and no device tensor made from host data —
    every budget and plan was uploaded before layer 0. Checked for transformers' layers and hieravid's stages."""
    case = tiny_sdpa
    inputs = case.inputs(seed=4)
    spy = SyncSpy(capture=True)
    language_model = case.model.model.language_model
    first_layer = language_model.layers[0]

    def count(module, *args):  # from layer 0's start to the language model's output
        spy.counting = module is first_layer

    with apply(case.model, compile_plan(str(POLICIES / policy), case.spec(frames=64))) as handle:
        hooks = [
            first_layer.register_forward_pre_hook(count, prepend=True),
            language_model.register_forward_hook(count),
        ]
        try:
            with torch.inference_mode():
                case.model(**inputs, use_cache=True)  # warm-up (lazy initialisations)
                spy.counting = False
                with spy:  # tracks which tensors live on the host from the start, counts only the window
                    case.model(**inputs, use_cache=True)
        finally:
            for hook in hooks:
                hook.remove()
        assert handle.last_request.pruned and len(handle.last_request.stages) >= 1
    assert dict(spy.counts) == {}


def test_the_capture_spy_sees_host_to_device_copies() -> None:
    spy = SyncSpy(capture=True)
    with spy:
        host = torch.arange(3)
        host.to("cuda", non_blocking=True) if torch.cuda.is_available() else host.to("meta", non_blocking=True)
        torch.tensor([1, 2], device="meta")
        torch.tensor([], device="meta")  # copies nothing: transformers' caches start so
    kinds = sorted(kind for _, kind in spy.counts)
    assert kinds == ["h2d-async", "h2d-data"]


def test_the_spy_names_hieravids_own_call_sites_only() -> None:
    """A read made by hieravid's code is named by its file and function; one made anywhere else (this test, a
    test runner, transformers) is ``<outside hieravid>``, wherever the package is installed."""
    from hieravid.ops.budget import SegmentBudgets

    spy = SyncSpy()
    with spy:
        int(torch.ones(1, device="cpu").sum())
        assert SegmentBudgets(counts=torch.ones(2, dtype=torch.long), host=torch.ones(2, device="cpu")).total == 2
    sites = {site for site, _ in spy.counts}
    assert "<outside hieravid>" in sites
    assert any(site.startswith("hieravid/ops/budget.py:") for site in sites), sites


def test_padded_batch_stages_do_not_synchronise(tiny_llava) -> None:
    counts = _syncs(tiny_llava, str(POLICIES / "hieravid-30.yaml"), batch=2, pads=(0, 3), seed=3)
    assert not any(any(part in site for part in STAGE_SITES) for site, _ in counts)


def test_spy_sees_a_device_read() -> None:
    """The spy counts a read of a (would-be) device tensor and not one of a host tensor."""
    spy = SyncSpy()
    with spy:
        device_tensor = torch.ones(3, device="cpu")  # explicit device: lives on the device on a GPU run
        int(device_tensor.sum())
        host = torch.ones(3)
        int(host.sum())
    assert sum(spy.counts.values()) == 1


MIXED_SELECTORS = """
version: 1
kind: PruningPolicy
name: mixed-selectors
segment: {enabled: true}
frame:
  enabled: true
  selector: {kind: dpp, max_block: 8}
layer:
  enabled: true
  schedule:
    kind: explicit
    stages:
      - {layer: 2, prune_ratio: 0.3, selector: {kind: binned_relevance}}
      - {layer: 4, prune_ratio: 0.3, selector: {kind: uniform}}
      - {layer: 5, prune_ratio: 0.3, selector: {kind: random, seed: 3}}
      - {layer: 6, prune_ratio: 0.5}
"""


def test_every_builtin_selector_runs_without_a_sync(tiny_sdpa, tmp_path: Path) -> None:
    """Per-stage selector overrides and DPP blocks split by ``max_block``, on every architecture."""
    policy = tmp_path / "mixed.yaml"
    policy.write_text(MIXED_SELECTORS)
    counts = _syncs(tiny_sdpa, str(policy))
    assert not any(any(part in site for part in STAGE_SITES) for site, _ in counts)


def test_spy_sees_a_scalar_index_put() -> None:
    """``x[index] = scalar`` copies the scalar to the device and waits on a GPU; ``index_fill_`` does not."""
    spy = SyncSpy()
    with spy:
        target = torch.zeros(4, device="cpu")
        index = torch.tensor([1, 2], device="cpu")
        target[index] = 1.0
        target.index_fill_(0, index, 2.0)
    assert [name for _, name in spy.counts] == ["scalar-index-put"]


def test_cuda_graphs_option_gives_identical_outputs(tiny_llava) -> None:
    """The segment level through the handle's CUDA graphs (on CUDA; ignored on a CPU) equals the eager path,
    on the capturing call and on replays."""
    inputs = tiny_llava.inputs(seed=5)
    outputs = {}
    for flag in (False, True):
        with apply(tiny_llava.model, str(POLICIES / "hieravid-30.yaml"), cuda_graphs=flag), torch.inference_mode():
            outputs[flag] = [tiny_llava.model(**inputs).logits for _ in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(outputs[False], outputs[True]))


def test_a_selector_that_breaks_its_budget_is_refused(tiny_llava, tmp_path: Path) -> None:
    """The host-side schedule relies on selectors keeping exactly their budgets; a selector that keeps fewer
    is named in a clear error (no silent drift of the counts), and the handle serves the next request."""
    from hieravid.errors import AdapterError
    from hieravid.ops.selectors import SELECTORS, register_selector
    from hieravid.policy import UniformSelector

    policy = tmp_path / "uniform.yaml"
    policy.write_text(MIXED_SELECTORS.replace("{kind: dpp, max_block: 8}", "{kind: uniform}"))
    original = SELECTORS.lookup(UniformSelector())

    def keeps_one_too_few(*args, **kwargs):
        return original(*args, **kwargs)[:-1]

    inputs = tiny_llava.inputs(seed=2)
    with apply(tiny_llava.model, str(policy)) as handle, torch.inference_mode():
        expected = tiny_llava.model(**inputs).logits
        register_selector(UniformSelector)(keeps_one_too_few)
        try:
            with pytest.raises(AdapterError, match=r"selector 'uniform' kept \d+ tokens of sample 0 at stage 2"):
                tiny_llava.model(**inputs)
        finally:
            register_selector(UniformSelector)(original)
        assert torch.equal(tiny_llava.model(**inputs).logits, expected)
        assert handle.last_request is not None and handle.last_request.pruned
