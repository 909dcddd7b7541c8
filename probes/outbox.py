"""The durable outbox: every result is on disk before it is published, and leaves only after PUBACK.

One SQLite file (WAL) holds the probe's sequence counter and the results not yet
acknowledged by the broker::

    meta(name PRIMARY KEY, value)        -- 'seq': the last number handed out
    outbox(seq PRIMARY KEY, id UNIQUE, probe, target, created, payload)

Sequence numbers
    ``add(make)`` runs in one ``BEGIN IMMEDIATE`` transaction: read the counter,
    build (and sign) the result with ``make(seq)``, insert it, store the counter,
    commit. A number is therefore handed out exactly once, +1 per result, across
    restarts and ``kill -9``. If a result cannot be written (disk full, I/O error),
    ``add`` raises ``OutboxError``, counts it in ``lost_total`` and the *next*
    stored result skips the lost numbers, so the monitor sees the loss as a gap
    (``ecpm_results_missing_total``) instead of never hearing of it.

Durability: ``synchronous=FULL``
    With WAL, NORMAL survives a process crash but may lose the last commits on a
    power cut. Losing a commit here would roll the counter back and reuse a seq
    that may already have been published with another id, and lose a result the
    scheduler believes is safe. FULL costs one fsync per transaction; a probe
    produces a few results a second at most and acks are batched, so the cost is
    small (see the figures in tests/test_outbox.py and the lead's report).

The bound (``max_results``) is a soft one
    When the outbox already holds ``max_results`` unpublished results (the broker
    has been unreachable for a long time), new results are still stored: dropping
    the oldest, or refusing the newest, would silently discard evidence of exactly
    the period nobody could see. Each result stored over the bound is counted
    (``overflow_total``, exported as ``ecpm_probe_outbox_overflow_total``) and
    logged at ERROR (the first time, then at most once a minute), and the depth and
    age of the oldest result are exported for alerting. Only a failing disk loses
    results, and that loss is counted, logged and made visible as a seq gap.

Locking
    The file is opened in SQLite's exclusive locking mode: a second process (a
    second agent pointed at the same file) fails at open with ``OutboxError``
    instead of publishing the same results twice.

Threads
    All SQLite work runs in one worker thread owned by the outbox; the async
    methods hand work to it, so an fsync never stalls the event loop. ``depth()``,
    ``oldest_age()`` and ``stats()`` read an in-memory snapshot and may be called
    from any thread (e.g. the metrics thread).
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from ecpm.errors import EcpmError
from probes.result import Result

logger = logging.getLogger(__name__)

T = TypeVar("T")

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL)",
    "CREATE TABLE IF NOT EXISTS outbox ("
    " seq INTEGER PRIMARY KEY, id TEXT NOT NULL UNIQUE, probe TEXT NOT NULL,"
    " target TEXT NOT NULL, created REAL NOT NULL, payload BLOB NOT NULL)",
    "INSERT OR IGNORE INTO meta (name, value) VALUES ('seq', 0)",
)
_OVERFLOW_LOG_EVERY = 60.0  # seconds between ERROR lines while over the bound


class OutboxError(EcpmError):
    """The outbox cannot be opened, or a result could not be stored."""


@dataclass(frozen=True, slots=True)
class Pending:
    """A stored result waiting for the broker's PUBACK."""

    seq: int
    id: str
    probe: str
    target: str
    created: float  # Unix time it was stored
    payload: bytes


@dataclass(frozen=True, slots=True)
class OutboxStats:
    depth: int
    oldest_created: float | None
    last_seq: int
    added_total: int
    acked_total: int
    overflow_total: int
    lost_total: int


