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
- Counts: every operator but FrameFusion removes a number of tokens fixed by the shapes and its options,
  so the output size is static. EVS, uniform and random remove ``⌊prune_ratio·F·P⌋`` (``floor`` with the
  same decimal guard as the rest of the operators), EVS at most ``(F-1)·P`` (frame 0 is kept); VidCom2
  keeps its authors' ``R = max(F, min(⌊F·P·(1 − q)⌋, F·P))``; DyCoke's ``prune_ratio`` is a *per-frame*
  ratio ``k`` and it removes ``P − ⌊(1 − k)·P⌋`` tokens from each frame it prunes; FrameFusion removes *at
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
    UnreadSegmentLevel,
    _check_frames,
    adjacent_frame_similarity,
    frame_redundancy,
    merge_redundant_tokens,
    num_merged_tokens,
    unread_segment_level,
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
    "input_level_unread",
    "random_input",
    "register_input_operator",
    "uniform_input",
    "vidcom2",
]

#: ``merge_target`` value of a token that an operator removed without merging it anywhere.
DROPPED = -1


class InputOperator(Protocol):
    """Signature of a registered input-level operator: ``[F, P, D]`` frames and the level's config in, a
    :class:`~hieravid.ops.segment.SegmentLevelResult` out — or an
    :class:`~hieravid.ops.segment.UnreadSegmentLevel` when the number of segments is still on the device, so
    that the runtime reads it with its other reads. ``graphs`` (a :class:`~hieravid.ops.GraphCache` owned by the
    caller) may be used to replay the operator's work from CUDA graphs; operators may ignore it."""

    def __call__(
        self, frames: Tensor, config: InputLevelConfig, /, *, graphs: GraphCache | None = None
    ) -> SegmentLevelResult | UnreadSegmentLevel: ...


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
    result = input_level_unread(config, frames, graphs=graphs)
    return result.resolve() if isinstance(result, UnreadSegmentLevel) else result


