"""Fuzzing the public API and every ``hieravid`` subcommand with generated bad values, types, files and paths
(issue 17.7).

Whatever the input: the API raises only :class:`~hieravid.errors.HieravidError` subclasses (or returns), and the
command exits 0 or 2 with at most one paragraph on stderr — never a traceback, an internal error, a hang (each
example has a deadline) or a memory blow-up (the process's peak memory is checked around each test).

The command runs in-process (:func:`hieravid.apps.cli.main` with captured output). What a valid command line would
then start — minutes of decoding, generating or benchmarking — is replaced by a stub that stops with a
``HieravidError``: argument checking, file reading and validation run for real; the work itself is tested
elsewhere (tests/test_run.py, test_demo.py, test_bench.py). Examples are derandomized: CI sees the same inputs
every run.
"""

from __future__ import annotations

import contextlib
import io
import json
import resource
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import hieravid
from hieravid import HieravidError
from hieravid.apps import cli
from hieravid.apps.trace import RequestTrace, StageTrace, save_trace

REPO = Path(__file__).resolve().parents[1]
SHIPPED = sorted((REPO / "policies").rglob("*.yaml"))
FUZZ = settings(
    max_examples=40,
    deadline=10_000,  # ms per example: a hang fails the test
    derandomize=True,
    database=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.function_scoped_fixture,
        HealthCheck.data_too_large,
        HealthCheck.filter_too_much,
    ],
)
#: Growth of the process's peak resident memory one fuzz test may cause.
MAX_GROWTH_BYTES = 1 << 30


@pytest.fixture
def bounded_memory():
    """Fails the test if the process's peak resident memory grew by more than :data:`MAX_GROWTH_BYTES`."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux
    yield
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    assert grown < MAX_GROWTH_BYTES, f"peak memory grew by {grown / 2**20:.0f} MiB"


# ---------------------------------------------------------------------------------------------- values
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([0, 1, -1, 2**63, 10**400, 5 * 10**4000]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=30),
    st.sampled_from(["dpp", "explicit", "depth_fraction", "hieravid", "evs", "after_mlp", "", "\x00", "1e400"]),
)
VALUES = st.recursive(
    SCALARS,
    lambda children: st.one_of(
        st.lists(children, max_size=4), st.dictionaries(st.text(max_size=12), children, max_size=4)
    ),
    max_leaves=12,
)


def _paths(tree: Any, prefix: tuple = ()) -> list[tuple]:
    found = [prefix]
    if isinstance(tree, dict):
        for key, value in tree.items():
            found += _paths(value, (*prefix, key))
    elif isinstance(tree, list):
        for index, value in enumerate(tree):
            found += _paths(value, (*prefix, index))
    return found


@st.composite
def mutated_policies(draw: st.DrawFn) -> Any:
    """A shipped policy's mapping with one to three parts replaced, removed or added."""
    data = hieravid.load_policy(draw(st.sampled_from(SHIPPED))).to_dict()
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(_paths(data)))
        value = draw(VALUES)
        if not path:
            data = value if draw(st.booleans()) else data
            continue
        parent = data
        for part in path[:-1]:
            parent = parent[part]
        action = draw(st.sampled_from(["replace", "delete", "add"]))
        if action == "delete" and isinstance(parent, dict):
            parent.pop(path[-1], None)
        elif action == "add" and isinstance(parent, dict):
            parent[draw(st.text(max_size=10))] = value
        else:
            parent[path[-1]] = value
    return data


SELECTORS = ["dpp", "topk_relevance", "binned_relevance", "uniform", "random"]


