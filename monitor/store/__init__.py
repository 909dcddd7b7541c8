"""The monitor's store: append-only results with a hash chain, incidents, pages, state.

``protocols`` says what each part of the monitor needs (and the unit-of-work rule),
``records`` the values every backend hands out, ``sqlite`` the one backend so far.
``open_store`` is how the commands open one: the monitor read-write (the schema brought
up to date), ``ecpm report`` and ``ecpm ledger verify`` read-only (nothing written).
"""

from __future__ import annotations

from pathlib import Path

from monitor.store.protocols import (
    ChainSource,
    Marks,
    NotificationQueue,
    ReportSource,
    SeqBook,
    SeqReads,
    Store,
    UnitOfWork,
    VerificationBook,
)
from monitor.store.records import (
    GENESIS,
    ChainReport,
    ChainRow,
    ProbeEvent,
    ProbeStatus,
    Quarantined,
    QueuedNotification,
    Verification,
    chain_hash,
    read_payload,
    summarize,
)
from monitor.store.sqlite import SqliteStore, StoreError


def open_store(path: str | Path, *, read_only: bool = False) -> SqliteStore:
    """The store at ``path``; ``read_only`` for readers that must not change it."""
    return SqliteStore(path, read_only=read_only)


__all__ = [
    "GENESIS",
    "ChainReport",
    "ChainRow",
    "ChainSource",
    "Marks",
    "NotificationQueue",
    "ProbeEvent",
    "ProbeStatus",
    "Quarantined",
    "QueuedNotification",
    "ReportSource",
    "SeqBook",
    "SeqReads",
    "SqliteStore",
    "Store",
    "StoreError",
    "UnitOfWork",
    "Verification",
    "VerificationBook",
    "chain_hash",
    "open_store",
    "read_payload",
    "summarize",
]
