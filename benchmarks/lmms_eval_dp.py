"""Data-parallel lmms-eval with hieravid: one process against ``accelerate launch --num_processes N``, offline.

Writes a random-weight LLaVA-OneVision checkpoint with processor files (``--size full``: 7B-shaped, SigLIP-so400m and
Qwen2-7B sizes of ``hieravid.apps.bench``, bf16 safetensors, built on the GPU; ``--size tiny``: the demo model) and a
local synthetic video task (``--samples`` short videos, each with its own content and question), then runs
``lmms_eval`` on it for each policy: once in one process, once under ``accelerate launch`` with ``--processes``
processes (one GPU each; ``--device cpu``: torchrun, gloo). It checks that the multi-process run
evaluated every sample exactly once (the logged samples, and the ranks that read each video) and that every
sample's output equals the one-process output, measures throughput (samples/s over the generation window, model
loading excluded, and over the whole command) and writes ``lmms_eval_dp.json`` to ``--out``. Exit status 1 when a
check fails.

On the two-H200 machine (Python 3.12; lmms-eval and its import-time dependencies are not installed and there is no
network). Wheels, downloaded here into ``.whl-eval/`` (``pip download --no-deps --only-binary=:all: --python-version
3.12 --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform
manylinux2014_x86_64 -d .whl-eval NAME==VERSION``): lmms_eval 0.7.3, av 18.1.0 (PyAV: hieravid reads and writes the
videos with it), datasets 5.2.0, dill 0.4.1, multiprocess 0.70.19, evaluate 0.4.6, loguru 0.7.3, pytablewriter 1.2.1,
DataProperty 1.1.1, mbstrdecoder 1.1.5, pathvalidate 3.3.1, tabledata 1.3.5, tcolorpy 0.1.7, typepy 1.3.5, chardet
6.0.0.post1, pytz 2026.6, tenacity 9.2.1; and pydantic's from ``.whl/`` (pydantic 2.14.4, pydantic_core 2.50.5,
annotated_types 0.8.0, typing_inspection 0.4.5). Install them and hieravid itself (its ``lmms_eval.models`` entry
point registers the model classes), then run::

    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl-eval/*.whl .whl/*.whl \\
      && python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --target /tmp/site . \\
      && export PYTHONPATH=/tmp/site HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 \\
      && python3 benchmarks/lmms_eval_dp.py --size full --processes 2 --samples 64 --out $OUT

On a CPU (the smoke test in tests/test_lmms_eval.py)::

    python benchmarks/lmms_eval_dp.py --size tiny --device cpu --samples 5 --frames 8 --out /tmp/dp
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

TASK = "hieravid_dp_synthetic"
TASK_YAML = """\
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
task: {task}
test_split: test
output_type: generate_until
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_target: answer
generation_kwargs:
  max_new_tokens: {new_tokens}
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
# The task records, per process, when it first reads a video (generation starts: the model is loaded) and when it
# first scores a result (generation is over), and which process read which sample.
TASK_UTILS = """\
import json
import os
import time

EVENTS = {events!r}


def _record(event, doc):
    rank = int(os.environ.get("RANK", "0"))
    with open(EVENTS, "a") as sink:
        sink.write(json.dumps({{"rank": rank, "event": event, "id": doc["id"], "time": time.time()}}) + "\\n")


def doc_to_visual(doc):
    _record("visual", doc)
    return [doc["video"]]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["question"]


def process_results(doc, results):
    _record("result", doc)
    return {{"exact_match": float(results[0].strip()[:1] == doc["answer"])}}
"""


def full_size_model(device: str) -> Any:
    """A LLaVA-OneVision-7B-shaped random-weight model (SigLIP-so400m/14 at 384 px, Qwen2-7B) in bf16, with the
    demo tokenizer's token ids so that the demo's tokenizer and chat template serve it."""
    import torch
    import transformers

    from hieravid.apps.bench import _QWEN2_7B_TEXT, SIGLIP_SO400M_VISION
    from hieravid.apps.demo import demo_config

    data = demo_config()
    data["vision_config"] = dict(SIGLIP_SO400M_VISION)
    data["text_config"] = {**data["text_config"], **_QWEN2_7B_TEXT}
    data["image_grid_pinpoints"] = [[384, 384], [384, 768], [768, 384], [768, 768]]
    config = transformers.LlavaOnevisionConfig.from_dict(data)
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.LlavaOnevisionForConditionalGeneration._from_config(config, dtype=torch.bfloat16)
    model.generation_config.pad_token_id = config.text_config.pad_token_id
    model.generation_config.eos_token_id = config.text_config.eos_token_id
    return model.eval()


