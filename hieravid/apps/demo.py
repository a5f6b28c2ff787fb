"""``hieravid demo``: HieraVid end to end on a tiny random-weight LLaVA-OneVision, with nothing downloaded.

The model is built from the bundled config ``hieravid/data/demo/llava_onevision_tiny.json`` (SigLIP
vision tower + Qwen2 language model, 4 decoder layers, 64 tokens per 128×128 frame) with seeded random
weights; the tokenizer is a byte-level one built in code; the video is :func:`hieravid.apps.video.synthetic_video`
with known scene cuts. The demo runs the same code path as ``hieravid run`` (prompt from the chat
template, video preprocessing, ``hieravid.runtime.apply``, greedy generation), checks that the detected
segments equal the scene cuts, and writes a trace and its visualisation.

Random weights mean the answer is noise and the timings are dominated by fixed overheads: the point
is to see every level work on a real transformers model, not the speedup (that needs a 7B model).
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hieravid.errors import HieravidError

if TYPE_CHECKING:
    from hieravid.apps.run import LoadedModel, RunResult
    from hieravid.apps.trace import RequestTrace
    from hieravid.apps.video import SyntheticVideo
    from hieravid.policy import Policy

__all__ = [
    "CHAT_TEMPLATE",
    "DEMO_SCENE_FRACTIONS",
    "DemoResult",
    "build_demo_model",
    "build_demo_tokenizer",
    "default_policy",
    "demo_config",
    "demo_video",
    "run_demo",
    "save_demo_checkpoint",
]

CONFIG_FILE = "llava_onevision_tiny.json"
CONFIG_FILES = {"llava_onevision": CONFIG_FILE, "qwen2_vl": "qwen2_vl_tiny.json"}
"""Bundled tiny configs by architecture (``hieravid demo --export DIR --arch ...``)."""
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>")
"""Special tokens after the 256 byte tokens: ids 256..260 (``<video>`` is 260, as in the bundled config)."""
QWEN_SPECIAL_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|video_pad|>", "<|image_pad|>")
"""Qwen2-VL's vision tokens, ids 261..264 (as in the bundled Qwen2-VL config)."""
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'video' %}<video>\n{% elif content['type'] == 'image' %}<image>\n"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
"""ChatML with a ``<video>`` placeholder, the LLaVA-OneVision (Qwen2) convention."""
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif content['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
"""Qwen2-VL's ChatML with ``<|vision_start|><|video_pad|><|vision_end|>`` for a video."""
DEMO_SCENE_FRACTIONS = (0.1875, 0.3125, 0.21875, 0.28125)
"""Scene lengths as fractions of the video (6, 10, 7 and 9 frames of 32)."""
DEMO_QUESTION = "What happens in this video?"


def demo_config(architecture: str = "llava_onevision") -> dict[str, Any]:
    """A bundled tiny config (LLaVA-OneVision by default) as a mapping (``_comment`` removed)."""
    if architecture not in CONFIG_FILES:
        raise HieravidError(f"no tiny {architecture!r} config; known: {', '.join(CONFIG_FILES)}")
    text = resources.files("hieravid").joinpath("data", "demo", CONFIG_FILES[architecture]).read_text(encoding="utf-8")
    data = json.loads(text)
    data.pop("_comment", None)
    return data


def build_demo_tokenizer(architecture: str = "llava_onevision") -> Any:
    """A byte-level tokenizer (256 byte tokens + ChatML specials) with the demo chat template, built in code.

    For ``qwen2_vl`` the Qwen vision tokens are added (ids 261..264) with Qwen2-VL's chat template.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    qwen = architecture == "qwen2_vl"
    specials = SPECIAL_TOKENS + (QWEN_SPECIAL_TOKENS if qwen else ())
    vocab = {char: index for index, char in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    for offset, token in enumerate(specials):
        vocab[token] = 256 + offset
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in specials])
    media = (
        {"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"}
        if qwen
        else {"image_token": "<image>", "video_token": "<video>"}
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>", extra_special_tokens=media
    )
    tokenizer.chat_template = QWEN_CHAT_TEMPLATE if qwen else CHAT_TEMPLATE
    return tokenizer


def build_demo_model(seed: int = 0, architecture: str = "llava_onevision") -> Any:
    """The tiny model (LLaVA-OneVision by default) with seeded random weights (float32, eval mode, CPU)."""
    import torch
    import transformers

    data = demo_config(architecture)
    if architecture == "qwen2_vl":
        config_class, model_class = transformers.Qwen2VLConfig, transformers.Qwen2VLForConditionalGeneration
    else:
        config_class = transformers.LlavaOnevisionConfig
        model_class = transformers.LlavaOnevisionForConditionalGeneration
    config = config_class.from_dict(data)
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = model_class(config)
    finally:
        torch.random.set_rng_state(generator_state)
    model.generation_config.pad_token_id = config.text_config.pad_token_id
    model.generation_config.eos_token_id = config.text_config.eos_token_id
    return model.eval()


def _video_processor_config(config: dict[str, Any]) -> dict[str, Any]:
    size = config["vision_config"]["image_size"]
    return {
        "video_processor_type": "LlavaOnevisionVideoProcessor",
        "processor_class": "LlavaOnevisionProcessor",
        "size": {"height": size, "width": size},
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
        "rescale_factor": 1 / 255,
        "do_resize": True,
        "do_rescale": True,
        "do_normalize": True,
        "do_convert_rgb": True,
    }


def _save_qwen2_vl_processor(directory: Path) -> None:
    common = {
        "processor_class": "Qwen2VLProcessor",
        "patch_size": 14,
        "merge_size": 2,
        "temporal_patch_size": 2,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
        "rescale_factor": 1 / 255,
    }
    video = {
        "video_processor_type": "Qwen2VLVideoProcessor",
        **common,
        "size": {"shortest_edge": 56 * 56, "longest_edge": 28 * 28 * 64},
    }
    image = {
        "image_processor_type": "Qwen2VLImageProcessor",
        **common,
        "min_pixels": 56 * 56,
        "max_pixels": 28 * 28 * 64,
    }
    for name, data in (("video_preprocessor_config.json", video), ("preprocessor_config.json", image)):
        (directory / name).write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    (directory / "chat_template.jinja").write_text(QWEN_CHAT_TEMPLATE, encoding="utf-8")


def save_demo_checkpoint(
    directory: str | Path, *, seed: int = 0, architecture: str = "llava_onevision", model: Any = None
) -> Path:
    """Write a tiny random model as a regular checkpoint folder (config, safetensors weights, tokenizer,
    chat template and processor configs) that ``hieravid run --model DIR`` and lmms-eval load offline.

    ``architecture`` is ``llava_onevision`` (the demo model) or ``qwen2_vl``. ``model`` (LLaVA-OneVision only): a
    model to save instead of the tiny one, e.g. a full-size random-weight one; its config must keep the demo's token
    ids (``benchmarks/lmms_eval_dp.py``), and the processor files follow its vision tower's image size.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if architecture == "qwen2_vl":
        if model is not None:
            raise HieravidError("save_demo_checkpoint(model=...) saves LLaVA-OneVision models only")
        build_demo_model(seed, architecture).save_pretrained(directory)
        build_demo_tokenizer(architecture).save_pretrained(directory)
        _save_qwen2_vl_processor(directory)
        return directory
    if model is None:
        config = demo_config(architecture)
        build_demo_model(seed).save_pretrained(directory)
    else:
        config = model.config.to_dict()
        model.save_pretrained(directory)
    tokenizer = build_demo_tokenizer()
    tokenizer.save_pretrained(directory)
    video = _video_processor_config(config)
    size = video["size"]
    image = {
        "image_processor_type": "LlavaOnevisionImageProcessor",
        "processor_class": "LlavaOnevisionProcessor",
        "size": size,
        "crop_size": size,
        "image_grid_pinpoints": config["image_grid_pinpoints"],
        "image_mean": video["image_mean"],
        "image_std": video["image_std"],
        "do_pad": True,
    }
    patches = (config["vision_config"]["image_size"] // config["vision_config"]["patch_size"]) ** 2
    processor = {
        "processor_class": "LlavaOnevisionProcessor",
        "num_image_tokens": patches,
        "vision_feature_select_strategy": config["vision_feature_select_strategy"],
        "vision_aspect_ratio": config["vision_aspect_ratio"],
    }
    for name, data in (
        ("video_preprocessor_config.json", video),
        ("preprocessor_config.json", image),
        ("processor_config.json", processor),
    ):
        (directory / name).write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    (directory / "chat_template.jinja").write_text(CHAT_TEMPLATE, encoding="utf-8")
    return directory


def _scene_lengths(frames: int) -> list[int]:
    if frames < 8:
        raise HieravidError(f"the demo needs at least 8 frames (2 per scene), got {frames}")
    lengths = [max(2, round(fraction * frames)) for fraction in DEMO_SCENE_FRACTIONS]
    lengths[-1] += frames - sum(lengths)
    if lengths[-1] < 2:
        raise HieravidError(f"cannot split {frames} frames into the demo's scenes")
    return lengths


def demo_video(frames: int = 32, *, seed: int = 0) -> SyntheticVideo:
    """The demo's synthetic video: four scenes (stripes, checker, rings, blobs) with small motion."""
    from hieravid.apps.video import synthetic_video

    size = demo_config()["vision_config"]["image_size"]
    return synthetic_video(_scene_lengths(frames), size=size, seed=seed)


def default_policy() -> Policy:
    """HieraVid-30 (the schema's defaults are the authors' 30% setting, = ``policies/hieravid-30.yaml``)."""
    from hieravid.policy import Policy

    return Policy(
        version=1,
        kind="PruningPolicy",
        name="hieravid-30",
        description="HieraVid default, keeps about 30% of video tokens averaged over layers.",
    )


def demo_loaded_model(seed: int = 0) -> LoadedModel:
    """The demo model and tokenizer wrapped as :class:`~hieravid.apps.run.LoadedModel` (CPU, float32)."""
    from hieravid.apps.run import LoadedModel

    return LoadedModel(
        model=build_demo_model(seed),
        tokenizer=build_demo_tokenizer(),
        processor=None,
        model_type="llava_onevision",
        processor_config=_video_processor_config(demo_config()),
        name="hieravid-demo (tiny LLaVA-OneVision, random weights)",
        device="cpu",
        dtype="float32",
    )


@dataclass
class DemoResult:
    """What :func:`run_demo` produced."""

    video: SyntheticVideo
    result: RunResult
    trace: RequestTrace
    detected_cuts: list[int]
    trace_path: Path | None
    image_path: Path | None
    video_path: Path | None
    notes: list[str]

    @property
    def cuts_match(self) -> bool:
        return list(self.video.cuts) == self.detected_cuts


def run_demo(
    out_dir: str | Path | None = "hieravid-demo",
    *,
    frames: int = 32,
    policy: Policy | str | Path | None = None,
    seed: int = 0,
    max_new_tokens: int = 8,
    write_video_file: bool = True,
    draw: bool = True,
) -> DemoResult:
    """Run the demo; writes ``demo.mp4``, ``trace.safetensors`` and ``demo.png`` under ``out_dir``.

    Writing the video needs PyAV and drawing needs matplotlib; either is skipped with a note when
    missing. ``out_dir=None`` writes nothing.
    """
    import torch

    from hieravid.apps.run import build_trace, llm_frame_thumbnails, prepare_inputs, run_request
    from hieravid.apps.trace import save_trace
    from hieravid.policy import load_policy

    chosen = default_policy() if policy is None else load_policy(policy)
    video = demo_video(frames, seed=seed)
    loaded = demo_loaded_model(seed)
    torch.set_num_threads(max(1, min(torch.get_num_threads(), 4)))
    inputs = prepare_inputs(loaded, video.frames, DEMO_QUESTION)
    result = run_request(
        loaded, inputs, chosen, max_new_tokens=max_new_tokens, compare_unpruned=True, warmup=1, trace=True
    )
    thumbnails = llm_frame_thumbnails(video.frames, loaded.frames_per_step, inputs.llm_frames, size=64)
    trace = build_trace(
        result.stats,
        result.plan,
        thumbnails=thumbnails,
        merge_target=result.merge_target,
        frame_redundancy=result.frame_redundancy,
        info={
            "model": loaded.name,
            "question": DEMO_QUESTION,
            "answer": result.answer,
            "true_cuts": list(video.cuts),
            "scenes": list(video.scene_names),
            "ttft_ms": result.timings.ttft_ms,
            "prefill_ms": result.timings.prefill_ms,
            "source": "hieravid demo",
        },
    )
    notes: list[str] = []
    trace_path = image_path = video_path = None
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        trace_path = save_trace(out / "trace.safetensors", trace)
        if write_video_file:
            try:
                from hieravid.apps.video import write_video

                video_path = write_video(out / "demo.mp4", video.frames, fps=8.0)
            except HieravidError as error:
                notes.append(f"video not written: {error}")
        if draw:
            try:
                from hieravid.apps.viz import draw_trace

                image_path = draw_trace(trace, out / "demo.png")
            except HieravidError as error:
                notes.append(f"visualisation not drawn: {error}")
    return DemoResult(
        video=video,
        result=result,
        trace=trace,
        detected_cuts=trace.cuts(),
        trace_path=trace_path,
        image_path=image_path,
        video_path=video_path,
        notes=notes,
    )


def format_demo(demo: DemoResult) -> str:
    """The demo's printed report."""
    from hieravid.apps.run import format_tokens

    video, result = demo.video, demo.result
    scenes = ", ".join(f"{name} ({length})" for name, length in zip(video.scene_names, _lengths(video)))
    check = "match" if demo.cuts_match else "DO NOT MATCH"
    answer = result.answer.encode("unicode_escape", "backslashreplace").decode("ascii")
    lines = [
        "hieravid demo: tiny LLaVA-OneVision (random weights, built from hieravid/data/demo), synthetic video",
        f"video: {video.frames.shape[0]} frames {video.frames.shape[2]}×{video.frames.shape[1]}, scenes: {scenes}",
        f"policy: {result.plan.policy.name}",
        "",
        f"scene cuts (true):     {list(video.cuts)}",
        f"segment cuts (found):  {demo.detected_cuts}   → {check}",
        "",
        format_tokens(result.stats, result.plan),
        "",
    ]
    from hieravid.apps.run import format_timings

    lines.append(format_timings(result, "cpu", "float32"))
    lines.extend(_timing_note(result))
    lines.append("")
    lines.append(f"answer (random weights, noise): {answer!s}")
    for label, path in (("trace", demo.trace_path), ("visualisation", demo.image_path), ("video", demo.video_path)):
        if path is not None:
            lines.append(f"{label}: {path}")
    lines.extend(f"note: {note}" for note in demo.notes)
    return "\n".join(lines)


def _timing_note(result: RunResult) -> list[str]:
    """Why the toy model is not faster pruned (both runs are warmed up first: this is not a cold start)."""
    unpruned = result.unpruned_timings
    if unpruned is None or result.timings.ttft_ms < unpruned.ttft_ms:  # faster pruned, even on the toy model
        return ["  (a 4-layer toy model: fixed overheads dominate; the speedup needs a real 7B model)"]
    return [
        f"  why no speedup here: both runs are warmed up first; the toy model's 4 layers of width 64 take only "
        f"{unpruned.prefill_ms:.0f} ms unpruned,",
        "  less than hieravid's own work, which does not shrink with the model (segmenting and merging the video, "
        "then a",
        "  greedy DPP per segment at each stage). A 7B model's 28 wide layers dwarf it: LLaVA-OneVision-7B at 32 "
        "frames,",
        "  LLM prefill 182.5 → 67.4 ms with hieravid-30 on an H200 (README, Speed).",
    ]


def _lengths(video: SyntheticVideo) -> list[int]:
    bounds = [0, *video.cuts, video.frames.shape[0]]
    return [b - a for a, b in itertools.pairwise(bounds)]


def demo_command(args: Any) -> int:
    """``hieravid demo`` (see ``hieravid demo --help``); returns 0, or 1 when the segments miss the cuts."""
    import sys

    from hieravid.apps.paths import check_output_folder
    from hieravid.policy import load_policy_file

    if args.export:
        # Into a new or empty folder only: the export writes config.json, weights and tokenizer files, and must not
        # overwrite a real checkpoint's.
        check_output_folder(args.export, option="--export", empty=True)
        demo_video(args.frames, seed=args.seed)  # the frame count is checked before anything is written
        folder = save_demo_checkpoint(args.export, seed=args.seed, architecture=args.arch)
        video = demo_video(args.frames, seed=args.seed)
        from hieravid.apps.video import write_video

        path = write_video(folder / "demo.mp4", video.frames, fps=8.0)
        print(f"tiny {args.arch} checkpoint (random weights): {folder}")
        print(f"demo video ({video.frames.shape[0]} frames, scene cuts at {list(video.cuts)}): {path}")
        return 0
    check_output_folder(args.out, option="--out")
    policy = load_policy_file(args.policy) if args.policy is not None else None
    demo_video(args.frames, seed=args.seed)  # the frame count is checked before the model is built
    print("building the tiny model and the synthetic video", file=sys.stderr)
    demo = run_demo(args.out, frames=args.frames, policy=policy, seed=args.seed)
    print(format_demo(demo))
    return 0 if demo.cuts_match else 1
