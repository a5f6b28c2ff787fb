"""Diagnostics: count the calls that would wait on the device (host syncs), by call site.

:class:`SyncSpy` is a :class:`torch.overrides.TorchFunctionMode`; it runs on a CPU (no GPU needed) and tells
apart which tensors would live on the host on a GPU run. ``benchmarks/count_syncs.py`` prints its counts
for one pruned prefill; the runtime tests use it to check that frame-level stages never synchronise.
"""

from __future__ import annotations

import collections
import functools
import importlib.util
import os
import traceback
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

__all__ = ["SyncSpy"]

#: Where hieravid's own code lives, with the label each site gets: the package and its adapters, which sit apart in
#: the repository (an editable install) and inside the package in a wheel. Nothing else counts as hieravid's: not
#: the tests or benchmarks, nor transformers, nor a test runner installed beside the package (pytest-xdist).
_PACKAGE = os.path.dirname(os.path.abspath(__file__))
#: Calls that read a tensor's values on the host (a device sync when the tensor lives on the device).
READS = {
    "item",
    "tolist",
    "__bool__",
    "__int__",
    "__index__",
    "__float__",
    "nonzero",
    "unique",
    "cpu",
    "numpy",
    "argwhere",
    "masked_select",
    "equal",
    "any",
    "all",
}
#: Calls that copy into the device (a sync unless ``non_blocking``).
COPIES = {"to", "cuda", "copy_"}


def _name(func: Any) -> str:
    return getattr(func, "__name__", str(func))


@functools.cache
def _our_directories() -> tuple[tuple[str, str], ...]:
    """(directory, label prefix) of hieravid's code, found without importing the adapters (they import transformers)."""
    spec = importlib.util.find_spec("hieravid.adapters")
    adapters = [os.path.abspath(path) for path in (spec.submodule_search_locations or [])] if spec else []
    # The adapters first: in a wheel they sit inside the package directory.
    return (*((path, "hieravid/adapters") for path in adapters), (_PACKAGE, "hieravid"))


def _site() -> str:
    for frame in reversed(traceback.extract_stack()[:-2]):
        if frame.filename.startswith("<"):
            continue
        path = os.path.abspath(frame.filename)
        for directory, label in _our_directories():
            if path.startswith(directory + os.sep):
                return f"{label}/{os.path.relpath(path, directory)}:{frame.lineno} ({frame.name})"
    return "<outside hieravid>"


def _tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for item in value for t in _tensors(item)]
    if isinstance(value, dict):
        return [t for item in value.values() for t in _tensors(item)]
    return []


def _is_host(tensor: torch.Tensor) -> bool:
    return tensor.device.type == "cpu" and bool(getattr(tensor, "_hv_host", False))


def _same_device(tensor: torch.Tensor, target: str) -> bool:
    try:
        return torch.device(target) == tensor.device
    except RuntimeError:  # a dtype name or another string that is not a device
        return False


def _device_argument(args: tuple, kwargs: dict) -> Any:
    for value in (*args, kwargs.get("device")):
        if isinstance(value, (str, torch.device)):
            return str(value)
    return None


class SyncSpy(TorchFunctionMode):
    """Counts device syncs of the calls made while active, by call site.

    On a CPU run every tensor is a CPU tensor, so the spy tracks which tensors would be *host* tensors on
    a GPU run: results of ``.cpu()``, factories without a ``device`` argument, and anything computed only
    from host tensors. Reads of the other (device) tensors count: ``item``, ``tolist``, ``__bool__``,
    ``__int__``, ``nonzero``, ``equal``, ``cpu``, boolean-mask indexing, ``x[tensor_index] = scalar`` (the
    scalar is copied to the device with a blocking copy), …; ``any``/``all`` count only
    when their result is read (through ``__bool__``, counted there). Blocking host-to-device copies
    (``.to(device)`` of a host tensor without ``non_blocking``) count too, as ``h2d``; with ``capture=True`` every
    other host-to-device transfer counts as well (what a CUDA graph cannot capture).
    """

    def __init__(self, all_reads: bool = False, capture: bool = False) -> None:
        super().__init__()
        self.all_reads = all_reads
        #: Also count what a CUDA graph cannot capture besides syncs: every host-to-device copy (``non_blocking``
        #: too, as ``h2d-async``) and device tensors made from host data (``torch.tensor(..., device=...)``).
        self.capture = capture
        #: Whether calls are counted now (tensors are tracked either way, so a window can be counted alone).
        self.counting = True
        self.counts: collections.Counter[tuple[str, str]] = collections.Counter()

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        name = _name(func)
        inputs = _tensors(args) + _tensors(kwargs)
        host_inputs = bool(inputs) and all(_is_host(t) for t in inputs)
        receiver = args[0] if args and isinstance(args[0], torch.Tensor) else None
        if not self.counting:
            pass
        elif receiver is not None and (self.all_reads or not _is_host(receiver)):
            masked = name == "__getitem__" and any(t.dtype == torch.bool for t in _tensors(args[1:]))
            if (name in READS and name not in ("any", "all")) or masked:
                self.counts[(_site(), "bool-index" if masked else name)] += 1
            elif (
                name == "__setitem__" and len(args) == 3 and not isinstance(args[2], torch.Tensor) and _tensors(args[1])
            ):
                # ``x[index] = scalar`` with a tensor index copies the scalar to the device and waits for it.
                self.counts[(_site(), "scalar-index-put")] += 1
        target = _device_argument(args[1:] if receiver is not None else args, kwargs)
        if not self.counting:
            pass
        elif (
            name in COPIES
            and receiver is not None
            and _is_host(receiver)
            and target not in (None, "cpu")
            and not kwargs.get("non_blocking", False)
        ):
            self.counts[(_site(), "h2d")] += 1
        elif (
            self.capture
            and name in COPIES
            and receiver is not None
            and _is_host(receiver)
            and target not in (None, "cpu")
        ):
            self.counts[(_site(), "h2d-async")] += 1
        made_from_host_data = (
            self.counting
            and self.capture
            and name in ("tensor", "as_tensor")
            and target not in (None, "cpu")
            and (receiver is None or _is_host(receiver))
        )
        out = func(*args, **kwargs)
        # An empty tensor copies nothing (transformers' lazily initialised caches start as ``torch.tensor([])``).
        if made_from_host_data and isinstance(out, torch.Tensor) and out.numel() > 0:
            self.counts[(_site(), "h2d-data")] += 1
        if name in COPIES and receiver is not None and target is not None and _same_device(receiver, target):
            host = _is_host(receiver)  # a copy to the tensor's own device returns it: nothing moves
        elif name == "cpu" or (name in COPIES and target == "cpu"):
            host = True
        elif name in COPIES and target is not None:
            host = False
        elif not inputs:
            host = kwargs.get("device") is None and target is None
        else:
            host = host_inputs
        for tensor in _tensors(out):
            try:
                tensor._hv_host = host
            except (AttributeError, RuntimeError):
                pass
        return out
