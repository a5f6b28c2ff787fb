"""Count host-synchronising tensor calls per pruned prefill, by call site (CPU spy, no GPU needed).

Builds the tiny LLaVA-OneVision bench case, applies a policy and, during one prefill, counts with a
:class:`torch.overrides.TorchFunctionMode` every call that would wait on the device on a GPU run — reads
of device tensors (``item``, ``tolist``, ``__bool__``, ``__int__``, ``__index__``, ``nonzero``,
``unique``, ``equal``, ``cpu``, boolean-mask indexing; ``any``/``all`` through the ``__bool__`` that
reads them) and blocking host-to-device copies — attributed to the innermost stack frame in hieravid's
own code (the package and its adapters; anything else is ``<outside hieravid>``). See :class:`SyncSpy`
for how host tensors are told apart on CPU;
``--all-reads`` also counts reads of host tensors.

    .venv/bin/python benchmarks/count_syncs.py [--policy policies/hieravid-30.yaml] [--frames 16]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from hieravid.diagnostics import SyncSpy  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policy", default=os.path.join(ROOT, "policies", "hieravid-30.yaml"))
    parser.add_argument("--model", default="llava-onevision-7b")
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--size", default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--all-reads",
        action="store_true",
        help="also count reads of host tensors (what a CPU spy cannot otherwise tell apart)",
    )
    args = parser.parse_args(argv)

    from hieravid.apps.bench import build_case
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