def write_checkpoint(directory: Path, size: str, device: str) -> Path:
    from hieravid.apps.demo import save_demo_checkpoint

    if (directory / "config.json").exists():
        return directory
    if size == "tiny":
        return save_demo_checkpoint(directory)
    model = full_size_model(device)
    save_demo_checkpoint(directory, model=model)
    del model
    return directory


def write_task(directory: Path, samples: int, frames: int, new_tokens: int) -> tuple[Path, Path]:
    """The task folder (videos, data, YAML, utils) and the events file its utils append to."""
    from hieravid.apps.demo import demo_video
    from hieravid.apps.video import write_video

    directory.mkdir(parents=True, exist_ok=True)
    events = directory / "events.jsonl"
    rows = []
    for index in range(samples):
        video = directory / f"video{index:03d}.mp4"
        if not video.exists():
            write_video(video, demo_video(max(frames, 8), seed=index).frames)
        question = f"Q{index}: " + "how many scenes are there? " * (1 + index % 4) + "A. two B. four"
        rows.append({"id": index, "video": str(video), "question": question, "answer": "B"})
    data = directory / "data.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    (directory / f"{TASK}.yaml").write_text(TASK_YAML.format(data=data, task=TASK, new_tokens=new_tokens))
    (directory / "utils.py").write_text(TASK_UTILS.format(events=str(events)))
    return directory, events


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def run_lmms_eval(
    *,
    checkpoint: Path,
    task_dir: Path,
    events: Path,
    out: Path,
    policy: str,
    processes: int,
    device: str,
    frames: int,
    batch_size: int,
) -> dict[str, Any]:
    """One lmms-eval command; returns its timings and its logged samples by id."""
    lmms = ["-m", "lmms_eval", "--model", "hieravid_llava_onevision"]
    model_args = f"pretrained={checkpoint},policy={policy},max_frames_num={frames}"
    if processes == 1:
        model_args += f",device={'cpu' if device == 'cpu' else 'cuda:0'}"
        command = [sys.executable, *lmms]
    elif device == "cpu":
        # `accelerate launch --cpu` starts a single process (its multi-CPU launch needs MPI): torchrun starts the
        # processes, lmms-eval joins them in a gloo group and accelerate reads the rank from the environment.
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes)]
        command += ["--master_addr", "127.0.0.1", "--master_port", str(_free_port()), *lmms]
    else:
        command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(processes)]
        command += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--multi_gpu"]
        command += ["--main_process_port", str(_free_port()), *lmms]
    command += ["--model_args", model_args, "--tasks", TASK, "--include_path", str(task_dir)]
    command += ["--batch_size", str(batch_size), "--output_path", str(out), "--log_samples"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    if device == "cpu":
        env.update(OMP_NUM_THREADS="1", ACCELERATE_USE_CPU="1")  # one thread per process: no oversubscription
    events.unlink(missing_ok=True)
    start = time.time()
    # Not from the repository root: its `hieravid/` folder would shadow the installed package (which maps
    # `hieravid.adapters` to the checkout's `adapters/`).
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=task_dir)
    wall = time.time() - start
    found = list(out.rglob(f"*_samples_{TASK}.jsonl"))
    if result.returncode != 0 or len(found) != 1:  # lmms-eval logs an evaluation's error and exits 0
        raise RuntimeError(
            f"{' '.join(command)} failed ({result.returncode}, {len(found)} samples files):\n"
            f"{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
        )
    (samples_file,) = found
    logged = [json.loads(line) for line in samples_file.read_text().splitlines() if line.strip()]
    recorded = [json.loads(line) for line in events.read_text().splitlines()]
    visual = [event for event in recorded if event["event"] == "visual"]
    results = [event for event in recorded if event["event"] == "result"]
    first_result = {}
    for event in results:
        first_result[event["rank"]] = min(first_result.get(event["rank"], event["time"]), event["time"])
    generation = max(first_result.values()) - min(event["time"] for event in visual)
    return {
        "policy": policy,
        "processes": processes,
        "command_s": wall,
        "generation_s": generation,
        "samples_per_s": len(logged) / generation,
        "samples_per_s_command": len(logged) / wall,
        "outputs": {int(row["doc_id"]): row["filtered_resps"] for row in logged},
        "logged_ids": sorted(int(row["doc_id"]) for row in logged),
        "ids_by_rank": {
            str(rank): sorted({event["id"] for event in visual if event["rank"] == rank})
            for rank in sorted({event["rank"] for event in visual})
        },
    }


