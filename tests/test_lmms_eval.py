"""The lmms-eval plugin with the real lmms-eval package: entry-point registration, synthetic requests
through the model classes, and the ``lmms_eval`` command on a synthetic video task.

Needs lmms-eval (``pip install -e ".[eval-core]" && pip install --no-deps "lmms-eval==0.7.3"`` on a CPU-only
torch; see docs/evaluation.md); skipped where it is not installed.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("lmms_eval", reason="lmms-eval is not installed (see docs/evaluation.md)")

from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms

from hieravid.apps.demo import save_demo_checkpoint
from hieravid.apps.trace import load_trace
from hieravid.apps.video import write_video

REPO = Path(__file__).resolve().parents[1]
POLICY = str(REPO / "policies" / "hieravid-30.yaml")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from hieravid.apps.demo import demo_video

    root = tmp_path_factory.mktemp("lmms")
    folders = {arch: save_demo_checkpoint(root / arch, architecture=arch) for arch in ("llava_onevision", "qwen2_vl")}
    folders["video"] = write_video(root / "scenes.mp4", demo_video(32).frames)
    # Batches: another video of the same geometry with other content, and a shorter one (12 frames: LLaVA cannot
    # batch it with the 16-frame samples, Qwen2-VL can).
    folders["other"] = write_video(root / "other.mp4", demo_video(32, seed=7).frames)
    folders["short"] = write_video(root / "short.mp4", demo_video(12, seed=3).frames)
    return folders


def test_models_are_registered_through_the_entry_point() -> None:
    from lmms_eval.models import MODEL_REGISTRY_V2

    from hieravid.integrations.lmms_eval import models

    expected = {
        "hieravid_llava_onevision": models.HieravidLlavaOnevision,
        "hieravid_llava_video": models.HieravidLlavaOnevision,
        "hieravid_qwen2_vl": models.HieravidQwen2VL,
        "hieravid_qwen2_5_vl": models.HieravidQwen2VL,
    }
    for name, cls in expected.items():
        resolved = MODEL_REGISTRY_V2.get_model_class(name)
        assert resolved is cls and issubclass(resolved, lmms) and resolved.is_simple


def _requests(
    video: Path | list[Path],
    count: int,
    task: str = "synthetic",
    questions: list[str] | None = None,
    new_tokens: int = 3,
) -> tuple[list[Instance], dict]:
    videos = video if isinstance(video, list) else [video] * count
    questions = questions or [f"Question {i}: how many scenes?" for i in range(count)]
    docs = [{"video": str(videos[i]), "question": questions[i]} for i in range(count)]
    requests = [
        Instance(
            request_type="generate_until",
            idx=0,
            arguments=(
                doc["question"],
                {"max_new_tokens": new_tokens, "until": ["\n\n"], "temperature": 0},
                lambda d: [d["video"]],
                index,
                task,
                "test",
            ),
            metadata={"task": task, "doc_id": index, "repeats": 1},
        )
        for index, doc in enumerate(docs)
    ]
    return requests, {task: {"test": docs}}


@pytest.mark.parametrize(
    ("arch", "name"), [("llava_onevision", "hieravid_llava_onevision"), ("qwen2_vl", "hieravid_qwen2_vl")]
)
def test_synthetic_requests(checkpoints: dict[str, Path], tmp_path: Path, arch: str, name: str) -> None:
    from lmms_eval.models import get_model

    cls = get_model(name)
    trace_path = tmp_path / "trace.safetensors"
    model = cls.create_from_arg_string(
        f"pretrained={checkpoints[arch]},policy={POLICY},max_frames_num=16,device=cpu,trace={trace_path}"
    )
    requests, task_dict = _requests(checkpoints["video"], 2)
    model.task_dict = task_dict
    answers = model.generate_until(requests)
    assert len(answers) == 2 and all(isinstance(answer, str) for answer in answers)
    assert answers[0] == answers[1]  # same video, same question up to the index digit: greedy is deterministic
    stats = model.last_stats
    assert stats is not None and stats.pruned and len(stats.stages) == 3
    assert stats.stages[-1].video_tokens_after[0] < stats.videos[0]["video_tokens"] // 4
    traces = load_trace(trace_path)
    assert len(traces) == 2 and traces[0].policy["name"] == "hieravid-30"
    assert traces[0].merge_target is not None and traces[0].thumbnails is not None

    unpruned = cls.create_from_arg_string(f"pretrained={checkpoints[arch]},policy=none,max_frames_num=16,device=cpu")
    unpruned.task_dict = task_dict
    assert len(unpruned.generate_until(requests[:1])) == 1 and unpruned.last_stats is None


def test_wrong_architecture_and_bad_arguments_are_refused(checkpoints: dict[str, Path]) -> None:
    from lmms_eval.models import get_model

    with pytest.raises(Exception, match="qwen2_vl"):
        get_model("hieravid_llava_onevision").create_from_arg_string(f"pretrained={checkpoints['qwen2_vl']}")
    with pytest.raises(ValueError, match="unknown model_args"):
        get_model("hieravid_qwen2_vl").create_from_arg_string(f"pretrained={checkpoints['qwen2_vl']},colour=red")
    for value in ("auto", "auto:4", 0, "-2", "two", 2.5, True):
        with pytest.raises(ValueError, match="batch_size"):
            get_model("hieravid_qwen2_vl").create_from_arg_string(
                f"pretrained={checkpoints['qwen2_vl']}", {"batch_size": value}
            )
    model = get_model("hieravid_qwen2_vl").create_from_arg_string(
        f"pretrained={checkpoints['qwen2_vl']},device=cpu", {"batch_size": "4", "max_batch_size": 8}
    )
    assert model.batch_size == 4


#: Batches of 3 over 8 requests: videos (``A`` the scenes, ``B`` other content, ``C`` 12 frames) and questions of
#: different lengths, so prompts are left-padded. Qwen2-VL batches mix frame counts: [A B A] [C B A] [A B]; LLaVA
#: needs one frame count per batch: [A B A] [C] [B A A] [B].
BATCH_ORDER = "ABACBAAB"
BATCH_SIZES = {"qwen2_vl": [3, 3, 2], "llava_onevision": [3, 1, 3, 1]}
QUESTIONS = [
    "How many scenes?",
    "What colour is the first scene, and how does the pattern move from frame to frame?",
    "Describe it.",
    "Which scene comes after the stripes and before the rings, if there is one at all?",
    "Count the cuts.",
    "Is the checkerboard shown before or after the blobs?",
    "Why?",
    "Name every scene of the video in the order in which they appear, from the first to the last one.",
]


def _assert_same_trace(got: Any, want: Any) -> None:
    """A request's trace in a batch against its trace alone.

    The input level runs on the video's embeddings before the language model and is bit-identical. The stages keep
    the same number of tokens (budgets come from the sample's own counts), but not always the same ones: left
    padding changes the float32 rounding of attention over the padded keys (a prompt padded by 37 tokens, alone
    in a batch of one, differs from the unpadded prompt by 2e-8 after layer 0; a batch of unpadded copies is
    bit-identical), and the selector can swap a near-tied token (seen once: 1 of 317 tokens of one request at the
    first stage of the random LLaVA, with stage-1 relevance differing by 6e-10 and hidden states by 3e-8).
    """
    for name in ("frames", "rows", "cols", "newline_tokens", "layer_video_tokens", "plan", "info"):
        assert getattr(got, name) == getattr(want, name), name
    for name in ("frame_segment_ids", "segment_values", "input_kept", "merge_target", "frame_redundancy", "thumbnails"):
        assert torch.equal(getattr(got, name), getattr(want, name)), name
    assert [stage.layer for stage in got.stages] == [stage.layer for stage in want.stages]
    for stage, other in zip(got.stages, want.stages):
        assert stage.kept.numel() == other.kept.numel() and stage.newlines_kept == other.newlines_kept
        swapped = len(set(stage.kept.tolist()) - set(other.kept.tolist()))
        assert swapped <= max(2, stage.kept.numel() // 20), f"layer {stage.layer}: {swapped} tokens differ"


@pytest.mark.parametrize("policy", [POLICY, "none"], ids=["hieravid-30", "none"])
@pytest.mark.parametrize(
    ("arch", "name"), [("llava_onevision", "hieravid_llava_onevision"), ("qwen2_vl", "hieravid_qwen2_vl")]
)
def test_batched_answers_equal_batch_size_one(
    checkpoints: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, arch: str, name: str, policy: str
) -> None:
    """--batch_size 3 answers every request as --batch_size 1 does (token for token), each sample pruned on its own
    video: the same kept tokens at every level; the model really ran batches of several left-padded prompts."""
    from lmms_eval.models import get_model

    import hieravid.apps.run as run

    videos = {"A": checkpoints["video"], "B": checkpoints["other"], "C": checkpoints["short"]}
    requests, task_dict = _requests(
        [videos[v] for v in BATCH_ORDER], len(BATCH_ORDER), questions=QUESTIONS, new_tokens=5
    )
    pruned = policy != "none"
    results = {}
    original = run.batch_answer_ids
    for batch_size in (1, 3):
        trace = tmp_path / f"trace{batch_size}.safetensors"
        model = get_model(name).create_from_arg_string(
            f"pretrained={checkpoints[arch]},policy={policy},max_frames_num=16,device=cpu"
            + (f",trace={trace}" if pruned else ""),
            {"batch_size": batch_size},
        )
        model.task_dict = task_dict
        prefills: list[tuple[int, int]] = []  # (batch, padded prompt length) of every forward that is a prefill

        def record(module: Any, args: Any, kwargs: dict[str, Any], prefills: list = prefills) -> None:
            ids = kwargs.get("input_ids")
            if ids is not None and ids.shape[1] > 1:
                prefills.append(tuple(ids.shape))

        hook = model.model.register_forward_pre_hook(record, with_kwargs=True)
        ids: list[list[int]] = []

        def answer_ids(*args: Any, ids: list = ids, original: Any = original) -> list[list[int]]:
            rows = original(*args)
            ids.extend(rows)
            return rows

        monkeypatch.setattr(run, "batch_answer_ids", answer_ids)
        answers = model.generate_until(requests)
        hook.remove()
        assert [batch for batch, _ in prefills] == ([1] * len(requests) if batch_size == 1 else BATCH_SIZES[arch])
        if batch_size > 1:
            assert model.last_batch_size == BATCH_SIZES[arch][-1]
            if pruned:
                assert model.last_stats.batch_size == BATCH_SIZES[arch][-1]
                assert len(model.last_stats.videos) == BATCH_SIZES[arch][-1]
        assert len(answers) == len(requests) and all(isinstance(answer, str) for answer in answers)
        results[batch_size] = (answers, ids, load_trace(trace) if pruned else None, prefills)
    (answers1, ids1, traces1, prefills1), (answers3, ids3, traces3, prefills3) = results[1], results[3]
    assert ids3 == ids1 and answers3 == answers1
    if not pruned:
        assert len({tuple(row) for row in ids1}) > 1  # the requests do not all get one answer
    # Each batch's prompt is its longest sample's prompt, and every batch of several samples was left-padded.
    own, start = [length for _, length in prefills1], 0
    for batch, length in prefills3:
        lengths, start = own[start : start + batch], start + batch
        assert length == max(lengths) and (batch == 1 or min(lengths) < length)
    if pruned:
        assert len(traces3) == len(traces1) == len(requests)
        for got, want in zip(traces3, traces1):
            _assert_same_trace(got, want)
        pairs = [(a.kept, b.kept) for got, want in zip(traces3, traces1) for a, b in zip(got.stages, want.stages)]
        assert sum(torch.equal(a, b) for a, b in pairs) >= 0.8 * len(pairs)  # swaps are rare rounding accidents
        # Each sample is pruned on its own content: the two 16-frame videos keep different tokens (the random LLaVA
        # answers every request alike once pruned, so the answers alone would not show it).
        first_a, first_b = traces1[BATCH_ORDER.index("A")], traces1[BATCH_ORDER.index("B")]
        assert not torch.equal(first_a.stages[-1].kept, first_b.stages[-1].kept)


TASK_YAML = """\
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
task: hieravid_synthetic
test_split: test
output_type: generate_until
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_target: answer
generation_kwargs:
  max_new_tokens: 3
  temperature: 0
  do_sample: false
process_results: !function utils.process_results
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
metadata:
  - version: 0.0
"""

TASK_UTILS = """\
def doc_to_visual(doc):
    return [doc["video"]]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["question"] + "\\nAnswer with the option's letter."


def process_results(doc, results):
    return {"exact_match": float(results[0].strip()[:1] == doc["answer"])}
"""


def test_lmms_eval_command_on_a_synthetic_video_task(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    task = tmp_path / "task"
    task.mkdir()
    data = task / "data.jsonl"
    data.write_text(
        "".join(
            json.dumps(
                {
                    "video": str(checkpoints["video"]),
                    "question": f"Q{i}: {'how many? ' * i}A. two B. four",
                    "answer": "B",
                }
            )
            + "\n"
            for i in range(3)
        )
    )
    (task / "hieravid_synthetic.yaml").write_text(TASK_YAML.format(data=data))
    (task / "utils.py").write_text(TASK_UTILS)
    out = tmp_path / "out"
    trace = tmp_path / "eval-trace.safetensors"
    command = [
        sys.executable,
        "-m",
        "lmms_eval",
        "--model",
        "hieravid_llava_onevision",
        "--model_args",
        f"pretrained={checkpoints['llava_onevision']},policy={POLICY},max_frames_num=16,device=cpu,trace={trace}",
        "--tasks",
        "hieravid_synthetic",
        "--include_path",
        str(task),
        "--batch_size",
        "2",
        "--limit",
        "3",
        "--output_path",
        str(out),
        "--log_samples",
    ]
    result = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "hieravid_synthetic" in result.stdout and "exact_match" in result.stdout
    (results_file,) = out.rglob("*_results.json")
    results = json.loads(results_file.read_text())
    assert "exact_match,none" in results["results"]["hieravid_synthetic"]
    assert results["config"]["model"] == "hieravid_llava_onevision"
    (samples_file,) = out.rglob("*_samples_hieravid_synthetic.jsonl")
    assert len(samples_file.read_text().splitlines()) == 3
    assert results["config"]["batch_size"] == "2"
    assert len(load_trace(trace)) == 3  # one entry per request: a batch of 2, then one of 1


def test_data_parallel_command_on_two_cpu_processes(tmp_path: Path) -> None:
    """benchmarks/lmms_eval_dp.py at tiny size: the synthetic task in one process, then in two (torchrun, gloo);
    every sample evaluated exactly once (logged once, its video read by one of the two processes) and every
    sample's output equal to the one-process output. The same script runs the full-size model on two GPUs."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("lmms_eval_dp", REPO / "benchmarks" / "lmms_eval_dp.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    argv = ["--size", "tiny", "--device", "cpu", "--samples", "5", "--frames", "8", "--new-tokens", "3"]
    assert script.main([*argv, "--work", str(tmp_path / "work"), "--out", str(tmp_path / "out")]) == 0
    report = json.loads((tmp_path / "out" / "lmms_eval_dp.json").read_text())
    single, parallel = report["runs"]
    assert (single["processes"], parallel["processes"]) == (1, 2)
    check = report["checks"]["hieravid-30"]
    assert check["logged_once"] and check["read_by_one_process"] and check["same_outputs"]
    assert check["processes_that_read"] == 2  # really sharded: 3 samples on rank 0, 2 on rank 1
    assert sorted(len(ids) for ids in parallel["ids_by_rank"].values()) == [2, 3]
    assert parallel["outputs"] == single["outputs"] and sorted(map(int, single["outputs"])) == list(range(5))
    assert all(run["samples_per_s"] > 0 and run["generation_s"] < run["command_s"] for run in report["runs"])
