"""The transformers differences hieravid meets across its supported range (``>=5.17,<6``), in one place.

* **The KV-cache argument.** In 5.17 model and layer forwards, ``create_causal_mask`` and model outputs
  call it ``past_key_values``; in 5.24 they call it ``cache`` (forwards still accept ``past_key_values``
  with a ``FutureWarning`` until 5.40, outputs still answer ``.past_key_values`` with a deprecation log).
  A forward pre-hook sees the name the *caller* used, so both names are read, the new one first.
* **Static caches.** Each layer of a static cache fills its own slots and counts them in a device tensor
  (``cumulative_length``); ``generate`` then passes prepared 4-D masks (a mapping by attention type). A plain
  full-attention layer (``StaticLayer`` itself) keeps its slots in ``keys``/``values`` and sizes its masks by
  ``max_cache_len`` (``get_mask_sizes``), in both 5.17 and 5.24: what :func:`resize_static_layer` changes.
* **Pre-encoded multimodal inputs.** From 5.24 ``generate()`` runs the vision encoder once before the first
  forward (``get_video_features``) and passes ``mm_encoder_outputs={"video": <BaseModelOutputWithPooling>}``
  instead of ``pixel_values_videos``; the keys the encoder consumed (``pixel_values_videos``, and for
  Qwen2-VL ``video_grid_thw``) are no longer passed to the forward. Adapters read the geometry from what
  is left (see :func:`video_encoder_output`).

Nothing here checks a version number: each helper accepts either form.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

__all__ = [
    "CACHE_KEYS",
    "cache_argument",
    "cache_from_kwargs",
    "cache_from_output",
    "causal_mask",
    "is_resizable_static_layer",
    "resize_static_layer",
    "static_fill_counter",
    "video_encoder_output",
]

#: Names of the KV-cache argument/attribute, newest first.
CACHE_KEYS = ("cache", "past_key_values")


def cache_from_kwargs(kwargs: Mapping[str, Any]) -> Any:
    """The cache a forward was called with (``cache=`` or ``past_key_values=``), or None."""
    for key in CACHE_KEYS:
        value = kwargs.get(key)
        if value is not None:
            return value
    return None


def cache_argument(model: Any, cache: Any) -> dict[str, Any]:
    """``{name: cache}`` under the name ``model``'s forward (and so its ``generate``) takes the cache by."""
    parameters = inspect.signature(model.forward).parameters
    return {CACHE_KEYS[0] if CACHE_KEYS[0] in parameters else CACHE_KEYS[1]: cache}


def cache_from_output(output: Any) -> Any:
    """The cache a model output carries (``output.cache`` or ``output.past_key_values``), or None."""
    if output is None:
        return None
    if isinstance(output, Mapping):  # ModelOutput: no deprecated-property access
        return cache_from_kwargs(output)
    for key in CACHE_KEYS:
        value = getattr(output, key, None)
        if value is not None:
            return value
    return None


def causal_mask(
    config: Any, inputs_embeds: Any, attention_mask: Any, cache: Any, *, layer_idx: int | None = None
) -> Any:
    """``transformers.masking_utils.create_causal_mask`` (the cache is passed positionally: it was renamed)."""
    from transformers.masking_utils import create_causal_mask

    return create_causal_mask(config, inputs_embeds, attention_mask, cache, position_ids=None, layer_idx=layer_idx)


def video_encoder_output(kwargs: Mapping[str, Any]) -> Any:
    """The pre-encoded video features a multimodal forward received (``mm_encoder_outputs["video"]``), or None.

    Its ``pooler_output`` holds the features the model scatters into the video placeholders: LLaVA-OneVision
    ``[videos, tokens, D]`` (frames' pooled tokens plus the trailing newline), Qwen2-VL a tuple of
    ``[tokens, D]`` per video.
    """
    outputs = kwargs.get("mm_encoder_outputs")
    if isinstance(outputs, Mapping):
        return outputs.get("video")
    return None


def static_fill_counter(layer: Any) -> Any:
    """A static cache layer's count of filled slots, as the device tensor it keeps (``cumulative_length`` in both
    5.17 and 5.24), so that a compiled decode step reads no host value."""
    counter = getattr(layer, "cumulative_length", None)
    if counter is None:
        raise TypeError(f"{type(layer).__name__} keeps no fill counter (cumulative_length); not a static cache layer")
    return counter


def is_resizable_static_layer(layer: Any) -> bool:
    """Whether ``layer`` is an initialised plain full-attention static layer (transformers' ``StaticLayer`` itself),
    the only kind :func:`resize_static_layer` handles: sliding-window, indexed and linear-attention layers derive
    from it but keep further bookkeeping of their slots."""
    from transformers.cache_utils import StaticLayer

    return type(layer) is StaticLayer and bool(getattr(layer, "is_initialized", False))


def resize_static_layer(layer: Any, capacity: int, filled: int) -> None:
    """Give a static layer ``capacity`` slots, keeping its first ``filled`` slots (its fill counter is untouched).

    The new ``keys``/``values`` replace the old ones (which are freed) and ``max_cache_len`` becomes ``capacity``,
    so the layer's attention, ``get_mask_sizes`` and later writes (``index_copy_`` at the fill counter) all see the
    new size. The new tensors are marked as static addresses, as the layer's own allocation does (CUDA graphs).
    """
    import torch

    if not 0 <= filled <= capacity:
        raise ValueError(f"a static layer of {capacity} slots cannot keep {filled} filled slots")
    resized = []
    for old in (layer.keys, layer.values):
        new = old.new_zeros(old.shape[0], old.shape[1], capacity, old.shape[3])
        new[:, :, :filled] = old[:, :, :filled]
        torch._dynamo.mark_static_address(new)
        resized.append(new)
    layer.keys, layer.values = resized
    layer.max_cache_len = capacity
