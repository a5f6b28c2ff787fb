"""The conformance kit (:mod:`hieravid.testing`) from outside: an adapter shipped by another package, found through the
``hieravid.adapters`` entry point, runs the whole kit with a few lines of its own; bad cases and batches are refused
clearly; ``import hieravid`` never loads the kit."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from hieravid.errors import HieravidError
from hieravid.testing import AdapterCase, left_padded_batch
from hieravid.testing.conformance import CALL_VARIANTS, GENERATE_POLICIES, IDENTITY_POLICIES, PRUNING_POLICIES

REPO = Path(__file__).resolve().parents[1]

PACKAGE = '''
"""hv_outside_video: a LLaVA-NeXT-Video variant with its own model type, and its hieravid adapter."""
from transformers import LlavaNextVideoConfig, LlavaNextVideoForConditionalGeneration

from hieravid.adapters.llava_next_video import LlavaNextVideoAdapter


class OutsideVideoConfig(LlavaNextVideoConfig):
    model_type = "outside_video"


class OutsideVideoForConditionalGeneration(LlavaNextVideoForConditionalGeneration):
    config_class = OutsideVideoConfig


class OutsideVideoAdapter(LlavaNextVideoAdapter):
    model_types = ("outside_video",)
'''

ENTRY_POINTS = """
[hieravid.adapters]
outside_video = hv_outside_video:OutsideVideoAdapter
"""

# What the outside package's author writes: a tiny config, one prompt with a video, and the kit.
AUTHOR_TESTS = """
import torch

from hieravid.testing import AdapterCase, AdapterConformance
from hv_outside_video import OutsideVideoConfig, OutsideVideoForConditionalGeneration

VIDEO_TOKEN = 251
TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=8, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=256, pad_token_id=0, bos_token_id=1, eos_token_id=2)
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32,
              patch_size=4)  # 8×8 patches, pooled with stride 2: 4×4 tokens per frame


