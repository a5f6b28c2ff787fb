"""Attention masks of the pruned coordinate systems: reading the caller's mask, and masks for static caches.

A dynamic cache holds exactly the rows each layer saw, so a system's mask is transformers' own causal mask
built from the 2-D mask in that system's coordinates (``create_causal_mask(..., layer_idx=first layer of the
system)``). A static cache pre-allocates ``max_cache_len`` slots per layer and each layer fills its own slots
(its ``cumulative_length`` counter), so during decoding each system's mask is built from that counter and a
per-system record of which prompt slots are real — tensors only, so a compiled decode step reads no host value.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, MutableMapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from hieravid.compat import is_resizable_static_layer, resize_static_layer, static_fill_counter
from hieravid.ops.layer import stage_most_kept
from hieravid.runtime.state import Request, StaticSlots

if TYPE_CHECKING:
    from hieravid.plan import StagePlan

__all__ = [
    "CAPACITY_BUCKETS",
    "CAPACITY_HEADROOM_BUCKETS",
    "STATIC_CAPACITIES",
    "input_mask_2d",
    "is_static_cache",
    "most_rows",
    "regrow_static_cache",
    "row_lengths",
    "shrink_static_cache",
    "static_capacity",
    "static_mask",
    "static_slots",
    "with_mask",
]

#: A right-sized static layer keeps its kept prompt rows rounded up to a multiple of 1/CAPACITY_BUCKETS of the
#: prompt length (itself a multiple of 16 rows): kept counts depend on the content (dynamic budgets), and each new
#: capacity is a new shape for the compiled decode step.
CAPACITY_BUCKETS = 64
#: The first request of a shape reserves this many buckets above its kept rows. Later requests of the same shape keep
#: other counts (their content moves the budgets), and a capacity they outgrow is a new shape for the compiled decode
#: step: a recompile, tens of seconds at 7B. A bucket of headroom costs a few more masked slots per decode step.
CAPACITY_HEADROOM_BUCKETS = 1


#: How a right-sized static cache chooses each layer's capacity (``apply(..., static_capacity=)``): ``"observed"``
#: keeps the rows the first request of a shape kept plus :data:`CAPACITY_HEADROOM_BUCKETS`; ``"bound"`` keeps the
#: most rows any content of the shape can keep under the plan (:func:`most_rows`), so that compiled decode never
#: recompiles for a shape it has seen.
STATIC_CAPACITIES = ("observed", "bound")


def most_rows(request: Request, stages: Sequence[StagePlan]) -> list[int]:
    """Per coordinate system of a pruned prefill, the most rows a prompt of its shape can bring there, whatever its
    content: the realised rows, with each sample's video content replaced by the most its stages can keep
    (:func:`hieravid.ops.layer.stage_most_kept`, with at most one segment per frame). The input level's counts follow
    from the shape, so only the frame-level stages' budgets move with the content."""
    most = [sample.content for sample in request.schedule]
    bounds = [request.coords[0].length]
    for system in range(1, len(request.coords)):
        stage = stages[system - 1]
        for sample, record in enumerate(request.samples):
            segments = record.layout.frames if record is not None and stage.per_segment else 1
            most[sample] = stage_most_kept(stage, most[sample], segments)
        realised = [budgets.total if budgets is not None else 0 for budgets in request.budgets[system - 1]]
        bounds.append(request.coords[system].length + max(bound - kept for bound, kept in zip(most, realised)))
    return bounds


def _mask_tensor(mask: Any) -> Tensor | None:
    """The tensor of a mask argument: itself, or the full-attention entry of a prepared mask mapping."""
    if isinstance(mask, Mapping):
        mask = mask.get("full_attention", next(iter(mask.values()), None))
    return mask if isinstance(mask, Tensor) else None