def check(single: dict[str, Any], parallel: dict[str, Any], samples: int) -> dict[str, Any]:
    """Every sample exactly once in the parallel run (logged once; read by exactly one process), and each sample's
    output equal to the one-process output."""
    everyone = list(range(samples))
    ranks = parallel["ids_by_rank"].values()
    read = sorted(index for ids in ranks for index in ids)
    differing = sorted(index for index in everyone if single["outputs"].get(index) != parallel["outputs"].get(index))
    return {
        "logged_once": parallel["logged_ids"] == everyone and single["logged_ids"] == everyone,
        "read_by_one_process": read == everyone,
        "processes_that_read": len(parallel["ids_by_rank"]),
        "same_outputs": not differing,
        # How much the comparison says: a random-weight model may give many samples one answer.
        "distinct_outputs": len({json.dumps(output) for output in single["outputs"].values()}),
        "differing_ids": differing,
        "speedup": parallel["samples_per_s"] / single["samples_per_s"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for lmms_eval_dp.json")
    parser.add_argument("--work", type=Path, default=Path("/tmp/hieravid-dp"), help="checkpoint, task, lmms-eval logs")
    parser.add_argument("--size", choices=["full", "tiny"], default="full")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--frames", type=int, default=32, help="frames per video, all sampled (max_frames_num)")
    parser.add_argument("--new-tokens", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=1, help="lmms-eval --batch_size per process")
    parser.add_argument("--policy", nargs="+", default=["hieravid-30"], help="shipped names, YAML paths or 'none'")
    args = parser.parse_args(argv)
    if min(args.processes, args.samples, args.frames, args.new_tokens, args.batch_size) < 1:
        parser.error("--processes, --samples, --frames, --new-tokens and --batch-size must be positive")
    from hieravid.policy import shipped_policies

    shipped = shipped_policies()
    started = time.time()
    checkpoint = write_checkpoint(args.work / f"checkpoint-{args.size}", args.size, args.device)
    task_dir, events = write_task(args.work / "task", args.samples, args.frames, args.new_tokens)
    prepared_s = time.time() - started
    report: dict[str, Any] = {
        "settings": {key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()},
        "prepare_s": prepared_s,
        "runs": [],
        "checks": {},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    ok = True
    for policy in args.policy:
        path = "none" if policy == "none" else str(shipped.get(policy, policy))
        runs = []
        for processes in (1, args.processes):
            out = args.work / f"out-{Path(policy).stem}-{processes}"
            runs.append(
                run_lmms_eval(
                    checkpoint=checkpoint,
                    task_dir=task_dir,
                    events=events,
                    out=out,
                    policy=path,
                    processes=processes,
                    device=args.device,
                    frames=args.frames,
                    batch_size=args.batch_size,
                )
            )
            print(
                f"{policy}, {processes} process(es): {runs[-1]['samples_per_s']:.2f} samples/s "
                f"({runs[-1]['generation_s']:.1f} s generating, {runs[-1]['command_s']:.1f} s in all)",
                flush=True,
            )
        result = check(runs[0], runs[1], args.samples)
        ok = ok and result["logged_once"] and result["read_by_one_process"] and result["same_outputs"]
        report["checks"][policy] = result
        report["runs"] += runs
        print(f"{policy}: {json.dumps(result)}", flush=True)
        (args.out / "lmms_eval_dp.json").write_text(json.dumps(report, indent=2) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
