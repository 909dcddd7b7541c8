"""The evidence report for Ofcom General Condition A3.2(b), as a value.

``build_report(source, start=..., end=..., targets=..., generated_at=...)`` is a pure
function of what the store holds: it reads, never writes, and returns a ``Report``
that ``monitor.report_render`` writes as HTML, JSON and CSV. ``docs/evidence.md``
says what each section evidences and how each figure is computed; the short form:

Period
    Half-open ``[start, end)``, UTC, cut at ``generated_at`` when the period runs into
    the future (``measured_until``). All durations are whole milliseconds internally
    (times are stored at millisecond precision), so the sums are exact.

Time-weighted availability (from the monitor's recorded state timeline)
    ``up`` and ``degraded`` are *available*, ``down`` is *unavailable*, ``unknown``
    (no fresh result: a monitoring gap) and any time before the first recorded state
    are *unmonitored*. The recorded timeline is cross-checked against the results
    themselves: wherever the target had no result within its freshness window
    (``stale_after x interval``, the monitor's own rule) the time is unmonitored
    whatever state was recorded — a state left standing while the monitor was not
    running is not evidence. ``availability = available / (available + unavailable)``,
    i.e. over monitored time only; the monitored fraction is reported next to it, and
    so is ``lower_bound = available / period`` (every unmonitored second counted as
    down). Met when ``availability >= 0.99999``; the allowed downtime is
    ``(1 - 0.99999) x monitored seconds``.

Call-weighted availability
    ``passed / (passed + failed)`` over every ``invite`` test call placed in the period
    (scheduled, confirmation and on-demand alike; inconclusive calls count in neither).
    Blocked dial attempts (reason ``guard_refused``: never placed, or ended because the
    far end named a live number as the remote target) are listed, not counted. Met when ``>= 0.99999``.

Buckets
    UTC quarter hours (Ofcom's benchmark granularity), clipped to the period. A result
    belongs to the bucket its judged time falls in, as everywhere in ecpm.

Judged time and clock skew
    Every time the report takes from a result (which period, which bucket, freshness,
    coverage, versions, silences) is the monitor-judged time stored with it
    (``monitor.skew``: the probe's ``finished_at`` corrected by the probe's estimated clock
    skew, never later than the monitor received it), not the probe's own stamp. Per probe
    the report shows the skew seen and every result judged with a skew beyond
    ``ingest.max_clock_skew`` (``clock_skew``; the first ``SKEWED_LISTED`` per probe are
    listed, all are counted).

Efficiency: the ledger is verified first; then each target's results are read one UTC
day at a time, aggregated by the store (``ReportSource.report_window``) when the chain
check verified every row of the day, else row by row from the payloads (a broken or
unreadable row, a blocked attempt): the same figures either way (``docs/evidence.md``,
"Scale"; ``bench/report_bench.py``).
"""

from __future__ import annotations

import bisect
import statistics
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Final, Literal, TypeVar

from ecpm import __version__
from monitor.config import Service
from monitor.model import (
    TARGET_STATES,
    Ack,
    DutyStatus,
    Incident,
    IncidentDuty,
    Notification,
    ResultSummary,
    SeqGap,
    StateChange,
    TargetStateName,
)
from monitor.redundancy import LostPeriod, lost_periods, paths
from monitor.skew import skewed
from monitor.store import (
    ProbeEvent,
    ReportSource,
    ResultGroup,
    ResultWindow,
    SkewedRow,
    Verification,
    WindowAsk,
)
from probes.outcome import CALL_KINDS, IDENTITY_REASONS
from probes.result import ResultError, format_time, parse_time

SCHEMA: Final = "ecpm.report/1"
AVAILABILITY_TARGET: Final = 0.99999  # "five nines"
BUCKET_SECONDS: Final = 900  # 15 minutes, aligned to UTC quarter hours
GUARD_REFUSED: Final = "guard_refused"  # probes.checks: the live-number guard refused the SIP send
STATE_RANK: Final[dict[TargetStateName, int]] = {"up": 0, "degraded": 1, "unknown": 2, "down": 3}
DEFAULT_FRESH_WITHIN: Final = 3 * 30.0  # Reachability.stale_after x MonitoredTarget.interval defaults
DEFAULT_MAX_CLOCK_SKEW: Final = 30.0  # Ingest.max_clock_skew default
SKEWED_LISTED: Final = 1000  # skewed results listed per probe (all are counted)

_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_MS: Final = timedelta(milliseconds=1)
_DAY_MS: Final = 86_400_000
_BUCKET_MS: Final = BUCKET_SECONDS * 1000

Progress = Callable[[str], None]


# ---------------------------------------------------------------- the value


@dataclass(frozen=True, slots=True)
class TargetInfo:
    id: str
    description: str = ""
    # the monitor's freshness rule for this target: reachability.stale_after x interval
    fresh_within: float = DEFAULT_FRESH_WITHIN


@dataclass(frozen=True, slots=True)
class Span:
    """One stretch of the state timeline, clipped to the period."""

    state: TargetStateName
    start: datetime
    end: datetime
    open_at_start: bool = False  # began before the period
    open_at_end: bool = False  # still going at the end of the period

    @property
    def seconds(self) -> float:
        return _seconds(self.start, self.end)


@dataclass(frozen=True, slots=True)
class CallCounts:
    """Test calls placed, of the kinds in ``probes.outcome.CALL_KINDS`` (``invite``); blocked
    dial attempts excluded."""

    placed: int = 0
    passed: int = 0
    failed: int = 0
    inconclusive: int = 0
    scheduled: int = 0
    confirmations: int = 0  # the immediate re-check after a failure
    on_demand: int = 0  # ecpm verify / API requests


@dataclass(frozen=True, slots=True)
class PingCounts:
    """Pings sent: results of every other check kind (``options``); blocked ones excluded."""

    sent: int = 0
    passed: int = 0
    failed: int = 0
    inconclusive: int = 0


