"""Config loading takes any bytes: every failure is a ``ConfigError`` (exit 2) whose
lines read ``FILE[:LINE]: key: reason``; booleans are strict; every duration and count
has a documented maximum; aliases are refused and nesting, size and load time are
bounded.

The one-rule bad files with their exact messages are in tests/testdata/ (read by
tests/test_config.py); here are the files that cannot carry a UTF-8 first line, the
command line against an alias bomb and 5,000 levels of nesting, the model-wide rules
(strict booleans, maxima and docs/configuration.md listing them), and hypothesis
fuzzing over file bytes, mutations of the examples and YAML shapes.
"""

from __future__ import annotations

import copy
import os
import re
import types
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Union

import annotated_types
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, BeforeValidator
from pydantic.fields import FieldInfo

from ecpm.check_config import KINDS, load_any, model_for
from ecpm.configfile import MAX_FILE_BYTES, DurationRange, format_duration
from ecpm.errors import ConfigError
from tests.support.processes import run_ecpm as ecpm

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = [ROOT / "config" / f"{kind}.example.yaml" for kind in KINDS]
SCALE = max(1, int(os.environ.get("ECPM_FUZZ_SCALE", "1")))
FUZZ = settings(
    max_examples=300 * SCALE,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


def problems_of(path: Path) -> list[str]:
    """The lines ``ecpm check-config`` would print for ``path`` ([] when it is valid).
    Any exception other than ConfigError fails the test that calls it."""
    try:
        load_any(path)
    except ConfigError as exc:
        assert exc.problems, "a ConfigError must say what is wrong"
        return exc.problems
    return []


def assert_located(path: Path, problems: list[str]) -> None:
    """Each problem is one printable line ``FILE[:LINE]: key: reason``, at most 51 of them."""
    assert len(problems) <= 51
    shape = re.compile(
        rf"^{re.escape(str(path))}(?::[1-9][0-9]*)?: \S.*: \S.*$|^{re.escape(str(path))}: cannot read: .+$"
    )
    for line in problems:
        assert shape.match(line), line
        assert line.isprintable(), line
        assert len(line) < 1400, line


# ------------------------------------------------------------------ files and bytes


@pytest.mark.parametrize(
    ("encoding", "name"),
    [("utf-16", "UTF-16"), ("utf-16-be", "UTF-16"), ("utf-32", "UTF-32"), ("utf-32-be", "UTF-32")],
)
def test_utf16_and_utf32_are_refused_with_a_clear_message(tmp_path: Path, encoding: str, name: str) -> None:
    path = tmp_path / "wide.yaml"
    text = "kind: responder\n"
    # utf-16 and utf-32 write a byte-order mark (little-endian here); the -be codecs do not
    path.write_bytes(
        ("\ufeff" + text).encode(encoding) if encoding.endswith("-be") else text.encode(encoding)
    )
    assert problems_of(path) == [
        f"{path}:1: (file): the file is {name} (it starts with a byte-order mark); save it as UTF-8"
    ]


def test_utf16_without_a_byte_order_mark_is_named(tmp_path: Path) -> None:
    path = tmp_path / "wide.yaml"
    path.write_bytes("kind: responder\n".encode("utf-16-le"))
    hint = "(a UTF-16 file without a byte-order mark?)"
    assert problems_of(path) == [f"{path}:1: (file): character U+0000 at column 2 is not allowed {hint}"]


def test_a_utf8_byte_order_mark_is_skipped(tmp_path: Path) -> None:
    path = tmp_path / "bom.yaml"
    path.write_bytes(b"\xef\xbb\xbfkind: responder\nanswering_point: caf\xc3\xa9\n")
    assert load_any(path).answering_point == "café"


def test_invalid_utf8_names_line_and_byte_offset(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes(b"kind: responder\n\nanswering_point: caf\xe9\n")
    where = "byte 0xe9 at byte offset 37 (line 3, column 21)"
    assert problems_of(path) == [f"{path}:3: (file): not UTF-8: {where}; save the file as UTF-8"]


def test_a_file_larger_than_the_limit_is_refused_unread(tmp_path: Path) -> None:
    path = tmp_path / "big.yaml"
    path.write_bytes(b"kind: responder\n" + b"#" * MAX_FILE_BYTES)
    assert problems_of(path) == [f"{path}: (file): larger than 1 MiB, the most a config file may be"]


def test_a_directory_is_named(tmp_path: Path) -> None:
    assert problems_of(tmp_path) == [f"{tmp_path}: cannot read: Is a directory"]


def test_a_secret_file_must_be_a_small_regular_utf8_file(tmp_path: Path) -> None:
    big, latin = tmp_path / "big.key", tmp_path / "latin.key"
    big.write_bytes(b"k" * (64 * 1024 + 1))
    latin.write_bytes(b"caf\xe9")
    for key_file, reason in [
        ("/dev/zero", "cannot read secret file '/dev/zero': not a regular file"),
        (str(big), f"secret file '{big}' is larger than 64 KiB"),
        (str(latin), f"secret file '{latin}' is not UTF-8 text"),
    ]:
        path = tmp_path / "p.yaml"
        path.write_text(
            f"kind: probe\nprobe: {{id: p1, region: GB, key_file: '{key_file}'}}\n"
            'targets: [{id: t1, uri: "sip:ecpm-test@127.0.0.1:5090", test_endpoint: true}]\n'
        )
        assert problems_of(path) == [f"{path}:2: probe.key_file: {reason}"]


def test_yaml_1_2_booleans_norway_is_a_region(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(
        "kind: probe\nprobe: {id: p1, region: NO, key: k}\n"
        'targets: [{id: t1, uri: "sip:ecpm-test@127.0.0.1:5090", test_endpoint: true}]\n'
    )
    assert load_any(path).probe.region == "NO"


def test_at_most_50_problems_are_printed(tmp_path: Path) -> None:
    path = tmp_path / "many.yaml"
    path.write_text("kind: responder\n" + "".join(f"k{i}: 1\n" for i in range(200)))
    problems = problems_of(path)
    assert len(problems) == 51
    assert problems[-1] == f"{path}: (file): 150 more problems not shown"


def _alias_bomb(levels: int = 9) -> str:
    lines = ["kind: responder", 'l0: &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for i in range(1, levels + 1):
        lines.append(f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 9) + "]")
    return "\n".join(lines) + "\n"  # 9 ** 10 strings once expanded


def test_cli_refuses_an_alias_bomb_and_deep_nesting_with_exit_2(tmp_path: Path) -> None:
    bomb, deep, block = tmp_path / "bomb.yaml", tmp_path / "deep.yaml", tmp_path / "block.yaml"
    bomb.write_text(_alias_bomb())
    deep.write_text("kind: responder\nanswering_point: " + "[" * 5000 + "]" * 5000 + "\n")
    block.write_text("kind: responder\n" + "".join(" " * i + f"k{i}:\n" for i in range(1000)))
    done = ecpm("check-config", str(bomb), str(deep), str(block))
    assert (done.returncode, done.stdout) == (2, ""), done.stderr
    assert done.stderr.splitlines() == [
        f"{bomb}:3: yaml: aliases are not allowed (*l0); write the value out in full",
        f"{deep}:2: yaml: nested more than 20 levels deep",
        f"{block}:21: yaml: nested more than 20 levels deep",
    ]


def test_cli_every_bad_file_exits_2_without_a_traceback() -> None:
    files = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests" / "testdata").glob("*.yaml"))
    done = ecpm("check-config", *files)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert len(done.stderr.splitlines()) >= len(files)


# ------------------------------------------------------------------ the models: booleans and maxima


def _parts(tp: Any, metadata: list[Any]) -> Iterator[tuple[Any, list[Any]]]:
    origin = typing.get_origin(tp)
    if origin is typing.Annotated:
        base, *extra = typing.get_args(tp)
        more = [m for e in extra for m in (e.metadata if isinstance(e, FieldInfo) else [e])]
        yield from _parts(base, metadata + more)
    elif origin in (Union, types.UnionType):
        for arg in typing.get_args(tp):
            yield from _parts(arg, metadata)
    else:
        yield tp, metadata


def _leaf(path: str, tp: Any, meta: list[Any]) -> Iterator[tuple[str, Any, list[Any]]]:
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        yield from leaves(tp, path + ".")
    elif typing.get_origin(tp) in (list, dict):
        item = typing.get_args(tp)[-1]
        for t, m in _parts(item, []):
            yield from _leaf(path + ("[]" if typing.get_origin(tp) is list else ".*"), t, m)
    else:
        yield path, tp, meta


def leaves(model: type[BaseModel], prefix: str = "") -> Iterator[tuple[str, Any, list[Any]]]:
    """(key path, type, constraints) of every scalar a file of this model can hold."""
    for name, field in model.model_fields.items():
        for tp, meta in _parts(field.annotation, list(field.metadata)):
            yield from _leaf(prefix + name, tp, meta)


def maximum(tp: Any, meta: list[Any]) -> str | None:
    """The documented form of a number's maximum, or None when it has none."""
    durations = [
        m.func.at_most for m in meta if isinstance(m, BeforeValidator) and isinstance(m.func, DurationRange)
    ]
    le: list[float] = [m.le for m in meta if isinstance(m, annotated_types.Le)]  # type: ignore[misc]
    lt: list[int] = [m.lt for m in meta if isinstance(m, annotated_types.Lt)]  # type: ignore[misc]
    if durations:
        return format_duration(min(durations + le))
    if le:
        return f"{min(le):g}" if min(le) < 1e6 else str(int(min(le)))
    if lt:
        return str(lt[0] - 1) if tp is int else f"< {lt[0]}"
    return None


NUMBERS = sorted(
    {
        (kind, path, maximum(tp, meta))
        for kind in KINDS
        for path, tp, meta in leaves(model_for(kind))
        if tp in (int, float)
    }
)


def test_every_boolean_is_strict() -> None:
    lax = [
        (kind, path)
        for kind in KINDS
        for path, tp, meta in leaves(model_for(kind))
        if tp is bool
        and not any(isinstance(m, BeforeValidator) and m.func.__name__ == "_strict_bool" for m in meta)
    ]
    assert lax == [], f"use ecpm.configfile.Bool for: {lax}"


@pytest.mark.parametrize("value", ['"yes"', "yes", '"true"', "on", "1", "0", '""', "null"])
def test_the_safety_flag_takes_only_a_real_boolean(tmp_path: Path, value: str) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(
        "kind: probe\nprobe: {id: p1, region: GB, key: k}\n"
        f'targets: [{{id: t1, uri: "sip:ecpm-test@127.0.0.1:5090", test_endpoint: {value}}}]\n'
    )
    (problem,) = problems_of(path)
    assert problem.startswith(f"{path}:3: targets[0].test_endpoint: must be true or false"), problem


def test_every_number_has_a_maximum() -> None:
    unbounded = [(kind, path) for kind, path, most in NUMBERS if most is None]
    assert unbounded == [], f"give these a maximum (Field(le=...) or duration(at_most=...)): {unbounded}"


@pytest.mark.parametrize(("kind", "path", "most"), [n for n in NUMBERS if n[2] is not None])
def test_docs_list_every_maximum(kind: str, path: str, most: str) -> None:
    text = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    section = text.split(f"\n### {kind}\n", 1)[1].split("\n#", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith(f"| `{path}` |")]
    assert len(rows) == 1, f"docs/configuration.md, Limits, {kind}: no row for {path}"
    assert f"| {most}" in rows[0], f"{kind} {path}: docs say {rows[0]!r}, the model says at most {most}"


# ------------------------------------------------------------------ fuzzing


def _check_bytes(tmp_path: Path, data: bytes) -> None:
    path = tmp_path / "fuzz.yaml"
    path.write_bytes(data)
    assert_located(path, problems_of(path))


@FUZZ
@given(data=st.binary(max_size=3000))
def test_fuzz_any_bytes(tmp_path: Path, data: bytes) -> None:
    _check_bytes(tmp_path, data)


@FUZZ
@given(
    example=st.sampled_from(EXAMPLES),
    edits=st.lists(
        st.tuples(
            st.floats(0, 1),
            st.sampled_from(["insert", "delete", "replace", "line"]),
            st.binary(min_size=1, max_size=12)
            | st.sampled_from(
                [
                    b"*a",
                    b"&a ",
                    b"[",
                    b"{",
                    b"\xff",
                    b"\x00",
                    b"\t",
                    b": ",
                    b"- ",
                    b"yes",
                    b"1e999",
                    b"!!binary ",
                    b"? ",
                    b"9" * 400,
                    b"99999999999999999999d",
                    b"${X}",
                    b'"',
                    b"'",
                    b"\r",
                    b"\xef\xbb\xbf",
                ]
            ),
        ),
        min_size=1,
        max_size=6,
    ),
)
def test_fuzz_mutated_examples(tmp_path: Path, example: Path, edits: list[tuple[float, str, bytes]]) -> None:
    data = bytearray(example.read_bytes())
    for where, how, chunk in edits:
        at = int(where * len(data))
        if how == "insert":
            data[at:at] = chunk
        elif how == "delete":
            del data[at : at + len(chunk)]
        elif how == "replace":
            data[at : at + len(chunk)] = chunk
        else:  # a whole line of it, at a line start
            start = data.rfind(b"\n", 0, at) + 1
            data[start:start] = chunk + b"\n"
    _check_bytes(tmp_path, bytes(data))


def _field_names() -> list[str]:
    return sorted(
        {p.split(".")[-1].removesuffix("[]") for kind in KINDS for p, _, _ in leaves(model_for(kind))}
    )


SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**30), max_value=10**30)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=30)
    | st.sampled_from(
        ["30s", "0s", "1d", "99999d", "yes", "true", "sip:ecpm-test@127.0.0.1:5090", "sip:999@x", "GB"]
    )
)
KEYS = st.sampled_from([*_field_names(), "kind", "<<", "x"]) | st.text(max_size=10)
SHAPES = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(KEYS, inner, max_size=6),
    max_leaves=40,
)


