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

import pytest

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


def _requests(video: Path, count: int, task: str = "synthetic") -> tuple[list[Instance], dict]:
    docs = [{"video": str(video), "question": f"Question {i}: how many scenes?"} for i in range(count)]
    requests = [
        Instance(
            request_type="generate_until",
            idx=0,
            arguments=(
                doc["question"],
                {"max_new_tokens": 3, "until": ["\n\n"], "temperature": 0},
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
    with pytest.raises(ValueError, match="batch size 1"):
        get_model("hieravid_qwen2_vl").create_from_arg_string(
            f"pretrained={checkpoints['qwen2_vl']}", {"batch_size": 4}
        )


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
            json.dumps({"video": str(checkpoints["video"]), "question": f"Q{i}: A. two B. four", "answer": "B"}) + "\n"
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
        "1",
        "--limit",
        "2",
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
    assert len(samples_file.read_text().splitlines()) == 2
    assert len(load_trace(trace)) == 2