def input_mask_2d(mask: Any, length: int) -> Tensor | None:
    """The 2-D (bool, ``[B, length]``) mask of a prefill from the caller's mask argument: a 2-D mask, or a prepared
    4-D mask (or mapping of them, as ``generate`` passes with static caches), read from its last query row (a left-
    padded prompt's last row sees every real key). None when the caller masks nothing."""
    tensor = _mask_tensor(mask)
    if tensor is None:
        return None
    if tensor.dim() == 2:
        return tensor.bool()
    if tensor.dim() == 4:
        row = tensor[:, 0, -1, :length]
        return row if row.dtype == torch.bool else row == 0
    raise ValueError(f"attention_mask of shape {tuple(tensor.shape)} is not supported (expected 2-D or 4-D)")


def with_mask(original: Any, mask: Tensor | None, keep: Collection[str] = ()) -> Any:
    """``mask`` in the form the caller used: inside a mapping when the caller passed a mapping of prepared masks,
    whose entries named in ``keep`` (the 2-D padding masks of recurrent layers) stay as they were."""
    if isinstance(original, Mapping):
        return {key: value if key in keep else mask for key, value in original.items()}
    return mask


def is_static_cache(cache: Any) -> bool:
    """Whether ``cache`` pre-allocates its slots (transformers' static caches: ``is_compileable``)."""
    return bool(getattr(cache, "is_compileable", False))


def static_capacity(kept_rows: int, prompt_length: int, new_slots: int, headroom_buckets: int = 0) -> int:
    """Slots a right-sized static layer gets: ``kept_rows`` rounded up to the prompt's bucket, plus
    ``headroom_buckets`` more buckets (never past the prompt length), plus ``new_slots`` for the tokens the decode
    steps write."""
    granule = 16 * math.ceil(math.ceil(prompt_length / CAPACITY_BUCKETS) / 16)
    return min(prompt_length, granule * (math.ceil(kept_rows / granule) + headroom_buckets)) + new_slots


def shrink_static_cache(
    request: Request,
    cache: Any,
    stage_of: list[int],
    remembered: MutableMapping[tuple[int, ...], int],
    recurrent_layers: Collection[int] = (),
    most: Sequence[int] | None = None,
) -> int | None:
    """Right-size every layer of a static cache that a pruned prefill filled; returns the layers' full capacity
    (what :func:`regrow_static_cache` restores), or None when the cache is left as it is.

    Layer ``l`` holds the rows of system ``stage_of[l]`` (known on the host: no device read) and gets
    :func:`static_capacity` of them plus ``max_cache_len - prompt length`` decode slots; its fill counter and the
    rows' original positions are unchanged. ``remembered`` (the handle's, keyed by system, batch, prompt length and
    full capacity) only grows, so that a request shape settles on one set of capacities: the first request of a
    shape, and one that outgrows it, reserve :data:`CAPACITY_HEADROOM_BUCKETS` above their own rows — or, given
    ``most`` (per system, the most rows any content of the shape can bring: :func:`most_rows`), exactly what that
    many rows need, the same for every request of the shape. Caches of
    other kinds (offloaded, sliding-window or hybrid layers, a layer count other than the model's, layers of unequal
    capacity) are left as they are: their decode steps attend over every slot, as without the resize.
    """
    layers = list(getattr(cache, "layers", ()))
    if getattr(cache, "offloading", False) or len(layers) != len(stage_of) or not request.coords:
        return None
    # Recurrent (linear-attention) layers keep a fixed-size state instead of rows: nothing to resize there.
    attention = [index for index in range(len(layers)) if index not in recurrent_layers]
    if not attention or not all(is_resizable_static_layer(layers[index]) for index in attention):
        return None
    capacities = {int(layers[index].max_cache_len) for index in attention}
    if len(capacities) != 1:
        return None
    full = capacities.pop()
    new_slots = full - request.original_length
    if new_slots < 0:
        return None
    sizes: list[int] = []
    for system, coords in enumerate(request.coords):
        key = (system, request.batch, request.original_length, full)
        length = request.original_length
        size = remembered.get(key, 0)
        if most is not None:
            size = remembered[key] = max(size, static_capacity(most[system], length, new_slots))
        elif size < static_capacity(coords.length, length, new_slots):  # a new shape, or one this request outgrows
            size = remembered[key] = static_capacity(coords.length, length, new_slots, CAPACITY_HEADROOM_BUCKETS)
        sizes.append(size)
    for index in attention:
        system = min(stage_of[index], len(request.coords) - 1)
        if sizes[system] < full:
            resize_static_layer(layers[index], sizes[system], request.coords[system].length)
    return full