def input_level_unread(
    config: InputLevelConfig, frames: Tensor, *, graphs: GraphCache | None = None
) -> SegmentLevelResult | UnreadSegmentLevel:
    """:func:`input_level` as the operator returned it: an operator whose segment count is still on the device
    returns an :class:`~hieravid.ops.segment.UnreadSegmentLevel` that the caller resolves.

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


def dycoke(frames: Tensor, *, prune_ratio: float = 0.7, odd_last_frame: str = "keep") -> SegmentLevelResult:
    """DyCoke's temporal token merging (TTM), its pre-LLM stage, as the authors' code does it.

    Paper: Tao et al., *DyCoke: Dynamic Compression of Tokens for Fast Video Large Language Models*,
    CVPR 2025 (arXiv 2411.15024), and the TTM function of the authors' released code. Its second stage
    (dynamic KV-cache pruning during decoding) is not reproduced here.

    Intuition: consecutive frames repeat most of their content at the same positions, so a frame can be
    reduced to what differs from a nearby frame that is kept. With ``k = prune_ratio`` and ``P`` tokens per
    frame, every pruned frame keeps exactly ``K = ⌊(1 − k)·P⌋`` tokens, its positions *least* similar
    (cosine) to the same positions of its reference frame:

    1. Pairs ``(0, 1), (2, 3), …``: the first frame of a pair is kept whole; the second is pruned against it.
    2. Windows of 4: for every ``i = 0, 4, 8, …`` strictly below ``F − 4``, frame ``i + 2`` (kept whole by
       step 1) is pruned against frame ``i``, which stays whole. The last window's third frame is therefore
       never pruned. Both steps compare the *input* features (frame ``i + 3`` is pruned against the whole
       frame ``i + 2`` even when ``i + 2`` is pruned itself), as the authors' code does.
    3. With an odd frame count the last frame has no partner: the authors' code drops it entirely
       (``odd_last_frame="drop"``); by default it is kept whole (``"keep"``): with the even frame counts
       usually evaluated (32, 64) the case never arises, and losing a frame's content is unlikely to be
       intended. A single frame is always kept whole.

    The authors' code fails for ``F <= 4`` (it stacks an empty list of step-2 similarities; for ``F = 1``
    also of step-1 ones); here those videos simply have no step-2 windows (and ``F = 1`` no pair).

    Removes exactly ``(⌊F/2⌋ + ⌊(F−1)/4⌋)·(P − K)`` tokens, plus ``P`` when the odd last frame is dropped
    (:meth:`hieravid.policy.DycokeInput.removed_tokens`). ``K`` is floored with the library's decimal guard
    (``k = 0.9, P = 10`` keeps 1 token; the authors' ``int((1 - k) * P)`` of the float product gives 0 there).
    Ties → the lower position is kept (the authors' code fixes no order on exact ties). Not reproduced: the
    authors emit a pruned frame's tokens in ascending-similarity order (and their LLaVA code gives the
    shortened sequence consecutive positions). A :class:`~hieravid.ops.segment.SegmentLevelResult` carries an
    ascending ``kept_index`` from which the runtime builds a keep mask, so kept rows stay in raster order with
    their original position ids; another order would need the runtime to permute rows and positions.

    Args:
        frames: ``[F, P, D]`` video tokens.
        prune_ratio: ``k``, the fraction of each *pruned frame's* tokens removed, in ``[0, 1)`` (DyCoke's
            default 0.7) — not a fraction of the whole video.
        odd_last_frame: ``"keep"`` (default) or ``"drop"`` (the authors' code) for the last frame of an odd
            frame count.
    """
    _check_frames(frames)
    _check_ratio(prune_ratio)
    if odd_last_frame not in ("keep", "drop"):
        raise ValueError(f"odd_last_frame must be 'keep' or 'drop', got {odd_last_frame!r}")
    F, P, _ = frames.shape
    device = frames.device
    keep_per_frame = floor_product(P, 1.0 - prune_ratio)
    drop_last = odd_last_frame == "drop" and F % 2 == 1 and F >= 3
    fidx = torch.arange(F, device=device)
    paired = fidx % 2 == 1  # the second frame of each pair (an odd index always has its partner)
    windowed = (fidx % 4 == 2) & (fidx < F - 2)  # frame i + 2 of each window start i < F − 4
    reference = torch.where(windowed, fidx - 2, fidx - 1).clamp_min(0)
    pruned = paired | windowed
    whole = fidx != F - 1 if drop_last else torch.ones_like(pruned)
    sim_ref = _cosine_rows(frames, frames.index_select(0, reference))  # [F, P]; unpruned rows unused
    least_similar = _rank_in_rows(-sim_ref) < keep_per_frame  # ascending similarity, ties → lower index
    keep = torch.where(pruned.unsqueeze(1), least_similar, whole.unsqueeze(1))
    num_pruned = F // 2 + (F - 1) // 4
    kept = F * P - num_pruned * (P - keep_per_frame) - (P if drop_last else 0)
    return _drop_result(frames, keep, kept, adjacent_frame_similarity(frames))


#: Bandwidths ``a`` of VidCom2's multi-scale Gaussian similarity ``Σ_a exp(−‖x − c‖² / (2a))``.
_VIDCOM2_BANDWIDTHS = (0.125, 0.25, 0.5, 1.0, 2.0)

#: ``scale·P`` values this close to a half are taken as the half before rounding (half to even), so that the
#: budgets do not depend on float noise (``(1 − 0.75)·6`` is exactly 1.5 → 2).
_HALF_GUARD = 1e-9


def _gaussian_similarity(x: Tensor, centre: Tensor) -> Tensor:
    """VidCom2's ``s(x, c) = Σ_{a ∈ {1/8, 1/4, 1/2, 1, 2}} exp(−‖x − c‖² / (2a))`` over the last dim."""
    d2 = (x - centre).square().sum(dim=-1)
    return sum(torch.exp(-d2 / (2.0 * a)) for a in _VIDCOM2_BANDWIDTHS)


def _vidcom2_kept_count(frames: int, tokens_per_frame: int, prune_ratio: float) -> int:
    """``R = max(F, min(⌊N·(1 − q)⌋, N))``: the tokens :func:`vidcom2` keeps (``N = F·P``; floor with the
    library's decimal guard)."""
    N = frames * tokens_per_frame
    return max(frames, min(floor_product(N, 1.0 - prune_ratio), N))


def vidcom2(frames: Tensor, *, prune_ratio: float = 0.5, temperature: float = 0.01) -> SegmentLevelResult:
    """VidCom2's video compression, as the authors' code does it.

    Paper: Liu et al., *Video Compression Commander: Plug-and-Play Inference Acceleration for Video Large
    Language Models*, EMNLP 2025 (arXiv 2505.14454), and the compression step of the authors' released code
    (on the projected frame features).

    Intuition: a token is redundant when it looks like its own frame's average and like the whole video's
    average; a frame is worth more budget when its tokens, on average, do not look like the video. With
    ``q = prune_ratio``, ``T`` frames of ``P`` tokens and ``N = T·P``:

    1. Target ``R = max(T, min(⌊N(1 − q)⌋, N))`` kept tokens.
    2. Channels: keep the ``max(1, ⌊D/2⌋)`` channels of *lowest* population variance over all the video's
       tokens (ties → lower channel index).
    3. L2-normalise every token on those channels (zero vectors stay zero, never NaN). The video centre is the
       mean of all tokens, a frame's centre the mean of its ``P`` tokens.
    4. Redundancy of a token ``x``: ``s(x, video centre) + s(x, its frame centre)`` with the multi-scale
       Gaussian ``s(x, c) = Σ_{a ∈ {1/8, 1/4, 1/2, 1, 2}} exp(−‖x − c‖² / (2a))``.
    5. Frame budgets: frame score ``−mean_p s(x, video centre)``, ``p = softmax((score − max) / temperature)``,
       ``scale_t = min(1, (1 − q)·(1 + p_t − mean(p)))``, ``k_t = round(scale_t·P)`` clamped to ``[1, P]``.
       ``round`` is round-half-to-even (Python's ``round`` and ``torch.round``), applied to ``scale_t·P``
       computed in float64, with values within 1e-9 of a half taken as that half.
    6. Each frame keeps its ``k_t`` tokens of lowest redundancy.
    7. Exact total: if more than ``R`` tokens are kept, the kept tokens of highest redundancy are dropped
       (globally, so a frame can end with 0 tokens); if fewer, the unkept tokens of lowest redundancy are
       added (globally).

    Ties → the lower flat index ``t·P + p`` is preferred (kept first, dropped last) in steps 6 and 7. Token
    similarities are computed in float32, the budgets (step 5) in float64. Everything has static shapes
    (``R`` is known from the shapes), so nothing waits for the device.

    Removes exactly ``N − R`` tokens (:meth:`hieravid.policy.VidCom2Input.removed_tokens`).

    Args:
        frames: ``[F, P, D]`` video tokens.
        prune_ratio: ``q``, the fraction of the video's tokens removed, in ``[0, 1)``.
        temperature: softmax temperature of the frame budgets, ``> 0`` (the authors' 0.01).
    """
    _check_frames(frames)
    _check_ratio(prune_ratio)
    if not temperature > 0.0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    F, P, D = frames.shape
    N = F * P
    kept = _vidcom2_kept_count(F, P, prune_ratio)
    x = frames.float()
    # 2. the half of the channels with the lowest variance over the video's tokens.
    variance = x.reshape(N, D).var(dim=0, unbiased=False)
    channels = torch.sort(variance, stable=True).indices[: max(1, D // 2)]
    x = x.index_select(-1, channels)
    # 3. unit tokens, video and frame centres.
    x = x / torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp_min(NORM_EPS)
    frame_centre = x.mean(dim=1, keepdim=True)  # [F, 1, D']
    video_centre = x.reshape(N, -1).mean(dim=0)  # [D']
    # 4. redundancy.
    to_video = _gaussian_similarity(x, video_centre)  # [F, P]
    redundancy = to_video + _gaussian_similarity(x, frame_centre)
    # 5. frame budgets (float64: F values).
    score = -to_video.mean(dim=1).double()
    p = torch.softmax((score - score.max()) / temperature, dim=0)
    scale = ((1.0 - prune_ratio) * (1.0 + p - p.mean())).clamp_max(1.0)
    y = scale * P
    half = torch.floor(y) + 0.5
    y = torch.where((y - half).abs() < _HALF_GUARD, half, y)
    budgets = torch.round(y).clamp(1, P).to(torch.int64)
    # 6. the k_t least redundant tokens of each frame.
    keep = (_rank_in_rows(-redundancy) < budgets.unsqueeze(1)).reshape(N)
    # 7. exact total, in the global order of ascending redundancy (ties → lower flat index first).
    order = torch.sort(redundancy.reshape(N), stable=True).indices
    keep_sorted = keep[order]
    total = keep_sorted.sum()
    excess = (total - kept).clamp_min(0)
    shortfall = (kept - total).clamp_min(0)
    kept_from_end = torch.flip(torch.cumsum(torch.flip(keep_sorted, [0]).to(torch.int64), 0), [0])
    unkept_from_start = torch.cumsum((~keep_sorted).to(torch.int64), 0)
    final_sorted = (keep_sorted & (kept_from_end > excess)) | (~keep_sorted & (unkept_from_start <= shortfall))
    final = torch.zeros_like(keep).scatter_(0, order, final_sorted)
    return _drop_result(frames, final.view(F, P), kept, adjacent_frame_similarity(frames))


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
) -> UnreadSegmentLevel:
    assert isinstance(config, SegmentLevel)
    return unread_segment_level(
        frames,
        config.similarity_threshold,
        config.segment_threshold,
        config.merge_ratio,
        config.marginal_value_weight,
        graphs=graphs,
    )


@register_input_operator(EvsInput)
def _run_evs(frames: Tensor, config: InputLevelConfig, /, *, graphs: GraphCache | None = None) -> SegmentLevelResult:
    assert isinstance(config, EvsInput)
    return evs(frames, prune_ratio=config.prune_ratio)


@register_input_operator(DycokeInput)
def _run_dycoke(frames: Tensor, config: InputLevelConfig, /, *, graphs: GraphCache | None = None) -> SegmentLevelResult:
    assert isinstance(config, DycokeInput)
    return dycoke(frames, prune_ratio=config.prune_ratio, odd_last_frame=config.odd_last_frame)


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
