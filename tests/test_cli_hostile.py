"""The command line on hostile or careless input: exit 2 with one paragraph, never a traceback, and nothing written
or computed before the input is known to be usable (issue 17.7, 17.8, 17.9).

In-process through :func:`hieravid.apps.cli.main` (fast), except what needs a real pipe or process.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from hieravid.apps import cli
from hieravid.apps.trace import RequestTrace, StageTrace, save_trace

REPO = Path(__file__).resolve().parents[1]


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """``hieravid ARGS`` in-process: (exit status, stdout, stderr); argparse's exits become statuses."""
    try:
        code = cli.main(list(args))
    except SystemExit as exit_:
        code = int(exit_.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_paragraph(code: int, err: str, *fragments: str) -> None:
    assert code == 2, err
    assert "Traceback" not in err and "internal error" not in err, err
    assert err.strip() and "\n\n" not in err.strip(), err
    for fragment in fragments:
        assert fragment in err, (fragment, err)


# ---------------------------------------------------------------------------------------------- plan
@pytest.mark.parametrize("where", ["text", "vision"])
@pytest.mark.parametrize("number", ["1e400", "1" + "0" * 400, "1000000000"], ids=["1e400", "10**400", "10**9"])
def test_plan_on_a_config_with_an_absurd_number(capsys, tmp_path: Path, where: str, number: str) -> None:
    """Quickly: transformers builds one entry per layer from num_hidden_layers (10**9 used to hang ``plan``)."""
    config: dict = {"model_type": "llava_onevision", "text_config": {"model_type": "qwen2"}}
    if where == "text":
        config["text_config"]["num_hidden_layers"] = "__BIG__"
    else:
        config["vision_config"] = {"model_type": "siglip_vision_model", "patch_size": "__BIG__"}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config).replace('"__BIG__"', number))
    start = time.perf_counter()
    code, _, err = run(capsys, "plan", "hieravid-30", "--model", str(path))
    assert_one_paragraph(code, err, str(path))
    assert time.perf_counter() - start < 60


# ---------------------------------------------------------------------------------------------- run
def test_run_checks_device_and_trace_before_any_work(capsys, tmp_path: Path) -> None:
    base = ["run", "--model", str(tmp_path / "no-model"), "--video", str(tmp_path / "no-video.mp4"), "--question", "Q"]
    # The video and model do not exist: the errors below come first, so nothing was decoded or loaded.
    code, _, err = run(capsys, *base, "--policy", "hieravid-30", "--device", "tpu")
    assert_one_paragraph(code, err, "--device 'tpu': not a device torch knows")
    code, _, err = run(capsys, *base, "--policy", "hieravid-30", "--device", "meta")
    assert_one_paragraph(code, err, "no meta device is available")
    if not torch.cuda.is_available():
        code, _, err = run(capsys, *base, "--policy", "hieravid-30", "--device", "cuda:1")
        assert_one_paragraph(code, err, "no CUDA device")
    code, _, err = run(capsys, *base, "--policy", "hieravid-30", "--device", "cpu", "--trace", str(tmp_path))
    assert_one_paragraph(code, err, "--trace", "is a folder")
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    code, _, err = run(capsys, *base, "--policy", "hieravid-30", "--device", "cpu", "--trace", str(blocker / "t.st"))
    assert_one_paragraph(code, err, "is a file, not a folder")
    code, _, err = run(capsys, *base, "--policy", "hieravid-35", "--device", "cpu")
    assert_one_paragraph(code, err, "not the name of a shipped policy", "hieravid-30")
    code, _, err = run(capsys, *base, "--policy", "hieravid-30", "--device", "cpu")
    assert_one_paragraph(code, err, "video file not found")  # only now the video