@dataclass(frozen=True, slots=True)
class IdentityCounts:
    """Test calls that failed at stage ``identity``, by reason: the caller's number or its
    location lost or changed on the way (``probes.outcome.IDENTITY_REASONS``). A call that
    passed delivered both, where its target checks them (docs/checks.md)."""

    cli_missing: int = 0
    cli_mismatch: int = 0
    location_missing: int = 0
    location_mismatch: int = 0

    @property
    def failed(self) -> int:
        return self.cli_missing + self.cli_mismatch + self.location_missing + self.location_mismatch


@dataclass(frozen=True, slots=True)
class TimeAvailability:
    period_seconds: float
    up_seconds: float
    degraded_seconds: float
    down_seconds: float
    unmonitored_seconds: float
    monitored_seconds: float
    monitored_fraction: float | None  # monitored / period
    availability: float | None  # (up + degraded) / monitored; None without monitored time
    lower_bound: float | None  # (up + degraded) / period: unmonitored time counted as down
    allowed_downtime_seconds: float  # (1 - target) x monitored
    met: bool | None


@dataclass(frozen=True, slots=True)
class CallAvailability:
    passed: int
    failed: int
    availability: float | None  # passed / (passed + failed); None without decisive calls
    allowed_failures: float  # (1 - target) x (passed + failed)
    met: bool | None


@dataclass(frozen=True, slots=True)
class Bucket:
    start: datetime  # clipped to the period
    end: datetime
    calls: int
    passed: int
    failed: int
    inconclusive: int
    pings: int
    up_seconds: float
    degraded_seconds: float
    down_seconds: float
    unmonitored_seconds: float
    availability: float | None  # over monitored time in the bucket
    worst_state: TargetStateName
    pdd_median: float | None  # post-dial delay (stage "ringing") of passed calls, seconds
    pdd_max: float | None

    @property
    def perfect(self) -> bool:
        return self.failed == 0 and self.worst_state == "up"


@dataclass(frozen=True, slots=True)
class Notice(Notification):
    """One page of an incident, as the monitor's own notifiers recorded it, and when."""

    after_detection_seconds: float | None = None  # sent_at - detected_at


@dataclass(frozen=True, slots=True)
class DutyEntry:
    """One notification duty of an incident (``monitor.duties``: due, acknowledged by whom,
    when, with what reference, escalated), judged met/missed ``at`` the measured period's end."""

    duty: IncidentDuty
    at: datetime

    @property
    def status(self) -> DutyStatus:
        return self.duty.status(self.at)


@dataclass(frozen=True, slots=True)
class IncidentEntry:
    id: int
    kind: Literal["down", "gap"]
    summary: str
    last_good_id: str | None
    last_good_at: datetime | None
    first_failed_id: str | None
    first_failed_at: datetime | None  # start of the first failed call
    detected_at: datetime  # when the monitor confirmed it (opened the incident)
    resolved_at: datetime | None
    notified_at: datetime | None  # the first trigger page sent (None: none was)
    detection_latency_seconds: float | None  # detected - first failure start
    time_to_notify_seconds: float | None  # notified - detected
    duration_seconds: float | None  # resolved - (first failure start, or detected for gaps)
    notifications: tuple[Notice, ...]
    duties: tuple[DutyEntry, ...] = ()
    acknowledged: Ack | None = None  # the incident itself (its escalation pages stopped)


@dataclass(frozen=True, slots=True)
class ProbeCoverage:
    probe: str
    results: int
    first_at: datetime
    last_at: datetime


@dataclass(frozen=True, slots=True)
class Silence:
    """The longest stretch of the period without any result for a target."""

    start: datetime
    end: datetime

    @property
    def seconds(self) -> float:
        return _seconds(self.start, self.end)


@dataclass(frozen=True, slots=True)
class TargetReport:
    id: str
    description: str
    calls: CallCounts
    pings: PingCounts
    registrations: PingCounts  # register checks: REGISTERs sent and how they ended
    identity: IdentityCounts  # calls that lost the caller's number or location
    blocked: int  # blocked dial attempts (guard refusals) of any check
    time: TimeAvailability
    by_calls: CallAvailability
    timeline: tuple[Span, ...]
    gaps: tuple[Span, ...]  # the unknown spans of the timeline
    buckets: tuple[Bucket, ...]
    incidents: tuple[IncidentEntry, ...]
    verifications: tuple[Verification, ...]
    refusals: tuple[ResultSummary, ...]
    coverage: tuple[ProbeCoverage, ...]
    longest_silence: Silence
    fresh_within: float  # seconds: a result this old still counts as monitoring the target


@dataclass(frozen=True, slots=True)
class ProbeOutage:
    probe: str
    start: datetime
    end: datetime
    open_at_start: bool
    open_at_end: bool

    @property
    def seconds(self) -> float:
        return _seconds(self.start, self.end)


@dataclass(frozen=True, slots=True)
class VersionSeen:
    probe: str
    version: str
    first_seen: datetime
    last_seen: datetime
    results: int


@dataclass(frozen=True, slots=True)
class Unreadable:
    """Stored results the report could not read (a damaged payload, or one stored before
    the value bounds existed): quarantined by the store, never silently skipped. ``problem``
    names the row and the result id."""

    target: str
    start: datetime
    end: datetime
    problem: str


@dataclass(frozen=True, slots=True)
class SkewedResult:
    """A result the monitor judged with a probe clock skew beyond ``ingest.max_clock_skew``."""

    id: str
    probe: str
    target: str
    seq: int
    finished_at: datetime  # the probe's own stamp
    judged_at: datetime  # the time the report (and the monitor) used
    clock_skew: float  # the probe's estimated skew it was judged with, seconds (> 0: ahead)


@dataclass(frozen=True, slots=True)
class ProbeSkew:
    """One probe's clock over the period, as the monitor estimated it at each result."""

    probe: str
    results: int  # results of the period from this probe (targets reported on)
    estimated: int  # of them, judged with a known skew estimate
    min_seconds: float | None  # lowest and highest skew estimate seen
    max_seconds: float | None
    skewed: int  # judged with a skew beyond the bound
    first_skewed_at: datetime | None  # judged time of the first and last of them
    last_skewed_at: datetime | None
    listed: tuple[SkewedResult, ...]  # up to SKEWED_LISTED of them (first met), by judged time


