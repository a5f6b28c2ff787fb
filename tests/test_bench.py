"""`hieravid bench` end to end on the tiny models (CPU): the report's fields, the table, the sweep plot and the
profile. Speed itself is measured on a GPU (benchmarks/results/), never asserted here."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hieravid.apps.cli import main

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_report(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, str, Path]:
    out = tmp_path_factory.mktemp("bench") / "report.json"
    import contextlib
    import io

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = main(
            [
                "bench",
                "--size",
                "tiny",
                "--device",
                "cpu",
                "--dtype",
                "float32",
                "--runs",
                "1",
                "--warmup",
                "0",
                "--decode-tokens",
                "2",
                "--model",
                "llava-onevision-7b",
                "--policy",
                str(ROOT / "policies" / "hieravid-30.yaml"),
                "--sweep",
                "8,16",
                "--profile",
                "--cuda-graphs",
                "--out",
                str(out),
            ]
        )
    assert code == 0
    return json.loads(out.read_text()), printed.getvalue(), out


def test_report_holds_every_measurement(tiny_report) -> None:
    report, _, _ = tiny_report
    assert report["settings"]["cuda_graphs"] is True and report["settings"]["runs"] == 1
    (model,) = report["models"]
    unpruned, alone, pruned = model["results"]
    assert unpruned["policy"] == "unpruned" and pruned["policy"] == "hieravid-30"
    # The floor: the model's own layers on the realised per-layer rows, measured in the same run.
    assert pruned["layer_sequence_lengths"] and pruned["floor_llm_prefill_ms"] > 0
    assert pruned["prefill_vs_floor"] == pytest.approx(pruned["llm_prefill_ms"] / pruned["floor_llm_prefill_ms"])
    assert unpruned["floor_llm_prefill_ms"] is None
    # The stock model, then the speedups alone (exact: the default), then each policy with them.
    assert report["settings"]["speedups"] == "exact"
    assert (unpruned["speedups"], alone["speedups"], pruned["speedups"]) == ("none", "exact", "exact")
    assert alone["policy"] == "unpruned+exact" and alone["retention"] == 1.0 and alone["decode_step_ms"] is None
    assert all(result["vision_ms"] > 0 for result in (unpruned, alone, pruned))
    assert alone["ttft_speedup"] == pytest.approx(unpruned["ttft_ms"] / alone["ttft_ms"])
    for key in ("llm_prefill_ms", "ttft_ms", "decode_ms_per_token", "decode_step_ms", "kv_cache_bytes"):
        assert pruned[key] is not None and unpruned[key] is not None, key
    assert pruned["kv_cache_bytes"] < unpruned["kv_cache_bytes"]
    assert 0.2 < pruned["retention"] < 0.4 and 0 < pruned["flops_ratio"] < pruned["retention"] + 0.05
    assert pruned["ideal_llm_prefill_ms"] == pytest.approx(unpruned["llm_prefill_ms"] * pruned["flops_ratio"])
    assert pruned["prefill_vs_ideal"] == pytest.approx(pruned["llm_prefill_ms"] / pruned["ideal_llm_prefill_ms"])
    assert set(pruned["pruning_overhead_ms"]) >= {"hieravid/segment_level", "hieravid/stage_1"}
    assert len(pruned["realised_video_tokens"]) == model["spec"]["num_layers"]


def test_sweep_profile_and_table(tiny_report) -> None:
    report, printed, out = tiny_report
    plots = list(out.parent.glob("*.png"))
    assert len(plots) == 1 and plots[0].stat().st_size > 1000
    rows = report["frames_sweep"]["rows"]
    assert [row["frames"] for row in rows] == [8, 16]
    assert all(row["pruned_prefill_ms"] > 0 and 0 < row["flops_ratio"] < 1 for row in rows)
    assert report["profile"]["top_ops"] and "hieravid/stage_1" in report["profile"]["hieravid_ranges_ms"]
    assert "CUDA graphs (input level, prefills)" in printed and "hieravid-30" in printed and "vs ideal" in printed
    assert "speedups: exact" in printed and "vision ms" in printed and "unpruned+exact" in printed


def test_help_documents_the_options(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    text = capsys.readouterr().out
    for option in (
        "--model",
        "--policy",
        "--frames",
        "--runs",
        "--warmup",
        "--decode-tokens",
        "--sweep",
        "--profile",
        "--out",
        "--cudnn-sdp",
        "--cuda-graphs",
        "--speedups",
        "qwen2.5-vl-7b",
    ):
        assert option in text, option


@pytest.mark.parametrize("name", ["qwen2-vl-7b", "qwen2.5-vl-7b", "qwen3-vl-8b"])
def test_qwen_decode_steps(name: str, tmp_path: Path) -> None:
    """Hand-driven decode steps need explicit positions on M-RoPE models (regression: the H100 run failed);
    Qwen2.5-VL's tiny case has windowed and full-attention vision blocks, timed with and without speedups."""
    import contextlib
    import io

    out = tmp_path / "qwen.json"
    with contextlib.redirect_stdout(io.StringIO()):
        assert (
            main(
                [
                    "bench",
                    "--size",
                    "tiny",
                    "--device",
                    "cpu",
                    "--dtype",
                    "float32",
                    "--runs",
                    "1",
                    "--warmup",
                    "0",
                    "--decode-tokens",
                    "2",
                    "--model",
                    name,
                    "--policy",
                    str(ROOT / "policies" / "hieravid-30.yaml"),
                    "--out",
                    str(out),
                ]
            )
            == 0
        )
    results = json.loads(out.read_text())["models"][0]["results"]
    assert [result["speedups"] for result in results] == ["none", "exact", "exact"]
    assert all(result["decode_step_ms"] > 0 for result in results if result["policy"] != "unpruned+exact")
    assert all(result["vision_ms"] > 0 for result in results)


