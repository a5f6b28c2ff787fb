"""Shared fixtures: tiny random-weight VideoLLMs built from configs of the real transformers classes.

Every tiny model has an 8-layer Qwen2-shaped language model (hidden 64, 4 query heads, 2 KV heads, so
grouped-query attention is exercised) and a 1-layer vision tower. Videos have 8 frames (LLaVA) or 8
temporal patches (Qwen2-VL) of 4×4 tokens, built from three "scenes" plus noise so that the segment
level finds several segments and merges real redundancy.

Models are built once per (architecture, attention implementation) and shared; the ``tiny`` fixture
removes any hieravid handle a test leaves behind.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import types
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch

ARCHITECTURES = (
    "llava_onevision",
    "llava_video_per_row",
    "llava_next_video",
    "qwen2_vl",
    "qwen2_5_vl",
    "qwen3_vl",
    "internvl",
    "qwen3_5",
)
#: Where the tiny models run: CPU in CI; ``HIERAVID_TEST_DEVICE=cuda`` runs the same suite on a GPU.
DEVICE = torch.device(os.environ.get("HIERAVID_TEST_DEVICE", "cpu"))
ATTENTION = ("sdpa", "eager")

VIDEO_TOKEN, IMAGE_TOKEN, VISION_START, VISION_END = 251, 250, 252, 253
#: Qwen3-VL: the tiny tower's blocks whose features the text model adds after decoder layers 0 and 1 (deepstack).
QWEN3_DEEPSTACK_INDEXES = [0, 1]
#: Qwen3-VL: stand-ins for the tokens of ``<t seconds>``, written before each temporal patch's vision start.
QWEN3_TIMESTAMP_TOKENS = 3
PAD_TOKEN, BOS_TOKEN, EOS_TOKEN = 0, 1, 2
#: InternVL's prompt around each frame: ``FrameN: <img>`` + context tokens + ``</img>``, frames joined by a newline
#: (the text ids stand for what its processor writes; the context token is the config's ``image_token_id``).
IMG_START, IMG_END, FRAME_WORD, COLON, NEWLINE_TEXT, DIGIT_ZERO = 248, 249, 201, 212, 213, 202
#: Qwen2.5-VL: ``vision_config.tokens_per_second`` of the released checkpoints, and the processor's
#: ``second_per_grid_ts`` (temporal_patch_size / fps: 2 frames per temporal patch sampled at 2 fps).
QWEN2_5_TOKENS_PER_SECOND, QWEN2_5_SECONDS_PER_GRID = 2, 1.0
TEXT_CONFIG: dict[str, Any] = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=8,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=256,
    max_position_embeddings=4096,
    bos_token_id=BOS_TOKEN,
    eos_token_id=EOS_TOKEN,
    pad_token_id=PAD_TOKEN,
)


def _tiny_vision(model_type: str) -> dict[str, Any]:
    """A one-layer vision tower on 32×32 frames of 4×4 patches (an 8×8 patch grid)."""
    return dict(
        model_type=model_type,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=32,
        patch_size=4,
    )


def _llava_config() -> Any:
    from transformers import LlavaOnevisionConfig

    return LlavaOnevisionConfig(
        text_config=dict(model_type="qwen2", **TEXT_CONFIG),
        vision_config=_tiny_vision("siglip_vision_model"),
        image_token_id=IMAGE_TOKEN,
        video_token_id=VIDEO_TOKEN,
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        tie_word_embeddings=False,
    )


def _llava_next_video_config() -> Any:
    """LLaVA-NeXT-Video as released: a CLIP tower whose CLS token the "default" strategy drops (8×8 patches),
    average-pooled with stride 2 to 4×4 tokens per frame, and a Llama language model."""
    from transformers import LlavaNextVideoConfig

    return LlavaNextVideoConfig(
        text_config=dict(model_type="llama", **TEXT_CONFIG),
        vision_config=_tiny_vision("clip_vision_model"),
        image_token_id=IMAGE_TOKEN,
        video_token_id=VIDEO_TOKEN,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        spatial_pool_mode="average",
        spatial_pool_stride=2,
        tie_word_embeddings=False,
    )


def _qwen_text(model_type: str) -> dict[str, Any]:
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}
    return dict(model_type=model_type, rope_parameters=rope, **TEXT_CONFIG)


def _qwen2_vl_config() -> Any:
    from transformers import Qwen2VLConfig

    vision = dict(
        depth=1,
        embed_dim=32,
        hidden_size=64,
        num_heads=2,
        mlp_ratio=2,
        patch_size=2,
        spatial_merge_size=2,
        temporal_patch_size=2,
        in_channels=3,
    )
    return Qwen2VLConfig(
        text_config=_qwen_text("qwen2_vl_text"),
        vision_config=vision,
        image_token_id=IMAGE_TOKEN,
        video_token_id=VIDEO_TOKEN,
        vision_start_token_id=VISION_START,
        vision_end_token_id=VISION_END,
        tie_word_embeddings=False,
    )


def _qwen2_5_vl_config() -> Any:
    from transformers import Qwen2_5_VLConfig

    vision = dict(
        depth=2,
        hidden_size=32,
        intermediate_size=64,
        num_heads=2,
        out_hidden_size=64,
        patch_size=2,
        spatial_merge_size=2,
        temporal_patch_size=2,
        in_channels=3,
        window_size=8,
        fullatt_block_indexes=[1],
        # The real checkpoints' value (the class default is 4): temporal M-RoPE positions advance by
        # tokens_per_second × second_per_grid_t per temporal patch, not by 1.
        tokens_per_second=QWEN2_5_TOKENS_PER_SECOND,
    )
    return Qwen2_5_VLConfig(
        text_config=_qwen_text("qwen2_5_vl_text"),
        vision_config=vision,
        image_token_id=IMAGE_TOKEN,
        video_token_id=VIDEO_TOKEN,
        vision_start_token_id=VISION_START,
        vision_end_token_id=VISION_END,
        tie_word_embeddings=False,
    )


def _qwen3_vl_config(moe: bool = False) -> Any:
    """Qwen3-VL: per-head q/k norms, interleaved M-RoPE, a two-block tower whose blocks both feed deepstack."""
    from transformers import Qwen3VLConfig, Qwen3VLMoeConfig

    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3], "mrope_interleaved": True}
    text = dict(model_type="qwen3_vl_moe_text" if moe else "qwen3_vl_text", rope_parameters=rope, head_dim=16)
    text.update(TEXT_CONFIG)
    if moe:
        text.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, decoder_sparse_step=1)
    vision = dict(
        model_type="qwen3_vl_moe" if moe else "qwen3_vl_vision",
        depth=2,
        hidden_size=32,
        intermediate_size=64,
        num_heads=2,
        out_hidden_size=64,
        patch_size=2,
        spatial_merge_size=2,
        temporal_patch_size=2,
        in_channels=3,
        num_position_embeddings=16,
        deepstack_visual_indexes=QWEN3_DEEPSTACK_INDEXES,
    )
    if moe:
        vision.pop("model_type")
    config_class = Qwen3VLMoeConfig if moe else Qwen3VLConfig
    return config_class(
        text_config=text,
        vision_config=vision,
        image_token_id=IMAGE_TOKEN,
        video_token_id=VIDEO_TOKEN,
        vision_start_token_id=VISION_START,
        vision_end_token_id=VISION_END,
        tie_word_embeddings=False,
    )


def _internvl_config(text_model_type: str = "qwen3") -> Any:
    """InternVL3.5 (Qwen3 language model, per-head q/k norms) or InternVL3 (``text_model_type="qwen2"``): a one-layer
    InternViT on 32×32 frames of 4×4 patches (8×8 plus CLS), pixel-shuffled by 0.5 to 4×4 tokens per frame."""
    from transformers import InternVLConfig

    text = dict(model_type=text_model_type, **TEXT_CONFIG)
    if text_model_type == "qwen3":
        text["head_dim"] = TEXT_CONFIG["hidden_size"] // TEXT_CONFIG["num_attention_heads"]  # Qwen3's default is 128
    vision = _tiny_vision("internvl_vision")
    return InternVLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=IMAGE_TOKEN,
        image_seq_length=16,
        downsample_ratio=0.5,
        tie_word_embeddings=False,
    )


#: Qwen3.5's decoder: layer 1 is linear attention (Gated DeltaNet), the others full attention, so that every stage
#: layer of the conformance policies (0, 2-7) has attention to score relevance with. Stages before linear-attention
#: layers are tested in tests/adapters/test_qwen3_5.py with another pattern.
QWEN3_5_LAYER_TYPES = ["full_attention", "linear_attention", *["full_attention"] * 6]


def qwen3_5_config(layer_types: list[str] | None = None) -> Any:
    """A tiny Qwen3.5: gated attention with q/k norms and partial (1/4) interleaved M-RoPE, Gated DeltaNet layers
    with more value than key heads, and a one-block vision tower."""
    from transformers import Qwen3_5Config

    text = dict(TEXT_CONFIG)
    text.update(
        model_type="qwen3_5_text",
        head_dim=32,
        layer_types=list(layer_types or QWEN3_5_LAYER_TYPES),
        linear_conv_kernel_dim=4,
        linear_key_head_dim=16,
        linear_value_head_dim=16,
        linear_num_key_heads=2,
        linear_num_value_heads=4,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 10000.0,
            "mrope_section": [2, 1, 1],
            "mrope_interleaved": True,
            "partial_rotary_factor": 0.25,
        },
    )
    vision = dict(
        depth=1,
        hidden_size=32,
        intermediate_size=64,
        num_heads=2,
        out_hidden_size=64,
        patch_size=2,
        spatial_merge_size=2,
        temporal_patch_size=2,
        in_channels=3,
        num_position_embeddings=64,
    )
    return Qwen3_5Config(
        text_config=text,
        vision_config=vision,
        image_token_id=IMAGE_TOKEN,
        video_token_id=VIDEO_TOKEN,
        vision_start_token_id=VISION_START,
        vision_end_token_id=VISION_END,
        tie_word_embeddings=False,
    )


def _per_row_classes() -> tuple[type, type]:
    """A LLaVA-OneVision model that lays video out as original LLaVA-NeXT/LLaVA-Video inference does:
    a newline after every row of every frame (transformers then appends its own trailing newline)."""
    from transformers import LlavaOnevisionForConditionalGeneration, LlavaOnevisionModel

    class PerRowLlavaVideoModel(LlavaOnevisionModel):
        # The upstream signature (its pixel argument's name), so that generate() pre-encodes videos as it
        # does for the upstream model (transformers >= 5.24 looks the argument up by name).
        @functools.wraps(LlavaOnevisionModel.get_video_features)
        def get_video_features(self, *args: Any, **kwargs: Any) -> Any:
            output = super().get_video_features(*args, **kwargs)
            features = output.pooler_output
            side = math.ceil(self.config.vision_config.image_size // self.config.vision_config.patch_size / 2)
            # transformers >= 5.24 appends the video's trailing newline here (earlier versions in forward()).
            batch, frames = features.shape[0], features.shape[1] // (side * side)
            trailing = features[:, frames * side * side :]
            grid = features[:, : frames * side * side].reshape(batch, frames, side, side, -1)
            newline = self.image_newline.to(grid.dtype).view(1, 1, 1, 1, -1).expand(batch, frames, side, 1, -1)
            rows = torch.cat([grid, newline], dim=3).reshape(batch, frames * side * (side + 1), -1)
            output.pooler_output = torch.cat([rows, trailing], dim=1)
            return output

    class PerRowLlavaVideoForConditionalGeneration(LlavaOnevisionForConditionalGeneration):
        def __init__(self, config: Any) -> None:
            super().__init__(config)
            self.model = PerRowLlavaVideoModel(config)
            self.post_init()

    return PerRowLlavaVideoModel, PerRowLlavaVideoForConditionalGeneration


_PER_ROW: tuple[type, type] | None = None


def model_class(architecture: str) -> type:
    global _PER_ROW
    import transformers

    if architecture == "llava_video_per_row":
        if _PER_ROW is None:
            _PER_ROW = _per_row_classes()
        return _PER_ROW[1]
    return {
        "llava_onevision": transformers.LlavaOnevisionForConditionalGeneration,
        "llava_next_video": transformers.LlavaNextVideoForConditionalGeneration,
        "qwen2_vl": transformers.Qwen2VLForConditionalGeneration,
        "qwen2_5_vl": transformers.Qwen2_5_VLForConditionalGeneration,
        "qwen3_vl": transformers.Qwen3VLForConditionalGeneration,
        "qwen3_vl_moe": transformers.Qwen3VLMoeForConditionalGeneration,
        "internvl": transformers.InternVLForConditionalGeneration,
        "internvl_qwen2": transformers.InternVLForConditionalGeneration,
        "qwen3_5": transformers.Qwen3_5ForConditionalGeneration,
    }[architecture]


def model_config(architecture: str) -> Any:
    if architecture in ("llava_onevision", "llava_video_per_row"):
        return _llava_config()
    return {
        "llava_next_video": _llava_next_video_config,
        "qwen2_vl": _qwen2_vl_config,
        "qwen2_5_vl": _qwen2_5_vl_config,
        "qwen3_vl": _qwen3_vl_config,
        "qwen3_vl_moe": lambda: _qwen3_vl_config(moe=True),
        "internvl": _internvl_config,
        "internvl_qwen2": lambda: _internvl_config("qwen2"),
        "qwen3_5": qwen3_5_config,
    }[architecture]()


def build_model(architecture: str, attention: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = model_class(architecture)._from_config(model_config(architecture), attn_implementation=attention)
    return model.to(DEVICE).eval()


@dataclass
class TinyCase:
    """A tiny model and input builders for one architecture and attention implementation."""

    architecture: str
    attention: str
    model: torch.nn.Module
    rows: int = 4
    cols: int = 4
    frames: int = 8
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def device(self) -> torch.device:
        return DEVICE

    @property
    def is_qwen(self) -> bool:
        return self.architecture.startswith("qwen")

    @property
    def is_internvl(self) -> bool:
        """InternVL: each frame is a one-tile image span, with text between frames."""
        return self.architecture.startswith("internvl")

    @property
    def placeholder_token(self) -> int:
        """The id of the video's content tokens in ``input_ids`` (InternVL: the image context token)."""
        return IMAGE_TOKEN if self.is_internvl else VIDEO_TOKEN

    @property
    def newline_layout(self) -> str:
        return {"llava_onevision": "per_video", "llava_video_per_row": "per_row+per_video"}.get(
            self.architecture, "none"
        )

    def video_tokens(self, frames: int | None = None) -> int:
        frames = frames or self.frames
        if self.architecture == "llava_onevision":
            return frames * self.rows * self.cols + 1
        if self.architecture == "llava_video_per_row":
            return frames * self.rows * (self.cols + 1) + 1
        return frames * self.rows * self.cols

    def spec(self, frames: int | None = None, text_tokens: int = 13) -> Any:
        """A ModelSpec with this tiny model's dimensions and video geometry (for compile_plan)."""
        from hieravid.specs import ModelSpec

        layout = {"llava_onevision": "per_video", "llava_video_per_row": "per_row"}.get(self.architecture, "none")
        return ModelSpec(
            name=f"tiny-{self.architecture}",
            model_type=self.model.config.model_type,
            num_layers=8,
            hidden_size=64,
            intermediate_size=128,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=256,
            frames=frames or self.frames,
            rows=self.rows,
            cols=self.cols,
            newline_layout=layout,
            text_tokens=text_tokens,
            default_query_rows=4 if self.is_qwen else 1,
            first_stage_layer=len(QWEN3_DEEPSTACK_INDEXES) if self.architecture.startswith("qwen3_vl") else 0,
            recurrent_layers=tuple(
                index
                for index, kind in enumerate(getattr(self.model.config.get_text_config(), "layer_types", None) or ())
                if kind == "linear_attention"
            ),
        )

    def _pixels(self, generator: torch.Generator, frames: int, scenes: int = 3) -> torch.Tensor:
        """``frames`` frames drawn from ``scenes`` scenes with small noise (LLaVA layout [F, 3, 32, 32]
        or Qwen patches [F, rows*2*cols*2, 3*2*2*2] per temporal patch)."""
        shape = (3, 32, 32) if not self.is_qwen else (self.rows * 2 * self.cols * 2, 3 * 2 * 2 * 2)
        bases = torch.randn(scenes, *shape, generator=generator)
        which = [min(scenes - 1, f * scenes // frames) for f in range(frames)]
        return torch.stack([bases[w] + 0.15 * torch.randn(*shape, generator=generator) for w in which])

    def inputs(
        self,
        batch: int = 1,
        seed: int = 0,
        pads: tuple[int, ...] | None = None,
        frames: tuple[int, ...] | None = None,
        video: bool = True,
        still_images: bool = False,
    ) -> dict[str, torch.Tensor]:
        """Left-padded model inputs: ``pads[b]`` padding tokens before sample ``b``; Qwen and InternVL samples may
        have different temporal lengths (``frames[b]``). InternVL with ``still_images``: a two-tile image before the
        video and a one-tile image right after it (``</img>\\n<img>``), which are not frames."""
        if self.is_internvl:
            return self._internvl_inputs(batch, seed, pads, frames, video, still_images)
        generator = torch.Generator().manual_seed(seed)
        pads = pads or (0,) * batch
        frames = frames or (self.frames,) * batch
        if not self.is_qwen and len(set(frames)) > 1:
            raise ValueError("LLaVA batches share one frame count")
        sequences: list[torch.Tensor] = []
        types: list[torch.Tensor] = []
        pixels: list[torch.Tensor] = []
        for sample in range(batch):
            head = torch.randint(3, 200, (5,), generator=generator)
            tail = torch.randint(3, 200, (6,), generator=generator)
            if not video:
                ids = torch.cat([head, tail])
                kind = torch.zeros_like(ids)
            elif self.architecture == "qwen3_5":
                # As Qwen3VLProcessor writes it: a timestamp (here one text token) and a vision block per frame.
                stamps = torch.randint(3, 200, (frames[sample],), generator=generator)
                block = torch.tensor([VISION_START, *[VIDEO_TOKEN] * (self.rows * self.cols), VISION_END])
                ids = torch.cat([head, *(torch.cat([stamp.view(1), block]) for stamp in stamps), tail])
                kind = (ids == VIDEO_TOKEN).long() * 2
                pixels.append(self._pixels(generator, frames[sample]).reshape(-1, 3 * 2 * 2 * 2))
            elif self.architecture.startswith("qwen3_vl"):  # per temporal patch: <t seconds> <start> tokens <end>
                per_frame = self.rows * self.cols
                pieces = [head]
                for _ in range(frames[sample]):
                    pieces.append(torch.randint(3, 200, (QWEN3_TIMESTAMP_TOKENS,), generator=generator))
                    pieces.append(torch.tensor([VISION_START, *[VIDEO_TOKEN] * per_frame, VISION_END]))
                ids = torch.cat([*pieces, tail])
                kind = (ids == VIDEO_TOKEN).long() * 2
                pixels.append(self._pixels(generator, frames[sample]).reshape(-1, 3 * 2 * 2 * 2))
            elif self.is_qwen:
                count = self.video_tokens(frames[sample])
                ids = torch.cat(
                    [
                        head,
                        torch.tensor([VISION_START]),
                        torch.full((count,), VIDEO_TOKEN),
                        torch.tensor([VISION_END]),
                        tail,
                    ]
                )
                kind = (ids == VIDEO_TOKEN).long() * 2
                pixels.append(self._pixels(generator, frames[sample]).reshape(-1, 3 * 2 * 2 * 2))
            else:
                count = self.video_tokens(frames[sample])
                ids = torch.cat([head, torch.full((count,), VIDEO_TOKEN), tail])
                kind = torch.zeros_like(ids)
                pixels.append(self._pixels(generator, frames[sample]))
            sequences.append(ids)
            types.append(kind)
        length = max(len(s) + p for s, p in zip(sequences, pads))
        input_ids = torch.full((batch, length), PAD_TOKEN, dtype=torch.long)
        attention_mask = torch.zeros(batch, length, dtype=torch.long)
        token_types = torch.zeros(batch, length, dtype=torch.long)
        for sample, (ids, kind) in enumerate(zip(sequences, types)):
            input_ids[sample, length - len(ids) :] = ids
            attention_mask[sample, length - len(ids) :] = 1
            token_types[sample, length - len(ids) :] = kind
        out: dict[str, torch.Tensor] = {"input_ids": input_ids, "attention_mask": attention_mask}
        if self.is_qwen:
            out["mm_token_type_ids"] = token_types
            if video:
                out["pixel_values_videos"] = torch.cat(pixels)
                out["video_grid_thw"] = torch.tensor([[f, self.rows * 2, self.cols * 2] for f in frames])
                if self.architecture == "qwen2_5_vl":  # what Qwen2.5-VL's processor adds
                    out["second_per_grid_ts"] = torch.full((batch,), QWEN2_5_SECONDS_PER_GRID)
        elif video:
            out["pixel_values_videos"] = torch.stack(pixels)
        return {key: value.to(DEVICE) for key, value in out.items()}

    def _internvl_inputs(
        self,
        batch: int,
        seed: int,
        pads: tuple[int, ...] | None,
        frames: tuple[int, ...] | None,
        video: bool,
        still_images: bool,
    ) -> dict[str, torch.Tensor]:
        """InternVLProcessor's layout: ``FrameN: <img>`` + 16 context tokens + ``</img>`` per frame, joined by a
        newline; ``pixel_values`` holds every tile of every sample in prompt order."""
        generator = torch.Generator().manual_seed(seed)
        pads = pads or (0,) * batch
        frames = frames or (self.frames,) * batch
        per_tile = self.rows * self.cols

        def image(tiles: int) -> list[int]:
            return [IMG_START, *[IMAGE_TOKEN] * (per_tile * tiles), IMG_END]

        sequences: list[torch.Tensor] = []
        tiles: list[torch.Tensor] = []
        for sample in range(batch):
            head = torch.randint(3, 200, (5,), generator=generator).tolist()
            tail = torch.randint(3, 200, (6,), generator=generator).tolist()
            ids = list(head)
            if still_images:
                ids += [*image(2), NEWLINE_TEXT]
                tiles.append(torch.randn(2, 3, 32, 32, generator=generator))
            if video:
                for frame in range(frames[sample]):
                    label = [FRAME_WORD, DIGIT_ZERO + (frame + 1) % 10, COLON]
                    ids += ([NEWLINE_TEXT] if frame else []) + label + image(1)
                tiles.append(self._pixels(generator, frames[sample]))
            if still_images:
                ids += [NEWLINE_TEXT, *image(1)]
                tiles.append(torch.randn(1, 3, 32, 32, generator=generator))
            sequences.append(torch.tensor(ids + tail))
        length = max(len(s) + p for s, p in zip(sequences, pads))
        input_ids = torch.full((batch, length), PAD_TOKEN, dtype=torch.long)
        attention_mask = torch.zeros(batch, length, dtype=torch.long)
        for sample, ids in enumerate(sequences):
            input_ids[sample, length - len(ids) :] = ids
            attention_mask[sample, length - len(ids) :] = 1
        out = {"input_ids": input_ids, "attention_mask": attention_mask}
        if tiles:
            out["pixel_values"] = torch.cat(tiles)
        return {key: value.to(DEVICE) for key, value in out.items()}


_MODELS: dict[tuple[str, str], torch.nn.Module] = {}


def tiny_case(architecture: str, attention: str = "sdpa") -> TinyCase:
    key = (architecture, attention)
    if key not in _MODELS:
        _MODELS[key] = build_model(architecture, attention)
    return TinyCase(architecture, attention, _MODELS[key])


def _cleanup(model: torch.nn.Module) -> None:
    from hieravid.runtime import find_handle

    while (handle := find_handle(model)) is not None:
        handle.remove()


@contextlib.contextmanager
def _tiny_session(architecture: str, attention: str) -> Any:
    # Tiny matrices: intra-op threads only add contention (10-40x slower on a loaded 2-core runner).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    if DEVICE.type == "cuda":  # fp32 references: no TF32 shortcuts
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    case = tiny_case(architecture, attention)
    try:
        yield case
    finally:
        _cleanup(case.model)
        torch.set_num_threads(threads)


@pytest.fixture(params=[(a, i) for a in ARCHITECTURES for i in ATTENTION], ids=lambda p: f"{p[0]}-{p[1]}")
def tiny(request: pytest.FixtureRequest) -> Any:
    """Every architecture × attention implementation."""
    with _tiny_session(*request.param) as case:
        yield case


@pytest.fixture(params=ARCHITECTURES)
def tiny_sdpa(request: pytest.FixtureRequest) -> Any:
    """Every architecture with SDPA attention."""
    with _tiny_session(request.param, "sdpa") as case:
        yield case


@pytest.fixture
def tiny_builders() -> Any:
    """The builders above, for tests that need a fresh model or class (``import conftest`` is ambiguous:
    other test folders have their own conftest modules)."""
    return types.SimpleNamespace(build_model=build_model, model_class=model_class, tiny_case=tiny_case, DEVICE=DEVICE)


@pytest.fixture
def tiny_llava() -> Any:
    with _tiny_session("llava_onevision", "sdpa") as case:
        yield case


@pytest.fixture
def realised_counts() -> Any:
    """:func:`hieravid.testing.checks.check_realised_counts`, for tests in any folder."""
    from hieravid.testing.checks import check_realised_counts

    return check_realised_counts
