"""End-to-end benchmark: LLM prefill, time to first token, decode, memory — next to the FLOPs ideal.

Models are built from configs with random weights: timing depends only on shapes, so a
full-size 7B-shaped model times like the real checkpoint. ``size="tiny"`` builds small models of
the same classes so the whole path also runs (slowly, meaninglessly for speed) on a CPU.

Measurements (median of ``runs`` after ``warmup``, batch 1):

- ``llm_prefill_ms``: the language model's prefill (CUDA events around the LM call, hieravid's segment level
  included);
- ``ttft_ms``: one full forward of the prompt (vision tower + projector + LLM + LM head);
- ``vision_ms``: the vision side inside that forward — the multimodal model's ``get_video_features`` (vision
  tower, projector, pooling or patch merger), timed around the call (CUDA events on a GPU). The unpruned row
  runs the stock model; with ``speedups`` other than ``"none"`` an ``unpruned+<speedups>`` row runs the same
  model with only the adapter's speedups installed (``policies/none.yaml``), and every policy row runs
  with them, so the vision time is reported with and without them;
- ``decode_step_ms``: median time of N single-token decode steps driven by hand after the prefill (the
  model's own decode step; ``decode_speedup`` compares these);
- ``decode_ms_per_token``: (time of generate(1 + N tokens) − time of generate(1 token)) / N (what
  ``generate`` adds included; noisier: a difference of two timings that include the prefill);
- ``peak_memory_bytes``: peak allocated during generate; ``kv_cache_bytes`` after prefill;
- ``pruning_overhead_ms``: GPU time of hieravid's own work, by level (from the profiler ranges the
  runtime emits);
- ``ideal_llm_prefill_ms`` = unpruned LLM prefill × the plan's FLOPs ratio;
- ``floor_llm_prefill_ms``: the model's own decoder layers on hidden states sliced to the realised per-layer
  counts, no pruning work, in one CUDA graph (:func:`floor_prefill_ms`), measured in the same run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import platform
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BENCH_MODELS = ("llava-onevision-7b", "llava-video-7b", "qwen2-vl-7b", "qwen2.5-vl-7b", "qwen3-vl-8b", "internvl3.5-8b")
#: Small models (host-bound regime), benchmarked on request (``--model llava-onevision-0.5b``).
SMALL_MODELS = ("llava-onevision-0.5b", "qwen2-vl-2b")
DEFAULT_FRAMES = {
    "llava-onevision-7b": 32,
    "llava-video-7b": 64,
    "qwen2-vl-7b": 32,
    "qwen2.5-vl-7b": 32,
    "qwen3-vl-8b": 32,
    "llava-onevision-0.5b": 32,
    "qwen2-vl-2b": 32,
    "internvl3.5-8b": 32,
}
"""Frames sampled from the video (Qwen2-VL packs two sampled frames into one temporal patch)."""

_VIDEO_TOKEN, _IMAGE_TOKEN, _VISION_START, _VISION_END = 151656, 151655, 151652, 151653
#: Full-size vision towers as their transformers config dicts (also used by ``benchmarks/vision_*.py``).
SIGLIP_SO400M_VISION = dict(
    model_type="siglip_vision_model",
    hidden_size=1152,
    intermediate_size=4304,
    num_hidden_layers=26,
    num_attention_heads=16,
    image_size=384,
    patch_size=14,
)
"""LLaVA-OneVision's and LLaVA-Video's SigLIP-so400m/14 at 384 px."""
QWEN_PATCHING = dict(patch_size=14, spatial_merge_size=2, temporal_patch_size=2, in_channels=3)
QWEN2_VL_7B_VISION = dict(depth=32, embed_dim=1280, hidden_size=3584, num_heads=16, mlp_ratio=4, **QWEN_PATCHING)
"""Qwen2-VL-7B's vision transformer (``hidden_size`` is the merger's output: the language model's width)."""
QWEN2_5_VL_7B_VISION = dict(
    depth=32,
    hidden_size=1280,
    intermediate_size=3420,
    num_heads=16,
    out_hidden_size=3584,
    window_size=112,
    fullatt_block_indexes=[7, 15, 23, 31],
    hidden_act="silu",
    tokens_per_second=2,
    **QWEN_PATCHING,
)
"""Qwen2.5-VL-7B's vision transformer (112-pixel windows, four full-attention blocks)."""
QWEN3_VL_8B_VISION = dict(
    depth=27,
    hidden_size=1152,
    intermediate_size=4304,
    num_heads=16,
    out_hidden_size=4096,
    num_position_embeddings=2304,
    deepstack_visual_indexes=[8, 16, 24],
    patch_size=16,
    spatial_merge_size=2,
    temporal_patch_size=2,
    in_channels=3,
)
"""Qwen3-VL-8B's vision transformer (16-pixel patches; blocks 8/16/24 feed the deepstack)."""
_QWEN3_8B_TEXT = dict(
    hidden_size=4096,
    intermediate_size=12288,
    num_hidden_layers=36,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=128,
    vocab_size=151936,
    max_position_embeddings=262144,
)
#: Tokens of one ``<t seconds>`` timestamp that Qwen3-VL's processor writes before each temporal patch.
_QWEN3_TIMESTAMP_TOKENS = 6
_QWEN2_7B_TEXT = dict(
    hidden_size=3584,
    intermediate_size=18944,
    num_hidden_layers=28,
    num_attention_heads=28,
    num_key_value_heads=4,
    vocab_size=152064,
    max_position_embeddings=131072,
)
#: The small models' language models (Qwen2-0.5B, Qwen2-1.5B), full size.
_SMALL_TEXT = {
    "llava-onevision-0.5b": dict(
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        vocab_size=151936,
        max_position_embeddings=131072,
    ),
    "qwen2-vl-2b": dict(
        hidden_size=1536,
        intermediate_size=8960,
        num_hidden_layers=28,
        num_attention_heads=12,
        num_key_value_heads=2,
        vocab_size=151936,
        max_position_embeddings=131072,
    ),
}
_TINY_TEXT = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=8,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=152064,
    max_position_embeddings=131072,
)
_PROMPT_HEAD, _PROMPT_TAIL = 14, 40
"""Text tokens around the video: a chat template's system turn before, the question after."""


@dataclass
class SyntheticCase:
    """A random-weight model and one prompt's inputs."""

    name: str
    model: Any
    inputs: dict[str, Any]
    sampled_frames: int
    llm_frames: int
    vision_method: str = "get_video_features"
    """The multimodal model's method that encodes the video (InternVL: ``get_image_features``, frames are images)."""
    size: str = "full"

    def spec(self) -> Any:
        """The ModelSpec matching this model and prompt exactly (for ``compile_plan``)."""
        from hieravid.adapters.registry import get_adapter
        from hieravid.specs import load_spec

        spec = load_spec(self.model, frames=self.llm_frames)
        geometry = get_adapter(self.model.config.model_type).inputs_geometry(self.model.config, self.inputs)
        return dataclasses.replace(
            spec, name=self.name, rows=geometry.rows, cols=geometry.cols, text_tokens=_PROMPT_HEAD + _PROMPT_TAIL
        )


