"""``hieravid viz``: draw a trace — the frames with kept, merged and pruned tokens per level, and a
segment timeline.

One row per level (after the segment level's merging, then after each in-LLM stage), one column per
frame. A token left clear is still in the sequence; a washed-out (white) token was merged into
the same position of an earlier frame (segment level); a dark token was pruned by a stage. The
timeline below colours frames by segment and marks each segment's marginal value (and the frame
redundancy ``c[f]`` when traced); the last panel shows the video tokens entering each decoder layer.
Needs matplotlib (``pip install "hieravid[viz]"``).
"""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import TYPE_CHECKING

from hieravid.errors import HieravidError

if TYPE_CHECKING:
    import numpy as np

    from hieravid.apps.trace import RequestTrace

__all__ = ["IMAGE_SUFFIXES", "VizError", "draw_trace", "level_video_tokens", "select_frames", "token_status"]

KEPT, MERGED, PRUNED = 0, 1, 2
MERGED_RGBA = (1.0, 1.0, 1.0, 0.72)
PRUNED_RGBA = (0.0, 0.0, 0.0, 0.78)
SEGMENT_COLOURS = (
    "#e41a1c",
    "#377eb8",
    "#4daf4a",
    "#984ea3",
    "#ff7f00",
    "#a6a600",
    "#a65628",
    "#f781bf",
    "#17becf",
    "#999999",
)


class VizError(HieravidError, ValueError):
    """A trace cannot be drawn (matplotlib missing, bad options)."""


#: Image formats :func:`draw_trace` writes (matplotlib picks the format from the suffix).
IMAGE_SUFFIXES = (".png", ".svg", ".pdf")


def token_status(trace: RequestTrace) -> np.ndarray:
    """``[levels, frames, rows, cols]`` uint8 status (KEPT/MERGED/PRUNED) after each level.

    Level 0 is the segment level (merging), level ``s + 1`` the state after stage ``s``.
    """
    import numpy as np

    n = trace.content_tokens
    levels = 1 + len(trace.stages)
    status = np.full((levels, n), KEPT, dtype=np.uint8)
    present = np.zeros(n, dtype=bool)
    present[trace.merged_kept().numpy()] = True
    status[0, ~present] = MERGED
    for index, stage in enumerate(trace.stages):
        now = np.zeros(n, dtype=bool)
        now[stage.kept.numpy()] = True
        row = status[index].copy()
        row[present & ~now] = PRUNED
        status[index + 1] = row
        present = now
    return status.reshape(levels, trace.frames, trace.rows, trace.cols)


def level_video_tokens(trace: RequestTrace) -> list[int]:
    """Video tokens present after the segment level, then after each stage: content tokens plus the newline tokens
    still there (what ``hieravid run`` and ``hieravid demo`` print per level)."""
    counts = [int(trace.merged_kept().numel()) + trace.newline_tokens]
    counts += [int(stage.kept.numel()) + stage.newlines_kept for stage in trace.stages]
    return counts


def select_frames(trace: RequestTrace, max_frames: int) -> list[int]:
    """Frames to draw: every segment's first frame, then evenly spread frames, at most ``max_frames``."""
    if max_frames < 1:
        raise VizError(f"max_frames must be a positive integer, got {max_frames}")
    if trace.frames <= max_frames:
        return list(range(trace.frames))
    chosen = {first for first, _ in trace.segments()}
    chosen = set(sorted(chosen)[:max_frames])
    step = trace.frames / max_frames
    candidates = [min(trace.frames - 1, int(i * step)) for i in range(max_frames)]
    for frame in candidates:
        if len(chosen) >= max_frames:
            break
        chosen.add(frame)
    return sorted(chosen)


def _overlay(status: np.ndarray) -> np.ndarray:
    import numpy as np

    rgba = np.zeros((*status.shape, 4), dtype=np.float32)
    rgba[status == MERGED] = MERGED_RGBA
    rgba[status == PRUNED] = PRUNED_RGBA
    return rgba


