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
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
)

from ecpm.errors import ConfigError

Loc = tuple[str | int, ...]
M = TypeVar("M", bound=BaseModel)


class StrictModel(BaseModel):
    """Unknown keys are errors; validated config never changes after load."""

    model_config = ConfigDict(extra="forbid", frozen=True, str_strip_whitespace=True)


# ---------------------------------------------------------------- durations

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(value: object) -> float:
    """``"1m30s"`` → 90.0. Raises ValueError with a sentence a user can act on."""
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise ValueError("a duration is a string such as '30s', '5m' or '250ms'")
    if not isinstance(value, str):
        raise ValueError(f"a duration needs a unit, e.g. '{value}s' or '{value}ms'")
    text = value.strip()
    parts = _DURATION_PART.findall(text)
    if not text or "".join(n + u for n, u in parts) != text:
        raise ValueError(f"'{value}' is not a duration; write e.g. '30s', '5m', '250ms' or '1m30s'")
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


Duration = Annotated[float, BeforeValidator(parse_duration)]
PositiveDuration = Annotated[float, BeforeValidator(parse_duration), Field(gt=0)]


# ---------------------------------------------------------------- secrets


def _read_secret_file(value: object) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError("must be the path of a file holding the secret")
    try:
        text = Path(value).read_text(encoding="utf-8")
    except OSError as exc:
        raise ValueError(f"cannot read secret file {value}: {exc.strerror or exc}") from None
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


def _walk(node: yaml.Node, loc: Loc, lines: dict[Loc, int], problems: list[tuple[Loc, str]]) -> Any:
    lines[loc] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        out: dict[str, Any] = {}
        for key_node, value_node in node.value:
            key = str(_LOADER.construct_scalar(key_node))
            child = (*loc, key)
            if key in out:
                lines[child] = key_node.start_mark.line + 1
                problems.append((child, "duplicate key"))
                continue
            out[key] = _walk(value_node, child, lines, problems)
            lines[child] = key_node.start_mark.line + 1
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_walk(item, (*loc, i), lines, problems) for i, item in enumerate(node.value)]
    value = _LOADER.construct_object(node, deep=True)
    if isinstance(value, str):
        try:
            return _interpolate(value, os.environ.get)
        except ValueError as exc:
            problems.append((loc, str(exc)))
    return value


# used only to turn scalar nodes into Python values (int, bool, null, str, ...)
_LOADER = yaml.SafeLoader("")


def read_yaml(path: str | Path) -> tuple[Any, dict[Loc, int]]:
    """Parse a YAML file into plain data plus a map from key path to line number."""
    name = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"{name}: cannot read: {exc.strerror or exc}"]) from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f"{mark.line + 1}:" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError([f"{name}:{line} yaml: {problem}"]) from None
    if node is None:
        raise ConfigError([f"{name}:1: (top): the file is empty"])
    lines: dict[Loc, int] = {}
    problems: list[tuple[Loc, str]] = []
    data = _walk(node, (), lines, problems)
    if problems:
        raise ConfigError([_format(name, loc, msg, lines) for loc, msg in problems])
    return data, lines


def format_loc(loc: Loc) -> str:
    """('targets', 0, 'uri') → 'targets[0].uri'."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
    return out or "(top)"


def _line_for(loc: Loc, lines: dict[Loc, int]) -> int:
    while loc not in lines and loc:
        loc = loc[:-1]
    return lines.get(loc, 1)


def _format(name: str, loc: Loc, message: str, lines: dict[Loc, int]) -> str:
    return f"{name}:{_line_for(loc, lines)}: {format_loc(loc)}: {message}"


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
    raise ConfigError([text for _, text in ordered])


def load_config(path: str | Path, model: type[M]) -> M:
    """Read and validate one config file; raise ``ConfigError`` naming file, line, key, reason."""
    data, lines = read_yaml(path)
    return validate(str(path), data, lines, model)