# ---------------------------------------------------------------------------------------------- bench
def test_bench_follows_the_available_device_and_finds_its_policies_anywhere(capsys, tmp_path: Path, monkeypatch):
    from hieravid.apps import bench

    seen: dict = {}

    def fake_benchmark(models, policies, **options):
        seen.update(options, policies=list(policies))
        return {"environment": {}, "models": []}

    monkeypatch.setattr(bench, "run_benchmark", fake_benchmark)
    monkeypatch.setattr(bench, "format_report", lambda report: "report")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.chdir(tmp_path)  # outside the repository: no policies/ folder here
    code, _, err = run(capsys, "bench", "--size", "tiny")
    assert code == 0, err
    assert seen["device"] == "cpu"
    assert seen["policies"] == ["hieravid-10", "hieravid-20", "hieravid-30"]  # not an empty list: never unpruned only
    code, _, err = run(capsys, "bench")  # full size on a CPU would build 7B models
    assert_one_paragraph(code, err, "--size full", "needs a CUDA device", "--size tiny")
    code, _, err = run(capsys, "bench", "--size", "tiny", "--device", "cuda")
    assert_one_paragraph(code, err, "no CUDA device")
    code, _, err = run(capsys, "bench", "--size", "tiny", "--policy", "nope")
    assert_one_paragraph(code, err, "nope: no such policy file")
    code, _, err = run(capsys, "bench", "--size", "tiny", "--out", str(tmp_path))
    assert_one_paragraph(code, err, "--out", "is a folder")
    for option in ("--warmup", "--decode-tokens"):
        code, _, err = run(capsys, "bench", option, "-5")
        assert code == 2 and "non-negative integer" in err and "Traceback" not in err
    code, _, err = run(capsys, "bench", "--runs", "99999999999999999999999")
    assert code == 2 and "positive integer" in err


# ---------------------------------------------------------------------------------------------- demo
def test_demo_export_writes_only_into_a_new_or_empty_folder(capsys, tmp_path: Path) -> None:
    existing = tmp_path / "file"
    existing.write_text("mine")
    code, _, err = run(capsys, "demo", "--export", str(existing))
    assert_one_paragraph(code, err, "--export", "not a folder")
    assert existing.read_text() == "mine"
    checkpoint = tmp_path / "real-checkpoint"
    checkpoint.mkdir()
    (checkpoint / "config.json").write_text("{}")
    code, _, err = run(capsys, "demo", "--export", str(checkpoint))
    assert_one_paragraph(code, err, "not empty", "nothing was written")
    assert sorted(p.name for p in checkpoint.iterdir()) == ["config.json"]
    code, _, err = run(capsys, "demo", "--out", str(existing))
    assert_one_paragraph(code, err, "--out", "not a folder")
    code, _, err = run(capsys, "demo", "--out", str(tmp_path / "o"), "--frames", "3")
    assert_one_paragraph(code, err, "at least 8 frames")
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------------------------------------- viz
def _trace(**overrides: object) -> RequestTrace:
    fields: dict = dict(
        frames=4,
        rows=2,
        cols=2,
        newline_tokens=1,
        frame_segment_ids=torch.tensor([0, 0, 1, 1]),
        segment_values=torch.tensor([1.0, -1.0]),
        input_kept=torch.tensor([0, 1, 2, 3, 8, 9, 10, 11]),
        stages=[StageTrace(1, torch.tensor([0, 3, 8, 11]), 1), StageTrace(2, torch.tensor([3, 8]), 1)],
        layer_video_tokens=[9, 9, 5],
        policy={"name": "unit"},
    )
    fields.update(overrides)
    return RequestTrace(**fields)


def _write_raw(path: Path, tensors: dict, metadata: dict) -> Path:
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata=metadata)
    return path


