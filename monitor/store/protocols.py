"""What each part of the monitor needs from the store, one protocol per user.

A part takes the narrowest protocol that covers it, so what it can read and change is
visible in its signature: ingest reads sequence facts (``SeqReads``), delivery keeps the
sequence book (``SeqBook``), the pager its queue (``NotificationQueue``), ``ecpm verify``
its runs (``VerificationBook``), the report reads (``ReportSource``) and the ledger walks
the chain (``ChainSource``). ``Store`` is all of them plus what only the core does, and
is what a backend implements (``SqliteStore``; PostgreSQL can follow).

The unit of work is explicit: no store method commits by itself. Writes join the one
open transaction until its owner ends it — ``commit()`` after a batch (the service,
before it acknowledges the batch to the broker), or ``with store.transaction():`` around
one self-contained change (committed when the block ends, undone if it raises).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from datetime import datetime
from typing import Any, Literal, Protocol

from monitor.model import Incident, IncidentKind, ResultSummary, SeqGap, StateChange, TargetStateName
from monitor.store.records import (
    ChainMarks,
    ChainReport,
    ChainRow,
    ProbeEvent,
    ProbeStatus,
    Quarantined,
    QueuedNotification,
    ResultWindow,
    Verification,
)
from probes.result import Result


class UnitOfWork(Protocol):
    def commit(self) -> None: ...
    def transaction(self) -> AbstractContextManager[None]: ...


class SeqReads(Protocol):
    """Sequence facts ingest judges a result by (``monitor.ingest``)."""

    def has_result(self, result_id: str) -> bool: ...
    def seq_stored(self, probe: str, seq: int) -> bool: ...
    def in_gap(self, probe: str, seq: int) -> bool: ...
    def last_seq(self, probe: str) -> int | None: ...


class SeqBook(SeqReads, Protocol):
    """The sequence book delivery keeps: gaps, repairs, what is gone (``monitor.delivery``)."""

    def set_last_seq(self, probe: str, seq: int) -> None: ...
    def record_gap(self, probe: str, after_seq: int, next_seq: int, at: datetime) -> None: ...
    def fill_gap(self, probe: str, seq: int, at: datetime) -> bool: ...
    def mark_gone(self, probe: str, ranges: Sequence[tuple[int, int]], at: datetime) -> int: ...
    def missing_ranges(
        self, probe: str, limit: int, *, join: int = 0, span: int = 0
    ) -> list[tuple[int, int]]: ...
    def first_seq(self, probe: str) -> int | None: ...
    def contiguous_seq(self, probe: str) -> int | None: ...
    def outstanding(self) -> dict[str, int]: ...


class Marks(Protocol):
    """Small named values kept with the data (``monitor.status_ingest``'s order marks)."""

    def mark(self, key: str) -> str | None: ...
    def set_mark(self, key: str, value: str) -> None: ...


class NotificationQueue(UnitOfWork, Protocol):
    """The durable page queue (``monitor.notify``)."""

    def enqueue_notification(
        self, incident_id: int, notifier: str, event: str, payload: dict[str, Any], at: datetime
    ) -> bool: ...
    def due_notifications(self, now: datetime) -> list[QueuedNotification]: ...
    def next_notification_at(self) -> datetime | None: ...
    def mark_notification(
        self,
        notification_id: int,
        *,
        state: Literal["pending", "sent", "failed"],
        attempts: int,
        at: datetime,
        next_attempt_at: datetime | None = None,
        error: str | None = None,
    ) -> None: ...


class VerificationBook(UnitOfWork, Protocol):
    """Post-change verification runs (``monitor.verification``)."""

    def add_verification(self, v: Verification) -> None: ...
    def finish_verification(
        self, request_id: str, *, outcome: Literal["pass", "fail"], at: datetime, detail: dict[str, Any]
    ) -> None: ...
    def verification(self, request_id: str) -> Verification | None: ...
    def result_by_request(self, request_id: str) -> list[ResultSummary]: ...


class ChainSource(Protocol):
    """The results chain, walked (``ecpm ledger verify``, the report's ledger section)."""

    def iter_chain(self, since: int = 0) -> Iterator[ChainRow]: ...
    def check_chain(
        self, *, read: bool = False, on_read: Callable[[int, str, Result], None] | None = None
    ) -> ChainReport: ...
    def quarantined(self) -> list[Quarantined]: ...


class ReportSource(ChainSource, Protocol):
    """What the evidence report reads; a read-only store has all of it."""

    def results_between(
        self, start: datetime, end: datetime, target: str | None = None
    ) -> list[ResultSummary]: ...
    def state_changes(self, since: datetime, until: datetime | None = None) -> list[StateChange]: ...
    def state_before(self, target: str, moment: datetime) -> TargetStateName | None: ...
    def latest_states(self) -> dict[str, tuple[TargetStateName, datetime]]: ...
    def incidents_between(self, start: datetime, end: datetime) -> list[Incident]: ...
    def gaps_between(self, start: datetime, end: datetime) -> list[SeqGap]: ...
    def probe_events(self, start: datetime, end: datetime) -> list[ProbeEvent]: ...
    def verifications_between(self, start: datetime, end: datetime) -> list[Verification]: ...

    # the report's aggregates (``monitor.store.sql``: over rows the chain check verified)
    def report_window(
        self,
        target: str,
        start: datetime,
        end: datetime,
        *,
        verified_below: int,
        origin_ms: int,
        bucket_ms: int,
        fresh_ms: int,
        calls: Sequence[str],
        skew_bound: float,
        refused: str,
    ) -> ResultWindow | None: ...
    def chain_marks(self, start: datetime, end: datetime, *, below: int) -> ChainMarks: ...


class Store(SeqBook, Marks, NotificationQueue, VerificationBook, ReportSource, Protocol):
    """Everything: what a backend implements and the monitor's core owns."""

    def add_result(
        self,
        result: Result,
        received_at: datetime,
        *,
        judged_at: datetime | None = None,
        clock_skew: float | None = None,
    ) -> bool: ...
    def skew_samples(self, since: datetime) -> list[tuple[str, datetime, datetime]]: ...
    def last_clock_skews(self, probes: Sequence[str]) -> dict[str, float]: ...
    def heartbeat(self) -> datetime | None: ...
    def set_heartbeat(self, at: datetime) -> None: ...
    def open_incident(
        self,
        *,
        target: str,
        kind: IncidentKind,
        at: datetime,
        last_good: ResultSummary | None,
        first_failed: ResultSummary | None,
        summary: str,
    ) -> Incident | None: ...
    def resolve_incident(self, incident_id: int, at: datetime) -> None: ...
    def open_incidents(self) -> list[Incident]: ...
    def incidents(self, limit: int = 100) -> list[Incident]: ...
    def add_state_change(self, target: str, state: TargetStateName, at: datetime, why: str) -> None: ...
    def set_probe_status(self, status: ProbeStatus) -> None: ...
    def probe_statuses(self) -> list[ProbeStatus]: ...
    def prune(self, before: datetime) -> int: ...
    def close(self) -> None: ...
