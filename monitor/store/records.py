"""What the store hands out and takes in, whatever the backend: value types, and the
pure rules every backend shares (reading a stored payload back, the chain hash)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal, NamedTuple

from monitor.model import ResultSummary
from probes.result import Result, ResultError, parse_result

GENESIS = "0" * 64

# what a broken payload can throw at a reader, besides ResultError
UNREADABLE = (ValueError, TypeError, OverflowError, RecursionError, AttributeError, KeyError)


def read_payload(payload: object) -> Result:
    """A stored payload back as a ``Result``; ``ResultError`` for anything unreadable."""
    if not isinstance(payload, str):
        raise ResultError("fields", f"the stored payload is {type(payload).__name__}, not text")
    try:
        return parse_result(payload.encode("utf-8"))
    except ResultError:
        raise
    except UNREADABLE as exc:  # lone surrogates in the text; anything unforeseen
        raise ResultError("fields", f"{type(exc).__name__}: {str(exc)[:160]}") from None


def columns_match(result_id: str, columns: list[Any], payload: str) -> bool | None:
    """Do a row's columns (what queries select on, and the report's once it has them: see
    ``monitor.store.sql``) say what its hashed payload says? None when the payload is not a
    JSON object at all (the row is unreadable)."""
    try:
        data = json.loads(payload)
    except UNREADABLE:
        return None
    if not isinstance(data, dict):
        return None
    keys = ("probe", "target", "check", "seq", "started_at", "finished_at", "outcome")
    expected = [data.get(k) for k in keys] + [int(bool(data.get("confirm"))), data.get("request_id")]
    indexed, report = columns[: len(expected)], columns[len(expected) :]
    if result_id != data.get("id") or indexed != expected:
        return False
    if report[-1] is None:  # not read back yet: the report reads the payload itself
        return True
    timings = data.get("timings")
    ringing = timings.get("ringing") if isinstance(timings, dict) else None
    return report[:-1] == [data.get("reason"), ringing, data.get("version")]


def chain_hash(prev_hash: str, payload: str) -> str:
    return hashlib.sha256(f"{prev_hash}\n{payload}".encode()).hexdigest()


def summarize(
    result: Result, *, judged_at: datetime | None = None, clock_skew: float | None = None
) -> ResultSummary:
    return ResultSummary(
        id=result.id,
        probe=result.probe,
        target=result.target,
        check=result.check,
        seq=result.seq,
        started_at=result.started_at,
        finished_at=result.finished_at,
        outcome=result.outcome,
        stage=result.stage,
        reason=result.reason,
        sip_status=result.sip_status,
        sip_reason=result.sip_reason,
        post_dial_delay=result.timings.get("ringing"),
        mos=None if result.media is None else result.media.mos,
        confirm=result.confirm,
        request_id=result.request_id,
        version=result.version,
        judged_at=judged_at,
        clock_skew=clock_skew,
    )


@dataclass(frozen=True, slots=True)
class Quarantined:
    """A stored result that cannot be read: kept in the chain, skipped by every reader."""

    row: int
    id: str
    target: str  # the row's columns, as stored (the payload could not say)
    finished_at: str
    problem: str


@dataclass(frozen=True, slots=True)
class ChainReport:
    ok: bool
    rows: int  # rows checked
    first_broken_row: int | None
    first_broken_id: str | None
    problem: str | None
    last_hash: str  # hash of the last row (the anchor when empty)
    # rows whose hash verifies but whose payload cannot be read (every row with
    # ``read=True``; without it only those that are not even a JSON object)
    quarantined: tuple[Quarantined, ...] = ()


@dataclass(frozen=True, slots=True)
class QueuedNotification:
    id: int
    incident_id: int
    notifier: str
    event: str  # trigger, resolve, or escalate:<duty>
    payload: dict[str, Any]
    attempts: int


@dataclass(frozen=True, slots=True)
class ProbeEvent:
    probe: str
    online: bool
    at: datetime
    version: str | None


@dataclass(frozen=True, slots=True)
class Verification:
    """A post-change gate run (``ecpm verify``): on-demand calls from some probes to one target."""

    request_id: str
    target: str
    probes: tuple[str, ...]
    required: int  # passes needed from distinct probes
    change_ref: str | None
    requested_at: datetime
    deadline: datetime
    finished_at: datetime | None
    outcome: Literal["pending", "pass", "fail"]
    detail: dict[str, Any]  # probe -> {outcome, stage, sip_status, ...} as decided


@dataclass(frozen=True, slots=True)
class ProbeStatus:
    probe: str
    online: bool
    at: datetime
    version: str | None
    targets: tuple[str, ...]


class ChainRow(NamedTuple):
    """One link of the results chain as stored, in chain order."""

    row: int
    id: str
    payload: str
    prev_hash: str
    hash: str


class WindowAsk(NamedTuple):
    """How the report asks for a window (``SqlStore.report_window``)."""

    verified_below: int  # rows before this one passed the chain check: only those are aggregated
    origin_ms: int  # where bucket 0 starts (Unix ms)
    bucket_ms: int
    fresh_ms: int  # results further apart than this end a run
    calls: tuple[str, ...]  # the check kinds that are calls (post-dial delays)
    skew_bound: float  # a clock skew beyond it, either way, is counted and listed
    refused: str  # the reason of a blocked attempt: a window with one is read row by row
    reasons: tuple[str, ...] = ()  # failure reasons counted by check kind (``ResultWindow.failures``)


class ResultGroup(NamedTuple):
    """Results of one target in a window, alike in everything the report counts by
    (``SqlStore.report_window``); times are Unix milliseconds of ``judged_at``."""

    probe: str
    version: str
    bucket: int  # (judged_ms - origin) // bucket length
    check: str
    outcome: str
    confirm: bool
    on_demand: bool  # placed for a request (request_id)
    results: int
    first_ms: int
    last_ms: int
    estimated: int  # of them, with a clock skew estimate
    skew_low: float | None
    skew_high: float | None
    skewed: int  # beyond the bound asked for
    skewed_first_ms: int | None
    skewed_last_ms: int | None


class SkewedRow(NamedTuple):
    id: str
    probe: str
    target: str
    seq: int
    finished_at: str
    judged_ms: int
    clock_skew: float


@dataclass(frozen=True, slots=True)
class ResultWindow:
    """What the report needs of one target's results in a window, aggregated by the store.
    Times are Unix milliseconds of ``judged_at``."""

    groups: tuple[ResultGroup, ...]
    pdd: tuple[tuple[int, float, float], ...]  # (bucket, median, max) of passed calls' post-dial delay
    runs: tuple[tuple[int, int], ...]  # (first, last) of each run of results at most ``fresh`` apart
    widest: tuple[int, int] | None  # the first widest gap between two results
    skewed: tuple[SkewedRow, ...]  # every result beyond the skew bound, oldest first
    # failed results by (check, reason) and their count, for the reasons asked for
    # (``WindowAsk.reasons``: the identity stage's, whose reasons are its own)
    failures: tuple[tuple[str, str, int], ...] = ()


class ChainMarks(NamedTuple):
    """Where the chain stands, for the report's ledger section: rows stored, the last row,
    and the last row before ``below`` whose result finished in the period asked for."""

    rows: int
    last: tuple[int, str, str] | None  # (row, id, hash)
    period_last: tuple[int, str, str] | None


class Migration(NamedTuple):
    """One numbered step of a backend's schema, applied once, in order."""

    version: int
    name: str
    apply: Callable[[Any], object]  # given the backend's connection

    def __str__(self) -> str:
        return f"{self.version} ({self.name})"


def pending(migrations: tuple[Migration, ...], version: int) -> list[Migration]:
    """The migrations after ``version``, the one a store has reached."""
    return [m for m in migrations if m.version > version]
