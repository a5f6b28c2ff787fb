"""``hieravid run``: one question about one video on a real checkpoint, pruned by a policy.

The pieces are usable from Python too::

    from hieravid.apps.run import load_model, prepare_inputs, run_request
    loaded = load_model("llava-hf/llava-onevision-qwen2-7b-ov-hf", device="cuda")
    frames, info, _ = hieravid.apps.video.read_video("clip.mp4", 32)
    inputs = prepare_inputs(loaded, frames, "What happens?")
    result = run_request(loaded, inputs, "policies/hieravid-30.yaml", compare_unpruned=True)
    print(format_report(result))

Timings: *TTFT* is the wall time of the first forward pass of ``generate`` (vision encoder, projector
and language-model prefill, i.e. time to the first token's logits, video decoding excluded); *prefill*
is the language model's part of it (pruning work included). CUDA is synchronised around both.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hieravid.errors import HieravidError

if TYPE_CHECKING:
    import numpy as np
    import torch

    from hieravid.apps.trace import RequestTrace
    from hieravid.plan import PruningPlan
    from hieravid.policy import Policy

__all__ = [
    "LoadedModel",
    "ModelLoadError",
    "PreparedBatch",
    "PreparedInputs",
    "RunResult",
    "Timings",
    "batch_answer_ids",
    "batch_key",
    "build_trace",
    "collate_inputs",
    "format_report",
    "language_model_of",
    "load_model",
    "pad_token_id",
    "plan_for_inputs",
    "plans_share_runtime",
    "prepare_batch",
    "prepare_inputs",
    "run_request",
]

DTYPES = ("auto", "float32", "float16", "bfloat16")


class ModelLoadError(HieravidError, ValueError):
    """A checkpoint cannot be found or loaded."""


# --------------------------------------------------------------------------- loading


@dataclass
class LoadedModel:
    """A checkpoint ready for video questions.

    Attributes:
        model: the transformers model (eval mode, on ``device``).
        tokenizer: its tokenizer (with the chat template).
        processor: the model's own processor, or None when it could not be built (torchvision missing);
            then :func:`hieravid.apps.video.preprocess_video` stands in for the video processor.
        model_type: ``config.model_type``.
        processor_config: the video processor's settings (from the processor or the checkpoint's JSON).
        name: what the user passed.
        notes: things the user should know (fallbacks taken).
    """

    model: Any
    tokenizer: Any
    processor: Any
    model_type: str
    processor_config: dict[str, Any]
    name: str
    device: str
    dtype: str
    notes: list[str] = field(default_factory=list)

    @property
    def adapter(self) -> Any:
        """The architecture's adapter class (what the app asks about the model's video layout)."""
        from hieravid.adapters.registry import get_adapter

        return get_adapter(self.model_type)

    @property
    def frames_per_step(self) -> int:
        """Video frames per language-model frame (Qwen2-VL's temporal patch: 2)."""
        return self.adapter.video_geometry(self.model.config).frames_per_step


def resolve_device(device: str | None) -> str:
    """``cuda`` when available and not overridden (``None`` or ``"auto"``), else ``cpu``.

    Raises:
        ModelLoadError: not a torch device (``tpu``), or a device that is not here (``cuda`` without a GPU,
            ``cuda:3`` on a machine with one).
    """
    import torch

    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise ModelLoadError(
            f"--device {str(device)[:40]!r}: not a device torch knows; use auto, cuda, cuda:N or cpu"
        ) from None
    if parsed.type == "cpu":
        return "cpu"
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise ModelLoadError(f"--device {device}: no CUDA device is available here; use --device cpu")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise ModelLoadError(
                f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s), numbered from 0"
            )
        return str(parsed)
    backend = getattr(torch, parsed.type, None)
    available = getattr(backend, "is_available", None)
    if callable(available) and available():
        return str(parsed)
    raise ModelLoadError(
        f"--device {device}: no {parsed.type} device is available here (hieravid runs on cuda and cpu); use auto, "
        "cuda, cuda:N or cpu"
    )


def resolve_dtype(dtype: str | None, device: str) -> torch.dtype:
    """``auto`` is bfloat16 on CUDA and float32 on CPU."""
    import torch

    name = dtype or "auto"
    if name == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    if name not in DTYPES:
        raise ModelLoadError(f"--dtype {name!r}: expected one of {', '.join(DTYPES)}")
    return getattr(torch, name)


def _local_json(folder: Path, *names: str) -> dict[str, Any]:
    for name in names:
        path = folder / name
        if path.is_file():
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError):
                continue
            if isinstance(data, dict):
                return data
    return {}