def test_profile_decode_reports_steps_and_syncs() -> None:
    from hieravid.apps.bench import build_case, profile_decode

    case = build_case("llava-onevision-7b", size="tiny", device="cpu", dtype="float32")
    rows = [
        profile_decode(case, policy, steps=2, device="cpu")
        for policy in (None, str(ROOT / "policies" / "hieravid-30.yaml"))
    ]
    assert rows[0]["policy"] == "unpruned"
    for row in rows:
        assert row["step_ms_median"] > 0 and row["top_cpu_ops"] and row["gpu_ms_per_step"] is None
    # A pruned decode step reads the device no more often than the unpruned model's own step.
    assert rows[1]["host_syncs_per_step"] <= rows[0]["host_syncs_per_step"]


def test_internvl_bench_runs_the_tiny_model(tmp_path: Path) -> None:
    """InternVL3.5's tiny case (Qwen3 text, frames as one-tile images with labels between them) runs end to end: the
    video is found and pruned, and the vision time is that of get_image_features (frames are images)."""
    import contextlib
    import io

    out = tmp_path / "internvl.json"
    argv = ["bench", "--size", "tiny", "--device", "cpu", "--dtype", "float32", "--runs", "1", "--warmup", "0"]
    argv += ["--decode-tokens", "2", "--frames", "8", "--model", "internvl3.5-8b"]
    argv += ["--policy", str(ROOT / "policies" / "hieravid-30.yaml"), "--out", str(out)]
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(argv) == 0
    model = json.loads(out.read_text())["models"][0]
    results = {result["policy"]: result for result in model["results"]}
    assert set(results) >= {"unpruned", "hieravid-30"}
    pruned, unpruned = results["hieravid-30"], results["unpruned"]
    assert pruned["vision_ms"] > 0 and unpruned["vision_ms"] > 0 and pruned["decode_step_ms"] > 0
    assert pruned["kv_cache_bytes"] < unpruned["kv_cache_bytes"] and 0.2 < pruned["retention"] < 0.4


def test_batched_rows_match_each_sample_alone(tmp_path: Path) -> None:
    """--batch 1 2 --ragged: videos/s and the first token of every sample, batched (left-padded when ragged) equal to
    the sample run alone within the conformance tolerance (fp32), pruned and unpruned."""
    import contextlib
    import io

    out = tmp_path / "batch.json"
    printed = io.StringIO()
    argv = ["bench", "--size", "tiny", "--device", "cpu", "--dtype", "float32", "--runs", "1", "--warmup", "0"]
    argv += ["--model", "llava-onevision-7b", "--frames", "8", "--policy", str(ROOT / "policies" / "hieravid-30.yaml")]
    with contextlib.redirect_stdout(printed):
        assert main([*argv, "--batch", "1", "2", "--ragged", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["settings"]["batch"] == [1, 2] and report["settings"]["ragged"] is True and not report["models"]
    equal, ragged = report["batches"]
    assert (equal["ragged"], ragged["ragged"]) == (False, True) and equal["frames"] == 8
    for entry in (equal, ragged):
        rows = entry["results"]
        assert [(row["batch"], row["policy"]) for row in rows] == [
            (1, "unpruned"),
            (1, "hieravid-30"),
            (2, "unpruned"),
            (2, "hieravid-30"),
        ]
        for row in rows:
            assert (
                row["videos_per_s"] == pytest.approx(row["batch"] * 1000 / row["ttft_ms"]) and row["videos_per_s"] > 0
            )
            assert row["max_abs_logit_diff_vs_alone"] <= 1e-4, row
            assert len(row["first_tokens"]) == len(row["prompt_lengths"]) == row["batch"]
            assert row["peak_memory_bytes"] is None  # CPU: no CUDA allocator to read
        pruned = [row for row in rows if row["policy"] == "hieravid-30"]
        assert all(0.2 < row["retention"] < 0.4 and row["speedup_vs_unpruned"] > 0 for row in pruned)
        assert pruned[1]["first_tokens"][0] == pruned[0]["first_tokens"][0]
    lengths = ragged["results"][-1]["prompt_lengths"]
    assert lengths[1] - lengths[0] == 8 and len(set(equal["results"][-1]["prompt_lengths"])) == 1
    text = printed.getvalue()
    assert "videos/s" in text and "ragged prompts" in text and "equal prompts" in text


def test_batch_samples_are_distinct_videos_pruned_alone() -> None:
    """The comparison above means something: the two samples have different videos and get different first-token
    logits alone, so a batch that mixed them up would miss the 1e-4 tolerance by far."""
    import torch

    from hieravid.apps.bench import BatchSamples, bench_batch, build_case

    case = build_case("llava-onevision-7b", frames=8, size="tiny", device="cpu", dtype="float32")
    samples = BatchSamples(case, ragged=False)
    row = bench_batch(samples, str(ROOT / "policies" / "hieravid-30.yaml"), 2, runs=1, warmup=0, device="cpu")
    assert row.max_abs_logit_diff_vs_alone <= 1e-4
    first, second = samples.sample(0), samples.sample(1)
    assert first["input_ids"].shape == second["input_ids"].shape  # equal lengths: no padding in this batch
    assert not torch.equal(first["pixel_values_videos"], second["pixel_values_videos"])
    alone = samples.alone_logits
    assert (alone["hieravid-30", 0] - alone["hieravid-30", 1]).abs().max() > 1e-2
