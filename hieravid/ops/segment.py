"""Segment level of HieraVid (SPEC §2.1): temporal segmentation, segment marginal values, merging.

All functions take a video as ``frames: [F, P, D]`` (``F`` frames of ``P`` tokens, hidden size ``D``) and
flat token indices are ``f * P + p``. Everything runs on the input's device with vectorised tensor code;
the only host synchronisation is in :func:`segment_level`, which reads the number of segments once
(:func:`unread_segment_level` leaves that read to a caller that reads the device anyway).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import Tensor

from hieravid.ops._graphs import GraphCache
from hieravid.ops._util import NORM_EPS, floor_product, mask_to_indices

__all__ = [
    "FIRST_FRAME_SIMILARITY",
    "MergeResult",
    "SegmentLevelResult",
    "UnreadSegmentLevel",
    "adjacent_frame_similarity",
    "frame_redundancy",
    "merge_redundant_tokens",
    "num_merged_tokens",
    "segment_frames",
    "segment_level",
    "segment_marginal_values",
    "unread_segment_level",
]

#: Similarity reported for frame 0, which has no predecessor: the lowest cosine, i.e. "not similar".
FIRST_FRAME_SIMILARITY = -1.0


def _check_frames(frames: Tensor) -> None:
    if frames.dim() != 3:
        raise ValueError(f"frames must have shape [F, P, D], got {tuple(frames.shape)}")
    if frames.shape[0] == 0 or frames.shape[1] == 0:
        raise ValueError(f"frames must hold at least one frame and one token per frame, got {tuple(frames.shape)}")


def adjacent_frame_similarity(frames: Tensor) -> Tensor:
    """Cosine similarity of each token with the same-position token of the previous frame.

    Args:
        frames: ``[F, P, D]`` video tokens (any float dtype).

    Returns:
        ``[F, P]`` float32. Row ``f >= 1`` holds ``cos(x[f, p], x[f-1, p])`` computed in float32 with
        norms clamped at ``1e-12`` (a zero vector has similarity 0 with everything, never NaN), clamped
        to ``[-1, 1]``. Row 0 holds :data:`FIRST_FRAME_SIMILARITY` (-1, "not similar"); the merge
        operator never selects frame-0 tokens regardless of this value.
    """
    _check_frames(frames)
    x = frames.float()
    sim = torch.full(frames.shape[:2], FIRST_FRAME_SIMILARITY, dtype=torch.float32, device=frames.device)
    if frames.shape[0] > 1:
        norms = torch.linalg.vector_norm(x, dim=-1).clamp_min(NORM_EPS)
        dots = torch.einsum("fpd,fpd->fp", x[1:], x[:-1])
        sim[1:] = (dots / (norms[1:] * norms[:-1])).clamp(-1.0, 1.0)
    return sim


def frame_redundancy(similarity: Tensor, tau: float) -> Tensor:
    """Per-frame redundancy ``c[f]``: the fraction of positions whose similarity exceeds ``tau``.

    Args:
        similarity: ``[F, P]`` from :func:`adjacent_frame_similarity`.
        tau: similarity threshold τ (strict ``>``).

    Returns:
        ``[F]`` float32 in ``[0, 1]``; frame 0 is always 0.
    """
    if similarity.dim() != 2:
        raise ValueError(f"similarity must have shape [F, P], got {tuple(similarity.shape)}")
    c = (similarity > tau).float().mean(dim=1)
    c[:1].fill_(0.0)
    return c


def segment_frames(redundancy: Tensor, beta: float) -> Tensor:
    """Temporal segmentation: segment id of each frame.

    Frame 0 opens segment 0; frame ``f`` opens a new segment when ``redundancy[f] < beta`` and joins the
    current segment otherwise. Vectorised with a cumulative sum.

    Args:
        redundancy: ``[F]`` from :func:`frame_redundancy`.
        beta: segment threshold β.

    Returns:
        ``[F]`` int64, non-decreasing, starting at 0 with no gaps.
    """
    if redundancy.dim() != 1:
        raise ValueError(f"redundancy must have shape [F], got {tuple(redundancy.shape)}")
    opens = redundancy < beta
    opens[:1].fill_(True)
    return torch.cumsum(opens.to(torch.int64), 0) - 1


def _cosine(a: Tensor, b: Tensor) -> Tensor:
    na = torch.linalg.vector_norm(a, dim=-1).clamp_min(NORM_EPS)
    nb = torch.linalg.vector_norm(b, dim=-1).clamp_min(NORM_EPS)
    return ((a * b).sum(-1) / (na * nb)).clamp(-1.0, 1.0)


def segment_marginal_values(
    frames: Tensor,
    segment_ids: Tensor,
    weight: float = 0.5,
    *,
    num_segments: int | None = None,
) -> Tensor:
    """Segment marginal values (SPEC §2.1 step 4), z-scored across segments.

    ``g_i`` is the mean embedding of segment ``i`` (over all its frames' tokens, float32).
    ``a1 = cos(g_i, mean(g_0..g_{i-1}))`` (0 for ``i = 0``), ``a2 = cos(g_i, mean(g_{i+1}..g_{G-1}))``
    (0 for the last segment), ``MV_i = λ·a1 + (1-λ)·(1-a2)``, then ``(MV - mean) / (std + 1e-8)`` with the
    population standard deviation. A single segment gives ``[0.]``. Prefix/suffix means come from
    cumulative sums: no loop over segments.

    Args:
        frames: ``[F, P, D]`` video tokens.
        segment_ids: ``[F]`` non-decreasing frame segment ids starting at 0 (as from :func:`segment_frames`).
        weight: λ.
        num_segments: ``G``; when omitted it is read from ``segment_ids[-1] + 1`` (one host sync).

    Returns:
        ``[G]`` float32.
    """
    _check_frames(frames)
    if segment_ids.shape != frames.shape[:1]:
        raise ValueError(f"segment_ids must have shape [F]={frames.shape[0]}, got {tuple(segment_ids.shape)}")
    G = int(segment_ids[-1]) + 1 if num_segments is None else int(num_segments)
    frame_sums = frames.sum(dim=1, dtype=torch.float32)
    return _marginal_values_padded(frame_sums, segment_ids.to(torch.int64), frames.shape[1], weight)[:G]


def _marginal_values_padded(frame_sums: Tensor, segment_ids: Tensor, tokens_per_frame: int, weight: float) -> Tensor:
    """Marginal values padded to ``F`` entries (entries ``>= G`` are 0), without any host sync.

    ``frame_sums``: ``[F, D]`` float32 per-frame token sums; ``segment_ids``: ``[F]`` non-decreasing from 0.
    """
    F = frame_sums.shape[0]
    device = frame_sums.device
    idx = torch.arange(F, device=device)
    G = segment_ids[-1:] + 1  # [1], on the device
    is_seg = idx < G
    csum = torch.cat([frame_sums.new_zeros(1, frame_sums.shape[1]), torch.cumsum(frame_sums, 0)])
    ids = segment_ids.contiguous()
    start = torch.searchsorted(ids, idx, right=False)
    end = torch.searchsorted(ids, idx, right=True)
    count = ((end - start) * tokens_per_frame).clamp_min(1).unsqueeze(1)
    g = (csum[end] - csum[start]) / count  # [F, D]: segment means, 0 past the last segment
    gcs = torch.cumsum(g, 0)  # gcs[i] = g_0 + ... + g_i
    before = (gcs - g) / idx.clamp_min(1).unsqueeze(1)  # mean of g_0..g_{i-1}
    after = (gcs.index_select(0, G - 1) - gcs) / (G - 1 - idx).clamp_min(1).unsqueeze(1)  # g_{i+1}..g_{G-1}
    cos = _cosine(g.unsqueeze(0), torch.stack([before, after]))  # [2, F]
    a1 = torch.where(idx > 0, cos[0], 0.0)
    a2 = torch.where(idx < G - 1, cos[1], 0.0)
    mv = torch.where(is_seg, weight * a1 + (1.0 - weight) * (1.0 - a2), 0.0)
    mean = mv.sum() / G
    dev = torch.where(is_seg, mv - mean, 0.0)
    std = (dev.square().sum() / G).sqrt()
    return dev / (std + 1e-8)


@dataclass(frozen=True)
class MergeResult:
    """Output of :func:`merge_redundant_tokens`.

    Attributes:
        kept_index: ``[K]`` int64 ascending flat indices ``f * P + p`` of the tokens that remain.
        features: ``[K, D]`` merged features of the kept tokens, in the input dtype. A token that
            absorbed nothing keeps its exact input value.
        merge_target: ``[F * P]`` int64; for each token the flat index of the kept token it merged into
            (itself when kept).
        segment_ids: ``[K]`` segment id of each kept token when frame segment ids were passed, else None.
    """

    kept_index: Tensor
    features: Tensor
    merge_target: Tensor
    segment_ids: Tensor | None = None


def num_merged_tokens(num_frames: int, tokens_per_frame: int, ratio: float) -> int:
    """Number of tokens :func:`merge_redundant_tokens` absorbs: ``min(⌊ratio·F·P⌋, (F-1)·P)``."""
    return min(floor_product(num_frames * tokens_per_frame, ratio), (num_frames - 1) * tokens_per_frame)


def merge_redundant_tokens(
    frames: Tensor,
    similarity: Tensor,
    ratio: float,
    *,
    frame_segment_ids: Tensor | None = None,
    num_merged: int | None = None,
) -> MergeResult:
    """Chain merging of the most redundant tokens (SPEC §2.1 step 5).

    The ``m = min(⌊ratio·F·P⌋, (F-1)·P)`` pairs with the highest similarity among frames ``>= 1`` are
    selected (ties broken by lower flat index: a stable descending sort). Along each position's frame
    chain, every maximal run of selected tokens is averaged into the unselected token just before it
    (the anchor): ``anchor ← mean(anchor, run)`` with equal weights. Frame-0 tokens are never selected,
    so every run has an anchor. Exactly ``m`` tokens are absorbed, so ``K = F·P - m`` is known from the
    shapes and nothing synchronises with the device.

    The anchor of each token comes from a cumulative max over "index of the last unselected frame"; the
    sum over a run comes from a float32 cumulative sum along the frame axis (deterministic, no atomics).

    Args:
        frames: ``[F, P, D]`` video tokens.
        similarity: ``[F, P]`` from :func:`adjacent_frame_similarity` (row 0 is ignored).
        ratio: ρ0 in ``[0, 1)``; 0 merges nothing.
        frame_segment_ids: optional ``[F]`` frame segment ids; kept tokens' ids are returned if given.
        num_merged: merge exactly this many tokens instead of ``m`` (the same top-by-similarity rule);
            must be in ``[0, (F-1)·P]``. Used by operators whose count depends on the data (e.g. only the
            pairs above a threshold, :func:`hieravid.ops.peers.framefusion`).

    Returns:
        A :class:`MergeResult`.
    """
    _check_frames(frames)
    if similarity.shape != frames.shape[:2]:
        raise ValueError(f"similarity must have shape {tuple(frames.shape[:2])}, got {tuple(similarity.shape)}")
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"merge ratio must be in [0, 1), got {ratio}")
    F, P, D = frames.shape
    N = F * P
    device = frames.device
    m = num_merged_tokens(F, P, ratio)
    if num_merged is not None:
        if not 0 <= num_merged <= (F - 1) * P:
            raise ValueError(f"num_merged must be in [0, {(F - 1) * P}] for {F} frames of {P} tokens, got {num_merged}")
        m = int(num_merged)
    flat = torch.arange(N, device=device)
    if m == 0:
        seg = None if frame_segment_ids is None else frame_segment_ids.repeat_interleave(P)
        return MergeResult(flat, frames.reshape(N, D), flat.clone(), seg)

    # Selection: stable descending sort of the (F-1)*P candidate pairs (frames >= 1).
    cand = similarity[1:].reshape(-1).float()
    cand = torch.nan_to_num(cand, nan=-2.0)
    order = torch.sort(cand, descending=True, stable=True).indices[:m]
    selected = torch.zeros(N, dtype=torch.bool, device=device).index_fill_(0, order + P, True)
    selected = selected.view(F, P)

    # Anchor frame of each token: last unselected frame at or before it (frame 0 is never selected).
    fidx = torch.arange(F, device=device).unsqueeze(1).expand(F, P)
    anchor_f = torch.cummax(torch.where(selected, torch.zeros_like(fidx), fidx), dim=0).values
    merge_target = (anchor_f * P + torch.arange(P, device=device)).reshape(N)

    # Last frame of each anchor's group: (next unselected frame after it) - 1.
    nxt = torch.where(selected, torch.full_like(fidx, F), fidx)  # unselected -> own index
    nxt_after = torch.full_like(fidx, F)
    nxt_after[:-1] = torch.flip(torch.cummin(torch.flip(nxt[1:], [0]), dim=0).values, [0])
    end_f = nxt_after - 1  # [F, P], meaningful for unselected tokens

    keep = ~selected.reshape(N)
    K = N - m
    kept_index = mask_to_indices(keep, K)
    kf = kept_index // P
    kp = kept_index % P
    kend = end_f.reshape(N)[kept_index]
    size = (kend - kf + 1).unsqueeze(1)  # tokens in the group, anchor included

    x = frames.reshape(N, D)
    x_kept = x[kept_index]
    csum = torch.cumsum(frames.float(), dim=0)  # [F, P, D]
    upper = csum[kend, kp]
    lower = torch.where((kf > 0).unsqueeze(1), csum[(kf - 1).clamp_min(0), kp], torch.zeros_like(upper))
    mean = (upper - lower) / size.float()
    features = torch.where(size > 1, mean.to(frames.dtype), x_kept)
    seg = None if frame_segment_ids is None else frame_segment_ids[kf]
    return MergeResult(kept_index, features, merge_target, seg)


@dataclass(frozen=True)
class SegmentLevelResult:
    """Output of :func:`segment_level`.

    Attributes:
        kept_index: ``[K]`` ascending flat indices ``f * P + p`` of the kept video tokens.
        features: ``[K, D]`` kept (merged) features, input dtype.
        merge_target: ``[F * P]`` flat index each token merged into (itself when kept).
        frame_segment_ids: ``[F]`` segment id of each frame.
        token_segment_ids: ``[K]`` segment id of each kept token.
        marginal_values: ``[G]`` z-scored segment marginal values.
        num_segments: ``G``.
        similarity: ``[F, P]`` adjacent-frame similarity (row 0 is the sentinel -1).
        redundancy: ``[F]`` per-frame redundancy.
    """

    kept_index: Tensor
    features: Tensor
    merge_target: Tensor
    frame_segment_ids: Tensor
    token_segment_ids: Tensor
    marginal_values: Tensor
    num_segments: int
    similarity: Tensor
    redundancy: Tensor


def segment_level(
    frames: Tensor,
    *,
    similarity_threshold: float = 0.6,
    segment_threshold: float = 0.4,
    merge_ratio: float = 0.5,
    marginal_value_weight: float = 0.5,
    merge: bool = True,
    graphs: GraphCache | None = None,
) -> SegmentLevelResult:
    """The whole segment level (SPEC §2.1) on one video.

    Similarity → redundancy (τ = ``similarity_threshold``) → segmentation (β = ``segment_threshold``) →
    marginal values (λ = ``marginal_value_weight``) → merging of the top ``merge_ratio`` fraction (skipped
    when ``merge`` is False or the ratio is 0). All shapes are static (they depend on ``F, P, D`` and the
    ratio only); a single host synchronisation at the end reads the number of segments.

    ``graphs`` (CUDA inputs only; ignored on other devices): a :class:`~hieravid.ops.GraphCache` through which
    the whole computation is captured once per input shape, dtype and parameter set and replayed afterwards
    (results identical to the eager path). It removes the per-operator launch cost (about 200 small kernels),
    which dominates at these sizes.

    Args:
        frames: ``[F, P, D]`` video tokens (LLM input embeddings, newline tokens excluded).

    Returns:
        A :class:`SegmentLevelResult`.
    """
    ratio = merge_ratio if merge else 0.0
    return unread_segment_level(
        frames, similarity_threshold, segment_threshold, ratio, marginal_value_weight, graphs=graphs
    ).resolve()


@dataclass(frozen=True)
class UnreadSegmentLevel:
    """The segment level before its one host read: the fields of :class:`SegmentLevelResult`, all final, except
    that the number of segments ``G`` is still on the device (:attr:`segment_count`) and ``marginal_values`` is
    padded to ``F`` entries (0 from entry ``G`` on).

    A caller that reads the device anyway (the runtime also reads the prompt's padding and each segment's token
    count) reads :attr:`segment_count` in the same transfer and calls :meth:`resolve` with it; :func:`segment_level`
    reads it alone.
    """

    kept_index: Tensor
    features: Tensor
    merge_target: Tensor
    frame_segment_ids: Tensor
    token_segment_ids: Tensor
    marginal_values: Tensor
    similarity: Tensor
    redundancy: Tensor

    @property
    def segment_count(self) -> Tensor:
        """``[1]`` int64 on the device: ``G``."""
        return self.frame_segment_ids[-1:] + 1

    def resolve(self, num_segments: int | None = None) -> SegmentLevelResult:
        """The :class:`SegmentLevelResult`, given ``G`` as read by the caller (None: read it here, the one sync)."""
        G = int(self.segment_count) if num_segments is None else int(num_segments)
        tensors = {field.name: getattr(self, field.name) for field in fields(self)}
        return SegmentLevelResult(**tensors | {"marginal_values": self.marginal_values[:G]}, num_segments=G)


def unread_segment_level(
    frames: Tensor,
    similarity_threshold: float,
    segment_threshold: float,
    merge_ratio: float,
    marginal_value_weight: float,
    *,
    graphs: GraphCache | None = None,
) -> UnreadSegmentLevel:
    """:func:`segment_level` (``merge_ratio`` 0: no merging) without its host read: the caller resolves the
    result, after reading :attr:`UnreadSegmentLevel.segment_count` with its own reads."""
    _check_frames(frames)
    params = (
        float(similarity_threshold),
        float(segment_threshold),
        float(merge_ratio),
        float(marginal_value_weight),
    )
    if graphs is not None and frames.is_cuda:
        key = ("segment_level", tuple(frames.shape), frames.dtype, str(frames.device), params)
        out = graphs.run(key, lambda video: _segment_level_padded(video, *params), (frames,))
    else:
        out = _segment_level_padded(frames, *params)
    return UnreadSegmentLevel(**out)


def _segment_level_padded(frames: Tensor, tau: float, beta: float, ratio: float, weight: float) -> dict[str, Tensor]:
    """Everything of the segment level with static shapes and no host sync (marginal values padded to F)."""
    sim = adjacent_frame_similarity(frames)
    red = frame_redundancy(sim, tau)
    frame_seg = segment_frames(red, beta)
    mv = _marginal_values_padded(frames.sum(dim=1, dtype=torch.float32), frame_seg, frames.shape[1], weight)
    merged = merge_redundant_tokens(frames, sim, ratio, frame_segment_ids=frame_seg)
    assert merged.segment_ids is not None
    return {
        "kept_index": merged.kept_index,
        "features": merged.features,
        "merge_target": merged.merge_target,
        "frame_segment_ids": frame_seg,
        "token_segment_ids": merged.segment_ids,
        "marginal_values": mv,
        "similarity": sim,
        "redundancy": red,
    }
