"""``Store`` on one SQLite file (``SqlStore`` holds the reads and writes).

SQLite runs in WAL mode with ``synchronous=NORMAL``: a committed transaction
survives the process being killed (the monitor acknowledges MQTT messages only after
the commit), though not necessarily a power cut before the next checkpoint. One
process writes a file: the chain's tip is kept in memory between transactions, and a
monitor holds ``<file>.monitor-lock`` (``election``) so that a second one on the same file
refuses to start (several monitors need PostgreSQL: docs/scaling.md).
A read-only store (``read_only=True``: the report, ``ecpm ledger verify``) is opened
with SQLite's ``mode=ro``; it creates no schema and migrates nothing, and refuses a
store whose schema is older than this version reads (``ecpm db upgrade``, or the
monitor on start, upgrades it).

Migrations are numbered (``MIGRATIONS``; the version reached is ``schema_version`` in
``meta``): 1 the schema, 2 the judged-time and gap-repair columns, 3 the report's
columns, 4 the incidents' notification duties and acknowledgements. Every read-write
open also gives any row found without a judged time (written by an older version)
``judged_at = min(finished_at, received_at)``, ``clock_skew`` NULL (not known), and any
row without the report's columns its values from its payload
(``SqlStore._fill_report_columns``: the first open of a store from before them reads every
payload once), and the report's covering index (``sql.REPORT_INDEX``) is made if missing.
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
from pathlib import Path

from monitor.store.records import Migration, pending
from monitor.store.sql import (
    DUTY_SCHEMA,
    JUDGED_INDEXES,
    REPORT_COLUMNS,
    REPORT_INDEX,
    SCHEMA,
    UNREAD_INDEX,
    SqlStore,
    StoreError,
)

# columns added after a store was first written: (table, column, declaration), by migration 2
_ADDED_COLUMNS = (
    ("results", "judged_at", "TEXT"),
    ("results", "clock_skew", "REAL"),
    ("seq_gaps", "repaired", "INTEGER NOT NULL DEFAULT 0"),
    ("seq_gaps", "gone", "INTEGER NOT NULL DEFAULT 0"),
    ("seq_gaps", "closed_at", "TEXT"),
)


# the report's columns, by migration 3 (filled from the payloads on every read-write open)
_REPORT_ADDED = tuple(("results", column, declaration) for column, declaration in REPORT_COLUMNS)


def _add(db: sqlite3.Connection, columns: tuple[tuple[str, str, str], ...]) -> None:
    """Idempotent (a store can have the columns and still be marked before them)."""
    for table, column, declaration in columns:
        if column not in {row[1] for row in db.execute(f"PRAGMA table_info({table})")}:
            db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {declaration}")


def _add_columns(db: sqlite3.Connection) -> None:
    """Migration 2."""
    _add(db, _ADDED_COLUMNS)
    for index in JUDGED_INDEXES:
        db.execute(index)


def _add_report_columns(db: sqlite3.Connection) -> None:
    """Migration 3."""
    _add(db, _REPORT_ADDED)
    db.execute(UNREAD_INDEX)


# (version, what it does, how): applied in order on a read-write open and by ``ecpm db upgrade``
MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "the schema", lambda db: db.executescript(SCHEMA)),
    Migration(2, "judged time and gap repair columns", _add_columns),
    Migration(3, "report columns", _add_report_columns),
    Migration(4, "notification duties and acknowledgements", lambda db: [db.execute(q) for q in DUTY_SCHEMA]),
)

# columns_match's verdict in SQL: 1, 0, NULL (not a JSON object), or 2 where Python must
# decide (sql._CHECKED_COLUMNS, columns_match): a row without the report's columns (never
# read back, so its payload's types are not known to be a result's: SQLite compares other
# types than Python does), or one whose text holds a NUL, where json_extract stops.
# SQLite's json functions parse the payload once for all the calls on one row
_COLUMNS_MATCH = """CASE WHEN judged_ms IS NULL OR instr(payload, '\\u0000') > 0 THEN 2
 WHEN typeof(payload) = 'text' AND json_valid(payload) AND json_type(payload) = 'object' THEN
 id IS json_extract(payload, '$.id') AND probe IS json_extract(payload, '$.probe')
 AND target IS json_extract(payload, '$.target') AND check_kind IS json_extract(payload, '$.check')
 AND seq IS json_extract(payload, '$.seq') AND started_at IS json_extract(payload, '$.started_at')
 AND finished_at IS json_extract(payload, '$.finished_at') AND outcome IS json_extract(payload, '$.outcome')
 AND confirm IS (json_extract(payload, '$.confirm') IS 1)
 AND request_id IS json_extract(payload, '$.request_id')
 AND reason IS json_extract(payload, '$.reason') AND version IS json_extract(payload, '$.version')
 AND (post_dial_delay IS json_extract(payload, '$.timings.ringing')
  -- both parsers' doubles: equal to the last digit or two
  OR abs(post_dial_delay - json_extract(payload, '$.timings.ringing')) <= 1e-12 * abs(post_dial_delay))
