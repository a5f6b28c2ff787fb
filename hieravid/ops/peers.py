"""Input-level operators of peer methods (SPEC §4), registered next to HieraVid's segment level.

Each operator is a pure tensor function ``op(frames, *, prune_ratio, ...) -> SegmentLevelResult`` on one video
``frames: [F, P, D]`` (the LLM input embeddings of ``F`` frames of ``P`` tokens, newlines excluded; flat
token index ``f * P + p``). It returns the same result type as :func:`hieravid.ops.segment.segment_level`,
so the runtime runs any of them through :func:`input_level` without special cases: the bindings at the end of
this module run each config class (:mod:`hieravid.policy`) with its typed fields. Peers leave the video
one segment: ``frame_segment_ids`` and ``token_segment_ids`` are all 0, ``marginal_values`` is ``[0.]`` and
``num_segments`` is 1 (a later frame-level stage then works over the whole video, ``max_block`` bounding
the DPP's cost).

Conventions shared by the peers:

- ``kept_index`` is ascending; ``features`` are the kept tokens' input values (dropping operators) or
  their merged values (:func:`framefusion`).
- ``merge_target[i]`` is ``i`` for a kept token, the flat index of the kept token it was averaged into for a
  merged token, and :data:`DROPPED` (-1) for a token that was simply removed.
- ``similarity`` is the adjacent-frame same-position cosine of
  :func:`~hieravid.ops.segment.adjacent_frame_similarity` (row 0 = -1) for every operator, as a diagnostic;
  ``redundancy[f]`` is the fraction of frame ``f``'s tokens the operator removed (FrameFusion: the fraction
  above its threshold, as in the segment level).
- Counts: every operator removes exactly ``⌊prune_ratio·F·P⌋`` tokens (``floor`` with the same decimal
  guard as the rest of the operators) unless stated otherwise: EVS never removes frame 0 and DyCoke never
  removes a window's first frame, so they remove ``min(⌊ρ·F·P⌋, capacity)``, and FrameFusion removes *at
  most* ``min(⌊ρ·F·P⌋, (F-1)·P)`` (only pairs above its threshold). These counts are what
  :meth:`hieravid.policy.InputLevelConfig.removed_tokens` reports to the planner, so the plan's static
  estimate is exact (an upper bound on removals for FrameFusion).
- Deterministic: ties are broken by the lower flat index (stable sorts); :func:`random_input` draws from a
  seeded CPU generator, so a seed gives the same selection on every device.
- Vectorised for the GPU: no Python loop over tokens or frames; no host synchronisation except one in
  :func:`framefusion` (its count depends on the data).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch
from torch import Tensor

from hieravid.ops._graphs import GraphCache
from hieravid.ops._registry import OperatorRegistry
from hieravid.ops._util import NORM_EPS, floor_product, mask_to_indices
from hieravid.ops.segment import (
    SegmentLevelResult,
    _check_frames,
    adjacent_frame_similarity,
    frame_redundancy,
    merge_redundant_tokens,
    num_merged_tokens,
    segment_level,
)
from hieravid.policy import (
    DycokeInput,
    EvsInput,
    FrameFusionInput,
    InputLevelConfig,
    RandomInput,
    SegmentLevel,
    UniformInput,
    VidCom2Input,
)

__all__ = [
    "DROPPED",
    "INPUT_OPERATORS",
    "InputOperator",
    "dycoke",
    "evs",
    "framefusion",
    "input_level",
    "random_input",
    "register_input_operator",
    "uniform_input",
    "vidcom2",
]

#: ``merge_target`` value of a token that an operator removed without merging it anywhere.
DROPPED = -1


class InputOperator(Protocol):
    """Signature of a registered input-level operator: ``[F, P, D]`` frames and the level's config in, a
    :class:`~hieravid.ops.segment.SegmentLevelResult` out. ``graphs`` (a :class:`~hieravid.ops.GraphCache` owned
    by the caller) may be used to replay the operator's work from CUDA graphs; operators may ignore it."""

    def __call__(
        self, frames: Tensor, config: InputLevelConfig, /, *, graphs: GraphCache | None = None
    ) -> SegmentLevelResult: ...


