"""Profile the vision side of every adapter's architecture on a GPU, next to its FLOPs ideal.

Builds only the vision parts (random weights at full size: timing depends only on shapes) of
LLaVA-OneVision-7B / LLaVA-Video-7B (SigLIP-so400m + projector + pooling), Qwen2-VL-7B and Qwen2.5-VL-7B
(vision transformer + patch merger), times each component with CUDA events (median of ``--runs`` after
warm-up), lists the top kernels of each tower from the profiler, and compares stock transformers with
hieravid's exact fixes (channels-last pooling; windowed attention batched into one call per window length)
and, optionally, ``torch.compile`` of the tower.

    python benchmarks/vision_profile.py --out benchmarks/results/vision-profile-h200.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import platform
import statistics
from collections.abc import Callable
from typing import Any

import torch

MATMUL_TFLOPS = 790.0
"""bf16 dense matrix rate measured on one H200 (8192³ products, random data), the FLOPs ideal's rate."""


def time_ms(fn: Callable[[], Any], runs: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(runs):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return float(statistics.median(times))


def top_kernels(fn: Callable[[], Any], count: int = 12) -> dict[str, Any]:
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as profiler:
        fn()
        torch.cuda.synchronize()
    kernels: dict[str, list[float]] = {}
    for event in profiler.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            kernels.setdefault(event.name[:90], []).append(event.device_time / 1000.0)
    rows = sorted(((sum(v), len(v), k) for k, v in kernels.items()), reverse=True)
    total = sum(r[0] for r in rows)
    launches = sum(r[1] for r in rows)
    return {
        "gpu_ms": round(total, 3),
        "kernel_launches": launches,
        "top": [{"kernel": k, "ms": round(ms, 3), "calls": n} for ms, n, k in rows[:count]],
    }


def flops_ms(flops: float) -> float:
    return flops / (MATMUL_TFLOPS * 1e12) * 1e3


# ------------------------------------------------------------------------------------------------ SigLIP
def onevision(frames: int, runs: int, compile_tower: bool) -> dict[str, Any]:
    from transformers import LlavaOnevisionConfig
    from transformers.models.llava_onevision import modeling_llava_onevision as mod

    from hieravid.apps.bench import SIGLIP_SO400M_VISION

    vision = dict(SIGLIP_SO400M_VISION)
    config = LlavaOnevisionConfig(
        text_config=dict(
            model_type="qwen2",
            hidden_size=3584,
            intermediate_size=18944,
            num_hidden_layers=1,
            num_attention_heads=28,
            num_key_value_heads=4,
            vocab_size=1024,
        ),
        vision_config=vision,
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
    )
    config._attn_implementation = "sdpa"
    config.vision_config._attn_implementation = "sdpa"
    from transformers import AutoModel

    with torch.device("cuda"):
        tower = AutoModel.from_config(config.vision_config, dtype=torch.bfloat16).eval()
        projector = mod.LlavaOnevisionMultiModalProjector(config).to(torch.bfloat16).eval()
    pixels = torch.randn(frames, 3, 384, 384, device="cuda", dtype=torch.bfloat16)
    holder = type("Holder", (), {"config": config})()

    def stock_pool(x: torch.Tensor) -> torch.Tensor:
        return mod.LlavaOnevisionModel.apply_pooling(holder, x)

    def fast_pool(x: torch.Tensor) -> torch.Tensor:
        side = config.vision_config.image_size // config.vision_config.patch_size
        n, _, dim = x.shape
        grid = x.view(n, side, side, dim).permute(0, 3, 1, 2)
        pooled = torch.nn.functional.interpolate(grid, size=[math.ceil(side / 2)] * 2, mode="bilinear")
        return pooled.permute(0, 2, 3, 1).reshape(n, -1, dim)

    out: dict[str, Any] = {"frames": frames}
    with torch.inference_mode():
        feats = tower(pixels, output_hidden_states=True).hidden_states[-1]
        projected = projector(feats)
        out["pool_bit_identical"] = bool(torch.equal(stock_pool(projected), fast_pool(projected)))
        out["siglip_ms"] = time_ms(lambda: tower(pixels, output_hidden_states=True), runs)
        out["projector_ms"] = time_ms(lambda: projector(feats), runs)
        out["pool_stock_ms"] = time_ms(lambda: stock_pool(projected), runs)
        out["pool_fast_ms"] = time_ms(lambda: fast_pool(projected), runs)
        tokens, d, m, layers = frames * 729, 1152, 4304, 26
        siglip_flops = layers * (2 * tokens * (4 * d * d + 2 * d * m) + 4 * frames * 729 * 729 * d)
        out["siglip_ideal_ms"] = flops_ms(siglip_flops)
        out["projector_ideal_ms"] = flops_ms(2 * tokens * (1152 * 3584 + 3584 * 3584))
        out["siglip_profile"] = top_kernels(lambda: tower(pixels, output_hidden_states=True))
        for backend in ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION"):
            from torch.nn.attention import SDPBackend, sdpa_kernel

            try:
                with sdpa_kernel([getattr(SDPBackend, backend)]):
                    out[f"siglip_ms_{backend.lower()}"] = time_ms(lambda: tower(pixels), runs)
            except RuntimeError as error:
                out[f"siglip_ms_{backend.lower()}"] = f"unavailable: {str(error)[:120]}"
        if compile_tower:
            reference = tower(pixels).last_hidden_state
            compiled = torch.compile(tower)
            compiled(pixels)
            out["siglip_compiled_ms"] = time_ms(lambda: compiled(pixels), runs)
            diff = (compiled(pixels).last_hidden_state.float() - reference.float()).abs()
            out["siglip_compiled_max_abs_diff"] = float(diff.max())
            out["siglip_compiled_rel_diff"] = float(diff.norm() / reference.float().norm())
    return out


# ------------------------------------------------------------------------------------------------ Qwen
def windowed_attention(
    module: Any,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Any = None,
    scaling: float | None = None,
    dropout: float = 0.0,
    cu_seq_lens_q: torch.Tensor | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Block-diagonal attention over ``cu_seq_lens_q`` windows: one SDPA call per distinct window length."""
    assert cu_seq_lens_q is not None
    bounds = cu_seq_lens_q.tolist()
    lengths = [b - a for a, b in itertools.pairwise(bounds)]
    _, heads, total, dim = query.shape
    output = query.new_empty(total, heads, dim)
    for length in sorted(set(lengths)):
        starts = [a for a, n in zip(bounds, lengths) if n == length]
        if length == 0:
            continue
        index = torch.tensor(starts, device=query.device)[:, None] + torch.arange(length, device=query.device)
        q, k, v = (t[0][:, index].transpose(0, 1) for t in (query, key, value))  # [W, H, L, D]
        o = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scaling)
        output[index.flatten()] = o.transpose(1, 2).reshape(-1, heads, dim)
    return output.unsqueeze(0), None


def qwen(kind: str, frames: int, runs: int) -> dict[str, Any]:
    from transformers import AttentionInterface

    if kind == "qwen2_vl":
        from transformers import Qwen2VLConfig
        from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VisionTransformerPretrainedModel as Tower

        from hieravid.apps.bench import QWEN2_VL_7B_VISION

        config = Qwen2VLConfig(vision_config=dict(QWEN2_VL_7B_VISION)).vision_config
        mlp_flops_per_token = 2 * 2 * 1280 * 5120
    else:
        from transformers import Qwen2_5_VLConfig
        from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel as Tower

        from hieravid.apps.bench import QWEN2_5_VL_7B_VISION

        config = Qwen2_5_VLConfig(vision_config=dict(QWEN2_5_VL_7B_VISION)).vision_config
        mlp_flops_per_token = 2 * 3 * 1280 * 3420
    config._attn_implementation = "sdpa"
    with torch.device("cuda"):
        tower = Tower._from_config(config, dtype=torch.bfloat16).eval()
    side = 32
    grid = torch.tensor([[frames // 2, side, side]], device="cuda")
    patches = torch.randn(frames // 2 * side * side, 3 * 2 * 14 * 14, device="cuda", dtype=torch.bfloat16)
    tokens = patches.shape[0]
    out: dict[str, Any] = {"frames": frames, "patches": tokens}
    attention_flops = 0
    for index in range(32):
        window = kind == "qwen2_5_vl" and index not in (7, 15, 23, 31)
        span = 64 if window else side * side
        attention_flops += 4 * tokens * span * 1280
    flops = 32 * (2 * tokens * 4 * 1280 * 1280 + tokens * mlp_flops_per_token) + attention_flops
    out["tower_ideal_ms"] = flops_ms(flops)
    with torch.inference_mode():
        reference = tower(patches, grid_thw=grid)
        reference = getattr(reference, "pooler_output", reference)
        out["tower_stock_ms"] = time_ms(lambda: tower(patches, grid_thw=grid), runs)
        out["tower_stock_profile"] = top_kernels(lambda: tower(patches, grid_thw=grid))
        AttentionInterface.register("hieravid_flash_windows", windowed_attention)
        config._attn_implementation = "hieravid_flash_windows"
        try:
            batched = tower(patches, grid_thw=grid)
            batched = getattr(batched, "pooler_output", batched)
            out["windowed_bit_identical"] = bool(torch.equal(batched, reference))
            out["windowed_max_abs_diff"] = float((batched.float() - reference.float()).abs().max())
            out["tower_windowed_ms"] = time_ms(lambda: tower(patches, grid_thw=grid), runs)
            out["tower_windowed_profile"] = top_kernels(lambda: tower(patches, grid_thw=grid))
        except Exception as error:  # a profile reports what failed and goes on
            out["windowed_error"] = f"{type(error).__name__}: {str(error)[:300]}"
        finally:
            config._attn_implementation = "sdpa"
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--compile", action="store_true", help="also time torch.compile of the SigLIP tower")
    args = parser.parse_args()
    import transformers

    results: dict[str, Any] = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "dtype": "bfloat16",
        "matmul_tflops_assumed": MATMUL_TFLOPS,
    }
    torch.backends.cuda.matmul.allow_tf32 = False
    for name, job in (
        ("llava_onevision_32f", lambda: onevision(32, args.runs, args.compile)),
        ("llava_video_64f", lambda: onevision(64, args.runs, False)),
        ("qwen2_vl_32f", lambda: qwen("qwen2_vl", 32, args.runs)),
        ("qwen2_5_vl_32f", lambda: qwen("qwen2_5_vl", 32, args.runs)),
    ):
        try:
            results[name] = job()
        except Exception as error:
            results[name] = {"error": f"{type(error).__name__}: {str(error)[:400]}"}
        print(name, json.dumps(results[name])[:1500], flush=True)
    with open(args.out, "w", encoding="utf-8") as handle:
        json.dump(results, handle, indent=2)


if __name__ == "__main__":
    main()
