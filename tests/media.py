"""Media files for the tests (imported by test modules; needs the video extra, PyAV)."""

from __future__ import annotations

from pathlib import Path


def video_stream_without_frames(path: Path) -> Path:
    """A file with a declared video stream and audio packets only (mp4 drops the empty video stream)."""
    import av
    import numpy as np

    with av.open(str(path), mode="w") as container:
        video = container.add_stream("mpeg4", rate=8)
        video.width = video.height = 32
        video.pix_fmt = "yuv420p"
        audio = container.add_stream("aac", rate=8000)
        for index in range(4):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), dtype=np.float32), format="fltp", layout="mono")
            frame.sample_rate, frame.pts = 8000, index * 1024
            for packet in audio.encode(frame):
                container.mux(packet)
        for packet in [*audio.encode(), *video.encode()]:
            container.mux(packet)
    return path
