"""Trace visualisation: token status per level, frame choice, the picture, and ``hieravid viz``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from hieravid.apps.trace import RequestTrace, StageTrace, save_trace
from hieravid.apps.viz import KEPT, MERGED, PRUNED, VizError, draw_trace, select_frames, token_status

pytest.importorskip("matplotlib", reason="the viz extra (matplotlib) is required for these tests")

REPO = Path(__file__).resolve().parents[1]


def _trace(frames: int = 4, thumbnails: bool = True) -> RequestTrace:
    # 4 frames of 2×2 tokens; frame 1 merged into frame 0; stage at layer 1 keeps 4 tokens, layer 2 keeps 2.
    return RequestTrace(
        frames=frames,
        rows=2,
        cols=2,
        newline_tokens=1,
        frame_segment_ids=torch.tensor([0, 0, 1, 1][:frames] + [1] * max(0, frames - 4)),
        segment_values=torch.tensor([1.0, -1.0]),
        input_kept=torch.tensor([0, 1, 2, 3, 8, 9, 10, 11]),
        stages=[StageTrace(1, torch.tensor([0, 3, 8, 11])), StageTrace(2, torch.tensor([3, 8]))],
        layer_video_tokens=[9, 9, 5],
        thumbnails=torch.randint(0, 255, (frames, 16, 16, 3), dtype=torch.uint8) if thumbnails else None,
        policy={"name": "unit"},
    )


def test_token_status_per_level() -> None:
    status = token_status(_trace())
    assert status.shape == (3, 4, 2, 2)
    level0 = status[0].reshape(-1)
    assert (level0[4:8] == MERGED).all() and (level0[12:16] == MERGED).all() and (level0[:4] == KEPT).all()
    level1 = status[1].reshape(-1)
    assert level1[[0, 3, 8, 11]].tolist() == [KEPT] * 4
    assert level1[[1, 2, 9, 10]].tolist() == [PRUNED] * 4
    assert (level1[4:8] == MERGED).all()  # merged tokens stay "merged", not "pruned"
    level2 = status[2].reshape(-1)
    assert level2[[3, 8]].tolist() == [KEPT, KEPT] and level2[[0, 11]].tolist() == [PRUNED, PRUNED]


def test_select_frames_keeps_segment_starts() -> None:
    trace = _trace(frames=40)
    trace.frame_segment_ids = torch.tensor([0] * 13 + [1] * 27)
    chosen = select_frames(trace, 8)
    assert len(chosen) == 8 and chosen == sorted(set(chosen))
    assert 0 in chosen and 13 in chosen
    assert select_frames(_trace(), 16) == [0, 1, 2, 3]
    with pytest.raises(VizError):
        select_frames(trace, 0)


@pytest.mark.parametrize("thumbnails", [True, False])
def test_draw_writes_a_png(tmp_path: Path, thumbnails: bool) -> None:
    from PIL import Image

    path = draw_trace(_trace(thumbnails=thumbnails), tmp_path / "sub" / "v.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as image:
        width, height = image.size
        pixels = np.asarray(image.convert("RGB"))
    assert width > 400 and height > 400
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 20  # not a blank canvas


def hieravid(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "hieravid.apps.cli", *args], capture_output=True, text=True, cwd=REPO, timeout=120
    )


def test_viz_command_and_errors(tmp_path: Path) -> None:
    trace_path = save_trace(tmp_path / "t.safetensors", [_trace(), _trace(thumbnails=False)])
    result = hieravid("viz", str(trace_path), "-o", str(tmp_path / "out.png"), "--request", "1")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "out.png").read_bytes()[:4] == b"\x89PNG"

    cases = [
        (["viz", str(tmp_path / "missing.safetensors"), "-o", "x.png"], "trace file not found"),
        (["viz", str(trace_path), "-o", str(tmp_path / "out.png"), "--request", "5"], "request 5 does not exist"),
        (["viz", str(trace_path), "-o", str(tmp_path / "out.xyz")], "cannot write this image format"),
        (["viz", str(REPO / "pyproject.toml"), "-o", "x.png"], "not a safetensors file"),
        (["viz", str(trace_path)], "required"),
    ]
    for args, fragment in cases:
        result = hieravid(*args)
        assert result.returncode == 2, (args, result.stdout, result.stderr)
        assert fragment in result.stderr, (args, result.stderr)
        assert "Traceback" not in result.stderr
