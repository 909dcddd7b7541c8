"""Config files: YAML in, typed and strictly validated models out, errors as ``FILE:LINE: key: reason``.

Every process (probe, responder, monitor) has a pydantic model; this module holds
what they share:

- ``StrictModel``: unknown keys are errors, models are frozen.
- ``Duration``: ``"30s"``, ``"5m"``, ``"250ms"``, ``"1m30s"`` → seconds (float).
  A bare number is refused: ``30`` could mean seconds or milliseconds.
- Secrets: any string may be ``${ENV_VAR}`` or ``${ENV_VAR:-default}``; a secret
  field ``x`` also has a sibling ``x_file`` read from disk. Secrets are
  ``SecretStr`` and never appear in logs or error messages.
- ``load_config(path, Model)``: parse, interpolate, validate; on failure raise
  ``ConfigError`` listing every problem with the line it came from.

Any bytes may arrive: a file is at most ``MAX_FILE_BYTES``, UTF-8 (a UTF-8 byte-order
mark is skipped; UTF-16/32 and invalid UTF-8 are refused with the line and byte offset),
YAML without aliases, nested at most ``MAX_DEPTH`` deep, with values of at most
``MAX_VALUE_CHARS`` characters; booleans are ``true``/``false`` only (YAML 1.2: ``yes``,
``on`` and ``"true"`` are strings, which a boolean refuses); every duration has a
maximum (``duration(at_most=...)``). Every failure is a ``ConfigError``, never a
traceback.
"""

from __future__ import annotations

import math
import os
import re
import stat
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Annotated, Any, Final, TypeVar

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    SecretStr,
    ValidationError,
)

from ecpm.errors import ConfigError

Loc = tuple[str | int, ...]
M = TypeVar("M", bound=BaseModel)


# Bounds on what a config file may be (docs/configuration.md, "Limits").
MAX_FILE_BYTES: Final = 1024 * 1024
MAX_DEPTH: Final = 20  # nesting of mappings and lists; ecpm's own models need 7
MAX_NODES: Final = 20_000  # keys, values and items in all; the examples have about 200
MAX_VALUE_CHARS: Final = 4096  # one scalar (a key or a value)
MAX_PROBLEMS: Final = 50  # reported at once; the rest are counted
MAX_DURATION: Final = 3660 * 86400.0  # ten years: no ecpm duration may be longer


class StrictModel(BaseModel):
    """Unknown keys are errors; validated config never changes after load."""

    model_config = ConfigDict(extra="forbid", frozen=True, str_strip_whitespace=True, allow_inf_nan=False)


def quote_value(value: object, limit: int = 40) -> str:
    """A value quoted for a message, cut short: a hostile value never floods an error."""
    text = value if isinstance(value, str) else repr(value)
    text = text if len(text) <= limit else text[:limit] + "…"
    return f"'{text}'" if isinstance(value, str) else text


# ---------------------------------------------------------------- booleans


def repeats(values: Iterable[str]) -> Iterator[tuple[int, str]]:
    """``(index, value)`` for each value seen earlier in ``values`` (a duplicate id)."""
    seen: set[str] = set()
    for i, value in enumerate(values):
        if value in seen:
            yield i, value
        seen.add(value)


def _strict_bool(value: object) -> object:
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        raise ValueError(f"must be true or false (unquoted), not the string {quote_value(value)}")
    raise ValueError(f"must be true or false, not {quote_value(value)}")


# A boolean is YAML's true or false, nothing else: no "yes", "on", 1 or "true" (a safety
# flag such as test_endpoint must never be set by a coercion).
Bool = Annotated[bool, BeforeValidator(_strict_bool)]


# ---------------------------------------------------------------- durations

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(value: object) -> float:
    """``"1m30s"`` → 90.0. Raises ValueError with a sentence a user can act on."""
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise ValueError("a duration is a string such as '30s', '5m' or '250ms'")
    if not isinstance(value, str):
        number = quote_value(value, 20)
        raise ValueError(f"a duration needs a unit, e.g. '{number}s' or '{number}ms'")
    text = value.strip()
    parts = _DURATION_PART.findall(text)
    if not text or "".join(n + u for n, u in parts) != text:
        example = "'30s', '5m', '250ms' or '1m30s'"
        raise ValueError(f"{quote_value(value)} is not a duration; write e.g. {example}")
    return sum(float(n) * _UNIT_SECONDS[u] for n, u in parts)


