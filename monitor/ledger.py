"""``ecpm ledger verify -c monitor.yaml`` (or ``--db PATH``, ``--url URL``): check the stored
results' hash chain.

Exit 0 when every row chains to the one before it (printing the row count and the
last hash, which a later reader can compare), 1 naming the first broken row. With
``-c`` the probes' keys are known, so every stored result's signature is checked
too: a rewritten chain cannot forge a probe's HMAC.

Every payload is also read back as the monitor reads it. A row that cannot be read
(stored by an older version before the value bounds, or written by hand) but whose
hash verifies is **quarantined**: it stays in the chain (removing it would break every
hash after it), every reader skips it, and this command names it — row, result id,
target, finish time and why — after the ``ok`` line. It does not make the chain
broken (exit 0): nothing it holds is used as evidence anywhere.
"""

from __future__ import annotations

import argparse

from ecpm.configfile import load_config
from monitor.config import MonitorConfig
from monitor.db_command import add_where, where_of
from monitor.store import Quarantined, open_store
from probes.result import Result, verify_signature

MAX_LISTED = 100  # quarantined rows named one by one; the count is always complete


class _Signatures:
    """Checks each readable result's HMAC with its probe's key; keeps the first failure."""

    def __init__(self, config: MonitorConfig) -> None:
        self.keys = {p.id: p.secret.get_secret_value().encode() for p in config.probes}
        self.first_bad: tuple[int, str, str] | None = None

    def __call__(self, row: int, result_id: str, result: Result) -> None:
        if self.first_bad is not None:
            return
        key = self.keys.get(result.probe)
        if key is None:
            why = f"probe {result.probe} is not in the config: its signature cannot be checked"
            self.first_bad = (row, result_id, why)
        elif not verify_signature(result, key):
            why = f"the signature does not verify with {result.probe}'s key (forged or re-keyed)"
            self.first_bad = (row, result_id, why)


def quarantine_lines(quarantined: tuple[Quarantined, ...] | list[Quarantined]) -> list[str]:
    """The quarantined rows as the command prints them (at most ``MAX_LISTED`` named)."""
    if not quarantined:
        return []
    lines = [
        f"QUARANTINED: {len(quarantined)} stored result(s) cannot be read; they stay in the chain"
        " and are skipped by the monitor, the API and the report:"
    ]
    for q in quarantined[:MAX_LISTED]:
        lines.append(
            f"  row {q.row} (result {q.id}, target {q.target}, finished {q.finished_at}): {q.problem}"
        )
    if len(quarantined) > MAX_LISTED:
        lines.append(f"  ... and {len(quarantined) - MAX_LISTED} more")
    return lines


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=["verify"], help="verify: check the hash chain")
    add_where(parser, "monitor config (its store is checked, and every signature)")


def run(args: argparse.Namespace) -> int:
    config = None if args.config is None else load_config(args.config, MonitorConfig)
    store = open_store(where_of(args, config), read_only=True)
    try:
        signatures = None if config is None else _Signatures(config)
        report = store.check_chain(read=True, on_read=signatures)
        skip = {q.row for q in report.quarantined}
        forged = None if signatures is None or not report.ok else signatures.first_bad
    finally:
        store.close()
    if forged is not None:
        print(f"BROKEN at row {forged[0]} (result {forged[1]}): {forged[2]}")
        return 1
    if report.ok:
        signed = ""
        if config is not None:
            signed = ", every readable result's signature verified" if skip else ", every signature verified"
        print(f"ok: {report.rows} results, chain intact{signed}; last hash {report.last_hash}")
        for line in quarantine_lines(report.quarantined):
            print(line)
        return 0
    print(
        f"BROKEN at row {report.first_broken_row} (result {report.first_broken_id}): {report.problem};"
        f" {report.rows - 1} rows before it verified"
    )
    for line in quarantine_lines(report.quarantined):
        print(line)
    return 1
