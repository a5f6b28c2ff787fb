"""``benchmarks/ops/bench_ops_gpu.py`` still runs against the operators' current API: its CPU smoke mode
(``--device cpu --quick``) end to end through a subprocess. Speed itself is measured on a GPU, never asserted here."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "ops" / "bench_ops_gpu.py"
STAGES = ("stage1", "stage2", "stage3")


def _timings(node: Any, path: str = "") -> list[tuple[str, dict[str, Any]]]:
    """Every timing record (a mapping with ``median_ms``) under ``node``, with its path."""
    if isinstance(node, dict):
        if "median_ms" in node:
            return [(path, node)]
        return [item for key, value in node.items() for item in _timings(value, f"{path}/{key}")]
    return []


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("bench_ops") / "ops.json"
    # One intra-op thread: the tensors are tiny, and spinning worker threads make the run several times slower on a
    # busy machine.
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--device", "cpu", "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return json.loads(out.read_text())


def test_report_describes_a_cpu_smoke_run(report: dict[str, Any]) -> None:
    assert report["device"] == "cpu" and report["gpu"] is None and report["quick"] is True
    assert report["greedy_backends"] == ["torch"] and report["auto_backend"] == "torch"
    assert report["stage_ratios"] == [0.3, 0.3, 0.57]
    # the GPU-only parts say why they are missing
    assert {"cuda_graphs", "triton", "gpu_kernels_per_call"} <= set(report["skipped"])
    for key in ("summary", "checks", "timings", "shapes", "host_us_per_small_op"):
        assert key in report


def test_every_section_has_positive_timings(report: dict[str, Any]) -> None:
    timings = report["timings"]
    assert {"segment_level", "relevance", *STAGES, "prefill", "prefill_long", "worst_one_segment", "scaling"} <= set(
        timings
    )
    records = _timings(timings)
    assert records and all(r["median_ms"] > 0 and r["runs"] >= 3 for _, r in records), records
    paths = {path for path, _ in records}
    expected = {"/segment_level/eager", "/relevance", "/prefill/torch", "/prefill_long/torch"}
    for stage in STAGES:
        expected |= {
            f"/{stage}/{name}"
            for name in ("frame_level", "frame_level_host_meta", "frame_level_sync", "dpp_select_without_greedy")
        }
        expected |= {f"/{stage}/dpp_select/torch", f"/{stage}/greedy/torch"}
    expected |= {f"/worst_one_segment/max_block_{cap}" for cap in ("None", 32, 16, 8)}
    expected |= {f"/scaling/{frames}f/{name}" for frames in (8, 16, 32) for name in ("segment_level", "prefill")}
    assert expected <= paths, expected - paths
    # nothing that needs CUDA graphs or Triton was timed on the CPU
    assert not any("graph" in path or "triton" in path for path in paths), paths


def test_checks_and_summary(report: dict[str, Any]) -> None:
    checks, summary = report["checks"], report["summary"]
    assert checks["deterministic"] is True
    for key in ("sizes", "sizes_long"):
        sizes = checks[key]
        assert len(sizes) == 4 and all(a > b > 0 for a, b in itertools.pairwise(sizes)), sizes
    assert checks["segments"] >= 1 and checks["segments_long"] >= 1
    assert [report["timings"][stage]["kept"] for stage in STAGES] == checks["sizes"][1:]
    assert len(summary["dpp_stage_ms"]) == 3 and all(v > 0 for v in summary["dpp_stage_ms"])
    assert summary["prefill_ms"] > 0 and summary["prefill_long_ms"] > 0
    assert summary["prefill_ms_segment_graph"] is None and summary["prefill_target_met"] is None