def _corrupt_traces(tmp_path: Path) -> dict[str, Path]:
    """Trace files whose metadata or tensors a hostile or broken writer produced."""
    good = save_trace(tmp_path / "good.safetensors", _trace())
    from safetensors import safe_open

    with safe_open(str(good), framework="pt") as handle:
        metadata = handle.metadata()
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    scalars = json.loads(metadata["request.0"])
    cases: dict[str, tuple[dict, dict]] = {
        "num_requests not a number": ({}, {"num_requests": "many"}),
        "num_requests huge": ({}, {"num_requests": "9" * 30}),
        "metadata not JSON": ({}, {"request.0": "{not json"}),
        "metadata a list": ({}, {"request.0": "[1, 2]"}),
        "frames infinite": ({}, {"request.0": json.dumps({**scalars, "frames": "X"}).replace('"X"', "1e400")}),
        "rows huge": ({}, {"request.0": json.dumps({**scalars, "rows": 10**9})}),
        "stages not a list": ({}, {"request.0": json.dumps({**scalars, "stages": "abc"})}),
        "policy a list": ({}, {"request.0": json.dumps({**scalars, "policy": [1]})}),
        "layer tokens strings": ({}, {"request.0": json.dumps({**scalars, "layer_video_tokens": ["a"]})}),
        "merge_target out of range": ({"request.0.merge_target": torch.tensor([0, 1, 2, 3, 99, 5, 6, 7] * 2)}, {}),
        "segment ids as floats": ({"request.0.frame_segment_ids": torch.tensor([0.0, 0.0, 1.0, 1.0])}, {}),
        "segment ids negative": ({"request.0.frame_segment_ids": torch.tensor([-3, 0, 1, 1])}, {}),
        "kept as floats": ({"request.0.stage.0.kept": torch.tensor([0.5, 3.0])}, {}),
        "thumbnails as floats": ({"request.0.thumbnails": torch.zeros(4, 8, 8, 3)}, {}),
        "segment values NaN": ({"request.0.segment_values": torch.tensor([float("nan"), 1.0])}, {}),
    }
    paths = {}
    for index, (name, (tensor_changes, metadata_changes)) in enumerate(cases.items()):
        paths[name] = _write_raw(
            tmp_path / f"bad-{index}.safetensors", {**tensors, **tensor_changes}, {**metadata, **metadata_changes}
        )
    return paths


def test_viz_refuses_bad_traces_and_outputs(capsys, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    for name, path in _corrupt_traces(tmp_path).items():
        out = tmp_path / f"{path.stem}.png"
        code, _, err = run(capsys, "viz", str(path), "-o", str(out))
        assert_one_paragraph(code, err, str(path))
        assert not out.exists(), name
    good = tmp_path / "good.safetensors"
    folder = tmp_path / "pictures"
    folder.mkdir()
    code, out, err = run(capsys, "viz", str(good), "-o", str(folder))  # used to write pictures.png and print pictures
    assert_one_paragraph(code, err, "-o", "is a folder")
    assert not out and not (tmp_path / "pictures.png").exists() and not any(folder.iterdir())
    code, _, err = run(capsys, "viz", str(good), "-o", str(tmp_path / "picture"))
    assert_one_paragraph(code, err, "no extension", ".png, .svg or .pdf")
    code, out, err = run(capsys, "viz", str(good), "-o", str(tmp_path / "ok.svg"))
    assert code == 0 and out.strip() == f"wrote {tmp_path / 'ok.svg'}" and (tmp_path / "ok.svg").is_file()


# ---------------------------------------------------------------------------------------------- pipes
def test_output_cut_short_by_the_reader_ends_quietly() -> None:
    """``hieravid compare policies/**/*.yaml --json | head -1``: far more output than a pipe holds (about 120 kB for
    64 kB), and the reader leaves after one line."""
    files = sorted(str(path.relative_to(REPO)) for path in (REPO / "policies").rglob("*.yaml"))
    command = [sys.executable, "-m", "hieravid.apps.cli", "compare", *files, "--model", "llava-onevision-7b", "--json"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO)
    assert process.stdout is not None and process.stderr is not None
    first = process.stdout.readline()
    process.stdout.close()  # what `head -1` does
    err = process.stderr.read().decode()
    process.wait(timeout=120)
    assert first.strip() == b"["
    assert process.returncode == 0, err
    assert "Traceback" not in err and "BrokenPipeError" not in err and "Exception ignored" not in err, err


# ---------------------------------------------------------------------------------------------- policies
def test_policies_lists_and_prints_the_shipped_ones(capsys) -> None:
    code, out, _ = run(capsys, "policies")
    assert code == 0
    for name in ("hieravid-30", "none", "peers/fastv", "ablations/no-frame"):
        assert f"  {name} " in out
    code, out, _ = run(capsys, "policies", "hieravid-30")
    assert code == 0 and out == (REPO / "policies" / "hieravid-30.yaml").read_text()
    code, _, err = run(capsys, "policies", "hieravid-99")
    assert_one_paragraph(code, err, "hieravid-99")
    code, out, err = run(capsys, "plan", "hieravid-30", "--model", "llava-onevision-7b")
    assert code == 0 and "retention (mean over layers): 0.307" in out, err
    code, out, err = run(capsys, "validate", "hieravid-20", "peers/fastv")
    assert code == 0 and out.count(": ok") == 2, err