def regrow_static_cache(cache: Any, capacity: int) -> None:
    """Give every layer of a right-sized static cache ``capacity`` slots again, empty (a reused cache: reset, then
    a new prompt)."""
    for layer in getattr(cache, "layers", ()):
        if is_resizable_static_layer(layer) and int(layer.max_cache_len) < capacity:
            resize_static_layer(layer, capacity, 0)


def row_lengths(cache: Any) -> dict[int, int]:
    """The rows each layer of ``cache`` holds, by layer index, for the layers that hold rows. Recurrent (linear-
    attention) layers keep a fixed-size state instead (transformers' ``LinearAttentionLayer`` has no
    ``get_seq_length``), and so do placeholder layers: they are left out."""
    return {
        index: int(layer.get_seq_length())
        for index, layer in enumerate(getattr(cache, "layers", ()))
        if callable(getattr(layer, "get_seq_length", None))
    }


def static_slots(
    request: Request, cache: Any, mask_layers: list[int | None], *, full_capacity: int | None = None
) -> StaticSlots:
    """Which slots of each coordinate system's static cache layers hold real prompt rows (and every slot past the
    prompt, where decode tokens go), from the prefill's coordinates and 2-D mask; ``mask_layers``: each system's
    first attention layer (None: the system has recurrent layers only, which take no mask in a decode step);
    ``full_capacity``: the layers' capacity before :func:`shrink_static_cache` (None when it left them as they
    were)."""
    assert request.mask2d is not None
    valid: list[Tensor | None] = []
    for system, coords in enumerate(request.coords):
        if mask_layers[system] is None:
            valid.append(None)
            continue
        capacity = int(cache.layers[mask_layers[system]].max_cache_len)
        prompt = request.mask2d[:, : request.original_length].gather(1, coords.orig) & coords.valid
        slots = torch.ones(prompt.shape[0], capacity, dtype=torch.bool, device=prompt.device)
        slots[:, : prompt.shape[1]] = prompt
        valid.append(slots)
    return StaticSlots(slot_valid=valid, mask_layers=list(mask_layers), full_capacity=full_capacity)


def static_mask(slots: StaticSlots, system: int, cache: Any, query_length: int, like: Any) -> Tensor:
    """``[B, 1, q, max_cache_len]`` mask of one coordinate system for the next ``q`` tokens of a static cache: the
    real prompt slots and the filled decode slots, causal within the new tokens. Same dtype convention as ``like``
    (the mask transformers built for layer 0: bool, or additive float)."""
    valid, layer = slots.slot_valid[system], slots.mask_layers[system]
    assert valid is not None and layer is not None, "a system of recurrent layers only has no attention mask"
    filled = static_fill_counter(cache.layers[layer])
    columns = torch.arange(valid.shape[1], device=valid.device)
    rows = torch.arange(query_length, device=valid.device)
    visible = columns.unsqueeze(0) < (filled.to(valid.device) + rows.unsqueeze(1) + 1)
    mask = valid[:, None, None, :] & visible[None, None]
    reference = _mask_tensor(like)
    if reference is None or reference.dtype == torch.bool:
        return mask
    zero = torch.zeros((), dtype=reference.dtype, device=mask.device)
    return torch.where(mask, zero, torch.finfo(reference.dtype).min)
