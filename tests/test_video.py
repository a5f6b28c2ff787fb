"""Video input: uniform sampling, the synthetic video, PyAV round trips, errors, model preprocessing."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from media import video_stream_without_frames

from hieravid.apps.video import (
    SCENES,
    VideoError,
    preprocess_video,
    probe_video,
    read_video,
    resize_frames,
    sample_indices,
    synthetic_video,
    write_video,
)
from hieravid.errors import HieravidError

av = pytest.importorskip("av", reason="the video extra (PyAV) is required for these tests")


def test_sample_indices_are_uniform_sorted_and_unique() -> None:
    assert sample_indices(100, 4) == [12, 37, 62, 87]
    assert sample_indices(5, 8) == [0, 1, 2, 3, 4]
    assert sample_indices(0, 8) == []
    indices = sample_indices(1000, 32)
    assert indices == sorted(set(indices)) and len(indices) == 32
    gaps = np.diff(indices)
    assert gaps.max() - gaps.min() <= 1
    with pytest.raises(VideoError, match="positive"):
        sample_indices(10, 0)


def test_synthetic_video_is_deterministic_with_known_cuts() -> None:
    video = synthetic_video((3, 5, 2), size=32, seed=4)
    again = synthetic_video((3, 5, 2), size=32, seed=4)
    assert video.frames.shape == (10, 32, 32, 3) and video.frames.dtype == np.uint8
    assert np.array_equal(video.frames, again.frames)
    assert video.cuts == (3, 8)
    assert video.scene_ids == [0, 0, 0, 1, 1, 1, 1, 1, 2, 2]
    assert video.scene_names == SCENES[:3]
    # Small motion inside a scene, a large change at each cut.
    diffs = np.abs(np.diff(video.frames.astype(np.int16), axis=0)).mean(axis=(1, 2, 3))
    cut_diffs = [diffs[cut - 1] for cut in video.cuts]
    within = [d for index, d in enumerate(diffs) if index + 1 not in video.cuts]
    assert min(cut_diffs) > 3 * max(within)


@pytest.mark.parametrize("lengths", [(), (3, 0)])
def test_synthetic_video_rejects_bad_lengths(lengths: tuple[int, ...]) -> None:
    with pytest.raises(VideoError):
        synthetic_video(lengths)


def test_write_then_read_round_trip(tmp_path: Path) -> None:
    video = synthetic_video((4, 4), size=64)
    path = write_video(tmp_path / "clip.mp4", video.frames, fps=10)
    info = probe_video(path)
    assert (info.frames, info.width, info.height) == (8, 64, 64)
    assert info.fps == pytest.approx(10.0)
    frames, info, indices = read_video(path, 4)
    assert indices == [1, 3, 5, 7]
    assert frames.shape == (4, 64, 64, 3)
    # Lossy codec: close to the source frames, and the scene change is visible.
    error = np.abs(frames.astype(np.int16) - video.frames[indices].astype(np.int16)).mean()
    assert error < 12
    more, _, all_indices = read_video(path, 50)
    assert all_indices == list(range(8)) and more.shape[0] == 8


def test_read_video_reports_progress(tmp_path: Path) -> None:
    path = write_video(tmp_path / "clip.mp4", synthetic_video((6,), size=32).frames)
    events: list[int] = []

    class Bar:
        def __init__(self, **options: object) -> None:
            events.append(-1)

        def update(self, n: int) -> None:
            events.append(n)

        def close(self) -> None:
            events.append(-2)

    read_video(path, 3, progress=Bar)
    assert events[0] == -1 and events[-1] == -2 and sum(e for e in events if e > 0) >= 5


def test_errors_missing_directory_corrupt_and_empty(tmp_path: Path) -> None:
    with pytest.raises(VideoError, match="not found"):
        read_video(tmp_path / "missing.mp4", 8)
    with pytest.raises(VideoError, match="directory"):
        read_video(tmp_path, 8)
    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(b"\x00\x01garbage" * 500)
    with pytest.raises(VideoError, match="cannot read this file as a video"):
        read_video(corrupt, 8)
    with pytest.raises(VideoError, match="holds no frames"):
        read_video(video_stream_without_frames(tmp_path / "empty.mkv"), 8)
    with pytest.raises(VideoError, match="no video stream"):
        read_video(video_stream_without_frames(tmp_path / "audio.mp4"), 8)
    assert issubclass(VideoError, HieravidError)


def test_truncated_file_keeps_the_decodable_frames(tmp_path: Path) -> None:
    path = write_video(tmp_path / "clip.mp4", synthetic_video((20, 20), size=64).frames, codec="mpeg4")
    data = path.read_bytes()
    truncated = tmp_path / "truncated.mp4"
    truncated.write_bytes(data[: len(data) * 2 // 3])
    try:
        frames, _, _ = read_video(truncated, 8)
    except VideoError as error:  # a cut mp4 may lose its index entirely: then a clear error is the contract
        assert "video" in str(error)
    else:
        assert 1 <= frames.shape[0] <= 8


def test_resize_frames() -> None:
    frames = synthetic_video((2,), size=64).frames
    small = resize_frames(frames, (16, 24))
    assert small.shape == (2, 16, 24, 3) and small.dtype == np.uint8
    flat = np.full((1, 8, 8, 3), 77, dtype=np.uint8)
    assert np.all(resize_frames(flat, (4, 4)) == 77)


def _onevision_config(image_size: int = 64, patch: int = 8) -> SimpleNamespace:
    return SimpleNamespace(vision_config=SimpleNamespace(image_size=image_size, patch_size=patch))


def test_preprocess_onevision_resizes_normalises_and_counts_tokens() -> None:
    frames = np.full((5, 48, 80, 3), 255, dtype=np.uint8)
    config = {"size": {"height": 64, "width": 64}, "image_mean": [0.5] * 3, "image_std": [0.5] * 3}
    inputs = preprocess_video(frames, "llava_onevision", config, _onevision_config())
    pixels = inputs.tensors["pixel_values_videos"]
    assert tuple(pixels.shape) == (1, 5, 3, 64, 64)
    assert float(pixels.min()) == pytest.approx(1.0) and float(pixels.max()) == pytest.approx(1.0)
    assert inputs.num_placeholders == 5 * 4 * 4 + 1  # 8x8 patches pooled to 4x4, one newline


def test_preprocess_qwen2_vl_grid_and_patch_layout() -> None:
    frames = np.zeros((3, 56, 84, 3), dtype=np.uint8)
    frames[..., 0] = np.arange(84, dtype=np.uint8)[None, None, :]  # red ramps left to right
    config = {
        "patch_size": 14,
        "merge_size": 2,
        "temporal_patch_size": 2,
        "min_pixels": 56 * 56,
        "max_pixels": 28 * 28 * 100,
        "image_mean": [0.0] * 3,
        "image_std": [1.0] * 3,
        "rescale_factor": 1.0,
    }
    inputs = preprocess_video(frames, "qwen2_vl", config, None)
    grid = inputs.tensors["video_grid_thw"].tolist()
    assert grid == [[2, 4, 6]]  # 3 frames padded to 4 → 2 temporal patches; 56×84 → 4×6 patches
    patches = inputs.tensors["pixel_values_videos"]
    assert tuple(patches.shape) == (2 * 4 * 6, 3 * 2 * 14 * 14)
    assert inputs.num_placeholders == 2 * 4 * 6 // 4
    # Patch order: 2×2 merge blocks in raster order; the first patch is the top-left one (small red values).
    first = patches[0].view(3, 2, 14, 14)
    second_block = patches[4].view(3, 2, 14, 14)  # first patch of the second merge block (columns 28..41)
    assert float(first[0].mean()) < float(second_block[0].mean())
    with pytest.raises(VideoError, match="no hieravid adapter for model_type 'llama'"):
        preprocess_video(frames, "llama", {}, None)