#: What a checkpoint folder needs for ``hieravid run``: a description, then file patterns (any one will do).
CHECKPOINT_FILES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("the model config (config.json)", ("config.json",)),
    ("the weights (*.safetensors or pytorch_model*.bin)", ("*.safetensors", "pytorch_model*.bin")),
    (
        "the tokenizer (tokenizer.json, or tokenizer_config.json with its vocabulary)",
        ("tokenizer.json", "tokenizer_config.json"),
    ),
    (
        "the video processor settings (video_preprocessor_config.json or preprocessor_config.json)",
        ("video_preprocessor_config.json", "preprocessor_config.json"),
    ),
    ("the chat template (chat_template.jinja or chat_template.json)", ("chat_template.jinja", "chat_template.json")),
)


def missing_checkpoint_files(folder: Path) -> list[str]:
    """What :data:`CHECKPOINT_FILES` names that ``folder`` lacks (a chat template inside tokenizer_config.json
    counts)."""
    missing = []
    for what, patterns in CHECKPOINT_FILES:
        if any(next(folder.glob(pattern), None) is not None for pattern in patterns):
            continue
        if "chat template" in what and "chat_template" in _local_json(folder, "tokenizer_config.json"):
            continue
        missing.append(what)
    return missing


def _describe_missing(name: str, local: bool, download: bool, error: BaseException) -> ModelLoadError:
    if local:
        detail = " ".join(f"{type(error).__name__}: {error}".split())
        if len(detail) > 300:
            detail = detail[:297] + "..."
        missing = missing_checkpoint_files(Path(name))
        if missing:
            return ModelLoadError(
                f"{name}: the folder is not a complete checkpoint: it lacks {'; '.join(missing)}. Copy them from the "
                f"model's repository (e.g. `hf download MODEL_ID --local-dir {name}`); `hieravid demo --export DIR` "
                f"writes a complete tiny one to compare with. (transformers: {detail})"
            )
        return ModelLoadError(
            f"{name}: the folder exists but is not a loadable checkpoint ({detail}). "
            "It needs config.json, the weights (*.safetensors) and the tokenizer/processor files."
        )
    if not download:
        return ModelLoadError(
            f"{name}: not a local folder and not in the Hugging Face cache. hieravid run reads local files only "
            "(local_files_only=True, as with HF_HUB_OFFLINE=1), so nothing was downloaded. Download the checkpoint "
            f"first (e.g. `hf download {name}`), pass a local checkpoint folder, or add --download to allow "
            "fetching it from the Hub."
        )
    return ModelLoadError(
        f"{name}: cannot be fetched from the Hugging Face Hub ({type(error).__name__}: {error}). Check the model id, "
        "your network and HF_TOKEN for gated models, or pass a local checkpoint folder."
    )


def load_model(
    name: str,
    *,
    device: str | None = None,
    dtype: str | None = None,
    download: bool = False,
) -> LoadedModel:
    """Load a VideoLLM checkpoint (a local folder or a Hub id) with its processor.

    Without ``download`` nothing is fetched: ids resolve from the local Hugging Face cache only.
    transformers shows its own progress bar while loading the weights.

    Raises:
        ModelLoadError: unknown/unreachable model, a folder that is not a checkpoint, an unsupported
            architecture, or a CUDA device that is not there.
    """
    import transformers

    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    local = Path(name).is_dir()
    options: dict[str, Any] = {"local_files_only": not (download or local)}
    try:
        config = transformers.AutoConfig.from_pretrained(name, **options)
    except (OSError, ValueError, KeyError) as error:
        raise _describe_missing(name, local, download, error) from None
    model_type = str(getattr(config, "model_type", ""))
    from hieravid.adapters.registry import supported_model_types

    if model_type not in supported_model_types():
        raise ModelLoadError(
            f"{name}: model type {model_type!r} has no hieravid adapter; supported: "
            f"{', '.join(supported_model_types())}"
        )
    transformers.utils.logging.enable_progress_bar()
    try:
        model = transformers.AutoModelForImageTextToText.from_pretrained(name, dtype=torch_dtype, **options)
    except (OSError, ValueError, KeyError, RuntimeError) as error:
        raise _describe_missing(name, local, download, error) from None
    model.to(device).eval()

    notes: list[str] = []
    processor = None
    try:
        processor = transformers.AutoProcessor.from_pretrained(name, **options)
    except ImportError as error:
        if "torchvision" not in str(error).lower():
            raise
        notes.append(
            "torchvision is not installed, so the model's video processor cannot run: hieravid resizes and "
            "normalises the frames itself from the checkpoint's video processor settings (install torchvision "
            "to use the processor)"
        )
    except (OSError, ValueError, KeyError) as error:
        raise _describe_missing(name, local, download, error) from None
    if processor is not None and getattr(processor, "video_processor", None) is None:
        processor = None
        notes.append("the checkpoint's processor has no video processor: hieravid preprocesses the frames itself")
    if processor is not None:
        tokenizer = processor.tokenizer
        processor_config = processor.video_processor.to_dict()
    else:
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(name, **options)
        except (OSError, ValueError, KeyError) as error:
            raise _describe_missing(name, local, download, error) from None
        folder = (
            Path(name)
            if local
            else Path(
                transformers.utils.cached_file(
                    name, "config.json", local_files_only=True, _raise_exceptions_for_missing_entries=False
                )
                or "."
            ).parent
        )
        processor_config = _local_json(folder, "video_preprocessor_config.json", "preprocessor_config.json")
    if getattr(tokenizer, "chat_template", None) is None:
        raise ModelLoadError(
            f"{name}: the tokenizer/processor has no chat template; hieravid run needs the model's own"
        )
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        processor=processor,
        model_type=model_type,
        processor_config=processor_config,
        name=name,
        device=device,
        dtype=str(torch_dtype).removeprefix("torch."),
        notes=notes,
    )