@st.composite
def plausible_policies(draw: st.DrawFn) -> Any:
    """A shipped policy's mapping with its numbers, switches, selectors and schedule redrawn within (and just past)
    their ranges: mostly valid policies, for the planner and the runtime."""
    data = hieravid.load_policy(draw(st.sampled_from(SHIPPED))).to_dict()
    for path in _paths(data):
        if not path or not draw(st.booleans()):
            continue
        parent = data
        for part in path[:-1]:
            parent = parent[part]
        value, key = parent[path[-1]], path[-1]
        if isinstance(value, bool):
            parent[key] = draw(st.booleans())
        elif isinstance(value, float):
            parent[key] = draw(st.floats(0.0, 0.99))
        elif isinstance(value, int):
            parent[key] = draw(st.integers(0, 70))
        elif key == "kind" and value in SELECTORS:
            parent[key] = draw(st.sampled_from(SELECTORS))
    if draw(st.booleans()):
        layers = sorted(draw(st.sets(st.integers(0, 40), min_size=1, max_size=4)))
        stages = [{"layer": layer, "prune_ratio": draw(st.floats(0.0, 0.95))} for layer in layers]
        data.setdefault("layer", {})["schedule"] = {"kind": "explicit", "stages": stages}
    if draw(st.booleans()):
        data.setdefault("frame", {})["relevance"] = {"query_rows": draw(st.one_of(st.none(), st.integers(1, 64)))}
    return data


def _yaml_text(data: Any) -> str:
    try:
        return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)
    except (yaml.YAMLError, ValueError, RecursionError):
        return repr(data)


YAML_TEXTS = st.one_of(
    mutated_policies().map(_yaml_text),
    st.text(max_size=200),
    st.binary(max_size=200).map(lambda raw: raw.decode("latin-1")),
    st.sampled_from(
        [
            "a: &x [1, 2]\nb: *x\n",
            "version: 1\nversion: 1\n",
            "[" * 5000,
            "{" * 50 + "}" * 50,
            "!!python/object/apply:os.system ['true']\n",
            "version: 1\nkind: PruningPolicy\nname: x\nsegment: {kind: random, seed: 0x" + "f" * 3000 + "}\n",
            "\ufeffversion: 1\n",
        ]
    ),
)


# ---------------------------------------------------------------------------------------------- API
@FUZZ
@given(text=YAML_TEXTS, as_file=st.booleans())
def test_load_policy_accepts_or_raises_a_policy_error(text: str, as_file: bool, tmp_path_factory, bounded_memory):
    source: Any = text
    if as_file:
        path = tmp_path_factory.mktemp("policy") / "p.yaml"
        path.write_bytes(text.encode("utf-8", "surrogatepass"))
        source = path
    try:
        policy = hieravid.load_policy(source)
    except hieravid.PolicyError:
        return
    assert isinstance(policy, hieravid.Policy)


@FUZZ
@given(data=plausible_policies(), model=st.sampled_from(["llava-onevision-7b", "qwen2-vl-7b", "llava-video-7b"]))
def test_compile_plan_accepts_or_raises_a_hieravid_error(data: Any, model: str, bounded_memory) -> None:
    try:
        policy = hieravid.policy_from_dict(data)
    except hieravid.PolicyError:
        assume(False)
    frames = [None, 1, 2, 3, 4096]
    for count in frames:
        try:
            plan = hieravid.compile_plan(policy, model, frames=count)
        except HieravidError:
            continue
        assert 0.0 <= plan.retention <= 1.0 and len(plan.layer_video_tokens) == plan.spec.num_layers


@FUZZ
@given(value=st.one_of(VALUES, st.sampled_from([3.5, b"version: 1", object(), Path("/"), Path("/dev/null")])))
def test_the_api_refuses_other_types_with_hieravid_errors(value: Any, bounded_memory) -> None:
    for call in (
        lambda: hieravid.load_policy(value),
        lambda: hieravid.compile_plan(value, "llava-onevision-7b"),
        lambda: hieravid.compile_plan("hieravid-30", value),
        lambda: hieravid.load_spec(value),
    ):
        try:
            call()
        except HieravidError:
            pass


