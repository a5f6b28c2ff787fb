"""Video input: PyAV decoding with uniform frame sampling, and a deterministic synthetic video.

Frames are ``numpy`` arrays ``[T, H, W, 3]`` of ``uint8`` RGB. PyAV (``pip install "hieravid[video]"``)
is imported only when a file is read or written; :func:`synthetic_video` needs numpy alone.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hieravid.adapters.base import VideoInputs
from hieravid.errors import HieravidError

if TYPE_CHECKING:
    import numpy as np

__all__ = [
    "SyntheticVideo",
    "VideoError",
    "VideoInfo",
    "VideoInputs",
    "preprocess_video",
    "probe_video",
    "read_video",
    "resize_frames",
    "sample_indices",
    "synthetic_video",
    "write_video",
]

ProgressFactory = Callable[..., Any]
"""A ``tqdm``-like callable: ``factory(total=..., desc=..., unit=...)`` returning an object with
``update(n)`` and ``close()``."""


class VideoError(HieravidError, ValueError):
    """A video cannot be opened, decoded, or holds no frames."""


@dataclass(frozen=True)
class VideoInfo:
    """What the container says about its first video stream (frame count may be an estimate)."""

    path: str
    frames: int
    fps: float
    width: int
    height: int
    codec: str

    @property
    def duration(self) -> float:
        """Seconds, from frame count and rate (0 when the rate is unknown)."""
        return self.frames / self.fps if self.fps > 0 else 0.0


def _import_av() -> Any:
    try:
        import av
    except ImportError:
        raise VideoError('reading videos needs PyAV: pip install "hieravid[video]" (or: pip install av)') from None
    return av


def _open(path: str | Path) -> tuple[Any, Any]:
    av = _import_av()
    source = Path(path)
    if not source.exists():
        raise VideoError(f"{source}: video file not found")
    if source.is_dir():
        raise VideoError(f"{source}: is a directory, expected a video file")
    try:
        container = av.open(str(source))
    except (av.error.FFmpegError, OSError, ValueError) as error:
        raise VideoError(
            f"{source}: cannot read this file as a video ({type(error).__name__}: {error}); "
            "it may be corrupt, truncated, or in a format FFmpeg does not know"
        ) from None
    if not container.streams.video:
        container.close()
        raise VideoError(f"{source}: the file holds no video stream (audio only, or not a video)")
    return container, container.streams.video[0]


def _count_frames(container: Any, stream: Any) -> int:
    """Frames of ``stream`` by demuxing packets (no decoding); the container is spent afterwards."""
    return sum(1 for packet in container.demux(stream) if packet.size)


def probe_video(path: str | Path) -> VideoInfo:
    """Open ``path`` and describe its first video stream; raises :class:`VideoError` when unreadable."""
    av = _import_av()
    container, stream = _open(path)
    try:
        frames = int(stream.frames or 0)
        if frames <= 0:
            frames = _count_frames(container, stream)
        rate = stream.average_rate or stream.guessed_rate
        return VideoInfo(
            path=str(path),
            frames=frames,
            fps=float(rate) if rate else 0.0,
            width=int(stream.codec_context.width or 0),
            height=int(stream.codec_context.height or 0),
            codec=str(stream.codec_context.name),
        )
    except av.error.FFmpegError as error:
        raise VideoError(f"{path}: cannot read the video stream ({error})") from None
    finally:
        container.close()


def sample_indices(total: int, num_frames: int) -> list[int]:
    """Uniform sampling: ``num_frames`` indices spread over ``[0, total)``, centred in equal bins.

    With fewer frames than requested every frame is taken once (no duplicates). Deterministic.
    """
    if total <= 0:
        return []
    if num_frames < 1:
        raise VideoError(f"frames to sample must be a positive integer, got {num_frames}")
    if num_frames >= total:
        return list(range(total))
    return [min(total - 1, int((i + 0.5) * total / num_frames)) for i in range(num_frames)]


def read_video(
    path: str | Path,
    num_frames: int,
    *,
    progress: ProgressFactory | None = None,
) -> tuple[np.ndarray, VideoInfo, list[int]]:
    """Decode ``num_frames`` uniformly sampled RGB frames of ``path`` with PyAV.

    Args:
        path: any container/codec FFmpeg can decode.
        num_frames: frames to sample (fewer when the video is shorter).
        progress: optional ``tqdm``-like factory for a progress bar over decoded frames.

    Returns:
        ``(frames [T, H, W, 3] uint8, info, sampled frame indices)``.

    Raises:
        VideoError: missing, unreadable or corrupt file, no video stream, or no decodable frame.
    """
    import numpy as np

    av = _import_av()
    info = probe_video(path)
    if info.frames <= 0:
        raise VideoError(f"{path}: the video holds no frames")
    wanted = sample_indices(info.frames, num_frames)
    container, stream = _open(path)
    stream.thread_type = "AUTO"
    picked: dict[int, np.ndarray] = {}
    bar = progress(total=wanted[-1] + 1, desc="decoding", unit="frame") if progress is not None else None
    wanted_set = set(wanted)
    last_decoded = None
    index = -1
    try:
        for index, frame in enumerate(container.decode(stream)):
            if bar is not None:
                bar.update(1)
            if index in wanted_set:
                picked[index] = frame.to_ndarray(format="rgb24")
            last_decoded = frame
            if index >= wanted[-1]:
                break
    except av.error.FFmpegError as error:
        if not picked:
            raise VideoError(
                f"{path}: decoding failed before any frame ({type(error).__name__}: {error}); the file is corrupt"
            ) from None
    finally:
        if bar is not None:
            bar.close()
        container.close()
    if not picked and last_decoded is None:
        raise VideoError(f"{path}: the video holds no decodable frames")
    # The container's frame count can overestimate (e.g. truncated files): resample what was decoded.
    if len(picked) < len(wanted):
        decoded = index + 1
        if decoded <= 0:
            raise VideoError(f"{path}: the video holds no decodable frames")
        return _read_with_count(path, num_frames, decoded, info)
    order = sorted(picked)
    return np.stack([picked[i] for i in order]), info, order


def _read_with_count(
    path: str | Path, num_frames: int, total: int, info: VideoInfo
) -> tuple[Any, VideoInfo, list[int]]:
    """Second pass of :func:`read_video` when the container overstated its frame count."""
    import numpy as np

    av = _import_av()
    wanted = sample_indices(total, num_frames)
    wanted_set = set(wanted)
    picked: dict[int, Any] = {}
    container, stream = _open(path)
    try:
        for index, frame in enumerate(container.decode(stream)):
            if index in wanted_set:
                picked[index] = frame.to_ndarray(format="rgb24")
            if index >= wanted[-1]:
                break
    except av.error.FFmpegError:
        pass
    finally:
        container.close()
    if not picked:
        raise VideoError(f"{path}: the video holds no decodable frames")
    order = sorted(picked)
    fixed = VideoInfo(info.path, total, info.fps, info.width, info.height, info.codec)
    return np.stack([picked[i] for i in order]), fixed, order


def write_video(path: str | Path, frames: np.ndarray, *, fps: float = 8.0, codec: str = "libx264") -> Path:
    """Write ``[T, H, W, 3]`` uint8 RGB frames to ``path`` with PyAV (even sizes for ``yuv420p``).

    Falls back to the built-in ``mpeg4`` encoder when ``codec`` is not available.
    """
    from fractions import Fraction

    av = _import_av()
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] == 0:
        raise VideoError(f"frames must have shape [T, H, W, 3] with T ≥ 1, got {tuple(frames.shape)}")
    if codec not in av.codecs_available:
        codec = "mpeg4"
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    height, width = frames.shape[1] - frames.shape[1] % 2, frames.shape[2] - frames.shape[2] % 2
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1000))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        if codec == "libx264":
            stream.options = {"crf": "18", "preset": "veryfast"}
        else:
            stream.bit_rate = 4_000_000
        for frame in frames:
            video_frame = av.VideoFrame.from_ndarray(frame[:height, :width].copy(), format="rgb24")
            for packet in stream.encode(video_frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def resize_frames(frames: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize ``[T, H, W, 3]`` uint8 frames to ``(height, width)`` (area averaging when shrinking)."""
    import numpy as np
    import torch

    tensor = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float()
    shrinking = size[0] <= frames.shape[1] and size[1] <= frames.shape[2]
    mode = "area" if shrinking else "bilinear"
    resized = torch.nn.functional.interpolate(
        tensor, size=size, mode=mode, **({} if mode == "area" else {"align_corners": False})
    )
    return resized.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


