"""``ecpm db upgrade [-c monitor.yaml | --db PATH | --url URL] [--check]``: the store's schema.

Applies the migrations the store lacks (exit 0, naming each), as ``ecpm monitor`` does
on start — for deploy pipelines that upgrade before the new version starts, and for
stores the report or ``ecpm ledger verify`` refuse as too old. ``--check`` changes
nothing: exit 1 naming the pending migrations, 0 when the schema is current.

Also where every store command finds its store (``add_where``, ``where_of``): the
config's ``store``, a SQLite file (``--db``) or a PostgreSQL URL (``--url``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ecpm.configfile import load_config
from ecpm.errors import UsageError
from monitor.config import MonitorConfig
from monitor.store import is_url, open_store, pending_migrations, shown


def add_where(parser: argparse.ArgumentParser, config_help: str) -> None:
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("-c", "--config", help=config_help)
    where.add_argument("--db", metavar="PATH", help="the monitor's SQLite store")
    where.add_argument(
        "--url",
        help="the monitor's PostgreSQL store, postgresql://... (a password in it shows in"
        " the process list: prefer -c with store.url_file)",
    )


def where_of(args: argparse.Namespace, config: MonitorConfig | None, *, must_exist: bool = True) -> str:
    """The store the arguments name; ``UsageError`` for a SQLite file that is not there."""
    where = str(args.db or args.url or (config.store.where if config is not None else ""))
    if args.url is not None and not is_url(where):
        raise UsageError(f"--url {shown(where)}: not a postgresql:// URL")
    if must_exist and not is_url(where) and not Path(where).is_file():
        raise UsageError(f"no store at {where}")
    return where


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=["upgrade"], help="upgrade: apply the pending schema migrations")
    add_where(parser, "monitor config (its store is upgraded)")
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if any is pending")


def run(args: argparse.Namespace) -> int:
    config = None if args.config is None else load_config(args.config, MonitorConfig)
    where = where_of(args, config, must_exist=False)  # no file yet: every migration is pending
    todo = pending_migrations(where)
    if not todo:
        print(f"ok: {shown(where)} is current")
        return 0
    names = ", ".join(map(str, todo))
    if args.check:
        print(f"pending: {shown(where)} needs migrations {names}")
        return 1
    open_store(where).close()  # a read-write open applies them, under the backend's lock
    print(f"upgraded: {shown(where)}: applied {names}")
    return 0
