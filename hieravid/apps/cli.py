"""The ``hieravid`` command line.

Every subcommand exits 0 on success and 2 on bad input, printing one paragraph on stderr (a
traceback only with ``--debug``); an unexpected failure (a bug) exits 70 with one line saying so.
Output cut short by the reader (``hieravid plan ... | head``) ends quietly. Subcommands that need
torch/transformers import them lazily.
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

from hieravid.errors import HieravidError

EXIT_OK = 0
EXIT_BAD_INPUT = 2
EXIT_INTERNAL = 70  # sysexits' EX_SOFTWARE
#: Largest count any option accepts (frames, tokens, runs): larger values are typos, not requests.
MAX_COUNT = 100_000

Command = Callable[[argparse.Namespace], int]


def _cmd_plan(args: argparse.Namespace) -> int:
    from hieravid.plan import compile_plan
    from hieravid.policy import load_policy_file

    plan = compile_plan(load_policy_file(args.policy), args.model, frames=args.frames)
    print(plan.to_json() if args.json else plan)
    return EXIT_OK


def _cmd_validate(args: argparse.Namespace) -> int:
    from hieravid.policy import load_policy_file

    failures = []
    for path in args.policies:
        try:
            policy = load_policy_file(path)
        except HieravidError as error:
            failures.append(str(error))
            continue
        print(f"{path}: ok ({policy.name})")
    if failures:
        raise HieravidError("\n".join(failures))
    return EXIT_OK


def _cmd_compare(args: argparse.Namespace) -> int:
    from hieravid.plan import compile_plan
    from hieravid.policy import load_policy_file

    plans = [compile_plan(load_policy_file(path), args.model, frames=args.frames) for path in args.policies]
    if args.json:
        print(json.dumps([plan.to_dict() for plan in plans], indent=2))
        return EXIT_OK
    print(format_comparison(plans, markdown=args.markdown))
    return EXIT_OK


def _cmd_policies(args: argparse.Namespace) -> int:
    from hieravid.policy import load_policy_file, shipped_policies

    shipped = shipped_policies()
    if args.name:
        policy = load_policy_file(args.name)  # a name, its policy's own name, or a file
        entry = shipped.get(args.name.removesuffix(".yaml"))
        print(entry.read_text(encoding="utf-8") if entry is not None else policy.to_yaml(), end="")
        return EXIT_OK
    if not shipped:
        raise HieravidError("no shipped policies found: this installation of hieravid lacks its package data")
    width = max(len(name) for name in shipped)
    print("shipped policies (use a name wherever a policy file goes: hieravid plan hieravid-30 --model ...,")
    print(
        "hieravid run --policy hieravid-20, hieravid.apply(model, 'hieravid-30'); `hieravid policies NAME` prints one)"
    )
    for name in shipped:
        policy = load_policy_file(name)
        label = "" if policy.name == name.rsplit("/", 1)[-1] else f" [{policy.name}]"
        print(f"  {name:<{width}}  {policy.description or '-'}{label}")
    return EXIT_OK


def _cmd_run(args: argparse.Namespace) -> int:
    from hieravid.apps.run import run_command

    return run_command(args)


def _cmd_demo(args: argparse.Namespace) -> int:
    from hieravid.apps.demo import demo_command

    return demo_command(args)


def _cmd_viz(args: argparse.Namespace) -> int:
    from hieravid.apps.viz import viz_command

    return viz_command(args)


def _cmd_bench(args: argparse.Namespace) -> int:
    from hieravid.apps import bench

    models = bench.BENCH_MODELS if args.model == ["all"] else args.model
    unknown = sorted(set(models) - set(bench.BENCH_MODELS))
    if unknown:
        raise HieravidError(
            f"--model {', '.join(unknown)}: not a benchmark model; choose from {', '.join(bench.BENCH_MODELS)} or 'all'"
        )
    policies = _bench_policies(args.policy)
    args.device = _bench_device(args.device, args.size)
    if args.out:
        from hieravid.apps.paths import check_output_file

        check_output_file(args.out, option="--out")
    if args.ragged and not args.batch:
        raise HieravidError("--ragged needs --batch N [N ...]: it adds left-padded batches to the batched rows")
    if args.batch and set(models) - set(bench.BATCH_MODELS):
        raise HieravidError(
            f"--batch: {', '.join(sorted(set(models) - set(bench.BATCH_MODELS)))} builds its prompts with a builder of "
            f"its own that draws no further samples; batched runs cover {', '.join(bench.BATCH_MODELS)}"
        )
    log = (lambda message: print(message, file=sys.stderr)) if args.json else print
    common = dict(
        frames=args.frames,
        size=args.size,
        device=args.device,
        dtype=args.dtype,
        runs=args.runs,
        warmup=args.warmup,
        log=log,
        checkpoint=partial(bench.write_report, path=args.out) if args.out else None,
        cudnn_sdp=args.cudnn_sdp,
        cuda_graphs=args.cuda_graphs,
        speedups=args.speedups,
    )
    if args.batch:
        report = bench.run_batch_benchmark(models, policies, args.batch, ragged=args.ragged, **common)
    else:
        report = bench.run_benchmark(models, policies, decode_tokens=args.decode_tokens, **common)
    with bench.sdpa_backends(args.cudnn_sdp):
        _bench_extras(args, bench, models, policies, report)
    if args.out:
        bench.write_report(report, args.out)
    print(json.dumps(report, indent=2) if args.json else bench.format_report(report))
    return EXIT_OK


def _bench_policies(given: Sequence[str] | None) -> list[str]:
    """The policies to time, as strings ``load_policy`` reads: files, or shipped policies by name (the default:
    the shipped HieraVid policies, wherever hieravid runs from)."""
    from hieravid.policy import load_policy_file, shipped_policies

    if not given:
        given = [name for name in shipped_policies() if name.startswith("hieravid-")]
        if not given:
            raise HieravidError("no shipped HieraVid policy found; pass --policy FILE")
    resolved = []
    for policy in given:
        load_policy_file(policy)  # an error here, before any model is built
        path = Path(policy)
        resolved.append(str(path) if path.is_file() else policy)
    return resolved


def _bench_device(device: str, size: str) -> str:
    """``auto``: CUDA when available, else the CPU; full-size models need CUDA."""
    from hieravid.apps.run import resolve_device

    resolved = resolve_device(device)
    if size == "full" and not resolved.startswith("cuda"):
        raise HieravidError(
            f"--size full builds 7B-shaped models (about 15 GiB of weights): it needs a CUDA device, and this run "
            f"would use {resolved}; pass --size tiny to check the path on a CPU"
        )
    return resolved


def _bench_extras(
    args: argparse.Namespace, bench: Any, models: Sequence[str], policies: Sequence[str], report: dict[str, Any]
) -> None:
    log = (lambda message: print(message, file=sys.stderr)) if args.json else print
    if args.sweep:
        name = models[0]
        sweep = bench.run_frames_sweep(
            name,
            args.sweep,
            policies[0],
            size=args.size,
            device=args.device,
            dtype=args.dtype,
            runs=args.runs,
            warmup=args.warmup,
            log=log,
            cuda_graphs=args.cuda_graphs,
        )
        report["frames_sweep"] = {"model": name, "policy": policies[0], "rows": sweep}
        if args.out:
            bench.write_report(report, args.out)
            bench.plot_sweep(
                sweep,
                args.out.with_name(f"{args.out.stem}-sweep.png"),
                f"{name}: LLM prefill vs frames ({report['environment'].get('gpu') or args.device})",
            )
    if args.profile:
        case = bench.build_case(models[0], frames=args.frames, size=args.size, device=args.device, dtype=args.dtype)
        report["profile"] = bench.profile_prefill(case, policies[0], device=args.device, cuda_graphs=args.cuda_graphs)


def _frame_list(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip() and len(part) <= 20]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated frame counts like 16,32,64, got {text!r}") from None
    if not values or min(values) < 1 or max(values) > MAX_COUNT:
        raise argparse.ArgumentTypeError(f"expected positive frame counts up to {MAX_COUNT}, got {text[:60]!r}")
    return values


def stage_selectors(plan: Any) -> str:
    """The stages' selectors: one name when they all agree, else one per stage; ``(global)`` when the frame
    level is off (one budget over the whole video); ``-`` without stages."""
    names = [stage.selector.kind + ("" if stage.per_segment else " (global)") for stage in plan.stages]
    if not names:
        return "-"
    return names[0] if len(set(names)) == 1 else ", ".join(names)


def format_comparison(plans: Sequence, *, markdown: bool = False) -> str:
    """A side-by-side table of plans: retention, input keep, FLOPs ratio and per-stage budgets.

    ``markdown=True`` gives a GitHub-flavoured Markdown table (no title line; ``docs/policies.md``)."""
    header = [
        "policy",
        "input level",
        "retention",
        "input keep",
        "FLOPs ratio",
        "layer-0 tokens",
        "stages (layer: tokens after)",
        "stage selectors",
    ]
    rows = []
    for plan in plans:
        rows.append(
            [
                plan.policy.name,
                f"{plan.segment.kind} {plan.segment.prune_ratio:g}" if plan.segment.enabled else "off",
                f"{plan.retention:.3f}",
                f"{plan.input_keep_fraction:.3f}",
                f"{plan.flops_ratio:.3f}",
                str(plan.segment.video_tokens_after),
                ", ".join(f"{stage.layer}: {stage.video_tokens_after}" for stage in plan.stages) or "-",
                stage_selectors(plan),
            ]
        )
    if markdown:
        table = [header, ["---"] * len(header), *rows]
        return "\n".join("| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in table)
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in [header, *rows]]
    lines.insert(1, "  ".join("-" * width for width in widths))
    spec = plans[0].spec if plans else None
    if spec is not None:
        lines.insert(
            0, f"{spec.name}: {spec.frames} frames, N_v = {spec.video_tokens} video tokens, {spec.num_layers} layers"
        )
    return "\n".join(lines)


def _count(text: str, *, minimum: int) -> int:
    what = "a positive integer" if minimum == 1 else "a non-negative integer"
    try:
        value = int(text.strip()) if len(text) <= 20 else None
    except ValueError:
        value = None
    if value is None:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text[:40]!r}")
    if not minimum <= value <= MAX_COUNT:
        raise argparse.ArgumentTypeError(f"expected {what} up to {MAX_COUNT}, got {value}")
    return value


def _positive_int(text: str) -> int:
    return _count(text, minimum=1)


def _non_negative_int(text: str) -> int:
    return _count(text, minimum=0)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand (also used to render ``--help``)."""
    parser = argparse.ArgumentParser(
        prog="hieravid",
        description="Hierarchical video-token pruning for Video LLMs: plan, validate and compare YAML policies.",
    )
    parser.add_argument("--debug", action="store_true", help="show a traceback on errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    plan = sub.add_parser("plan", help="compile a policy for a model and print the per-layer plan")
    plan.add_argument("policy", help="policy YAML file or shipped policy name (e.g. hieravid-30; hieravid policies)")
    plan.add_argument(
        "--model", required=True, help="catalogue name (e.g. llava-onevision-7b), config.json or checkpoint folder"
    )
    plan.add_argument("--frames", type=_positive_int, help="frames as the LLM sees them (default: the model's)")
    plan.add_argument("--json", action="store_true", help="print the plan as JSON")
    plan.set_defaults(handler=_cmd_plan)

    validate = sub.add_parser("validate", help="validate one or more policy files")
    validate.add_argument("policies", nargs="+", help="policy YAML files (or shipped policy names)")
    validate.set_defaults(handler=_cmd_validate)

    compare = sub.add_parser("compare", help="compile several policies for one model and print them side by side")
    compare.add_argument("policies", nargs="+", help="policy YAML files or shipped policy names")
    compare.add_argument("--model", required=True, help="catalogue name, config.json or checkpoint folder")
    compare.add_argument("--frames", type=_positive_int, help="frames as the LLM sees them (default: the model's)")
    compare.add_argument("--json", action="store_true", help="print the plans as a JSON list")
    compare.add_argument("--markdown", action="store_true", help="print a Markdown table")
    compare.set_defaults(handler=_cmd_compare)

    policies = sub.add_parser(
        "policies", help="list the policies shipped with hieravid (usable by name), or print one as YAML"
    )
    policies.add_argument("name", nargs="?", help="print this shipped policy's YAML (e.g. hieravid-30)")
    policies.set_defaults(handler=_cmd_policies)

    run = sub.add_parser("run", help="answer a question about a video with a real checkpoint, pruned by a policy")
    run.add_argument(
        "--model", required=True, help="checkpoint folder or Hugging Face id (local cache only unless --download)"
    )
    run.add_argument("--video", required=True, help="video file (any format FFmpeg/PyAV decodes)")
    run.add_argument("--question", required=True, help="the question about the video")
    run.add_argument(
        "--policy", required=True, help="policy YAML file or shipped policy name (e.g. hieravid-30; hieravid policies)"
    )
    run.add_argument("--frames", type=_positive_int, default=32, help="frames sampled uniformly (default: 32)")
    run.add_argument("--device", default="auto", help="auto, cuda, cuda:N or cpu (default: cuda when available)")
    run.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "float16", "bfloat16"],
        help="weights dtype (default: bfloat16 on CUDA, float32 on CPU)",
    )
    run.add_argument("--max-new-tokens", type=_positive_int, default=64, help="answer length limit (default: 64)")
    run.add_argument("--compare-unpruned", action="store_true", help="also run unpruned: answers and speedup")
    run.add_argument("--trace", metavar="FILE.safetensors", help="save what each level decided (see hieravid viz)")
    run.add_argument(
        "--warmup",
        type=int,
        default=1,
        choices=[0, 1, 2, 3],
        help="unmeasured warm-up generations before timing (default: 1)",
    )
    _speedups_option(run, "--compare-unpruned runs the stock model")
    run.add_argument("--download", action="store_true", help="allow fetching the model from the Hugging Face Hub")
    run.set_defaults(handler=_cmd_run)

    demo = sub.add_parser(
        "demo", help="HieraVid end to end on a tiny random model and a synthetic video (CPU, offline)"
    )
    demo.add_argument(
        "--out", default="hieravid-demo", help="output folder: trace, picture, video (default: hieravid-demo)"
    )
    demo.add_argument("--frames", type=_positive_int, default=32, help="frames of the synthetic video (default: 32)")
    demo.add_argument("--policy", default=None, help="policy YAML file or shipped name (default: hieravid-30)")
    demo.add_argument(
        "--seed", type=_non_negative_int, default=0, help="seed of the random weights and textures (default: 0)"
    )
    demo.add_argument(
        "--export",
        metavar="DIR",
        help="instead, write the tiny model as a complete local checkpoint (weights, tokenizer, processor, chat "
        "template) plus the video into DIR (a new or empty folder), for hieravid run --model DIR",
    )
    demo.add_argument(
        "--arch",
        default="llava_onevision",
        choices=["llava_onevision", "qwen2_vl"],
        help="architecture of the model --export writes (default: llava_onevision)",
    )
    demo.set_defaults(handler=_cmd_demo)

    viz = sub.add_parser("viz", help="draw a trace: kept/merged/pruned tokens per stage and the segment timeline")
    viz.add_argument("trace", help="trace file written by --trace or hieravid demo")
    viz.add_argument("-o", "--output", required=True, help="image to write (.png, .svg or .pdf)")
    viz.add_argument("--request", type=_non_negative_int, default=0, help="request index in the trace (default: 0)")
    viz.add_argument("--max-frames", type=_positive_int, default=16, help="frames drawn at most (default: 16)")
    viz.set_defaults(handler=_cmd_viz)

    bench = sub.add_parser(
        "bench",
        help="time the unpruned model and policies end to end (random weights; GPU for real numbers)",
        description="Build random-weight models with full-size shapes (timing depends only on shapes) and measure, "
        "for the unpruned model and each policy: LLM prefill ms, time to first token, decode ms/token, peak GPU "
        "memory, KV-cache bytes, hieravid's own overhead, and the FLOPs ideal (unpruned prefill × the plan's FLOPs "
        "ratio). Median of --runs runs after --warmup, batch 1, SDPA.",
    )
    bench.add_argument(
        "--model",
        nargs="+",
        default=["llava-onevision-7b"],
        help="llava-onevision-7b, llava-video-7b, qwen2-vl-7b, qwen2.5-vl-7b, or 'all' (default: llava-onevision-7b)",
    )
    bench.add_argument(
        "--policy",
        nargs="+",
        help="policy YAML files or shipped names (default: the shipped hieravid-10, hieravid-20, hieravid-30)",
    )
    bench.add_argument(
        "--frames",
        type=_positive_int,
        help="sampled frames (default: 32 for OneVision and Qwen2-VL, 64 for LLaVA-Video)",
    )
    bench.add_argument(
        "--size",
        choices=["full", "tiny"],
        default="full",
        help="full: 7B shapes (needs CUDA); tiny: small models to check the path on a CPU (default: full)",
    )
    bench.add_argument("--device", default="auto", help="auto, cuda, cuda:N or cpu (default: cuda when available)")
    bench.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    bench.add_argument("--runs", type=_positive_int, default=5, help="timed runs per measurement (median)")
    bench.add_argument("--warmup", type=_non_negative_int, default=2, help="untimed runs first (default: 2)")
    bench.add_argument(
        "--decode-tokens", type=_non_negative_int, default=64, help="tokens for the decode measurement (0: skip)"
    )
    bench.add_argument(
        "--sweep",
        type=_frame_list,
        help="also sweep frame counts for the first model and policy, e.g. 16,32,64,128,256",
    )
    bench.add_argument(
        "--batch",
        nargs="+",
        type=_positive_int,
        metavar="N",
        help="measure batched throughput instead: for each batch size N, videos/s of a prefill plus one new token "
        "(N / TTFT) and peak memory, unpruned and each policy, every sample with its own video (e.g. --batch 1 4 8 16)",
    )
    bench.add_argument(
        "--ragged",
        action="store_true",
        help="with --batch: also left-padded batches whose prompts differ in length (sample i: 8·i more tokens)",
    )
    bench.add_argument("--profile", action="store_true", help="profile one pruned prefill of the first model/policy")
    bench.add_argument("--out", type=Path, help="write the JSON report here (and sweep plots next to it)")
    bench.add_argument(
        "--cudnn-sdp",
        action="store_true",
        help="keep PyTorch's cuDNN SDPA backend on (off by default: on torch 2.11 it builds a plan on "
        "the host at every decode step)",
    )
    bench.add_argument(
        "--cuda-graphs",
        action="store_true",
        help="replay pruned prefills from CUDA graphs (apply(..., cuda_graphs=True)): the input level, and from "
        "layer 0 on whole prefills of a repeated schedule; bit-identical, more memory (graph buffers)",
    )
    _speedups_option(bench, "the unpruned row runs the stock model; an unpruned+SPEEDUPS row the speedups alone")
    bench.add_argument("--json", action="store_true", help="print JSON instead of the table")
    bench.set_defaults(handler=_cmd_bench)
    return parser


