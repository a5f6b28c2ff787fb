"""``hieravid demo``: the tiny model, the synthetic video, the detected segments, the outputs."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hieravid.apps.demo import (
    build_demo_model,
    build_demo_tokenizer,
    default_policy,
    demo_config,
    demo_video,
    format_demo,
    run_demo,
)
from hieravid.apps.trace import load_trace
from hieravid.policy import load_policy

REPO = Path(__file__).resolve().parents[1]


def test_default_policy_is_the_shipped_hieravid_30() -> None:
    assert default_policy() == load_policy(REPO / "policies" / "hieravid-30.yaml")


def test_bundled_config_builds_a_deterministic_tiny_model() -> None:
    config = demo_config()
    assert config["model_type"] == "llava_onevision" and "_comment" not in config
    first, second, other = build_demo_model(0), build_demo_model(0), build_demo_model(1)
    assert sum(p.numel() for p in first.parameters()) < 2_000_000
    for (name, a), b in zip(first.state_dict().items(), second.state_dict().values()):
        assert torch.equal(a, b), name
    assert any(not torch.equal(a, c) for a, c in zip(first.state_dict().values(), other.state_dict().values()))


def test_tokenizer_round_trips_text_and_places_the_video_token() -> None:
    tokenizer = build_demo_tokenizer()
    text = "Qué pasa? 🙂"
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "Q"}]}],
        add_generation_prompt=True,
        tokenize=False,
    )
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert ids.count(demo_config()["video_token_index"]) == 1
    assert prompt.endswith("<|im_start|>assistant\n")


@pytest.mark.parametrize("frames", [16, 24])
def test_segments_match_the_scene_cuts(frames: int) -> None:
    demo = run_demo(None, frames=frames, max_new_tokens=2)
    assert len(demo.video.cuts) == 3
    assert demo.detected_cuts == list(demo.video.cuts)
    assert demo.cuts_match
    stats = demo.result.stats
    assert stats.pruned and len(stats.stages) == 3
    kept = [stats.input_kept_positions[0].numel(), *(s.video_tokens_after[0] for s in stats.stages)]
    assert kept == sorted(kept, reverse=True) and kept[-1] > 0
    assert "→ match" in format_demo(demo)


def test_demo_command_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    result = subprocess.run(
        [sys.executable, "-m", "hieravid.apps.cli", "demo", "--out", str(out)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    text = result.stdout
    true_cuts = re.search(r"scene cuts \(true\):\s+(\[.*\])", text).group(1)
    found_cuts = re.search(r"segment cuts \(found\):\s+(\[.*?\])", text).group(1)
    assert true_cuts == found_cuts == "[6, 16, 23]"
    assert "→ match" in text
    assert "segments (4): frames 0-5, 6-15, 16-22, 23-31" in text
    for layer in range(4):
        assert re.search(rf"^\s+{layer}\s+\d+\s+\d+\s+[01]\.\d{{3}}", text, re.MULTILINE), layer
    assert text.count("← stage") == 3
    assert "TTFT" in text and "LLM prefill" in text and "speedup" in text
    assert (out / "demo.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "demo.mp4").stat().st_size > 1000
    (trace,) = load_trace(out / "trace.safetensors")
    assert trace.cuts() == [6, 16, 23] and trace.info["true_cuts"] == [6, 16, 23]
    assert trace.thumbnails is not None and trace.thumbnails.shape[0] == 32
    assert trace.policy["name"] == "hieravid-30" and trace.plan["spec"]["rows"] == 8
    assert [stage.layer for stage in trace.stages] == [1, 2, 3]
    # The merge map agrees with what the runtime kept; within-scene frames are redundant, cut frames are not.
    assert trace.merge_target is not None and torch.equal(torch.unique(trace.merge_target), trace.input_kept)
    assert trace.merge_target.numel() == 32 * 64 and bool((trace.merge_target <= torch.arange(32 * 64)).all())
    redundancy = trace.frame_redundancy.tolist()
    assert [f for f, c in enumerate(redundancy) if c < 0.4] == [0, 6, 16, 23]
    # The picture's per-level counts are the printed table's (content and newline tokens, as N_v counts them).
    from hieravid.apps.viz import level_video_tokens

    printed = [int(re.search(r"segment level \(merge\)\s+(\d+)", text).group(1))]
    printed += [int(n) for n in re.findall(r"stage @ layer \d+\s+(\d+)", text)]
    assert level_video_tokens(trace) == printed
    # When the toy model is not faster pruned, the demo says why (both runs are warmed up first).
    speedup = float(re.search(r"speedup:\s+TTFT ×([0-9.]+)", text).group(1))
    assert ("why no speedup here" in text) == (speedup <= 1.0), text


def test_demo_video_is_the_bundled_geometry() -> None:
    video = demo_video(32)
    assert video.frames.shape == (32, 128, 128, 3) and video.cuts == (6, 16, 23)
    with pytest.raises(Exception, match="at least 8 frames"):
        demo_video(4)


def test_demo_rejects_a_bad_policy(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: 1\nkind: PruningPolicy\nname: x\nsegment: {merge_ratio: 2}\n")
    result = subprocess.run(
        [sys.executable, "-m", "hieravid.apps.cli", "demo", "--policy", str(bad), "--out", str(tmp_path / "o")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2 and "merge_ratio" in result.stderr and "Traceback" not in result.stderr


def test_the_readme_names_what_the_demo_writes() -> None:
    from hieravid.apps.cli import build_parser

    readme = (REPO / "README.md").read_text(encoding="utf-8")
    folder = build_parser().parse_args(["demo"]).out
    for name in ("demo.png", "trace.safetensors", "demo.mp4"):
        assert f"`{folder}/{name}`" in readme, name
    assert "`hieravid demo --export DIR`" in readme
    assert f"/{folder}/" in (REPO / ".gitignore").read_text().splitlines()
