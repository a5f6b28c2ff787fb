"""Plain, loop-based reference implementations of the HieraVid operators (float64, straight from SPEC §2).

They are deliberately slow and obvious; the vectorised operators in ``hieravid.ops`` are compared with them.
"""

from __future__ import annotations

import math
from fractions import Fraction

import torch
from torch import Tensor


def floor_ratio(n: int, ratio: float) -> int:
    """Exact ⌊n·ratio⌋ for a ratio written in decimal (0.57 means 57/100)."""
    return math.floor(Fraction(str(ratio)) * n)


def cos64(a: Tensor, b: Tensor) -> float:
    a = a.double()
    b = b.double()
    na = max(float(a.norm()), 1e-12)
    nb = max(float(b.norm()), 1e-12)
    return max(-1.0, min(1.0, float((a * b).sum()) / (na * nb)))


def ref_similarity(frames: Tensor) -> list[list[float]]:
    F, P, _ = frames.shape
    sim = [[-1.0] * P for _ in range(F)]
    for f in range(1, F):
        for p in range(P):
            sim[f][p] = cos64(frames[f, p], frames[f - 1, p])
    return sim


def ref_segments(sim: list[list[float]], tau: float, beta: float) -> list[int]:
    ids = []
    current = -1
    for f, row in enumerate(sim):
        c = 0.0 if f == 0 else sum(1 for s in row if s > tau) / len(row)
        if f == 0 or c < beta:
            current += 1
        ids.append(current)
    return ids


def ref_marginal_values(frames: Tensor, seg_ids: list[int], lam: float) -> list[float]:
    G = max(seg_ids) + 1
    x = frames.double()
    g = []
    for i in range(G):
        members = [f for f, s in enumerate(seg_ids) if s == i]
        g.append(x[members].reshape(-1, x.shape[-1]).mean(0))
    if G == 1:
        return [0.0]
    mv = []
    for i in range(G):
        a1 = 0.0 if i == 0 else cos64(g[i], torch.stack(g[:i]).mean(0))
        a2 = 0.0 if i == G - 1 else cos64(g[i], torch.stack(g[i + 1 :]).mean(0))
        mv.append(lam * a1 + (1 - lam) * (1 - a2))
    mean = sum(mv) / G
    std = math.sqrt(sum((v - mean) ** 2 for v in mv) / G)
    return [(v - mean) / (std + 1e-8) for v in mv]