#: Input-level operators by config class (:class:`~hieravid.policy.SegmentLevel` is HieraVid's own).
INPUT_OPERATORS: OperatorRegistry[InputOperator] = OperatorRegistry(
    "input-level operator", InputLevelConfig, "register_input_operator"
)


def register_input_operator(config_class: type[InputLevelConfig]) -> Callable[[InputOperator], InputOperator]:
    """Decorator binding an input-level config class to its operator (re-registering replaces)."""
    return INPUT_OPERATORS.register(config_class)


def input_level(config: InputLevelConfig, frames: Tensor, *, graphs: GraphCache | None = None) -> SegmentLevelResult:
    """Run the input-level operator bound to ``config``'s class on one video ``[F, P, D]``.

    Raises:
        UnregisteredOperatorError: no operator is bound to ``config``'s class.
    """
    return INPUT_OPERATORS.lookup(config)(frames, config, graphs=graphs)


# ---------------------------------------------------------------------------------------------- helpers
def _check_ratio(prune_ratio: float) -> None:
    if not 0.0 <= prune_ratio < 1.0:
        raise ValueError(f"prune_ratio must be in [0, 1), got {prune_ratio}")


def _cosine_rows(a: Tensor, b: Tensor) -> Tensor:
    """Row-wise cosine in float32 along the last dim (zero vectors give 0, never NaN), clamped to [-1, 1]."""
    a, b = a.float(), b.float()
    na = torch.linalg.vector_norm(a, dim=-1).clamp_min(NORM_EPS)
    nb = torch.linalg.vector_norm(b, dim=-1).clamp_min(NORM_EPS)
    return ((a * b).sum(-1) / (na * nb)).clamp(-1.0, 1.0)


def _rank_in_rows(scores: Tensor) -> Tensor:
    """``[F, P]`` rank of each entry in its row by descending score (0 = highest; ties → lower index)."""
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(scores.shape[1], device=scores.device).expand_as(order).contiguous())
    return rank


def _drop_result(frames: Tensor, keep: Tensor, kept: int, similarity: Tensor) -> SegmentLevelResult:
    """Result of an operator that removes tokens without merging: ``keep`` is the ``[F, P]`` kept mask
    holding ``kept`` True entries (known on the host, so nothing synchronises)."""
    F, P, D = frames.shape
    device = frames.device
    flat_keep = keep.reshape(F * P)
    kept_index = mask_to_indices(flat_keep, kept)
    flat = torch.arange(F * P, device=device)
    return SegmentLevelResult(
        kept_index=kept_index,
        features=frames.reshape(F * P, D)[kept_index],
        merge_target=torch.where(flat_keep, flat, torch.full_like(flat, DROPPED)),
        frame_segment_ids=torch.zeros(F, dtype=torch.int64, device=device),
        token_segment_ids=torch.zeros(kept, dtype=torch.int64, device=device),
        marginal_values=torch.zeros(1, dtype=torch.float32, device=device),
        num_segments=1,
        similarity=similarity,
        redundancy=1.0 - keep.float().mean(dim=1),
    )


def _keep_top_per_frame(scores: Tensor, budgets: Tensor) -> Tensor:
    """``[F, P]`` mask keeping, in each frame ``f``, the ``budgets[f]`` highest scores (ties → lower index)."""
    return _rank_in_rows(scores) < budgets.unsqueeze(1)