def draw_trace(
    trace: RequestTrace,
    path: str | Path,
    *,
    max_frames: int = 16,
    dpi: int = 110,
    title: str | None = None,
) -> Path:
    """Draw ``trace`` to an image file (PNG, SVG or PDF by extension); returns the path written.

    Raises:
        VizError: another extension (matplotlib would write ``path + ".png"`` for none), a folder, matplotlib missing.
        TraceError: an inconsistent trace.
    """
    path = _image_path(path)
    trace.validate()
    try:
        import matplotlib
    except ImportError:
        raise VizError('drawing needs matplotlib: pip install "hieravid[viz]" (or: pip install matplotlib)') from None
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.patches import Patch, Rectangle

    status = token_status(trace)
    frames = select_frames(trace, max_frames)
    levels = status.shape[0]
    segment_ids = [int(v) for v in trace.frame_segment_ids.tolist()]
    values = trace.segment_values.tolist()
    thumbs = trace.thumbnails.numpy() if trace.thumbnails is not None else None
    n_v = trace.content_tokens + trace.newline_tokens
    level_names = [f"segment level\n{level_video_tokens(trace)[0]} kept"] + [
        f"after layer {stage.layer}\n{kept} kept" for stage, kept in zip(trace.stages, level_video_tokens(trace)[1:])
    ]

    columns = len(frames)
    cell = 0.95
    width, height = max(7.5, 1.6 + columns * cell), levels * cell + 3.9
    fig = plt.figure(figsize=(width, height), dpi=dpi)
    grid = fig.add_gridspec(
        levels + 3,
        columns,
        height_ratios=[1.0] * levels + [0.9, 0.2, 1.1],  # a spacer row for the timeline's label
        left=1.3 / width,
        right=0.99,
        top=1 - 0.55 / height,
        bottom=0.75 / height,
        hspace=0.3,
        wspace=0.06,
    )
    aspect = trace.rows / trace.cols
    if thumbs is not None:
        aspect = thumbs.shape[1] / thumbs.shape[2]
    for level in range(levels):
        for column, frame in enumerate(frames):
            axis = fig.add_subplot(grid[level, column])
            if thumbs is not None:
                axis.imshow(thumbs[frame], extent=(0, 1, 0, aspect), interpolation="nearest")
            else:
                axis.add_patch(Rectangle((0, 0), 1, aspect, color="#d9d9d9"))
            axis.imshow(_overlay(status[level, frame]), extent=(0, 1, 0, aspect), interpolation="nearest")
            axis.set_xlim(0, 1)
            axis.set_ylim(0, aspect)
            axis.set_xticks([])
            axis.set_yticks([])
            colour = SEGMENT_COLOURS[segment_ids[frame] % len(SEGMENT_COLOURS)]
            for spine in axis.spines.values():
                spine.set_edgecolor(colour)
                spine.set_linewidth(2.2)
            if level == 0:
                axis.set_title(f"f{frame}", fontsize=8, color=colour, pad=2)
            if column == 0:
                axis.set_ylabel(level_names[level], fontsize=8, rotation=0, ha="right", va="center", labelpad=6)

    timeline = fig.add_subplot(grid[levels, :])
    for frame, seg in enumerate(segment_ids):
        timeline.add_patch(Rectangle((frame, 0), 1, 1, color=SEGMENT_COLOURS[seg % len(SEGMENT_COLOURS)], alpha=0.55))
    for seg, (first, last) in enumerate(trace.segments()):
        value = values[seg] if seg < len(values) else 0.0
        timeline.text((first + last + 1) / 2, 0.5, f"seg {seg}\nMV {value:+.2f}", ha="center", va="center", fontsize=7)
        if first:
            timeline.axvline(first, color="black", linewidth=1.2)
    explained = "MV: a segment's marginal value (z-scored novelty; a higher MV gets a larger frame-level budget)"
    if trace.frame_redundancy is not None:
        redundancy = trace.frame_redundancy.numpy()
        timeline.plot(
            np.arange(trace.frames) + 0.5,
            redundancy,
            color="black",
            linewidth=0.8,
            marker=".",
            markersize=3,
            label="frame redundancy c[f]",
        )
        timeline.legend(loc="lower right", fontsize=6, frameon=False)
        explained += (
            "; c[f]: fraction of frame f's tokens similar to the same position in frame f-1 (a frame with c[f] < β "
            "opens a segment)"
        )
        timeline.set_yticks([0, 0.5, 1])
        timeline.set_ylabel("c[f]", fontsize=7, labelpad=1)
    else:
        timeline.set_yticks([])
        timeline.set_ylabel("segments", fontsize=7, labelpad=1)
    timeline.set_xlim(0, trace.frames)
    timeline.set_ylim(0, 1.05)
    timeline.set_xlabel("frame (as the language model sees them)", fontsize=7, labelpad=1)
    caption = "\n".join(textwrap.wrap(explained, width=int(width * 16)))
    fig.text(0.01, 0.004, caption, fontsize=7, ha="left", va="bottom", color="#333333")
    timeline.tick_params(labelsize=7)
    timeline.set_title(
        f"{trace.num_segments} segment(s); cuts at frames {trace.cuts() or 'none'}", fontsize=8, loc="left", pad=2
    )

    tokens_axis = fig.add_subplot(grid[levels + 2, :])
    if trace.layer_video_tokens:
        layers = np.arange(len(trace.layer_video_tokens))
        tokens_axis.bar(layers, trace.layer_video_tokens, color="#4c72b0", width=0.7)
        tokens_axis.axhline(n_v, color="grey", linestyle="--", linewidth=0.8)
        tokens_axis.text(len(layers) - 0.5, n_v, f" N_v = {n_v}", fontsize=7, va="bottom", ha="right", color="grey")
        tokens_axis.set_xticks(layers)
        tokens_axis.set_ylim(0, n_v * 1.15)
        tokens_axis.set_xlabel("decoder layer", fontsize=8, labelpad=1)
        tokens_axis.set_ylabel("video tokens", fontsize=8)
        tokens_axis.tick_params(labelsize=7)
    else:
        tokens_axis.axis("off")

    legend = [
        Patch(facecolor="white", edgecolor="grey", label="kept"),
        Patch(facecolor="#f4f4f4", edgecolor="grey", label="merged into an earlier frame (segment level)"),
        Patch(facecolor=PRUNED_RGBA[:3], alpha=PRUNED_RGBA[3], label="pruned (frame level, by stage)"),
    ]
    policy = (trace.policy or {}).get("name", "policy")
    heading = title or (
        f"HieraVid trace, policy {policy}: {trace.frames} frames × {trace.rows}×{trace.cols} tokens"
        + (f" (showing {columns})" if columns < trace.frames else "")
    )
    fig.suptitle(heading, fontsize=10, x=0.01, ha="left", y=0.995)
    fig.legend(handles=legend, loc="upper right", ncol=3, fontsize=7, frameon=False, bbox_to_anchor=(0.995, 1.0))
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fig.savefig(path, dpi=dpi)
    except ValueError as error:
        raise VizError(f"{path}: cannot write this image format ({error}); use .png, .svg or .pdf") from None
    finally:
        plt.close(fig)
    return path


