"""``hieravid run`` through a subprocess on the tiny demo checkpoint, and its error cases."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from media import video_stream_without_frames

from hieravid.apps.trace import load_trace

REPO = Path(__file__).resolve().parents[1]
POLICY = str(REPO / "policies" / "hieravid-30.yaml")


def hieravid(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "hieravid.apps.cli", *args], capture_output=True, text=True, cwd=cwd, timeout=300
    )


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo model exported as a checkpoint folder (``hieravid demo --export``), with its video."""
    folder = tmp_path_factory.mktemp("tiny-onevision")
    result = hieravid("demo", "--export", str(folder))
    assert result.returncode == 0, result.stderr
    assert "scene cuts at [6, 16, 23]" in result.stdout
    for name in (
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "chat_template.jinja",
        "video_preprocessor_config.json",
        "demo.mp4",
    ):
        assert (folder / name).is_file(), name
    return folder


def test_run_answers_compares_and_traces(checkpoint: Path, tmp_path: Path) -> None:
    trace_path = tmp_path / "run.safetensors"
    result = hieravid(
        "run",
        "--model",
        str(checkpoint),
        "--video",
        str(checkpoint / "demo.mp4"),
        "--question",
        "What happens in this video?",
        "--policy",
        POLICY,
        "--frames",
        "32",
        "--device",
        "cpu",
        "--max-new-tokens",
        "3",
        "--compare-unpruned",
        "--trace",
        str(trace_path),
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert re.search(r"^answer \(hieravid-30\): ", out, re.MULTILINE)
    assert re.search(r"^answer \(unpruned\): .*\[(same as|differs from) pruned\]", out, re.MULTILINE)
    assert "sampled 32" in out and "N_v 2049" in out
    assert "segments (4): frames 0-5, 6-15, 16-22, 23-31" in out
    assert out.count("← stage") == 3
    speedup = re.search(r"speedup:\s+TTFT ×([\d.]+)\s+LLM prefill ×([\d.]+)", out)
    assert speedup and float(speedup.group(1)) > 0 and float(speedup.group(2)) > 0
    assert re.search(r"retention \(mean over layers\): 0\.\d{3} measured, 0\.\d{3} planned", out)
    assert "torchvision" in out or "torchvision" in result.stderr or "note:" not in out
    assert "decoding" in result.stderr and "loading" in result.stderr  # progress messages go to stderr
    (trace,) = load_trace(trace_path)
    assert trace.cuts() == [6, 16, 23]
    assert trace.info["question"] == "What happens in this video?" and len(trace.info["sampled_frames"]) == 32
    assert trace.thumbnails is not None and trace.thumbnails.shape[0] == 32
    assert trace.merged_kept().numel() == 1024
    assert trace.merge_target is not None and trace.frame_redundancy is not None
    image = tmp_path / "run.png"
    drawn = hieravid("viz", str(trace_path), "-o", str(image))
    assert drawn.returncode == 0, drawn.stderr and image.stat().st_size > 10_000


def test_plan_on_the_checkpoint_folder_agrees_with_run(checkpoint: Path) -> None:
    """The planner reads the video geometry from the checkpoint through its adapter, as run measures it."""
    import json

    planned = hieravid("plan", POLICY, "--model", str(checkpoint), "--json")
    assert planned.returncode == 0, planned.stderr
    spec = json.loads(planned.stdout)["spec"]
    assert (spec["frames"], spec["rows"], spec["cols"], spec["video_tokens"]) == (32, 8, 8, 2049)  # run: N_v 2049
    assert spec["newline_layout"] == "per_video"


def test_run_without_compare_prints_no_speedup(checkpoint: Path) -> None:
    result = hieravid(
        "run",
        "--model",
        str(checkpoint),
        "--video",
        str(checkpoint / "demo.mp4"),
        "--question",
        "Q",
        "--policy",
        str(REPO / "policies" / "ablations" / "no-segment.yaml"),
        "--frames",
        "16",
        "--max-new-tokens",
        "1",
        "--warmup",
        "0",
        "--speedups",
        "none",
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "speedup" not in result.stdout and "unpruned" not in result.stdout
    assert "segments (1): frames 0-15" in result.stdout  # segment level off: one segment


BAD_INPUTS = {
    # case: (what to change in the good command line, fragment of the one-paragraph error)
    "corrupt video": ({"--video": "corrupt.mp4"}, "cannot read this file as a video"),
    "text file as video": ({"--video": "notes.mp4"}, "cannot read this file as a video"),
    "missing video": ({"--video": "nope.mp4"}, "video file not found"),
    "video without frames": ({"--video": "empty.mkv"}, "holds no frames"),
    "model not on disk nor cached": ({"--model": "hieravid-test/no-such-model"}, "local_files_only=True"),
    "folder that is not a checkpoint": ({"--model": "folder"}, "it lacks the model config (config.json)"),
    "weights without tokenizer or processor": ({"--model": "weights-only"}, "it lacks the tokenizer"),
    "device torch does not know": ({"--device": "tpu"}, "not a device torch knows"),
    "trace onto a folder": ({"--trace": "folder"}, "is a folder"),
    "shipped policy by a wrong name": ({"--policy": "hieravid-35"}, "not the name of a shipped policy"),
    "invalid policy": ({"--policy": "bad.yaml"}, "frame.selector"),
    "missing policy": ({"--policy": "none.yaml"}, "policy file not found"),
    "zero frames": ({"--frames": "0"}, "positive integer"),
    "unknown dtype": ({"--dtype": "int3"}, "invalid choice"),
    "unknown speedups": ({"--speedups": "fastest"}, "invalid choice"),
    "CUDA without a GPU": ({"--device": "cuda"}, "no CUDA device is available"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_exits_2_with_one_paragraph(case: str, checkpoint: Path, tmp_path: Path) -> None:
    if case == "CUDA without a GPU":
        import torch

        if torch.cuda.is_available():
            pytest.skip("this machine has a GPU")
    (tmp_path / "corrupt.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"\xff" * 4000)
    (tmp_path / "notes.mp4").write_text("this is not a video\n" * 50)
    (tmp_path / "bad.yaml").write_text("version: 1\nkind: PruningPolicy\nname: bad\nframe: {selector: {kind: magic}}\n")
    video_stream_without_frames(tmp_path / "empty.mkv")
    (tmp_path / "folder").mkdir()
    (tmp_path / "weights-only").mkdir()
    for name in ("config.json", "model.safetensors"):
        (tmp_path / "weights-only" / name).write_bytes((checkpoint / name).read_bytes())
    options = {
        "--model": str(checkpoint),
        "--video": str(checkpoint / "demo.mp4"),
        "--question": "Q",
        "--policy": POLICY,
        "--frames": "8",
        "--max-new-tokens": "1",
    }
    changes, fragment = BAD_INPUTS[case]
    for key, value in changes.items():
        local = tmp_path / value
        options[key] = str(local) if key in ("--video", "--policy") or local.exists() else value
    if case == "shipped policy by a wrong name":
        options["--policy"] = "hieravid-35"
    args = [item for pair in options.items() for item in pair]
    result = hieravid("run", *args, cwd=tmp_path)
    assert result.returncode == 2, result.stdout + result.stderr
    assert fragment in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    assert "hieravid run: error:" in result.stderr or "usage:" in result.stderr
