"""The durable outbox: every result is on disk before it is published, and leaves only
when the monitor confirms it stored it (``probes.delivery``).

One SQLite file (WAL) holds the probe's sequence counter and the results the monitor
has not confirmed::

    meta(name PRIMARY KEY, value)        -- 'seq': the last number handed out,
                                         -- 'confirmed': the monitor's last ack
    outbox(seq PRIMARY KEY, id UNIQUE, probe, target, created, payload, published)

A result's life
    ``add`` stores it (``published`` 0) → the publisher sends it, and on the broker's
    PUBACK ``mark_published`` sets ``published`` 1 (it is kept) → the monitor's ack
    (``confirm(seq)``: everything up to ``seq`` is in its store) deletes it. A replay
    request (``reopen(first, last)``) sets ``published`` back to 0 for what is kept in
    that range, so the publisher sends it again unchanged, and names the seq numbers in
    the range it no longer has (``gone``).

The bound on what is kept (``keep_unconfirmed``, ``keep_for``)
    Published results the monitor has not confirmed are kept at most
    ``keep_unconfirmed`` (the oldest first go) and at most ``keep_for`` seconds; each
    one dropped is counted (``evicted_total``, ``ecpm_probe_outbox_evicted_total``),
    logged at ERROR and reported in the probe's status: a monitor that never confirms
    (an old version, or one cut off for longer than the bound) costs replay, never disk.

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
    small (see the figures in tests/test_outbox.py and BENCHMARKS.md).

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
from typing import Any, TypeVar

from ecpm.errors import EcpmError
from probes.result import Result

logger = logging.getLogger(__name__)

T = TypeVar("T")

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL)",
    "CREATE TABLE IF NOT EXISTS outbox ("
    " seq INTEGER PRIMARY KEY, id TEXT NOT NULL UNIQUE, probe TEXT NOT NULL,"
    " target TEXT NOT NULL, created REAL NOT NULL, payload BLOB NOT NULL,"
    " published INTEGER NOT NULL DEFAULT 0)",
    "INSERT OR IGNORE INTO meta (name, value) VALUES ('seq', 0)",
    "INSERT OR IGNORE INTO meta (name, value) VALUES ('confirmed', 0)",
)
# an outbox written before results were kept until confirmed (every row: unpublished)
_MIGRATE = "ALTER TABLE outbox ADD COLUMN published INTEGER NOT NULL DEFAULT 0"
_INDEX = "CREATE INDEX IF NOT EXISTS outbox_unpublished ON outbox (published, seq)"
_OVERFLOW_LOG_EVERY = 60.0  # seconds between ERROR lines while over the bound
_TRIM_EVERY = 10.0  # seconds between checks of keep_for


class OutboxError(EcpmError):
    """The outbox cannot be opened, or a result could not be stored."""


@dataclass(frozen=True, slots=True)
class Pending:
    """A stored result waiting to be published (or published again)."""

    seq: int
    id: str
    probe: str
    target: str
    created: float  # Unix time it was stored
    payload: bytes


@dataclass(frozen=True, slots=True)
class OutboxStats:
    depth: int  # unpublished
    unconfirmed: int  # published, kept until the monitor confirms
    oldest_created: float | None  # of the unpublished
    last_seq: int
    confirmed_seq: int
    added_total: int
    acked_total: int  # PUBACKs (first publish and replays)
    confirmed_total: int  # deleted after the monitor's ack
    overflow_total: int
    lost_total: int
    evicted_total: int
    error: str | None  # a code while storing fails ("disk_full", "io_error"), else None


@dataclass(frozen=True, slots=True)
class Reopened:
    """What ``reopen`` found in the range: how many it will send again, and the seq
    numbers it no longer has, as (first, last) ranges."""

    again: int
    gone: tuple[tuple[int, int], ...]


class Outbox:
    """Open (or create) the outbox at ``path``. Close it with ``close()``."""

    def __init__(
        self,
        path: str | Path,
        *,
        max_results: int,
        keep_unconfirmed: int = 100_000,
        keep_for: float = 7 * 86400.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._path = str(path)
        self._max = max_results
        self._keep = keep_unconfirmed
        self._keep_for = keep_for
        self._clock = clock
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ecpm-outbox")
        self._lock = threading.Lock()  # guards the snapshot below
        self._listeners: list[Callable[[], None]] = []
        self._closed = False
        self._db: sqlite3.Connection | None = None
        self._depth = 0
        self._unconfirmed = 0
        self._oldest: float | None = None
        self._last_seq = 0
        self._confirmed_seq = 0
        self._added = 0
        self._acked = 0
        self._confirmed = 0
        self._overflow = 0
        self._lost = 0
        self._evicted = 0
        self._error: str | None = None
        self._last_trim = float("-inf")
        self._last_evict_log = float("-inf")
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
            if "published" not in {row[1] for row in db.execute("PRAGMA table_info(outbox)")}:
                db.execute(_MIGRATE)
            db.execute(_INDEX)
            db.execute("COMMIT")
            self._last_seq = db.execute("SELECT value FROM meta WHERE name='seq'").fetchone()[0]
            self._confirmed_seq = db.execute("SELECT value FROM meta WHERE name='confirmed'").fetchone()[0]
            self._count(db)
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

    def _count(self, db: sqlite3.Connection) -> None:
        """Read the depths (at open) and the oldest unpublished result."""
        depth, unconfirmed = db.execute(
            "SELECT count(*) - coalesce(sum(published), 0), coalesce(sum(published), 0) FROM outbox"
        ).fetchone()
        with self._lock:
            self._depth, self._unconfirmed = int(depth), int(unconfirmed)
        self._find_oldest(db)

    def _find_oldest(self, db: sqlite3.Connection) -> None:
        row = db.execute("SELECT created FROM outbox WHERE published = 0 ORDER BY seq LIMIT 1").fetchone()
        with self._lock:
            self._oldest = None if row is None else float(row[0])

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
                self._error = _error_code(exc)
            logger.error(
                "outbox %s: a result could not be stored and is LOST (%s);"
                " the next stored result will leave a seq gap",
                self._path,
                exc,
            )
            self._notify()
            raise OutboxError(f"outbox {self._path}: cannot store a result: {exc}") from None
        with self._lock:
            self._unrecorded = 0
            self._error = None
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
        self._notify()
        return result

    def _notify(self) -> None:
        for listener in list(self._listeners):
            try:
                listener()
            except Exception:
                logger.exception("outbox listener failed")

    def _pending(self, limit: int, after_seq: int) -> list[Pending]:
        rows = self._conn().execute(
            "SELECT seq, id, probe, target, created, payload FROM outbox"
            " WHERE seq > ? AND published = 0 ORDER BY seq LIMIT ?",
            (after_seq, limit),
        )
        return [Pending(s, i, p, t, float(c), bytes(b)) for s, i, p, t, c, b in rows]

    def _write(self, work: Callable[[sqlite3.Connection], T]) -> T:
        db = self._conn()
        db.execute("BEGIN IMMEDIATE")
        try:
            out = work(db)
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        return out

    def _mark_published(self, ids: list[str]) -> int:
        def work(db: sqlite3.Connection) -> int:
            marked = 0
            for start in range(0, len(ids), 500):
                chunk = ids[start : start + 500]
                marks = ",".join("?" * len(chunk))
                marked += db.execute(
                    f"UPDATE outbox SET published = 1 WHERE published = 0 AND id IN ({marks})", chunk
                ).rowcount
            return marked

        marked = self._write(work)
        with self._lock:
            self._acked += marked
            self._depth -= marked
            self._unconfirmed += marked
        self._find_oldest(self._conn())
        self._trim()
        return marked

    def _trim(self) -> None:
        """Drop published, unconfirmed results over ``keep_unconfirmed`` or older than
        ``keep_for``, oldest first; count and report every one."""
        now = self._clock()
        with self._lock:
            over = self._unconfirmed - self._keep
        if over <= 0 and time.monotonic() - self._last_trim < _TRIM_EVERY:
            return
        self._last_trim = time.monotonic()

        def work(db: sqlite3.Connection) -> int:
            evicted = 0
            if over > 0:
                evicted += db.execute(
                    "DELETE FROM outbox WHERE seq IN"
                    " (SELECT seq FROM outbox WHERE published = 1 ORDER BY seq LIMIT ?)",
                    (over,),
                ).rowcount
            evicted += db.execute(
                "DELETE FROM outbox WHERE published = 1 AND created < ?", (now - self._keep_for,)
            ).rowcount
            return evicted

        evicted = self._write(work)
        if not evicted:
            return
        with self._lock:
            self._unconfirmed -= evicted
            self._evicted += evicted
            total = self._evicted
        if time.monotonic() - self._last_evict_log >= _OVERFLOW_LOG_EVERY:
            self._last_evict_log = time.monotonic()
            logger.error(
                "outbox %s: dropped %d published result(s) the monitor never confirmed"
                " (over keep_unconfirmed %d or older than keep_for %.0fs; %d so far);"
                " a gap in them can no longer be repaired - is the monitor confirming?",
                self._path,
                evicted,
                self._keep,
                self._keep_for,
                total,
            )
        self._notify()

    def _confirm(self, seq: int) -> int:
        with self._lock:
            if seq <= self._confirmed_seq:
                return 0
            seq = min(seq, self._last_seq)  # an ack beyond what was handed out confirms no more

        def work(db: sqlite3.Connection) -> tuple[int, int]:
            total, published = db.execute(
                "SELECT count(*), coalesce(sum(published), 0) FROM outbox WHERE seq <= ?", (seq,)
            ).fetchone()
            db.execute("DELETE FROM outbox WHERE seq <= ?", (seq,))
            db.execute("UPDATE meta SET value = max(value, ?) WHERE name = 'confirmed'", (seq,))
            return int(total), int(published)

        removed, published = self._write(work)
        with self._lock:
            self._confirmed_seq = max(self._confirmed_seq, seq)
            self._confirmed += removed
            self._unconfirmed -= published
            self._depth -= removed - published
        if removed > published:
            self._find_oldest(self._conn())
        return removed

    def _reopen(self, first: int, last: int) -> Reopened:
        with self._lock:
            last = min(last, self._last_seq)  # numbers not handed out yet are not gone

        def work(db: sqlite3.Connection) -> tuple[int, list[int]]:
            again = db.execute(
                "UPDATE outbox SET published = 0 WHERE published = 1 AND seq BETWEEN ? AND ?", (first, last)
            ).rowcount
            kept = [
                row[0]
                for row in db.execute("SELECT seq FROM outbox WHERE seq BETWEEN ? AND ?", (first, last))
            ]
            return int(again), kept

        again, kept = self._write(work) if first <= last else (0, [])
        gone: list[tuple[int, int]] = []
        expected = first
        for seq in [*kept, last + 1]:
            if seq > expected:
                gone.append((expected, seq - 1))
            expected = seq + 1
        if again:
            with self._lock:
                self._depth += again
                self._unconfirmed -= again
            self._find_oldest(self._conn())
            self._notify()
        return Reopened(again, tuple(gone))

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
        """Up to ``limit`` unpublished results with ``seq > after_seq``, in seq order."""
        return await self._call(self._pending, limit, after_seq)

    async def mark_published(self, ids: Iterable[str]) -> int:
        """Mark results the broker acknowledged as published (kept until confirmed)."""
        batch = list(ids)
        if not batch:
            return 0
        return await self._call(self._mark_published, batch)

    def published_soon(self, ids: Iterable[str]) -> Future[int]:
        """Queue a ``mark_published`` without waiting for it (work queued later runs
        after it). A failure is logged here; the results then are sent again."""
        return self._soon(
            "could not mark published results (they will be sent again)", self._mark_published, list(ids)
        )

    async def confirm(self, seq: int) -> int:
        """The monitor stored everything up to ``seq``: delete it; return how many rows went."""
        return await self._call(self._confirm, seq)

    def confirm_soon(self, seq: int) -> Future[int]:
        return self._soon("could not delete confirmed results (kept, harmless)", self._confirm, seq)

    async def reopen(self, first: int, last: int) -> Reopened:
        """Send ``first``..``last`` again (what is kept of it); name what is gone."""
        return await self._call(self._reopen, first, last)

    def _soon(self, failure: str, fn: Callable[..., object], *args: object) -> Future[Any]:
        if self._closed:
            raise OutboxError(f"outbox {self._path} is closed")
        future = self._pool.submit(fn, *args)

        def log(done: Future[Any]) -> None:
            if not done.cancelled() and done.exception() is not None:
                logger.error("outbox %s: %s", self._path, failure, exc_info=done.exception())

        future.add_done_callback(log)
        return future

    def add_listener(self, listener: Callable[[], None]) -> None:
        """Call ``listener()`` after each stored (or lost) result, results reopened for
        replay and results evicted (from the outbox thread)."""
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
                unconfirmed=self._unconfirmed,
                oldest_created=self._oldest,
                last_seq=self._last_seq,
                confirmed_seq=self._confirmed_seq,
                added_total=self._added,
                acked_total=self._acked,
                confirmed_total=self._confirmed,
                overflow_total=self._overflow,
                lost_total=self._lost,
                evicted_total=self._evicted,
                error=self._error,
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


def _error_code(exc: BaseException) -> str:
    """A bounded code for a failure to store (reported in the probe's status)."""
    text = str(exc).lower()
    if "full" in text or getattr(exc, "errno", None) == 28:  # SQLITE_FULL, ENOSPC
        return "disk_full"
    if isinstance(exc, sqlite3.Error | OSError):
        return "io_error"
    return "write_failed"
