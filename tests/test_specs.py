"""Model specs: catalogue shapes and derivation from configs on disk or in memory."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hieravid import CATALOGUE, SpecError, load_spec
from hieravid.specs import spec_from_config


def test_catalogue_shapes() -> None:
    onevision = CATALOGUE["llava-onevision-7b"]
    assert (onevision.num_layers, onevision.hidden_size, onevision.num_key_value_heads) == (28, 3584, 4)
    assert onevision.video_tokens == 6273 and onevision.newline_tokens == 1
    assert CATALOGUE["llava-video-7b"].frames == 64
    assert CATALOGUE["llava-video-7b"].video_tokens == 64 * 196 + 1
    qwen = CATALOGUE["qwen2-vl-7b"]
    assert qwen.default_query_rows == 4 and qwen.newline_tokens == 0
    assert CATALOGUE["llava-onevision-72b"].num_layers == 80
    assert CATALOGUE["qwen2-vl-2b"].hidden_size == 1536
    next_video = CATALOGUE["llava-next-video-7b"]  # CLIP-L/336: 24×24 patches pooled with stride 2, no newlines
    assert (next_video.num_layers, next_video.num_key_value_heads, next_video.rows, next_video.cols) == (32, 32, 12, 12)
    assert next_video.video_tokens == 32 * 144 and next_video.newline_tokens == 0


def test_qwen3_vl_8b_catalogue_equals_the_spec_of_a_real_config() -> None:
    """Qwen3-VL-8B-Instruct's published config.json (the values the planner reads, plus the rest of its shape)."""
    from transformers import Qwen3VLConfig

    rope = {"rope_type": "default", "rope_theta": 5000000, "mrope_section": [24, 20, 20], "mrope_interleaved": True}
    text = dict(
        hidden_size=4096,
        intermediate_size=12288,
        num_hidden_layers=36,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        vocab_size=151936,
        max_position_embeddings=262144,
        rope_parameters=rope,
    )
    vision = dict(
        depth=27,
        hidden_size=1152,
        intermediate_size=4304,
        num_heads=16,
        out_hidden_size=4096,
        patch_size=16,
        spatial_merge_size=2,
        temporal_patch_size=2,
        num_position_embeddings=2304,
        deepstack_visual_indexes=[8, 16, 24],
    )
    config = Qwen3VLConfig(text_config=text, vision_config=vision, video_token_id=151656, tie_word_embeddings=False)
    spec = CATALOGUE["qwen3-vl-8b"]
    assert spec_from_config(config, name="qwen3-vl-8b", sampled_frames=32) == spec
    # 32 frames → 16 temporal patches of 448/32 = 14×14 tokens; stages only after the 3 deepstack layers.
    assert (spec.frames, spec.rows, spec.cols, spec.video_tokens) == (16, 14, 14, 16 * 196)
    assert (spec.num_layers, spec.first_stage_layer, spec.default_query_rows) == (36, 3, 4)


def test_internvl_catalogue_spec_is_the_spec_of_a_real_config() -> None:
    """InternVL3.5-8B: Qwen3-8B text, InternViT-300M at 448 px pixel-shuffled to 16×16 tokens per one-tile frame."""
    from transformers import InternVLConfig

    from hieravid.specs import CATALOGUE_CONFIGS

    catalogue = CATALOGUE["internvl3.5-8b"]
    mapping, sampled = CATALOGUE_CONFIGS["internvl3.5-8b"]
    config = InternVLConfig(**{key: value for key, value in mapping.items() if key != "model_type"})
    assert config.text_config.model_type == "qwen3" and config.vision_config.image_size == [448, 448]
    assert spec_from_config(config, name="internvl3.5-8b", sampled_frames=sampled) == catalogue
    assert (catalogue.num_layers, catalogue.hidden_size, catalogue.num_key_value_heads) == (36, 4096, 8)
    assert (catalogue.rows, catalogue.cols, catalogue.newline_tokens) == (16, 16, 0)
    assert catalogue.video_tokens == 32 * 256


def test_with_frames_and_newline_layouts() -> None:
    spec = CATALOGUE["llava-onevision-7b"].with_frames(8)
    assert spec.video_tokens == 8 * 196 + 1
    import dataclasses

    per_row = dataclasses.replace(spec, rows=13, cols=13, newline_layout="per_row")
    assert per_row.video_tokens == 8 * 13 * 14
    with pytest.raises(SpecError, match="frames"):
        spec.with_frames(0)


def _onevision_config() -> dict:
    return {
        "model_type": "llava_onevision",
        "text_config": {
            "model_type": "qwen2",
            "num_hidden_layers": 4,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "vocab_size": 1000,
        },
        "vision_config": {"model_type": "siglip_vision_model", "image_size": 64, "patch_size": 8},
        "video_token_id": 151647,
    }


def test_spec_from_config_file_and_folder(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(_onevision_config()))
    from_folder = load_spec(tmp_path, frames=8)
    from_file = load_spec(str(tmp_path / "config.json"), frames=8)
    assert from_folder.num_layers == from_file.num_layers == 4
    assert from_folder.hidden_size == 64 and from_folder.frames == 8
    assert from_folder.newline_layout == "per_video"
    assert (from_folder.rows, from_folder.cols) == (4, 4)  # the adapter's pooled grid: ⌈64 / 8 / 2⌉


def test_spec_from_transformers_config_object() -> None:
    from transformers import Qwen2VLConfig

    config = Qwen2VLConfig(
        text_config={
            "num_hidden_layers": 3,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
        }
    )
    spec = load_spec(config)
    assert spec.model_type == "qwen2_vl"
    assert spec.num_layers == 3 and spec.hidden_size == 32
    assert spec.default_query_rows == 4


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        ("{not json", "cannot read model config"),
        ("[1, 2]", "JSON object"),
        ('{"hidden_size": 3}', "model_type"),
        ('{"model_type": "qwen2"}', "no hieravid adapter for model_type 'qwen2'"),
        ('{"model_type": "llava_onevision", "text_config": {"num_hidden_layers": 28.5}}', "num_hidden_layers"),
    ],
)
def test_bad_configs(tmp_path: Path, content: str, fragment: str) -> None:
    path = tmp_path / "config.json"
    path.write_text(content)
    with pytest.raises(SpecError, match=fragment):
        load_spec(path)


def test_unknown_name_lists_catalogue() -> None:
    with pytest.raises(SpecError, match="llava-onevision-7b"):
        load_spec("gpt-video-9000")
    with pytest.raises(SpecError, match="positive integer"):
        spec_from_config(
            {**_onevision_config(), "text_config": {**_onevision_config()["text_config"], "hidden_size": 0}}
        )
