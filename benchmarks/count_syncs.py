"""Count host-synchronising tensor calls per pruned prefill, by call site (CPU spy, no GPU needed).

Builds the tiny LLaVA-OneVision bench case, applies a policy and, during one prefill, counts every call
that would wait on the device on a GPU (``item``, ``tolist``, ``__bool__``, ``__int__``, ``__index__``,
``nonzero``, ``any``/``all`` whose result is then read, ``unique``, ``cpu``) with a
:class:`torch.overrides.TorchFunctionMode`, attributed to the first stack frame inside this repository
(hieravid/ or adapters/). Calls on tensors that are already host-side (for example the small CPU
tensors the DPP block plan computes on) are counted too, since on CPU the spy cannot tell them apart;
``--device cuda`` counts only calls whose tensor argument lives on the GPU.

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
SYNC_NAMES = {"item", "tolist", "__bool__", "__int__", "__index__", "__float__", "nonzero", "any", "all", "unique",
              "cpu", "argwhere", "masked_select", "repeat_interleave"}


def _name(func: Any) -> str:
    return getattr(func, "__name__", str(func))


def _site() -> str:
    for frame in reversed(traceback.extract_stack()[:-2]):
        path = os.path.abspath(frame.filename)
        if path.startswith(ROOT) and "/benchmarks/" not in path and "/.venv/" not in path:
            return f"{os.path.relpath(path, ROOT)}:{frame.lineno} ({frame.name})"
    return "<outside the repository>"


class SyncSpy(TorchFunctionMode):
    def __init__(self, device: str) -> None:
        super().__init__()
        self.device = device
        self.counts: collections.Counter[tuple[str, str]] = collections.Counter()

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        name = _name(func)
        if name in SYNC_NAMES:
            tensor = next((a for a in args if isinstance(a, torch.Tensor)), None)
            if tensor is not None and (self.device == "cpu" or tensor.device.type == self.device):
                # repeat_interleave syncs only with tensor repeats and no output_size
                if name != "repeat_interleave" or (len(args) > 1 and isinstance(args[1], torch.Tensor)
                                                   and (kwargs or {}).get("output_size") is None):
                    self.counts[(_site(), name)] += 1
        return func(*args, **(kwargs or {}))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policy", default=os.path.join(ROOT, "policies", "hieravid-30.yaml"))
    parser.add_argument("--model", default="llava-onevision-7b")
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--size", default="tiny")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)

    from hieravid.bench import build_case
    from hieravid.runtime import apply

    dtype = "float32" if args.device == "cpu" else "bfloat16"
    case = build_case(args.model, frames=args.frames, size=args.size, device=args.device, dtype=dtype)
    spy = SyncSpy(args.device)
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
    print(f"total host syncs per prefill: {sum(spy.counts.values())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
