"""Policy schema: strict validation with errors naming file, field and value; YAML round trip."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from hieravid import PolicyError, load_policy, policy_from_dict
from hieravid.policy import DepthFractionSchedule, DppSelector, ExplicitSchedule, Policy

REPO = Path(__file__).resolve().parents[1]
SHIPPED = sorted((REPO / "policies").rglob("*.yaml"))
HEADER = "version: 1\nkind: PruningPolicy\nname: t\n"


def test_policies_are_shipped() -> None:
    names = {path.relative_to(REPO / "policies").as_posix() for path in SHIPPED}
    assert {"hieravid-30.yaml", "hieravid-20.yaml", "hieravid-10.yaml", "none.yaml"} <= names
    assert {"ablations/no-segment.yaml", "ablations/no-frame.yaml", "ablations/no-layer.yaml"} <= names


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.relative_to(REPO / "policies").as_posix())
def test_shipped_policy_round_trips(path: Path, tmp_path: Path) -> None:
    policy = load_policy(path)
    again = load_policy(policy.to_yaml())
    assert again == policy
    assert again.to_dict() == policy.to_dict()
    written = tmp_path / "copy.yaml"
    written.write_text(policy.to_yaml())
    assert load_policy(written) == policy
    assert policy_from_dict(yaml.safe_load(policy.to_yaml())) == policy


def test_defaults_are_the_authors_30_percent_setting() -> None:
    policy = load_policy(HEADER)
    assert policy.segment.similarity_threshold == 0.6
    assert policy.segment.segment_threshold == 0.4
    assert policy.segment.merge_ratio == 0.5
    assert policy.segment.marginal_value_weight == 0.5
    assert isinstance(policy.frame.selector, DppSelector)
    assert policy.frame.relevance.sign == "negative"
    assert policy.frame.dynamic_budget.scale == 0.1
    schedule = policy.layer.schedule
    assert isinstance(schedule, DepthFractionSchedule)
    assert schedule.prune_ratios == [0.3, 0.3, 0.57]
    assert load_policy(REPO / "policies" / "hieravid-30.yaml").segment == policy.segment


def test_policy_is_frozen() -> None:
    policy = load_policy(HEADER)
    with pytest.raises(Exception, match="frozen"):
        policy.name = "other"  # type: ignore[misc]
    with pytest.raises(Exception, match="frozen"):
        policy.segment.merge_ratio = 0.1  # type: ignore[misc]


def test_explicit_schedule_and_selector_kinds() -> None:
    policy = load_policy(
        HEADER
        + "frame: {selector: {kind: random, seed: 3}, relevance: {sign: positive, query_rows: 4}}\n"
        + "layer: {schedule: {kind: explicit, stages: [{layer: 2, prune_ratio: 0.5}, {layer: 9, prune_ratio: 0.25}]}}\n"
    )
    assert isinstance(policy.layer.schedule, ExplicitSchedule)
    assert [stage.layer for stage in policy.layer.schedule.stages] == [2, 9]
    assert policy.frame.selector.kind == "random" and policy.frame.selector.seed == 3
    assert policy.frame.relevance.query_rows == 4


BAD_INPUTS = [
    # (yaml text, expected fragments of the message)
    ("segment: {merge_ratio: 0.5, colour: red}\n", ["segment.colour", "unknown key", "'red'"]),
    ("segment: {merge_ratio: '0.5'}\n", ["segment.merge_ratio", "'0.5'"]),
    ("segment: {merge_ratio: 1.0}\n", ["segment.merge_ratio", "less than 1", "1.0"]),
    ("segment: {merge_ratio: -0.1}\n", ["segment.merge_ratio", "-0.1"]),
    ("segment: {similarity_threshold: 1.2}\n", ["segment.similarity_threshold", "1.2"]),
    ("segment: {enabled: 'yes please'}\n", ["segment.enabled", "yes please"]),
    ("frame: {selector: {kind: magic}}\n", ["frame.selector", "magic", "dpp"]),
    ("frame: {selector: {kind: dpp, max_blok: 3}}\n", ["frame.selector.max_blok", "unknown key"]),
    ("frame: {selector: {kind: dpp, max_block: 1}}\n", ["frame.selector.max_block", "1"]),
    ("frame: {relevance: {sign: sideways}}\n", ["frame.relevance.sign", "sideways"]),
    ("frame: {relevance: {query_rows: 0}}\n", ["frame.relevance.query_rows", "0"]),
    ("frame: {dynamic_budget: {min_keep: 0.9, max_keep: 0.1}}\n", ["frame.dynamic_budget", "min_keep"]),
    ("layer: {prune_point: before_everything}\n", ["layer.prune_point", "before_everything"]),
    (
        "layer: {schedule: {kind: explicit, stages: [{layer: 7, prune_ratio: 0.3}, {layer: 7, prune_ratio: 0.2}]}}\n",
        ["layer.schedule.stages", "strictly increasing", "[7, 7]"],
    ),
    (
        "layer: {schedule: {kind: explicit, stages: [{layer: 9, prune_ratio: 0.3}, {layer: 4, prune_ratio: 0.2}]}}\n",
        ["layer.schedule.stages", "[9, 4]"],
    ),
    ("layer: {schedule: {kind: explicit, stages: []}}\n", ["layer.schedule.stages"]),
    ("layer: {schedule: {kind: explicit, stages: [{layer: -1, prune_ratio: 0.3}]}}\n", ["stages[0].layer", "-1"]),
    ("layer: {schedule: {kind: explicit, stages: [{layer: 3, prune_ratio: 1.0}]}}\n", ["stages[0].prune_ratio"]),
    (
        "layer: {schedule: {kind: depth_fraction, fractions: [0.25, 0.5], prune_ratios: [0.3]}}\n",
        ["layer.schedule", "same length"],
    ),
    (
        "layer: {schedule: {kind: depth_fraction, fractions: [0.5, 0.25], prune_ratios: [0.3, 0.3]}}\n",
        ["layer.schedule", "strictly increasing"],
    ),
    ("layer: {schedule: {kind: depth_fraction, fractions: [1.5], prune_ratios: [0.3]}}\n", ["fractions[0]", "1.5"]),
    ("layer: {schedule: {kind: weekly}}\n", ["layer.schedule", "weekly"]),
    ("surprise: 1\n", ["surprise", "unknown key"]),
]


@pytest.mark.parametrize(("body", "fragments"), BAD_INPUTS)
def test_bad_fields_are_named(body: str, fragments: list[str], tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(HEADER + body)
    with pytest.raises(PolicyError) as caught:
        load_policy(path)
    message = str(caught.value)
    assert str(path) in message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} missing from: {message}"


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("", "got empty document"),
        ("# only a comment\n", "got empty document"),
        ("- a\n- b\n", "got a list"),
        ("just words", "got a str"),
        ("42\n", "got a int"),
        ("!!python/object/apply:os.system ['echo hi']\n", "Python tags"),
        ("version: 1\nkind: [unclosed\n", "not valid YAML"),
        ("kind: PruningPolicy\nname: t\n", "version"),
        ("version: 2\nkind: PruningPolicy\nname: t\n", "version: Input should be 1 (got 2)"),
        ("version: 1\nkind: Something\nname: t\n", "kind"),
        ("version: 1\nkind: PruningPolicy\n", "name: Field required"),
    ],
)
def test_malformed_documents(text: str, fragment: str, tmp_path: Path) -> None:
    path = tmp_path / "doc.yaml"
    path.write_text(text)
    with pytest.raises(PolicyError) as caught:
        load_policy(path)
    assert str(path) in str(caught.value)
    assert fragment in str(caught.value)


def test_missing_file_and_directory(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match="not found"):
        load_policy(tmp_path / "absent.yaml")
    with pytest.raises(PolicyError, match="is a directory"):
        load_policy(tmp_path)


def test_policy_passes_through_and_text_source_is_named() -> None:
    policy = load_policy(HEADER)
    assert load_policy(policy) is policy
    with pytest.raises(PolicyError, match="<policy text>"):
        load_policy(HEADER + "segment: {merge_ratio: 2}\n")


def test_all_levels_off_prunes_nothing() -> None:
    none = load_policy(REPO / "policies" / "none.yaml")
    assert not none.prunes
    assert load_policy(HEADER).prunes
    assert isinstance(none, Policy)
