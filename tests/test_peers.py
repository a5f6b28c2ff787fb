"""Shipped policies — HieraVid, peer methods, ablations: validate, round-trip, compile for the three catalogue
models, run on the tiny adapters and realise their plans' token counts; per-stage selectors; the docs table."""

from __future__ import annotations

import json
import runpy
from pathlib import Path

import pytest
import torch

from hieravid.apps.cli import main as cli_main
from hieravid.errors import PlanError, PolicyError
from hieravid.plan import compile_plan
from hieravid.policy import DppSelector, Policy, RandomSelector, load_policy, policy_from_dict
from hieravid.runtime import apply

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted(path.relative_to(ROOT).as_posix() for path in (ROOT / "policies").rglob("*.yaml"))
PEERS = sorted(path.stem for path in (ROOT / "policies" / "peers").glob("*.yaml"))
MODELS = ("llava-onevision-7b", "llava-video-7b", "qwen2-vl-7b")
INPUT_ONLY = {"dycoke", "evs", "random", "uniform", "vidcom2"}
HEADER = "version: 1\nkind: PruningPolicy\nname: t\n"


def _load(relative: str) -> Policy:
    return load_policy(ROOT / relative)


# ---------------------------------------------------------------------------------------------- shipped files
def test_the_shipped_set_is_complete() -> None:
    assert PEERS == ["dycoke", "evs", "fastv", "framefusion", "pdrop", "random", "uniform", "vidcom2"]
    ablations = {Path(path).stem for path in SHIPPED if path.startswith("policies/ablations/")}
    betas = {f"beta-{beta}" for beta in (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)}
    assert {
        "no-segment",
        "no-frame",
        "no-layer",
        "only-segment",
        "only-frame",
        "only-layer",
        "relevance-positive",
        "frame-topk",
        "fixed-budget",
        "binned-first-stage",
        *betas,
    } <= ablations
    names = [_load(path).name for path in SHIPPED]
    assert len(set(names)) == len(names), "policy names must be unique"


