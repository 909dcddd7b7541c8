"""The ``ecpm`` command line: one entry point, one module per subcommand.

Each subcommand lives in its own module exposing ``add_arguments(parser)`` and
``run(args) -> int``; the module is imported only when that subcommand runs, so
``ecpm check-config`` never loads pjsua2. Exit codes: 0 ok, 1 check failed,
2 usage or config error. An ``EcpmError`` is printed as plain lines, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Callable, Sequence
from typing import Protocol, cast

from ecpm import __version__
from ecpm.errors import ConfigError, EcpmError

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class _Command(Protocol):
    def add_arguments(self, parser: argparse.ArgumentParser) -> None: ...
    def run(self, args: argparse.Namespace) -> int: ...


# name -> (module, one-line help). Order is the order of `ecpm --help`.
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("ecpm.demo", "the whole system on this machine, on loopback"),
    "probe": ("probes.agent", "run a probe agent (scheduled test calls, results over MQTT)"),
    "responder": ("probes.responder", "run the test responder (the answering end)"),
    "monitor": ("monitor.service", "run the monitor (ingest, state, metrics, pages, status page)"),
    "call": ("probes.call_command", "place one test call now and print the staged result"),
    "verify": (
        "monitor.verify_command",
        "post-change gate: every probe calls a target now; exit 0 if it passed",
    ),
    "incident": (
        "monitor.incident_command",
        "acknowledge an incident's notification duty (or the incident) with a reference",
    ),
    "report": ("monitor.report_command", "evidence report for a period (html, json, csv)"),
    "check-config": (
        "ecpm.check_config",
        "validate a config file; print ok or FILE:LINE: key: reason",
    ),
    "ledger": ("monitor.ledger", "check the hash chain of stored results"),
    "db": ("monitor.db_command", "upgrade the store's schema (--check: only say if it is behind)"),
}


def _load(module_name: str) -> _Command:
    return cast(_Command, importlib.import_module(module_name))


def build_parser(loader: Callable[[str], _Command] = _load) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ecpm",
        description="Synthetic emergency-call path monitor: SIP test calls to emergency "
        "test endpoints (never live 999/112), results over MQTT, Prometheus metrics, "
        "incidents, pages and Ofcom A3.2(b) evidence.",
    )
    parser.add_argument("--version", action="version", version=f"ecpm {__version__}")
    parser.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="log level for messages on stderr (default: info)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module_name, help_text) in COMMANDS.items():
        command = loader(module_name)
        child = sub.add_parser(name, help=help_text, description=help_text)
        command.add_arguments(child)
        child.set_defaults(_run=command.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # Load only the chosen subcommand's module (fast --help for the others, no pjsua2
    # import for check-config): every other subcommand gets a cheap placeholder.
    chosen = next((a for a in argv if a in COMMANDS), None)

    def loader(module_name: str) -> _Command:
        wanted = chosen is not None and COMMANDS[chosen][0] == module_name
        return _load(module_name) if wanted else _Placeholder()

    parser = build_parser(loader)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: --help (0) or a usage error (2)
        return int(exc.code or 0)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per request is noise
    try:
        return int(args._run(args))
    except ConfigError as exc:  # already FILE:LINE: key: reason, one per line
        print(exc, file=sys.stderr)
        return EXIT_USAGE
    except EcpmError as exc:
        print(f"ecpm {args.command}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return EXIT_OK


class _Placeholder:
    """Parser entry for a subcommand that was not chosen: takes any arguments."""

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)

    def run(self, args: argparse.Namespace) -> int:  # pragma: no cover - never chosen
        return EXIT_USAGE