def _onevision_config(size: str, text_size: dict[str, int] | None = None) -> Any:
    from transformers import LlavaOnevisionConfig

    if size == "full":
        vision = dict(SIGLIP_SO400M_VISION)
        text = text_size or _QWEN2_7B_TEXT
    else:
        vision = dict(
            model_type="siglip_vision_model",
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=56,
            patch_size=4,
        )
        text = _TINY_TEXT
    return LlavaOnevisionConfig(
        text_config=dict(model_type="qwen2", **text),
        vision_config=vision,
        image_token_id=_IMAGE_TOKEN,
        video_token_id=_VIDEO_TOKEN,
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        tie_word_embeddings=False,
    )


def _qwen2_vl_config(size: str, text_size: dict[str, int] | None = None) -> Any:
    from transformers import Qwen2VLConfig

    if size == "full":
        vision = dict(QWEN2_VL_7B_VISION)
        text = text_size or _QWEN2_7B_TEXT
        if text_size is not None:  # Qwen2-VL-2B: head dim 128 as the 7B, the merger projects to its width
            vision = {**vision, "hidden_size": text_size["hidden_size"]}
    else:
        vision = dict(
            depth=1,
            embed_dim=32,
            hidden_size=64,
            num_heads=2,
            mlp_ratio=2,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            in_channels=3,
        )
        text = _TINY_TEXT
    return _qwen_family_config(Qwen2VLConfig, "qwen2_vl_text", vision, text, full=size == "full")