@pytest.mark.parametrize("path", SHIPPED)
def test_every_shipped_policy_validates_round_trips_and_compiles(path: str) -> None:
    text = (ROOT / path).read_text(encoding="utf-8")
    assert text.startswith("#"), "every shipped policy opens with a comment saying what it is"
    policy = _load(path)
    assert policy_from_dict(policy.to_dict()) == policy
    assert load_policy(policy.to_yaml()) == policy
    for model in MODELS:
        plan = compile_plan(policy, model)
        assert json.loads(plan.to_json())["policy"] == policy.to_dict()
        assert 0.0 < plan.retention <= 1.0 and 0.0 < plan.flops_ratio <= 1.0 + 1e-9


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("peer", PEERS)
def test_peers_are_tuned_to_25_to_30_percent_retention(peer: str, model: str) -> None:
    plan = compile_plan(ROOT / "policies" / "peers" / f"{peer}.yaml", model)
    upper = 0.30
    if peer == "dycoke":  # TTM never prunes ⌈F/4⌉-ish frames: 5 of Qwen2-VL's 16 temporal patches are 31.25%
        F = plan.spec.frames
        upper = max(upper, (F - F // 2 - (F - 1) // 4) / F + 0.01)
    assert 0.25 <= plan.retention <= upper, plan.summary()
    if peer in INPUT_ONLY:  # the whole budget before layer 0, no in-LLM stage
        assert plan.segment.kind == peer and not plan.stages
        assert plan.retention == pytest.approx(plan.input_keep_fraction)
    else:
        assert all(
            stage.selector.kind == "topk_relevance" and stage.relevance_sign == "positive" for stage in plan.stages
        )
        assert all(stage.budget is None for stage in plan.stages)


def test_peer_plans_on_onevision() -> None:
    def plan(name: str):
        return compile_plan(ROOT / "policies" / "peers" / f"{name}.yaml", "llava-onevision-7b")

    fastv, pdrop, framefusion = plan("fastv"), plan("pdrop"), plan("framefusion")
    # FastV's timing: layer 1's attention decides, the cut follows layer 1's MLP, layer 2 runs pruned.
    assert fastv.stage_layers == (1,) and not fastv.segment.enabled
    assert fastv.stages[0].prune_point == "after_mlp" and fastv.stages[0].query_rows == 1
    assert [stage.video_tokens_after for stage in fastv.stages] == [1379 + 1]  # ⌊6272·0.22⌋ + the newline
    assert fastv.layer_video_tokens[:3] == (6273, 6273, 1380)
    assert pdrop.stage_layers == (2, 8, 16, 24) and {stage.prune_ratio for stage in pdrop.stages} == {0.55}
    assert framefusion.segment.kind == "framefusion" and framefusion.stage_layers == (2,)
    assert framefusion.segment.video_tokens_after == 3136 + 1  # at most half merged: a lower bound
    dycoke = plan("dycoke")
    assert dycoke.segment.config.model_dump(exclude={"kind", "enabled"}) == {
        "prune_ratio": 0.99,
        "odd_last_frame": "keep",
    }
    # 32 frames: 16 pair frames + 7 window frames pruned to ⌊0.01·196⌋ = 1 token, 9 frames whole, + the newline.
    assert dycoke.segment.video_tokens_after == 9 * 196 + 23 * 1 + 1


def test_ablations_change_one_setting_of_hieravid_30() -> None:
    base = _load("policies/hieravid-30.yaml").to_dict()

    def diff(name: str) -> dict:
        other = _load(f"policies/ablations/{name}.yaml").to_dict()
        changed = {}
        for section in ("segment", "frame", "layer"):
            for key, value in other[section].items():
                if value != base[section][key]:
                    changed[f"{section}.{key}"] = value
        return changed

    assert diff("relevance-positive") == {"frame.relevance": {**base["frame"]["relevance"], "sign": "positive"}}
    assert diff("frame-topk") == {"frame.selector": {"kind": "topk_relevance"}}
    assert diff("fixed-budget") == {"frame.dynamic_budget": {**base["frame"]["dynamic_budget"], "enabled": False}}
    for beta in (0.2, 0.3, 0.5, 0.6, 0.7, 0.8):
        assert diff(f"beta-{beta}") == {"segment.segment_threshold": beta}
    assert diff("beta-0.4") == {}
    assert set(diff("binned-first-stage")) == {"layer.schedule"}
    assert diff("only-segment") == {"frame.enabled": False, "layer.enabled": False}
    assert diff("only-frame") == {"segment.enabled": False, "layer.enabled": False}
    assert diff("only-layer") == {"segment.enabled": False, "frame.enabled": False}
    for model in MODELS:
        full = compile_plan(ROOT / "policies" / "hieravid-30.yaml", model)
        binned = compile_plan(ROOT / "policies" / "ablations" / "binned-first-stage.yaml", model)
        assert [stage.selector.kind for stage in binned.stages] == ["binned_relevance", "dpp", "dpp"]
        assert binned.layer_video_tokens == full.layer_video_tokens and binned.retention == full.retention
        assert binned.stages[0].needs == ("last_query_attention",)  # no DPP features at the binned stage


# ---------------------------------------------------------------------------------------------- schema
def test_per_stage_selector_overrides_the_frame_selector() -> None:
    text = HEADER + (
        "frame: {selector: {kind: dpp, max_block: 64}}\n"
        "layer:\n  schedule:\n    kind: explicit\n    stages:\n"
        "      - {layer: 3, prune_ratio: 0.5, selector: {kind: random, seed: 4}}\n"
        "      - {layer: 9, prune_ratio: 0.5}\n"
    )
    policy = load_policy(text)
    assert load_policy(policy.to_yaml()) == policy
    plan = compile_plan(policy, "qwen2-vl-7b")
    assert [stage.selector for stage in plan.stages] == [RandomSelector(seed=4), DppSelector(max_block=64)]
    assert plan.stages[0].needs == ("last_query_attention",)
    assert plan.stages[1].needs == ("last_query_attention", "post_attention_hidden")
    # Layer level off: the schedule collapses onto its first stage, selector included.
    collapsed = compile_plan(text + "  enabled: false\n", "qwen2-vl-7b")
    assert collapsed.stage_layers == (3,) and collapsed.stages[0].selector == RandomSelector(seed=4)
    # Frame level off: one global relevance top-k, whatever the stages say.
    no_frame = compile_plan(text.replace("frame: {selector", "frame: {enabled: false, selector"), "qwen2-vl-7b")
    assert {stage.selector.kind for stage in no_frame.stages} == {"topk_relevance"}


def test_a_bad_stage_selector_names_its_path() -> None:
    text = HEADER + "layer: {schedule: {kind: explicit, stages: [{layer: 1, prune_ratio: 0.5, selector: {kind: no}}]}}"
    with pytest.raises(PolicyError, match=r"layer\.schedule\.stages\[0\]\.selector"):
        load_policy(text)


@pytest.mark.parametrize(
    ("segment", "frames", "removed"),
    [
        ("{kind: evs, prune_ratio: 0.9}", 1, 0),  # frame 0 is always kept
        ("{kind: evs, prune_ratio: 0.9}", 4, 3 * 196),  # ⌊0.9·784⌋ = 705 > 3 frames
        ("{kind: dycoke, prune_ratio: 0.9}", 8, 5 * (196 - 19)),  # frames 1, 2, 3, 5, 7 keep ⌊0.1·196⌋
        ("{kind: dycoke, prune_ratio: 0.5}", 4, 2 * 98),  # F <= 4: pairs only (the authors' code fails)
        ("{kind: dycoke, prune_ratio: 0.5}", 3, 98),  # odd count: the last frame is kept whole …
        ("{kind: dycoke, prune_ratio: 0.5, odd_last_frame: drop}", 3, 98 + 196),  # … or dropped (the authors')
        ("{kind: dycoke, prune_ratio: 0.5, odd_last_frame: drop}", 1, 0),  # a single frame is kept whole
        ("{kind: framefusion, prune_ratio: 0.9}", 2, 196),
        ("{kind: vidcom2, prune_ratio: 0.9}", 1, 196 - 19),  # R = ⌊196·0.1⌋
        ("{kind: vidcom2, prune_ratio: 0.99}", 4, 784 - 7),  # R = ⌊784·0.01⌋ = 7 (>= 4 frames)
        ("{kind: vidcom2, prune_ratio: 0.999}", 4, 784 - 4),  # R = max(F, ⌊0.784⌋) = 4
        ("{merge_ratio: 0.5}", 1, 0),  # HieraVid never absorbs frame 0 either
    ],
)
def test_the_planner_counts_what_the_input_operator_removes(segment: str, frames: int, removed: int) -> None:
    plan = compile_plan(
        HEADER + f"segment: {segment}\nframe: {{enabled: false}}\nlayer: {{enabled: false}}\n",
        "llava-onevision-7b",
        frames=frames,
    )
    assert plan.segment.video_tokens_after == frames * 196 - removed + 1


# ---------------------------------------------------------------------------------------------- compare + docs
def test_compare_prints_input_levels_and_per_stage_budgets(capsys: pytest.CaptureFixture[str]) -> None:
    paths = [str(ROOT / "policies" / "peers" / f"{name}.yaml") for name in PEERS]
    assert (
        cli_main(
            [
                "compare",
                *paths,
                str(ROOT / "policies/ablations/binned-first-stage.yaml"),
                "--model",
                "llava-onevision-7b",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "2: 2823, 8: 1270, 16: 572, 24: 257" in out  # PDrop's per-stage budgets
    assert "evs 0.72" in out and "framefusion 0.5" in out
    assert "binned_relevance, dpp, dpp" in out
    assert cli_main(["compare", paths[0], "--model", "qwen2-vl-7b", "--markdown"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("| policy | input level |") and lines[1].startswith("| --- |")


def test_docs_policy_table_is_up_to_date() -> None:
    script = runpy.run_path(str(ROOT / "benchmarks" / "policy_table.py"))
    committed = (ROOT / "docs" / "policies.md").read_text(encoding="utf-8")
    assert committed == script["render"](), "docs/policies.md is stale: run python benchmarks/policy_table.py"
    assert all(_load(path).name in committed for path in SHIPPED)


# ---------------------------------------------------------------------------------------------- tiny models
TINY_LAYERS, CATALOGUE_LAYERS = 8, 28


def tiny_plan(policy: Policy, case) -> tuple[object, int] | None:
    """``policy`` compiled for a tiny model: explicit stage layers, written for the 28-layer catalogue models,
    are scaled to the tiny depth (⌊l·8/28⌋); the frame count is the smallest of 8/16/32/64 that leaves
    every stage a token (e.g. hieravid-10 needs 64 frames of 16 tokens). None when the model refuses a stage
    layer (Qwen3-VL: stages before its last deepstack injection), after checking the planner says so."""
    data = policy.to_dict()
    schedule = data["layer"]["schedule"]
    if schedule["kind"] == "explicit":
        for stage in schedule["stages"]:
            stage["layer"] = stage["layer"] * TINY_LAYERS // CATALOGUE_LAYERS
        first = case.spec().first_stage_layer
        early = [stage["layer"] for stage in schedule["stages"] if stage["layer"] < first]
        if early and (policy.frame.enabled or policy.layer.enabled):
            with pytest.raises(PlanError, match=f"stage at layer {early[0]}.*deepstack"):
                compile_plan(policy_from_dict(data), case.spec(frames=64))
            return None
    scaled = policy_from_dict(data)
    for frames in (8, 16, 32, 64):
        try:
            return compile_plan(scaled, case.spec(frames=frames)), frames
        except PlanError:
            continue
    raise AssertionError(f"{policy.name} does not compile for {case.architecture} at up to 64 frames")


@pytest.mark.parametrize("path", SHIPPED)
def test_every_shipped_policy_runs_on_the_tiny_adapters_and_realises_its_plan(tiny_sdpa, realised_counts, path):
    policy = _load(path)
    planned = tiny_plan(policy, tiny_sdpa)
    if planned is None:  # refused by the planner (asserted in tiny_plan)
        return
    plan, frames = planned
    inputs = tiny_sdpa.inputs(batch=1, seed=3, frames=(frames,))
    with apply(tiny_sdpa.model, plan) as handle:
        with torch.no_grad():
            logits = tiny_sdpa.model(**inputs).logits
        stats = handle.last_request
    assert torch.isfinite(logits).all()
    if not plan.prunes:
        assert not stats.pruned
        return
    assert stats.pruned and len(stats.stages) == len(plan.stages)
    if plan.segment.enabled and plan.segment.kind != "hieravid":
        assert stats.num_segments == (1,)  # peers leave the video one segment
    realised_counts(plan, stats, inputs["input_ids"], input_exact=plan.segment.kind != "framefusion")
