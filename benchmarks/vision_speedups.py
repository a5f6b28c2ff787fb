"""GPU check of hieravid's vision-side speedups: stock transformers vs ``apply(model, none.yaml, speedups=...)``.

For each case a full-size random-weight model is built (bf16, SDPA; the language model has one layer and a small
vocabulary: the speedups live before it) and the multimodal model's ``get_video_features`` (vision tower,
projector, pooling or patch merger) runs stock and then with the adapter's exact speedups installed through
``hieravid.apply`` with ``policies/none.yaml``. Reported per case: whether the features are bit-identical
(``torch.equal``; also whether two stock runs are, to tell nondeterminism from a speedup error), the max abs
difference, and the median time of each (CUDA events, after warm-up).

Cases: LLaVA-OneVision-7B 32 frames, 64 frames (LLaVA-Video-7B's count) and batch 8 × 32 frames (SigLIP-so400m
384/14, projector to 3,584, bilinear pooling 27×27 → 14×14); Qwen2-VL-7B and Qwen2.5-VL-7B, 32 frames at 448×448
(16 temporal patches of 32×32 patches; every Qwen2.5-VL window 64 patches: one SDPA call on a view), and
Qwen2.5-VL at 336×588 (24×42 patches: each row of windows is five of 64 patches and one of 16, so both lengths
are scattered: the gather path). The Qwen cases run once with PyTorch's default
SDPA backends and once with the cuDNN backend off (``hieravid bench``'s default). ``--compile`` also measures
``speedups="all"`` (``torch.compile`` of the tower: relative error and time; adds minutes of compilation).

    python benchmarks/vision_speedups.py --out benchmarks/results/vision-speedups-h200.json

Needs torch, transformers and hieravid (``pip install -e . --no-deps`` from the checkout, or run from it).
``--device cpu --scale tiny`` runs small shapes on a CPU to check the script itself.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
NONE_POLICY = ROOT / "policies" / "none.yaml"
_TEXT = dict(
    hidden_size=3584,
    intermediate_size=18944,
    num_hidden_layers=1,
    num_attention_heads=28,
    num_key_value_heads=4,
    vocab_size=1024,
    max_position_embeddings=32768,
)
_TINY_TEXT = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=1,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=1024,
    max_position_embeddings=32768,
)
_TOKENS = dict(image_token_id=1000, video_token_id=1001, tie_word_embeddings=False)
_QWEN_TOKENS = dict(vision_start_token_id=1002, vision_end_token_id=1003)


def onevision_model(scale: str) -> Any:
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration

    from hieravid.apps.bench import SIGLIP_SO400M_VISION

    full = scale == "full"
    tiny = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=56)
    vision = {**SIGLIP_SO400M_VISION, **({} if full else {**tiny, "patch_size": 4})}
    config = LlavaOnevisionConfig(
        text_config=dict(model_type="qwen2", **(_TEXT if full else _TINY_TEXT)),
        vision_config=vision,
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        **_TOKENS,
    )
    return LlavaOnevisionForConditionalGeneration, config


def qwen_model(kind: str, scale: str) -> Any:
    import transformers

    from hieravid.apps.bench import QWEN2_5_VL_7B_VISION, QWEN2_VL_7B_VISION

    full = scale == "full"
    text = dict(_TEXT if full else _TINY_TEXT)
    rope = {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24] if full else [2, 3, 3]}
    if kind == "qwen2_vl":
        tiny = dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2)
        vision = {**QWEN2_VL_7B_VISION, **({} if full else tiny)}
        config_class, model_class = transformers.Qwen2VLConfig, transformers.Qwen2VLForConditionalGeneration
    else:
        tiny = dict(depth=4, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64)
        vision = {**QWEN2_5_VL_7B_VISION, **({} if full else {**tiny, "fullatt_block_indexes": [1, 3]})}
        config_class, model_class = transformers.Qwen2_5_VLConfig, transformers.Qwen2_5_VLForConditionalGeneration
    config = config_class(
        text_config=dict(model_type=f"{kind}_text", rope_parameters=rope, **text),
        vision_config=vision,
        **_TOKENS,
        **_QWEN_TOKENS,
    )
    return model_class, config


def build(model_class: Any, config: Any, device: str) -> Any:
    torch.manual_seed(0)
    with torch.device(device):
        model = model_class._from_config(config, attn_implementation="sdpa", dtype=torch.bfloat16)
    return model.eval()


class Timer:
    def __init__(self, device: str) -> None:
        self.cuda = device.startswith("cuda")

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def median_ms(self, fn: Callable[[], Any], runs: int, warmup: int) -> float:
        for _ in range(warmup):
            fn()
        self.sync()
        times = []
        for _ in range(runs):
            if self.cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end))
            else:
                began = time.perf_counter()
                fn()
                times.append((time.perf_counter() - began) * 1e3)
        return float(statistics.median(times))


def features(output: Any) -> torch.Tensor:
    pooled = output.pooler_output
    return torch.cat(list(pooled)) if isinstance(pooled, (tuple, list)) else pooled


def compare(stock: torch.Tensor, other: torch.Tensor) -> dict[str, Any]:
    difference = (other.float() - stock.float()).abs()
    return {
        "bit_identical": bool(torch.equal(stock, other)),
        "max_abs_diff": float(difference.max()),
        "relative_error": float(difference.norm() / stock.float().norm().clamp_min(1e-30)),
    }


@contextlib.contextmanager
def sdpa_backends(cudnn: bool | None) -> Iterator[None]:
    """``None``: PyTorch's defaults; False: the cuDNN backend off (restored after)."""
    if cudnn is None or not torch.cuda.is_available():
        yield
        return
    previous = torch.backends.cuda.cudnn_sdp_enabled()
    torch.backends.cuda.enable_cudnn_sdp(cudnn)
    try:
        yield
    finally:
        torch.backends.cuda.enable_cudnn_sdp(previous)


