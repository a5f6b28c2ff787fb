"""Model specs: the shapes the planner needs, without weights.

A :class:`ModelSpec` holds the language model's dimensions and the video layout entering it
(frames × rows × cols plus newline tokens). Specs come from a built-in catalogue of known
checkpoints, from a local ``config.json`` / checkpoint folder, or from a transformers config or
model object (read by attribute, so no transformers model code is imported here).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from hieravid.errors import SpecError

NewlineLayout = Literal["none", "per_row", "per_frame", "per_video"]


@dataclass(frozen=True)
class ModelSpec:
    """Shapes of a VideoLLM's language model and of the video it sees (batch 1)."""

    name: str
    model_type: str
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    frames: int
    """Frames as the LLM sees them (Qwen2-VL: temporal patches, i.e. sampled frames / 2)."""
    rows: int
    cols: int
    newline_layout: NewlineLayout = "none"
    text_tokens: int = 64
    """Prompt tokens that are not video (system prompt, question, template)."""
    default_query_rows: int = 1

    def __post_init__(self) -> None:
        for field in (
            "num_layers",
            "hidden_size",
            "intermediate_size",
            "num_attention_heads",
            "num_key_value_heads",
            "frames",
            "rows",
            "cols",
        ):
            value = getattr(self, field)
            if not isinstance(value, int) or value < 1:
                raise SpecError(f"model spec {self.name!r}: {field} must be a positive integer, got {value!r}")
        if self.text_tokens < 1:
            raise SpecError(f"model spec {self.name!r}: text_tokens must be ≥ 1 (the question), got {self.text_tokens}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def tokens_per_frame(self) -> int:
        """Content tokens of one frame (newlines excluded)."""
        return self.rows * self.cols

    @property
    def newline_tokens(self) -> int:
        per_layout = {"none": 0, "per_row": self.frames * self.rows, "per_frame": self.frames, "per_video": 1}
        return per_layout[self.newline_layout]

    @property
    def frame_tokens(self) -> int:
        """Video content tokens (frames × rows × cols)."""
        return self.frames * self.tokens_per_frame

    @property
    def video_tokens(self) -> int:
        """N_v: every position the video occupies in the prompt, newlines included."""
        return self.frame_tokens + self.newline_tokens

    def with_frames(self, frames: int) -> ModelSpec:
        """The same model seeing ``frames`` frames (as the LLM counts them)."""
        if frames < 1:
            raise SpecError(f"frames must be a positive integer, got {frames}")
        return dataclasses.replace(self, frames=frames)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["video_tokens"] = self.video_tokens
        return data


_QWEN2_7B = dict(
    num_layers=28, hidden_size=3584, intermediate_size=18944, num_attention_heads=28, num_key_value_heads=4
)
_QWEN2_72B = dict(
    num_layers=80, hidden_size=8192, intermediate_size=29568, num_attention_heads=64, num_key_value_heads=8
)
_QWEN2_05B = dict(num_layers=24, hidden_size=896, intermediate_size=4864, num_attention_heads=14, num_key_value_heads=2)
_QWEN2_15B = dict(
    num_layers=28, hidden_size=1536, intermediate_size=8960, num_attention_heads=12, num_key_value_heads=2
)
# SigLIP 27×27 patches pooled to 14×14 per frame, one newline after the whole video (HF OneVision path).
_ONEVISION_VIDEO = dict(rows=14, cols=14, newline_layout="per_video")
# Qwen2-VL at 448×448: 16×16 merged tokens per temporal patch of 2 frames; 32 frames → 16 patches.
_QWEN2VL_VIDEO = dict(frames=16, rows=16, cols=16, newline_layout="none", default_query_rows=4)

CATALOGUE: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec(
            "llava-onevision-7b", "llava_onevision", vocab_size=152000, frames=32, **_QWEN2_7B, **_ONEVISION_VIDEO
        ),
        ModelSpec(
            "llava-onevision-0.5b", "llava_onevision", vocab_size=151936, frames=32, **_QWEN2_05B, **_ONEVISION_VIDEO
        ),
        ModelSpec(
            "llava-onevision-72b", "llava_onevision", vocab_size=152064, frames=32, **_QWEN2_72B, **_ONEVISION_VIDEO
        ),
        ModelSpec("llava-video-7b", "llava_onevision", vocab_size=152064, frames=64, **_QWEN2_7B, **_ONEVISION_VIDEO),
        ModelSpec("llava-video-72b", "llava_onevision", vocab_size=152064, frames=64, **_QWEN2_72B, **_ONEVISION_VIDEO),
        ModelSpec("qwen2-vl-7b", "qwen2_vl", vocab_size=152064, **_QWEN2_7B, **_QWEN2VL_VIDEO),
        ModelSpec("qwen2-vl-2b", "qwen2_vl", vocab_size=151936, **_QWEN2_15B, **_QWEN2VL_VIDEO),
        ModelSpec("qwen2-vl-72b", "qwen2_vl", vocab_size=152064, **_QWEN2_72B, **_QWEN2VL_VIDEO),
    )
}
"""Known checkpoints at the frame counts their papers evaluate (LLM frames; Qwen2-VL counts temporal patches)."""