def _allocate(weights: Tensor, total: int, cap: int) -> Tensor:
    """Integer budgets ``k_f ∈ [0, cap]`` summing exactly to ``total`` (``0 <= total <= F·cap``), proportional
    to positive ``weights`` with the excess of capped frames redistributed (water filling), then rounded by
    largest remainders (ties → lower frame index). Vectorised over frames, no host sync."""
    F = weights.shape[0]
    device = weights.device
    w = weights.double().clamp_min(1e-12)
    w_sorted, order = torch.sort(w, descending=True, stable=True)
    # Capping the j largest weights leaves λ_j = (total − j·cap) / Σ_{i≥j} w_(i) for the others; the solution
    # caps the smallest j whose next weight is not over the cap: λ_j·w_(j) ≤ cap (j = F: everything capped).
    j = torch.arange(F + 1, device=device)
    tail = torch.cat([torch.flip(torch.cumsum(torch.flip(w_sorted, [0]), 0), [0]), w_sorted.new_zeros(1)])
    lam = (total - j * cap).double() / tail.clamp_min(1e-300)
    next_w = torch.cat([w_sorted, w_sorted.new_zeros(1)])
    fits = lam * next_w <= cap * (1.0 + 1e-12)
    first = torch.argmax(fits.to(torch.int8))  # first True (j = F always fits)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(F, device=device)
    ideal = torch.where(rank < first, torch.full_like(w, float(cap)), (lam[first] * w).clamp(0.0, float(cap)))
    base = torch.floor(ideal).to(torch.int64).clamp(0, cap)
    remainder = total - base.sum()
    frac = torch.where(base < cap, ideal - base.double(), torch.full_like(ideal, -1.0))
    by_frac = torch.sort(frac, descending=True, stable=True).indices
    extra = torch.zeros(F, dtype=torch.int64, device=device)
    extra[by_frac] = (torch.arange(F, device=device) < remainder).to(torch.int64)
    return base + extra


# ---------------------------------------------------------------------------------------------- operators
def evs(frames: Tensor, *, prune_ratio: float = 0.5) -> SegmentLevelResult:
    """EVS: drop the tokens least different from the previous frame's same-position token.

    Paper: *Efficient Video Sampling: Pruning Temporally Redundant Tokens for Faster VLM Inference*
    (NVIDIA, 2025), as shipped in vLLM (``vllm/multimodal/evs.py``, ``compute_retention_mask``).

    Intuition: in a video most of a frame repeats the previous one (static background, slow motion). A
    token whose embedding barely changed since the previous frame at the same position tells the model
    nothing new, so EVS ranks every token of frames ``>= 1`` by its dissimilarity ``1 - cos(x[f,p],
    x[f-1,p])`` and drops the least dissimilar ones over the whole video (not per frame), so static
    stretches lose many tokens and changing ones keep theirs. Frame 0 has no predecessor and is always
    kept, which anchors the video.

    Removes exactly ``min(⌊ρ·F·P⌋, (F-1)·P)`` tokens (vLLM rounds the kept count down instead, which may
    remove one token more); ties → the lower flat index is dropped first.

    Args:
        frames: ``[F, P, D]`` video tokens.
        prune_ratio: ``q``, the fraction of the video's tokens removed, in ``[0, 1)``.
    """
    _check_frames(frames)
    _check_ratio(prune_ratio)
    F, P, _ = frames.shape
    N = F * P
    m = min(floor_product(N, prune_ratio), (F - 1) * P)
    sim = adjacent_frame_similarity(frames)
    drop = torch.sort(sim[1:].reshape(-1), descending=True, stable=True).indices[:m] + P
    keep = torch.ones(N, dtype=torch.bool, device=frames.device).index_fill_(0, drop, False).view(F, P)
    return _drop_result(frames, keep, N - m, sim)