def _speedups_option(parser: argparse.ArgumentParser, baseline: str) -> None:
    parser.add_argument(
        "--speedups",
        choices=["exact", "all", "none"],
        default="exact",
        help="the adapter's vision-side speedups installed with the policy: exact (default: bit-identical "
        "outputs), all (also torch.compile of the vision tower: not bit-identical), none (stock transformers); "
        f"{baseline}",
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``hieravid`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code = args.handler(args)
        sys.stdout.flush()  # a closed pipe shows here, not at interpreter exit
        return code
    except HieravidError as error:
        if args.debug:
            traceback.print_exc()
        print(f"hieravid {args.command}: error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except BrokenPipeError:
        _silence_stdout()
        return EXIT_OK
    except KeyboardInterrupt:
        print("hieravid: interrupted", file=sys.stderr)
        return 130
    except Exception as error:
        if args.debug:
            traceback.print_exc()
        detail = " ".join(str(error).split())[:300]
        print(
            f"hieravid {args.command}: internal error (a bug in hieravid, not your input): {type(error).__name__}: "
            f"{detail}. Rerun with --debug for the traceback and report it.",
            file=sys.stderr,
        )
        return EXIT_INTERNAL


def _silence_stdout() -> None:
    """The reader closed stdout (``| head``): point it at /dev/null so that the final flush stays quiet."""
    import os

    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # stdout is not a file descriptor (captured in-process)
        pass


if __name__ == "__main__":
    sys.exit(main())