def ref_merge(frames: Tensor, sim: list[list[float]], ratio: float):
    """Returns (kept flat indices, merged features float64 [K, D], merge_target list)."""
    F, P, _ = frames.shape
    N = F * P
    m = min(floor_ratio(N, ratio), (F - 1) * P)
    cands = [(sim[f][p], f * P + p) for f in range(1, F) for p in range(P)]
    cands.sort(key=lambda c: (-c[0], c[1]))
    selected = {idx for _, idx in cands[:m]}
    x = frames.double()
    target = list(range(N))
    groups: dict[int, list[int]] = {}
    for p in range(P):
        anchor = None
        for f in range(F):
            idx = f * P + p
            if idx in selected:
                assert anchor is not None
                target[idx] = anchor
                groups[anchor].append(idx)
            else:
                anchor = idx
                groups[anchor] = [idx]
    kept = sorted(groups)
    feats = torch.stack([torch.stack([x[i // P, i % P] for i in groups[a]]).mean(0) for a in kept])
    return kept, feats, target


def ref_budgets(counts, mvs, rho, scale=0.1, lo=0.05, hi=0.95, dynamic=True, min_tokens=1) -> list[int]:
    out = []
    for n, mv in zip(counts, mvs):
        kappa = min(max((1 - rho) + scale * mv, lo), hi) if dynamic else 1 - rho
        k = math.floor(n * kappa + 1e-9)
        k = max(k, min(n, min_tokens))
        out.append(min(k, n))
    return out


def ref_greedy(K: Tensor, budget: int, fallback: list[float], eps: float) -> list[int]:
    """Chen et al. (2018) greedy MAP, Algorithm 1, with the documented exhaustion fallback. float64."""
    K = K.double()
    n = K.shape[0]
    budget = min(budget, n)
    c = torch.zeros(budget, n, dtype=torch.float64)
    d2 = [float(K[i, i]) for i in range(n)]
    thr = eps * max([0.0, *d2])
    selected: list[int] = []
    exhausted = False
    for t in range(budget):
        free = [i for i in range(n) if i not in selected]
        if not exhausted:
            j = free[0]
            for i in free:
                if d2[i] > d2[j]:
                    j = i
            if not d2[j] > thr:
                exhausted = True
        if exhausted:
            j = free[0]
            for i in free:
                if fallback[i] > fallback[j]:
                    j = i
            selected.append(j)
            continue
        e = (K[j] - c[:t, j] @ c[:t]) / math.sqrt(d2[j])
        c[t] = e
        for i in range(n):
            d2[i] -= float(e[i]) ** 2
        selected.append(j)
    return selected


def ref_dpp_select(features, relevance, seg_ids, budgets, max_block=None, eps=1e-4) -> list[int]:
    x = features.double()
    x = torch.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)
    r = torch.nan_to_num(relevance.double(), nan=0.0, posinf=0.0, neginf=0.0)
    seg_list = [int(s) for s in seg_ids]
    out: list[int] = []
    for g, kg in enumerate(int(b) for b in budgets):
        members = [i for i, s in enumerate(seg_list) if s == g]
        n = len(members)
        if n == 0:
            continue
        kg = max(0, min(kg, n))
        nb = 1 if max_block is None else -(-n // max_block)
        for b in range(nb):
            s, e = b * n // nb, (b + 1) * n // nb
            kb = kg * e // n - kg * s // n
            idx = members[s:e]
            xb = x[idx]
            nonzero = (xb.norm(dim=1) > 0).double()
            xb = xb / xb.norm(dim=1, keepdim=True).clamp_min(1e-12)
            rb = r[idx]
            S = (xb[:, None, :] * xb[None, :, :]).sum(-1)  # identical rows give bit-identical entries
            S.diagonal().copy_(nonzero)  # cos(x, x) = 1 exactly (0 for a zero vector)
            K = rb[:, None] * S * rb[None, :]
            picks = ref_greedy(K, kb, [float(v) for v in rb], eps)
            out.extend(idx[p] for p in picks)
    return sorted(out)


def ref_topk(scores: list[float], seg_ids: list[int], budgets: list[int]) -> list[int]:
    out = []
    for g, k in enumerate(budgets):
        members = [i for i, s in enumerate(seg_ids) if s == g]
        members.sort(key=lambda i: (-scores[i], i))
        out.extend(members[: max(0, k)])
    return sorted(out)


def ref_binned(scores: list[float], seg_ids: list[int], budgets: list[int]) -> list[int]:
    out = []
    for g, k in enumerate(budgets):
        members = [i for i, s in enumerate(seg_ids) if s == g]
        n = len(members)
        k = max(0, min(k, n))
        for b in range(k):
            bin_ = members[b * n // k : (b + 1) * n // k]
            best = bin_[0]
            for i in bin_:
                if scores[i] > scores[best]:
                    best = i
            out.append(best)
    return sorted(out)


def ref_uniform(seg_ids: list[int], budgets: list[int]) -> list[int]:
    out = []
    for g, k in enumerate(budgets):
        members = [i for i, s in enumerate(seg_ids) if s == g]
        n = len(members)
        k = max(0, min(k, n))
        out.extend(members[(2 * i + 1) * n // (2 * k)] for i in range(k))
    return sorted(out)


def ref_last_query_attention(query, key, scaling, key_padding_mask=None) -> Tensor:
    B, Hq, q, _ = query.shape
    _, Hkv, S, _ = key.shape
    k = key.double().repeat_interleave(Hq // Hkv, dim=1)
    scores = query.double() @ k.transpose(-1, -2) * scaling  # [B, Hq, q, S]
    out = torch.zeros(B, S, dtype=torch.float64)
    for b in range(B):
        for h in range(Hq):
            for i in range(q):
                pos = S - q + i
                allowed = [j for j in range(S) if j <= pos and (key_padding_mask is None or key_padding_mask[b, j])]
                if not allowed:
                    continue
                row = scores[b, h, i, allowed]
                p = torch.softmax(row, 0)
                out[b, allowed] += p
    return out / (Hq * q)