def draw_trace_file(trace_path: str | Path, out: str | Path, *, request: int = 0, max_frames: int = 16) -> Path:
    """Load request ``request`` of a trace file and draw it to ``out``."""
    from hieravid.apps.trace import load_trace

    traces = load_trace(trace_path)
    if not traces:
        raise VizError(f"{trace_path}: the trace holds no request")
    if not 0 <= request < len(traces):
        raise VizError(f"{trace_path}: request {request} does not exist (the file holds {len(traces)})")
    return draw_trace(traces[request], out, max_frames=max_frames)


def _image_path(path: str | Path) -> Path:
    path = Path(path)
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        raise VizError(
            f"{path}: cannot write this image format ({path.suffix or 'no extension'}); use .png, .svg or .pdf"
        )
    if path.is_dir():
        raise VizError(f"{path}: is a folder; give an image file name")
    return path


def viz_command(args: object) -> int:
    """``hieravid viz TRACE -o out.png``; returns the exit status."""
    from hieravid.apps.paths import check_output_file

    output = _image_path(check_output_file(args.output, option="-o"))  # type: ignore[attr-defined]
    path = draw_trace_file(args.trace, output, request=args.request, max_frames=args.max_frames)  # type: ignore[attr-defined]
    print(f"wrote {path}")
    return 0