@dataclass(slots=True)
class _SkewSeen:
    results: int = 0
    estimated: int = 0
    low: float | None = None
    high: float | None = None
    skewed: int = 0
    first: datetime | None = None
    last: datetime | None = None
    listed: list[SkewedResult] = field(default_factory=list)

    def add(self, r: ResultSummary, bound: float) -> None:
        self.results += 1
        skew = r.clock_skew
        if skew is None:
            return
        self.estimated += 1
        self.low = skew if self.low is None else min(self.low, skew)
        self.high = skew if self.high is None else max(self.high, skew)
        if skewed(skew, bound):
            self.skewed += 1
            self.first = r.judged if self.first is None else min(self.first, r.judged)
            self.last = r.judged if self.last is None else max(self.last, r.judged)
            if len(self.listed) < SKEWED_LISTED:
                self.listed.append(
                    SkewedResult(r.id, r.probe, r.target, r.seq, r.finished_at, r.judged, skew)
                )

    def add_group(self, g: ResultGroup) -> None:
        """As ``add`` on each result of the group, but for the listing (``list``)."""
        self.results += g.results
        self.estimated += g.estimated
        if g.skew_low is not None and g.skew_high is not None:
            self.low = g.skew_low if self.low is None else min(self.low, g.skew_low)
            self.high = g.skew_high if self.high is None else max(self.high, g.skew_high)
        if g.skewed and g.skewed_first_ms is not None and g.skewed_last_ms is not None:
            self.skewed += g.skewed
            first, last = _at(g.skewed_first_ms), _at(g.skewed_last_ms)
            self.first = first if self.first is None else min(self.first, first)
            self.last = last if self.last is None else max(self.last, last)

    def list(self, row: SkewedRow) -> None:
        if len(self.listed) < SKEWED_LISTED:
            judged = _at(row.judged_ms)
            finished = parse_time(row.finished_at)
            self.listed.append(
                SkewedResult(row.id, row.probe, row.target, row.seq, finished, judged, row.clock_skew)
            )


@dataclass(frozen=True, slots=True)
class LedgerCheck:
    """The hash chain of the stored results, verified over **every** row in the store."""

    ok: bool
    rows_checked: int  # rows verified (up to and including a broken one)
    rows_total: int
    first_broken_row: int | None
    first_broken_id: str | None
    problem: str | None
    verified_hash: str  # the last hash that verified (the anchor when nothing did)
    period_last_row: int | None  # the last stored row whose result finished in the period
    period_last_id: str | None
    period_last_hash: str | None  # commits to that row and every row before it
    last_row: int | None  # the last stored row overall
    last_id: str | None
    last_hash: str | None

    @property
    def status(self) -> str:
        if self.ok:
            return f"verified: {self.rows_checked} rows, chain intact"
        return f"BROKEN at row {self.first_broken_row} (result {self.first_broken_id}): {self.problem}"


@dataclass(frozen=True, slots=True)
class Report:
    schema: str
    generated_at: datetime
    software: str  # ecpm version that built the report
    store: str  # where the data came from
    start: datetime
    end: datetime
    measured_until: datetime  # min(end, generated_at)
    availability_target: float
    bucket_seconds: int
    pdd_threshold: float  # seconds: slower ringing on a pass makes a target degraded
    max_clock_skew: float  # seconds: ingest.max_clock_skew, a skew beyond it is marked
    ledger: LedgerCheck
    targets: tuple[TargetReport, ...]
    probe_outages: tuple[ProbeOutage, ...]
    seq_gaps: tuple[SeqGap, ...]
    versions: tuple[VersionSeen, ...]
    unreadable: tuple[Unreadable, ...]
    clock_skew: tuple[ProbeSkew, ...] = ()  # per probe with results in the period
    redundancy: tuple[LostPeriod, ...] = ()  # every period a path of a service was lost


# ---------------------------------------------------------------- time helpers


def _ms(moment: datetime) -> int:
    return (moment - _EPOCH) // _MS


def _at(ms: int) -> datetime:
    return _EPOCH + timedelta(milliseconds=ms)


def _seconds(start: datetime, end: datetime) -> float:
    return (_ms(end) - _ms(start)) / 1000


