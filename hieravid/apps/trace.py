"""Per-request pruning traces: what each level decided, saved as one ``.safetensors`` file.

A :class:`RequestTrace` records, for one prefill, the video layout, the segment level's decisions
(frame segment ids, segment marginal values, the merge map) and the video tokens kept after each
in-LLM stage, plus small downscaled frames so that :mod:`hieravid.apps.viz` can draw them. The policy and
plan travel as JSON in the file's metadata (safetensors metadata is ``str → str``), so a run can be
reproduced and analysed later.

Coordinates: video *content* tokens are numbered ``f * rows * cols + r * cols + c`` (frame-major,
raster order inside a frame, newline tokens excluded), in the original, unpruned video.

File layout (``format = hieravid-trace``, ``version = 1``)::

    tensors   request.{i}.frame_segment_ids   [F]        int64
              request.{i}.segment_values      [G]        float32
              request.{i}.input_kept          [K_0]      int64   (absent: nothing merged)
              request.{i}.merge_target        [F*P]      int64   (optional)
              request.{i}.stage.{s}.kept      [K_s]      int64
              request.{i}.frame_redundancy    [F]        float32 (optional)
              request.{i}.thumbnails          [F,h,w,3]  uint8   (optional)
    metadata  format, version, num_requests, request.{i} (JSON of the scalar fields, policy and plan)
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hieravid.errors import HieravidError

if TYPE_CHECKING:
    import torch

TRACE_FORMAT = "hieravid-trace"
TRACE_VERSION = 1
#: Most content tokens a trace may describe (256 frames of 210 tokens are 53,760).
MAX_TRACE_TOKENS = 10_000_000
#: Most requests one trace file may hold.
MAX_TRACE_REQUESTS = 100_000


def _short(value: Any) -> str:
    text = repr(value) if not isinstance(value, int) or value.bit_length() < 200 else f"<{value.bit_length()}-bit int>"
    return text if len(text) <= 60 else text[:57] + "..."


__all__ = ["TRACE_FORMAT", "TRACE_VERSION", "RequestTrace", "StageTrace", "TraceError", "load_trace", "save_trace"]


class TraceError(HieravidError, ValueError):
    """A trace file cannot be read or a trace is inconsistent."""


@dataclass
class StageTrace:
    """Video content tokens kept after one in-LLM stage.

    Attributes:
        layer: the decoder layer after which (or inside which) the stage cut.
        kept: ``[K]`` int64 ascending content indices (original coordinates) still present after the stage.
        newlines_kept: newline tokens still present after the stage.
    """

    layer: int
    kept: torch.Tensor
    newlines_kept: int = 0


@dataclass
class RequestTrace:
    """Everything one prefill decided, in original (unpruned) coordinates.

    Attributes:
        frames: frames as the LLM sees them (Qwen2-VL: temporal patches).
        rows: token rows per frame.
        cols: token columns per frame.
        newline_tokens: layout newline tokens in the video span (not merged, not drawn).
        frame_segment_ids: ``[frames]`` int64 segment id of each frame (all 0 when the segment level is off).
        segment_values: ``[G]`` float32 z-scored segment marginal values.
        input_kept: ``[K0]`` int64 ascending content indices entering layer 0 (after merging); ``None``
            means every token (nothing merged).
        merge_target: ``[frames*rows*cols]`` int64 content index each token was merged into (itself when
            kept), if known.
        stages: kept tokens after each in-LLM stage, in order.
        layer_video_tokens: video tokens entering each decoder layer (measured), if known.
        frame_redundancy: ``[frames]`` float32 per-frame redundancy ``c[f]``, if known.
        thumbnails: ``[frames, h, w, 3]`` uint8 downscaled frames (one per LLM frame), if known.
        policy: the policy as a JSON-serialisable mapping (``Policy.to_dict()``).
        plan: the compiled plan as a JSON-serialisable mapping (``PruningPlan.to_dict()``).
        info: free-form JSON-serialisable details (model, question, answer, timings, ...).
    """

    frames: int
    rows: int
    cols: int
    frame_segment_ids: torch.Tensor
    segment_values: torch.Tensor
    newline_tokens: int = 0
    input_kept: torch.Tensor | None = None
    merge_target: torch.Tensor | None = None
    stages: list[StageTrace] = field(default_factory=list)
    layer_video_tokens: list[int] | None = None
    frame_redundancy: torch.Tensor | None = None
    thumbnails: torch.Tensor | None = None
    policy: dict[str, Any] | None = None
    plan: dict[str, Any] | None = None
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def tokens_per_frame(self) -> int:
        return self.rows * self.cols

    @property
    def content_tokens(self) -> int:
        """Video content tokens before pruning (``frames × rows × cols``)."""
        return self.frames * self.tokens_per_frame

    @property
    def num_segments(self) -> int:
        return int(self.segment_values.numel())

    def segments(self) -> list[tuple[int, int]]:
        """Frame ranges ``(first, last)`` (inclusive) of each segment, in order."""
        ids = [int(value) for value in self.frame_segment_ids.tolist()]
        ranges: list[tuple[int, int]] = []
        for index, seg in enumerate(ids):
            if index == 0 or seg != ids[index - 1]:
                ranges.append((index, index))
            else:
                ranges[-1] = (ranges[-1][0], index)
        return ranges

    def cuts(self) -> list[int]:
        """Frames that open a new segment, frame 0 excluded."""
        return [first for first, _ in self.segments()[1:]]

    def merged_kept(self) -> torch.Tensor:
        """Content indices present after the segment level (all of them when nothing was merged)."""
        import torch

        if self.input_kept is not None:
            return self.input_kept
        if self.merge_target is not None:
            targets = torch.unique(self.merge_target)
            return targets[targets >= 0]  # -1: dropped
        return torch.arange(self.content_tokens, dtype=torch.int64)

    def validate(self) -> None:
        """Check types, shapes and index ranges; raises :class:`TraceError` naming the inconsistent field.

        A trace read from a file is checked as hostile input: whatever it holds, drawing it afterwards cannot fail
        or allocate more than its geometry says (at most :data:`MAX_TRACE_TOKENS` content tokens)."""
        import torch

        for name in ("frames", "rows", "cols", "newline_tokens"):
            value = getattr(self, name)
            if type(value) is not int or value < (0 if name == "newline_tokens" else 1):
                raise TraceError(
                    f"{name} must be a {'non-negative' if name == 'newline_tokens' else 'positive'} "
                    f"integer, got {_short(value)}"
                )
        n = self.content_tokens
        if n > MAX_TRACE_TOKENS or self.newline_tokens > MAX_TRACE_TOKENS:
            raise TraceError(
                f"trace geometry {self.frames}×{self.rows}×{self.cols} (+{self.newline_tokens} newlines) exceeds "
                f"{MAX_TRACE_TOKENS} tokens: not a video a model saw"
            )

        def tensor(name: str, value: Any, *, integer: bool, shape: tuple[int, ...] | None = None) -> Any:
            if value is None:
                return None
            if not isinstance(value, torch.Tensor):
                raise TraceError(f"{name} must be a tensor, got {type(value).__name__}")
            if value.is_floating_point() == integer or value.is_complex() or value.dtype == torch.bool:
                raise TraceError(f"{name} must hold {'integers' if integer else 'floats'}, got {value.dtype}")
            if shape is not None and tuple(value.shape) != shape:
                raise TraceError(f"{name} must have shape {list(shape)}, got {list(value.shape)}")
            return value

        ids = tensor("frame_segment_ids", self.frame_segment_ids, integer=True, shape=(self.frames,))
        values = tensor("segment_values", self.segment_values, integer=False)
        if values.dim() != 1:
            raise TraceError(f"segment_values must be 1-D, got shape {list(values.shape)}")
        steps = ids[1:] - ids[:-1]
        if int(ids[0]) != 0 or bool(((steps != 0) & (steps != 1)).any()):
            raise TraceError("frame_segment_ids must start at 0 and grow by 0 or 1 from one frame to the next")
        if int(ids.max()) + 1 != self.num_segments:
            raise TraceError(
                f"segment_values has {self.num_segments} entries but frame_segment_ids name "
                f"{int(ids.max()) + 1} segments"
            )
        if not bool(torch.isfinite(values).all()):
            raise TraceError("segment_values must be finite")
        merge = tensor("merge_target", self.merge_target, integer=True, shape=(n,))
        if merge is not None and n and (int(merge.min()) < -1 or int(merge.max()) >= n):
            raise TraceError(f"merge_target: values must be content indices in [0, {n}) or -1 (dropped)")
        named = [("input_kept", self.input_kept)] + [
            (f"stage {index} (layer {stage.layer})", stage.kept) for index, stage in enumerate(self.stages)
        ]
        for name, kept in named:
            tensor(name, kept, integer=True)
            if kept is None:
                continue
            if kept.dim() != 1 or (kept.numel() and (int(kept.min()) < 0 or int(kept.max()) >= n)):
                raise TraceError(f"{name}: kept indices must be 1-D within [0, {n})")
        for index, stage in enumerate(self.stages):
            if type(stage.layer) is not int or not 0 <= stage.layer < 4096:
                raise TraceError(f"stage {index}: layer must be an integer in [0, 4096), got {_short(stage.layer)}")
            if type(stage.newlines_kept) is not int or not 0 <= stage.newlines_kept <= self.newline_tokens:
                raise TraceError(
                    f"stage {index}: newlines_kept must be an integer in [0, {self.newline_tokens}], got "
                    f"{_short(stage.newlines_kept)}"
                )
        if self.layer_video_tokens is not None and (
            not isinstance(self.layer_video_tokens, list)
            or len(self.layer_video_tokens) > 4096
            or any(type(v) is not int or not 0 <= v <= n + self.newline_tokens for v in self.layer_video_tokens)
        ):
            raise TraceError(
                f"layer_video_tokens must be a list of integers in [0, {n + self.newline_tokens}] (one per layer)"
            )
        redundancy = tensor("frame_redundancy", self.frame_redundancy, integer=False, shape=(self.frames,))
        if redundancy is not None and not bool(torch.isfinite(redundancy).all()):
            raise TraceError("frame_redundancy must be finite")
        thumbs = self.thumbnails
        if thumbs is not None and (
            not isinstance(thumbs, torch.Tensor)
            or thumbs.dtype != torch.uint8
            or thumbs.dim() != 4
            or thumbs.shape[0] != self.frames
            or thumbs.shape[3] != 3
            or not 1 <= thumbs.shape[1] <= 4096
            or not 1 <= thumbs.shape[2] <= 4096
        ):
            shape = list(thumbs.shape) if isinstance(thumbs, torch.Tensor) else type(thumbs).__name__
            raise TraceError(
                f"thumbnails must have shape [{self.frames}, h, w, 3] (uint8, sides up to 4096), got {shape}"
            )
        for name in ("policy", "plan", "info"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, dict):
                raise TraceError(f"{name} must be a JSON object, got {type(value).__name__}")

    def summary(self) -> str:
        """One line per level: segments, tokens after merging and after each stage."""
        lines = [
            f"{self.frames} frames × {self.rows}×{self.cols} tokens (+{self.newline_tokens} newline) = "
            f"{self.content_tokens} content tokens",
            f"segments ({self.num_segments}): "
            + ", ".join(f"{a}-{b}" if a != b else f"{a}" for a, b in self.segments()),
            f"after merging: {self.merged_kept().numel()} tokens",
        ]
        lines.extend(f"after stage @ layer {stage.layer}: {stage.kept.numel()} tokens" for stage in self.stages)
        return "\n".join(lines)


def _tensor_fields(trace: RequestTrace, prefix: str) -> dict[str, torch.Tensor]:
    import torch

    tensors: dict[str, torch.Tensor] = {
        f"{prefix}.frame_segment_ids": trace.frame_segment_ids.detach().to("cpu", torch.int64).contiguous(),
        f"{prefix}.segment_values": trace.segment_values.detach().to("cpu", torch.float32).contiguous(),
    }
    if trace.input_kept is not None:
        tensors[f"{prefix}.input_kept"] = trace.input_kept.detach().to("cpu", torch.int64).contiguous()
    if trace.merge_target is not None:
        tensors[f"{prefix}.merge_target"] = trace.merge_target.detach().to("cpu", torch.int64).contiguous()
    if trace.frame_redundancy is not None:
        tensors[f"{prefix}.frame_redundancy"] = trace.frame_redundancy.detach().to("cpu", torch.float32).contiguous()
    if trace.thumbnails is not None:
        tensors[f"{prefix}.thumbnails"] = trace.thumbnails.detach().to("cpu", torch.uint8).contiguous()
    for index, stage in enumerate(trace.stages):
        tensors[f"{prefix}.stage.{index}.kept"] = stage.kept.detach().to("cpu", torch.int64).contiguous()
    return tensors


def _scalar_fields(trace: RequestTrace) -> dict[str, Any]:
    return {
        "frames": trace.frames,
        "rows": trace.rows,
        "cols": trace.cols,
        "newline_tokens": trace.newline_tokens,
        "stages": [{"layer": stage.layer, "newlines_kept": stage.newlines_kept} for stage in trace.stages],
        "layer_video_tokens": trace.layer_video_tokens,
        "policy": trace.policy,
        "plan": trace.plan,
        "info": trace.info,
    }


def save_trace(path: str | Path, traces: RequestTrace | Sequence[RequestTrace]) -> Path:
    """Write one or more request traces to a ``.safetensors`` file; returns the path written.

    Every trace is validated first. Policy, plan and ``info`` must be JSON-serialisable.
    """
    from safetensors.torch import save_file

    items = [traces] if isinstance(traces, RequestTrace) else list(traces)
    tensors: dict[str, Any] = {}
    metadata = {"format": TRACE_FORMAT, "version": str(TRACE_VERSION), "num_requests": str(len(items))}
    for index, trace in enumerate(items):
        trace.validate()
        prefix = f"request.{index}"
        tensors.update(_tensor_fields(trace, prefix))
        try:
            metadata[prefix] = json.dumps(_scalar_fields(trace))
        except (TypeError, ValueError) as error:
            raise TraceError(f"request {index}: policy, plan and info must be JSON-serialisable ({error})") from None
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=metadata)
    return path


def load_trace(path: str | Path) -> list[RequestTrace]:
    """Read every request trace of a file written by :func:`save_trace`.

    Raises :class:`TraceError` for a missing file, a file that is not safetensors, or one that is not a
    hieravid trace.
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise TraceError(f"{path}: trace file not found")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as error:  # safetensors raises its own SafetensorError / OSError variants
        raise TraceError(f"{path}: not a safetensors file ({type(error).__name__}: {error})") from None
    if metadata.get("format") != TRACE_FORMAT:
        raise TraceError(f"{path}: not a hieravid trace (metadata format is {metadata.get('format')!r})")
    if metadata.get("version") != str(TRACE_VERSION):
        raise TraceError(
            f"{path}: trace version {metadata.get('version')!r} is not supported (expected {TRACE_VERSION})"
        )
    count = metadata.get("num_requests", "0")
    if not count.isdigit() or not int(count) <= MAX_TRACE_REQUESTS:
        raise TraceError(
            f"{path}: metadata num_requests must be an integer up to {MAX_TRACE_REQUESTS}, got {_short(count)}"
        )
    traces = []
    for index in range(int(count)):
        prefix = f"request.{index}"
        try:
            scalars = json.loads(metadata[prefix])
            if not isinstance(scalars, dict) or not isinstance(scalars.get("stages"), list):
                raise TypeError("the request's metadata must be a JSON object with a list of stages")
            trace = RequestTrace(
                frames=int(scalars["frames"]),
                rows=int(scalars["rows"]),
                cols=int(scalars["cols"]),
                newline_tokens=int(scalars["newline_tokens"]),
                frame_segment_ids=tensors[f"{prefix}.frame_segment_ids"],
                segment_values=tensors[f"{prefix}.segment_values"],
                input_kept=tensors.get(f"{prefix}.input_kept"),
                merge_target=tensors.get(f"{prefix}.merge_target"),
                stages=[
                    StageTrace(
                        layer=int(stage["layer"]),
                        kept=tensors[f"{prefix}.stage.{s}.kept"],
                        newlines_kept=int(stage["newlines_kept"]),
                    )
                    for s, stage in enumerate(scalars["stages"])
                ],
                layer_video_tokens=scalars.get("layer_video_tokens"),
                frame_redundancy=tensors.get(f"{prefix}.frame_redundancy"),
                thumbnails=tensors.get(f"{prefix}.thumbnails"),
                policy=scalars.get("policy"),
                plan=scalars.get("plan"),
                info=scalars.get("info") or {},
            )
        except (KeyError, ValueError, TypeError, OverflowError, AttributeError, RecursionError) as error:
            detail = " ".join(f"{type(error).__name__}: {error}".split())[:200]
            raise TraceError(f"{path}: request {index} is incomplete or malformed ({detail})") from None
        try:
            trace.validate()
        except TraceError as error:
            raise TraceError(f"{path}: request {index}: {error}") from None
        traces.append(trace)
    return traces
