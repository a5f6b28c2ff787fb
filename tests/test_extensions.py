"""A selector and an input-level operator from an outside package, found through entry points and used from YAML
with no edit to hieravid: the package is installed as a ``.dist-info`` on ``sys.path`` (what pip writes) and a
fresh interpreter loads a policy that names its kinds before anything imports the package."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

PACKAGE = '''
"""hv_extension: a selector and an input-level operator for hieravid, shipped by another package."""
from typing import ClassVar, Literal

import torch

from hieravid.ops import register_input_operator, register_selector, uniform_input
from hieravid.policy import InputLevelConfig, SelectorConfig

LOADED = []


class FirstTokens(SelectorConfig):
    """Keep the first k tokens of each segment (in token order)."""

    kind: Literal["first_tokens"] = "first_tokens"
    uses_features: ClassVar[bool] = False


@register_selector(FirstTokens)
def first_tokens(features, relevance, segment_ids, budgets, config, *, counts=None):
    LOADED.append("selector")
    order = torch.sort(segment_ids, stable=True).indices
    sizes = torch.bincount(segment_ids, minlength=budgets.numel())
    start = torch.cumsum(sizes, 0) - sizes
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel(), device=order.device) - start[segment_ids[order]]
    keep = rank < torch.minimum(budgets.to(rank.device), sizes)[segment_ids]
    return torch.nonzero(keep).flatten()


class EveryOther(InputLevelConfig):
    """Drop every other token of the video before layer 0 (evenly spaced, as the uniform baseline)."""

    kind: Literal["every_other"] = "every_other"

    @property
    def static_prune_ratio(self) -> float:
        return 0.5


@register_input_operator(EveryOther)
def every_other(frames, config, /, *, graphs=None):
    LOADED.append("input")
    return uniform_input(frames, prune_ratio=0.5)
'''

ENTRY_POINTS = """
[hieravid.selectors]
first_tokens = hv_extension:FirstTokens

[hieravid.input_operators]
every_other = hv_extension:EveryOther
"""

SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
import torch
import hieravid
from hieravid.plan import compile_plan
from conftest import tiny_case

assert "hv_extension" not in sys.modules
policy = hieravid.load_policy('''
version: 1
kind: PruningPolicy
name: outside
segment: {{kind: every_other}}
frame: {{selector: {{kind: first_tokens}}}}
layer: {{schedule: {{kind: explicit, stages: [{{layer: 3, prune_ratio: 0.5}}]}}}}
''')
import hv_extension
assert type(policy.segment) is hv_extension.EveryOther and type(policy.frame.selector) is hv_extension.FirstTokens
assert hieravid.load_policy(policy.to_yaml()) == policy
case = tiny_case("llava_onevision")
plan = compile_plan(policy, case.spec())
with hieravid.apply(case.model, plan) as handle, torch.no_grad():
    logits = case.model(**case.inputs()).logits
    stats = handle.last_request
assert torch.isfinite(logits).all()
assert stats.pruned and stats.layer_video_tokens[0][0] == plan.layer_video_tokens[0]
assert stats.stages[0].video_tokens_after[0] == plan.stages[0].video_tokens_after
assert hv_extension.LOADED == ["input", "selector"], hv_extension.LOADED
print("outside package ok")
"""


def test_outside_selector_and_input_operator_work_from_yaml(tmp_path: Path) -> None:
    (tmp_path / "hv_extension.py").write_text(textwrap.dedent(PACKAGE))
    info = tmp_path / "hv_extension-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: hv-extension\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(ENTRY_POINTS)
    script = SCRIPT.format(tests=str(REPO / "tests"))
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"},
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "outside package ok" in result.stdout
