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

Data parallel evaluation: ``accelerate launch --num_processes N -m lmms_eval ...``; each process loads
the model on its own GPU and lmms-eval shards the requests by rank. Batch size must be 1 (the paper's
setting; hieravid prunes per sample but left-padded multi-video batches are not evaluated here).
"""

from __future__ import annotations

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


def _default_policy() -> Any:
    from hieravid.apps.demo import default_policy

    return default_policy()


class HieravidVideoLMM(lmms):
    """A transformers VideoLLM with a hieravid policy, as an lmms-eval "simple" model (batch size 1)."""

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
        max_new_tokens: int | str = 128,
        trace: str | None = None,
        download: bool | str = False,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        if kwargs:
            raise ValueError(f"unknown model_args for hieravid: {', '.join(sorted(kwargs))}")
        if int(batch_size) != 1:
            raise ValueError("hieravid lmms-eval models run at batch size 1 (pass --batch_size 1)")
        from accelerate import Accelerator

        from hieravid.apps.run import load_model
        from hieravid.policy import load_policy

        accelerator = Accelerator()
        self.accelerator = accelerator
        if accelerator.num_processes > 1:
            device = f"cuda:{accelerator.local_process_index}"
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
        return 1

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

    def _answer(self, video: str, question: str, gen_kwargs: dict[str, Any]) -> str:
        import torch

        import hieravid.runtime as runtime
        from hieravid.apps.run import prepare_inputs
        from hieravid.apps.video import read_video

        frames, _, _ = read_video(video, self.max_frames_num)
        inputs = prepare_inputs(self.loaded, frames, question)
        options = dict(gen_kwargs)
        until = options.pop("until", None)
        max_new = int(options.pop("max_new_tokens", self.max_new_tokens))
        temperature = float(options.pop("temperature", 0) or 0)
        sample = temperature > 0
        tokenizer = self.loaded.tokenizer
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        generate_args = dict(
            max_new_tokens=max_new, do_sample=sample, pad_token_id=pad, num_beams=int(options.pop("num_beams", 1) or 1)
        )
        if sample:
            generate_args["temperature"] = temperature
            if options.get("top_p") is not None:
                generate_args["top_p"] = float(options["top_p"])
        if self.policy_obj is None:
            with torch.inference_mode():
                output = self.loaded.model.generate(**inputs.tensors, **generate_args)
        else:
            with runtime.apply(self.loaded.model, self._plan(inputs)) as handle, torch.inference_mode():
                output = self.loaded.model.generate(**inputs.tensors, **generate_args)
                self.last_stats = handle.last_request
            if self.trace_path:
                self._record(inputs, question)
        text = tokenizer.decode(output[0, inputs.prompt_length :], skip_special_tokens=True)
        for stop in [until] if isinstance(until, str) else (until or []):
            if stop and stop in text:
                text = text.split(stop)[0]
        return text.strip()

    def _record(self, inputs: Any, question: str) -> None:
        from hieravid.apps.run import build_trace, llm_frame_thumbnails

        plan = self._plan(inputs)
        thumbs = llm_frame_thumbnails(inputs.frames, self.loaded.frames_per_step, inputs.llm_frames, size=48)
        self.traces.append(build_trace(self.last_stats, plan, thumbnails=thumbs, info={"question": question}))

    def generate_until(self, requests: list[Instance]) -> list[str]:
        from tqdm import tqdm

        answers = []
        for request in tqdm(requests, disable=self.rank != 0, desc="hieravid"):
            context, gen_kwargs, doc_to_visual, doc_id, task, split = request.args
            visuals = doc_to_visual(self.task_dict[task][split][doc_id])
            videos = [v for v in _flatten(visuals) if isinstance(v, (str, Path))]
            if len(videos) != 1:
                raise HieravidError(
                    f"{task} doc {doc_id}: hieravid evaluates video questions with exactly one video per request, "
                    f"got {len(videos)} video path(s)"
                )
            answers.append(self._answer(str(videos[0]), context, gen_kwargs))
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), answers[-1])
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
