"""``ecpm ledger verify -c monitor.yaml``: check the stored results' hash chain.

Exit 0 when every row chains to the one before it (printing the row count and the
last hash, which a later reader can compare), 1 naming the first broken row. With
``-c`` the probes' keys are known, so every stored result's signature is checked
too: a rewritten chain cannot forge a probe's HMAC.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ecpm.configfile import load_config
from ecpm.errors import UsageError
from monitor.config import MonitorConfig
from monitor.store import SqliteStore
from probes.result import parse_result, verify


def _first_bad_signature(store: SqliteStore, config: MonitorConfig) -> tuple[int, str, str] | None:
    keys = {p.id: p.secret.get_secret_value().encode() for p in config.probes}
    for row, result_id, payload, _, _ in store.iter_chain():
        result = parse_result(payload.encode("utf-8"))
        key = keys.get(result.probe)
        if key is None:
            return (
                row,
                result_id,
                f"probe {result.probe} is not in the config: its signature cannot be checked",
            )
        if not verify(result, key):
            return (
                row,
                result_id,
                f"the signature does not verify with {result.probe}'s key (forged or re-keyed)",
            )
    return None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=["verify"], help="verify: check the hash chain")
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("-c", "--config", help="monitor config (its store.path is checked)")
    where.add_argument("--db", help="path of the monitor's SQLite store")


def run(args: argparse.Namespace) -> int:
    config = None if args.config is None else load_config(args.config, MonitorConfig)
    path = args.db or (config.store.path if config is not None else "")
    if not Path(path).is_file():
        raise UsageError(f"no store at {path}")
    store = SqliteStore(path)
    try:
        report = store.verify_chain()
        forged = None if config is None or not report.ok else _first_bad_signature(store, config)
    finally:
        store.close()
    if forged is not None:
        print(f"BROKEN at row {forged[0]} (result {forged[1]}): {forged[2]}")
        return 1
    if report.ok:
        signed = "" if config is None else ", every signature verified"
        print(f"ok: {report.rows} results, chain intact{signed}; last hash {report.last_hash}")
        return 0
    print(
        f"BROKEN at row {report.first_broken_row} (result {report.first_broken_id}): {report.problem};"
        f" {report.rows - 1} rows before it verified"
    )
    return 1