def check(
    model: Any, run: Callable[[], Any], timer: Timer, args: argparse.Namespace, *, pooling: Any = None
) -> dict[str, Any]:
    """Stock vs exact speedups (and optionally all) for one input; ``pooling`` = (module, projected features)."""
    import hieravid

    out: dict[str, Any] = {}
    with torch.inference_mode():
        stock = features(run())
        out["stock_repeat_bit_identical"] = bool(torch.equal(stock, features(run())))
        out["stock_ms"] = timer.median_ms(run, args.runs, args.warmup)
        if pooling is not None:
            module, projected = pooling
            stock_pool = module.apply_pooling(projected)
            out["pooling_stock_ms"] = timer.median_ms(lambda: module.apply_pooling(projected), args.runs, args.warmup)
        with hieravid.apply(model, NONE_POLICY, speedups="exact") as handle:
            out["speedups"] = [speedup.name for speedup in handle.speedups]
            fast = features(run())
            out["exact_ms"] = timer.median_ms(run, args.runs, args.warmup)
            if pooling is not None:
                out["pooling_exact_ms"] = timer.median_ms(
                    lambda: module.apply_pooling(projected), args.runs, args.warmup
                )
                out["pooling_bit_identical"] = bool(torch.equal(module.apply_pooling(projected), stock_pool))
        out["exact"] = compare(stock, fast)
        out["speedup_x"] = out["stock_ms"] / out["exact_ms"]
        with hieravid.apply(model, NONE_POLICY, speedups="none"):
            out["after_remove_bit_identical"] = bool(torch.equal(features(run()), stock))
        if args.compile:
            with hieravid.apply(model, NONE_POLICY, speedups="all") as handle:
                began = time.perf_counter()
                compiled = features(run())
                timer.sync()
                out["all_first_call_s"] = time.perf_counter() - began
                out["all_ms"] = timer.median_ms(run, args.runs, args.warmup)
            out["all"] = compare(stock, compiled)
    return out