def format_duration(seconds: float) -> str:
    """Inverse of ``parse_duration`` for messages: 90.0 → '1m30s', 0.25 → '250ms'."""
    if seconds < 1:
        return f"{round(seconds * 1000)}ms"
    if seconds != int(seconds):
        return f"{seconds:g}s"
    whole, out = int(seconds), []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if whole >= size:
            out.append(f"{whole // size}{unit}")
            whole %= size
    return "".join(out)


class DurationRange:
    """A duration field's validator: parse, then ``at_least`` ≤ value ≤ ``at_most`` (and
    more than zero unless ``zero_ok``), with messages in the file's own units."""

    def __init__(self, *, at_most: float, at_least: float = 0.0, zero_ok: bool = False) -> None:
        self.at_most, self.at_least, self.zero_ok = at_most, at_least, zero_ok

    def __call__(self, value: object) -> float:
        seconds = parse_duration(value)
        if not math.isfinite(seconds) or seconds > self.at_most:
            raise ValueError(f"must be at most {format_duration(self.at_most)}, not {quote_value(value)}")
        if seconds == 0 and not self.zero_ok:
            raise ValueError("must be longer than 0s")
        if seconds < self.at_least:
            raise ValueError(f"must be at least {format_duration(self.at_least)}, not {quote_value(value)}")
        return seconds


def duration(*, at_most: float, at_least: float = 0.0, zero_ok: bool = False) -> BeforeValidator:
    """``Annotated[float, duration(at_most=3600)]``: a duration key with its documented maximum."""
    return BeforeValidator(DurationRange(at_most=at_most, at_least=at_least, zero_ok=zero_ok))


MINUTE: Final = 60.0
HOUR: Final = 3600.0
DAY: Final = 86400.0

# Without a key's own maximum: never longer than MAX_DURATION (prefer ``duration(...)``).
Duration = Annotated[float, duration(at_most=MAX_DURATION, zero_ok=True)]


# ---------------------------------------------------------------- secrets


MAX_SECRET_BYTES: Final = 64 * 1024


def _read_secret_file(value: object) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError("must be the path of a file holding the secret")
    shown = quote_value(value, 200)
    try:
        regular = stat.S_ISREG(os.stat(value).st_mode)  # not a device or a pipe: /dev/zero never ends
        if regular:
            with open(value, "rb") as f:
                raw = f.read(MAX_SECRET_BYTES + 1)
    except OSError as exc:
        raise ValueError(f"cannot read secret file {value}: {exc.strerror or exc}") from None
    if not regular:
        raise ValueError(f"cannot read secret file {shown}: not a regular file")
    if len(raw) > MAX_SECRET_BYTES:
        raise ValueError(f"secret file {shown} is larger than {MAX_SECRET_BYTES // 1024} KiB")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"secret file {shown} is not UTF-8 text") from None
    secret = text.strip("\r\n")
    if not secret:
        raise ValueError(f"secret file {value} is empty")
    return secret


SecretFile = Annotated[SecretStr, BeforeValidator(_read_secret_file)]


def pick_secret(
    inline: SecretStr | None, from_file: SecretStr | None, *, name: str, required: bool
) -> SecretStr | None:
    """The one secret of an ``x`` / ``x_file`` pair; call from a model validator."""
    if inline is not None and from_file is not None:
        raise ValueError(f"give either {name} or {name}_file, not both")
    if required and inline is None and from_file is None:
        raise ValueError(f"{name} (or {name}_file) is required")
    return inline if inline is not None else from_file


def secret_of(model: BaseModel, name: str) -> SecretStr | None:
    """The secret of an ``x`` / ``x_file`` pair on a validated model (``x`` wins; the
    validators allow only one of them anyway)."""
    inline: SecretStr | None = getattr(model, name)
    return inline if inline is not None else getattr(model, f"{name}_file")


