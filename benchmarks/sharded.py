"""A LLaVA-OneVision-shaped model split over several GPUs by accelerate, with hieravid applied on top.

The decoder layers are spread evenly over the GPUs (the first GPU also holds the vision tower, projector and
embeddings; the last one the final norm and LM head) and the model is dispatched with accelerate's
``dispatch_model``, the engine behind ``from_pretrained(device_map=...)``. Random weights at full size: there is no
checkpoint to load (a 72B one would not fit this machine's disk), so each GPU builds its share of the layers
directly in place.

Checks (``gpu_adapters_check.py``'s, on the split model): under hieravid-30 every decoder layer's output equals
the unpatched layers run on the pruned sequence, and every layer's KV cache holds the realised count of rows on
that layer's GPU; ``generate`` runs.

Measures, for the stock model, the model with only the exact speedups (``none``), and each policy: TTFT (one
forward of the prompt, ``logits_to_keep=1``), LLM prefill (the language model's call, hieravid's input level
included), both as wall time with every GPU synchronised at the edges (a CUDA event on one GPU would not wait for
the others); the FLOPs ideal (unpruned LLM prefill × the plan's FLOPs ratio); peak memory allocated on each GPU.
Median of ``--runs`` after ``--warmup``.

Usage: ``python benchmarks/sharded.py --text qwen2-72b --out sharded-72b.json`` (two GPUs);
``--text qwen2-7b`` for LLaVA-OV-7B; ``--scale small`` checks the script on the CPU (two "devices", both the CPU).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
from gpu_adapters_check import build_inputs, check_cache_lengths, check_pruned_vs_reference  # noqa: E402

from hieravid.specs import CATALOGUE_CONFIGS  # noqa: E402

TEXT_MODELS = {"qwen2-7b": "llava-onevision-7b", "qwen2-72b": "llava-onevision-72b"}
"""Language models by name, taken from the catalogue model that uses them."""


def split_devices(layers: int, devices: Sequence[torch.device]) -> list[torch.device]:
    """The device of each decoder layer: contiguous, as even as possible, earlier devices first."""
    share, extra = divmod(layers, len(devices))
    placement: list[torch.device] = []
    for index, device in enumerate(devices):
        placement += [device] * (share + (index < extra))
    return placement


def build_split_model(text: str, scale: str, devices: Sequence[torch.device], dtype: torch.dtype) -> Any:
    """A random-weight LLaVA-OneVision model whose decoder layers are spread over ``devices`` and dispatched."""
    from accelerate import dispatch_model
    from transformers import LlavaOnevisionForConditionalGeneration

    from hieravid.apps.bench import _onevision_config

    if scale == "full":
        catalogue = CATALOGUE_CONFIGS[TEXT_MODELS[text]][0]["text_config"]
        sizes = {key: catalogue[key] for key in ("hidden_size", "intermediate_size", "num_hidden_layers")}
        sizes |= {key: catalogue[key] for key in ("num_attention_heads", "num_key_value_heads")}
        config = _onevision_config("full", dict(sizes, vocab_size=152064, max_position_embeddings=32768))
    else:
        config = _onevision_config("tiny")
    total = config.text_config.num_hidden_layers
    placement = split_devices(total, devices)
    parts = []
    for device in dict.fromkeys(placement):  # each device builds a whole model with only its share of layers
        share = placement.count(device)
        part_config = config.__class__.from_dict(config.to_dict())
        part_config.text_config.num_hidden_layers = share
        part_config.text_config.layer_types = config.text_config.layer_types[:share]
        torch.manual_seed(len(parts))
        with torch.device(device):
            parts.append(
                LlavaOnevisionForConditionalGeneration._from_config(
                    part_config, dtype=dtype, attn_implementation="sdpa"
                )
            )
    model = parts[0]
    layers = model.model.language_model.layers
    for part in parts[1:]:
        for layer in part.model.language_model.layers:
            layer.self_attn.layer_idx = len(layers)
            layers.append(layer)
    model.model.language_model.norm = parts[-1].model.language_model.norm
    model.lm_head = parts[-1].lm_head
    del parts
    model.config.text_config.num_hidden_layers = total
    model.config.text_config.layer_types = config.text_config.layer_types
    prefix = "model.language_model"
    device_map: dict[str, Any] = {f"{prefix}.layers.{i}": device for i, device in enumerate(placement)}
    device_map |= {f"{prefix}.{name}": devices[0] for name, _ in model.model.language_model.named_children()}
    device_map |= {f"{prefix}.norm": placement[-1], "lm_head": placement[-1]}
    device_map |= {f"model.{name}": devices[0] for name, _ in model.model.named_children() if name != "language_model"}
    device_map |= {f"model.{name}": devices[0] for name, _ in model.model.named_parameters(recurse=False)}
    device_map.pop(f"{prefix}.layers")
    device_map = {name: str(device) for name, device in device_map.items()}
    return dispatch_model(model.eval(), device_map=device_map, main_device=str(devices[0]))


def synchronize(devices: Sequence[torch.device]) -> None:
    for device in devices:
        if device.type == "cuda":
            torch.cuda.synchronize(device)


def timed_ms(fn: Callable[[], Any], devices: Sequence[torch.device], warmup: int, runs: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        synchronize(devices)
        start = time.perf_counter()
        fn()
        synchronize(devices)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def measure(model: Any, inputs: dict, devices: Sequence[torch.device], warmup: int, runs: int) -> dict[str, Any]:
    """TTFT, LLM prefill and peak memory per device of one forward of the prompt."""
    language_model = model.model.language_model
    llm_times: list[float] = []
    started: list[float] = []

    def before(module: Any, args: Any, kwargs: Any) -> None:
        synchronize(devices)
        started.append(time.perf_counter())

    def after(module: Any, args: Any, kwargs: Any, output: Any) -> None:
        synchronize(devices)
        llm_times.append((time.perf_counter() - started.pop()) * 1e3)

    def prefill() -> Any:
        return model(**inputs, use_cache=True, logits_to_keep=1)

    # Registered first / last so that hieravid's own language-model hooks run inside the timed span.
    removables = [
        language_model.register_forward_pre_hook(before, with_kwargs=True, prepend=True),
        language_model.register_forward_hook(after, with_kwargs=True),
    ]
    try:
        with torch.no_grad():
            ttft = timed_ms(prefill, devices, warmup, runs)
            llm = statistics.median(llm_times[warmup:])
            cuda = [device for device in devices if device.type == "cuda"]
            for device in cuda:
                torch.cuda.reset_peak_memory_stats(device)
            prefill()
            synchronize(devices)
            peaks = [round(torch.cuda.max_memory_allocated(device) / 2**30, 2) for device in cuda]
    finally:
        for removable in removables:
            removable.remove()
    return {"ttft_ms": round(ttft, 1), "llm_prefill_ms": round(llm, 1), "peak_gib_per_device": peaks}


def main(argv: list[str] | None = None) -> int:
    import transformers

    import hieravid
    from hieravid.plan import compile_plan

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--text", choices=sorted(TEXT_MODELS), default="qwen2-72b")
    parser.add_argument("--scale", choices=("full", "small"), default="full")
    parser.add_argument("--gpus", type=int, default=2)
    parser.add_argument("--frames", type=int, default=32)
    parser.add_argument("--policies", nargs="+", default=["hieravid-30", "hieravid-20", "hieravid-10"])
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--rtol", type=float, default=5e-2)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)

    if args.scale == "full":
        if torch.cuda.device_count() < args.gpus:
            raise SystemExit(f"--gpus {args.gpus}: this machine has {torch.cuda.device_count()} GPU(s)")
        devices = [torch.device("cuda", index) for index in range(args.gpus)]
        dtype = torch.bfloat16
    else:
        devices, dtype = [torch.device("cpu")] * args.gpus, torch.float32
    started = time.perf_counter()
    model = build_split_model(args.text, args.scale, devices, dtype)
    inputs = build_inputs(model, args.frames, devices[0], dtype)
    layer_devices = sorted({str(p.device) for layer in model.model.language_model.layers for p in layer.parameters()})
    results: dict[str, Any] = {
        "devices": [torch.cuda.get_device_name(d) if d.type == "cuda" else "cpu" for d in devices],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "text": args.text,
        "scale": args.scale,
        "frames": args.frames,
        "prompt_tokens": int(inputs["input_ids"].shape[1]),
        "decoder_layers": len(model.model.language_model.layers),
        "layer_devices": layer_devices,
        "build_seconds": round(time.perf_counter() - started, 1),
        "rows": [],
        "checks": {},
    }
    print(json.dumps({k: v for k, v in results.items() if k not in ("rows", "checks")}), flush=True)

    with torch.no_grad():
        plan = compile_plan("hieravid-30", model, frames=args.frames)
        results["checks"]["pruned_vs_reference"] = check_pruned_vs_reference(model, inputs, plan, args.rtol)
        results["checks"]["cache_lengths"] = check_cache_lengths(model, inputs, plan)
        with hieravid.apply(model, plan):
            new = model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False)
        results["checks"]["generate"] = {"new_tokens": int(new.shape[1] - inputs["input_ids"].shape[1])}
        results["checks"]["generate"]["pass"] = results["checks"]["generate"]["new_tokens"] == 4
        for name, check in results["checks"].items():
            print(f"[{name}] pass={check['pass']}", flush=True)

        rows = results["rows"]
        rows.append({"configuration": "stock", **measure(model, inputs, devices, args.warmup, args.runs)})
        with hieravid.apply(model, "none"):
            rows.append({"configuration": "none (+exact)", **measure(model, inputs, devices, args.warmup, args.runs)})
        unpruned_llm = rows[-1]["llm_prefill_ms"]
        for policy in args.policies:
            plan = compile_plan(policy, model, frames=args.frames)
            with hieravid.apply(model, plan):
                row = {"configuration": policy, **measure(model, inputs, devices, args.warmup, args.runs)}
            row["flops_ratio"] = round(plan.flops_ratio, 4)
            row["ideal_llm_prefill_ms"] = round(unpruned_llm * plan.flops_ratio, 1)
            row["prefill_vs_ideal"] = round(row["llm_prefill_ms"] / row["ideal_llm_prefill_ms"], 3)
            row["ttft_speedup_vs_stock"] = round(rows[0]["ttft_ms"] / row["ttft_ms"], 2)
            rows.append(row)
        for row in rows:
            print(json.dumps(row), flush=True)

    results["pass"] = all(check["pass"] for check in results["checks"].values())
    results["total_seconds"] = round(time.perf_counter() - started, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    return 0 if results["pass"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