def onevision_case(frames: int, batch: int, args: argparse.Namespace, timer: Timer) -> dict[str, Any]:
    model_class, config = onevision_model(args.scale)
    model = build(model_class, config, args.device)
    vision = config.vision_config
    generator = torch.Generator(device="cpu").manual_seed(1)
    pixels = torch.randn(batch, frames, 3, vision.image_size, vision.image_size, generator=generator)
    pixels = pixels.to(args.device, torch.bfloat16)
    module = model.model

    def run() -> Any:
        return module.get_video_features(pixels)

    with torch.inference_mode():  # the projected features apply_pooling receives
        hidden = module.vision_tower(pixels.flatten(0, 1), output_hidden_states=True).hidden_states[-1]
        projected = module.multi_modal_projector(hidden)
    result = {"frames": frames, "batch": batch, **check(model, run, timer, args, pooling=(module, projected))}
    return result


def qwen_case(kind: str, frames: int, height: int, width: int, args: argparse.Namespace, timer: Timer) -> dict:
    model_class, config = qwen_model(kind, args.scale)
    model = build(model_class, config, args.device)
    patch = 14
    grid = torch.tensor([[frames // 2, height // patch, width // patch]], device=args.device)
    count = int(grid.prod())
    generator = torch.Generator(device="cpu").manual_seed(2)
    patches = torch.randn(count, 3 * 2 * patch * patch, generator=generator).to(args.device, torch.bfloat16)

    def run() -> Any:
        return model.model.get_video_features(patches, grid)

    result: dict[str, Any] = {"frames": frames, "pixels": [height, width], "patches": count}
    for name, cudnn in (("sdpa_default", None), ("cudnn_sdp_off", False)):
        if name == "cudnn_sdp_off" and not timer.cuda:
            continue
        with sdpa_backends(cudnn):
            result[name] = check(model, run, timer, args)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--scale", choices=["full", "tiny"], default="full")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--compile", action="store_true", help="also measure speedups='all' (torch.compile)")
    parser.add_argument("--only", nargs="*", help="run only these cases (names as in the output)")
    args = parser.parse_args()
    if str(ROOT) not in sys.path:  # run from a checkout
        sys.path.insert(1, str(ROOT))
    import transformers

    if args.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    timer = Timer(args.device)
    tiny = args.scale == "tiny"
    side = 112 if tiny else 448
    cases: dict[str, Callable[[], dict[str, Any]]] = {
        "llava_onevision_32f": lambda: onevision_case(8 if tiny else 32, 1, args, timer),
        "llava_video_64f": lambda: onevision_case(16 if tiny else 64, 1, args, timer),
        "llava_onevision_32f_batch8": lambda: onevision_case(8 if tiny else 32, 8, args, timer),
        "qwen2_vl_32f": lambda: qwen_case("qwen2_vl", 8 if tiny else 32, side, side, args, timer),
        "qwen2_5_vl_32f": lambda: qwen_case("qwen2_5_vl", 8 if tiny else 32, side, side, args, timer),
        "qwen2_5_vl_32f_336x588": lambda: qwen_case(
            "qwen2_5_vl", 8 if tiny else 32, 84 if tiny else 336, 140 if tiny else 588, args, timer
        ),
    }
    results: dict[str, Any] = {
        "device": torch.cuda.get_device_name() if timer.cuda else args.device,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "dtype": "bfloat16",
        "scale": args.scale,
        "runs": args.runs,
        "warmup": args.warmup,
    }
    began = time.perf_counter()
    for name, job in cases.items():
        if args.only and name not in args.only:
            continue
        try:
            results[name] = job()
        except Exception as error:  # report and go on
            results[name] = {"error": f"{type(error).__name__}: {str(error)[:500]}"}
        if timer.cuda:
            torch.cuda.empty_cache()
        print(name, json.dumps(results[name]), file=sys.stderr, flush=True)
    results["wall_s"] = time.perf_counter() - began
    text = json.dumps(results, indent=2)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