def secret_text(model: BaseModel, name: str) -> str | None:
    """The plain text of ``secret_of``: for the one place that hands it to a peer."""
    found = secret_of(model, name)
    return None if found is None else found.get_secret_value()


_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _interpolate(text: str, env: Callable[[str], str | None]) -> str:
    def one(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        found = env(name)
        if found is not None:
            return found
        if default is not None:
            return default
        raise ValueError(f"environment variable {name} is not set")

    return _ENV_REF.sub(one, text)


# ---------------------------------------------------------------- YAML with line numbers

_TAG = "tag:yaml.org,2002:"
_SCALAR_TAGS: Final = frozenset(_TAG + t for t in ("str", "int", "float", "bool", "null"))
_BOOL_WORDS: Final = frozenset(("true", "True", "TRUE", "false", "False", "FALSE"))
_COLLECTION_TAGS: Final = frozenset((_TAG + "map", _TAG + "seq"))
_NOT_RESOLVED: Final = frozenset((_TAG + "bool", _TAG + "value", _TAG + "merge"))  # bool: YAML 1.2's below


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader, made safe for any input: aliases are refused (no alias bomb,
    no shared nodes), nesting is bounded (the composer recurses), and plain scalars are
    read as YAML 1.2 reads them: only true/false are booleans (``yes``, ``no``, ``on``,
    ``off`` stay strings, so ``region: NO`` is Norway), ``=`` and ``<<`` are strings."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.depth = 0
        self.nodes = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        event: Any = self.peek_event()  # type: ignore[no-untyped-call]
        mark: Any = event.start_mark
        if isinstance(event, yaml.AliasEvent):
            why = f"aliases are not allowed (*{str(event.anchor)[:40]}); write the value out in full"
            raise yaml.composer.ComposerError(None, None, why, mark)
        if self.depth >= MAX_DEPTH:
            raise yaml.composer.ComposerError(None, None, f"nested more than {MAX_DEPTH} levels deep", mark)
        self.nodes += 1
        if self.nodes > MAX_NODES:
            raise yaml.composer.ComposerError(None, None, f"more than {MAX_NODES} values in one file", mark)
        self.depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1


_Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag not in _NOT_RESOLVED]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    _TAG + "bool", re.compile(r"^(?:true|false|True|False|TRUE|FALSE)$"), list("tfTF")
)

# used only to turn scalar nodes into Python values (int, bool, null, str, ...)
_LOADER = _Loader("")


def _scalar(node: yaml.ScalarNode, loc: Loc, problems: list[tuple[Loc, str]]) -> Any:
    tag = str(node.tag)
    if len(node.value) > MAX_VALUE_CHARS:
        problems.append((loc, f"a value may be at most {MAX_VALUE_CHARS} characters"))
        return None
    if tag == _TAG + "timestamp":
        return node.value  # a date stays the text it was: no key of ours is a date
    if tag not in _SCALAR_TAGS:
        problems.append((loc, f"YAML tag {quote_value(tag.replace(_TAG, '!!'))} is not allowed here"))
        return None
    if tag == _TAG + "bool" and node.value not in _BOOL_WORDS:
        problems.append((loc, f"must be true or false, not {quote_value(node.value)}"))
        return None
    try:
        value = _LOADER.construct_object(node, deep=True)
    except (yaml.YAMLError, ValueError, OverflowError):
        problems.append((loc, f"cannot read {quote_value(node.value)} as {tag.replace(_TAG, '')}"))
        return None
    if isinstance(value, str):
        try:
            return _interpolate(value, os.environ.get)
        except ValueError as exc:
            problems.append((loc, str(exc)))
    return value