class _NoAliases(yaml.SafeDumper):
    def ignore_aliases(self, data: Any) -> bool:
        return True


@FUZZ
@given(kind=st.sampled_from([*KINDS, "other"]), body=st.dictionaries(KEYS, SHAPES, max_size=8))
def test_fuzz_yaml_shapes(tmp_path: Path, kind: str, body: dict[str, Any]) -> None:
    text = yaml.dump({"kind": kind, **body}, Dumper=_NoAliases, allow_unicode=True)
    _check_bytes(tmp_path, text.encode("utf-8", "surrogatepass"))


def _paths(data: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    if isinstance(data, dict):
        return [prefix] + [p for k, v in data.items() for p in _paths(v, (*prefix, k))]
    if isinstance(data, list):
        return [prefix] + [p for i, v in enumerate(data) for p in _paths(v, (*prefix, i))]
    return [prefix]


EXAMPLE_DATA = {path: yaml.safe_load(path.read_text(encoding="utf-8")) for path in EXAMPLES}
HOSTILE_VALUES = SHAPES | st.sampled_from(
    [
        "99999999999999999999999d",
        "1" + "0" * 400 + "s",
        10**400,
        "sip:+44 999@127.0.0.1",
        "tel:112",
        "urn:service:sos",
        "sip:ecpm-test@127.0.0.1:5090;user=phone",
        "127.0.0.1:0",
        "${ECPM_FUZZ_UNSET}",
        "x" * 5000,
        [],
        {},
    ]
)


@FUZZ
@given(
    example=st.sampled_from(EXAMPLES),
    changes=st.lists(st.tuples(st.integers(min_value=0), HOSTILE_VALUES), min_size=1, max_size=4),
)
def test_fuzz_example_values(tmp_path: Path, example: Path, changes: list[tuple[int, Any]]) -> None:
    """The examples with some keys' values (or whole sections) replaced by hostile ones:
    this reaches the validators (the guard, durations, secrets, names) with odd input."""
    data = copy.deepcopy(EXAMPLE_DATA[example])
    for index, value in changes:
        paths = _paths(data)[1:]  # never the whole document
        if not paths:
            break
        *parent, last = paths[index % len(paths)]
        holder = data
        for part in parent:
            holder = holder[part]
        holder[last] = value
    text = yaml.dump(data, Dumper=_NoAliases, allow_unicode=True)
    _check_bytes(tmp_path, text.encode("utf-8", "surrogatepass"))