class Outbox:
    """Open (or create) the outbox at ``path``. Close it with ``close()``."""

    def __init__(
        self,
        path: str | Path,
        *,
        max_results: int,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._path = str(path)
        self._max = max_results
        self._clock = clock
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ecpm-outbox")
        self._lock = threading.Lock()  # guards the snapshot below
        self._listeners: list[Callable[[], None]] = []
        self._closed = False
        self._db: sqlite3.Connection | None = None
        self._depth = 0
        self._oldest: float | None = None
        self._last_seq = 0
        self._added = 0
        self._acked = 0
        self._overflow = 0
        self._lost = 0
        self._unrecorded = 0  # numbers to skip so that a lost result leaves a gap
        self._last_overflow_log = float("-inf")
        try:
            self._pool.submit(self._open).result()
        except BaseException:
            self._pool.shutdown(wait=True)
            raise

    # ------------------------------------------------------------ worker-thread side

    def _open(self) -> None:
        try:
            db = sqlite3.connect(self._path, isolation_level=None, timeout=1.0)
        except sqlite3.Error as exc:
            raise OutboxError(f"cannot open outbox {self._path}: {exc}") from None
        try:
            db.execute("PRAGMA locking_mode=EXCLUSIVE")
            mode = db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if mode != "wal":
                raise OutboxError(f"outbox {self._path}: cannot use WAL (journal_mode={mode})")
            db.execute("PRAGMA synchronous=FULL")
            db.execute("BEGIN IMMEDIATE")  # takes (and keeps) the exclusive lock
            for statement in _SCHEMA:
                db.execute(statement)
            db.execute("COMMIT")
            self._last_seq = db.execute("SELECT value FROM meta WHERE name='seq'").fetchone()[0]
            self._depth = db.execute("SELECT count(*) FROM outbox").fetchone()[0]
            self._oldest = self._oldest_created(db)
        except sqlite3.OperationalError as exc:
            db.close()
            if "locked" in str(exc):
                raise OutboxError(
                    f"outbox {self._path} is in use by another process (one outbox per probe)"
                ) from None
            raise OutboxError(f"cannot open outbox {self._path}: {exc}") from None
        except sqlite3.DatabaseError as exc:
            db.close()
            raise OutboxError(f"outbox {self._path} is not a usable SQLite file: {exc}") from None
        except BaseException:
            db.close()
            raise
        self._db = db
        if self._depth:
            logger.info(
                "outbox %s: %d result(s) waiting from before, seq at %d",
                self._path,
                self._depth,
                self._last_seq,
            )

    @staticmethod
    def _oldest_created(db: sqlite3.Connection) -> float | None:
        row = db.execute("SELECT created FROM outbox ORDER BY seq LIMIT 1").fetchone()
        return None if row is None else float(row[0])

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            raise OutboxError(f"outbox {self._path} is closed")
        return self._db

    def _add(self, make: Callable[[int], Result]) -> Result:
        db = self._conn()
        created = self._clock()
        try:
            db.execute("BEGIN IMMEDIATE")
            try:
                stored = db.execute("SELECT value FROM meta WHERE name='seq'").fetchone()[0]
                seq = stored + 1 + self._unrecorded
                result = make(seq)
                if result.seq != seq:
                    raise ValueError(f"make(seq) returned a result numbered {result.seq}, not {seq}")
                db.execute(
                    "INSERT INTO outbox (seq, id, probe, target, created, payload) VALUES (?, ?, ?, ?, ?, ?)",
                    (seq, result.id, result.probe, result.target, created, result.to_json()),
                )
                db.execute("UPDATE meta SET value=? WHERE name='seq'", (seq,))
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise
        except Exception as exc:  # any failure, not only SQLite's: the loss must show as a seq gap
            with self._lock:
                self._lost += 1
                self._unrecorded += 1
            logger.error(
                "outbox %s: a result could not be stored and is LOST (%s);"
                " the next stored result will leave a seq gap",
                self._path,
                exc,
            )
            raise OutboxError(f"outbox {self._path}: cannot store a result: {exc}") from None
        with self._lock:
            self._unrecorded = 0
            self._last_seq = seq
            self._added += 1
            self._depth += 1
            if self._oldest is None:
                self._oldest = created
            over = self._depth > self._max
            if over:
                self._overflow += 1
            depth, overflow = self._depth, self._overflow
        if over:
            now = time.monotonic()
            if now - self._last_overflow_log >= _OVERFLOW_LOG_EVERY:
                self._last_overflow_log = now
                logger.error(
                    "outbox %s holds %d unpublished results, over its bound of %d"
                    " (%d stored over the bound so far); still storing, nothing dropped"
                    " - is the MQTT broker reachable?",
                    self._path,
                    depth,
                    self._max,
                    overflow,
                )
        for listener in list(self._listeners):
            try:
                listener()
            except Exception:
                logger.exception("outbox listener failed")
        return result

    def _pending(self, limit: int, after_seq: int) -> list[Pending]:
        rows = self._conn().execute(
            "SELECT seq, id, probe, target, created, payload FROM outbox WHERE seq > ? ORDER BY seq LIMIT ?",
            (after_seq, limit),
        )
        return [Pending(s, i, p, t, float(c), bytes(b)) for s, i, p, t, c, b in rows]

    def _ack(self, ids: list[str]) -> int:
        db = self._conn()
        db.execute("BEGIN IMMEDIATE")
        try:
            removed = 0
            for start in range(0, len(ids), 500):
                chunk = ids[start : start + 500]
                marks = ",".join("?" * len(chunk))
                removed += db.execute(f"DELETE FROM outbox WHERE id IN ({marks})", chunk).rowcount
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        oldest = self._oldest_created(db)
        with self._lock:
            self._depth -= removed
            self._acked += removed
            self._oldest = oldest
        return removed

    def _close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    # ------------------------------------------------------------ public side

    async def _call(self, fn: Callable[..., T], *args: object) -> T:
        if self._closed:
            raise OutboxError(f"outbox {self._path} is closed")
        return await asyncio.wrap_future(self._pool.submit(fn, *args))

    async def add(self, make: Callable[[int], Result]) -> Result:
        """Store the result ``make(seq)`` under the next sequence number; return it.

        ``make`` runs inside the transaction (in the outbox thread) and must return a
        result numbered ``seq``, e.g. ``lambda seq: Result.from_outcome(..., seq=seq)``.
        When this returns, the result is on disk. Raises ``OutboxError`` if it is not.
        """
        return await self._call(self._add, make)

    async def pending(self, limit: int = 100, *, after_seq: int = 0) -> list[Pending]:
        """Up to ``limit`` stored results with ``seq > after_seq``, in seq order."""
        return await self._call(self._pending, limit, after_seq)

    async def ack(self, ids: Iterable[str]) -> int:
        """Delete results the broker acknowledged (one transaction); return how many."""
        batch = list(ids)
        if not batch:
            return 0
        return await self._call(self._ack, batch)

    def ack_soon(self, ids: Iterable[str]) -> Future[int]:
        """Queue an ``ack`` without waiting for it (work queued later runs after it).

        A failure is logged here; the results then stay stored and are sent again.
        """
        if self._closed:
            raise OutboxError(f"outbox {self._path} is closed")
        future = self._pool.submit(self._ack, list(ids))
        future.add_done_callback(self._log_ack_failure)
        return future

    def _log_ack_failure(self, future: Future[int]) -> None:
        if not future.cancelled() and future.exception() is not None:
            logger.error(
                "outbox %s: could not delete acknowledged results (they will be sent again)",
                self._path,
                exc_info=future.exception(),
            )

    def add_listener(self, listener: Callable[[], None]) -> None:
        """Call ``listener()`` after each stored result (from the outbox thread)."""
        self._listeners.append(listener)

    def remove_listener(self, listener: Callable[[], None]) -> None:
        if listener in self._listeners:
            self._listeners.remove(listener)

    @property
    def path(self) -> str:
        return self._path

    @property
    def max_results(self) -> int:
        return self._max

    def depth(self) -> int:
        with self._lock:
            return self._depth

    def oldest_age(self, now: float | None = None) -> float | None:
        """Seconds the oldest unpublished result has waited; None when empty."""
        with self._lock:
            oldest = self._oldest
        if oldest is None:
            return None
        return max(0.0, (self._clock() if now is None else now) - oldest)

    def stats(self) -> OutboxStats:
        with self._lock:
            return OutboxStats(
                depth=self._depth,
                oldest_created=self._oldest,
                last_seq=self._last_seq,
                added_total=self._added,
                acked_total=self._acked,
                overflow_total=self._overflow,
                lost_total=self._lost,
            )

    def close(self) -> None:
        """Finish queued work, close the file. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        try:
            self._pool.submit(self._close).result()
        finally:
            self._pool.shutdown(wait=True)
