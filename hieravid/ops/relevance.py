"""Frame-level relevance (SPEC §2.2 step 1): last-query attention rows and their min–max normalisation."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

__all__ = ["RelevanceSign", "last_query_attention", "normalize_relevance"]

RelevanceSign = Literal["negative", "positive"]

_MIN_RANGE = 1e-12


def last_query_attention(
    query: Tensor,
    key: Tensor,
    *,
    scaling: float,
    key_padding_mask: Tensor | None = None,
) -> Tensor:
    """Softmax attention probabilities of the last ``q`` query rows over all keys, averaged.

    Query row ``i`` (of ``q``) sits at absolute position ``S - q + i`` and is causal: it attends to keys
    ``0 .. S - q + i``. Grouped-query attention is supported without copying the keys: query head ``h``
    uses key head ``h // (Hq // Hkv)`` (the layout of transformers' ``repeat_kv``). Scores and softmax are
    float32. The result is the mean over heads and query rows. Cost O(q·S·d·Hq).

    Args:
        query: ``[B, Hq, q, d]`` queries of the last ``q`` positions (after RoPE).
        key: ``[B, Hkv, S, d]`` keys of all positions (after RoPE); ``Hq`` must be a multiple of ``Hkv``.
        scaling: score scale (usually ``d ** -0.5``).
        key_padding_mask: optional ``[B, S]`` bool, True for real tokens; padded keys get probability 0.
            A query row that can see no key contributes zeros (never NaN).

    Returns:
        ``[B, S]`` float32 attention probabilities (each row sums to 1 when every query row sees a key).
    """
    if query.dim() != 4 or key.dim() != 4:
        raise ValueError(f"query and key must be 4-D, got {tuple(query.shape)} and {tuple(key.shape)}")
    B, Hq, q, d = query.shape
    Bk, Hkv, S, dk = key.shape
    if Bk != B or dk != d:
        raise ValueError(f"query {tuple(query.shape)} and key {tuple(key.shape)} disagree on batch or head dim")
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(f"query heads ({Hq}) must be a multiple of key heads ({Hkv})")
    if q > S:
        raise ValueError(f"more query rows ({q}) than keys ({S})")
    groups = Hq // Hkv
    qf = query.float().reshape(B, Hkv, groups * q, d)
    scores = torch.matmul(qf, key.float().transpose(-1, -2)) * scaling  # [B, Hkv, groups*q, S]
    scores = scores.view(B, Hkv, groups, q, S)
    kpos = torch.arange(S, device=query.device)
    qpos = torch.arange(S - q, S, device=query.device)
    allowed = (kpos.unsqueeze(0) <= qpos.unsqueeze(1)).view(1, 1, 1, q, S)
    if key_padding_mask is not None:
        if key_padding_mask.shape != (B, S):
            raise ValueError(f"key_padding_mask must have shape {(B, S)}, got {tuple(key_padding_mask.shape)}")
        allowed = allowed & key_padding_mask.to(torch.bool).view(B, 1, 1, 1, S)
    scores = scores.masked_fill(~allowed, torch.finfo(torch.float32).min)
    probs = torch.softmax(scores, dim=-1) * allowed
    return probs.mean(dim=(1, 2, 3))


def normalize_relevance(attention: Tensor, sign: RelevanceSign = "negative") -> Tensor:
    """Min–max normalisation of attention into a relevance (quality) score, along the last dimension.

    ``negative`` (the HieraVid authors' choice, default): ``v = -a``; ``positive`` (ablation): ``v = a``.
    Then ``r = (v - min(v) + 1e-6) / (max(v) - min(v))``. When ``max(v) - min(v) <= 1e-12`` (constant
    input, a single token, or a range so small that ``r`` would be dominated by the ``1e-6`` offset and its
    square could overflow float32 in the DPP kernel) every entry is set to 1.0 (all tokens equally
    relevant). NaN entries are treated as the smallest attention. Computed in float32.

    Args:
        attention: ``[..., n]`` attention probabilities.
        sign: ``"negative"`` or ``"positive"``.

    Returns:
        float32 tensor of the same shape, positive and finite.
    """
    if sign not in ("negative", "positive"):
        raise ValueError(f"sign must be 'negative' or 'positive', got {sign!r}")
    a = attention.float()
    if a.shape[-1] == 0:
        return a.clone()
    a = torch.nan_to_num(a, nan=0.0)
    v = -a if sign == "negative" else a
    vmin = v.amin(dim=-1, keepdim=True)
    vmax = v.amax(dim=-1, keepdim=True)
    rng = vmax - vmin
    ok = rng > _MIN_RANGE
    r = (v - vmin + 1e-6) / torch.where(ok, rng, torch.ones_like(rng))
    return torch.where(ok, r, torch.ones_like(r))