def _walk(node: yaml.Node, loc: Loc, lines: dict[Loc, int], problems: list[tuple[Loc, str]]) -> Any:
    lines[loc] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode | yaml.SequenceNode) and node.tag not in _COLLECTION_TAGS:
        tag = quote_value(str(node.tag).replace(_TAG, "!!"))
        problems.append((loc, f"YAML tag {tag} is not allowed here"))
        return None
    if isinstance(node, yaml.MappingNode):
        out: dict[str, Any] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                lines[(*loc, "(key)")] = key_node.start_mark.line + 1
                problems.append(((*loc, "(key)"), "a key must be a plain name, not a list or mapping"))
                continue
            key = str(key_node.value)
            child = (*loc, key)
            lines[child] = key_node.start_mark.line + 1
            if len(key) > MAX_VALUE_CHARS:
                problems.append((loc, f"a key may be at most {MAX_VALUE_CHARS} characters"))
                continue
            if key in out:
                problems.append((child, "duplicate key"))
                continue
            out[key] = _walk(value_node, child, lines, problems)
            lines[child] = key_node.start_mark.line + 1
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_walk(item, (*loc, i), lines, problems) for i, item in enumerate(node.value)]
    assert isinstance(node, yaml.ScalarNode)
    return _scalar(node, loc, problems)


# YAML's printable set (PyYAML refuses the rest with a multi-line message of its own)
_NOT_PRINTABLE = re.compile("[^\x09\x0a\x0d\x20-\x7e\x85\xa0-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")
_UTF16_32 = (
    (b"\x00\x00\xfe\xff", "UTF-32"),
    (b"\xff\xfe\x00\x00", "UTF-32"),
    (b"\xfe\xff", "UTF-16"),
    (b"\xff\xfe", "UTF-16"),
)


def _read_bytes(path: str | Path, name: str) -> bytes:
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise ConfigError([f"{name}: cannot read: {exc.strerror or exc}"]) from None
    if len(raw) > MAX_FILE_BYTES:
        most = f"{MAX_FILE_BYTES / 1024 / 1024:g} MiB"
        raise ConfigError([f"{name}: (file): larger than {most}, the most a config file may be"])
    return raw


def _decode(raw: bytes, name: str) -> str:
    """UTF-8 text of the file, or a ConfigError that says where it is not."""
    for bom, encoding in _UTF16_32:
        if raw.startswith(bom):
            why = f"the file is {encoding} (it starts with a byte-order mark); save it as UTF-8"
            raise ConfigError([f"{name}:1: (file): {why}"])
    skip = 3 if raw.startswith(b"\xef\xbb\xbf") else 0  # a UTF-8 byte-order mark: harmless, skipped
    try:
        text = raw[skip:].decode("utf-8")
    except UnicodeDecodeError as exc:
        at = skip + exc.start
        line = raw.count(b"\n", 0, at) + 1
        column = at - raw.rfind(b"\n", 0, at)
        raise ConfigError(
            [
                f"{name}:{line}: (file): not UTF-8: byte 0x{raw[at]:02x} at byte offset {at} "
                f"(line {line}, column {column}); save the file as UTF-8"
            ]
        ) from None
    bad = _NOT_PRINTABLE.search(text)
    if bad is not None:
        at = bad.start()
        line = text.count("\n", 0, at) + 1
        column = at - text.rfind("\n", 0, at)
        hint = " (a UTF-16 file without a byte-order mark?)" if bad.group() == "\x00" else ""
        why = f"character U+{ord(bad.group()):04X} at column {column} is not allowed{hint}"
        raise ConfigError([f"{name}:{line}: (file): {why}"])
    return text


