"""``ecpm ledger verify -c monitor.yaml``: check the stored results' hash chain.

Exit 0 when every row chains to the one before it (printing the row count and the
last hash, which a later reader can compare), 1 naming the first broken row.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ecpm.configfile import load_config
from ecpm.errors import UsageError
from monitor.config import MonitorConfig
from monitor.store import SqliteStore


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=["verify"], help="verify: check the hash chain")
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("-c", "--config", help="monitor config (its store.path is checked)")
    where.add_argument("--db", help="path of the monitor's SQLite store")


def run(args: argparse.Namespace) -> int:
    path = args.db or load_config(args.config, MonitorConfig).store.path
    if not Path(path).is_file():
        raise UsageError(f"no store at {path}")
    store = SqliteStore(path)
    try:
        report = store.verify_chain()
    finally:
        store.close()
    if report.ok:
        print(f"ok: {report.rows} results, chain intact; last hash {report.last_hash}")
        return 0
    print(
        f"BROKEN at row {report.first_broken_row} (result {report.first_broken_id}): {report.problem};"
        f" {report.rows - 1} rows before it verified"
    )
    return 1