def _qwen_family_config(
    config_class: type, text_model_type: str, vision: dict[str, Any], text: dict[str, int], *, full: bool
) -> Any:
    """A Qwen2-VL-family config: M-RoPE sections of the 7B (head dim 128) or of the tiny text model."""
    mrope_section = [16, 24, 24] if full else [2, 3, 3]
    rope = {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": mrope_section}
    return config_class(
        text_config=dict(model_type=text_model_type, rope_parameters=rope, **text),
        vision_config=vision,
        image_token_id=_IMAGE_TOKEN,
        video_token_id=_VIDEO_TOKEN,
        vision_start_token_id=_VISION_START,
        vision_end_token_id=_VISION_END,
        tie_word_embeddings=False,
    )


def _qwen2_5_vl_config(size: str) -> Any:
    """Qwen2.5-VL-7B's vision transformer (window attention, 4 full-attention blocks) with Qwen2-7B's text model."""
    from transformers import Qwen2_5_VLConfig

    if size == "full":
        vision = dict(QWEN2_5_VL_7B_VISION)
        text = _QWEN2_7B_TEXT
    else:  # 56-pixel windows: 2×2 merged tokens, so the tiny 8×8-patch frames have 4 windows each
        vision = dict(
            depth=2,
            hidden_size=32,
            intermediate_size=64,
            num_heads=2,
            out_hidden_size=64,
            window_size=56,
            fullatt_block_indexes=[1],
            hidden_act="silu",
            tokens_per_second=2,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            in_channels=3,
        )
        text = _TINY_TEXT
    return _qwen_family_config(Qwen2_5_VLConfig, "qwen2_5_vl_text", vision, text, full=size == "full")


def _qwen3_vl_config(size: str) -> Any:
    """Qwen3-VL-8B (interleaved M-RoPE [24, 20, 20], deepstack after layers 0-2), or a tiny one (deepstack after
    layers 0-1, so hieravid-30's stages at 2/4/6 of 8 layers are allowed)."""
    from transformers import Qwen3VLConfig

    if size == "full":
        vision, text, section = dict(QWEN3_VL_8B_VISION), dict(_QWEN3_8B_TEXT), [24, 20, 20]
    else:
        vision = dict(
            depth=2,
            hidden_size=32,
            intermediate_size=64,
            num_heads=2,
            out_hidden_size=64,
            num_position_embeddings=16,
            deepstack_visual_indexes=[0, 1],
            patch_size=16,
            spatial_merge_size=2,
            temporal_patch_size=2,
            in_channels=3,
        )
        text, section = dict(_TINY_TEXT, head_dim=16), [2, 3, 3]
    rope = {"rope_type": "default", "rope_theta": 5000000.0, "mrope_section": section, "mrope_interleaved": True}
    return Qwen3VLConfig(
        text_config=dict(model_type="qwen3_vl_text", rope_parameters=rope, **text),
        vision_config=vision,
        image_token_id=_IMAGE_TOKEN,
        video_token_id=_VIDEO_TOKEN,
        vision_start_token_id=_VISION_START,
        vision_end_token_id=_VISION_END,
        tie_word_embeddings=False,
    )


def _qwen3_vl_ids(head: Any, tail: Any, temporal: int, tokens: int, generator: Any) -> Any:
    """Qwen3-VL's prompt: per temporal patch a ``<t seconds>`` timestamp, vision start, its tokens, vision end."""
    import torch

    pieces = [head]
    for _ in range(temporal):
        pieces.append(torch.randint(1000, 100000, (_QWEN3_TIMESTAMP_TOKENS,), generator=generator))
        pieces.append(torch.tensor([_VISION_START, *[_VIDEO_TOKEN] * tokens, _VISION_END]))
    return torch.cat([*pieces, tail])


def _internvl_case(
    name: str, frames: int, size: str, device: str, torch_dtype: Any, attention: str, generator: Any
) -> SyntheticCase:
    """InternVL3.5-8B (catalogue shapes: Qwen3-8B, InternViT-300M at 448 px) or a tiny InternVL (56 px frames, 7×7
    tokens), prompted as ``InternVLProcessor(videos=...)`` does: ``FrameN: <img>`` + one tile's context tokens +
    ``</img>`` per frame, joined by newlines. The label ids stand in for the tokenizer's text."""
    import torch
    from transformers import InternVLConfig, InternVLForConditionalGeneration

    from hieravid.specs import CATALOGUE_CONFIGS

    mapping = dict(CATALOGUE_CONFIGS["internvl3.5-8b"][0])
    mapping.pop("model_type")
    if size != "full":
        vision = dict(
            model_type="internvl_vision",
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=56,
            patch_size=4,
        )
        mapping.update(
            text_config=dict(model_type="qwen3", **_TINY_TEXT, head_dim=16), vision_config=vision, image_seq_length=49
        )
    config = InternVLConfig(**mapping, tie_word_embeddings=False)
    with torch.device(device):
        model = InternVLForConditionalGeneration._from_config(config, attn_implementation=attention, dtype=torch_dtype)
    model.eval()
    image_token, per_frame = config.image_token_id, config.image_seq_length
    image_start, image_end, newline, colon, digit_zero, frame_word = image_token - 2, image_token - 1, 198, 25, 15, 4369
    ids: list[int] = torch.randint(1000, 100000, (_PROMPT_HEAD,), generator=generator).tolist()
    for frame in range(frames):
        label = [frame_word, *(digit_zero + int(digit) for digit in str(frame + 1)), colon]
        ids += ([newline] if frame else []) + label + [image_start, *[image_token] * per_frame, image_end]
    ids += torch.randint(1000, 100000, (_PROMPT_TAIL,), generator=generator).tolist()
    side = config.vision_config.image_size[0]
    scenes = torch.randn(4, 3, side, side, generator=generator)
    pixels = scenes[torch.arange(frames) * 4 // frames] + 0.1 * torch.randn(frames, 3, side, side, generator=generator)
    input_ids = torch.tensor([ids], device=device)
    inputs = {
        "pixel_values": pixels.to(device, torch_dtype),
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
    }
    return SyntheticCase(
        name=name,
        model=model,
        inputs=inputs,
        sampled_frames=frames,
        llm_frames=frames,
        vision_method="get_image_features",
    )


#: Benchmark models built by a function of their own: ``(name, frames, size, device, dtype, attention, generator)``.
_CASE_BUILDERS: dict[str, Callable[..., SyntheticCase]] = {"internvl3.5-8b": _internvl_case}
#: Models whose batched runs (``--batch``) can draw more samples: those built by :func:`build_case` itself.
BATCH_MODELS = tuple(name for name in BENCH_MODELS + SMALL_MODELS if name not in _CASE_BUILDERS)


def build_case(
    name: str,
    *,
    frames: int | None = None,
    size: str = "full",
    device: str = "cuda",
    dtype: str = "bfloat16",
    attention: str = "sdpa",
    seed: int = 0,
) -> SyntheticCase:
    """Build a random-weight model shaped like catalogue model ``name`` and a prompt with a video."""
    import torch
    import transformers

    if name not in BENCH_MODELS + SMALL_MODELS:
        known = ", ".join(BENCH_MODELS + SMALL_MODELS)
        raise ValueError(f"unknown benchmark model {name!r}; choose one of {known}")
    frames = frames or DEFAULT_FRAMES[name]
    torch_dtype = getattr(torch, dtype)
    torch.manual_seed(seed)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    if name in _CASE_BUILDERS:
        return _CASE_BUILDERS[name](name, frames, size, device, torch_dtype, attention, generator)
    qwen = name.startswith("qwen")
    if name == "qwen2.5-vl-7b":
        config, model_class = _qwen2_5_vl_config(size), transformers.Qwen2_5_VLForConditionalGeneration
    elif name == "qwen3-vl-8b":
        config, model_class = _qwen3_vl_config(size), transformers.Qwen3VLForConditionalGeneration
    elif qwen:
        config = _qwen2_vl_config(size, _SMALL_TEXT.get(name))
        model_class = transformers.Qwen2VLForConditionalGeneration
    else:
        config = _onevision_config(size, _SMALL_TEXT.get(name))
        model_class = transformers.LlavaOnevisionForConditionalGeneration
    with torch.device(device):
        model = model_class._from_config(config, attn_implementation=attention, dtype=torch_dtype)
    model.eval()
    if qwen and frames % 2:
        raise ValueError(f"Qwen2-VL packs frames in pairs; pass an even frame count, got {frames}")
    inputs = _prompt_inputs(config, frames, size=size, generator=generator, qwen=qwen, device=device, dtype=torch_dtype)
    llm_frames = frames // 2 if qwen else frames
    return SyntheticCase(name=name, model=model, inputs=inputs, sampled_frames=frames, llm_frames=llm_frames, size=size)


def _prompt_inputs(
    config: Any,
    frames: int,
    *,
    size: str,
    generator: Any,
    qwen: bool,
    device: str,
    dtype: Any,
    extra_text_tokens: int = 0,
) -> dict[str, Any]:
    """One prompt's model inputs (batch of one): random text around a synthetic video drawn from ``generator``,
    with ``extra_text_tokens`` more question tokens after the video."""
    import torch

    head = torch.randint(1000, 100000, (_PROMPT_HEAD,), generator=generator)
    tail = torch.randint(1000, 100000, (_PROMPT_TAIL + extra_text_tokens,), generator=generator)
    if qwen:
        patch = int(config.vision_config.patch_size)
        side = 448 // patch if size == "full" else 8  # 448×448 pixels (full)
        grid = torch.tensor([[frames // 2, side, side]])
        count = frames // 2 * side * side // 4
        if config.model_type == "qwen3_vl":
            ids = _qwen3_vl_ids(head, tail, frames // 2, side * side // 4, generator)
        else:
            ids = torch.cat(
                [
                    head,
                    torch.tensor([_VISION_START]),
                    torch.full((count,), _VIDEO_TOKEN),
                    torch.tensor([_VISION_END]),
                    tail,
                ]
            )
        patches = torch.randn(frames // 2 * side * side, 3 * 2 * patch * patch, generator=generator)
        inputs = {
            "pixel_values_videos": patches.to(device, dtype),
            "video_grid_thw": grid.to(device),
            "mm_token_type_ids": ((ids == _VIDEO_TOKEN).long() * 2)[None].to(device),
        }
    else:
        image = config.vision_config.image_size
        side = -(-(image // config.vision_config.patch_size) // 2)
        count = frames * side * side + 1
        ids = torch.cat([head, torch.full((count,), _VIDEO_TOKEN), tail])
        # Smoothly varying frames in a few scenes, so the segment level sees realistic redundancy.
        scenes = torch.randn(4, 3, image, image, generator=generator)
        which = torch.arange(frames) * 4 // frames
        pixels = scenes[which] + 0.1 * torch.randn(frames, 3, image, image, generator=generator)
        inputs = {"pixel_values_videos": pixels[None].to(device, dtype)}
    inputs["input_ids"] = ids[None].to(device)
    inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    return inputs


class _Timer:
    """Device-side timing: CUDA events on a GPU, a synchronising wall clock on a CPU."""

    def __init__(self, device: str) -> None:
        import torch

        self.cuda = device.startswith("cuda") and torch.cuda.is_available()

    def sync(self) -> None:
        import torch

        if self.cuda:
            torch.cuda.synchronize()

    def mark(self) -> Any:
        import torch

        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def elapsed_ms(self, start: Any, end: Any) -> float:
        if self.cuda:
            return float(start.elapsed_time(end))
        return (end - start) * 1000.0

    def time(self, fn: Callable[[], Any]) -> float:
        self.sync()
        start = self.mark()
        fn()
        end = self.mark()
        self.sync()
        return self.elapsed_ms(start, end)


@contextlib.contextmanager
def _llm_timer(case: SyntheticCase, timer: _Timer, sink: list[float]) -> Iterator[None]:
    """Record the language model's forward time (prefill calls only: more than one query token), including
    the work of hieravid's hooks on the language model (locating the video, the segment level)."""
    language_model = case.model.model.language_model
    starts: list[Any] = []

    def before(module: Any, args: Any, kwargs: dict[str, Any]) -> None:
        starts.append(timer.mark())

    def after(module: Any, args: Any, kwargs: dict[str, Any], output: Any) -> None:
        start = starts.pop()
        embeds = kwargs.get("inputs_embeds")
        if embeds is not None and embeds.shape[1] > 1:
            end = timer.mark()
            timer.sync()
            sink.append(timer.elapsed_ms(start, end))

    # prepend: start the clock before hieravid's own pre-hook, so the segment level counts as prefill time.
    handles = [
        language_model.register_forward_pre_hook(before, with_kwargs=True, prepend=True),
        language_model.register_forward_hook(after, with_kwargs=True),
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def _vision_timer(case: SyntheticCase, timer: _Timer, sink: list[float]) -> Iterator[None]:
    """Record the time of each call of the multimodal model's ``get_video_features`` (vision tower, projector and
    pooling or merger: everything before the language model sees the video), by wrapping the method on the
    model instance for the block. Times are read when the block ends (CUDA events need a sync)."""
    import functools

    module, method = case.model.model, case.vision_method
    if method in vars(module):
        raise RuntimeError(f"{method} is already overridden on this model instance")
    original = getattr(module, method)
    marks: list[tuple[Any, Any]] = []

    @functools.wraps(original)
    def timed(*args: Any, **kwargs: Any) -> Any:
        start = timer.mark()
        output = original(*args, **kwargs)
        marks.append((start, timer.mark()))
        return output

    setattr(module, method, timed)
    try:
        yield
    finally:
        delattr(module, method)
        timer.sync()
        sink.extend(timer.elapsed_ms(start, end) for start, end in marks)


def _kv_cache_bytes(cache: Any) -> int:
    total = 0
    for layer in getattr(cache, "layers", []):
        for tensor in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if tensor is not None and hasattr(tensor, "numel"):
                total += tensor.numel() * tensor.element_size()
    return total


@dataclass
class PolicyResult:
    """Numbers for one (model, policy) pair; times in milliseconds."""

    policy: str
    llm_prefill_ms: float
    ttft_ms: float
    decode_ms_per_token: float | None
    decode_step_ms: float | None
    peak_memory_bytes: int | None
    kv_cache_bytes: int
    retention: float
    flops_ratio: float
    vision_ms: float | None = None
    speedups: str = "none"
    realised_video_tokens: list[int] = field(default_factory=list)
    layer_sequence_lengths: list[int] = field(default_factory=list)
    pruning_overhead_ms: dict[str, float] = field(default_factory=dict)
    ideal_llm_prefill_ms: float | None = None
    prefill_vs_ideal: float | None = None
    floor_llm_prefill_ms: float | None = None
    prefill_vs_floor: float | None = None
    ttft_speedup: float | None = None
    decode_speedup: float | None = None


def _median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def language_model_inputs(case: SyntheticCase) -> dict[str, Any]:
    """What the language model receives for the case's prompt in an unpruned forward (its first call)."""
    import torch

    language_model = case.model.model.language_model
    captured: dict[str, Any] = {}

    def keep(module: Any, args: Any, kwargs: dict[str, Any]) -> None:
        if not captured:
            captured.update(embeds=kwargs["inputs_embeds"], positions=kwargs.get("position_ids"))

    hook = language_model.register_forward_pre_hook(keep, with_kwargs=True)
    try:
        with torch.inference_mode():
            case.model(**case.inputs, use_cache=False, logits_to_keep=1)
    finally:
        hook.remove()
    return captured


def floor_stack(
    case: SyntheticCase, lengths: Sequence[int], lm_inputs: dict[str, Any] | None = None
) -> Callable[[], Any]:
    """The floor's computation: the model's own decoder layers on hidden states simply sliced to the realised
    per-layer row counts (``lengths``, the attention rows of each layer), no pruning work and no cache, then the
    final norm. Returns a function that runs it (call it under ``torch.inference_mode``)."""
    import torch

    language_model = case.model.model.language_model
    inputs = lm_inputs or language_model_inputs(case)
    embeds, positions = inputs["embeds"], inputs["positions"]
    first = int(lengths[0])
    hidden0 = embeds[:, :first].clone()
    if positions is None:
        positions = torch.arange(embeds.shape[1], device=embeds.device).unsqueeze(0)
    if positions.dim() == 3 and positions.shape[0] == 4:  # generate's text row, then the M-RoPE rows
        positions = positions[1:]
    with torch.inference_mode():
        cos, sin = language_model.rotary_emb(hidden0, positions[..., :first])
    layers = list(language_model.layers)

    def stack() -> Any:
        hidden = hidden0
        for layer, length in zip(layers, lengths):
            hidden = hidden[:, :length]
            out = layer(
                hidden,
                attention_mask=None,
                position_ids=None,
                use_cache=False,
                position_embeddings=(cos[:, :length], sin[:, :length]),
            )
            hidden = out[0] if isinstance(out, tuple) else out
        return language_model.norm(hidden)

    return stack


def floor_prefill_ms(
    case: SyntheticCase,
    lengths: Sequence[int],
    timer: _Timer,
    *,
    runs: int = 5,
    lm_inputs: dict[str, Any] | None = None,
) -> float:
    """The floor of a pruned prefill: the model's own decoder layers on hidden states simply sliced to the realised
    per-layer row counts (``lengths``, the attention rows of each layer), no pruning work and no cache, the whole
    stack and the final norm in one CUDA graph on a GPU (eager on a CPU). It is the limit a pruned prefill can
    reach on this machine (small row counts run matrix products less efficiently than the FLOPs ideal assumes).
    Each stage layer runs its MLP at the pre-cut count: an upper bound by at most one MLP half per stage."""
    import torch

    stack = floor_stack(case, lengths, lm_inputs)
    with torch.inference_mode():
        if not timer.cuda:
            stack()
            return _median([timer.time(stack) for _ in range(runs)])
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            stack()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            stack()
        graph.replay()
        times = [timer.time(graph.replay) for _ in range(runs)]
        del graph
        return _median(times)


def _pruning_overhead(case: SyntheticCase, run: Callable[[], Any], timer: _Timer) -> dict[str, float]:
    """GPU (or CPU) time inside the runtime's ``hieravid/…`` profiler ranges, per range name."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if timer.cuda else [])
    with profile(activities=activities) as profiler:
        run()
        timer.sync()
    totals: dict[str, float] = {}
    for event in profiler.key_averages():
        if event.key.startswith("hieravid/"):
            device_time = getattr(event, "device_time_total", 0.0) if timer.cuda else event.cpu_time_total
            totals[event.key] = totals.get(event.key, 0.0) + device_time / 1000.0
    return totals


def bench_policy(
    case: SyntheticCase,
    policy: str | None,
    *,
    runs: int = 5,
    warmup: int = 2,
    decode_tokens: int = 64,
    device: str = "cuda",
    cuda_graphs: bool = False,
    speedups: str = "exact",
) -> tuple[PolicyResult, Any]:
    """Measure one policy (``None`` = unpruned) on a built case. Returns the result and the plan.

    ``cuda_graphs`` and ``speedups`` are passed to :func:`hieravid.runtime.apply` (the segment level through CUDA
    graphs; the adapter's vision speedups). ``policy=None`` with ``speedups="none"`` is the stock model, without
    hieravid; ``policy=None`` with speedups installs them alone (``policies/none.yaml``: nothing pruned)."""
    import torch

    from hieravid.compat import cache_from_output
    from hieravid.plan import compile_plan
    from hieravid.runtime import apply

    timer = _Timer(device)
    plan = compile_plan(policy or _NONE_POLICY, case.spec())
    model, inputs = case.model, case.inputs
    stock = policy is None and speedups == "none"
    handle = (
        contextlib.nullcontext()
        if stock
        else apply(model, plan, cuda_graphs=cuda_graphs and policy is not None, speedups=speedups)
    )
    llm_times: list[float] = []
    vision_times: list[float] = []
    with handle, torch.inference_mode():

        def forward() -> Any:
            return model(**inputs, use_cache=True, logits_to_keep=1)

        def generate(tokens: int) -> Any:
            return model.generate(**inputs, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)

        for _ in range(warmup):
            forward()
        with _llm_timer(case, timer, llm_times), _vision_timer(case, timer, vision_times):
            ttfts = [timer.time(forward) for _ in range(runs)]
        output = forward()
        kv_bytes = _kv_cache_bytes(cache_from_output(output))
        stats = getattr(handle, "last_request", None)
        realised = [counts[0] for counts in stats.layer_video_tokens] if stats is not None and stats.pruned else []
        lengths = list(stats.layer_sequence_lengths) if stats is not None and stats.pruned else []
        del output
        decode = decode_step = None
        peak = None
        if decode_tokens > 0:
            loop = _DecodeLoop(model, inputs)
            for _ in range(2):
                loop.step()
            decode_step = _median([timer.time(loop.step) for _ in range(decode_tokens)])
            del loop
            generate(2)
            short = [timer.time(lambda: generate(1)) for _ in range(max(1, runs // 2))]
            long = [timer.time(lambda: generate(1 + decode_tokens)) for _ in range(max(1, runs // 2))]
            decode = (_median(long) - _median(short)) / decode_tokens
            if timer.cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                generate(1 + decode_tokens)
                peak = int(torch.cuda.max_memory_allocated())
        overhead = _pruning_overhead(case, forward, timer) if policy is not None else {}
    result = PolicyResult(
        policy=plan.policy.name if policy is not None or stock else f"unpruned+{speedups}",
        llm_prefill_ms=_median(llm_times),
        ttft_ms=_median(ttfts),
        decode_ms_per_token=decode,
        decode_step_ms=decode_step,
        peak_memory_bytes=peak,
        kv_cache_bytes=kv_bytes,
        retention=plan.retention,
        flops_ratio=plan.flops_ratio,
        vision_ms=_median(vision_times) if vision_times else None,
        speedups="none" if stock else speedups,
        realised_video_tokens=realised,
        layer_sequence_lengths=lengths,
        pruning_overhead_ms=overhead,
    )
    return result, plan


_NONE_POLICY = (
    "version: 1\nkind: PruningPolicy\nname: unpruned\nsegment: {enabled: false}\n"
    "frame: {enabled: false}\nlayer: {enabled: false}\n"
)


def environment_info(device: str) -> dict[str, Any]:
    import torch
    import transformers

    gpu = torch.cuda.get_device_name(0) if device.startswith("cuda") and torch.cuda.is_available() else None
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "gpu": gpu,
        "device": device,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


@contextlib.contextmanager
def sdpa_backends(cudnn: bool) -> Iterator[None]:
    """Enable or disable PyTorch's cuDNN SDPA backend for the block, restoring the previous setting.

    On torch 2.11 / H100 the cuDNN backend builds an execution plan on the host for every new
    key length, i.e. at every decode step (measured: 55 ms/step unpruned, 24 ms with it off), so the
    benchmark turns it off by default for every run, pruned and unpruned alike.
    """
    import torch

    previous = torch.backends.cuda.cudnn_sdp_enabled()
    torch.backends.cuda.enable_cudnn_sdp(cudnn)
    try:
        yield
    finally:
        torch.backends.cuda.enable_cudnn_sdp(previous)


def run_benchmark(
    models: Sequence[str],
    policies: Sequence[str],
    *,
    frames: int | None = None,
    size: str = "full",
    device: str = "cuda",
    dtype: str = "bfloat16",
    runs: int = 5,
    warmup: int = 2,
    decode_tokens: int = 64,
    log: Callable[[str], None] = print,
    checkpoint: Callable[[dict[str, Any]], None] | None = None,
    cudnn_sdp: bool = False,
    cuda_graphs: bool = False,
    speedups: str = "exact",
) -> dict[str, Any]:
    """Benchmark the unpruned model and each policy on each model; returns a JSON-ready report.

    ``speedups`` (``"exact"``, ``"all"`` or ``"none"``) is installed with every policy; unless ``"none"``, an
    ``unpruned+<speedups>`` row measures the unpruned model with the speedups alone (decode not measured: the
    speedups are on the vision side).

    ``checkpoint`` (if given) receives the partial report after each model, so a long run that is
    interrupted still leaves its finished models behind.
    """

    report: dict[str, Any] = {
        "environment": environment_info(device),
        "settings": {
            "size": size,
            "dtype": dtype,
            "runs": runs,
            "warmup": warmup,
            "decode_tokens": decode_tokens,
            "batch": 1,
            "attention": "sdpa",
            "cudnn_sdp": cudnn_sdp,
            "cuda_graphs": cuda_graphs,
            "speedups": speedups,
        },
        "models": [],
    }
    with sdpa_backends(cudnn_sdp):
        for name in models:
            _bench_model(
                report,
                name,
                policies,
                frames=frames,
                size=size,
                device=device,
                dtype=dtype,
                runs=runs,
                warmup=warmup,
                decode_tokens=decode_tokens,
                log=log,
                cuda_graphs=cuda_graphs,
                speedups=speedups,
            )
            if checkpoint is not None:
                checkpoint(report)
    return report


def _bench_model(
    report: dict[str, Any],
    name: str,
    policies: Sequence[str],
    *,
    frames: int | None,
    size: str,
    device: str,
    dtype: str,
    runs: int,
    warmup: int,
    decode_tokens: int,
    log: Callable[[str], None],
    cuda_graphs: bool = False,
    speedups: str = "exact",
) -> None:
    import gc

    import torch

    case = build_case(name, frames=frames, size=size, device=device, dtype=dtype)
    log(f"{name}: {case.sampled_frames} frames, {case.inputs['input_ids'].shape[1]} prompt tokens")
    lm_inputs = language_model_inputs(case)
    baseline, _ = bench_policy(
        case, None, runs=runs, warmup=warmup, decode_tokens=decode_tokens, device=device, speedups="none"
    )
    entries = [baseline]
    if speedups != "none":  # the unpruned model with the speedups alone: their effect on the vision side and TTFT
        alone, _ = bench_policy(case, None, runs=runs, warmup=warmup, decode_tokens=0, device=device, speedups=speedups)
        alone.ttft_speedup = baseline.ttft_ms / alone.ttft_ms
        entries.append(alone)
        log(
            f"  {alone.policy}: vision {alone.vision_ms:.1f} ms (stock {baseline.vision_ms:.1f}), "
            f"TTFT {alone.ttft_ms:.1f} ms"
        )
    for policy in policies:
        result, plan = bench_policy(
            case,
            policy,
            runs=runs,
            warmup=warmup,
            decode_tokens=decode_tokens,
            device=device,
            cuda_graphs=cuda_graphs,
            speedups=speedups,
        )
        result.ideal_llm_prefill_ms = baseline.llm_prefill_ms * plan.flops_ratio
        result.prefill_vs_ideal = result.llm_prefill_ms / result.ideal_llm_prefill_ms
        if result.layer_sequence_lengths:
            result.floor_llm_prefill_ms = floor_prefill_ms(
                case, result.layer_sequence_lengths, _Timer(device), runs=runs, lm_inputs=lm_inputs
            )
            result.prefill_vs_floor = result.llm_prefill_ms / result.floor_llm_prefill_ms
        result.ttft_speedup = baseline.ttft_ms / result.ttft_ms
        if result.decode_step_ms and baseline.decode_step_ms:
            result.decode_speedup = baseline.decode_step_ms / result.decode_step_ms
        entries.append(result)
        log(
            f"  {result.policy}: prefill {result.llm_prefill_ms:.1f} ms (ideal {result.ideal_llm_prefill_ms:.1f}, "
            f"floor {result.floor_llm_prefill_ms or float('nan'):.1f})"
            f", TTFT {result.ttft_ms:.1f} ms, vision {result.vision_ms:.1f} ms"
        )
    report["models"].append(
        {
            "model": name,
            "frames": case.sampled_frames,
            "llm_frames": case.llm_frames,
            "prompt_tokens": int(case.inputs["input_ids"].shape[1]),
            "spec": case.spec().to_dict(),
            "results": [dataclasses.asdict(entry) for entry in entries],
        }
    )
    del case
    gc.collect()
    if device.startswith("cuda") and torch.cuda.is_available():
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------------ batches
RAGGED_EXTRA_TOKENS = 8
"""In a ragged batch sample ``i``'s question is ``8·i`` tokens longer than sample 0's (left padding up to 8·(N−1))."""


@dataclass
class BatchResult:
    """One (batch size, policy) row of the batched benchmark: a prefill and one new token for the whole batch."""

    policy: str
    batch: int
    ragged: bool
    prompt_lengths: list[int]
    ttft_ms: float
    videos_per_s: float
    peak_memory_bytes: int | None
    retention: float
    flops_ratio: float
    first_tokens: list[int]
    max_abs_logit_diff_vs_alone: float
    speedup_vs_unpruned: float | None = None


class BatchSamples:
    """The prompts of a batched benchmark, drawn once per sample index so that every batch size shares them.

    Sample 0 is the case's own prompt; sample ``i`` has its own random video (other pixels, same geometry) and, in
    ragged batches, a question :data:`RAGGED_EXTRA_TOKENS`·``i`` tokens longer. Greedy first tokens of each sample run
    alone are cached per policy, so each is computed once whatever the batch sizes."""

    def __init__(self, case: SyntheticCase, *, ragged: bool, seed: int = 1000) -> None:
        if case.name in _CASE_BUILDERS:
            raise ValueError(f"batched runs cover {', '.join(BATCH_MODELS)}, not {case.name}")
        self.case = case
        self.ragged = ragged
        self.seed = seed
        self._samples: dict[int, dict[str, Any]] = {}
        self.alone_logits: dict[tuple[str, int], Any] = {}

    def sample(self, index: int) -> dict[str, Any]:
        """Sample ``index`` alone (a batch of one, no padding)."""
        import torch

        if index not in self._samples:
            if index == 0:
                self._samples[0] = self.case.inputs
            else:
                case, pixels = self.case, self.case.inputs["pixel_values_videos"]
                self._samples[index] = _prompt_inputs(
                    case.model.config,
                    case.sampled_frames,
                    size=case.size,
                    generator=torch.Generator(device="cpu").manual_seed(self.seed + index),
                    qwen=case.name.startswith("qwen"),
                    device=str(pixels.device),
                    dtype=pixels.dtype,
                    extra_text_tokens=RAGGED_EXTRA_TOKENS * index if self.ragged else 0,
                )
        return self._samples[index]

    def batch(self, size: int) -> dict[str, Any]:
        """Samples ``0 … size−1`` as one batch: token inputs left-padded to the longest prompt (attention mask and
        ``mm_token_type_ids`` 0 on the padding), pixel inputs concatenated along their first dimension."""
        import torch

        samples = [self.sample(index) for index in range(size)]
        length = max(sample["input_ids"].shape[1] for sample in samples)
        pad = pad_token_id_of(self.case.model)
        batch: dict[str, Any] = {}
        for key in samples[0]:
            if key in ("input_ids", "attention_mask", "mm_token_type_ids"):
                fill = pad if key == "input_ids" else 0
                rows = [
                    torch.cat([sample[key].new_full((1, length - sample[key].shape[1]), fill), sample[key]], dim=1)
                    for sample in samples
                ]
            else:
                rows = [sample[key] for sample in samples]
            batch[key] = torch.cat(rows, dim=0)
        return batch


def pad_token_id_of(model: Any) -> int:
    """The id a random-weight model's prompts are padded with: its text config's pad id, else 0 (masked out)."""
    text = getattr(model.config, "text_config", model.config)
    pad = getattr(text, "pad_token_id", None)
    return 0 if pad is None else int(pad)


def bench_batch(
    samples: BatchSamples,
    policy: str | None,
    batch: int,
    *,
    runs: int = 5,
    warmup: int = 2,
    device: str = "cuda",
    cuda_graphs: bool = False,
    speedups: str = "exact",
) -> BatchResult:
    """Time ``generate(max_new_tokens=1)`` on a batch of ``batch`` samples (``policy=None``: the stock model) and
    compare each sample's first-token logits with the same sample run alone under the same policy."""
    import torch

    from hieravid.plan import compile_plan
    from hieravid.runtime import apply

    case, timer = samples.case, _Timer(device)
    plan = compile_plan(policy or _NONE_POLICY, case.spec())
    model, inputs = case.model, samples.batch(batch)
    handle = (
        contextlib.nullcontext() if policy is None else apply(model, plan, cuda_graphs=cuda_graphs, speedups=speedups)
    )
    pad = pad_token_id_of(model)

    def first_token(prompt: dict[str, Any]) -> Any:
        return model.generate(
            **prompt,
            max_new_tokens=1,
            min_new_tokens=1,
            do_sample=False,
            pad_token_id=pad,
            output_logits=True,
            return_dict_in_generate=True,
        )

    with handle, torch.inference_mode():
        for _ in range(warmup):
            first_token(inputs)
        times = [timer.time(lambda: first_token(inputs)) for _ in range(runs)]
        peak = None
        if timer.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        logits = first_token(inputs).logits[0].float()
        if timer.cuda:
            peak = int(torch.cuda.max_memory_allocated())
        name = plan.policy.name
        for index in range(batch):
            if (name, index) not in samples.alone_logits:
                samples.alone_logits[name, index] = first_token(samples.sample(index)).logits[0][0].float()
        alone = torch.stack([samples.alone_logits[name, index] for index in range(batch)])
    ttft = _median(times)
    return BatchResult(
        policy=name,
        batch=batch,
        ragged=samples.ragged,
        prompt_lengths=[int(samples.sample(index)["input_ids"].shape[1]) for index in range(batch)],
        ttft_ms=ttft,
        videos_per_s=batch / (ttft / 1000.0),
        peak_memory_bytes=peak,
        retention=plan.retention,
        flops_ratio=plan.flops_ratio,
        first_tokens=[int(token) for token in logits.argmax(-1).tolist()],
        max_abs_logit_diff_vs_alone=float((logits - alone).abs().max()),
    )


def run_batch_benchmark(
    models: Sequence[str],
    policies: Sequence[str],
    batch_sizes: Sequence[int],
    *,
    ragged: bool = False,
    frames: int | None = None,
    size: str = "full",
    device: str = "cuda",
    dtype: str = "bfloat16",
    runs: int = 5,
    warmup: int = 2,
    log: Callable[[str], None] = print,
    checkpoint: Callable[[dict[str, Any]], None] | None = None,
    cudnn_sdp: bool = False,
    cuda_graphs: bool = False,
    speedups: str = "exact",
) -> dict[str, Any]:
    """Batched throughput: for each model and batch size, videos per second of a prefill plus one new token
    (``batch / TTFT``) and peak memory, for the stock model and each policy, on batches of equal-length prompts and
    (``ragged``) also on left-padded batches of different prompt lengths. Every sample has its own video, so each is
    pruned on its own content; each row records how far its first-token logits are from the samples run alone."""
    import gc

    import torch

    report: dict[str, Any] = {
        "environment": environment_info(device),
        "settings": {
            "size": size,
            "dtype": dtype,
            "runs": runs,
            "warmup": warmup,
            "batch": list(batch_sizes),
            "ragged": ragged,
            "new_tokens": 1,
            "attention": "sdpa",
            "cudnn_sdp": cudnn_sdp,
            "cuda_graphs": cuda_graphs,
            "speedups": speedups,
        },
        "models": [],
        "batches": [],
    }
    with sdpa_backends(cudnn_sdp):
        for name in models:
            case = build_case(name, frames=frames, size=size, device=device, dtype=dtype)
            log(f"{name}: {case.sampled_frames} frames, batches {', '.join(map(str, batch_sizes))}")
            for shape in (False, True) if ragged else (False,):
                samples = BatchSamples(case, ragged=shape)
                rows: list[BatchResult] = []
                for batch in batch_sizes:
                    unpruned = bench_batch(samples, None, batch, runs=runs, warmup=warmup, device=device)
                    rows.append(unpruned)
                    for policy in policies:
                        result = bench_batch(
                            samples,
                            policy,
                            batch,
                            runs=runs,
                            warmup=warmup,
                            device=device,
                            cuda_graphs=cuda_graphs,
                            speedups=speedups,
                        )
                        result.speedup_vs_unpruned = unpruned.ttft_ms / result.ttft_ms
                        rows.append(result)
                    log(
                        f"  batch {batch}{' ragged' if shape else ''}: "
                        + ", ".join(
                            f"{row.policy} {row.videos_per_s:.2f} videos/s" for row in rows[-1 - len(policies) :]
                        )
                    )
                report["batches"].append(
                    {
                        "model": name,
                        "frames": case.sampled_frames,
                        "ragged": shape,
                        "results": [dataclasses.asdict(row) for row in rows],
                    }
                )
                if checkpoint is not None:
                    checkpoint(report)
            del case, samples
            gc.collect()
            if device.startswith("cuda") and torch.cuda.is_available():
                torch.cuda.empty_cache()
    return report


def run_frames_sweep(
    name: str,
    frames_list: Sequence[int],
    policy: str,
    *,
    size: str = "full",
    device: str = "cuda",
    dtype: str = "bfloat16",
    runs: int = 5,
    warmup: int = 2,
    log: Callable[[str], None] = print,
    cuda_graphs: bool = False,
) -> list[dict[str, Any]]:
    """LLM prefill time of the unpruned model and ``policy`` for each frame count."""
    import gc

    rows = []
    for frames in frames_list:
        case = build_case(name, frames=frames, size=size, device=device, dtype=dtype)
        unpruned, _ = bench_policy(case, None, runs=runs, warmup=warmup, decode_tokens=0, device=device)
        pruned, plan = bench_policy(
            case, policy, runs=runs, warmup=warmup, decode_tokens=0, device=device, cuda_graphs=cuda_graphs
        )
        rows.append(
            {
                "frames": frames,
                "video_tokens": case.spec().video_tokens,
                "unpruned_prefill_ms": unpruned.llm_prefill_ms,
                "pruned_prefill_ms": pruned.llm_prefill_ms,
                "ideal_prefill_ms": unpruned.llm_prefill_ms * plan.flops_ratio,
                "flops_ratio": plan.flops_ratio,
            }
        )
        log(
            f"  {frames} frames: unpruned {unpruned.llm_prefill_ms:.1f} ms, {plan.policy.name} "
            f"{pruned.llm_prefill_ms:.1f} ms (ideal {rows[-1]['ideal_prefill_ms']:.1f})"
        )
        del case
        gc.collect()
    return rows


def plot_sweep(rows: Sequence[dict[str, Any]], path: Path, title: str) -> None:
    """Save the frames sweep as a PNG (matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    frames = [row["frames"] for row in rows]
    figure, axis = plt.subplots(figsize=(7, 4.5), dpi=120)
    axis.plot(frames, [row["unpruned_prefill_ms"] for row in rows], "o-", label="unpruned")
    axis.plot(frames, [row["pruned_prefill_ms"] for row in rows], "o-", label="hieravid-30")
    axis.plot(frames, [row["ideal_prefill_ms"] for row in rows], "--", color="grey", label="FLOPs ideal")
    axis.set_xscale("log", base=2)
    axis.set_xticks(frames, [str(f) for f in frames])
    axis.set_xlabel("frames")
    axis.set_ylabel("LLM prefill (ms)")
    axis.set_title(title)
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    plt.close(figure)


def format_report(report: dict[str, Any]) -> str:
    """A readable table of a benchmark report."""
    env = report["environment"]
    settings = report.get("settings", {})
    notes = " · CUDA graphs (input level, prefills)" if settings.get("cuda_graphs") else ""
    notes += f" · speedups: {settings.get('speedups', 'none')}"
    lines = [
        f"hieravid bench — {env.get('gpu') or env['device']}, torch {env['torch']}, "
        f"transformers {env['transformers']}, {env['date']}{notes}"
    ]
    header = (
        "policy",
        "retention",
        "FLOPs",
        "prefill ms",
        "ideal ms",
        "vs ideal",
        "floor ms",
        "vs floor",
        "TTFT ms",
        "TTFT ×",
        "vision ms",
        "decode ms/step",
        "generate ms/tok",
        "peak GiB",
        "KV MiB",
        "overhead ms",
    )
    for entry in report["models"]:
        lines.append("")
        lines.append(f"{entry['model']}: {entry['frames']} frames, {entry['prompt_tokens']} prompt tokens")
        rows = [header]
        for result in entry["results"]:

            def fmt(value: Any, spec: str) -> str:
                return "-" if value is None else format(value, spec)

            overhead = sum(result["pruning_overhead_ms"].values()) if result["pruning_overhead_ms"] else None
            rows.append(
                (
                    result["policy"],
                    fmt(result["retention"], ".3f"),
                    fmt(result["flops_ratio"], ".3f"),
                    fmt(result["llm_prefill_ms"], ".1f"),
                    fmt(result["ideal_llm_prefill_ms"], ".1f"),
                    fmt(result["prefill_vs_ideal"], ".2f"),
                    fmt(result.get("floor_llm_prefill_ms"), ".1f"),
                    fmt(result.get("prefill_vs_floor"), ".2f"),
                    fmt(result["ttft_ms"], ".1f"),
                    fmt(result["ttft_speedup"], ".2f"),
                    fmt(result.get("vision_ms"), ".1f"),
                    fmt(result.get("decode_step_ms"), ".2f"),
                    fmt(result["decode_ms_per_token"], ".2f"),
                    fmt(None if result["peak_memory_bytes"] is None else result["peak_memory_bytes"] / 2**30, ".2f"),
                    fmt(result["kv_cache_bytes"] / 2**20, ".1f"),
                    fmt(overhead, ".2f"),
                )
            )
        widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
        for index, row in enumerate(rows):
            lines.append(
                "  ".join(
                    cell.rjust(width) if i else cell.ljust(width) for i, (cell, width) in enumerate(zip(row, widths))
                )
            )
            if index == 0:
                lines.append("  ".join("-" * width for width in widths))
    lines += _format_batches(report.get("batches", []))
    return "\n".join(lines)


def _format_batches(entries: Sequence[dict[str, Any]]) -> list[str]:
    """Table lines of the batched rows (``--batch``)."""
    lines: list[str] = []
    header = ("batch", "policy", "retention", "TTFT ms", "videos/s", "× unpruned", "peak GiB", "Δ logits vs alone")
    for entry in entries:
        lines += ["", f"{entry['model']}: {entry['frames']} frames, {'ragged' if entry['ragged'] else 'equal'} prompts"]
        rows = [header]
        for result in entry["results"]:
            peak = result["peak_memory_bytes"]
            speedup = result["speedup_vs_unpruned"]
            rows.append(
                (
                    str(result["batch"]),
                    result["policy"],
                    f"{result['retention']:.3f}",
                    f"{result['ttft_ms']:.1f}",
                    f"{result['videos_per_s']:.2f}",
                    "-" if speedup is None else f"{speedup:.2f}",
                    "-" if peak is None else f"{peak / 2**30:.2f}",
                    f"{result['max_abs_logit_diff_vs_alone']:.1e}",
                )
            )
        widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
        for index, row in enumerate(rows):
            lines.append("  ".join(cell.rjust(width) for cell, width in zip(row, widths)))
            if index == 0:
                lines.append("  ".join("-" * width for width in widths))
    return lines


def write_report(report: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")


def profile_prefill(
    case: SyntheticCase, policy: str, *, device: str = "cuda", top: int = 15, cuda_graphs: bool = False
) -> dict[str, Any]:
    """Profile one pruned prefill: the operators that take the most device time, and hieravid's ranges."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from hieravid.runtime import apply

    timer = _Timer(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if timer.cuda else [])
    with apply(case.model, policy, cuda_graphs=cuda_graphs), torch.inference_mode():
        for _ in range(2):
            case.model(**case.inputs, use_cache=True, logits_to_keep=1)
        timer.sync()
        with profile(activities=activities) as profiler:
            case.model(**case.inputs, use_cache=True, logits_to_keep=1)
            timer.sync()
    key = "self_device_time_total" if timer.cuda else "self_cpu_time_total"
    events = sorted(profiler.key_averages(), key=lambda event: getattr(event, key, 0.0), reverse=True)
    total = sum(getattr(event, key, 0.0) for event in events) / 1000.0
    rows = [
        {"name": event.key, "ms": getattr(event, key, 0.0) / 1000.0, "calls": event.count} for event in events[:top]
    ]
    ranges = {
        event.key: (getattr(event, "device_time_total", 0.0) if timer.cuda else event.cpu_time_total) / 1000.0
        for event in profiler.key_averages()
        if event.key.startswith("hieravid/")
    }
    syncs = sum(
        event.count
        for event in profiler.key_averages()
        if event.key in ("aten::item", "aten::_local_scalar_dense", "cudaStreamSynchronize", "cudaDeviceSynchronize")
    )
    return {
        "policy": policy,
        "total_self_ms": total,
        "top_ops": rows,
        "hieravid_ranges_ms": ranges,
        "host_syncs": syncs,
    }


class _DecodeLoop:
    """Single-token decode steps driven by hand (no ``generate``): the prefill runs once at construction,
    then each :meth:`step` feeds the greedy token back with the grown 2-D mask and the returned cache."""

    def __init__(self, model: Any, inputs: dict[str, Any]) -> None:
        from hieravid.adapters.registry import get_adapter
        from hieravid.compat import cache_from_output

        self.model = model
        # Explicit positions (the adapter's text positions after the prompt): models with M-RoPE cannot
        # derive a decode step's positions from the 2-D mask alone (generate passes them too).
        self.adapter = get_adapter(model.config.model_type)(model)
        output = model(**inputs, use_cache=True, logits_to_keep=1)
        self.cache = cache_from_output(output)
        self.mask = inputs["attention_mask"]
        self.token = output.logits[:, -1:].argmax(-1)

    def step(self) -> None:
        import torch

        from hieravid.compat import cache_argument, cache_from_output

        positions = self.adapter.default_position_ids(self.token, self.mask.shape[1])
        self.mask = torch.cat([self.mask, self.mask.new_ones(self.mask.shape[0], 1)], dim=1)
        out = self.model(
            input_ids=self.token,
            attention_mask=self.mask,
            position_ids=positions,
            **cache_argument(self.model, self.cache),
            use_cache=True,
        )
        self.cache = cache_from_output(out)
        self.token = out.logits[:, -1:].argmax(-1)


def profile_decode(
    case: SyntheticCase, policy: str | None, *, steps: int = 16, device: str = "cuda", top: int = 12
) -> dict[str, Any]:
    """Time single-token decode steps driven by hand (no ``generate``), then profile one step.

    Separates the model's own decode cost from ``generate``'s bookkeeping, for the unpruned model
    (``policy=None``) and under a policy.
    """
    import torch
    from torch.profiler import ProfilerActivity, profile

    from hieravid.runtime import apply

    timer = _Timer(device)
    model, inputs = case.model, case.inputs
    handle = apply(model, policy) if policy is not None else contextlib.nullcontext()
    with handle, torch.inference_mode():
        loop = _DecodeLoop(model, inputs)
        for _ in range(2):
            loop.step()
        step_times = [timer.time(loop.step) for _ in range(steps)]
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if timer.cuda else [])
        profiled_steps = 4
        with profile(activities=activities) as profiler:
            for _ in range(profiled_steps):
                loop.step()
            timer.sync()
    averages = profiler.key_averages()
    cpu = sorted(averages, key=lambda event: event.self_cpu_time_total, reverse=True)[:top]
    syncs = sum(
        event.count
        for event in averages
        if event.key in ("aten::item", "aten::_local_scalar_dense", "cudaStreamSynchronize")
    )
    gpu = sum(getattr(event, "self_device_time_total", 0.0) for event in averages) / 1000.0 if timer.cuda else None
    return {
        "policy": policy or "unpruned",
        "step_ms_median": _median(step_times),
        # Kernel time of a step: what the smaller caches change (the wall step is host-bound at batch 1).
        "gpu_ms_per_step": None if gpu is None else gpu / profiled_steps,
        "host_syncs_per_step": syncs / profiled_steps,
        "top_cpu_ops": [
            {
                "name": event.key,
                "cpu_ms": event.self_cpu_time_total / 1000.0 / profiled_steps,
                "calls": event.count / profiled_steps,
            }
            for event in cpu
        ],
    }
