"""The store on SQL, as both backends speak it: append-only results with a hash chain,
incidents, pages, state. ``SqlStore`` holds every read and write; a backend
(``monitor.store.sqlite``, ``monitor.store.postgres``) brings the connection, its schema
and migrations, and how several writers share the chain (``_lock_chain``).

Every row of ``results`` carries
``hash = sha256(prev_hash || "\\n" || payload)`` where ``payload`` is the result's
canonical signed JSON, so altering, removing or reordering any stored result
breaks the chain from that row on (``ecpm ledger verify``). Pruning old rows keeps
the hash of the last pruned row as the chain's anchor.

No method commits by itself (``monitor.store.protocols``: the unit of work): callers
add many rows and ``commit()`` once per batch, or wrap one change in ``transaction()``.
Appended results are written together (``add_result`` takes each one's chain position
in order and keeps its row; ``_flush`` writes the rows in one ``executemany`` at the
commit, or before any other statement on ``results``, so reads see them): a batch costs
one round trip for its rows, not one per row. A write that fails rolls the whole
transaction back and raises ``StoreLost`` (its other writes — last seq, gaps — must not
outlive its rows); the caller has acknowledged nothing of it.

Judged time: each row also carries ``judged_at``, the time the monitor judged the result
finished (``monitor.skew``: ``min(received_at, finished_at - clock_skew)``), and the
``clock_skew`` it was judged with. They are the monitor's own judgement, not the probe's
signed word, so they sit outside the hash chain (which covers the payload only) and
``check_chain`` does not check them. Every time-range read (``results_between``) selects
and orders by ``judged_at``.

Quarantine: ``add_result`` stores only a payload it can read back (``parse_result``),
so every row the monitor writes is readable. A row that is not (written by an older
version before the bounds existed, or by hand) stays in the chain — removing it
would break every hash after it — but every read skips it: it is logged once,
remembered (``quarantined()``, ``ecpm_results_quarantined_total``) and named by
``ecpm ledger verify`` and the report. Nothing that reads results fails on it.

The SQL is written once, with ``?`` placeholders and what SQLite and PostgreSQL both
accept (``ON CONFLICT DO NOTHING``, ``RETURNING``); times are ISO-8601 UTC text, which
sorts as time (PostgreSQL's columns use the "C" collation for that).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import statistics
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any, Literal, Protocol

from ecpm.errors import EcpmError
from monitor.model import (
    Ack,
    Incident,
    IncidentDuty,
    IncidentKind,
    Notification,
    ResultSummary,
    SeqGap,
    StateChange,
    TargetStateName,
)
from monitor.skew import judge
from monitor.store.records import (
    GENESIS,
    ChainMarks,
    ChainReport,
    ChainRow,
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
    columns_match,
    read_payload,
    summarize,
)
from probes.result import Result, ResultError, format_time, parse_time

logger = logging.getLogger(__name__)
# the open gaps of a probe that overlap (after_seq < ?, next_seq > ?)
_OPEN_GAPS_OVER = (
    "SELECT rowid FROM seq_gaps WHERE probe = ? AND after_seq < ? AND next_seq > ? AND closed_at IS NULL"
)

# the tables, in SQLite's words (``monitor.store.postgres`` translates them); what
# migrations added since a store was first written is with each backend's migrations;
# reason .. judged_ms are the report's (REPORT_COLUMNS: migration 3 adds them to older stores)
SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS results (
    row INTEGER PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    probe TEXT NOT NULL,
    target TEXT NOT NULL,
    check_kind TEXT NOT NULL,
    seq INTEGER NOT NULL,
    started_at TEXT NOT NULL,
    finished_at TEXT NOT NULL,
    outcome TEXT NOT NULL,
    confirm INTEGER NOT NULL,
    request_id TEXT,
    received_at TEXT NOT NULL,
    reason TEXT, post_dial_delay REAL, version TEXT, judged_ms INTEGER,
    payload TEXT NOT NULL,
    prev_hash TEXT NOT NULL,
    hash TEXT NOT NULL,
    judged_at TEXT,  -- the monitor-judged time (monitor.skew); added by migration 2 to older stores
    clock_skew REAL  -- the probe's estimated skew it was judged with, seconds; NULL: not known
);
CREATE INDEX IF NOT EXISTS results_target_time ON results (target, finished_at);
CREATE INDEX IF NOT EXISTS results_request ON results (request_id) WHERE request_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS results_probe_seq ON results (probe, seq);
CREATE INDEX IF NOT EXISTS results_unread ON results (row) WHERE judged_ms IS NULL;
CREATE TABLE IF NOT EXISTS probe_seq (probe TEXT PRIMARY KEY, last_seq INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS seq_gaps (
    probe TEXT NOT NULL, after_seq INTEGER NOT NULL, next_seq INTEGER NOT NULL,
    missing INTEGER NOT NULL, detected_at TEXT NOT NULL,
    repaired INTEGER NOT NULL DEFAULT 0, gone INTEGER NOT NULL DEFAULT 0, closed_at TEXT
);
CREATE TABLE IF NOT EXISTS seq_gone (
    probe TEXT NOT NULL, first_seq INTEGER NOT NULL, last_seq INTEGER NOT NULL, at TEXT NOT NULL,
    PRIMARY KEY (probe, first_seq, last_seq)
);
CREATE TABLE IF NOT EXISTS incidents (
    id INTEGER PRIMARY KEY,
    target TEXT NOT NULL,
    kind TEXT NOT NULL,
    opened_at TEXT NOT NULL,
    resolved_at TEXT,
    last_good_id TEXT, last_good_at TEXT,
    first_failed_id TEXT, first_failed_at TEXT,
    summary TEXT NOT NULL
);
-- a restart can never open a second incident for the same trouble
CREATE UNIQUE INDEX IF NOT EXISTS incidents_one_open ON incidents (target, kind) WHERE resolved_at IS NULL;
CREATE TABLE IF NOT EXISTS notifications (
    id INTEGER PRIMARY KEY,
    incident_id INTEGER NOT NULL REFERENCES incidents (id),
    notifier TEXT NOT NULL,
    event TEXT NOT NULL,
    payload TEXT NOT NULL,
    state TEXT NOT NULL DEFAULT 'pending',
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at TEXT NOT NULL,
    created_at TEXT NOT NULL,
    sent_at TEXT,
    last_error TEXT,
    UNIQUE (incident_id, notifier, event)
);
CREATE TABLE IF NOT EXISTS state_changes (
    row INTEGER PRIMARY KEY, target TEXT NOT NULL, state TEXT NOT NULL, at TEXT NOT NULL, why TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS state_changes_target ON state_changes (target, at);
CREATE TABLE IF NOT EXISTS probe_events (
    row INTEGER PRIMARY KEY, probe TEXT NOT NULL, online INTEGER NOT NULL, at TEXT NOT NULL, version TEXT
);
CREATE TABLE IF NOT EXISTS verifications (
    id INTEGER PRIMARY KEY,
    request_id TEXT NOT NULL UNIQUE,
    target TEXT NOT NULL,
    probes TEXT NOT NULL,
    required INTEGER NOT NULL,
    change_ref TEXT,
    requested_at TEXT NOT NULL,
    deadline TEXT NOT NULL,
    finished_at TEXT,
    outcome TEXT NOT NULL DEFAULT 'pending',
    detail TEXT NOT NULL DEFAULT '{}'
);
CREATE TABLE IF NOT EXISTS probe_status (
    probe TEXT PRIMARY KEY, online INTEGER NOT NULL, at TEXT NOT NULL, version TEXT, targets TEXT NOT NULL
);
"""
# notification duties and acknowledgements (monitor.duties; SQLite's migration 4, PostgreSQL's 3):
# each incident's duties as configured when it opened; an ack of the incident itself
DUTY_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS incident_duties (
    incident_id INTEGER NOT NULL REFERENCES incidents (id),
    name TEXT NOT NULL,
    text TEXT NOT NULL,
    due_at TEXT NOT NULL,
    escalate_at TEXT NOT NULL,
    route TEXT NOT NULL,
    escalated_at TEXT,
    acked_at TEXT, acked_by TEXT, ack_ref TEXT,
    PRIMARY KEY (incident_id, name)
)""",
    "CREATE INDEX IF NOT EXISTS incident_duties_escalate ON incident_duties (escalate_at)"
    " WHERE acked_at IS NULL AND escalated_at IS NULL",
    """CREATE TABLE IF NOT EXISTS incident_acks (
    incident_id INTEGER NOT NULL PRIMARY KEY REFERENCES incidents (id),
    acked_at TEXT NOT NULL, acked_by TEXT NOT NULL, ack_ref TEXT NOT NULL
)""",
)
# the report's columns (SQLite's migration 3, PostgreSQL's 2): the payload's reason,
# timings.ringing and version, and judged_at in Unix milliseconds; NULL until the payload was
# read back (add_result, or _fill_report_columns for rows stored before them)
REPORT_COLUMNS = (
    ("reason", "TEXT"),
    ("post_dial_delay", "REAL"),
    ("version", "TEXT"),
    ("judged_ms", "INTEGER"),
)
# the rows without the report's columns (a few, or none): found without a scan on every open
UNREAD_INDEX = "CREATE INDEX IF NOT EXISTS results_unread ON results (row) WHERE judged_ms IS NULL"
# what a report window reads, in judged order, without touching the table's rows (a row
# holds its payload: one target's day is thousands of pages apart). SQLite makes it on
# every read-write open, in place of results_target_judged, whose prefix it is
REPORT_INDEX = (
    "CREATE INDEX IF NOT EXISTS results_report ON results (target, judged_at, judged_ms, probe, version,"
    " check_kind, outcome, confirm, request_id, clock_skew, reason, post_dial_delay)"
)
# added with the judged time (SQLite's migration 2)
JUDGED_INDEXES = (
    "CREATE INDEX IF NOT EXISTS results_judged ON results (judged_at)",
    "CREATE INDEX IF NOT EXISTS results_target_judged ON results (target, judged_at)",
)


# one appended row (``SqlStore.add_result``, written by ``_flush``): a duplicate id never
# gets here (checked under the chain's lock), so a conflict is a bug and fails the batch
_INSERT_RESULT = (
    "INSERT INTO results (id, probe, target, check_kind, seq, started_at, finished_at, outcome,"
    " confirm, request_id, received_at, payload, prev_hash, hash, judged_at, clock_skew,"
    f" reason, post_dial_delay, version, judged_ms) VALUES ({', '.join('?' * 20)})"
)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"


def _t(moment: datetime | None) -> str | None:
    return None if moment is None else format_time(moment)


def _dt(text: str | None) -> datetime | None:
    return None if text is None else parse_time(text)


def _judged(value: object) -> datetime | None:
    """A stored ``judged_at``; None (the probe's time stands in) when missing or damaged."""
    if not isinstance(value, str):
        return None
    try:
        return parse_time(value)
    except ValueError:
        return None


def _skew(value: object) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


# what check_chain compares with the payload (records.columns_match): the columns queries
# select on, then the report's (compared once the row has them: judged_ms set)
_CHECKED_COLUMNS = (
    "probe, target, check_kind, seq, started_at, finished_at, outcome, confirm, request_id,"
    " reason, post_dial_delay, version, judged_ms"
)


def _report_values(result: Result, judged_at: str) -> tuple[str | None, float | None, str | None, int | None]:
    """The report's columns of a result read back, ``judged_at`` as stored (REPORT_COLUMNS);
    none for text holding a NUL, which PostgreSQL cannot store (the report reads that row
    from its payload)."""
    if "\x00" in f"{result.reason}{result.version}":
        return None, None, None, None
    judged = parse_time(judged_at)
    return result.reason, result.timings.get("ringing"), result.version, _epoch_ms(judged)


def _epoch_ms(moment: datetime) -> int:
    return (moment - _EPOCH) // _MS


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MS = timedelta(milliseconds=1)


# what _summaries reads of a row
_SUMMARY_COLUMNS = "row, id, target, finished_at, payload, judged_at, clock_skew"


class StoreError(EcpmError):
    """The store cannot be opened as asked: missing, unreachable, not a store, or too old to read."""


class StoreLost(StoreError):
    """The open transaction is gone (the connection to the server broke, or the server ended
    it): nothing since the last commit was stored. ``reconnect()``, then do it again."""


class Cursor(Protocol):
    @property
    def rowcount(self) -> int: ...
    def fetchone(self) -> Any: ...
    def fetchall(self) -> list[Any]: ...
    def __iter__(self) -> Iterator[Any]: ...


class Connection(Protocol):
    """What ``SqlStore`` uses of a connection: sqlite3's, or PostgreSQL's behind a
    translator (``monitor.store.postgres``)."""

    def execute(self, sql: str, parameters: Sequence[Any] = (), /) -> Cursor: ...
    def executemany(self, sql: str, rows: Iterable[Sequence[Any]], /) -> Any: ...
    def commit(self) -> None: ...
    def rollback(self) -> None: ...
    def close(self) -> None: ...


class SqlStore:
    """``Store`` on a SQL connection. Not thread-safe: one owner (the monitor's loop)."""

    _db: Connection
    read_only: bool
    # can another process append to this chain? Then its tip is read again, under
    # ``_lock_chain``, in each transaction that appends (``monitor.store.postgres``)
    _CHAIN_SHARED = False
    # what check_chain reads of each row after (row, id): the payload, prev_hash, hash, then
    # what the columns check needs. Here the columns, for columns_match in Python; a backend
    # that can give its verdict in SQL (1, 0, NULL: not a JSON object; 2: let Python decide)
    # without failing on a row that is not JSON sets _COLUMNS_MATCH and reads that instead
    _COLUMNS_MATCH: str | None = None
    _CHAIN_WALK = f"payload, prev_hash, hash, {_CHECKED_COLUMNS}"

    # how a page is held while it is sent (``claim_notification``): PostgreSQL's row lock
    _CLAIM = ""
    # what the driver raises when a write fails (``_flush``: the batch is then rolled back)
    _WRITE_ERRORS: tuple[type[Exception], ...] = ()

    # results appended in this transaction and not yet written (``add_result``), in chain
    # order; their ids and (probe, seq); and an id ``has_result`` found absent under the lock
    _pending: list[tuple[Any, ...]] | tuple[()] = ()

    def _opened(self) -> None:
        """The connection is ready: read where the chain ends."""
        self._tip: str | None = None if self._CHAIN_SHARED else self._load_tip()
        self._quarantined: dict[int, Quarantined] = {}  # unreadable rows met so far, by row
        self._pending = []
        self._pending_ids: set[str] = set()
        self._pending_seqs: set[tuple[str, int]] = set()
        self._absent: str | None = None

    def _sql(self, sql: str, args: Sequence[Any] = ()) -> Cursor:
        """Every statement but the few that know the pending rows: one that reads or
        writes ``results`` writes those rows first, so it sees the batch as stored."""
        if self._pending and "results" in sql:
            self._flush()
        return self._db.execute(sql, args)

    def _flush(self) -> None:
        """Write the pending rows: one ``executemany`` (sqlite3's; psycopg's pipelines it)."""
        rows = self._pending
        if not rows:
            return
        self._drop_pending()
        try:
            self._db.executemany(_INSERT_RESULT, rows)
        except (StoreLost, *self._WRITE_ERRORS) as exc:  # type: ignore[misc]  # a tuple of them
            # the transaction's other writes (last seq, gaps) must not outlive its rows: all
            # of it goes, and the caller does it again (the broker redelivers the batch)
            self._abandon()
            if isinstance(exc, StoreLost):
                raise
            raise StoreLost(f"the batch's results could not be written: {_one_line(exc)}") from exc

    def _abandon(self) -> None:
        """Roll the open transaction back, whole; the chain's tip is read again."""
        with contextlib.suppress(StoreLost, *self._WRITE_ERRORS):
            self._db.rollback()
        self._tip = None
        self._ended()

    def _drop_pending(self) -> None:
        self._pending = []
        self._pending_ids.clear()
        self._pending_seqs.clear()
        self._absent = None

    def _lock_chain(self) -> None:
        """Hold the chain's tip until this transaction ends (nothing with one writer)."""

    def _chain_tip(self) -> str:
        if self._tip is None:
            self._lock_chain()
            self._tip = self._load_tip()
        return self._tip

    @contextmanager
    def _walk(self, sql: str, args: Sequence[Any] = ()) -> Iterator[Iterator[Any]]:
        """The rows of a query that may cover the whole chain, as they come (sqlite3's
        cursor streams; ``monitor.store.postgres`` fetches them in batches)."""
        yield iter(self._sql(sql, args))

    def _ended(self) -> None:
        """A transaction ended: with a shared chain, another writer may append next."""
        self._absent = None
        if self._CHAIN_SHARED:
            self._tip = None

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """One self-contained change: committed when the block ends, undone if it raises.
        Only this block's writes are undone (a savepoint): writes the open batch made
        before it stay, for the batch's own ``commit()``."""
        self._flush()  # the batch's rows before the savepoint: only the block's are undone
        self._sql("SAVEPOINT unit")
        try:
            yield
        except StoreLost:
            raise  # the whole transaction is gone already
        except BaseException:
            self._drop_pending()
            self._sql("ROLLBACK TO unit")
            self._sql("RELEASE unit")
            self._tip = None  # an undone add_result moved it: read it again when next needed
            raise
        self._sql("RELEASE unit")
        self.commit()

    def _fill_report_columns(self) -> int:
        """Give every row stored before the report's columns (or by an older version since)
        its ``REPORT_COLUMNS``, from its payload read back; a row that does not read back
        keeps them NULL, and the report reads it from its payload (and names it). Part of a
        read-write open; returns how many rows it filled."""
        filled, after = 0, -1
        while True:  # in batches: a year of rows is gigabytes of payloads
            todo = self._sql(
                "SELECT row, payload, judged_at FROM results"
                " WHERE row > ? AND judged_ms IS NULL AND judged_at IS NOT NULL ORDER BY row LIMIT 5000",
                (after,),
            ).fetchall()
            if not todo:
                return filled
            for row, payload, judged_at in todo:
                after = row
                try:
                    values = _report_values(read_payload(payload), judged_at)
                except (ResultError, ValueError, TypeError):
                    continue
                self._sql(
                    "UPDATE results SET reason = ?, post_dial_delay = ?, version = ?, judged_ms = ?"
                    " WHERE row = ?",
                    (*values, row),
                )
                filled += 1

    def _load_tip(self) -> str:
        row = self._sql("SELECT hash FROM results ORDER BY row DESC LIMIT 1").fetchone()
        return str(row[0]) if row else self._anchor()

    def mark(self, key: str) -> str | None:
        """A small named value kept with the data (``meta``), e.g. ``status_order/<probe>``."""
        row = self._sql("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def set_mark(self, key: str, value: str) -> None:
        """Written in the store's transaction: committed with the batch that caused it."""
        self._sql(
            "INSERT INTO meta (key, value) VALUES (?, ?)"
            " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            (key, value),
        )

    def heartbeat(self) -> datetime | None:
        """When the monitor last said it was running (``set_heartbeat``)."""
        text = self.mark("heartbeat")
        return None if text is None else parse_time(text)

    def set_heartbeat(self, at: datetime) -> None:
        self.set_mark("heartbeat", format_time(at))

    def _anchor(self) -> str:
        row = self._sql("SELECT value FROM meta WHERE key = 'chain_anchor'").fetchone()
        return str(row[0]) if row else GENESIS

    # ------------------------------------------------------------ results

    def add_result(
        self,
        result: Result,
        received_at: datetime,
        *,
        judged_at: datetime | None = None,
        clock_skew: float | None = None,
        wire: bytes | None = None,
    ) -> bool:
        """Append a verified result; False (and nothing stored) when its id is already there.
        ``judged_at``: the monitor-judged time (``monitor.skew.judge``; without it, the
        probe's time never later than ``received_at``), ``clock_skew`` the estimate used.

        The payload is read back before it is written: a result that would not come back
        whole (``parse_result``) raises ``ResultError`` and nothing is stored, so no row
        this writes can stop a later reader. ``wire``: the bytes ``result`` was parsed
        from, when they are its wire form (``Signed.wire_of``): stored as they are, and
        already read once.

        The row is written with the transaction's other appends (``_flush``: one
        ``executemany`` at the commit, or before any statement on ``results``), its chain
        position taken now, in order."""
        tip = self._chain_tip()  # first: with a shared chain, the lock orders the duplicate check too
        if result.id in self._pending_ids:
            return False
        if wire is not None:
            payload = wire.decode("utf-8")
        else:
            payload = result.to_json().decode("utf-8")
            if read_payload(payload) != result:
                if self.has_result(result.id):
                    return False
                raise ResultError("fields", f"result {result.id} does not read back as it was stored")
        if self._absent != result.id and self._stored(result.id):
            return False
        digest = chain_hash(tip, payload)
        judged = format_time(judge(result.finished_at, received_at, None) if judged_at is None else judged_at)
        self._pending.append(  # type: ignore[union-attr]  # a list once opened
            (
                result.id,
                result.probe,
                result.target,
                result.check,
                result.seq,
                format_time(result.started_at),
                format_time(result.finished_at),
                result.outcome,
                int(result.confirm),
                result.request_id,
                format_time(received_at),
                payload,
                tip,
                digest,
                judged,
                None if clock_skew is None else round(clock_skew, 3),
                *_report_values(result, judged),
            )
        )
        self._pending_ids.add(result.id)
        self._pending_seqs.add((result.probe, result.seq))
        self._absent = None
        self._tip = digest
        return True

    def skew_samples(self, since: datetime) -> list[tuple[str, datetime, datetime]]:
        """(probe, finished_at, received_at) of the rows received at or after ``since``, in
        the order received (``monitor.skew`` rebuilds its window from them on restart).
        Rows are appended as they arrive, so this walks back from the newest row only."""
        limit = format_time(since)
        out = []
        with self._walk("SELECT probe, finished_at, received_at FROM results ORDER BY row DESC") as rows:
            for probe, finished_at, received_at in rows:
                if not isinstance(received_at, str) or received_at < limit:
                    break
                try:
                    out.append((str(probe), parse_time(finished_at), parse_time(received_at)))
                except (ValueError, TypeError):
                    continue  # a damaged row (quarantined by the readers) says nothing about a clock
        out.reverse()
        return out

    def last_clock_skews(self, probes: Sequence[str]) -> dict[str, float]:
        """Each probe's skew estimate as stored with its newest result (highest ``seq``)."""
        out = {}
        for probe in probes:
            row = self._sql(
                "SELECT clock_skew FROM results WHERE probe = ? ORDER BY seq DESC LIMIT 1", (probe,)
            ).fetchone()
            skew = None if row is None else _skew(row[0])
            if skew is not None:
                out[probe] = skew
        return out

    def has_result(self, result_id: str) -> bool:
        if result_id in self._pending_ids:
            return True
        if self._stored(result_id):
            return True
        if self._tip is not None:  # under the chain's lock (or the only writer): it stays absent
            self._absent = result_id
        return False

    def _stored(self, result_id: str) -> bool:
        """Is ``result_id`` among the written rows (the pending ones aside)?"""
        return self._db.execute("SELECT 1 FROM results WHERE id = ?", (result_id,)).fetchone() is not None

    def seq_stored(self, probe: str, seq: int) -> bool:
        """Is a result with this ``seq`` from this probe already stored (under any id)?"""
        if (probe, seq) in self._pending_seqs:
            return True
        found = self._db.execute("SELECT 1 FROM results WHERE probe = ? AND seq = ? LIMIT 1", (probe, seq))
        return found.fetchone() is not None

    def in_gap(self, probe: str, seq: int) -> bool:
        """Does ``seq`` fall in a gap recorded for this probe (a late or replayed result)?"""
        found = self._sql(
            "SELECT 1 FROM seq_gaps WHERE probe = ? AND after_seq < ? AND next_seq > ? LIMIT 1",
            (probe, seq, seq),
        )
        return found.fetchone() is not None

    def last_seq(self, probe: str) -> int | None:
        row = self._sql("SELECT last_seq FROM probe_seq WHERE probe = ?", (probe,)).fetchone()
        return None if row is None else int(row[0])

    def set_last_seq(self, probe: str, seq: int) -> None:
        self._sql(
            "INSERT INTO probe_seq (probe, last_seq) VALUES (?, ?)"
            " ON CONFLICT (probe) DO UPDATE SET last_seq = excluded.last_seq",
            (probe, seq),
        )

    def record_gap(self, probe: str, after_seq: int, next_seq: int, at: datetime) -> None:
        self._sql(
            "INSERT INTO seq_gaps (probe, after_seq, next_seq, missing, detected_at) VALUES (?, ?, ?, ?, ?)",
            (probe, after_seq, next_seq, next_seq - after_seq - 1, format_time(at)),
        )

    # ------------------------------------------------------------ gap repair (probes.delivery)

    def fill_gap(self, probe: str, seq: int, at: datetime) -> bool:
        """A result stored with ``seq`` inside an open gap: recount that gap (it closes when
        every missing seq is stored or gone). True if it was in an open gap."""
        rows = self._sql(_OPEN_GAPS_OVER, (probe, seq, seq)).fetchall()
        if not rows:
            return False
        # ingest stores a seq once, so this one is new to the gap: count it, O(1) however big
        # the gap is (a seq the probe had said was gone, and that arrives after all, moves
        # from gone to repaired)
        was_gone = self._sql(
            "SELECT 1 FROM seq_gone WHERE probe = ? AND first_seq <= ? AND last_seq >= ? LIMIT 1",
            (probe, seq, seq),
        ).fetchone()
        less = int(was_gone is not None)
        gone = "CASE WHEN gone > ? THEN gone - ? ELSE 0 END"  # max(0, gone - less), in both dialects
        self._sql(
            f"UPDATE seq_gaps SET repaired = repaired + 1, gone = {gone},"
            f" closed_at = CASE WHEN repaired + 1 + {gone} >= missing THEN ? END"
            " WHERE rowid IN (" + ",".join("?" * len(rows)) + ")",
            (less, less, less, less, format_time(at), *[r[0] for r in rows]),
        )
        return True

    def mark_gone(self, probe: str, ranges: Sequence[tuple[int, int]], at: datetime) -> int:
        """The probe no longer has these seq numbers: what of them is missing is unrecoverable.
        Returns how many missing results this made unrecoverable (0 for an answer seen before)."""
        before = self._gone_total(probe)
        for first, last in ranges:
            self._sql(
                "INSERT INTO seq_gone (probe, first_seq, last_seq, at) VALUES (?, ?, ?, ?)"
                " ON CONFLICT DO NOTHING",
                (probe, first, last, format_time(at)),
            )
            for (rowid,) in self._sql(_OPEN_GAPS_OVER, (probe, last, first)).fetchall():
                self._recount_gap(rowid, at)
        return self._gone_total(probe) - before

    def _gone_total(self, probe: str) -> int:
        row = self._sql("SELECT coalesce(sum(gone), 0) FROM seq_gaps WHERE probe = ?", (probe,)).fetchone()
        return int(row[0])

    def _stored_seqs(self, probe: str, first: int, last: int) -> list[int]:
        rows = self._sql(
            "SELECT DISTINCT seq FROM results WHERE probe = ? AND seq BETWEEN ? AND ? ORDER BY seq",
            (probe, first, last),
        )
        return [int(r[0]) for r in rows]

    def _gone_ranges(self, probe: str, first: int, last: int) -> list[tuple[int, int]]:
        """The probe's gone answers overlapping ``first..last``, merged and clipped."""
        rows = self._sql(
            "SELECT first_seq, last_seq FROM seq_gone WHERE probe = ? AND first_seq <= ? AND last_seq >= ?"
            " ORDER BY first_seq",
            (probe, last, first),
        )
        merged: list[tuple[int, int]] = []
        for low, high in rows:
            a, b = max(int(low), first), min(int(high), last)
            if merged and a <= merged[-1][1] + 1:
                merged[-1] = (merged[-1][0], max(merged[-1][1], b))
            else:
                merged.append((a, b))
        return merged

    def _recount_gap(self, rowid: int, at: datetime) -> None:
        probe, after, nxt, missing = self._sql(
            "SELECT probe, after_seq, next_seq, missing FROM seq_gaps WHERE rowid = ?", (rowid,)
        ).fetchone()
        stored = set(self._stored_seqs(probe, after + 1, nxt - 1))
        gone = sum(
            (b - a + 1) - sum(1 for s in stored if a <= s <= b)
            for a, b in self._gone_ranges(probe, after + 1, nxt - 1)
        )
        closed = format_time(at) if len(stored) + gone >= missing else None
        self._sql(
            "UPDATE seq_gaps SET repaired = ?, gone = ?, closed_at = ? WHERE rowid = ?",
            (len(stored), gone, closed, rowid),
        )

    def missing_ranges(
        self, probe: str, limit: int, *, join: int = 0, span: int = 0
    ) -> list[tuple[int, int]]:
        """Up to ``limit`` seq ranges still missing from the probe's open gaps (neither
        stored nor gone), oldest first: what a replay request asks for. Ranges at most
        ``join`` apart become one (of at most ``span`` seq numbers, when given): many
        small gaps — a stranded session took every other result — are asked for in a
        few requests, at the cost of resending what lies between."""
        out: list[tuple[int, int]] = []
        for after, nxt in self._sql(
            "SELECT after_seq, next_seq FROM seq_gaps WHERE probe = ? AND closed_at IS NULL"
            " ORDER BY after_seq",
            (probe,),
        ).fetchall():
            have = [(s, s) for s in self._stored_seqs(probe, after + 1, nxt - 1)]
            have += self._gone_ranges(probe, after + 1, nxt - 1)
            expected = after + 1
            for a, b in [*sorted(have), (nxt, nxt)]:
                if a > expected:
                    first, last = expected, a - 1
                    if out and first - out[-1][1] - 1 <= join and (not span or last - out[-1][0] < span):
                        out[-1] = (out[-1][0], last)
                    elif len(out) >= limit:
                        return out
                    else:
                        out.append((first, last))
                expected = max(expected, b + 1)
        return out

    def first_seq(self, probe: str) -> int | None:
        """The lowest seq stored for the probe (None: nothing stored)."""
        row = self._sql("SELECT min(seq) FROM results WHERE probe = ?", (probe,)).fetchone()
        return None if row[0] is None else int(row[0])

    def contiguous_seq(self, probe: str) -> int | None:
        """The highest seq up to which every result of the probe is stored or known gone:
        what the monitor acknowledges to the probe (``probes.delivery``)."""
        row = self._sql(
            "SELECT min(after_seq) FROM seq_gaps WHERE probe = ? AND closed_at IS NULL", (probe,)
        ).fetchone()
        if row[0] is not None:
            return int(row[0])
        return self.last_seq(probe)

    def outstanding(self) -> dict[str, int]:
        """Missing results per probe, neither repaired nor gone (open gaps only)."""
        rows = self._sql(
            "SELECT probe, sum(missing - repaired - gone) FROM seq_gaps"
            " WHERE closed_at IS NULL GROUP BY probe"
        )
        return {str(p): int(n) for p, n in rows}

    def commit(self) -> None:
        """End the unit of work: everything written since the last commit becomes durable."""
        self._flush()
        self._db.commit()
        self._ended()

    def _summaries(self, sql: str, args: Sequence[Any]) -> list[ResultSummary]:
        """Summaries of the rows ``sql`` selects (row, id, target, finished_at, payload,
        judged_at, clock_skew); an unreadable row is quarantined and skipped."""
        return self._summarize(self._sql(sql, args))

    def _summarize(self, rows: Iterable[Any]) -> list[ResultSummary]:
        out = []
        for row, result_id, target, finished_at, payload, judged_at, skew in rows:
            try:
                result = read_payload(payload)
                out.append(summarize(result, judged_at=_judged(judged_at), clock_skew=_skew(skew)))
            except ResultError as exc:
                self._quarantine(row, result_id, target, finished_at, str(exc))
        return out

    def _quarantine(
        self, row: int, result_id: object, target: object, finished_at: object, problem: str
    ) -> None:
        if row in self._quarantined:
            return
        entry = Quarantined(row, str(result_id)[:64], str(target)[:64], str(finished_at)[:32], problem[:300])
        self._quarantined[row] = entry
        logger.error(
            "stored result at row %d (id %s) cannot be read and is skipped (quarantined): %s",
            row, entry.id, entry.problem,
        )  # fmt: skip

    def quarantined(self) -> list[Quarantined]:
        """Unreadable rows met by this store's reads so far (``check_chain(read=True)``
        finds every one), oldest row first."""
        return [self._quarantined[row] for row in sorted(self._quarantined)]

    def results_between(
        self, start: datetime, end: datetime, target: str | None = None
    ) -> list[ResultSummary]:
        """Results judged (``judged_at``) in [start, end), oldest first (unreadable rows skipped)."""
        sql = f"SELECT {_SUMMARY_COLUMNS} FROM results WHERE judged_at >= ? AND judged_at < ?"
        args: list[Any] = [format_time(start), format_time(end)]
        if target is not None:
            sql += " AND target = ?"
            args.append(target)
        return self._summaries(sql + " ORDER BY judged_at, row", args)

    def result_by_request(self, request_id: str) -> list[ResultSummary]:
        return self._summaries(
            f"SELECT {_SUMMARY_COLUMNS} FROM results WHERE request_id = ? ORDER BY row",
            [request_id],
        )

    def gaps_between(self, start: datetime, end: datetime) -> list[SeqGap]:
        """Gaps detected in [start, end) or still open then, oldest first."""
        rows = self._sql(
            "SELECT probe, after_seq, next_seq, missing, detected_at, repaired, gone, closed_at FROM seq_gaps"
            " WHERE detected_at < ? AND (detected_at >= ? OR closed_at IS NULL OR closed_at >= ?)"
            " ORDER BY detected_at",
            (format_time(end), format_time(start), format_time(start)),
        )
        return [
            SeqGap(p, a, n, m, parse_time(d), r, g, None if c is None else parse_time(c))
            for p, a, n, m, d, r, g, c in rows
        ]

    # ------------------------------------------------------------ incidents

    def open_incident(
        self,
        *,
        target: str,
        kind: IncidentKind,
        at: datetime,
        last_good: ResultSummary | None,
        first_failed: ResultSummary | None,
        summary: str,
    ) -> Incident | None:
        """Open an incident; None when one of this kind is already open for the target."""
        opened = self._sql(
            "INSERT INTO incidents (target, kind, opened_at, last_good_id, last_good_at,"
            " first_failed_id, first_failed_at, summary) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
            " ON CONFLICT DO NOTHING RETURNING id",  # incidents_one_open: one open at a time
            (
                target,
                kind,
                format_time(at),
                None if last_good is None else last_good.id,
                None if last_good is None else format_time(last_good.judged),
                None if first_failed is None else first_failed.id,
                None if first_failed is None else format_time(first_failed.judged_start),
                summary,
            ),
        ).fetchone()
        if opened is None:
            return None
        # no commit here: the incident commits with its first page (enqueue_notification)
        # or with the caller's batch, so a crash cannot leave an incident that never paged
        return self._incident_rows("WHERE id = ?", [opened[0]])[0]

    def resolve_incident(self, incident_id: int, at: datetime) -> None:
        self._sql(
            "UPDATE incidents SET resolved_at = ? WHERE id = ? AND resolved_at IS NULL",
            (format_time(at), incident_id),
        )

    def _incident_rows(self, where: str, args: Sequence[Any]) -> list[Incident]:
        rows = self._sql(
            "SELECT id, target, kind, opened_at, resolved_at, last_good_id, last_good_at,"
            f" first_failed_id, first_failed_at, summary FROM incidents {where}",
            args,
        ).fetchall()
        out = []
        duties_of = self._duties_of([r[0] for r in rows])
        for r in rows:
            notes = tuple(
                Notification(
                    notifier=n[0],
                    event=n[1],
                    state=n[2],
                    attempts=n[3],
                    created_at=parse_time(n[4]),
                    sent_at=_dt(n[5]),
                    last_error=n[6],
                )
                for n in self._sql(
                    "SELECT notifier, event, state, attempts, created_at, sent_at, last_error"
                    " FROM notifications WHERE incident_id = ? ORDER BY id",
                    (r[0],),
                )
            )
            duties, ack = duties_of.get(r[0], ((), None))
            out.append(
                Incident(
                    id=r[0],
                    target=r[1],
                    kind=r[2],
                    opened_at=parse_time(r[3]),
                    resolved_at=_dt(r[4]),
                    last_good_id=r[5],
                    last_good_at=_dt(r[6]),
                    first_failed_id=r[7],
                    first_failed_at=_dt(r[8]),
                    summary=r[9],
                    notifications=notes,
                    duties=duties,
                    ack=ack,
                )
            )
        return out

    def open_incidents(self) -> list[Incident]:
        return self._incident_rows("WHERE resolved_at IS NULL ORDER BY id", [])

    def incidents(self, limit: int = 100) -> list[Incident]:
        return self._incident_rows("ORDER BY id DESC LIMIT ?", [limit])

    def incidents_between(self, start: datetime, end: datetime) -> list[Incident]:
        """Incidents that overlap [start, end), oldest first."""
        return self._incident_rows(
            "WHERE opened_at < ? AND (resolved_at IS NULL OR resolved_at >= ?) ORDER BY opened_at",
            [format_time(end), format_time(start)],
        )

    # ------------------------------------------------------------ duties and acknowledgements

    def add_duties(self, incident_id: int, duties: Sequence[IncidentDuty]) -> None:
        """An incident's duties, as it opened (joins the open transaction: commits with it)."""
        for d in duties:
            self._sql(
                "INSERT INTO incident_duties (incident_id, name, text, due_at, escalate_at, route)"
                " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                (incident_id, d.name, d.text, format_time(d.due_at), format_time(d.escalate_at),
                 json.dumps(list(d.route))),
            )  # fmt: skip

    def _duties_of(
        self, incident_ids: Sequence[int]
    ) -> dict[int, tuple[tuple[IncidentDuty, ...], Ack | None]]:
        """The duties and the acknowledgement of each incident, in two queries for them all."""
        out: dict[int, tuple[tuple[IncidentDuty, ...], Ack | None]] = {}
        for first in range(0, len(incident_ids), 500):  # bounded parameter lists
            chunk = list(incident_ids[first : first + 500])
            marks = ", ".join("?" * len(chunk))
            duties: dict[int, list[IncidentDuty]] = {}
            for r in self._sql(
                "SELECT incident_id, name, text, due_at, escalate_at, route, escalated_at, acked_at,"
                f" acked_by, ack_ref FROM incident_duties WHERE incident_id IN ({marks})"
                " ORDER BY due_at, name",
                chunk,
            ):
                duties.setdefault(r[0], []).append(
                    IncidentDuty(
                        name=r[1], text=r[2], due_at=parse_time(r[3]), escalate_at=parse_time(r[4]),
                        route=tuple(json.loads(r[5])), escalated_at=_dt(r[6]),
                        ack=None if r[7] is None else Ack(parse_time(r[7]), r[8], r[9]),
                    )
                )  # fmt: skip
            acks = {
                r[0]: Ack(parse_time(r[1]), r[2], r[3])
                for r in self._sql(
                    "SELECT incident_id, acked_at, acked_by, ack_ref FROM incident_acks"
                    f" WHERE incident_id IN ({marks})",
                    chunk,
                )
            }
            for incident_id in chunk:
                out[incident_id] = (tuple(duties.get(incident_id, ())), acks.get(incident_id))
        return out

    def acknowledge(self, incident_id: int, duty: str | None, ack: Ack) -> str | None:
        """Record ``ack`` for one duty of an incident, or (``duty`` None) for the incident;
        None when done, else why not. A second ack keeps the first (the evidence is when it
        was first done)."""
        if self._sql("SELECT 1 FROM incidents WHERE id = ?", (incident_id,)).fetchone() is None:
            return f"no incident {incident_id}"
        if duty is None:
            self._sql(
                "INSERT INTO incident_acks (incident_id, acked_at, acked_by, ack_ref) VALUES (?, ?, ?, ?)"
                " ON CONFLICT DO NOTHING",
                (incident_id, format_time(ack.at), ack.by, ack.ref),
            )
            return None
        found = self._sql(
            "SELECT 1 FROM incident_duties WHERE incident_id = ? AND name = ?", (incident_id, duty)
        ).fetchone()
        if found is None:
            return f"incident {incident_id} has no duty {duty}"
        self._sql(
            "UPDATE incident_duties SET acked_at = ?, acked_by = ?, ack_ref = ?"
            " WHERE incident_id = ? AND name = ? AND acked_at IS NULL",
            (format_time(ack.at), ack.by, ack.ref, incident_id, duty),
        )
        return None

    def escalations_due(self, now: datetime) -> list[tuple[int, str]]:
        """(incident id, duty name) of duties unacknowledged at their escalation time, not
        escalated yet, of incidents not acknowledged themselves."""
        rows = self._sql(
            "SELECT d.incident_id, d.name FROM incident_duties AS d"
            " WHERE d.acked_at IS NULL AND d.escalated_at IS NULL AND d.escalate_at <= ?"
            " AND NOT EXISTS (SELECT 1 FROM incident_acks AS a WHERE a.incident_id = d.incident_id)"
            " ORDER BY d.escalate_at, d.incident_id, d.name",
            (format_time(now),),
        ).fetchall()
        return [(int(r[0]), str(r[1])) for r in rows]

    def mark_escalated(self, incident_id: int, duty: str, at: datetime) -> bool:
        """True for the one caller that marks it (escalation is paged once)."""
        cursor = self._sql(
            "UPDATE incident_duties SET escalated_at = ? WHERE incident_id = ? AND name = ?"
            " AND escalated_at IS NULL",
            (format_time(at), incident_id, duty),
        )
        return cursor.rowcount == 1

    def incident(self, incident_id: int) -> Incident | None:
        found = self._incident_rows("WHERE id = ?", [incident_id])
        return found[0] if found else None

    # ------------------------------------------------------------ notifications (durable queue)

    def enqueue_notification(
        self, incident_id: int, notifier: str, event: str, payload: dict[str, Any], at: datetime
    ) -> bool:
        """Queue one page; False if this incident already has it (a restart re-enqueues safely)."""
        cursor = self._sql(
            "INSERT INTO notifications (incident_id, notifier, event, payload,"
            " next_attempt_at, created_at) VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
            (
                incident_id,
                notifier,
                event,
                json.dumps(payload, sort_keys=True),
                format_time(at),
                format_time(at),
            ),
        )
        return cursor.rowcount == 1

    def due_notifications(self, now: datetime) -> list[QueuedNotification]:
        rows = self._sql(
            "SELECT id, incident_id, notifier, event, payload, attempts FROM notifications AS n"
            " WHERE state = 'pending' AND next_attempt_at <= ?"
            # a resolve never overtakes its trigger (PagerDuty would keep the incident open)
            " AND NOT (event = 'resolve' AND EXISTS (SELECT 1 FROM notifications AS t"
            " WHERE t.incident_id = n.incident_id AND t.notifier = n.notifier"
            " AND t.event = 'trigger' AND t.state = 'pending'))"
            " ORDER BY id",
            (format_time(now),),
        )
        return [QueuedNotification(r[0], r[1], r[2], r[3], json.loads(r[4]), r[5]) for r in rows]

    def next_notification_at(self) -> datetime | None:
        row = self._sql("SELECT MIN(next_attempt_at) FROM notifications WHERE state = 'pending'").fetchone()
        return _dt(row[0])

    def mark_notification(
        self,
        notification_id: int,
        *,
        state: Literal["pending", "sent", "failed"],
        attempts: int,
        at: datetime,
        next_attempt_at: datetime | None = None,
        error: str | None = None,
    ) -> None:
        self._sql(
            "UPDATE notifications SET state = ?, attempts = ?, last_error = ?,"
            " sent_at = CASE WHEN ? = 'sent' THEN ? ELSE sent_at END,"
            " next_attempt_at = COALESCE(?, next_attempt_at) WHERE id = ?",
            (state, attempts, error, state, format_time(at), _t(next_attempt_at), notification_id),
        )

    # ------------------------------------------------------------ state and probes

    def add_state_change(self, target: str, state: TargetStateName, at: datetime, why: str) -> None:
        self._sql(
            "INSERT INTO state_changes (target, state, at, why) VALUES (?, ?, ?, ?)",
            (target, state, format_time(at), why),
        )

    def state_changes(self, since: datetime, until: datetime | None = None) -> list[StateChange]:
        until = until or datetime.max.replace(tzinfo=UTC)
        rows = self._sql(
            "SELECT target, state, at FROM state_changes WHERE at >= ? AND at < ? ORDER BY at, row",
            (format_time(since), format_time(until)),
        )
        return [StateChange(target=t, state=s, at=parse_time(a)) for t, s, a in rows]

    def latest_states(self) -> dict[str, tuple[TargetStateName, datetime]]:
        """Each target's last recorded state and since when (survives a restart)."""
        rows = self._sql(
            "SELECT target, state, at FROM state_changes WHERE row IN"
            " (SELECT MAX(row) FROM state_changes GROUP BY target)"
        )
        return {t: (s, parse_time(a)) for t, s, a in rows}

    def state_before(self, target: str, moment: datetime) -> TargetStateName | None:
        row = self._sql(
            "SELECT state FROM state_changes WHERE target = ? AND at < ? ORDER BY at DESC, row DESC LIMIT 1",
            (target, format_time(moment)),
        ).fetchone()
        return None if row is None else row[0]

    def set_probe_status(self, status: ProbeStatus) -> None:
        """Latest status per probe, plus an event row whenever online/offline changes."""
        row = self._sql("SELECT online FROM probe_status WHERE probe = ?", (status.probe,)).fetchone()
        if row is None or bool(row[0]) != status.online:
            self._sql(
                "INSERT INTO probe_events (probe, online, at, version) VALUES (?, ?, ?, ?)",
                (status.probe, int(status.online), format_time(status.at), status.version),
            )
        self._sql(
            "INSERT INTO probe_status (probe, online, at, version, targets) VALUES (?, ?, ?, ?, ?)"
            " ON CONFLICT (probe) DO UPDATE SET online = excluded.online, at = excluded.at,"
            " version = excluded.version, targets = excluded.targets",
            (
                status.probe,
                int(status.online),
                format_time(status.at),
                status.version,
                json.dumps(status.targets),
            ),
        )

    def probe_events(self, start: datetime, end: datetime) -> list[ProbeEvent]:
        """Online/offline changes in [start, end), oldest first, each probe starting with its
        last known state before ``start`` (dated ``start``)."""
        rows = self._sql(
            "SELECT probe, online, at, version FROM probe_events WHERE row IN"
            " (SELECT MAX(row) FROM probe_events WHERE at < ? GROUP BY probe)"
            " UNION ALL SELECT probe, online, at, version FROM probe_events WHERE at >= ? AND at < ?"
            " ORDER BY at",
            (format_time(start), format_time(start), format_time(end)),
        ).fetchall()
        return [ProbeEvent(p, bool(o), max(parse_time(a), start), v) for p, o, a, v in rows]

    def probe_statuses(self) -> list[ProbeStatus]:
        rows = self._sql("SELECT probe, online, at, version, targets FROM probe_status ORDER BY probe")
        return [ProbeStatus(p, bool(o), parse_time(a), v, tuple(json.loads(t))) for p, o, a, v, t in rows]

    # ------------------------------------------------------------ verifications (ecpm verify)

    def add_verification(self, v: Verification) -> None:
        self._sql(
            "INSERT INTO verifications (request_id, target, probes, required, change_ref, requested_at,"
            " deadline, finished_at, outcome, detail) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                v.request_id,
                v.target,
                json.dumps(list(v.probes)),
                v.required,
                v.change_ref,
                format_time(v.requested_at),
                format_time(v.deadline),
                _t(v.finished_at),
                v.outcome,
                json.dumps(v.detail, sort_keys=True),
            ),
        )

    def finish_verification(
        self, request_id: str, *, outcome: Literal["pass", "fail"], at: datetime, detail: dict[str, Any]
    ) -> None:
        self._sql(
            "UPDATE verifications SET outcome = ?, finished_at = ?, detail = ? WHERE request_id = ?"
            " AND outcome = 'pending'",
            (outcome, format_time(at), json.dumps(detail, sort_keys=True), request_id),
        )

    def _verifications(self, where: str, args: Sequence[Any]) -> list[Verification]:
        rows = self._sql(
            "SELECT request_id, target, probes, required, change_ref, requested_at, deadline, finished_at,"
            f" outcome, detail FROM verifications {where}",
            args,
        )
        return [
            Verification(r[0], r[1], tuple(json.loads(r[2])), r[3], r[4], parse_time(r[5]), parse_time(r[6]),
                         _dt(r[7]), r[8], json.loads(r[9]))
            for r in rows
        ]  # fmt: skip

    def verification(self, request_id: str) -> Verification | None:
        found = self._verifications("WHERE request_id = ?", [request_id])
        return found[0] if found else None

    def verifications_between(self, start: datetime, end: datetime) -> list[Verification]:
        return self._verifications(
            "WHERE requested_at >= ? AND requested_at < ? ORDER BY requested_at",
            [format_time(start), format_time(end)],
        )

    # ------------------------------------------------------------ replicas (several monitors, one store)

    @property
    def shared(self) -> bool:
        """Can other monitors write this store at the same time (PostgreSQL)?"""
        return self._CHAIN_SHARED

    def hold_writers(self) -> None:
        """Wait for every other writer's open transaction and keep the next ones waiting
        until this one ends (the chain's lock, ``_lock_chain``). Ingest takes it before it
        reads the sequence book: what it reads is then what every transaction before it
        committed, so replicas sharing one probe's results keep ``last_seq`` and the gaps
        as one monitor would, whatever order the results reach them in."""
        self._chain_tip()

    def reconnect(self) -> None:
        """After ``StoreLost``, ready for work again (only a server's store loses it)."""

    def last_row(self) -> int:
        """The newest row of the chain (0: none): where following it starts."""
        return int(self._sql("SELECT coalesce(max(row), 0) FROM results").fetchone()[0])

    def results_after(self, row: int, limit: int = 1000) -> tuple[int, list[ResultSummary]]:
        """Results appended after ``row``, in chain order, at most ``limit`` rows; and the
        last row read. Rows are numbered under the chain's lock, so a row committed later
        never has a lower number: following by number misses nothing another monitor adds."""
        rows = self._sql(
            f"SELECT {_SUMMARY_COLUMNS} FROM results WHERE row > ? ORDER BY row LIMIT ?", (row, limit)
        ).fetchall()
        return (int(rows[-1][0]) if rows else row), self._summarize(rows)

    @contextmanager
    def claim_notification(self, notification_id: int, now: datetime) -> Iterator[QueuedNotification | None]:
        """The page if it is still due, held for this connection until the block ends (then
        committed): on PostgreSQL a row lock that another monitor's claim skips, so each page
        is sent by one monitor, and a monitor that dies mid-send lets it go with its
        connection. None: sent or claimed elsewhere meanwhile. Use a connection of its own
        for it (the lock lasts as long as its transaction)."""
        row = self._sql(
            "SELECT id, incident_id, notifier, event, payload, attempts FROM notifications"
            f" WHERE id = ? AND state = 'pending' AND next_attempt_at <= ?{self._CLAIM}",
            (notification_id, format_time(now)),
        ).fetchone()
        item = None
        if row is not None:
            item = QueuedNotification(row[0], row[1], row[2], row[3], json.loads(row[4]), row[5])
        try:
            yield item
        finally:
            self.commit()

    # ------------------------------------------------------------ retention and the chain

    def prune(self, before: datetime) -> int:
        """Delete results received before ``before``; the chain re-anchors on the last one."""
        # the oldest rows by the monitor's own clock (received_at), as one contiguous prefix
        # of the chain: a result stamped 1970 by a probe with a bad clock must not take
        # every row before it along
        self._chain_tip()  # with a shared chain: no one appends while the anchor moves
        keep = self._sql(
            "SELECT MIN(row) FROM results WHERE received_at >= ?", (format_time(before),)
        ).fetchone()[0]
        last_row = self._sql("SELECT MAX(row) FROM results").fetchone()[0]
        if last_row is None:
            return 0
        last = int(last_row) if keep is None else int(keep) - 1
        if self._sql("SELECT COUNT(*) FROM results WHERE row <= ?", (last,)).fetchone()[0] == 0:
            return 0
        anchor = self._sql("SELECT hash FROM results WHERE row = ?", (last,)).fetchone()[0]
        cursor = self._sql("DELETE FROM results WHERE row <= ?", (last,))
        self._sql(
            "INSERT INTO meta (key, value) VALUES ('chain_anchor', ?)"
            " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            (anchor,),
        )
        return cursor.rowcount

    def iter_chain(self, since: int = 0) -> Iterator[ChainRow]:
        """The chain's rows from row ``since`` on, in chain order."""
        with self._walk(
            "SELECT row, id, payload, prev_hash, hash FROM results WHERE row >= ? ORDER BY row", (since,)
        ) as rows:
            for row in rows:
                yield ChainRow(*row)

    def check_chain(
        self, *, read: bool = False, on_read: Callable[[int, str, Result], None] | None = None
    ) -> ChainReport:
        """Walk the chain: hashes, links and columns. With ``read``, also read every payload
        back (``parse_result``, as every reader does) and list the unreadable ones — the
        ledger command's full check; the report reads its period's rows anyway. ``on_read``
        (row, id, result) sees every readable result of the walk (the ledger checks
        signatures with it, in the same pass)."""
        prev = self._anchor()
        with self._walk(f"SELECT row, id, {self._CHAIN_WALK} FROM results ORDER BY row") as walk:
            return self._check_links(walk, prev, read=read, on_read=on_read)

    def _check_links(
        self,
        walk: Iterator[Any],
        prev: str,
        *,
        read: bool,
        on_read: Callable[[int, str, Result], None] | None,
    ) -> ChainReport:
        """``check_chain``'s walk from the anchor ``prev``."""
        rows = 0
        quarantined: list[Quarantined] = []
        in_sql = self._COLUMNS_MATCH is not None
        for row, result_id, payload, prev_hash, digest, *columns in walk:
            rows += 1
            problem = _link_problem(prev, row=(payload, prev_hash, digest))
            match: bool | None = None
            if problem is None:
                if in_sql and columns[0] != _PYTHON_DECIDES:
                    match = _matched(columns[0])
                else:
                    match = columns_match(
                        result_id, self._checked_columns(row) if in_sql else columns, payload
                    )
                if match is False:
                    problem = "the row's columns differ from its hashed content (the row was altered)"
            if problem:
                return ChainReport(False, rows, row, result_id, problem, prev, tuple(quarantined))
            if match is None or read:
                unreadable = self._read_link(row, result_id, payload, on_read) if match else None
                if match is None:
                    unreadable = "the payload is not a JSON object"
                if unreadable is not None:
                    target, finished_at = self._sql(
                        "SELECT target, finished_at FROM results WHERE row = ?", (row,)
                    ).fetchone()
                    self._quarantine(row, result_id, target, finished_at, unreadable)
                    quarantined.append(self._quarantined[row])
            prev = digest
        return ChainReport(True, rows, None, None, None, prev, tuple(quarantined))

    def _checked_columns(self, row: int) -> list[Any]:
        return list(self._sql(f"SELECT {_CHECKED_COLUMNS} FROM results WHERE row = ?", (row,)).fetchone())

    @staticmethod
    def _read_link(
        row: int, result_id: str, payload: str, on_read: Callable[[int, str, Result], None] | None
    ) -> str | None:
        """Why a linked row's payload cannot be read back, or None (and ``on_read`` sees it)."""
        try:
            result = read_payload(payload)
        except ResultError as exc:
            return str(exc)
        if on_read is not None:
            on_read(row, result_id, result)
        return None

    def close(self) -> None:
        self._db.close()

    # ------------------------------------------------------------ the report's aggregates
    #
    # The evidence report counts in SQL, over the rows ``check_chain`` has verified: their
    # columns say what their hashed payloads say (the report's columns included), and a row
    # has the report's columns only once its payload was read back. A window holding any
    # other row (not verified, not read back, or a blocked attempt) is None: the report
    # reads that window row by row from the payloads (``results_between``), as before.

    def report_window(
        self, target: str, start: datetime, end: datetime, ask: WindowAsk
    ) -> ResultWindow | None:
        """``target``'s results judged in [start, end), aggregated (``ResultWindow``), or None
        when the window holds a row at or after ``ask.verified_below``, one without the
        report's columns, or a blocked attempt (reason ``ask.refused``)."""
        verified_below, origin_ms, bucket_ms, fresh_ms, calls, skew_bound, refused, reasons = ask
        where = "FROM results WHERE target = ? AND judged_at >= ? AND judged_at < ?"
        span = (target, format_time(start), format_time(end))
        skewed = "abs(clock_skew) > ?"
        rows = self._sql(
            "SELECT probe, version, (judged_ms - ?) / ?, check_kind, outcome, confirm,"
            " CASE WHEN request_id IS NULL OR request_id = '' THEN 0 ELSE 1 END AS on_demand,"
            " count(*), min(judged_ms), max(judged_ms), count(clock_skew), min(clock_skew), max(clock_skew),"
            f" sum(CASE WHEN {skewed} THEN 1 ELSE 0 END),"
            f" min(CASE WHEN {skewed} THEN judged_ms END), max(CASE WHEN {skewed} THEN judged_ms END),"
            " count(judged_ms), max(row), sum(CASE WHEN reason = ? THEN 1 ELSE 0 END)"
            f" {where} GROUP BY 1, 2, 3, 4, 5, 6, 7",
            (origin_ms, bucket_ms, skew_bound, skew_bound, skew_bound, refused, *span),
        ).fetchall()
        if any(r[16] < r[7] or r[17] >= verified_below or r[18] for r in rows):
            return None
        groups = tuple(
            ResultGroup(
                r[0], r[1], int(r[2]), r[3], r[4], bool(r[5]), bool(r[6]), int(r[7]), int(r[8]), int(r[9]),
                int(r[10]), _skew(r[11]), _skew(r[12]), int(r[13]), _int(r[14]), _int(r[15]),
            )
            for r in rows
        )  # fmt: skip
        if not groups:
            return ResultWindow((), (), (), None, ())
        # the times and the passed calls' post-dial delays, in judged order, straight from the
        # index: runs, gaps and medians are cheaper on these plain numbers than in SQL windows
        kinds = ", ".join("?" * len(calls))
        series = self._sql(
            f"SELECT judged_ms, CASE WHEN check_kind IN ({kinds}) AND outcome = 'pass'"
            f" THEN post_dial_delay END {where} AND judged_ms IS NOT NULL AND row < ? ORDER BY judged_at",
            (*calls, *span, verified_below),
        ).fetchall()
        times = [int(at) for at, _ in series]
        listed: tuple[SkewedRow, ...] = ()
        if any(g.skewed for g in groups):
            listed = tuple(
                SkewedRow(str(i), str(p), str(t), int(q), str(f), int(j), float(c))
                for i, p, t, q, f, j, c in self._sql(
                    f"SELECT id, probe, target, seq, finished_at, judged_ms, clock_skew {where} AND {skewed}"
                    " ORDER BY judged_at, row",
                    (*span, skew_bound),
                )
            )
        failed = (
            self._sql(
                f"SELECT check_kind, reason, count(*) {where} AND outcome = 'fail'"
                f" AND reason IN ({', '.join('?' * len(reasons))}) GROUP BY 1, 2 ORDER BY 1, 2",
                (*span, *reasons),
            ).fetchall()
            if reasons
            else []
        )
        return ResultWindow(
            groups=groups,
            pdd=_medians(series, origin_ms, bucket_ms),
            runs=_runs(times, fresh_ms),
            widest=_widest(times),
            skewed=listed,
            failures=tuple((str(c), str(r), int(n)) for c, r, n in failed),
        )

    def chain_marks(self, start: datetime, end: datetime, *, below: int) -> ChainMarks:
        """Rows stored, the last one, and the last verified row (before ``below``) whose
        ``finished_at`` column falls in [start, end)."""
        count = int(self._sql("SELECT count(*) FROM results").fetchone()[0])
        last = self._sql("SELECT row, id, hash FROM results ORDER BY row DESC LIMIT 1").fetchone()
        period = self._sql(
            "SELECT row, id, hash FROM results WHERE row < ? AND finished_at >= ? AND finished_at < ?"
            " ORDER BY row DESC LIMIT 1",
            (below, format_time(start), format_time(end)),
        ).fetchone()
        return ChainMarks(
            count, None if last is None else tuple(last), None if period is None else tuple(period)
        )