# --------------------------------------------------------------------------- inputs


@dataclass
class PreparedInputs:
    """Model inputs of one request and what they hold.

    Attributes:
        tensors: keyword arguments of ``model.generate`` (on the model's device).
        frames: the sampled frames ``[T, H, W, 3]`` uint8.
        prompt_length: tokens in the prompt.
        llm_frames: frames as the language model sees them (Qwen2-VL: temporal patches).
        rows: token rows per LLM frame.
        cols: token columns per LLM frame.
        video_tokens: N_v (newlines included).
    """

    tensors: dict[str, Any]
    frames: np.ndarray
    prompt_length: int
    llm_frames: int
    rows: int
    cols: int
    video_tokens: int


def _conversation(question: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": question}]}]


def _video_token(loaded: LoadedModel) -> str:
    holder = loaded.processor if loaded.processor is not None else loaded.tokenizer
    token = getattr(holder, "video_token", None)
    if token is None:
        token_id = getattr(loaded.model.config, "video_token_id", None) or getattr(
            loaded.model.config, "video_token_index", None
        )
        token = loaded.tokenizer.convert_ids_to_tokens(int(token_id))
    return str(token)


def prepare_inputs(loaded: LoadedModel, frames: np.ndarray, question: str) -> PreparedInputs:
    """Prompt (the model's chat template) and pixel inputs for one video question."""
    import torch

    from hieravid.apps.video import preprocess_video

    conversation = _conversation(question)
    config = loaded.model.config
    if loaded.processor is not None:
        prompt = loaded.processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
        batch = loaded.processor(text=[prompt], videos=[frames], return_tensors="pt")
        tensors = dict(batch)
    else:
        prompt = loaded.tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
        video = preprocess_video(frames, loaded.model_type, loaded.processor_config, config)
        token = _video_token(loaded)
        if prompt.count(token) != 1:
            raise HieravidError(f"the chat template produced {prompt.count(token)} video placeholders, expected 1")
        prompt = prompt.replace(token, token * video.num_placeholders)
        encoded = loaded.tokenizer([prompt], return_tensors="pt", add_special_tokens=False)
        tensors = {**dict(encoded), **video.tensors}
        if "video_grid_thw" in tensors:
            # What Qwen2-VL's processor adds (0 text, 1 image, 2 video): the model's M-RoPE needs it, and
            # transformers >= 5.24 computes positions from it alone once generate has encoded the video.
            video_id = int(config.video_token_id)
            tensors["mm_token_type_ids"] = (tensors["input_ids"] == video_id).long() * 2
    model_dtype = next(loaded.model.parameters()).dtype
    tensors = {
        key: (value.to(loaded.device, model_dtype) if torch.is_floating_point(value) else value.to(loaded.device))
        for key, value in tensors.items()
        if isinstance(value, torch.Tensor)
    }
    video_id = getattr(config, "video_token_id", None) or getattr(config, "video_token_index", None)
    video_tokens = int((tensors["input_ids"] == int(video_id)).sum())
    geometry = loaded.adapter.inputs_geometry(config, tensors)
    llm_frames, rows, cols = geometry.frames, geometry.rows, geometry.cols
    return PreparedInputs(
        tensors=tensors,
        frames=frames,
        prompt_length=int(tensors["input_ids"].shape[1]),
        llm_frames=llm_frames,
        rows=rows,
        cols=cols,
        video_tokens=video_tokens,
    )


#: Token-aligned inputs (``[1, prompt_length]`` per sample) that a batch pads on the left, with their padding value
#: (None: the tokenizer's pad id).
SEQUENCE_PADDING: dict[str, int | None] = {
    "input_ids": None,
    "attention_mask": 0,
    "mm_token_type_ids": 0,
    "token_type_ids": 0,
}


@dataclass
class PreparedBatch:
    """Model inputs of several requests, left-padded into one batch.

    Attributes:
        tensors: keyword arguments of ``model.generate`` (``[B, prompt_length]`` token inputs, the pixel inputs of
            every sample in order).
        samples: each request's own :class:`PreparedInputs` (unpadded), in batch order.
        prompt_length: tokens in the padded prompt (generated tokens of every row start there).
        pad_token_id: the id the prompts were padded with.
    """

    tensors: dict[str, Any]
    samples: list[PreparedInputs]
    prompt_length: int
    pad_token_id: int


def pad_token_id(loaded: LoadedModel) -> int:
    """The tokenizer's pad id (its end-of-sequence id when it has none), as ``generate`` is given it."""
    tokenizer = loaded.tokenizer
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise HieravidError(f"{loaded.name}: the tokenizer has neither a pad token nor an end-of-sequence token")
    return int(pad)


def batch_key(inputs: PreparedInputs) -> tuple[Any, ...]:
    """What requests must share to run in one batch: the token grid of a frame, and the shape (beyond the first
    dimension) and dtype of every pixel input.

    Pixel inputs concatenate along their first dimension. LLaVA's ``pixel_values_videos`` is
    ``[1, frames, C, H, W]`` per request, so its frame count is part of the key; Qwen2-VL's is ``[patches, D]`` with
    one ``video_grid_thw`` row per video, so Qwen2-VL requests with different frame counts share a batch (the model
    and the runtime locate each sample's video from its own grid row).
    """
    pixels = tuple(
        sorted(
            (key, tuple(value.shape[1:]), str(value.dtype))
            for key, value in inputs.tensors.items()
            if key not in SEQUENCE_PADDING
        )
    )
    return (inputs.rows, inputs.cols, pixels)


def collate_inputs(loaded: LoadedModel, samples: Sequence[PreparedInputs]) -> PreparedBatch:
    """One left-padded batch from requests prepared one by one (:func:`prepare_inputs`).

    Token inputs (``input_ids``, ``attention_mask``, ``mm_token_type_ids``) are padded on the left to the longest
    prompt (``input_ids`` with the tokenizer's pad id, the others with 0); every other tensor (pixels,
    ``video_grid_thw``, ``second_per_grid_ts``) is concatenated along its first dimension, one sample after the other.

    Raises:
        HieravidError: no samples, or samples that cannot share a batch (different :func:`batch_key`, or tensors
            that one sample has and another lacks).
    """
    import torch

    if not samples:
        raise HieravidError("a batch needs at least one request")
    first = samples[0]
    keys = set(first.tensors)
    for index, sample in enumerate(samples[1:], start=1):
        if set(sample.tensors) != keys:
            raise HieravidError(
                f"request {index} of the batch has inputs {sorted(sample.tensors)}, request 0 {sorted(keys)}"
            )
        if batch_key(sample) != batch_key(first):
            raise HieravidError(
                f"request {index} of the batch cannot share it with request 0: video geometry "
                f"{sample.llm_frames}×{sample.rows}×{sample.cols} vs {first.llm_frames}×{first.rows}×{first.cols} "
                "(or pixel inputs of other shapes)"
            )
    pad = pad_token_id(loaded)
    length = max(sample.prompt_length for sample in samples)
    tensors: dict[str, Any] = {}
    for key in first.tensors:
        values = [sample.tensors[key] for sample in samples]
        if key in SEQUENCE_PADDING:
            fill = pad if SEQUENCE_PADDING[key] is None else SEQUENCE_PADDING[key]
            padded = values[0].new_full((len(values), length), fill)
            for row, value in enumerate(values):
                if value.dim() != 2 or value.shape[0] != 1:
                    raise HieravidError(f"{key} of request {row} is {tuple(value.shape)}, expected [1, prompt length]")
                padded[row, length - value.shape[1] :] = value[0]
            tensors[key] = padded
        else:
            tensors[key] = torch.cat(values, dim=0)
    if "attention_mask" not in tensors:
        mask = torch.zeros(len(samples), length, dtype=torch.long, device=tensors["input_ids"].device)
        for row, sample in enumerate(samples):
            mask[row, length - sample.prompt_length :] = 1
        tensors["attention_mask"] = mask
    return PreparedBatch(tensors=tensors, samples=list(samples), prompt_length=length, pad_token_id=pad)


def prepare_batch(loaded: LoadedModel, requests: Sequence[tuple[np.ndarray, str]]) -> PreparedBatch:
    """Left-padded inputs of several video questions (``(frames, question)`` pairs): :func:`prepare_inputs` per
    request, then :func:`collate_inputs`."""
    return collate_inputs(loaded, [prepare_inputs(loaded, frames, question) for frames, question in requests])


def batch_answer_ids(loaded: LoadedModel, output: torch.Tensor, prompt_length: int) -> list[list[int]]:
    """Each row's generated ids after the padded prompt, up to and including its first end-of-sequence token (the
    padding ``generate`` appends to rows that finished early is dropped, as a batch of one never has it)."""
    eos = loaded.model.generation_config.eos_token_id
    stops = {int(eos)} if isinstance(eos, int) else {int(value) for value in (eos or [])}
    rows = []
    for row in output[:, prompt_length:].tolist():
        ids = [int(value) for value in row]
        end = next((index + 1 for index, value in enumerate(ids) if value in stops), len(ids))
        rows.append(ids[:end])
    return rows


def _runtime_part(plan: PruningPlan) -> tuple[Any, ...]:
    stages = tuple(dataclasses.replace(stage, video_tokens_before=0, video_tokens_after=0) for stage in plan.stages)
    return (plan.spec.model_type, plan.spec.num_layers, plan.segment.config, plan.keep_newlines, stages)


def plans_share_runtime(first: PruningPlan, second: PruningPlan) -> bool:
    """Whether two plans compiled for different requests prune alike: same input level, same stages (layers,
    ratios, selectors, query rows, budgets). The runtime computes every sample's counts and budgets from its own
    video, so such plans differ only in their static estimates and one of them serves a batch of both requests."""
    return _runtime_part(first) == _runtime_part(second)


def plan_for_inputs(policy: Policy | str | Path, loaded: LoadedModel, inputs: PreparedInputs) -> PruningPlan:
    """Compile ``policy`` for the model with this request's real geometry (frames, rows, cols, text tokens)."""
    from hieravid.plan import compile_plan
    from hieravid.policy import load_policy
    from hieravid.specs import load_spec

    spec = load_spec(loaded.model, frames=inputs.llm_frames)
    content = inputs.llm_frames * inputs.rows * inputs.cols
    newlines = inputs.video_tokens - content
    layout = {
        0: "none",
        1: "per_video",
        inputs.llm_frames: "per_frame",
        inputs.llm_frames * inputs.rows: "per_row",
    }.get(newlines, spec.newline_layout)
    spec = dataclasses.replace(
        spec,
        name=loaded.name,
        rows=inputs.rows,
        cols=inputs.cols,
        newline_layout=layout,
        text_tokens=max(1, inputs.prompt_length - inputs.video_tokens),
    )
    return compile_plan(load_policy(policy), spec)


# --------------------------------------------------------------------------- generation and timing


@dataclass(frozen=True)
class Timings:
    """Wall times of one ``generate`` call, in milliseconds."""

    ttft_ms: float
    prefill_ms: float
    total_ms: float
    new_tokens: int

    @property
    def decode_ms_per_token(self) -> float:
        steps = max(self.new_tokens - 1, 1)
        return max(self.total_ms - self.ttft_ms, 0.0) / steps


class _ForwardTimer:
    """Times the first forward of the whole model (TTFT) and of its language model (prefill).

    ``generate`` sets the TTFT start itself (``starts["model"]``): transformers >= 5.24 encodes the video
    before the first forward, earlier versions inside it.
    """

    def __init__(self, model: Any, language_model: Any, device: str) -> None:
        self.model, self.language_model, self.device = model, language_model, device
        self.starts: dict[str, float] = {}
        self.durations: dict[str, float] = {}
        self.handles: list[Any] = []

    def _now(self) -> float:
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.synchronize()
        return time.perf_counter()

    def _pre(self, key: str) -> Any:
        def hook(module: Any, args: Any) -> None:
            if key not in self.starts:
                self.starts[key] = self._now()

        return hook

    def _post(self, key: str) -> Any:
        def hook(module: Any, args: Any, output: Any) -> None:
            if key not in self.durations and key in self.starts:
                self.durations[key] = (self._now() - self.starts[key]) * 1000

        return hook

    def __enter__(self) -> _ForwardTimer:
        for key, module in (("model", self.model), ("lm", self.language_model)):
            self.handles.append(module.register_forward_pre_hook(self._pre(key), prepend=True))
            self.handles.append(module.register_forward_hook(self._post(key), always_call=True))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self.handles:
            handle.remove()


def language_model_of(loaded: LoadedModel) -> Any:
    """The decoder stack of ``loaded.model`` (through its hieravid adapter)."""
    from hieravid.adapters.registry import get_adapter

    return get_adapter(loaded.model_type)(loaded.model).language_model()


def generate(loaded: LoadedModel, inputs: PreparedInputs, *, max_new_tokens: int) -> tuple[str, list[int], Timings]:
    """Greedy generation; returns the answer text, its token ids and the timings."""
    import torch

    tokenizer = loaded.tokenizer
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with _ForwardTimer(loaded.model, language_model_of(loaded), loaded.device) as timer, torch.inference_mode():
        start = timer.starts["model"] = timer._now()  # TTFT includes the video encoder on every version
        output = loaded.model.generate(
            **inputs.tensors, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad
        )
        total = (timer._now() - start) * 1000
    new_ids = [int(v) for v in output[0, inputs.prompt_length :].tolist()]
    answer = tokenizer.decode(new_ids, skip_special_tokens=True).strip()
    timings = Timings(
        ttft_ms=timer.durations.get("model", math.nan),
        prefill_ms=timer.durations.get("lm", math.nan),
        total_ms=total,
        new_tokens=len(new_ids),
    )
    return answer, new_ids, timings


@dataclass
class RunResult:
    """Outcome of :func:`run_request`."""

    answer: str
    answer_ids: list[int]
    timings: Timings
    plan: PruningPlan
    stats: Any
    """The runtime's ``handle.last_request`` of the pruned prefill."""
    inputs: PreparedInputs
    unpruned_answer: str | None = None
    unpruned_ids: list[int] | None = None
    unpruned_timings: Timings | None = None
    notes: list[str] = field(default_factory=list)
    merge_target: Any = None
    """``[F*P]`` merge map of the pruned prefill (content indices), when traced."""
    frame_redundancy: Any = None
    """``[F]`` per-frame redundancy ``c[f]`` of the pruned prefill, when traced."""


def run_request(
    loaded: LoadedModel,
    inputs: PreparedInputs,
    policy: Policy | str | Path,
    *,
    max_new_tokens: int = 64,
    compare_unpruned: bool = False,
    warmup: int = 1,
    trace: bool = False,
    speedups: str = "exact",
) -> RunResult:
    """Answer one prepared request with ``policy`` applied (and optionally without, for the speedup).

    ``warmup`` unmeasured short generations (a prefill and two decode steps) run first, unpruned and pruned,
    so that one-time costs (kernel selection, lazy initialisation) do not count against either run.
    ``trace`` also records the input level's merge map and frame redundancy (from the request's statistics).
    ``speedups`` is passed to :func:`hieravid.runtime.apply` (the adapter's vision-side speedups, installed with the
    policy; the unpruned comparison runs the stock model).
    """
    import hieravid.runtime as runtime

    plan = plan_for_inputs(policy, loaded, inputs)
    for _ in range(warmup):
        generate(loaded, inputs, max_new_tokens=3)
    unpruned: tuple[str, list[int], Timings] | None = None
    if compare_unpruned:
        unpruned = generate(loaded, inputs, max_new_tokens=max_new_tokens)
    with runtime.apply(loaded.model, plan, speedups=speedups) as handle:
        for _ in range(warmup):
            generate(loaded, inputs, max_new_tokens=3)
        answer, ids, timings = generate(loaded, inputs, max_new_tokens=max_new_tokens)
        stats = handle.last_request
    result = RunResult(
        answer=answer, answer_ids=ids, timings=timings, plan=plan, stats=stats, inputs=inputs, notes=list(loaded.notes)
    )
    if trace and stats is not None and stats.pruned and stats.merge_targets and stats.merge_targets[0] is not None:
        result.merge_target = stats.merge_targets[0].cpu()
        result.frame_redundancy = stats.frame_redundancy[0].float().cpu()
    if unpruned is not None:
        result.unpruned_answer, result.unpruned_ids, result.unpruned_timings = unpruned
    return result


# --------------------------------------------------------------------------- traces


def _content_index(stats: Any, sample: int) -> torch.Tensor:
    """``[F*P]`` sequence positions of a sample's content tokens (the adapter's layout when exposed)."""

    return stats.layouts[sample].frame_index.flatten().cpu()


def build_trace(
    stats: Any,
    plan: PruningPlan | None,
    *,
    sample: int = 0,
    thumbnails: np.ndarray | None = None,
    info: dict[str, Any] | None = None,
    merge_target: torch.Tensor | None = None,
    frame_redundancy: torch.Tensor | None = None,
) -> RequestTrace:
    """A :class:`~hieravid.apps.trace.RequestTrace` from the runtime's ``handle.last_request`` (one sample).

    Sequence positions are mapped back to content indices with the sample's video layout (its frame index).
    The merge map is ``merge_target`` when given, else the request's own (``stats.merge_targets``).
    """
    import torch

    from hieravid.apps.trace import RequestTrace, StageTrace, TraceError

    if stats is None or not getattr(stats, "pruned", False) or not stats.videos or stats.videos[sample] is None:
        reason = getattr(stats, "reason", "no request seen")
        raise TraceError(f"no pruned video request to trace ({reason})")
    video = stats.videos[sample]
    content = _content_index(stats, sample)
    length = max(int(stats.prompt_length), int(content.max()) + 1)
    lookup = torch.full((length,), -1, dtype=torch.int64)
    lookup[content] = torch.arange(content.numel())

    def to_content(positions: torch.Tensor) -> tuple[torch.Tensor, int]:
        mapped = lookup[positions.cpu().long()]
        return mapped[mapped >= 0].sort().values, int((mapped < 0).sum())

    input_kept, _ = to_content(stats.input_kept_positions[sample])
    stages = []
    for stage in stats.stages:
        kept, newlines = to_content(stage.kept_positions[sample])
        stages.append(StageTrace(layer=int(stage.layer), kept=kept, newlines_kept=newlines))
    if merge_target is None and stats.merge_targets and stats.merge_targets[sample] is not None:
        merge_target = stats.merge_targets[sample].cpu()
    if frame_redundancy is None and stats.frame_redundancy and stats.frame_redundancy[sample] is not None:
        frame_redundancy = stats.frame_redundancy[sample].float().cpu()
    segment_ids = stats.frame_segment_ids[sample].cpu()
    values = stats.marginal_values[sample]
    values = values.float().cpu() if values is not None else torch.zeros(int(segment_ids.max()) + 1)
    if values.numel() != int(segment_ids.max()) + 1:  # segment level off: one segment
        values = torch.zeros(int(segment_ids.max()) + 1)
    thumbs = None
    if thumbnails is not None:
        thumbs = torch.from_numpy(thumbnails[: video["frames"]].copy())
    return RequestTrace(
        frames=int(video["frames"]),
        rows=int(video["rows"]),
        cols=int(video["cols"]),
        newline_tokens=int(video["newline_tokens"]),
        frame_segment_ids=segment_ids.long(),
        segment_values=values,
        input_kept=input_kept,
        merge_target=merge_target,
        stages=stages,
        layer_video_tokens=[int(layer[sample]) for layer in stats.layer_video_tokens] or None,
        frame_redundancy=frame_redundancy,
        thumbnails=thumbs,
        policy=plan.policy.to_dict() if plan is not None else None,
        plan=plan.to_dict() if plan is not None else None,
        info=dict(info or {}),
    )


def llm_frame_thumbnails(frames: np.ndarray, frames_per_step: int, llm_frames: int, size: int = 96) -> np.ndarray:
    """One small frame per LLM frame (the first of each temporal patch of ``frames_per_step`` frames), longest
    side ``size`` pixels."""
    from hieravid.apps.video import resize_frames

    step = frames_per_step
    chosen = frames[::step][:llm_frames]
    height, width = chosen.shape[1:3]
    scale = size / max(height, width)
    return resize_frames(chosen, (max(1, round(height * scale)), max(1, round(width * scale))))


# --------------------------------------------------------------------------- report


def _segments_text(segment_ids: Sequence[int]) -> str:
    ranges: list[tuple[int, int]] = []
    for index, seg in enumerate(segment_ids):
        if index == 0 or seg != segment_ids[index - 1]:
            ranges.append((index, index))
        else:
            ranges[-1] = (ranges[-1][0], index)
    return ", ".join(f"{a}-{b}" if a != b else str(a) for a, b in ranges)


def measured_retention(stats: Any, plan: PruningPlan, sample: int = 0) -> float:
    """Mean over layers of the video tokens each layer's attention and MLP process, over N_v (measured)."""
    n_v = stats.videos[sample]["video_tokens"]
    after = {stage.layer: stage.video_tokens_after[sample] for stage in stats.stages}
    point = {stage.layer: stage.prune_point for stage in stats.stages}
    total = 0.0
    for index, layer in enumerate(stats.layer_video_tokens):
        attention = layer[sample]
        mlp = after[index] if point.get(index) == "after_attention" else attention
        total += attention + mlp
    return total / (2 * len(stats.layer_video_tokens) * n_v)


def format_tokens(stats: Any, plan: PruningPlan, sample: int = 0) -> str:
    """Video tokens per level and per layer (measured), with the plan's static estimate beside them."""
    video = stats.videos[sample]
    n_v = video["video_tokens"]
    lines = [
        f"video: {video['frames']} frames × {video['rows']}×{video['cols']} tokens + {video['newline_tokens']} "
        f"newline = N_v {n_v}; prompt {stats.prompt_length} tokens",
        f"segments ({stats.num_segments[sample]}): frames {_segments_text(stats.frame_segment_ids[sample].tolist())}",
        "",
        "tokens per level          video tokens   keep",
        f"  input                   {n_v:>12}  {1.0:5.3f}",
        f"  segment level (merge)   {int(stats.input_kept_positions[sample].numel()):>12}  "
        f"{stats.input_kept_positions[sample].numel() / n_v:5.3f}",
    ]
    for stage in stats.stages:
        kept = stage.video_tokens_after[sample]
        lines.append(f"  stage @ layer {stage.layer:<9} {kept:>12}  {kept / n_v:5.3f}")
    lines += ["", "layer  attn video  mlp video   keep   plan"]
    after = {stage.layer: stage.video_tokens_after[sample] for stage in stats.stages}
    point = {stage.layer: stage.prune_point for stage in stats.stages}
    for index, layer in enumerate(stats.layer_video_tokens):
        attention = layer[sample]
        mlp = after[index] if point.get(index) == "after_attention" else attention
        keep = (attention + mlp) / (2 * n_v)
        planned = (
            (plan.layer_video_tokens[index] + plan.layer_mlp_video_tokens[index]) / (2 * plan.spec.video_tokens)
            if index < len(plan.layer_video_tokens)
            else math.nan
        )
        marker = "  ← stage" if index in after else ""
        lines.append(f"{index:>5}  {attention:>10}  {mlp:>9}  {keep:5.3f}  {planned:5.3f}{marker}")
    lines.append(
        f"retention (mean over layers): {measured_retention(stats, plan, sample):.3f} measured, "
        f"{plan.retention:.3f} planned; FLOPs ratio (plan) {plan.flops_ratio:.3f}"
    )
    return "\n".join(lines)


def format_timings(result: RunResult, device: str, dtype: str) -> str:
    t = result.timings
    lines = [
        f"timings ({device}, {dtype}):",
        f"  pruned:   TTFT {t.ttft_ms:8.1f} ms   LLM prefill {t.prefill_ms:8.1f} ms   "
        f"decode {t.decode_ms_per_token:6.1f} ms/token ({t.new_tokens} tokens)",
    ]
    u = result.unpruned_timings
    if u is not None:
        lines.append(
            f"  unpruned: TTFT {u.ttft_ms:8.1f} ms   LLM prefill {u.prefill_ms:8.1f} ms   "
            f"decode {u.decode_ms_per_token:6.1f} ms/token ({u.new_tokens} tokens)"
        )
        lines.append(f"  speedup:  TTFT ×{u.ttft_ms / t.ttft_ms:.2f}   LLM prefill ×{u.prefill_ms / t.prefill_ms:.2f}")
    return "\n".join(lines)


def format_report(result: RunResult, *, device: str = "cpu", dtype: str = "float32") -> str:
    """The answer(s), tokens per level and layer, and timings, as printed by ``hieravid run``."""
    lines = [f"answer ({result.plan.policy.name}): {result.answer}"]
    if result.unpruned_answer is not None:
        same = "same as pruned" if result.unpruned_ids == result.answer_ids else "differs from pruned"
        lines.append(f"answer (unpruned): {result.unpruned_answer}   [{same}]")
    lines.append("")
    if result.stats is not None and getattr(result.stats, "pruned", False):
        lines.append(format_tokens(result.stats, result.plan))
    else:
        lines.append(f"not pruned: {getattr(result.stats, 'reason', 'no request seen')}")
    lines.append("")
    lines.append(format_timings(result, device, dtype))
    lines.extend(f"note: {note}" for note in result.notes)
    return "\n".join(lines)


# --------------------------------------------------------------------------- command line


def _progress_factory() -> Any:
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm ships with transformers
        return None
    import sys

    def factory(**options: Any) -> Any:
        return tqdm(file=sys.stderr, leave=False, disable=None, **options)

    return factory


def run_command(args: Any) -> int:
    """``hieravid run`` (see ``hieravid run --help``); returns the exit status."""
    import sys

    from hieravid.apps.paths import check_output_file
    from hieravid.apps.trace import save_trace
    from hieravid.apps.video import read_video
    from hieravid.policy import load_policy_file

    # Everything that can be checked is checked before the minutes of decoding, loading and generating.
    args.device = resolve_device(args.device)
    if args.trace:
        check_output_file(args.trace, option="--trace")
    policy = load_policy_file(args.policy)
    print(f"decoding {args.video} ({args.frames} frames, uniform sampling)", file=sys.stderr)
    frames, info, indices = read_video(args.video, args.frames, progress=_progress_factory())
    print(f"loading {args.model}", file=sys.stderr)
    loaded = load_model(args.model, device=args.device, dtype=args.dtype, download=args.download)
    inputs = prepare_inputs(loaded, frames, args.question)
    print(f"generating ({'pruned and unpruned' if args.compare_unpruned else 'pruned'})", file=sys.stderr)
    result = run_request(
        loaded,
        inputs,
        policy,
        max_new_tokens=args.max_new_tokens,
        compare_unpruned=args.compare_unpruned,
        warmup=args.warmup,
        trace=bool(args.trace),
        speedups=getattr(args, "speedups", "exact"),
    )
    print(
        f"model: {args.model} ({loaded.model_type}); video: {args.video} ({info.frames} frames, "
        f"{info.width}×{info.height}, {info.fps:.2f} fps), sampled {len(indices)}"
    )
    print(f"question: {args.question}")
    print(format_report(result, device=loaded.device, dtype=loaded.dtype))
    if args.trace:
        thumbnails = llm_frame_thumbnails(frames, loaded.frames_per_step, inputs.llm_frames)
        trace = build_trace(
            result.stats,
            result.plan,
            thumbnails=thumbnails,
            merge_target=result.merge_target,
            frame_redundancy=result.frame_redundancy,
            info={
                "model": args.model,
                "video": str(args.video),
                "question": args.question,
                "answer": result.answer,
                "sampled_frames": indices,
                "ttft_ms": result.timings.ttft_ms,
                "prefill_ms": result.timings.prefill_ms,
                "unpruned_answer": result.unpruned_answer,
                "device": loaded.device,
                "dtype": loaded.dtype,
                "source": "hieravid run",
            },
        )
        print(f"trace: {save_trace(args.trace, trace)}")
    return 0