def dycoke(frames: Tensor, *, prune_ratio: float = 0.5, window: int = 4) -> SegmentLevelResult:
    """DyCoke's temporal token merging (TTM), its pre-LLM stage: prune tokens repeated within a window.

    Paper: Tao et al., *DyCoke: Dynamic Compression of Tokens for Fast Video Large Language Models*,
    CVPR 2025 (arXiv 2411.15024). Its second stage (dynamic KV-cache pruning during decoding) is not
    reproduced here.

    Intuition: frames are cut into windows of ``window`` consecutive frames; the window's first frame is an
    anchor kept whole, and every other frame is compared position by position with a nearby reference
    frame of the same window — odd offsets with the frame just before, even offsets with the window's first
    frame (DyCoke's pairwise-then-anchor comparison; for the default window of 4: 1→0, 2→0, 3→2). In each
    compared frame the tokens most similar to their reference are dropped: they repeat content the
    reference already shows. Every compared frame loses the same number of tokens (± 1), as in DyCoke,
    rather than ranking the whole video at once.

    Removes exactly ``min(⌊ρ·F·P⌋, C·P)`` tokens, ``C = F − ⌈F/window⌉`` the compared frames (for windows of
    4, ``ρ <= 0.75`` is exact); the extra one of uneven counts goes to the earlier frames; ties → lower index.

    Args:
        frames: ``[F, P, D]`` video tokens.
        prune_ratio: fraction of the video's tokens removed, in ``[0, 1)``.
        window: frames per window, ``>= 2``.
    """
    _check_frames(frames)
    _check_ratio(prune_ratio)
    if window < 2:
        raise ValueError(f"window must be >= 2, got {window}")
    F, P, _ = frames.shape
    N = F * P
    device = frames.device
    fidx = torch.arange(F, device=device)
    offset = fidx % window
    compared = offset > 0
    reference = torch.where(offset % 2 == 1, fidx - 1, fidx - offset)
    num_compared = F - (F + window - 1) // window
    m = min(floor_product(N, prune_ratio), num_compared * P)
    # The c-th compared frame (in frame order) drops ⌊m/C⌋ tokens, one more when c < m mod C.
    c = torch.cumsum(compared.to(torch.int64), 0) - 1
    per_frame = m // max(num_compared, 1) + (c < m % max(num_compared, 1)).to(torch.int64)
    drops = torch.where(compared, per_frame, torch.zeros_like(per_frame))
    sim_ref = _cosine_rows(frames, frames[reference])  # [F, P]; anchors compare with themselves (unused)
    keep = ~_keep_top_per_frame(sim_ref, drops)
    return _drop_result(frames, keep, N - m, adjacent_frame_similarity(frames))


def vidcom2(frames: Tensor, *, prune_ratio: float = 0.5, temperature: float = 0.01) -> SegmentLevelResult:
    """VidCom2: per-frame budgets by frame uniqueness, then each frame's most distinctive tokens.

    Paper: Liu et al., *Video Compression Commander: Plug-and-Play Inference Acceleration for Video Large
    Language Models*, EMNLP 2025 (arXiv 2505.14454).

    Intuition: frames that look like the rest of the video can be compressed harder than frames that
    show something new. A frame's uniqueness is ``u_f = −cos(g_f, ḡ)`` (``g_f`` its mean token, ``ḡ`` the
    video's mean), turned into ``σ = softmax(u / temperature)``; frame ``f`` keeps a share of the video's
    budget ``K = F·P − ⌊ρ·F·P⌋`` proportional to ``1 + σ_f − 1/F`` (the mean share is unchanged and the most
    unique frames get more), capped at ``P`` with the excess handed to the other frames and rounded by
    largest remainders so the shares sum to ``K`` exactly. Inside a frame, a token is worth keeping when it
    differs both from its own frame and from the whole video: the frame keeps its ``k_f`` tokens with the
    highest ``−(cos(x, g_f) + cos(x, ḡ))``. (The exact form of the budget adjustment is our reading of the
    paper; the per-frame/per-token criteria are the paper's.)

    Removes exactly ``⌊ρ·F·P⌋`` tokens; ties → lower index.

    Args:
        frames: ``[F, P, D]`` video tokens.
        prune_ratio: fraction of the video's tokens removed, in ``[0, 1)``.
        temperature: softmax temperature of the frame-uniqueness weights, ``> 0``.
    """
    _check_frames(frames)
    _check_ratio(prune_ratio)
    if not temperature > 0.0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    F, P, _ = frames.shape
    N = F * P
    kept = N - floor_product(N, prune_ratio)
    x = frames.float()
    frame_mean = x.mean(dim=1)  # [F, D]
    video_mean = frame_mean.mean(dim=0)  # [D]
    uniqueness = -_cosine_rows(frame_mean, video_mean.expand_as(frame_mean))
    sigma = torch.softmax(uniqueness.double() / temperature, dim=0)
    budgets = _allocate(1.0 + sigma - 1.0 / F, kept, P)
    token_score = -(_cosine_rows(x, frame_mean.unsqueeze(1)) + _cosine_rows(x, video_mean))
    keep = _keep_top_per_frame(token_score, budgets)
    return _drop_result(frames, keep, kept, adjacent_frame_similarity(frames))