def _link_problem(prev: str, *, row: tuple[object, object, object]) -> str | None:
    """What breaks the chain's hashes or links at this row, or None."""
    payload, prev_hash, digest = row
    if not isinstance(payload, str):
        return "the payload is not text (the row was altered)"
    if prev_hash != prev:
        return "prev_hash does not match the previous row's hash (a row was removed or reordered)"
    if chain_hash(prev, payload) != digest:
        return "hash does not match the row's content (the row was altered)"
    return None


def _int(value: object) -> int | None:
    return None if value is None else int(value)  # type: ignore[call-overload]


def _medians(series: Sequence[Any], origin_ms: int, bucket_ms: int) -> tuple[tuple[int, float, float], ...]:
    """(bucket, median, max) of the post-dial delays in ``series`` ((judged_ms, delay or None))."""
    delays = [((int(at) - origin_ms) // bucket_ms, float(pdd)) for at, pdd in series if pdd is not None]
    return tuple(
        (k, statistics.median(values), max(values))
        for k, group in itertools.groupby(delays, key=lambda d: d[0])
        for values in [[v for _, v in group]]
    )


def _runs(times: Sequence[int], fresh_ms: int) -> tuple[tuple[int, int], ...]:
    """(first, last) of each run of ``times`` (ascending) none more than ``fresh_ms`` apart."""
    if not times:
        return ()
    out, first = [], times[0]
    for prev, at in itertools.pairwise(times):
        if at - prev > fresh_ms:
            out.append((first, prev))
            first = at
    out.append((first, times[-1]))
    return tuple(out)


def _widest(times: Sequence[int]) -> tuple[int, int] | None:
    """The first widest gap between two of ``times`` (ascending)."""
    if len(times) < 2:
        return None
    gaps = [b - a for a, b in itertools.pairwise(times)]
    i = gaps.index(max(gaps))
    return times[i], times[i + 1]


_PYTHON_DECIDES = 2  # a backend's SQL verdict: columns_match must decide this row


def _matched(value: object) -> bool | None:
    """A backend's SQL verdict on the columns (``SqlStore._COLUMNS_MATCH``) as ``columns_match``'s."""
    return None if value is None else bool(value)