def _get(config: Any, key: str, default: Any = None) -> Any:
    if isinstance(config, dict):
        return config.get(key, default)
    return getattr(config, key, default)


def _text_config(config: Any) -> Any:
    text = _get(config, "text_config")
    return text if text is not None else config


def spec_from_config(config: Any, *, name: str | None = None, frames: int | None = None) -> ModelSpec:
    """Derive a spec from a transformers config (object or ``config.json`` mapping).

    The video geometry is the architecture's default (OneVision: 14×14 per frame + 1 newline; Qwen2-VL:
    16×16 per temporal patch); pass ``frames`` for the number of frames the LLM sees.
    """
    model_type = _get(config, "model_type")
    if model_type is None:
        raise SpecError("config has no 'model_type': cannot tell which architecture it describes")
    text = _text_config(config)
    try:
        dims = dict(
            num_layers=int(_get(text, "num_hidden_layers")),
            hidden_size=int(_get(text, "hidden_size")),
            intermediate_size=int(_get(text, "intermediate_size")),
            num_attention_heads=int(_get(text, "num_attention_heads")),
            num_key_value_heads=int(_get(text, "num_key_value_heads", _get(text, "num_attention_heads"))),
            vocab_size=int(_get(text, "vocab_size", 0) or 0),
        )
    except (TypeError, ValueError):
        raise SpecError(
            f"config of model_type {model_type!r} lacks the language model's dimensions "
            "(num_hidden_layers, hidden_size, intermediate_size, num_attention_heads)"
        ) from None
    if model_type in ("qwen2_vl", "qwen2_5_vl"):
        video: dict[str, Any] = dict(_QWEN2VL_VIDEO)
    elif model_type in ("llava_onevision", "llava_next_video", "llava"):
        video = dict(_ONEVISION_VIDEO, frames=32)
    else:
        video = dict(frames=32, rows=14, cols=14, newline_layout="none")
    if frames is not None:
        video["frames"] = frames
    return ModelSpec(
        name=name or str(_get(config, "_name_or_path", "") or model_type), model_type=model_type, **dims, **video
    )


def load_spec(name_or_path: str | Path | Any, *, frames: int | None = None) -> ModelSpec:
    """Resolve a catalogue name, a ``config.json`` path, a checkpoint folder, a config or a model object."""
    if isinstance(name_or_path, ModelSpec):
        return name_or_path.with_frames(frames) if frames is not None else name_or_path
    if not isinstance(name_or_path, (str, Path)):
        config = getattr(name_or_path, "config", name_or_path)
        return spec_from_config(config, frames=frames)
    key = str(name_or_path)
    if key in CATALOGUE:
        spec = CATALOGUE[key]
        return spec.with_frames(frames) if frames is not None else spec
    path = Path(key)
    if path.is_dir():
        path = path / "config.json"
    if path.is_file():
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise SpecError(f"{path}: cannot read model config ({error})") from None
        if not isinstance(config, dict):
            raise SpecError(f"{path}: a model config must be a JSON object")
        return spec_from_config(config, name=str(name_or_path), frames=frames)
    known = ", ".join(sorted(CATALOGUE))
    raise SpecError(
        f"unknown model {key!r}: not a catalogue name and no config.json at that path. Known models: {known}"
    )