def framefusion(frames: Tensor, *, prune_ratio: float = 0.5, similarity_threshold: float = 0.6) -> SegmentLevelResult:
    """FrameFusion's merging: fold tokens that repeat the previous frame into it, above a threshold.

    Paper: Fu et al., *FrameFusion: Combining Similarity and Importance for Video Token Reduction on Large
    Visual Language Models*, ICCV 2025 (arXiv 2501.01986). Its importance-based pruning is a separate
    attention top-k stage in the policy (``policies/peers/framefusion.yaml``).

    Intuition: a token nearly equal to the same-position token of the previous frame is a duplicate;
    instead of deleting it, FrameFusion averages it into that earlier token, so the survivor carries the
    information of the whole repeated run. Only pairs whose similarity exceeds ``similarity_threshold``
    qualify, and at most ``⌊ρ·F·P⌋`` of them (the most similar first), so a video with little redundancy
    loses fewer tokens than the budget. The averaging along each position's chain of frames is HieraVid's
    merge machinery (:func:`~hieravid.ops.segment.merge_redundant_tokens`), used with a data-dependent count.

    Removes ``min(⌊ρ·F·P⌋, (F-1)·P, #{pairs with similarity > threshold})`` tokens — an upper bound of
    ``min(⌊ρ·F·P⌋, (F-1)·P)`` is what the planner assumes. One host sync reads the data-dependent count.

    Args:
        frames: ``[F, P, D]`` video tokens.
        prune_ratio: at most this fraction of the video's tokens is merged, in ``[0, 1)``.
        similarity_threshold: strict cosine threshold for a token to be merged into its predecessor.
    """
    _check_frames(frames)
    _check_ratio(prune_ratio)
    F, P, _ = frames.shape
    sim = adjacent_frame_similarity(frames)
    above = int((sim[1:] > similarity_threshold).sum())  # the one host sync
    count = min(num_merged_tokens(F, P, prune_ratio), above)
    merged = merge_redundant_tokens(frames, sim, prune_ratio, num_merged=count)
    device = frames.device
    return SegmentLevelResult(
        kept_index=merged.kept_index,
        features=merged.features,
        merge_target=merged.merge_target,
        frame_segment_ids=torch.zeros(F, dtype=torch.int64, device=device),
        token_segment_ids=torch.zeros(merged.kept_index.shape[0], dtype=torch.int64, device=device),
        marginal_values=torch.zeros(1, dtype=torch.float32, device=device),
        num_segments=1,
        similarity=sim,
        redundancy=frame_redundancy(sim, similarity_threshold),
    )


def uniform_input(frames: Tensor, *, prune_ratio: float = 0.5) -> SegmentLevelResult:
    """Uniform baseline: keep evenly spaced tokens of every frame.

    The baseline every token-pruning ablation table reports (e.g. "uniform" rows in FastVID and VidCom2).

    Intuition: spend the budget identically everywhere, without looking at the content; whatever a
    content-aware method adds must beat this. The kept count ``K = F·P − ⌊ρ·F·P⌋`` is spread over frames as
    evenly as integers allow (``k_f = ⌊(f+1)K/F⌋ − ⌊fK/F⌋``), and frame ``f`` keeps raster positions
    ``⌊(2i+1)·P / (2k_f)⌋`` for ``i < k_f`` (the centres of ``k_f`` equal bins).

    Removes exactly ``⌊ρ·F·P⌋`` tokens.
    """
    _check_frames(frames)
    _check_ratio(prune_ratio)
    F, P, _ = frames.shape
    N = F * P
    kept = N - floor_product(N, prune_ratio)
    device = frames.device
    fidx = torch.arange(F + 1, device=device)
    cumulative = fidx * kept // F
    budgets = cumulative[1:] - cumulative[:-1]  # [F], each ⌊K/F⌋ or ⌈K/F⌉ (<= P)
    i = torch.arange(P, device=device).unsqueeze(0)
    k = budgets.unsqueeze(1)
    centre = torch.div((2 * i + 1) * P, 2 * k.clamp_min(1), rounding_mode="floor")
    target = torch.where(i < k, centre, torch.full_like(centre, P))  # column P: discarded
    keep = torch.zeros(F, P + 1, dtype=torch.bool, device=device).scatter_(1, target, True)[:, :P]
    return _drop_result(frames, keep.contiguous(), kept, adjacent_frame_similarity(frames))


