"""The monitor's store: append-only results with a hash chain, incidents, pages, state.

``protocols`` says what each part of the monitor needs (and the unit-of-work rule),
``records`` the values every backend hands out, ``sql`` the reads and writes both
backends share, ``sqlite`` and ``postgres`` the backends. ``open_store`` is how the
commands open one, by where it is (a file path, or a ``postgresql://`` URL): the monitor
read-write (the schema brought up to date), ``ecpm report`` and ``ecpm ledger verify``
read-only (nothing written); ``pending_migrations`` is ``ecpm db upgrade --check``.
"""

from __future__ import annotations

import re
from pathlib import Path

from monitor.store import sqlite
from monitor.store.protocols import (
    ChainSource,
    DutyBook,
    Election,
    Marks,
    NotificationQueue,
    Replicas,
    ReportSource,
    SeqBook,
    SeqReads,
    Store,
    UnitOfWork,
    VerificationBook,
)
from monitor.store.records import (
    GENESIS,
    ChainMarks,
    ChainReport,
    ChainRow,
    Migration,
    ProbeEvent,
    ProbeStatus,
    Quarantined,
    QueuedNotification,
    ResultGroup,
    ResultWindow,
    SkewedRow,
    Verification,
    WindowAsk,
    chain_hash,
    read_payload,
    summarize,
)
from monitor.store.sql import StoreError, StoreLost
from monitor.store.sqlite import SqliteStore


def is_url(where: str | Path) -> bool:
    """Is ``where`` a PostgreSQL URL (else: a SQLite file)?"""
    return str(where).startswith(("postgresql://", "postgres://"))


def shown(where: str | Path) -> str:
    """``where`` as it may be printed and logged: a URL without its password."""
    text = re.sub(r"^(\w+://[^:/@]*):[^@/]*@", r"\1:***@", str(where))
    return re.sub(r"([?&]password=)[^&]*", r"\1***", text) if is_url(text) else text


def open_store(where: str | Path, *, read_only: bool = False) -> Store:
    """The store at ``where``; ``read_only`` for readers that must not change it."""
    if is_url(where):
        from monitor.store.postgres import PostgresStore  # noqa: PLC0415 - psycopg: the postgres extra

        return PostgresStore(str(where), read_only=read_only)
    return SqliteStore(where, read_only=read_only)


def pending_migrations(where: str | Path) -> list[Migration]:
    """The migrations a read-write open of ``where`` would apply; nothing is changed."""
    if is_url(where):
        from monitor.store import postgres  # noqa: PLC0415 - as above

        return postgres.pending_migrations(str(where))
    return sqlite.pending_migrations(str(where))


__all__ = [
    "GENESIS",
    "ChainMarks",
    "ChainReport",
    "ChainRow",
    "ChainSource",
    "DutyBook",
    "Election",
    "Marks",
    "Migration",
    "NotificationQueue",
    "ProbeEvent",
    "ProbeStatus",
    "Quarantined",
    "QueuedNotification",
    "Replicas",
    "ReportSource",
    "ResultGroup",
    "ResultWindow",
    "SeqBook",
    "SeqReads",
    "SkewedRow",
    "SqliteStore",
    "Store",
    "StoreError",
    "StoreLost",
    "UnitOfWork",
    "Verification",
    "VerificationBook",
    "WindowAsk",
    "chain_hash",
    "is_url",
    "open_store",
    "pending_migrations",
    "read_payload",
    "shown",
    "summarize",
]
