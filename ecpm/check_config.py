"""``ecpm check-config FILE``: validate a config file of any kind; print ok or every problem."""

from __future__ import annotations

import argparse
import importlib
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from ecpm.configfile import one_line, quote_value, read_yaml, validate
from ecpm.errors import ConfigError

# The top-level `kind:` key says which model a file is validated against.
KINDS: dict[str, str] = {
    "probe": "probes.config:ProbeConfig",
    "responder": "probes.config:ResponderConfig",
    "monitor": "monitor.config:MonitorConfig",
}


def model_for(kind: str) -> type[BaseModel]:
    module, _, name = KINDS[kind].partition(":")
    model: type[BaseModel] = getattr(importlib.import_module(module), name)
    return model


def load_any(path: str | Path) -> Any:
    """Validate a config file against the model its ``kind:`` names."""
    name = str(path)
    data, lines = read_yaml(path)
    kind = data.get("kind") if isinstance(data, dict) else None
    if not isinstance(kind, str) or kind not in KINDS:
        line = lines.get(("kind",), 1)
        allowed = ", ".join(KINDS)
        what = "is missing" if kind is None else f"{quote_value(kind)} is unknown"
        raise ConfigError([one_line(f"{name}:{line}: kind: {what}; it must be one of {allowed}")])
    return validate(name, data, lines, model_for(kind))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("files", nargs="+", metavar="FILE", help="config file(s) to validate")


def run(args: argparse.Namespace) -> int:
    problems: list[str] = []
    for path in args.files:
        try:
            load_any(path)
        except ConfigError as exc:
            problems.extend(exc.problems)
    if problems:
        raise ConfigError(problems)
    print("ok")
    return 0