def random_input(frames: Tensor, *, prune_ratio: float = 0.5, seed: int = 0) -> SegmentLevelResult:
    """Random baseline: keep a uniformly random subset of the video's tokens (seeded).

    The other baseline of every ablation table: a content-agnostic selection without the regular spacing
    of :func:`uniform_input`. Intuition: if a method does not beat a random subset of the same size, its
    scores carry no information.

    Draws one key per token from a CPU ``torch.Generator`` seeded with ``seed`` (so a seed and a shape give
    the same selection on every device) and keeps the ``K = F·P − ⌊ρ·F·P⌋`` largest keys over the whole
    video. Removes exactly ``⌊ρ·F·P⌋`` tokens.
    """
    _check_frames(frames)
    _check_ratio(prune_ratio)
    F, P, _ = frames.shape
    N = F * P
    kept = N - floor_product(N, prune_ratio)
    keys = torch.rand(N, generator=torch.Generator().manual_seed(int(seed)))
    chosen = torch.sort(keys, descending=True, stable=True).indices[:kept].to(frames.device)
    keep = torch.zeros(N, dtype=torch.bool, device=frames.device).index_fill_(0, chosen, True).view(F, P)
    return _drop_result(frames, keep, kept, adjacent_frame_similarity(frames))


# ---------------------------------------------------------------------------------------------- bindings
# Each config class runs its pure operator with its typed fields.
@register_input_operator(SegmentLevel)
def _run_segment_level(
    frames: Tensor, config: InputLevelConfig, /, *, graphs: GraphCache | None = None
) -> SegmentLevelResult:
    assert isinstance(config, SegmentLevel)
    return segment_level(
        frames,
        similarity_threshold=config.similarity_threshold,
        segment_threshold=config.segment_threshold,
        merge_ratio=config.merge_ratio,
        marginal_value_weight=config.marginal_value_weight,
        graphs=graphs,
    )


@register_input_operator(EvsInput)
def _run_evs(frames: Tensor, config: InputLevelConfig, /, *, graphs: GraphCache | None = None) -> SegmentLevelResult:
    assert isinstance(config, EvsInput)
    return evs(frames, prune_ratio=config.prune_ratio)


@register_input_operator(DycokeInput)
def _run_dycoke(frames: Tensor, config: InputLevelConfig, /, *, graphs: GraphCache | None = None) -> SegmentLevelResult:
    assert isinstance(config, DycokeInput)
    return dycoke(frames, prune_ratio=config.prune_ratio, window=config.window)


@register_input_operator(VidCom2Input)
def _run_vidcom2(
    frames: Tensor, config: InputLevelConfig, /, *, graphs: GraphCache | None = None
) -> SegmentLevelResult:
    assert isinstance(config, VidCom2Input)
    return vidcom2(frames, prune_ratio=config.prune_ratio, temperature=config.temperature)


@register_input_operator(FrameFusionInput)
def _run_framefusion(
    frames: Tensor, config: InputLevelConfig, /, *, graphs: GraphCache | None = None
) -> SegmentLevelResult:
    assert isinstance(config, FrameFusionInput)
    return framefusion(frames, prune_ratio=config.prune_ratio, similarity_threshold=config.similarity_threshold)


@register_input_operator(UniformInput)
def _run_uniform(
    frames: Tensor, config: InputLevelConfig, /, *, graphs: GraphCache | None = None
) -> SegmentLevelResult:
    assert isinstance(config, UniformInput)
    return uniform_input(frames, prune_ratio=config.prune_ratio)


@register_input_operator(RandomInput)
def _run_random(frames: Tensor, config: InputLevelConfig, /, *, graphs: GraphCache | None = None) -> SegmentLevelResult:
    assert isinstance(config, RandomInput)
    return random_input(frames, prune_ratio=config.prune_ratio, seed=config.seed)