@settings(FUZZ, max_examples=12, deadline=60_000)
@given(data=plausible_policies())
def test_apply_installs_and_runs_or_raises_a_hieravid_error(data: Any, tiny_builders, bounded_memory) -> None:
    """On the tiny LLaVA-OneVision: every policy that validates is applied and prunes a real forward, or fails with a
    HieravidError before touching the model."""
    case = tiny_builders.tiny_case("llava_onevision")
    try:
        policy = hieravid.policy_from_dict(data)
    except hieravid.PolicyError:
        assume(False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        handle = hieravid.apply(case.model, policy)
    except HieravidError:
        return
    finally:
        torch.set_num_threads(threads)
    try:
        torch.set_num_threads(1)
        with torch.no_grad():
            case.model(**case.inputs(seed=3))
    except HieravidError:
        pass
    finally:
        handle.remove()
        torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------- CLI
class _Stopped(HieravidError):
    """What the stubs raise where a valid command line would start its work."""


def _stop(*args: Any, **kwargs: Any) -> Any:
    raise _Stopped("stub: the arguments were accepted and the work would start here")


@pytest.fixture
def cli_stubs(monkeypatch: pytest.MonkeyPatch) -> None:
    from hieravid.apps import bench, demo, run

    monkeypatch.setattr(run, "load_model", _stop)
    monkeypatch.setattr(demo, "run_demo", _stop)
    monkeypatch.setattr(demo, "save_demo_checkpoint", _stop)
    monkeypatch.setattr(bench, "run_benchmark", _stop)
    monkeypatch.setattr(bench, "run_batch_benchmark", _stop)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Files and paths the fuzzer passes where the command expects a policy, model, video, trace or output."""
    root = tmp_path_factory.mktemp("fuzz-files")
    (root / "folder").mkdir()
    (root / "folder" / "config.json").write_text("{}")
    (root / "random.bin").write_bytes(bytes(range(256)) * 40)
    (root / "text.txt").write_text("not a video, not a policy\n" * 20)
    (root / "empty").write_bytes(b"")
    (root / "bomb.yaml").write_text("a: &a [1,1,1,1,1,1,1,1,1]\nb: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]\nc: [*b,*b,*b]\n")
    config = {"model_type": "llava_onevision", "text_config": {"model_type": "qwen2", "num_hidden_layers": 10**9}}
    (root / "config.json").write_text(json.dumps(config))
    (root / "junk.json").write_text('{"model_type": "qwen2_vl", "vision_config": [1, {"a": null}]}')
    trace = RequestTrace(
        frames=2,
        rows=2,
        cols=2,
        frame_segment_ids=torch.tensor([0, 1]),
        segment_values=torch.tensor([1.0, -1.0]),
        stages=[StageTrace(1, torch.tensor([0, 5]))],
    )
    good = save_trace(root / "trace.safetensors", trace)
    raw = bytearray(good.read_bytes())
    for index in range(20, min(len(raw), 400), 37):  # flip bytes in the header (metadata JSON)
        raw[index] ^= 0x5A
    (root / "flipped.safetensors").write_bytes(bytes(raw))
    entries = {path.name: str(path) for path in root.iterdir()}
    entries.update(missing=str(root / "missing.yaml"), nested=str(root / "random.bin" / "x.png"), root="/")
    return entries


ARG_VALUES = st.one_of(
    st.sampled_from(
        ["0", "-5", "1", "8", "999999999999999999999", "1e400", "nan", "", " ", "\x00", "cpu", "cuda", "tpu", "auto"]
    ),
    st.sampled_from(["hieravid-30", "none", "peers/fastv", "llava-onevision-7b", "qwen2-vl-7b", "all", "tiny"]),
    st.text(max_size=20),
)
#: Per subcommand: (positional arguments, required options, other options).
COMMANDS: dict[str, tuple[tuple[int, int], list[str], list[str]]] = {
    "plan": ((1, 1), ["--model"], ["--frames", "--json"]),
    "validate": ((1, 3), [], []),
    "compare": ((1, 3), ["--model"], ["--frames", "--json", "--markdown"]),
    "policies": ((0, 1), [], []),
    "run": ((0, 0), ["--model", "--video", "--question", "--policy"], ["--frames", "--device", "--dtype", "--trace"]),
    "demo": ((0, 0), [], ["--out", "--frames", "--policy", "--seed", "--export", "--arch"]),
    "viz": ((1, 1), ["-o"], ["--request", "--max-frames"]),
    "bench": (
        (0, 0),
        [],
        ["--model", "--policy", "--frames", "--size", "--device", "--runs", "--warmup", "--out", "--batch", "--ragged"],
    ),
}
FLAGS = {"--json", "--markdown", "--ragged"}


@st.composite
def command_lines(draw: st.DrawFn, files: dict[str, str]) -> list[str]:
    """A subcommand with its positionals and required options (mostly), and some of its other options."""
    command = draw(st.sampled_from(sorted(COMMANDS)))
    (least, most), required, optional = COMMANDS[command]
    values = st.one_of(ARG_VALUES, st.sampled_from(sorted(files.values())))
    argv = [command, *draw(st.lists(values, min_size=least, max_size=most))]
    chosen = [option for option in required if draw(st.integers(0, 9))]  # now and then one is missing
    chosen += draw(st.lists(st.sampled_from(optional), max_size=4, unique=True)) if optional else []
    for option in chosen:
        argv += [option] if option in FLAGS else [option, draw(values)]
    return argv


def _main(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = cli.main(argv)
        except SystemExit as exit_:  # argparse: usage errors (2) and --help (0)
            code = exit_.code if isinstance(exit_.code, int) else 2
    return code, out.getvalue(), err.getvalue()


@settings(FUZZ, max_examples=150)
@given(data=st.data())
def test_every_subcommand_exits_0_or_2_without_a_traceback(data, files, cli_stubs, bounded_memory, monkeypatch):
    monkeypatch.chdir(Path(files["folder"]).parent)
    argv = data.draw(command_lines(files), label="argv")
    code, _, err = _main(argv)
    assert code in (0, 2), (argv, code, err)
    assert "Traceback" not in err and "internal error" not in err, (argv, err)
    if code == 2:
        assert err.strip() and "\n\n" not in err.strip(), (argv, err)


def test_the_stubs_are_reached(files, cli_stubs, capsys) -> None:
    """The fuzzer's valid command lines really get past every check (else it would only test argparse)."""
    for argv in (
        ["run", "--model", files["folder"], "--video", str(REPO / "tests" / "media.py"), "--question", "q"],
        ["demo", "--out", files["folder"] + "/out"],
        ["demo", "--export", files["folder"] + "/new"],
        ["bench", "--size", "tiny", "--device", "cpu"],
        ["bench", "--size", "tiny", "--device", "cpu", "--batch", "1", "4", "--ragged"],
    ):
        code, _, err = _main([*argv, "--policy", "hieravid-30"] if argv[0] != "bench" else argv)
        if argv[0] == "run":
            assert code == 2 and "video" in err  # a Python file is not a video: refused before the model
        else:
            assert code == 2 and "stub: the arguments were accepted" in err, (argv, err)


def test_bench_batch_sizes_must_be_positive(cli_stubs) -> None:
    for bad in (["--batch", "0"], ["--batch", "4", "-2"], ["--batch", "x"], ["--batch"], ["--ragged"]):
        code, _, err = _main(["bench", "--size", "tiny", "--device", "cpu", *bad])
        assert code == 2 and "Traceback" not in err and ("--batch" in err or "batch" in err), (bad, err)


# ---------------------------------------------------------------------------------------------- processes
def test_hostile_files_through_the_installed_command(files) -> None:
    """The console script itself on an alias bomb and a config that used to hang ``plan`` (10**9 layers)."""
    script = Path(sys.executable).with_name("hieravid")
    for argv in (["validate", files["bomb.yaml"]], ["plan", "hieravid-30", "--model", files["config.json"]]):
        result = subprocess.run([str(script), *argv], capture_output=True, text=True, timeout=120)
        assert result.returncode == 2, result.stderr
        assert "Traceback" not in result.stderr and result.stderr.count("\n") == 1, result.stderr