def truncate_ms(moment: datetime) -> datetime:
    """UTC, millisecond precision (as everything ecpm stores)."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return _at(_ms(moment.astimezone(UTC)))


def _ratio(part: int, whole: int) -> float | None:
    return None if whole <= 0 else part / whole


def _met(value: float | None) -> bool | None:
    return None if value is None else value >= AVAILABILITY_TARGET


# ---------------------------------------------------------------- building


def known_targets(source: ReportSource, configured: Sequence[TargetInfo] = ()) -> list[TargetInfo]:
    """Configured targets, then any other target the store has a state history for (with the
    default freshness rule: pass the monitor's config so that each target gets its own)."""
    found = {t.id: t for t in configured}
    for target in sorted(source.latest_states()):
        found.setdefault(target, TargetInfo(target))
    return list(found.values())


def build_report(
    source: ReportSource,
    *,
    start: datetime,
    end: datetime,
    targets: Sequence[TargetInfo],
    generated_at: datetime,
    store_name: str = "",
    pdd_threshold: float = 3.0,
    max_clock_skew: float = DEFAULT_MAX_CLOCK_SKEW,
    progress: Progress | None = None,
    services: Sequence[Service] = (),
) -> Report:
    """The report for ``[start, end)`` over ``targets``; reads ``source``, never writes it."""
    start, end, generated_at = truncate_ms(start), truncate_ms(end), truncate_ms(generated_at)
    if end <= start:
        raise ValueError("the period is empty: end must be after start")
    until = max(start, min(end, generated_at))
    say = progress or (lambda message: None)

    wanted = {t.id for t in targets}
    changes: dict[str, list[StateChange]] = {t: [] for t in wanted}
    period_changes = source.state_changes(start, until)
    for change in period_changes:
        if change.target in wanted:
            changes[change.target].append(change)
    incidents: dict[str, list[Incident]] = {t: [] for t in wanted}
    for incident in source.incidents_between(start, end):
        if incident.target in wanted:
            incidents[incident.target].append(incident)
    verifications: dict[str, list[Verification]] = {t: [] for t in wanted}
    for v in source.verifications_between(start, end):
        if v.target in wanted:
            verifications[v.target].append(v)

    say("ledger: verifying the hash chain over every stored row")
    # rows before ``verified`` passed the chain check: the report counts them in SQL
    ledger, verified = _ledger(source, start=start, end=end)
    period = _PeriodTally(max_clock_skew, verified)
    reports = []
    for n, info in enumerate(targets, 1):
        say(f"target {info.id} ({n}/{len(targets)})")
        reports.append(
            _target_report(
                source,
                info,
                start=start,
                until=until,
                before=source.state_before(info.id, start),
                changes=changes[info.id],
                incidents=incidents[info.id],
                verifications=verifications[info.id],
                period=period,
                say=say,
            )
        )
    say("probe outages and sequence gaps")
    outages = _probe_outages(source.probe_events(start, until), start=start, until=until)
    seq_gaps = tuple(source.gaps_between(start, end))
    unreadable = period.unreadable + _quarantined(source, wanted, start=start, end=end)
    return Report(
        schema=SCHEMA,
        generated_at=generated_at,
        software=__version__,
        store=store_name,
        start=start,
        end=end,
        measured_until=until,
        availability_target=AVAILABILITY_TARGET,
        bucket_seconds=BUCKET_SECONDS,
        pdd_threshold=pdd_threshold,
        max_clock_skew=max_clock_skew,
        ledger=ledger,
        targets=tuple(reports),
        probe_outages=outages,
        seq_gaps=seq_gaps,
        versions=period.versions_seen(),
        unreadable=tuple(unreadable),
        clock_skew=period.clock_skew(),
        redundancy=_redundancy(source, services, period_changes, start=start, until=until),
    )


def _redundancy(
    source: ReportSource,
    services: Sequence[Service],
    changes: Sequence[StateChange],
    *,
    start: datetime,
    until: datetime,
) -> tuple[LostPeriod, ...]:
    """Every redundancy-lost period of every service (``monitor.redundancy``), from its paths'
    recorded states: the one before the period, then the changes in it."""
    out: list[LostPeriod] = []
    for service in services:
        members = [t for t, _ in paths(service)]
        baseline = {t: s for t in members if (s := source.state_before(t, start)) is not None}
        out += lost_periods(service, baseline, changes, start=start, end=until)
    return tuple(out)


def _probe_skew(probe: str, seen: _SkewSeen) -> ProbeSkew:
    listed = tuple(sorted(seen.listed, key=lambda x: (x.judged_at, x.target, x.seq)))
    return ProbeSkew(
        probe=probe,
        results=seen.results,
        estimated=seen.estimated,
        min_seconds=seen.low,
        max_seconds=seen.high,
        skewed=seen.skewed,
        first_skewed_at=seen.first,
        last_skewed_at=seen.last,
        listed=listed,
    )


def _timeline(
    before: TargetStateName | None, changes: Sequence[StateChange], *, start: datetime, until: datetime
) -> list[Span]:
    """The state spans covering ``[start, until)``; no recorded state yet counts as unknown."""
    # (ms, state, inherited from before the period)
    points: list[tuple[int, TargetStateName, bool]] = [(_ms(start), before or "unknown", before is not None)]
    points += [(_ms(c.at), c.state, False) for c in changes]
    end_ms = _ms(until)
    spans: list[Span] = []
    for i, (at, state, inherited) in enumerate(points):
        stop = points[i + 1][0] if i + 1 < len(points) else end_ms
        if stop <= at:
            continue
        if spans and spans[-1].state == state:
            spans[-1] = Span(state, spans[-1].start, _at(stop), spans[-1].open_at_start)
        else:
            spans.append(Span(state, _at(at), _at(stop), open_at_start=inherited))
    if spans:
        last = spans[-1]
        spans[-1] = Span(last.state, last.start, last.end, last.open_at_start, open_at_end=True)
    return spans


@dataclass(slots=True)
class _Buckets:
    """Per-quarter-hour accumulators, indexed from the quarter hour the period starts in."""

    origin: int  # ms of the first bucket's aligned start
    start: int  # ms, period start
    until: int  # ms, measured end
    count: int
    calls: list[int] = field(default_factory=list)
    passed: list[int] = field(default_factory=list)
    failed: list[int] = field(default_factory=list)
    inconclusive: list[int] = field(default_factory=list)
    pings: list[int] = field(default_factory=list)
    state_ms: dict[TargetStateName, list[int]] = field(default_factory=dict)
    worst: list[int] = field(default_factory=list)
    pdd_median: list[float | None] = field(default_factory=list)
    pdd_max: list[float | None] = field(default_factory=list)
    _pdd_index: int = -1
    _pdd_values: list[float] = field(default_factory=list)

    @classmethod
    def covering(cls, start: int, until: int) -> _Buckets:
        origin = start - start % _BUCKET_MS
        count = max(0, -(-(until - origin) // _BUCKET_MS))
        b = cls(origin=origin, start=start, until=until, count=count)
        for name in ("calls", "passed", "failed", "inconclusive", "pings"):
            setattr(b, name, [0] * count)
        b.state_ms = {s: [0] * count for s in TARGET_STATES}
        b.worst = [-1] * count
        b.pdd_median = [None] * count
        b.pdd_max = [None] * count
        return b

    def index(self, ms: int) -> int:
        return (ms - self.origin) // _BUCKET_MS

    def add_span(self, state: TargetStateName, a: int, b: int) -> None:
        rank = STATE_RANK[state]
        totals = self.state_ms[state]
        for k in range(self.index(a), self.index(b - 1) + 1):
            lo = max(a, self.origin + k * _BUCKET_MS)
            hi = min(b, self.origin + (k + 1) * _BUCKET_MS)
            if hi > lo:
                totals[k] += hi - lo
                self.worst[k] = max(self.worst[k], rank)

    def add_pdd(self, k: int, value: float) -> None:
        if k != self._pdd_index:
            self.flush_pdd()
            self._pdd_index = k
        self._pdd_values.append(value)

    def set_pdd(self, k: int, median: float, most: float) -> None:
        self.pdd_median[k] = median
        self.pdd_max[k] = most

    def flush_pdd(self) -> None:
        if self._pdd_values:
            self.pdd_median[self._pdd_index] = statistics.median(self._pdd_values)
            self.pdd_max[self._pdd_index] = max(self._pdd_values)
        self._pdd_values = []

    def values(self) -> tuple[Bucket, ...]:
        self.flush_pdd()
        ranks = {v: k for k, v in STATE_RANK.items()}
        out = []
        for k in range(self.count):
            lo = max(self.start, self.origin + k * _BUCKET_MS)
            hi = min(self.until, self.origin + (k + 1) * _BUCKET_MS)
            up, deg = self.state_ms["up"][k], self.state_ms["degraded"][k]
            down, unknown = self.state_ms["down"][k], self.state_ms["unknown"][k]
            out.append(
                Bucket(
                    start=_at(lo),
                    end=_at(hi),
                    calls=self.calls[k],
                    passed=self.passed[k],
                    failed=self.failed[k],
                    inconclusive=self.inconclusive[k],
                    pings=self.pings[k],
                    up_seconds=up / 1000,
                    degraded_seconds=deg / 1000,
                    down_seconds=down / 1000,
                    unmonitored_seconds=unknown / 1000,
                    availability=_ratio(up + deg, up + deg + down),
                    worst_state=ranks.get(self.worst[k], "unknown"),
                    pdd_median=self.pdd_median[k],
                    pdd_max=self.pdd_max[k],
                )
            )
        return tuple(out)


def _read(
    source: ReportSource, target: str, a: int, b: int, unreadable: list[Unreadable]
) -> list[ResultSummary]:
    """Results of ``target`` finished in ``[a, b)``; a damaged payload is isolated by
    halving the window down to its millisecond and recorded, not allowed to sink the report."""
    try:
        return source.results_between(_at(a), _at(b), target)
    except ResultError as exc:
        if b - a <= 1:
            unreadable.append(Unreadable(target, _at(a), _at(b), str(exc)))
            return []
        mid = (a + b) // 2
        return _read(source, target, a, mid, unreadable) + _read(source, target, mid, b, unreadable)


class _Fresh:
    """When the target had a result no older than ``window`` (the monitor's own rule for
    ``unknown``): merged intervals, built as results stream in oldest first."""

    def __init__(self, window_ms: int) -> None:
        self.window = window_ms
        self.intervals: list[list[int]] = []  # [start, end) ms

    def add(self, at: int) -> None:
        if self.intervals and at <= self.intervals[-1][1]:
            self.intervals[-1][1] = max(self.intervals[-1][1], at + self.window)
        else:
            self.intervals.append([at, at + self.window])

    def add_run(self, first: int, last: int) -> None:
        """Results from ``first`` to ``last``, none more than ``window`` after the one before."""
        self.add(first)
        self.intervals[-1][1] = max(self.intervals[-1][1], last + self.window)

    def split(self, state: TargetStateName, a: int, b: int) -> Iterator[tuple[TargetStateName, int, int]]:
        """``[a, b)`` in ``state`` where fresh, ``unknown`` where not."""
        if state == "unknown":
            yield state, a, b
            return
        cursor = a
        i = bisect.bisect_right(self.intervals, a, key=lambda iv: iv[1])
        while cursor < b and i < len(self.intervals):
            lo, hi = self.intervals[i]
            if lo >= b:
                break
            if lo > cursor:
                yield "unknown", cursor, lo
                cursor = lo
            stop = min(hi, b)
            if stop > cursor:
                yield state, cursor, stop
                cursor = stop
            i += 1
        if cursor < b:
            yield "unknown", cursor, b


def _effective(recorded: Sequence[Span], fresh: _Fresh) -> list[Span]:
    """The recorded timeline, with every stretch that had no fresh result made ``unknown``:
    a state the monitor recorded while nothing reached it (it was not running, say) is not
    evidence of anything."""
    pieces: list[Span] = []
    for n, span in enumerate(recorded):
        for state, a, b in fresh.split(span.state, _ms(span.start), _ms(span.end)):
            inherited = n == 0 and span.open_at_start and a == _ms(span.start)
            if pieces and pieces[-1].state == state and _ms(pieces[-1].end) == a:
                last = pieces[-1]
                pieces[-1] = Span(state, last.start, _at(b), last.open_at_start)
            else:
                pieces.append(Span(state, _at(a), _at(b), open_at_start=inherited))
    if pieces:
        last = pieces[-1]
        pieces[-1] = Span(last.state, last.start, last.end, last.open_at_start, open_at_end=True)
    return pieces


@dataclass(slots=True)
class _Seen:
    """How many results, and the judged times of the first and the last of them: the one
    order (count, first, last) of every "seen" tally in the report."""

    count: int
    first: datetime
    last: datetime


@dataclass(slots=True)
class _PeriodTally:
    """What the report gathers from every target's results: the probe versions seen, each
    probe's clock, and the stored results it could not read."""

    max_clock_skew: float
    verified_below: int  # rows before this one verified: read aggregated (report_window)
    versions: dict[tuple[str, str], _Seen] = field(default_factory=dict)  # (probe, version)
    skews: dict[str, _SkewSeen] = field(default_factory=dict)  # probe
    unreadable: list[Unreadable] = field(default_factory=list)

    def add(self, r: ResultSummary) -> None:
        _see(self.versions, (r.probe, r.version), r.judged)
        self.skews.setdefault(r.probe, _SkewSeen()).add(r, self.max_clock_skew)

    def add_window(self, w: ResultWindow) -> None:
        """A window's results, aggregated: as ``add`` on each of them."""
        for g in w.groups:
            _see_many(self.versions, (g.probe, g.version), g.results, _at(g.first_ms), _at(g.last_ms))
            self.skews.setdefault(g.probe, _SkewSeen()).add_group(g)
        for row in w.skewed:
            self.skews[row.probe].list(row)

    def versions_seen(self) -> tuple[VersionSeen, ...]:
        """By probe, then by when each version was first seen."""
        ordered = sorted(self.versions.items(), key=lambda kv: (kv[0][0], kv[1].first, kv[0][1]))
        return tuple(
            VersionSeen(probe, version, first_seen=seen.first, last_seen=seen.last, results=seen.count)
            for (probe, version), seen in ordered
        )

    def clock_skew(self) -> tuple[ProbeSkew, ...]:
        return tuple(_probe_skew(probe, seen) for probe, seen in sorted(self.skews.items()))


_K = TypeVar("_K")


def _see_many(tally: dict[_K, _Seen], key: _K, count: int, first: datetime, last: datetime) -> None:
    seen = tally.get(key)
    if seen is None:
        tally[key] = _Seen(count, first, last)
    else:
        seen.count += count
        seen.first = min(seen.first, first)
        seen.last = max(seen.last, last)


def _see(tally: dict[_K, _Seen], key: _K, moment: datetime) -> None:
    _see_many(tally, key, 1, moment, moment)


@dataclass(slots=True)
class _Silences:
    """The longest stretch without a result, as results stream in oldest first."""

    last_seen: int  # ms
    longest: tuple[int, int]  # [start, end) ms

    @classmethod
    def from_start(cls, start: int) -> _Silences:
        return cls(start, (start, start))

    def see(self, at: int) -> None:
        if at - self.last_seen > self.longest[1] - self.longest[0]:
            self.longest = (self.last_seen, at)
        self.last_seen = max(self.last_seen, at)

    def see_window(self, first: int, last: int, widest: tuple[int, int] | None) -> None:
        """A window's results: the first, the last, and the first widest gap between two."""
        self.see(first)
        if widest is not None and widest[1] - widest[0] > self.longest[1] - self.longest[0]:
            self.longest = widest
        self.last_seen = max(self.last_seen, last)

    def longest_until(self, until: int) -> Silence:
        a, b = self.longest
        if until - self.last_seen > b - a:
            a, b = self.last_seen, until
        return Silence(_at(a), _at(b))


_CALLS: Final = ("placed", "passed", "failed", "inconclusive")  # CallCounts, by outcome
PING_KIND: Final = "options"  # the report's pings (report-v1 "options": OPTIONS pings sent)
REGISTER_KIND: Final = "register"  # the report's registrations (report-v1 "register")
_PLACED_AS: Final = ("scheduled", "confirmations", "on_demand")  # CallCounts, by why placed
_PINGS: Final = ("sent", "passed", "failed", "inconclusive")  # PingCounts


@dataclass(slots=True)
class _TargetTally:
    """What one target's results of the period add up to, built as they stream in oldest
    first: calls and pings (overall and per bucket), blocked attempts, freshness, coverage
    per probe and the longest silence."""

    buckets: _Buckets
    fresh: _Fresh
    silences: _Silences
    calls: dict[str, int] = field(default_factory=lambda: dict.fromkeys(_CALLS, 0))
    kinds: dict[str, int] = field(default_factory=lambda: dict.fromkeys(_PLACED_AS, 0))
    pings: dict[str, int] = field(default_factory=lambda: dict.fromkeys(_PINGS, 0))
    registrations: dict[str, int] = field(default_factory=lambda: dict.fromkeys(_PINGS, 0))
    identity: dict[str, int] = field(default_factory=lambda: dict.fromkeys(IDENTITY_REASONS, 0))
    refusals: list[ResultSummary] = field(default_factory=list)
    coverage: dict[str, _Seen] = field(default_factory=dict)  # probe

    @classmethod
    def covering(cls, start: int, until: int, fresh_within: float) -> _TargetTally:
        return cls(
            _Buckets.covering(start, until), _Fresh(round(fresh_within * 1000)), _Silences.from_start(start)
        )

    def lead_in(self, r: ResultSummary) -> None:
        """A result from just before the period: it still keeps the start fresh."""
        if r.reason != GUARD_REFUSED:
            self.fresh.add(_ms(r.judged))

    def add(self, r: ResultSummary) -> None:
        judged = r.judged  # the monitor's time for it, never the probe's own stamp
        at = _ms(judged)
        self.silences.see(at)
        _see(self.coverage, r.probe, judged)
        if r.reason == GUARD_REFUSED:
            self.refusals.append(r)
            return
        self.fresh.add(at)
        k = self.buckets.index(at)
        self._count(r.check, r.outcome, k=k, n=1, confirm=r.confirm, on_demand=bool(r.request_id))
        if r.outcome == "fail" and r.reason is not None:
            self._failed(r.check, r.reason, n=1)
        if r.check in CALL_KINDS and r.outcome == "pass" and r.post_dial_delay is not None:
            self.buckets.add_pdd(k, r.post_dial_delay)

    def add_window(self, w: ResultWindow) -> None:
        """A window's results, aggregated (no blocked attempt among them): as ``add`` on each."""
        if not w.runs:
            return
        self.silences.see_window(w.runs[0][0], w.runs[-1][1], w.widest)
        self.lead_in_window(w)
        for g in w.groups:
            _see_many(self.coverage, g.probe, g.results, _at(g.first_ms), _at(g.last_ms))
            self._count(g.check, g.outcome, k=g.bucket, n=g.results, confirm=g.confirm, on_demand=g.on_demand)
        for k, median, most in w.pdd:
            self.buckets.set_pdd(k, median, most)
        for check, reason, n in w.failures:
            self._failed(check, reason, n=n)

    def lead_in_window(self, w: ResultWindow) -> None:
        for first, last in w.runs:
            self.fresh.add_run(first, last)

    def _count(self, check: str, outcome: str, *, k: int, n: int, confirm: bool, on_demand: bool) -> None:
        """``n`` results of one kind and outcome in bucket ``k``, row by row or aggregated alike."""
        counted = _counted(outcome)
        if check in CALL_KINDS:
            self.calls["placed"] += n
            self.calls[counted] += n
            self.kinds["confirmations" if confirm else "on_demand" if on_demand else "scheduled"] += n
            self.buckets.calls[k] += n
            getattr(self.buckets, counted)[k] += n
        elif check == PING_KIND:  # the schema's "options" figures; register is not a ping there
            self.pings["sent"] += n
            self.pings[counted] += n
            self.buckets.pings[k] += n
        elif check == REGISTER_KIND:
            self.registrations["sent"] += n
            self.registrations[counted] += n

    def _failed(self, check: str, reason: str, *, n: int) -> None:
        """``n`` failed results of one kind and reason, row by row or aggregated alike. The
        identity stage's reasons are its own (no other stage fails with them): the reason
        column alone says a call lost the caller's number or location."""
        if check in CALL_KINDS and reason in self.identity:
            self.identity[reason] += n

    def call_counts(self) -> CallCounts:
        return CallCounts(**self.calls, **self.kinds)

    def ping_counts(self) -> PingCounts:
        return PingCounts(**self.pings)

    def registration_counts(self) -> PingCounts:
        return PingCounts(**self.registrations)

    def identity_counts(self) -> IdentityCounts:
        return IdentityCounts(**self.identity)

    def probe_coverage(self) -> tuple[ProbeCoverage, ...]:
        return tuple(
            ProbeCoverage(probe, results=seen.count, first_at=seen.first, last_at=seen.last)
            for probe, seen in sorted(self.coverage.items())
        )


@dataclass(frozen=True, slots=True)
class _StateTime:
    """Milliseconds of the (effective) timeline spent in each state."""

    up: int
    degraded: int
    down: int
    unknown: int

    @property
    def available(self) -> int:
        return self.up + self.degraded

    @property
    def monitored(self) -> int:
        return self.available + self.down


def _target_report(
    source: ReportSource,
    info: TargetInfo,
    *,
    start: datetime,
    until: datetime,
    before: TargetStateName | None,
    changes: Sequence[StateChange],
    incidents: Sequence[Incident],
    verifications: Sequence[Verification],
    period: _PeriodTally,
    say: Progress,
) -> TargetReport:
    """One target's section: its results just before the period (freshness) and in it, day by
    day, tallied; the recorded timeline made unknown where nothing was fresh; the time in each
    state; and the two availabilities."""
    start_ms, until_ms = _ms(start), _ms(until)
    tally = _TargetTally.covering(start_ms, until_ms, info.fresh_within)
    lead_in = _window(source, info.id, start_ms - tally.fresh.window, start_ms, tally=tally, period=period)
    if lead_in is not None:
        tally.lead_in_window(lead_in)
    else:
        for r in _read(source, info.id, start_ms - tally.fresh.window, start_ms, period.unreadable):
            tally.lead_in(r)
    for a, b in _days(info.id, start=start_ms, until=until_ms, say=say):
        window = _window(source, info.id, a, b, tally=tally, period=period)
        if window is not None:
            period.add_window(window)
            tally.add_window(window)
            continue
        for r in _read(source, info.id, a, b, period.unreadable):  # row by row, from the payloads
            period.add(r)
            tally.add(r)
    timeline = _effective(_timeline(before, changes, start=start, until=until), tally.fresh)
    state_time = _time_in_states(timeline, tally.buckets)
    calls = tally.call_counts()
    return TargetReport(
        id=info.id,
        description=info.description,
        calls=calls,
        pings=tally.ping_counts(),
        registrations=tally.registration_counts(),
        identity=tally.identity_counts(),
        blocked=len(tally.refusals),
        time=_time_availability(state_time, period_ms=until_ms - start_ms),
        by_calls=_call_availability(calls),
        timeline=tuple(timeline),
        gaps=tuple(s for s in timeline if s.state == "unknown"),
        buckets=tally.buckets.values(),
        incidents=tuple(_incident_entry(i, until) for i in incidents),
        verifications=tuple(verifications),
        refusals=tuple(tally.refusals),
        coverage=tally.probe_coverage(),
        longest_silence=tally.silences.longest_until(until_ms),
        fresh_within=info.fresh_within,
    )


def _days(target: str, *, start: int, until: int, say: Progress) -> Iterator[tuple[int, int]]:
    """``[start, until)`` cut at UTC midnights: the report reads one day at a time."""
    days = -(-(until - start) // _DAY_MS)
    chunk, day = start, 0
    while chunk < until:
        day += 1
        stop = min(until, (chunk // _DAY_MS + 1) * _DAY_MS)
        if days > 1:
            say(f"target {target}: {format_time(_at(chunk))[:10]} (day {day}/{days})")
        yield chunk, stop
        chunk = stop


def _window(
    source: ReportSource, target: str, a: int, b: int, *, tally: _TargetTally, period: _PeriodTally
) -> ResultWindow | None:
    """``target``'s results judged in ``[a, b)`` aggregated by the store, or None: read them
    row by row (a row the chain check did not verify, or a blocked attempt, is among them)."""
    ask = WindowAsk(
        verified_below=period.verified_below,
        origin_ms=tally.buckets.origin,
        bucket_ms=_BUCKET_MS,
        fresh_ms=tally.fresh.window,
        calls=tuple(sorted(CALL_KINDS)),
        skew_bound=period.max_clock_skew,
        refused=GUARD_REFUSED,
        reasons=IDENTITY_REASONS,
    )
    return source.report_window(target, _at(a), _at(b), ask)


def _time_in_states(timeline: Sequence[Span], buckets: _Buckets) -> _StateTime:
    """Time per state over the timeline; each span is added to the buckets it covers too."""
    state_ms: dict[TargetStateName, int] = dict.fromkeys(TARGET_STATES, 0)
    for span in timeline:
        a, b = _ms(span.start), _ms(span.end)
        state_ms[span.state] += b - a
        buckets.add_span(span.state, a, b)
    return _StateTime(
        up=state_ms["up"], degraded=state_ms["degraded"], down=state_ms["down"], unknown=state_ms["unknown"]
    )


def _time_availability(t: _StateTime, *, period_ms: int) -> TimeAvailability:
    availability = _ratio(t.available, t.monitored)
    return TimeAvailability(
        period_seconds=period_ms / 1000,
        up_seconds=t.up / 1000,
        degraded_seconds=t.degraded / 1000,
        down_seconds=t.down / 1000,
        unmonitored_seconds=t.unknown / 1000,
        monitored_seconds=t.monitored / 1000,
        monitored_fraction=_ratio(t.monitored, period_ms),
        availability=availability,
        lower_bound=_ratio(t.available, period_ms),
        allowed_downtime_seconds=(1 - AVAILABILITY_TARGET) * t.monitored / 1000,
        met=_met(availability),
    )


def _call_availability(calls: CallCounts) -> CallAvailability:
    decisive = calls.passed + calls.failed
    availability = _ratio(calls.passed, decisive)
    return CallAvailability(
        passed=calls.passed,
        failed=calls.failed,
        availability=availability,
        allowed_failures=(1 - AVAILABILITY_TARGET) * decisive,
        met=_met(availability),
    )


def _counted(outcome: str) -> str:
    return {"pass": "passed", "fail": "failed"}.get(outcome, "inconclusive")


def _incident_entry(incident: Incident, until: datetime) -> IncidentEntry:
    detected = incident.opened_at
    notices = tuple(
        Notice(
            notifier=n.notifier,
            event=n.event,
            state=n.state,
            attempts=n.attempts,
            created_at=n.created_at,
            sent_at=n.sent_at,
            after_detection_seconds=None if n.sent_at is None else _seconds(detected, n.sent_at),
            last_error=n.last_error,
        )
        for n in incident.notifications
    )
    sent = [n.sent_at for n in notices if n.event == "trigger" and n.state == "sent" and n.sent_at]
    notified = min(sent) if sent else None
    began = incident.first_failed_at or detected
    return IncidentEntry(
        id=incident.id,
        kind=incident.kind,
        summary=incident.summary,
        last_good_id=incident.last_good_id,
        last_good_at=incident.last_good_at,
        first_failed_id=incident.first_failed_id,
        first_failed_at=incident.first_failed_at,
        detected_at=detected,
        resolved_at=incident.resolved_at,
        notified_at=notified,
        detection_latency_seconds=(
            None if incident.first_failed_at is None else _seconds(incident.first_failed_at, detected)
        ),
        time_to_notify_seconds=None if notified is None else _seconds(detected, notified),
        duration_seconds=None if incident.resolved_at is None else _seconds(began, incident.resolved_at),
        notifications=notices,
        duties=tuple(DutyEntry(d, until) for d in incident.duties),
        acknowledged=incident.ack,
    )


def _probe_outages(
    events: Sequence[ProbeEvent], *, start: datetime, until: datetime
) -> tuple[ProbeOutage, ...]:
    """Offline intervals per probe; ``probe_events`` starts each probe with its state at ``start``."""
    offline_since: dict[str, tuple[datetime, bool]] = {}
    outages: list[ProbeOutage] = []
    for e in events:
        if not e.online and e.probe not in offline_since:
            offline_since[e.probe] = (e.at, _ms(e.at) == _ms(start))
        elif e.online and e.probe in offline_since:
            since, before = offline_since.pop(e.probe)
            if e.at > since:
                outages.append(ProbeOutage(e.probe, since, e.at, before, False))
    for probe, (since, before) in offline_since.items():
        if until > since:
            outages.append(ProbeOutage(probe, since, until, before, True))
    return tuple(sorted(outages, key=lambda o: (o.start, o.probe)))


_FINISHED = '"finished_at":"'


def _quarantined(
    source: ReportSource, wanted: set[str], *, start: datetime, end: datetime
) -> list[Unreadable]:
    """The unreadable rows the store met while the report read the period (and the chain
    walk), for the targets reported on, by their ``finished_at`` column."""
    lo, hi = format_time(start), format_time(end)
    out = []
    for q in source.quarantined():
        if q.target not in wanted:
            continue
        try:
            moment = parse_time(q.finished_at)
        except ValueError:
            moment = start  # the column itself is damaged: name the row anyway
        else:
            if not lo <= q.finished_at < hi:
                continue
        out.append(Unreadable(q.target, moment, moment + _MS, f"row {q.row} (result {q.id}): {q.problem}"))
    return out


def _finished_text(payload: object) -> str:
    """``finished_at`` of a stored payload without parsing it (canonical JSON, sorted keys)."""
    if not isinstance(payload, str):
        return ""
    i = payload.find(_FINISHED)
    return "" if i < 0 else payload[i + len(_FINISHED) : i + len(_FINISHED) + 24]


def _ledger(source: ReportSource, *, start: datetime, end: datetime) -> tuple[LedgerCheck, int]:
    """Verify every row, then find the hashes a reader can quote: in SQL over the rows that
    verified (their ``finished_at`` column is their payload's), from the payloads after them."""
    before = source.chain_marks(start, end, below=0).last
    chain = source.check_chain()
    verified = (0 if before is None else before[0] + 1) if chain.ok else (chain.first_broken_row or 0)
    marks = source.chain_marks(start, end, below=verified)
    period_last, last = marks.period_last, marks.last
    lo, hi = format_time(start), format_time(end)
    for row, result_id, payload, _prev, digest in source.iter_chain(since=verified):
        if lo <= _finished_text(payload) < hi:
            period_last = (row, result_id, digest)
    return LedgerCheck(
        ok=chain.ok,
        rows_checked=chain.rows,
        rows_total=max(marks.rows, chain.rows),
        first_broken_row=chain.first_broken_row,
        first_broken_id=chain.first_broken_id,
        problem=chain.problem,
        verified_hash=chain.last_hash,
        period_last_row=None if period_last is None else period_last[0],
        period_last_id=None if period_last is None else period_last[1],
        period_last_hash=None if period_last is None else period_last[2],
        last_row=None if last is None else last[0],
        last_id=None if last is None else last[1],
        last_hash=None if last is None else last[2],
    ), verified
