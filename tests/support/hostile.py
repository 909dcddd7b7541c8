"""Hostile inputs for ingest tests: correctly signed nonsense, and rows written straight
into the store as an older version (or a hand) could have left them."""

from __future__ import annotations

import hashlib
import hmac
import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest

from monitor.store import chain_hash


def canonical(data: dict[str, Any], *, allow_nan: bool = False) -> bytes:
    body = {k: v for k, v in data.items() if k != "sig"}
    return json.dumps(
        body, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=allow_nan
    ).encode("utf-8", "surrogatepass")


def sign(data: dict[str, Any], key: str) -> dict[str, Any]:
    """``data`` with ``sig`` computed as a probe would (over whatever the fields hold)."""
    try:
        body = canonical(data)
    except ValueError:  # NaN / infinity: not JSON; sign the non-standard form anyway
        body = canonical(data, allow_nan=True)
    return {**data, "sig": hmac.new(key.encode(), body, hashlib.sha256).hexdigest()}


def payload(data: dict[str, Any], *, ascii_only: bool = False) -> bytes:
    """The wire bytes; ``ascii_only`` writes ``\\uXXXX`` escapes (so a lone surrogate
    arrives as valid UTF-8 and reaches the parser)."""
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=ascii_only).encode(
        "utf-8", "surrogatepass"
    )


def signed_payload(data: dict[str, Any], key: str, *, ascii_only: bool = False) -> bytes:
    return payload(sign(data, key), ascii_only=ascii_only)


def append_raw_row(db_path: str | Path, data: dict[str, Any] | str, *, received_at: str | None = None) -> int:
    """Append a result row the way ``SqliteStore.add_result`` does — same columns, a valid
    chain hash — but without any check, as an older monitor stored a signed result with
    ``timings.ringing = 10**400`` before the value bounds.
    ``data`` is the payload's JSON object, or the payload text itself. Returns the row."""
    text = data if isinstance(data, str) else payload(data).decode("utf-8", "surrogatepass")
    fields: dict[str, Any] = data if isinstance(data, dict) else {}
    db = sqlite3.connect(db_path)
    try:
        tip = db.execute("SELECT hash FROM results ORDER BY row DESC LIMIT 1").fetchone()
        if tip is None:
            anchor = db.execute("SELECT value FROM meta WHERE key = 'chain_anchor'").fetchone()
            prev = anchor[0] if anchor else "0" * 64
        else:
            prev = tip[0]
        cursor = db.execute(
            "INSERT INTO results (id, probe, target, check_kind, seq, started_at, finished_at, outcome,"
            " confirm, request_id, received_at, payload, prev_hash, hash)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                str(fields.get("id", "not-an-id")),
                str(fields.get("probe", "p1")),
                str(fields.get("target", "t1")),
                str(fields.get("check", "invite")),
                _sqlite_int(fields.get("seq", 0)),
                str(fields.get("started_at", "")),
                str(fields.get("finished_at", "")),
                str(fields.get("outcome", "pass")),
                int(bool(fields.get("confirm"))),
                fields.get("request_id"),
                received_at or str(fields.get("finished_at", "2026-01-01T00:00:00.000Z")),
                text,
                prev,
                chain_hash(prev, text),
            ),
        )
        db.commit()
        return int(cursor.lastrowid or 0)
    finally:
        db.close()


def _sqlite_int(value: Any) -> Any:
    """SQLite's INTEGER holds 64 bits; a bigger seq goes into the column as text."""
    if isinstance(value, int) and not isinstance(value, bool) and -(2**63) <= value < 2**63:
        return value
    return str(value)


def series(registry: CollectorRegistry) -> list[str]:
    """Every sample line of the exposition (what Prometheus would store as series)."""
    return [
        line.split(" ")[0]
        for line in generate_latest(registry).decode().splitlines()
        if line and not line.startswith("#")
    ]


def rows(db_path: str | Path) -> Iterator[tuple[Any, ...]]:
    db = sqlite3.connect(db_path)
    try:
        yield from db.execute("SELECT row, id, probe, seq, received_at, payload FROM results ORDER BY row")
    finally:
        db.close()
