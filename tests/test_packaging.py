"""The wheel carries every shipped policy, so names work from a plain (non-editable) install outside the repository
(issue 17.9)."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
IGNORED = (
    ".venv*",
    ".git",
    "build",
    "dist",
    "*.egg-info",
    "__pycache__",
    ".pytest_cache",
    ".ruff_cache",
    ".hypothesis",
)


def _can_build_wheels() -> bool:
    if importlib.util.find_spec("setuptools") is None:
        return False
    version = tuple(int(part) for part in importlib.metadata.version("setuptools").split(".")[:2] if part.isdigit())
    return version >= (70, 1) or importlib.util.find_spec("wheel") is not None  # bdist_wheel


@pytest.mark.skipif(not _can_build_wheels(), reason="setuptools (with bdist_wheel) is needed to build the wheel")
def test_the_wheel_ships_every_policy_and_names_work_outside_the_repository(tmp_path: Path) -> None:
    source = tmp_path / "source"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(*IGNORED))  # never build inside the checkout
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", ".", "-w", str(tmp_path)],
        cwd=source,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert built.returncode == 0, built.stderr
    (wheel,) = tmp_path.glob("hieravid-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {f"hieravid/{path.relative_to(REPO).as_posix()}" for path in (REPO / "policies").rglob("*.yaml")}
    assert shipped and shipped <= names, sorted(shipped - names)
    assert "hieravid/adapters/registry.py" in names and "hieravid/data/demo/llava_onevision_tiny.json" in names
    assert "hieravid/testing/conformance.py" in names and "hieravid/testing/reference.py" in names

    target = tmp_path / "installed"
    installed = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert installed.returncode == 0, installed.stderr
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    code = (
        "import hieravid, hieravid.policy as p; from hieravid.apps.cli import main; "
        f"assert hieravid.__file__.startswith({str(target)!r}), hieravid.__file__; "
        "assert len(p.shipped_policies()) == int(__import__('sys').argv[1]); "
        "assert hieravid.load_policy('hieravid-30').name == 'hieravid-30'; "
        "assert hieravid.compile_plan('peers/fastv', 'llava-onevision-7b').policy.name == 'fastv'; "
        "raise SystemExit(main(['policies']))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, str(len(shipped))],
        cwd=elsewhere,
        env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "hieravid-30" in result.stdout and "peers/fastv" in result.stdout