# --------------------------------------------------------------------------- synthetic video


@dataclass(frozen=True)
class SyntheticVideo:
    """A generated video with known scene cuts.

    Attributes:
        frames: ``[T, H, W, 3]`` uint8 RGB.
        cuts: frame indices that open a new scene (frame 0 excluded).
        scene_names: one name per scene, in order.
    """

    frames: np.ndarray
    cuts: tuple[int, ...]
    scene_names: tuple[str, ...]

    @property
    def scene_ids(self) -> list[int]:
        """Scene index of every frame."""
        ids, scene = [], 0
        cut_set = set(self.cuts)
        for index in range(self.frames.shape[0]):
            if index in cut_set:
                scene += 1
            ids.append(scene)
        return ids


SCENES: tuple[str, ...] = ("stripes", "checker", "rings", "blobs", "waves", "dots")


def _scene(name: str, t: int, size: int, rng_seed: int) -> np.ndarray:
    """One frame (``t`` steps into the scene) of a strongly coloured, textured, slowly moving pattern."""
    import numpy as np

    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    shift = 0.012 * t
    if name == "stripes":  # warm vertical stripes drifting right
        v = 0.5 + 0.5 * np.sign(np.sin(2 * np.pi * 6 * (x - shift)))
        rgb = np.stack([0.95 * np.ones_like(v), 0.25 + 0.5 * v, 0.1 * v], -1)
    elif name == "checker":  # blue/white checkerboard sliding down
        v = (np.floor(8 * x) + np.floor(8 * (y - shift))) % 2
        rgb = np.stack([0.1 + 0.8 * v, 0.2 + 0.7 * v, 0.9 * np.ones_like(v)], -1)
    elif name == "rings":  # green concentric rings expanding
        r = np.hypot(x - 0.5, y - 0.5)
        v = 0.5 + 0.5 * np.cos(2 * np.pi * 7 * (r - shift))
        rgb = np.stack([0.1 * v, 0.35 + 0.6 * v, 0.15 + 0.2 * v], -1)
    elif name == "blobs":  # magenta noise blobs panning left
        rng = np.random.default_rng(rng_seed)
        base = rng.random((10, 10)).astype(np.float32)
        big = np.kron(base, np.ones((size // 8 + 1, size // 8 + 1), dtype=np.float32))
        offset = round(shift * size)
        v = np.roll(big, -offset, axis=1)[:size, :size]
        rgb = np.stack([0.6 + 0.4 * v, 0.05 + 0.15 * v, 0.5 + 0.5 * v], -1)
    elif name == "waves":  # grey diagonal waves
        v = 0.5 + 0.5 * np.sin(2 * np.pi * 5 * (x + y - shift))
        rgb = np.stack([v, v, v], -1) * 0.9 + 0.05
    elif name == "dots":  # dark background with cyan dots drifting up
        v = ((np.sin(2 * np.pi * 9 * x) * np.sin(2 * np.pi * 9 * (y + shift))) > 0.6).astype(np.float32)
        rgb = np.stack([0.05 + 0.1 * v, 0.05 + 0.85 * v, 0.1 + 0.85 * v], -1)
    else:
        raise VideoError(f"unknown synthetic scene {name!r}; known: {', '.join(SCENES)}")
    return (np.clip(rgb, 0, 1) * 255).round().astype(np.uint8)


def synthetic_video(
    scene_lengths: Sequence[int] = (8, 8, 8, 8),
    *,
    size: int = 128,
    scenes: Sequence[str] | None = None,
    seed: int = 0,
) -> SyntheticVideo:
    """A deterministic video of distinct scenes (strong colours and textures) with small motion.

    Args:
        scene_lengths: frames of each scene; cuts fall between scenes.
        size: frame height and width in pixels.
        scenes: scene names (default: the first ``len(scene_lengths)`` of :data:`SCENES`).
        seed: seed of the textured scenes.

    Returns:
        A :class:`SyntheticVideo` whose ``cuts`` are the first frames of scenes 1, 2, ...
    """
    import numpy as np

    if not scene_lengths or any(length < 1 for length in scene_lengths):
        raise VideoError(f"scene lengths must be positive, got {list(scene_lengths)}")
    names = tuple(scenes) if scenes is not None else SCENES[: len(scene_lengths)]
    if len(names) != len(scene_lengths):
        raise VideoError(f"{len(scene_lengths)} scene lengths but {len(names)} scene names")
    frames, cuts, start = [], [], 0
    for index, (name, length) in enumerate(zip(names, scene_lengths)):
        if index:
            cuts.append(start)
        frames.extend(_scene(name, t, size, seed + index) for t in range(length))
        start += length
    return SyntheticVideo(frames=np.stack(frames), cuts=tuple(cuts), scene_names=names)


# --------------------------------------------------------------------------- model inputs without torchvision


def preprocess_video(
    frames: np.ndarray, model_type: str, processor_config: dict[str, Any], model_config: Any
) -> VideoInputs:
    """Pixel inputs of one video as the model's video processor would build them, without torchvision: the
    architecture's adapter does it (:meth:`hieravid.adapters.base.Adapter.preprocess_video`).

    Raises:
        VideoError: the architecture has no adapter, or its adapter has no built-in preprocessing.
    """
    from hieravid.adapters.registry import get_adapter
    from hieravid.errors import AdapterError

    try:
        return get_adapter(model_type).preprocess_video(frames, processor_config, model_config)
    except AdapterError as error:
        raise VideoError(f"model type {model_type!r}: {error}") from None
