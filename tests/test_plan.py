"""Planner: token counts, retention, FLOPs ratio and rejection of infeasible plans."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hieravid import CATALOGUE, PlanError, compile_plan, load_policy

REPO = Path(__file__).resolve().parents[1]
POLICIES = REPO / "policies"
HEADER = "version: 1\nkind: PruningPolicy\nname: t\n"


@pytest.mark.parametrize(
    ("policy", "retention"),
    [("hieravid-30.yaml", 0.30), ("hieravid-20.yaml", 0.22), ("hieravid-10.yaml", 0.115)],
)
@pytest.mark.parametrize("model", ["llava-onevision-7b", "llava-video-7b", "qwen2-vl-7b"])
def test_retention_matches_the_paper_table(policy: str, retention: float, model: str) -> None:
    plan = compile_plan(POLICIES / policy, model)
    assert plan.spec.num_layers == 28
    assert plan.retention == pytest.approx(retention, abs=0.01)
    assert 0 < plan.flops_ratio < 1


def test_hieravid_30_on_onevision_stage_counts() -> None:
    plan = compile_plan(POLICIES / "hieravid-30.yaml", "llava-onevision-7b")
    spec = plan.spec
    assert spec.video_tokens == 32 * 196 + 1
    assert plan.stage_layers == (7, 14, 21)
    # 6272 frame tokens: half merged, then floor(n·(1−ρ)) per stage; the newline is always kept.
    assert plan.segment.video_tokens_after == 3136 + 1
    assert [stage.video_tokens_after for stage in plan.stages] == [2195 + 1, 1536 + 1, 660 + 1]
    assert plan.layer_video_tokens[:8] == (3137,) * 8
    assert plan.layer_mlp_video_tokens[7] == 2196  # after_attention: layer 7's MLP sees the pruned count
    assert plan.input_keep_fraction == pytest.approx(3137 / 6273)
    expected = sum(a + m for a, m in zip(plan.layer_video_tokens, plan.layer_mlp_video_tokens)) / (2 * 28 * 6273)
    assert plan.retention == pytest.approx(expected)
    for stage in plan.stages:
        assert stage.selector.kind == "dpp"
        assert set(stage.needs) == {"last_query_attention", "post_attention_hidden"}
        assert stage.query_rows == 1
    assert compile_plan(POLICIES / "hieravid-30.yaml", "qwen2-vl-7b").stages[0].query_rows == 4


def test_after_mlp_counts_the_stage_layer_before_the_cut() -> None:
    text = HEADER + "layer: {prune_point: after_mlp}\n"
    late = compile_plan(text, "llava-onevision-7b")
    early = compile_plan(HEADER, "llava-onevision-7b")
    assert late.layer_mlp_video_tokens[7] == late.layer_video_tokens[7]
    assert late.retention > early.retention
    assert late.flops_ratio > early.flops_ratio


def test_none_policy_is_identity() -> None:
    plan = compile_plan(POLICIES / "none.yaml", "llava-video-7b")
    assert not plan.prunes
    assert plan.stages == ()
    assert plan.retention == 1.0
    assert plan.flops_ratio == pytest.approx(1.0)
    assert set(plan.layer_video_tokens) == {plan.spec.video_tokens}


def test_ablations_switch_one_level_each() -> None:
    full = compile_plan(POLICIES / "hieravid-30.yaml", "llava-onevision-7b")
    no_segment = compile_plan(POLICIES / "ablations" / "no-segment.yaml", "llava-onevision-7b")
    no_frame = compile_plan(POLICIES / "ablations" / "no-frame.yaml", "llava-onevision-7b")
    no_layer = compile_plan(POLICIES / "ablations" / "no-layer.yaml", "llava-onevision-7b")
    assert not no_segment.segment.enabled and no_segment.input_keep_fraction == 1.0
    assert no_segment.stage_layers == full.stage_layers
    assert all(stage.budget is None for stage in no_segment.stages)
    assert [stage.selector.kind for stage in no_frame.stages] == ["topk_relevance"] * 3
    assert not any(stage.per_segment for stage in no_frame.stages)
    assert no_layer.stage_layers == (7,)
    assert no_layer.stages[0].prune_ratio == pytest.approx(1 - 0.7 * 0.7 * 0.43)
    assert no_layer.stages[0].video_tokens_after == pytest.approx(full.stages[-1].video_tokens_after, abs=2)


def test_depth_fraction_schedule_scales_with_depth() -> None:
    assert compile_plan(HEADER, "llava-onevision-72b").stage_layers == (20, 40, 60)
    assert compile_plan(HEADER, "llava-onevision-0.5b").stage_layers == (6, 12, 18)


def test_explicit_stage_beyond_depth_is_rejected() -> None:
    text = HEADER + "layer: {schedule: {kind: explicit, stages: [{layer: 28, prune_ratio: 0.5}]}}\n"
    with pytest.raises(PlanError, match=r"layer 28.*28 decoder layers.*0\.\.27"):
        compile_plan(text, "llava-onevision-7b")
    assert compile_plan(text, "llava-onevision-72b").stage_layers == (28,)


def test_schedule_that_keeps_nothing_is_rejected() -> None:
    stages = "[{layer: 1, prune_ratio: 0.99}, {layer: 2, prune_ratio: 0.99}]"
    text = HEADER + f"layer: {{schedule: {{kind: explicit, stages: {stages}}}}}\n"
    with pytest.raises(PlanError, match="leaves no video token"):
        compile_plan(text, CATALOGUE["llava-onevision-7b"].with_frames(1))


def test_duplicate_layers_from_fractions_are_rejected() -> None:
    text = HEADER + "layer: {schedule: {kind: depth_fraction, fractions: [0.5, 0.51], prune_ratios: [0.3, 0.3]}}\n"
    with pytest.raises(PlanError, match="duplicate stage layers"):
        compile_plan(text, "llava-onevision-7b")


def test_flops_ratio_counts_attention_quadratically() -> None:
    short = compile_plan(POLICIES / "hieravid-30.yaml", "llava-onevision-7b", frames=8)
    long = compile_plan(POLICIES / "hieravid-30.yaml", "llava-onevision-7b", frames=128)
    assert short.retention == pytest.approx(long.retention, abs=0.01)
    # More frames: the quadratic attention term dominates more, and it shrinks faster than linearly.
    assert long.flops_ratio < short.flops_ratio
    assert long.unpruned_prefill_tflops > 16 * short.unpruned_prefill_tflops


def test_plan_serialises_and_prints() -> None:
    plan = compile_plan(POLICIES / "hieravid-30.yaml", "llava-onevision-7b")
    data = json.loads(plan.to_json())
    assert data["retention"] == pytest.approx(plan.retention)
    assert [stage["layer"] for stage in data["stages"]] == [7, 14, 21]
    assert data["policy"]["name"] == "hieravid-30"
    assert data["spec"]["video_tokens"] == 6273
    assert load_policy(json.dumps(data["policy"])) == plan.policy
    text = str(plan)
    assert "retention (mean over layers): 0.307" in text
    assert "FLOPs" in text and "ratio" in text
    assert text.count("← stage") == 3
    assert len([line for line in text.splitlines() if line.strip()[:2].strip().isdigit()]) >= 28


def test_plan_is_frozen() -> None:
    plan = compile_plan(HEADER, "qwen2-vl-7b")
    with pytest.raises(AttributeError):
        plan.retention = 0.5  # type: ignore[misc]
