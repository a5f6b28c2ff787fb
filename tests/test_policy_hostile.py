"""Hostile policy files: whatever a file holds, loading it costs little time and memory and fails with a
:class:`PolicyError` naming the problem (issue 17.5, 17.6, 17.8).

Both YAML back ends are checked: LibYAML's parser (the default when PyYAML has it) and PyYAML's pure-Python one.
"""

from __future__ import annotations

import os
import time
import tracemalloc
import typing
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

import hieravid.policy as policy_module
from hieravid import PolicyError, load_policy
from hieravid.policy import MAX_LISTED_PROBLEMS, MAX_POLICY_BYTES, MAX_POLICY_DEPTH, Policy

REPO = Path(__file__).resolve().parents[1]
HEADER = "version: 1\nkind: PruningPolicy\nname: t\n"

LOADERS = {"python": policy_module._PyPolicyLoader}
if getattr(yaml, "__with_libyaml__", False):
    LOADERS["libyaml"] = policy_module._CPolicyLoader


@pytest.fixture(params=sorted(LOADERS))
def loader(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setattr(policy_module, "_PolicyLoader", LOADERS[request.param])
    return request.param


def alias_bomb(levels: int = 9, width: int = 9) -> str:
    """The "billion laughs": each level a list of ``width`` aliases of the previous one (9×9: 9⁹ strings from
    under 500 bytes)."""
    lines = ["a0: &a0 [" + ", ".join(['"lol"'] * width) + "]"]
    for level in range(1, levels):
        lines.append(f"a{level}: &a{level} [" + ", ".join([f"*a{level - 1}"] * width) + "]")
    return HEADER + "\n".join(lines) + f"\ndescription: *a{levels - 1}\n"


def _load_costs(text_or_path: str | Path) -> tuple[str, float, int]:
    """The error message, seconds and peak Python memory (bytes) of loading a policy that must fail."""
    tracemalloc.start()
    start = time.perf_counter()
    try:
        with pytest.raises(PolicyError) as caught:
            load_policy(text_or_path)
        seconds = time.perf_counter() - start
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return str(caught.value), seconds, peak


# ---------------------------------------------------------------------------------------------- 17.5
def test_an_alias_bomb_is_refused_at_once(loader: str, tmp_path: Path) -> None:
    path = tmp_path / "bomb.yaml"
    path.write_text(alias_bomb())
    message, seconds, peak = _load_costs(path)
    assert str(path) in message and "anchors and aliases are not allowed" in message
    # Before the fix: 28 s and 3 GB in `hieravid validate`. Generous bounds for a loaded CI runner.
    assert seconds < 5.0 and peak < 50 * 2**20, (seconds, peak)


@pytest.mark.parametrize(
    "body",
    [
        "description: &text hello\n",  # an anchor alone
        "segment: &s {merge_ratio: 0.4}\nframe: {enabled: false}\n",
        "frame: {selector: {kind: dpp}}\nlayer: {prune_point: *p}\n",  # an alias of nothing
    ],
)
def test_anchors_and_aliases_are_refused(loader: str, body: str) -> None:
    with pytest.raises(PolicyError, match="anchors and aliases are not allowed"):
        load_policy(HEADER + body)


@pytest.mark.parametrize(
    ("body", "key", "line"),
    [
        ("name: other\n", "'name'", 3),  # silently the last one before
        ("segment:\n  merge_ratio: 0.5\n  merge_ratio: 0.1\n", "'merge_ratio'", 5),
        ("frame: {enabled: true, enabled: false}\n", "'enabled'", 4),
        ("layer: {schedule: {kind: explicit, stages: [{layer: 2, layer: 3, prune_ratio: 0.5}]}}\n", "'layer'", 4),
    ],
)
def test_duplicate_keys_are_refused(loader: str, body: str, key: str, line: int, tmp_path: Path) -> None:
    path = tmp_path / "dup.yaml"
    path.write_text(HEADER + body)
    with pytest.raises(PolicyError) as caught:
        load_policy(path)
    message = str(caught.value)
    assert str(path) in message and f"found the key {key} again" in message and f"first at line {line}" in message


def test_merge_keys_are_refused(loader: str) -> None:
    with pytest.raises(PolicyError, match=r"merge keys \(<<\) are not allowed"):
        load_policy(HEADER + "segment:\n  <<: {merge_ratio: 0.1}\n  enabled: true\n")


@pytest.mark.parametrize("style", ["flow", "block", "flow-unclosed"])
def test_deep_nesting_is_refused(loader: str, style: str) -> None:
    depth = MAX_POLICY_DEPTH + 5
    if style == "flow":
        body = "description: " + "[" * depth + "]" * depth + "\n"
    elif style == "block":
        body = "".join(" " * level + f"k{level}:\n" for level in range(depth)) + " " * depth + "v: 1\n"
    else:  # 100 kB of "[": refused long before the end
        body = "description: " + "[" * 100_000
    message, seconds, peak = _load_costs(HEADER + body)
    assert "nest" in message
    assert seconds < 10.0 and peak < 100 * 2**20, (seconds, peak)


def _big_documents(size: int) -> dict[str, str]:
    return {
        "one long comment": HEADER + "#" + "x" * size + "\n",
        "one long string": HEADER + "description: " + "x" * size + "\n",
        "many values": HEADER + "description: [" + ",".join(["1"] * (size // 2)) + "]\n",
        "many keys": HEADER + "segment: {" + ", ".join(f"k{i}: 0" for i in range(size // 12)) + "}\n",
        "blank lines": HEADER + "\n" * size,
        "many problems": HEADER
        + "layer: {schedule: {kind: depth_fraction, prune_ratios: [0.1], fractions: ["
        + ", ".join(["2.0"] * 4000)
        + "]}}\n",
    }


@pytest.mark.parametrize("kind", sorted(_big_documents(0)))
def test_any_file_under_the_size_limit_loads_or_fails_quickly(loader: str, kind: str, tmp_path: Path) -> None:
    # The whole megabyte through LibYAML (what PyYAML's wheels use); a tenth of it through the pure-Python fallback,
    # whose scanner takes about 2 s per megabyte (far more under tracemalloc): the cost is linear, the test short.
    size = MAX_POLICY_BYTES - 4096 if loader == "libyaml" else MAX_POLICY_BYTES // 10
    text = _big_documents(size)[kind]
    assert len(text.encode()) <= MAX_POLICY_BYTES
    path = tmp_path / "big.yaml"
    path.write_text(text)
    tracemalloc.start()
    start = time.perf_counter()
    try:
        try:
            load_policy(path)
        except PolicyError as error:
            message = str(error)
        else:
            message = ""
        seconds = time.perf_counter() - start
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert seconds < 10.0 and peak < 200 * 2**20, (seconds, peak)
    assert len(message) < 4000  # a bounded paragraph, whatever the file holds
    if kind == "many problems":
        assert f"and {4000 - MAX_LISTED_PROBLEMS} more" in message


def test_files_over_the_size_limit_and_special_files_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "huge.yaml"
    with path.open("wb") as handle:
        handle.write(HEADER.encode())
        handle.seek(64 * 2**20)  # 64 MB, sparse: never read whole
        handle.write(b"\n")
    message, seconds, _ = _load_costs(path)
    assert f"larger than {MAX_POLICY_BYTES} bytes" in message and seconds < 5.0
    with pytest.raises(PolicyError, match=f"larger than {MAX_POLICY_BYTES} bytes"):
        load_policy(HEADER + "#" * (MAX_POLICY_BYTES + 1) + "\n")
    if Path("/dev/zero").exists():  # endless: refused without reading
        with pytest.raises(PolicyError, match="not a regular file"):
            load_policy(Path("/dev/zero"))
    if hasattr(os, "mkfifo"):  # opening a FIFO would block forever
        fifo = tmp_path / "fifo.yaml"
        os.mkfifo(fifo)
        with pytest.raises(PolicyError, match="not a regular file"):
            load_policy(fifo)


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ("segment: {kind: random, seed: " + "9" * 5000 + "}\n", "cannot be read"),  # beyond int() of a string
        ("segment: {kind: random, seed: 0x" + "f" * 5000 + "}\n", "an integer of 20000 bits"),
        ("description: 2001-13-45\n", "month must be in 1..12"),
        ("description: !!binary 'not base64!'\n", "not valid YAML"),
        ("description: !!python/name:os.system\n", "Python tags"),
        ("a: 1\n---\nb: 2\n", "single document"),
        ("description: \x00\n", "not valid YAML"),
    ],
)
def test_values_yaml_cannot_build_are_policy_errors(loader: str, body: str, fragment: str) -> None:
    message, _, _ = _load_costs(HEADER + body)
    assert fragment in message


@pytest.mark.parametrize("value", [None, 3, 2.5, b"version: 1", ["a"], {"version": 1}])
def test_other_argument_types_are_policy_errors(value: object) -> None:
    with pytest.raises(PolicyError, match="expected a Policy, a YAML file path"):
        load_policy(value)  # type: ignore[arg-type]


@pytest.mark.parametrize("path", ["no\x00such.yaml", "x" * 5000 + ".yaml", "/proc/self/mem"])
def test_unreadable_paths_are_policy_errors(path: str) -> None:
    with pytest.raises(PolicyError):
        load_policy(Path(path))
    with pytest.raises(PolicyError):
        load_policy(path)


# ---------------------------------------------------------------------------------------------- 17.6
def _builtin_models() -> list[type[BaseModel]]:
    """Every built-in config class reachable from :class:`Policy` and the kind registries."""
    seen: list[type[BaseModel]] = []
    todo: list[type] = [
        Policy,
        *policy_module.SELECTOR_KINDS.classes(),
        *policy_module.INPUT_LEVEL_KINDS.classes(),
    ]
    while todo:
        model = todo.pop()
        if model in seen or model.__module__ != policy_module.__name__:
            continue
        seen.append(model)
        for field in model.model_fields.values():
            todo.extend(t for t in _types(field.annotation) if isinstance(t, type) and issubclass(t, BaseModel))
    return sorted(seen, key=lambda model: model.__name__)


def _types(annotation: object) -> list[object]:
    found = [annotation]
    for argument in typing.get_args(annotation):
        found.extend(_types(argument))
    return found


def _numeric_constraints(annotation: object, metadata: list[object]) -> list[list[object]]:
    """For a field's annotation, the constraint lists of each numeric value it holds (the field's own, and those of
    the elements of a list)."""
    origin = typing.get_origin(annotation)
    if annotation in (int, float):
        return [metadata]
    if origin is typing.Annotated:
        inner, *extra = typing.get_args(annotation)
        constraints = [item for info in extra for item in getattr(info, "metadata", [info])]
        return _numeric_constraints(inner, [*metadata, *constraints])
    if origin is list:
        return _numeric_constraints(typing.get_args(annotation)[0], [])
    found = []
    for argument in typing.get_args(annotation):  # unions: Optional[int], ...
        if argument is not type(None):
            found += _numeric_constraints(argument, metadata)
    return found


def test_every_numeric_field_has_a_range() -> None:
    """Lower and upper bounds on every int/float of the schema (17.6): 1e300 blocks or layers are refused in the
    file, not discovered by the runtime."""
    missing = []
    for model in _builtin_models():
        for name, field in model.model_fields.items():
            for constraints in _numeric_constraints(field.annotation, list(field.metadata)):
                names = {type(item).__name__ for item in constraints}
                if not (names & {"Ge", "Gt"} and names & {"Le", "Lt"}):
                    missing.append(f"{model.__name__}.{name}")
    assert not missing, f"numeric fields without a lower and an upper bound: {missing}"


@pytest.mark.parametrize(
    "body",
    [
        "frame: {selector: {kind: dpp, max_block: 100000000}}\n",
        "layer: {schedule: {kind: explicit, stages: [{layer: 1000000000, prune_ratio: 0.5}]}}\n",
        "segment: {kind: vidcom2, temperature: 1.0e+300}\n",
        "segment: {kind: vidcom2, temperature: .inf}\n",
        "segment: {merge_ratio: .nan}\n",
        "frame: {dynamic_budget: {scale: .nan}}\n",
        "layer: {schedule: {kind: depth_fraction, fractions: [.nan], prune_ratios: [0.1]}}\n",
    ],
)
def test_out_of_range_and_non_finite_numbers_are_refused(body: str) -> None:
    with pytest.raises(PolicyError, match="invalid policy"):
        load_policy(HEADER + body)


# ---------------------------------------------------------------------------------------------- 17.9
def test_shipped_policies_load_by_name() -> None:
    shipped = policy_module.shipped_policies()
    on_disk = sorted(
        path.relative_to(REPO / "policies").with_suffix("").as_posix() for path in REPO.glob("policies/**/*.yaml")
    )
    assert sorted(shipped) == on_disk
    top_level = [name for name in shipped if "/" not in name]
    assert list(shipped)[: len(top_level)] == sorted(top_level)  # files of policies/ first, then each folder's
    assert {"hieravid-10", "hieravid-20", "hieravid-30", "none"} <= set(top_level)
    for name in ("hieravid-30", "none", "peers/fastv", "ablations/no-frame"):
        assert load_policy(name) == load_policy(REPO / "policies" / f"{name}.yaml")
    # the policy's own name works too, and ".yaml" may be given
    assert load_policy("hieravid-30-no-frame") == load_policy("ablations/no-frame")
    assert load_policy("hieravid-30.yaml") == load_policy("hieravid-30")


def test_a_file_wins_over_a_shipped_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "hieravid-30").write_text(HEADER)
    assert load_policy("hieravid-30").name == "t"


def test_an_unknown_name_lists_the_shipped_ones() -> None:
    with pytest.raises(PolicyError) as caught:
        load_policy("hieravid-35")
    message = str(caught.value)
    assert "not the name of a shipped policy" in message and "hieravid-30" in message and "peers/fastv" in message
    with pytest.raises(PolicyError, match="policy file not found"):
        load_policy("policies/absent.yaml")
