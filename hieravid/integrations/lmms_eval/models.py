"""lmms-eval model classes that run a transformers VideoLLM with a hieravid policy applied.

One class serves each family; the architecture-specific parts (prompt, video preprocessing, token
layout) come from :mod:`hieravid.apps.run` and the runtime's adapters. ``model_args`` (comma-separated
``key=value``):

``pretrained``      checkpoint folder or Hub id (required)
``policy``          policy YAML path, or ``none`` for the unpruned model (default: hieravid-30)
``max_frames_num``  frames sampled uniformly per video (default: 32; Qwen2-VL rounds to even)
``device``          ``cuda``/``cpu`` (default: ``cuda`` when available; one GPU per process under accelerate)
``dtype``           ``auto``/``float16``/``bfloat16``/``float32`` (default: ``auto``: bf16 on GPU)
``max_new_tokens``  cap when the task gives none (default: 128)
``trace``           optional ``.safetensors`` path: every request's decisions are saved there at the end
                    (one file per process: ``name.rankN.safetensors`` when running data parallel)
``download``        ``true`` to allow fetching the checkpoint from the Hub (default: local/cache only)

``--batch_size N`` (a positive integer; ``auto`` is refused): consecutive requests with the same generation
arguments and the same video geometry (LLaVA: frames and token grid; Qwen2-VL: token grid, frame counts may
differ) run as one left-padded batch of up to N under one ``apply``; the others run in smaller batches. Each
sample is pruned on its own content (the runtime computes every sample's budgets from its own video), so with
greedy decoding the answers are those of batch size 1 up to the rounding that left padding brings (token for token
on the tiny models in the tests; see docs/evaluation.md). Answers keep the request order and a trace still holds
one entry per request.

Data parallel evaluation: ``accelerate launch --num_processes N -m lmms_eval ...``; each process loads
the model on its own GPU (on the CPU with ``accelerate launch --cpu``: gloo) and lmms-eval shards the requests by
rank.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms

from hieravid.errors import HieravidError

__all__ = ["HieravidLlavaOnevision", "HieravidQwen2VL", "HieravidVideoLMM"]


def _as_bool(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in {"1", "true", "yes", "on"}
    return bool(value)


def _batch_size(value: Any) -> int:
    """``batch_size`` as lmms-eval passes it (``--batch_size``: an int or its text)."""
    text = str(value).strip()
    if isinstance(value, bool) or not text.isdigit() or int(text) < 1:
        if text.lower().startswith("auto"):
            raise ValueError(
                f"batch_size={text}: hieravid lmms-eval models do not pick a batch size automatically (a batch's "
                "memory depends on its videos); pass --batch_size N with a positive integer N"
            )
        raise ValueError(f"batch_size={text!r}: expected a positive integer (--batch_size N)")
    return int(text)


def _default_policy() -> Any:
    from hieravid.apps.demo import default_policy

    return default_policy()


class HieravidVideoLMM(lmms):
    """A transformers VideoLLM with a hieravid policy, as an lmms-eval "simple" model (left-padded batches)."""

    is_simple = True
    model_types: tuple[str, ...] = ()

    def __init__(
        self,
        pretrained: str,
        policy: str | None = None,
        max_frames_num: int | str = 32,
        device: str | None = None,
        dtype: str = "auto",
        batch_size: int | str = 1,
        max_batch_size: int | str | None = None,
        max_new_tokens: int | str = 128,
        trace: str | None = None,
        download: bool | str = False,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        if kwargs:
            raise ValueError(f"unknown model_args for hieravid: {', '.join(sorted(kwargs))}")
        self._batch_size = _batch_size(batch_size)
        del max_batch_size  # lmms-eval's cap for --batch_size auto, which is refused above
        from accelerate import Accelerator

        from hieravid.apps.run import load_model
        from hieravid.policy import load_policy

        accelerator = Accelerator()
        self.accelerator = accelerator
        if accelerator.num_processes > 1:
            # accelerate's device for this process: cuda:<local rank>, or the CPU under `accelerate launch --cpu`.
            device = str(accelerator.device)
        self._rank = accelerator.process_index
        self._world_size = accelerator.num_processes
        self.policy = None if policy in (None, "", "default") else policy
        self.policy_obj = (
            None if str(policy).lower() == "none" else (load_policy(Path(policy)) if self.policy else _default_policy())
        )
        self.loaded = load_model(pretrained, device=device, dtype=dtype, download=_as_bool(download))
        if self.model_types and self.loaded.model_type not in self.model_types:
            raise HieravidError(
                f"{pretrained} is a {self.loaded.model_type!r} model; this lmms-eval model serves "
                f"{', '.join(self.model_types)}"
            )
        self.max_frames_num = int(max_frames_num)
        self.max_new_tokens = int(max_new_tokens)
        self.trace_path = trace
        self.traces: list[Any] = []
        self.last_stats: Any = None
        self.last_batch_size = 0
        self.handle: Any = None
        self.plans: dict[tuple[int, int, int, int], Any] = {}

    # lmms-eval reads these
    @property
    def rank(self) -> int:
        return self._rank

    @property
    def world_size(self) -> int:
        return self._world_size

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def device(self) -> str:
        return self.loaded.device

    @property
    def model(self) -> Any:
        return self.loaded.model

    @property
    def tokenizer(self) -> Any:
        return self.loaded.tokenizer

    # ------------------------------------------------------------------ generation
    def _plan(self, inputs: Any) -> Any:
        from hieravid.apps.run import plan_for_inputs

        key = (inputs.llm_frames, inputs.rows, inputs.cols, inputs.prompt_length)
        if key not in self.plans:
            self.plans[key] = plan_for_inputs(self.policy_obj, self.loaded, inputs)
        return self.plans[key]

    def _generate_args(self, gen_kwargs: dict[str, Any]) -> tuple[dict[str, Any], Any]:
        """``generate``'s keyword arguments from a task's generation kwargs, and the task's stop strings."""
        from hieravid.apps.run import pad_token_id

        options = dict(gen_kwargs)
        until = options.pop("until", None)
        max_new = int(options.pop("max_new_tokens", self.max_new_tokens))
        temperature = float(options.pop("temperature", 0) or 0)
        sample = temperature > 0
        generate_args = dict(
            max_new_tokens=max_new,
            do_sample=sample,
            pad_token_id=pad_token_id(self.loaded),
            num_beams=int(options.pop("num_beams", 1) or 1),
        )
        if sample:
            generate_args["temperature"] = temperature
            if options.get("top_p") is not None:
                generate_args["top_p"] = float(options["top_p"])
        return generate_args, until

    def _prepare(self, video: str, question: str) -> Any:
        from hieravid.apps.run import prepare_inputs
        from hieravid.apps.video import read_video

        frames, _, _ = read_video(video, self.max_frames_num)
        return prepare_inputs(self.loaded, frames, question)

    def _fits(self, batch: list[_Pending], item: _Pending) -> bool:
        """Whether ``item`` may join ``batch``: room left, same generation kwargs, same video geometry, and (pruned)
        a plan that prunes alike."""
        from hieravid.apps.run import batch_key, plans_share_runtime

        if not batch:
            return True
        first = batch[0]
        if len(batch) >= self._batch_size or item.gen_kwargs != first.gen_kwargs:
            return False
        if batch_key(item.inputs) != batch_key(first.inputs):
            return False
        return self.policy_obj is None or plans_share_runtime(self._plan(item.inputs), self._plan(first.inputs))

    def _run_batch(self, batch: list[_Pending]) -> list[str]:
        """One ``generate`` over the left-padded batch (under one ``apply`` when pruning); the answers in batch
        order."""
        import torch

        import hieravid.runtime as runtime
        from hieravid.apps.run import batch_answer_ids, collate_inputs

        generate_args, until = self._generate_args(batch[0].gen_kwargs)
        prepared = collate_inputs(self.loaded, [item.inputs for item in batch])
        self.last_batch_size = len(batch)
        if self.policy_obj is None:
            with torch.inference_mode():
                output = self.loaded.model.generate(**prepared.tensors, **generate_args)
        else:
            # One plan serves the batch: _fits admitted only requests whose plans prune alike, and the runtime
            # computes each sample's budgets from its own counts.
            with runtime.apply(self.loaded.model, self._plan(batch[0].inputs)) as handle, torch.inference_mode():
                output = self.loaded.model.generate(**prepared.tensors, **generate_args)
                self.last_stats = handle.last_request
            if self.trace_path:
                for sample, item in enumerate(batch):
                    self._record(item.inputs, item.question, sample)
        answers = []
        for ids in batch_answer_ids(self.loaded, output, prepared.prompt_length):
            text = self.loaded.tokenizer.decode(ids, skip_special_tokens=True)
            for stop in [until] if isinstance(until, str) else (until or []):
                if stop and stop in text:
                    text = text.split(stop)[0]
            answers.append(text.strip())
        return answers

    def _record(self, inputs: Any, question: str, sample: int = 0) -> None:
        from hieravid.apps.run import build_trace, llm_frame_thumbnails

        plan = self._plan(inputs)
        thumbs = llm_frame_thumbnails(inputs.frames, self.loaded.frames_per_step, inputs.llm_frames, size=48)
        self.traces.append(
            build_trace(self.last_stats, plan, sample=sample, thumbnails=thumbs, info={"question": question})
        )

    def generate_until(self, requests: list[Instance]) -> list[str]:
        from tqdm import tqdm

        answers: list[str] = []
        batch: list[_Pending] = []
        progress = tqdm(total=len(requests), disable=self.rank != 0, desc="hieravid")

        def flush() -> None:
            for item, answer in zip(batch, self._run_batch(batch)):
                answers.append(answer)
                self.cache_hook.add_partial("generate_until", (item.question, item.gen_kwargs), answer)
            progress.update(len(batch))
            batch.clear()

        for request in requests:
            context, gen_kwargs, doc_to_visual, doc_id, task, split = request.args
            visuals = doc_to_visual(self.task_dict[task][split][doc_id])
            videos = [v for v in _flatten(visuals) if isinstance(v, (str, Path))]
            if len(videos) != 1:
                raise HieravidError(
                    f"{task} doc {doc_id}: hieravid evaluates video questions with exactly one video per request, "
                    f"got {len(videos)} video path(s)"
                )
            item = _Pending(context, gen_kwargs, self._prepare(str(videos[0]), context))
            if not self._fits(batch, item):
                flush()
            batch.append(item)
        if batch:
            flush()
        progress.close()
        self._save_traces()
        return answers

    def _save_traces(self) -> None:
        if not self.trace_path or not self.traces:
            return
        from hieravid.apps.trace import save_trace

        path = Path(self.trace_path)
        if self.world_size > 1:
            path = path.with_name(f"{path.stem}.rank{self.rank}{path.suffix}")
        save_trace(path, self.traces)

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        raise NotImplementedError("hieravid lmms-eval models support generation tasks (generate_until) only")

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        raise NotImplementedError("hieravid lmms-eval models do not support multi-round generation")


@dataclass
class _Pending:
    """A request waiting for its batch: the question, the task's generation kwargs, its prepared inputs."""

    question: str
    gen_kwargs: dict[str, Any]
    inputs: Any


def _flatten(items: Any) -> list[Any]:
    if isinstance(items, (list, tuple)):
        return [leaf for item in items for leaf in _flatten(item)]
    return [items]


class HieravidLlavaOnevision(HieravidVideoLMM):
    """LLaVA-OneVision and LLaVA-Video (HF ``LlavaOnevisionForConditionalGeneration``) with a hieravid policy."""

    model_types = ("llava_onevision",)


class HieravidQwen2VL(HieravidVideoLMM):
    """Qwen2-VL and Qwen2.5-VL with a hieravid policy."""

    model_types = ("qwen2_vl", "qwen2_5_vl")
