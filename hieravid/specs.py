"""Model specs: the shapes the planner needs, without weights.

A :class:`ModelSpec` holds the language model's dimensions and the video layout entering it
(frames × rows × cols plus newline tokens). Specs come from a built-in catalogue of known
checkpoints, from a local ``config.json`` / checkpoint folder, or from a transformers config or
model object (read by attribute, so no transformers model code is imported here). The video layout is
always the architecture adapter's (:meth:`hieravid.adapters.base.Adapter.video_geometry`): nothing here
knows an architecture.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from hieravid.errors import SpecError

NewlineLayout = Literal["none", "per_row", "per_frame", "per_video"]

#: Upper bounds of a spec's fields. Far above any VideoLLM (the largest have 80-128 layers and under 100k video
#: tokens), they turn a typo or a hostile config (``num_hidden_layers: 1000000000``) into an error instead of a
#: planner that loops over a billion layers.
SPEC_LIMITS = {
    "num_layers": 1024,
    "hidden_size": 1 << 20,
    "intermediate_size": 1 << 22,
    "num_attention_heads": 1 << 16,
    "num_key_value_heads": 1 << 16,
    "vocab_size": 1 << 26,
    "frames": 1 << 20,
    "rows": 1 << 16,
    "cols": 1 << 16,
    "text_tokens": 1 << 24,
    "default_query_rows": 1 << 16,
}
#: Most video tokens (frames × rows × cols) a spec may describe.
MAX_VIDEO_TOKENS = 1 << 26


def _shown(value: Any) -> str:
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 64:
        return f"an integer of {len(str(value)) if value.bit_length() < 14000 else 'over 4300'} digits"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


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
    first_stage_layer: int = 0
    """Earliest decoder layer a frame-level stage may prune at (Qwen3-VL: after its deepstack injections)."""
    recurrent_layers: tuple[int, ...] = ()
    """Decoder layers that mix tokens by a recurrence (Qwen3.5's linear attention): no stage scores relevance there."""

    def __post_init__(self) -> None:
        for field, limit in SPEC_LIMITS.items():
            value = getattr(self, field)
            minimum = 0 if field == "vocab_size" else 1
            if not isinstance(value, int) or isinstance(value, bool) or not minimum <= value <= limit:
                what = "a positive integer" if minimum else "a non-negative integer"
                extra = " (the question)" if field == "text_tokens" else ""
                raise SpecError(
                    f"model spec {self.name!r}: {field} must be {what} up to {limit}{extra}, got {_shown(value)}"
                )
        layer = self.first_stage_layer
        if not isinstance(layer, int) or isinstance(layer, bool) or not 0 <= layer < self.num_layers:
            raise SpecError(
                f"model spec {self.name!r}: first_stage_layer must be an integer in 0..{self.num_layers - 1} (a "
                f"decoder layer), got {_shown(layer)}"
            )
        recurrent = self.recurrent_layers
        if not isinstance(recurrent, tuple) or not all(
            isinstance(index, int) and not isinstance(index, bool) and 0 <= index < self.num_layers
            for index in recurrent
        ):
            raise SpecError(
                f"model spec {self.name!r}: recurrent_layers must be a tuple of decoder layers in "
                f"0..{self.num_layers - 1}, got {_shown(recurrent)}"
            )
        if self.frame_tokens > MAX_VIDEO_TOKENS:
            raise SpecError(
                f"model spec {self.name!r}: {self.frames} frames × {self.rows}×{self.cols} tokens exceed "
                f"{MAX_VIDEO_TOKENS} video tokens"
            )

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
        if not isinstance(frames, int) or isinstance(frames, bool) or frames < 1:
            raise SpecError(f"frames must be a positive integer, got {_shown(frames)}")
        return dataclasses.replace(self, frames=frames)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["video_tokens"] = self.video_tokens
        return data


_QWEN2_7B = dict(
    num_hidden_layers=28, hidden_size=3584, intermediate_size=18944, num_attention_heads=28, num_key_value_heads=4
)
_QWEN2_72B = dict(
    num_hidden_layers=80, hidden_size=8192, intermediate_size=29568, num_attention_heads=64, num_key_value_heads=8
)
_QWEN2_05B = dict(
    num_hidden_layers=24, hidden_size=896, intermediate_size=4864, num_attention_heads=14, num_key_value_heads=2
)
_QWEN2_15B = dict(
    num_hidden_layers=28, hidden_size=1536, intermediate_size=8960, num_attention_heads=12, num_key_value_heads=2
)
_VICUNA_7B = dict(
    num_hidden_layers=32, hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32
)
# Qwen3-8B's shape, the language model of Qwen3-VL-8B-Instruct and InternVL3.5-8B (head_dim 128 = 4096 / 32).
_QWEN3_8B = dict(
    num_hidden_layers=36, hidden_size=4096, intermediate_size=12288, num_attention_heads=32, num_key_value_heads=8
)
# SigLIP-so400m at 384 px, 14 px patches (27×27, pooled to 14×14 by the OneVision adapter's geometry).
_SIGLIP = {"image_size": 384, "patch_size": 14}
# CLIP ViT-L/14 at 336 px (24×24 patches, average-pooled with stride 2 to 12×12 by LLaVA-NeXT-Video).
_CLIP_L336 = {"image_size": 336, "patch_size": 14}
# Qwen2-VL's vision tower: 14 px patches, 2×2 merge, temporal patches of 2 frames.
_QWEN2VL_VISION = {"patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2}
# Qwen3-VL's vision tower: 16 px patches, 2×2 merge, temporal patches of 2 frames, and the blocks whose features
# the text model adds after decoder layers 0, 1 and 2 (deepstack; frame-level stages must come after them).
_QWEN3VL_VISION = {
    "patch_size": 16,
    "spatial_merge_size": 2,
    "temporal_patch_size": 2,
    "deepstack_visual_indexes": [8, 16, 24],
}
# InternVL3.5-8B (OpenGVLab/InternVL3_5-8B-HF): Qwen3-8B text (head dim 128, `_QWEN3_8B`) and InternViT-300M at
# 448 px, 14 px patches (32×32), pixel-shuffled by downsample_ratio 0.5 to 16×16 = 256 tokens per frame. The
# vocabulary (Qwen3's 151,936) and the image token id are as read from the HF conversion's config; the planner uses
# neither.
_INTERNVIT_300M = {
    "model_type": "internvl_vision",
    "hidden_size": 1024,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "intermediate_size": 4096,
    "image_size": [448, 448],
    "patch_size": [14, 14],
}


def _config(model_type: str, text: dict[str, int], vocab: int, vision: dict[str, int]) -> dict[str, Any]:
    return {
        "model_type": model_type,
        "video_token_id": 151656,
        "text_config": {**text, "vocab_size": vocab},
        "vision_config": vision,
    }


#: Known checkpoints as the parts of their ``config.json`` the planner reads, with the frames their papers
#: sample. Their video geometry comes from the architecture's adapter, as for any other config.
CATALOGUE_CONFIGS: dict[str, tuple[dict[str, Any], int]] = {
    "llava-onevision-7b": (_config("llava_onevision", _QWEN2_7B, 152000, _SIGLIP), 32),
    "llava-onevision-0.5b": (_config("llava_onevision", _QWEN2_05B, 151936, _SIGLIP), 32),
    "llava-onevision-72b": (_config("llava_onevision", _QWEN2_72B, 152064, _SIGLIP), 32),
    "llava-video-7b": (_config("llava_onevision", _QWEN2_7B, 152064, _SIGLIP), 64),
    "llava-video-72b": (_config("llava_onevision", _QWEN2_72B, 152064, _SIGLIP), 64),
    "llava-next-video-7b": (
        {
            **_config("llava_next_video", _VICUNA_7B, 32064, _CLIP_L336),
            "video_token_id": 32000,
            "spatial_pool_stride": 2,
        },
        32,
    ),
    "qwen2-vl-7b": (_config("qwen2_vl", _QWEN2_7B, 152064, _QWEN2VL_VISION), 32),
    "qwen2-vl-2b": (_config("qwen2_vl", _QWEN2_15B, 151936, _QWEN2VL_VISION), 32),
    "qwen2-vl-72b": (_config("qwen2_vl", _QWEN2_72B, 152064, _QWEN2VL_VISION), 32),
    "qwen3-vl-8b": (_config("qwen3_vl", _QWEN3_8B, 151936, _QWEN3VL_VISION), 32),
    "internvl3.5-8b": (
        {
            "model_type": "internvl",
            "image_token_id": 151671,
            "image_seq_length": 256,
            "downsample_ratio": 0.5,
            "text_config": {"model_type": "qwen3", **_QWEN3_8B, "head_dim": 128, "vocab_size": 151936},
            "vision_config": _INTERNVIT_300M,
        },
        32,
    ),
}


def catalogue_spec(name: str) -> ModelSpec:
    """The spec of a catalogue model (see :data:`CATALOGUE_CONFIGS`)."""
    config, sampled = CATALOGUE_CONFIGS[name]
    return spec_from_config(config, name=name, sampled_frames=sampled)


def _get(config: Any, key: str, default: Any = None) -> Any:
    if isinstance(config, dict):
        return config.get(key, default)
    return getattr(config, key, default)


def _text_config(config: Any) -> Any:
    text = _get(config, "text_config")
    return text if text is not None else config


def _dimension(text: Any, key: str, model_type: str, default: Any = None) -> int:
    value = _get(text, key, default)
    # bool is an int in Python, and 28.5 would silently become 28: a dimension is written as an integer.
    if type(value) is not int or value < 1:
        raise SpecError(
            f"config of model_type {model_type!r}: the language model's {key} must be a positive integer, got "
            f"{_shown(value)}"
        )
    return value


def spec_from_config(
    config: Any,
    *,
    name: str | None = None,
    frames: int | None = None,
    sampled_frames: int | None = None,
    processor_config: dict[str, Any] | None = None,
) -> ModelSpec:
    """Derive a spec from a transformers config (object or ``config.json`` mapping) through its adapter.

    The language model's dimensions come from the config; the video geometry from the architecture's adapter
    (:meth:`hieravid.adapters.base.Adapter.video_geometry`), for ``sampled_frames`` frames sampled from the video
    (default: the adapter's) or exactly ``frames`` frames as the LLM sees them.

    Raises:
        SpecError: no ``model_type``, no adapter for it (the message lists the supported ones), not a video model,
            or missing/invalid language-model dimensions.
    """
    from hieravid.adapters.registry import get_adapter
    from hieravid.errors import AdapterError

    model_type = _get(config, "model_type")
    if not isinstance(model_type, str) or not model_type:
        raise SpecError("config has no 'model_type': cannot tell which architecture it describes")
    try:
        adapter = get_adapter(model_type)
    except AdapterError as error:
        raise SpecError(str(error)) from None
    text = _text_config(config)
    heads = _dimension(text, "num_attention_heads", model_type)
    dims = dict(
        num_layers=_dimension(text, "num_hidden_layers", model_type),
        hidden_size=_dimension(text, "hidden_size", model_type),
        intermediate_size=_dimension(text, "intermediate_size", model_type),
        num_attention_heads=heads,
        num_key_value_heads=_dimension(text, "num_key_value_heads", model_type, heads),
        vocab_size=int(_get(text, "vocab_size", 0) or 0),
    )
    geometry = adapter.video_geometry(config, sampled_frames=sampled_frames, processor_config=processor_config)
    return ModelSpec(
        name=name or str(_get(config, "_name_or_path", "") or model_type),
        model_type=model_type,
        **dims,
        frames=geometry.frames if frames is None else frames,
        rows=geometry.rows,
        cols=geometry.cols,
        newline_layout=geometry.newline_layout,  # type: ignore[arg-type]
        default_query_rows=geometry.query_rows,
        first_stage_layer=geometry.first_stage_layer,
        recurrent_layers=tuple(geometry.recurrent_layers),
    )


#: Largest ``config.json`` read (real ones are a few kB).
MAX_CONFIG_BYTES = 1 << 24
#: Keys whose value transformers expands into one entry per layer when it builds a config.
_LAYER_COUNT_KEYS = frozenset({"num_hidden_layers", "num_layers", "n_layer", "depth"})
#: Integers in a config beyond this are not model settings (token ids, sizes and lengths are far smaller).
_MAX_CONFIG_INTEGER = 1 << 40


def _read_json(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as handle:
            raw = handle.read(MAX_CONFIG_BYTES + 1)
        if len(raw) > MAX_CONFIG_BYTES:
            raise SpecError(f"{path}: larger than {MAX_CONFIG_BYTES} bytes: not a model config")
        data = json.loads(raw.decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as error:  # ValueError: JSON, huge integers
        detail = " ".join(str(error).split())[:200]
        raise SpecError(f"{path}: cannot read model config ({type(error).__name__}: {detail})") from None
    if not isinstance(data, dict):
        raise SpecError(f"{path}: a model config must be a JSON object")
    _check_config_numbers(data, path)
    return data


def _check_config_numbers(data: Any, path: Path, where: str = "", depth: int = 0) -> None:
    """Refuse integers no model has before transformers sees them: it builds per-layer lists from layer counts, so
    ``num_hidden_layers: 1000000000`` would hang it."""
    if depth > 16:
        raise SpecError(f"{path}: nested more than 16 levels deep: not a model config")
    items = data.items() if isinstance(data, dict) else enumerate(data) if isinstance(data, list) else ()
    for key, value in items:
        name = f"{where}.{key}" if where and isinstance(key, str) else f"{where}[{key}]" if where else str(key)
        if isinstance(value, (dict, list)):
            _check_config_numbers(value, path, name, depth + 1)
        elif isinstance(value, int) and not isinstance(value, bool):
            limit = SPEC_LIMITS["num_layers"] if key in _LAYER_COUNT_KEYS else _MAX_CONFIG_INTEGER
            if abs(value) > limit:
                raise SpecError(f"{path}: {name} is {_shown(value)}, beyond any model (at most {limit})")


def _with_defaults(config: dict[str, Any], path: Path) -> Any:
    """The config object transformers builds from a ``config.json`` mapping (``save_pretrained`` leaves out values
    equal to the class defaults, e.g. the video token id), or the mapping itself when transformers does not know
    the model type. Builds configuration classes only, no model code.

    Raises:
        SpecError: transformers refuses a value (its message names the field).
    """
    from transformers import AutoConfig

    try:
        return AutoConfig.for_model(**config)
    except ValueError as error:
        if "Unrecognized model" in str(error) or "model_type" not in config:
            return config  # not a transformers architecture: read the mapping as written
        raise SpecError(f"{path}: invalid model config: {str(error).splitlines()[0]}") from None
    except Exception as error:  # transformers' strict config validation
        detail = " ".join(str(error).split())
        raise SpecError(f"{path}: invalid model config: {detail}") from None


def _processor_config(folder: Path) -> dict[str, Any] | None:
    """A checkpoint folder's video preprocessor settings, if it has them."""
    for file_name in ("video_preprocessor_config.json", "preprocessor_config.json"):
        path = folder / file_name
        if path.is_file():
            return _read_json(path)
    return None


def load_spec(name_or_path: str | Path | Any, *, frames: int | None = None) -> ModelSpec:
    """Resolve a catalogue name, a ``config.json`` path, a checkpoint folder, a config or a model object.

    ``frames`` overrides the frames the LLM sees (default: the catalogue's, else the adapter's default sampling).
    """
    if isinstance(name_or_path, ModelSpec):
        return name_or_path.with_frames(frames) if frames is not None else name_or_path
    if not isinstance(name_or_path, (str, Path)):
        config = getattr(name_or_path, "config", name_or_path)
        return spec_from_config(config, frames=frames)
    key = str(name_or_path)
    if key in CATALOGUE_CONFIGS:
        spec = catalogue_spec(key)
        return spec.with_frames(frames) if frames is not None else spec
    path = Path(key)
    folder = path if path.is_dir() else path.parent
    if path.is_dir():
        path = path / "config.json"
    if path.is_file():
        config = _with_defaults(_read_json(path), path)
        return spec_from_config(
            config, name=str(name_or_path), frames=frames, processor_config=_processor_config(folder)
        )
    known = ", ".join(sorted(CATALOGUE_CONFIGS))
    raise SpecError(
        f"unknown model {key!r}: not a catalogue name and no config.json at that path. Known models: {known}"
    )


class _Catalogue(Mapping[str, ModelSpec]):
    """Catalogue specs by name, derived on access (read-only)."""

    def __getitem__(self, name: str) -> ModelSpec:
        if name not in CATALOGUE_CONFIGS:
            raise KeyError(name)
        return catalogue_spec(name)

    def __iter__(self) -> Iterator[str]:
        return iter(CATALOGUE_CONFIGS)

    def __len__(self) -> int:
        return len(CATALOGUE_CONFIGS)


#: Known checkpoints at the frame counts their papers evaluate, by name.
CATALOGUE: Mapping[str, ModelSpec] = _Catalogue()