def read_yaml(path: str | Path) -> tuple[Any, dict[Loc, int]]:
    """Parse a YAML file into plain data plus a map from key path to line number.

    Takes any bytes: whatever is wrong with them is a ``ConfigError`` naming the file
    and, where there is one, the line."""
    name = str(path)
    text = _decode(_read_bytes(path, name), name)
    try:
        node = yaml.compose(text, Loader=_Loader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = f"{mark.line + 1}:" if mark is not None else ""
        problem = exc.problem or exc.context or "not YAML"
        raise ConfigError([one_line(f"{name}:{line} yaml: {problem}")]) from None
    except (yaml.YAMLError, RecursionError) as exc:  # unmarked (the checks above leave none known)
        first = (str(exc).splitlines() or ["not YAML"])[0]
        raise ConfigError([one_line(f"{name}: yaml: {first}")]) from None
    if node is None:
        raise ConfigError([f"{name}:1: (top): the file is empty"])
    lines: dict[Loc, int] = {}
    problems: list[tuple[Loc, str]] = []
    data = _walk(node, (), lines, problems)
    if problems:
        raise ConfigError(_bounded(name, [_format(name, loc, msg, lines) for loc, msg in problems]))
    return data, lines


def one_line(text: str, limit: int = 1000) -> str:
    """One printable line: what ``str.isprintable`` refuses (controls, format characters,
    line breaks, spaces other than ' ', unassigned code points) escaped, cut at ``limit``."""
    out = "".join(
        c if c.isprintable() else f"\\u{ord(c):04x}" if ord(c) < 0x10000 else f"\\U{ord(c):08x}" for c in text
    )
    return out if len(out) <= limit else out[:limit] + "…"


def _bounded(name: str, problems: list[str]) -> list[str]:
    if len(problems) <= MAX_PROBLEMS:
        return problems
    more = len(problems) - MAX_PROBLEMS
    return [*problems[:MAX_PROBLEMS], f"{name}: (file): {more} more problems not shown"]


_PLAIN_KEY = re.compile(r"^[A-Za-z0-9_()<>-][A-Za-z0-9_()<>.-]*$")


def format_loc(loc: Loc) -> str:
    """('targets', 0, 'uri') → 'targets[0].uri'; a key from the file is cut at 64 characters
    and quoted unless it is a plain name."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            key = part if len(part) <= 64 else part[:64] + "…"
            key = key if _PLAIN_KEY.match(key) else f"'{key}'"  # '' or ' ' or 'a: b' stay visible
            out += f".{key}" if out else key
    return out or "(top)"


def _line_for(loc: Loc, lines: dict[Loc, int]) -> int:
    while loc not in lines and loc:
        loc = loc[:-1]
    return lines.get(loc, 1)


def _format(name: str, loc: Loc, message: str, lines: dict[Loc, int]) -> str:
    return one_line(f"{name}:{_line_for(loc, lines)}: {format_loc(loc)}: {message}")


def _message(error: Any) -> str:
    kind, msg = error["type"], error["msg"]
    if kind == "extra_forbidden":
        return "unknown key"
    if kind == "missing":
        return "required key is missing"
    if kind == "literal_error":
        return f"must be {msg.removeprefix('Input should be ')}"
    if kind in ("value_error", "assertion_error"):
        return str(msg).removeprefix("Value error, ").removeprefix("Assertion failed, ")
    return str(msg)


def _loc_of(error: Any, data: Any) -> Loc:
    """The error's location in the file: pydantic adds union tags (the value of the
    discriminator key) to ``loc``; keep only the parts that walk the data, plus a last
    part naming a key the file does not have."""
    loc: list[str | int] = []
    parts = list(error["loc"])
    for i, part in enumerate(parts):
        walks_dict = isinstance(data, dict) and part in data
        walks_list = isinstance(data, list) and isinstance(part, int) and 0 <= part < len(data)
        if walks_dict or walks_list:
            data = data[part]
        elif i == len(parts) - 1 and isinstance(data, dict) and part not in data.values():
            pass  # a key absent from the file (missing, or validated from its default): name it
        else:
            continue
        loc.append(part)
    return tuple(loc)


def validate(name: str, data: Any, lines: dict[Loc, int], model: type[M]) -> M:
    """Validate ``data``; then ask the model for cross-field problems with exact locations.

    A model may define ``config_problems() -> list[tuple[Loc, str]]`` for checks that
    span fields (the guard needs the probe's region to judge a target's URI); pydantic
    validators could only report those at the model's own line.
    """
    try:
        config = model.model_validate(data)
    except ValidationError as exc:
        found = [(_loc_of(e, data), _message(e)) for e in exc.errors()]
    else:
        found = list(getattr(config, "config_problems", list)())
        if not found:
            return config
    ordered = sorted({(_line_for(loc, lines), _format(name, loc, msg, lines)) for loc, msg in found})
    raise ConfigError(_bounded(name, [text for _, text in ordered]))


def load_config(path: str | Path, model: type[M]) -> M:
    """Read and validate one config file; raise ``ConfigError`` naming file, line, key, reason."""
    data, lines = read_yaml(path)
    return validate(str(path), data, lines, model)