def one_prompt(*, seed, frames):
    generator = torch.Generator().manual_seed(seed)
    scenes = torch.randn(3, 3, 32, 32, generator=generator)
    pixels = torch.stack([scenes[f * 3 // frames] + 0.15 * torch.randn(3, 32, 32, generator=generator)
                          for f in range(frames)])
    text = torch.randint(3, 200, (11,), generator=generator)
    ids = torch.cat([text[:5], torch.full((frames * 16,), VIDEO_TOKEN), text[5:]])
    return {"input_ids": ids[None], "pixel_values_videos": pixels[None]}


class TestOutsideVideoAdapter(AdapterConformance):
    case = AdapterCase(
        name="outside_video",
        model_class=OutsideVideoForConditionalGeneration,
        config=OutsideVideoConfig(text_config=dict(model_type="llama", **TEXT),
                                  vision_config=dict(model_type="clip_vision_model", **VISION),
                                  video_token_id=VIDEO_TOKEN, image_token_id=250, tie_word_embeddings=False),
        sample=one_prompt,
        attention=("sdpa",),
    )
"""


def test_an_entry_point_adapter_runs_the_whole_kit_in_a_few_lines(tmp_path: Path) -> None:
    (tmp_path / "hv_outside_video.py").write_text(textwrap.dedent(PACKAGE))
    info = tmp_path / "hv_outside_video-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: hv-outside-video\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(ENTRY_POINTS)
    (tmp_path / "test_outside_video.py").write_text(AUTHOR_TESTS)
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-W", "error::pytest.PytestWarning"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        # The checkout after the outside package, so that a worktree's hieravid (with its kit) is the one tested.
        env={"PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO)]), "PATH": "/usr/bin:/bin"},
        timeout=600,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    # Everything the kit defines, once for one attention implementation: identity policies, each pruning policy
    # at batch 1 and 2, each call variant at batch 1 and 2, generate, cache lengths, save/load, batch vs alone.
    expected = (
        len(IDENTITY_POLICIES)
        + 2 * len(PRUNING_POLICIES)
        + 2 * len(CALL_VARIANTS)
        + len(GENERATE_POLICIES)
        + len(PRUNING_POLICIES)
        + 2
    )
    summary = re.search(r"(\d+) passed", output)
    assert summary and int(summary.group(1)) == expected, output[-2000:]
    assert not re.search(r"\d+ (failed|skipped|error|xfailed|warnings?)\b", output), output[-2000:]


def _prompt(length: int, **extra: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"input_ids": torch.arange(3, 3 + length)[None], **extra}


def test_left_padded_batch_pads_token_inputs_and_concatenates_the_rest() -> None:
    first = _prompt(3, mm_token_type_ids=torch.tensor([[0, 2, 0]]), pixels=torch.ones(2, 5))
    second = _prompt(5, mm_token_type_ids=torch.tensor([[0, 2, 2, 2, 0]]), pixels=torch.zeros(3, 5))
    batch = left_padded_batch([first, second], pads=(1, 0), pad_token_id=9)
    assert batch["input_ids"].tolist() == [[9, 9, 3, 4, 5], [3, 4, 5, 6, 7]]
    assert batch["attention_mask"].tolist() == [[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]]
    assert batch["mm_token_type_ids"].tolist() == [[0, 0, 0, 2, 0], [0, 2, 2, 2, 0]]
    assert batch["pixels"].shape == (5, 5) and batch["pixels"][:2].eq(1).all()
    # pads add to the longest sample's length too
    assert left_padded_batch([first, second], pads=(0, 2))["input_ids"].shape == (2, 7)


@pytest.mark.parametrize(
    ("samples", "options", "message"),
    [
        ([], {}, "at least one sample"),
        ([_prompt(3), _prompt(4, pixels=torch.ones(1))], {}, "sample 1 has inputs"),
        ([{"input_ids": torch.arange(3)}], {}, r"input_ids must be a \[1, length\] tensor, got \(3,\)"),
        ([_prompt(3, mm_token_type_ids=torch.zeros(1, 2))], {}, r"mm_token_type_ids must be \[1, 3\]"),
        ([_prompt(3, pixels=torch.ones(1, 2)), _prompt(3, pixels=torch.ones(1, 3))], {}, "pixels cannot be concat"),
        ([_prompt(3)], {"pads": (1, 2)}, "one non-negative integer per sample"),
    ],
    ids=["empty", "keys", "ids-shape", "token-input-shape", "concat", "pads"],
)
def test_left_padded_batch_refuses_bad_samples_by_name(samples, options, message) -> None:
    with pytest.raises(HieravidError, match=message):
        left_padded_batch(samples, **options)


def test_a_bad_case_is_refused_by_name() -> None:
    from transformers import LlavaNextVideoConfig, LlavaNextVideoForConditionalGeneration

    def sample(*, seed: int, frames: int) -> dict[str, torch.Tensor]:
        return _prompt(3)

    good = dict(model_class=LlavaNextVideoForConditionalGeneration, config=LlavaNextVideoConfig(), sample=sample)
    with pytest.raises(HieravidError, match="model_class must be a transformers model class"):
        AdapterCase("bad", **{**good, "model_class": dict})
    with pytest.raises(HieravidError, match="config must be a transformers config object"):
        AdapterCase("bad", **{**good, "config": {"model_type": "x"}})
    with pytest.raises(HieravidError, match="frame counts must be positive integers"):
        AdapterCase("bad", **good, frames=0)
    with pytest.raises(HieravidError, match="two-sample batch"):
        AdapterCase("bad", **good, batch_frames=(8, 6, 4))
    with pytest.raises(HieravidError, match="at least one attention implementation"):
        AdapterCase("bad", **good, attention=())
    shallow = LlavaNextVideoConfig(
        text_config=dict(
            model_type="llama",
            num_hidden_layers=2,
            hidden_size=32,
            intermediate_size=32,
            num_attention_heads=2,
            vocab_size=300,
        )
    )
    with pytest.raises(HieravidError, match="2 decoder layers; the kit's policies need at least 8"):
        AdapterCase("shallow", **{**good, "config": shallow})


def test_import_hieravid_loads_neither_the_kit_nor_pytest() -> None:
    code = (
        "import sys, hieravid, hieravid.runtime\n"
        "bad = [m for m in sys.modules if m.startswith(('hieravid.testing', 'pytest', '_pytest'))]\n"
        "assert not bad, bad\n"
        "import hieravid.testing.reference\n"
        "assert not [m for m in sys.modules if m.startswith(('pytest', '_pytest'))]\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)
