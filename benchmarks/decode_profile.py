"""Decode-step profile on one GPU: hand-driven single-token steps, unpruned vs. a policy, with and
without PyTorch's cuDNN SDPA backend (whose per-shape execution plans are a suspect when every layer
group decodes against a different KV length).

Usage: ``python benchmarks/decode_profile.py --out decode.json [--model llava-onevision-7b ...] [--compare-cudnn]``
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from hieravid.apps.bench import build_case, environment_info, profile_decode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", nargs="+", default=["llava-onevision-7b"])
    parser.add_argument("--policy", default="policies/hieravid-30.yaml")
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--compare-cudnn", action="store_true", help="also run with the cuDNN SDPA backend on")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    rows = []
    for model in args.model:
        case = build_case(model)
        for cudnn in (False, True) if args.compare_cudnn else (False,):
            torch.backends.cuda.enable_cudnn_sdp(cudnn)
            for policy in (None, args.policy, None, args.policy):  # twice, interleaved: the host drifts
                result = profile_decode(case, policy, steps=args.steps)
                result.update(model=model, cudnn_sdp=cudnn)
                rows.append(result)
                print(
                    f"{model} cudnn_sdp={cudnn} {result['policy']}: {result['step_ms_median']:.2f} ms/step, "
                    f"GPU {result['gpu_ms_per_step']:.2f} ms/step, {result['host_syncs_per_step']:.0f} host syncs; "
                    "top CPU: "
                    + ", ".join(
                        f"{op['name']} {op['cpu_ms']:.2f}ms×{op['calls']:.0f}" for op in result["top_cpu_ops"][:4]
                    ),
                    flush=True,
                )
        del case
        torch.cuda.empty_cache()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"environment": environment_info("cuda"), "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
