"""The command line, end to end through a subprocess."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def hieravid(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "hieravid.apps.cli", *args], capture_output=True, text=True, cwd=REPO, timeout=120
    )


def test_plan_prints_the_per_layer_table() -> None:
    result = hieravid("plan", "policies/hieravid-30.yaml", "--model", "llava-onevision-7b")
    assert result.returncode == 0, result.stderr
    assert "retention (mean over layers): 0.307" in result.stdout
    assert "FLOPs" in result.stdout
    assert result.stdout.count("← stage") == 3


def test_plan_json_and_frames() -> None:
    result = hieravid("plan", "policies/hieravid-30.yaml", "--model", "llava-video-7b", "--frames", "16", "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["spec"]["frames"] == 16
    assert abs(data["retention"] - 0.30) < 0.01


def test_validate_and_compare() -> None:
    shipped = sorted(str(p.relative_to(REPO)) for p in (REPO / "policies").rglob("*.yaml"))
    result = hieravid("validate", *shipped)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count(": ok") == len(shipped)
    result = hieravid("compare", "policies/hieravid-30.yaml", "policies/none.yaml", "--model", "qwen2-vl-7b")
    assert result.returncode == 0, result.stderr
    assert "hieravid-30" in result.stdout and "none" in result.stdout and "1.000" in result.stdout


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["plan", "policies/missing.yaml", "--model", "llava-onevision-7b"], "not found"),
        (["plan", "policies/hieravid-30.yaml", "--model", "no-such-model"], "unknown model"),
        (["plan", "policies/hieravid-30.yaml", "--model", "llava-onevision-7b", "--frames", "-3"], "positive integer"),
        (["validate", "pyproject.toml"], "pyproject.toml"),
        (["plan"], "required"),
    ],
)
def test_bad_input_exits_2_without_traceback(args: list[str], fragment: str) -> None:
    result = hieravid(*args)
    assert result.returncode == 2
    assert fragment in result.stderr
    assert "Traceback" not in result.stderr


def test_infeasible_plan_and_debug_traceback(tmp_path: Path) -> None:
    policy = tmp_path / "deep.yaml"
    policy.write_text(
        "version: 1\nkind: PruningPolicy\nname: deep\n"
        "layer: {schedule: {kind: explicit, stages: [{layer: 40, prune_ratio: 0.5}]}}\n"
    )
    result = hieravid("plan", str(policy), "--model", "llava-onevision-7b")
    assert result.returncode == 2 and "layer 40" in result.stderr and "Traceback" not in result.stderr
    result = hieravid("--debug", "plan", str(policy), "--model", "llava-onevision-7b")
    assert result.returncode == 2 and "Traceback" in result.stderr


def test_console_script_is_installed() -> None:
    script = Path(sys.executable).with_name("hieravid")
    assert script.exists(), "pip install should create the 'hieravid' console script"
    result = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "plan" in result.stdout


def test_import_is_lean() -> None:
    code = (
        "import sys, hieravid; hieravid.compile_plan; hieravid.load_policy; "
        "print(sorted(m for m in sys.modules if m.startswith(('transformers', 'torch'))))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
