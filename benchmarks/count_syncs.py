"""Count host-synchronising tensor calls per pruned prefill, by call site (CPU spy, no GPU needed).

Builds the tiny LLaVA-OneVision bench case, applies a policy and, during one prefill, counts with a
:class:`torch.overrides.TorchFunctionMode` every call that would wait on the device on a GPU run — reads
of device tensors (``item``, ``tolist``, ``__bool__``, ``__int__``, ``__index__``, ``nonzero``,
``unique``, ``equal``, ``cpu``, boolean-mask indexing; ``any``/``all`` through the ``__bool__`` that
reads them) and blocking host-to-device copies — attributed to the innermost stack frame inside this
repository (hieravid/ or adapters/). See :class:`SyncSpy` for how host tensors are told apart on CPU;
``--all-reads`` also counts reads of host tensors.

    .venv/bin/python benchmarks/count_syncs.py [--policy policies/hieravid-30.yaml] [--frames 16]
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import traceback
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: Calls that read a tensor's values on the host (a device sync when the tensor lives on the device).
READS = {"item", "tolist", "__bool__", "__int__", "__index__", "__float__", "nonzero", "unique", "cpu", "numpy",
         "argwhere", "masked_select", "equal", "any", "all"}
#: Calls that copy into the device (a sync unless ``non_blocking``).
COPIES = {"to", "cuda", "copy_"}


def _name(func: Any) -> str:
    return getattr(func, "__name__", str(func))


def _site() -> str:
    for frame in reversed(traceback.extract_stack()[:-2]):
        path = os.path.abspath(frame.filename)
        if path.startswith(ROOT) and "/benchmarks/" not in path and "/.venv/" not in path:
            return f"{os.path.relpath(path, ROOT)}:{frame.lineno} ({frame.name})"
    return "<outside the repository>"


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
    ``__int__``, ``nonzero``, ``equal``, ``cpu``, boolean-mask indexing, …; ``any``/``all`` count only
    when their result is read (through ``__bool__``, counted there). Blocking host-to-device copies
    (``.to(device)`` of a host tensor without ``non_blocking``) count too, as ``h2d``.
    """

    def __init__(self, all_reads: bool = False) -> None:
        super().__init__()
        self.all_reads = all_reads
        self.counts: collections.Counter[tuple[str, str]] = collections.Counter()

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        name = _name(func)
        inputs = _tensors(args) + _tensors(kwargs)
        host_inputs = bool(inputs) and all(_is_host(t) for t in inputs)
        receiver = args[0] if args and isinstance(args[0], torch.Tensor) else None
        if receiver is not None and (self.all_reads or not _is_host(receiver)):
            masked = name == "__getitem__" and any(t.dtype == torch.bool for t in _tensors(args[1:]))
            if (name in READS and name not in ("any", "all")) or masked:
                self.counts[(_site(), "bool-index" if masked else name)] += 1
        target = _device_argument(args[1:] if receiver is not None else args, kwargs)
        if name in COPIES and receiver is not None and _is_host(receiver) and target not in (None, "cpu") \
                and not kwargs.get("non_blocking", False):
            self.counts[(_site(), "h2d")] += 1
        out = func(*args, **kwargs)
        if name == "cpu" or (name in COPIES and target == "cpu"):
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policy", default=os.path.join(ROOT, "policies", "hieravid-30.yaml"))
    parser.add_argument("--model", default="llava-onevision-7b")
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--size", default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--all-reads", action="store_true",
                        help="also count reads of host tensors (what a CPU spy cannot otherwise tell apart)")
    args = parser.parse_args(argv)

    from hieravid.bench import build_case
    from hieravid.runtime import apply

    dtype = "float32" if args.device == "cpu" else "bfloat16"
    case = build_case(args.model, frames=args.frames, size=args.size, device=args.device, dtype=dtype)
    spy = SyncSpy(all_reads=args.all_reads)
    with apply(case.model, args.policy) as handle, torch.inference_mode():
        case.model(**case.inputs, use_cache=True, logits_to_keep=1)  # warm-up (lazy imports, caches)
        with spy:
            case.model(**case.inputs, use_cache=True, logits_to_keep=1)
        stats = handle.last_request
    assert stats is not None and stats.pruned, "the prefill was not pruned"
    width = max((len(site) for site, _ in spy.counts), default=10)
    print(f"{'call site':<{width}}  {'call':<12} count")
    for (site, name), count in sorted(spy.counts.items(), key=lambda item: (-item[1], item[0])):
        print(f"{site:<{width}}  {name:<12} {count}")
    kind = "host-value reads (device and host tensors)" if args.all_reads else "device syncs"
    print(f"total {kind} per prefill: {sum(spy.counts.values())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