END"""


class SqliteStore(SqlStore):
    """``Store`` on one SQLite file."""

    _db: sqlite3.Connection
    _WRITE_ERRORS = (sqlite3.Error,)
    _COLUMNS_MATCH = _COLUMNS_MATCH
    _CHAIN_WALK = f"payload, prev_hash, hash, {_COLUMNS_MATCH}"

    def __init__(self, path: str | Path, *, read_only: bool = False) -> None:
        self.path = str(path)
        self.read_only = read_only
        if read_only:
            self._db = _open_read_only(self.path)
        else:
            self._db = sqlite3.connect(self.path, isolation_level="DEFERRED", check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute("PRAGMA foreign_keys=ON")
            self._upgrade()
        self._opened()

    def election(self) -> Sole:
        return Sole(self.path)

    def _upgrade(self) -> None:
        todo = _todo(self._db)
        if todo and todo[0].version == 1:
            todo[0].apply(self._db)  # executescript commits by itself: the schema stands alone
            todo = todo[1:]
        with self.transaction():
            for migration in todo:
                migration.apply(self._db)
            self._db.execute(
                "INSERT INTO meta (key, value) VALUES ('schema_version', ?)"
                " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (str(MIGRATIONS[-1].version),),
            )
            # rows without a judged time, on every open: an older version may have written
            # some since the columns came. No skew is known for them, so the probe's time,
            # never later than the monitor received it
            self._db.execute(
                "UPDATE results SET judged_at = MIN(finished_at, received_at) WHERE judged_at IS NULL"
            )
            self._fill_report_columns()
            # an index, not a column: kept out of the numbered migrations, so that a store
            # can still be brought back from before any of them (its first open takes a while)
            self._db.execute(REPORT_INDEX)
            self._db.execute("DROP INDEX IF EXISTS results_target_judged")


class Sole:
    """The one monitor of a SQLite file: always the evaluator, holding ``<file>.monitor-lock``
    (an exclusive ``flock``, let go when the process ends however it ends)."""

    def __init__(self, path: str) -> None:
        self._fd: int | None = os.open(f"{path}.monitor-lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.close()
            raise StoreError(
                f"{path}: another ecpm monitor writes this store; one SQLite file takes one monitor"
                " (several share a PostgreSQL store: docs/scaling.md)"
            ) from None

    def held(self) -> bool:
        return True

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def pending_migrations(path: str) -> list[Migration]:
    """What a read-write open of ``path`` would apply (all of them: no store there yet)."""
    if not Path(path).is_file():
        return list(MIGRATIONS)
    db = _open_read_only(path, check_columns=False)
    try:
        return _todo(db)
    finally:
        db.close()


def _version(db: sqlite3.Connection) -> int:
    """The migration a store has reached: ``schema_version`` in ``meta`` (0: a new file),
    but 1 while migration 2's columns are missing (versions before the numbering wrote 1
    whatever columns they had), 2 while migration 3's are."""
    try:
        row = db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    except sqlite3.OperationalError:  # no meta table: a new file
        return 0
    version = 0 if row is None else int(row[0])
    if _missing_columns(db, _ADDED_COLUMNS):
        return min(version, 1)
    return min(version, 2) if _missing_columns(db, _REPORT_ADDED) else version


def _todo(db: sqlite3.Connection) -> list[Migration]:
    """The migrations a read-write open applies: those after the version reached, less
    migrations 3 and 4 where what they add is there already (the schema of this version made it)."""
    todo = pending(MIGRATIONS, _version(db))
    return [
        m
        for m in todo
        if (m.version != 3 or _missing_columns(db, _REPORT_ADDED))
        and (m.version != 4 or not _has_table(db, "incident_acks"))
    ]


def _has_table(db: sqlite3.Connection, name: str) -> bool:
    found = db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (name,))
    return found.fetchone() is not None


def _missing_columns(
    db: sqlite3.Connection, columns: tuple[tuple[str, str, str], ...] = _ADDED_COLUMNS + _REPORT_ADDED
) -> list[str]:
    """Of ``columns`` (by default every one this version reads that older stores lack), those
    the store lacks."""
    wanted = {(table, column) for table, column, _ in columns}
    tables = {table for table, _ in wanted}
    present = {(table, str(r[1])) for table in tables for r in db.execute(f"PRAGMA table_info({table})")}
    return sorted(f"{t}.{c}" for t, c in wanted - present)


def _open_read_only(path: str, *, check_columns: bool = True) -> sqlite3.Connection:
    """``path`` opened so that nothing can be written (SQLite ``mode=ro``), or ``StoreError``;
    ``check_columns``: refuse a store that lacks what this version reads."""
    if not Path(path).is_file():
        raise StoreError(f"no store at {path}")
    uri = Path(path).resolve().as_uri() + "?mode=ro"
    try:
        db = sqlite3.connect(uri, uri=True, check_same_thread=False)
        tables = {str(r[0]) for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        missing = _missing_columns(db)
    except sqlite3.DatabaseError as exc:
        raise StoreError(f"{path}: not an ecpm store ({exc})") from None
    if "results" not in tables or "meta" not in tables:
        db.close()
        raise StoreError(f"{path}: not an ecpm store (no results table)")
    if missing and check_columns:
        db.close()
        raise StoreError(
            f"{path}: written by an older ecpm (no {', '.join(missing)}); upgrade its schema with"
            f" `ecpm db upgrade --db {path}` (or start `ecpm monitor` on it once), then read it"
        )
    return db
