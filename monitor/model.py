"""The monitor's view of the world, as immutable values.

The ingest loop is the only writer: after each batch of results (and on every
tick) it builds a new ``Snapshot`` and swaps it in. Readers — the metrics
collector, the HTTP API, the status page — take whatever snapshot is current and
never see a half-updated state (client_python's custom-collector habit).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal

from probes.delivery import OutboxHealth

TargetStateName = Literal["up", "degraded", "down", "unknown"]
TARGET_STATES: tuple[TargetStateName, ...] = ("up", "degraded", "down", "unknown")
IncidentKind = Literal["down", "gap"]


@dataclass(frozen=True, slots=True)
class SeqGap:
    """Results found missing from a probe (seq ``after_seq`` + 1 .. ``next_seq`` - 1), and
    what became of them: ``repaired`` arrived later (replayed), ``unrecoverable`` the probe
    no longer has; ``closed_at`` when none was left outstanding (None: still open)."""

    probe: str
    after_seq: int
    next_seq: int
    missing: int
    detected_at: datetime
    repaired: int = 0
    unrecoverable: int = 0
    closed_at: datetime | None = None

    @property
    def outstanding(self) -> int:
        return self.missing - self.repaired - self.unrecoverable


@dataclass(frozen=True, slots=True)
class ResultSummary:
    """What the monitor keeps in memory of one stored result."""

    id: str
    probe: str
    target: str
    check: str
    seq: int
    started_at: datetime
    finished_at: datetime
    outcome: Literal["pass", "fail", "inconclusive"]
    stage: str | None
    reason: str | None
    sip_status: int | None
    sip_reason: str | None
    post_dial_delay: float | None  # timings["ringing"], seconds
    mos: float | None
    confirm: bool
    request_id: str | None
    version: str
    # when the monitor judges it finished (``monitor.skew``: the probe's time corrected by its
    # clock skew, never later than it arrived), decided at ingest and stored with the row;
    # None only for a summary never judged (then ``finished_at`` stands in)
    judged_at: datetime | None = None
    clock_skew: float | None = None  # the probe's estimated skew it was judged with, seconds

    @property
    def judged(self) -> datetime:
        """The time every freshness, staleness and last-success decision uses."""
        return self.finished_at if self.judged_at is None else self.judged_at

    @property
    def judged_start(self) -> datetime:
        """``started_at`` moved by the same correction as the finish."""
        return self.started_at + (self.judged - self.finished_at)


@dataclass(frozen=True, slots=True)
class TargetView:
    id: str
    description: str
    interval: float  # seconds
    state: TargetStateName
    since: datetime | None  # when it entered this state
    why: str  # one line: what made it this state
    last_success_at: datetime | None
    covering_probes: tuple[str, ...]  # probes with a fresh result for this target
    latest: tuple[ResultSummary, ...]  # latest result per (probe, check), newest first
    open_incident: int | None  # id of the open incident, if any


@dataclass(frozen=True, slots=True)
class ProbeView:
    id: str
    online: bool | None  # from the retained status topic; None: never heard of
    status_at: datetime | None
    last_result_at: datetime | None
    up: bool  # online and reporting on time
    version: str | None
    targets: tuple[str, ...]  # as the probe announced them
    outbox: OutboxHealth | None = None  # as its latest verified status reported it
    outstanding: int = 0  # its results found missing, neither repaired nor gone
    clock_skew: float | None = None  # estimated clock skew, seconds (probe ahead > 0); None: not known
    clock_skewed: bool = False  # the skew is beyond ingest.max_clock_skew


@dataclass(frozen=True, slots=True)
class Notification:
    notifier: str
    event: str  # trigger, resolve, or escalate:<duty> (monitor.duties)
    state: Literal["pending", "sent", "failed"]
    attempts: int
    created_at: datetime
    sent_at: datetime | None
    last_error: str | None


DutyStatus = Literal["pending", "met", "missed"]


@dataclass(frozen=True, slots=True)
class Ack:
    """An acknowledgement: who, when, and the reference they gave (a PSAP call log, a NORS
    filing number, an Ofcom case)."""

    at: datetime
    by: str
    ref: str


@dataclass(frozen=True, slots=True)
class IncidentDuty:
    """One notification duty an incident carries (``monitor.duties``), fixed when it opened."""

    name: str
    text: str
    due_at: datetime  # detection + the duty's deadline
    escalate_at: datetime  # due_at - escalate_before: unacknowledged then, it pages its route
    route: tuple[str, ...]  # notifier names; empty: every notifier
    escalated_at: datetime | None = None
    ack: Ack | None = None

    def status(self, now: datetime) -> DutyStatus:
        """met: acknowledged by its due time; missed: acknowledged late, or not at all and due."""
        if self.ack is not None:
            return "met" if self.ack.at <= self.due_at else "missed"
        return "missed" if now > self.due_at else "pending"


@dataclass(frozen=True, slots=True)
class Incident:
    id: int
    target: str
    kind: IncidentKind
    opened_at: datetime  # = detected_at: when the monitor confirmed it
    resolved_at: datetime | None
    last_good_id: str | None
    last_good_at: datetime | None
    first_failed_id: str | None
    first_failed_at: datetime | None
    summary: str
    notifications: tuple[Notification, ...] = ()
    duties: tuple[IncidentDuty, ...] = ()
    ack: Ack | None = None  # the incident itself acknowledged: no more escalation pages

    @property
    def detection_latency(self) -> float | None:
        """Seconds from the first failed call to detection (None for gaps)."""
        if self.first_failed_at is None:
            return None
        return (self.opened_at - self.first_failed_at).total_seconds()


@dataclass(frozen=True, slots=True)
class StateChange:
    target: str
    state: TargetStateName
    at: datetime


PathRole = Literal["primary", "backup"]


@dataclass(frozen=True, slots=True)
class PathView:
    target: str
    role: PathRole
    state: TargetStateName
    lost: bool  # down or unknown: this path would not carry a call now (or nobody knows)


@dataclass(frozen=True, slots=True)
class ServiceView:
    """A service's paths (``monitor.redundancy``): up (every path up), degraded (redundancy
    lost: some path lost, some not), down (every path lost, one down), unknown (none known)."""

    id: str
    description: str
    state: TargetStateName
    paths: tuple[PathView, ...]

    @property
    def redundancy_lost(self) -> bool:
        return any(p.lost for p in self.paths)


@dataclass(frozen=True, slots=True)
class Snapshot:
    at: datetime
    targets: Mapping[str, TargetView]
    probes: Mapping[str, ProbeView]
    open_incidents: tuple[Incident, ...]
    timeline: tuple[StateChange, ...]  # state changes of the last 24 h, oldest first
    max_clock_skew: float = 30.0  # ingest.max_clock_skew: a skew beyond it is marked
    services: Mapping[str, ServiceView] = field(default_factory=dict)  # in configuration order
