"""The monitor's core: ingest a message, keep state, open and resolve incidents.

No network here: the MQTT loop (``monitor.service``) hands in topics and payloads,
commits the store per batch, then acknowledges the messages. Every message is
validated completely before anything is stored (``monitor.ingest``: size, JSON,
schema, fields and value bounds, known probe, topic, signature, known target, times
around the receive time, seq rules) and a bad one is rejected with a bounded reason,
counted and logged, never stored and never fatal. A stored row that cannot be read
(quarantined by the store) is skipped on restart, never fatal.

Constructing a core restores its state from the store but evaluates nothing and so
never pages: the first ``evaluate()`` (the caller's, once its pager can take a page)
opens whatever incident the stored state calls for — e.g. a gap after the monitor was
away longer than ``gap_incident_after`` — stored and paged like any other.

Replicas (several monitors on one PostgreSQL store, docs/scaling.md): each ingests its
share of the results under the store's writer lock (``hold_writers``), and each
evaluation first follows what the others appended (``_follow``), so every replica's
trackers, snapshot and pages hold the same results. Only the ``evaluator`` (the
store's ``Election``, set by the service) records state changes and opens and resolves
incidents; the others take each target's recorded state from the store.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from functools import cached_property

from prometheus_client import CollectorRegistry

from monitor.config import MonitorConfig
from monitor.delivery import Delivery
from monitor.duties import duties_at
from monitor.ingest import Rejected, ResultValidator
from monitor.metrics import MonitorMetrics
from monitor.model import (
    Incident,
    IncidentDuty,
    IncidentKind,
    ProbeView,
    ResultSummary,
    Snapshot,
    StateChange,
    TargetStateName,
    TargetView,
)
from monitor.redundancy import service_views
from monitor.skew import WINDOW, SkewEstimator, judge, skewed
from monitor.state import TargetTracker, Verdict
from monitor.status_ingest import OrderMarks, StatusValidator
from monitor.store import ProbeStatus, Store
from probes.delivery import OutboxHealth
from probes.result import format_time
from probes.status import Order

logger = logging.getLogger(__name__)

TIMELINE = timedelta(hours=24)
HEARTBEAT_GAP = 10.0  # seconds without a heartbeat that count as "the monitor was not running"
Pager = Callable[[Incident, str], None]  # (incident, "trigger" | "resolve")
Escalator = Callable[[Incident, IncidentDuty], None]  # a duty unacknowledged at its escalation time
OpenIncidents = dict[tuple[str, IncidentKind], Incident]  # by (target, kind)


def _utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True, slots=True)
class _Standing:
    """A target's recorded state, since when, and the latest reason for it."""

    state: TargetStateName
    since: datetime
    why: str


class MonitorCore:
    def __init__(
        self,
        config: MonitorConfig,
        store: Store,
        registry: CollectorRegistry,
        *,
        pager: Pager | None = None,
        escalator: Escalator | None = None,
        clock: Callable[[], datetime] = _utcnow,
    ) -> None:
        self.config = config
        self.store = store
        self.pager: Pager = pager if pager is not None else (lambda incident, event: None)
        self.escalator: Escalator = escalator if escalator is not None else (lambda incident, duty: None)
        self.clock = clock
        prefix = config.mqtt.topic_prefix
        self._results_prefix = f"{prefix}/results/"
        self._status_prefix = f"{prefix}/status/"
        self._keys = {p.id: p.secret.get_secret_value().encode() for p in config.probes}
        self.trackers = {t.id: TargetTracker(t, config.reachability) for t in config.targets}
        self._states: dict[str, _Standing] = {}
        self._probe_status = {s.probe: s for s in store.probe_statuses()}
        self._last_result_at: dict[str, datetime] = {}
        self._online_since: dict[str, datetime] = {}  # when each probe last went offline → online
        self._outbox_health: dict[str, OutboxHealth] = {}  # from each probe's latest verified status
        self._left_down: dict[str, datetime] = {}  # when a target with an open down incident left down
        self._cut_off: str | None = None  # why the monitor itself hears nothing (broker_connection)
        self._ever_connected = False
        self._snapshot = Snapshot(at=clock(), targets={}, probes={}, open_incidents=(), timeline=())
        self.metrics = MonitorMetrics(
            registry,
            targets=[t.id for t in config.targets],
            probes=[p.id for p in config.probes],
            notifiers=[n.name for n in config.notifiers],
            snapshot=lambda: self._snapshot,
            quarantined=lambda: len(store.quarantined()),
            max_clock_skew=config.ingest.max_clock_skew,
        )
        self._ingest = ResultValidator(config, store)
        self.delivery = Delivery(config, store, self.metrics)
        self.skew = SkewEstimator()  # each probe's clock skew: results are judged by it (monitor.skew)
        # replicas: whether this monitor evaluates (the service asks the store's Election),
        # the last row followed, and the results stored here since (tracked already)
        self.evaluator = True
        self._synced = True  # the recorded states were read (_restore) since it began evaluating
        self._tail = 0
        self._own: set[str] = set()
        self._applied: dict[str, Order] = {}  # each probe's last status order taken here
        self._restore()

    # ------------------------------------------------------------ restart

    def _restore(self) -> None:
        """Rebuild in-memory state from the store: a restart changes nothing visible, except
        that the time the monitor was not running is recorded as what it was: unknown.
        Nothing is evaluated here (module docstring): the caller's first ``evaluate()``."""
        now = self.clock()
        probes = [p.id for p in self.config.probes]
        self.skew.restore(self.store.skew_samples(now - WINDOW), self.store.last_clock_skews(probes))
        longest = max(t.window for t in self.trackers.values())
        for r in self.store.results_between(now - max(longest, TIMELINE), now + timedelta(days=1)):
            self._track(r, now)
        last_beat = self.store.heartbeat()
        away = last_beat is not None and (now - last_beat).total_seconds() > HEARTBEAT_GAP
        for target, (state, since) in self.store.latest_states().items():
            if target not in self.trackers:
                continue
            if away and state != "unknown" and last_beat is not None:
                self.store.add_state_change(target, "unknown", last_beat, "the monitor was not running")
                self._states[target] = _Standing("unknown", last_beat, "the monitor was not running")
            else:
                self._states[target] = _Standing(state, since, "restored after restart")
        if self.store.shared:
            self._tail = self.store.last_row()
        self.store.commit()

    def reload(self) -> None:
        """After the store lost its connection (``StoreLost``) and reconnected: what was not
        committed is gone (the broker delivers it again), so rebuild from what was."""
        self.trackers = {t.id: TargetTracker(t, self.config.reachability) for t in self.config.targets}
        self._states.clear()
        self._last_result_at.clear()
        self._own.clear()
        self._probe_status = {s.probe: s for s in self.store.probe_statuses()}
        self.__dict__.pop("_statuses", None)  # its order marks may be ones never committed
        self.delivery = Delivery(self.config, self.store, self.metrics)
        self.skew = SkewEstimator()
        self._restore()

    def _follow(self, now: datetime) -> None:
        """Track the results other monitors on the store appended since the last look."""
        while True:
            before = self._tail
            self._tail, summaries = self.store.results_after(before)
            for summary in summaries:
                if summary.id not in self._own:
                    self._track(summary, now)
            if self._tail == before:
                break
        self._own.clear()

    def _track(self, summary: ResultSummary, now: datetime) -> None:
        """Feed a result to its target's tracker at its judged time (``monitor.skew``),
        never later than now: a probe whose clock runs ahead cannot keep a result "fresh"
        into the future, before or after a restart."""
        if summary.judged > now:  # a monitor clock stepped back since it was judged
            summary = replace(summary, judged_at=now)
        tracker = self.trackers.get(summary.target)
        if tracker is not None:
            tracker.add(summary)
        latest = self._last_result_at.get(summary.probe, summary.judged)
        self._last_result_at[summary.probe] = max(summary.judged, latest)

    def beat(self, now: datetime | None = None) -> None:
        """Record that the monitor is running (the service calls this every second)."""
        self.store.set_heartbeat(now or self.clock())
        self.store.commit()

    def broker_connection(self, connected: bool, at: datetime | None = None) -> None:
        """The service reports its MQTT connection (connected = subscribed). While the monitor
        is cut off, an unknown target's reason — its state change, its gap incident and page —
        names that cause and when it began, not only the missing results."""
        self.metrics.mqtt_connected.set(1.0 if connected else 0.0)
        if connected:
            self._cut_off, self._ever_connected = None, True
        elif self._cut_off is None:
            when = format_time(at or self.clock())
            self._cut_off = (
                f"the monitor lost its MQTT connection at {when}"
                if self._ever_connected
                else f"the monitor has not reached its MQTT broker since {when}"
            )

    # ------------------------------------------------------------ ingest

    def snapshot(self) -> Snapshot:
        return self._snapshot

    def handle(self, topic: str, payload: bytes, now: datetime | None = None) -> str | None:
        """Take one MQTT message (received at ``now``, the clock's time by default); return
        the rejection reason, or None when accepted.

        Never raises for anything a message contains: a payload that trips an error the
        parser did not foresee (huge integers, 1e400, deep nesting) is rejected as
        ``fields``, because an unacknowledged message that kills the monitor would be
        redelivered and kill it again after every restart.
        """
        try:
            if topic.startswith((self._results_prefix, self._status_prefix)):
                # replicas: read the sequence book only after every other writer committed
                self.store.hold_writers()
            if topic.startswith(self._results_prefix):
                return self._result(topic, payload, now or self.clock())
            if topic.startswith(self._status_prefix):
                return self._status(topic, payload)
        except (ValueError, TypeError, OverflowError, RecursionError) as exc:
            return self._reject("fields", topic, f"{type(exc).__name__}: {str(exc)[:200]}")
        return self._reject("topic_mismatch", topic, "not a results or status topic")

    def handle_batch(self, messages: Iterable[tuple[str, bytes]]) -> list[str | None]:
        """``handle`` each message of a batch, in order, all received now (one clock
        reading). What they store joins one transaction: the caller commits it once, then
        acknowledges the batch (``monitor.service``), and evaluates once."""
        now = self.clock()
        return [self.handle(topic, payload, now) for topic, payload in messages]

    def _reject(self, reason: str, topic: str, detail: str) -> str:
        self.metrics.rejected.labels(reason).inc()
        logger.warning("rejected message on %s: %s (%s)", topic, reason, detail)
        return reason

    def _result(self, topic: str, payload: bytes, now: datetime) -> str | None:
        """Validate completely (``monitor.ingest``), then store; nothing is written for a
        rejected message, and nothing after the store can fail on what was stored."""
        verdict = self._ingest.check(topic, payload, now)
        if isinstance(verdict, Rejected):
            return self._reject(verdict.reason, topic, verdict.detail)
        result = verdict.result
        skew = None if verdict.duplicate else self.skew.observe(result.probe, result.finished_at, now)
        judged = judge(result.finished_at, now, skew)
        stored = not verdict.duplicate and self.store.add_result(
            result, now, judged_at=judged, clock_skew=skew, wire=verdict.wire
        )
        if not stored:
            self.metrics.duplicates.inc()
            logger.debug("duplicate result %s from %s", result.id, result.probe)
            return None
        if verdict.gap is not None:
            last, seq = verdict.gap
            self.delivery.gap(result.probe, last, seq, now)
        elif verdict.first and (health := self._outbox_health.get(result.probe)) is not None:
            # a probe's first result here need not be its lowest unconfirmed one (replicas
            # split its results: a lower seq may be at the other): what lies between the
            # probe's last ack (its status) and this seq is a gap, to fill or to replay
            self._head_gap(result.probe, health.confirmed_seq, result.seq, now)
        if verdict.new_last_seq is not None:
            self.store.set_last_seq(result.probe, verdict.new_last_seq)
        else:  # at or below the last seq: accepted only because it fills a gap
            self.delivery.filled(result.probe, result.seq, now)
        try:
            self.metrics.observe(result)
        except (ValueError, TypeError, OverflowError) as exc:  # validated: never, but never fatal
            logger.error("result %s stored but not counted in the metrics: %s", result.id, exc)
        self._track(replace(verdict.summary, judged_at=judged, clock_skew=skew), now)
        if self.store.shared:
            self._own.add(result.id)  # tracked now: _follow skips its row
        return None

    def _head_gap(self, probe: str, confirmed: int, seq: int, now: datetime) -> None:
        if seq > confirmed + 1:
            self.delivery.gap(probe, confirmed, seq, now)

    @cached_property
    def _statuses(self) -> StatusValidator:
        return StatusValidator(self.config, OrderMarks(self.store))

    def _status(self, topic: str, payload: bytes) -> str | None:
        """A probe's signed status (``monitor.status_ingest``): only a verified status that is
        newer than the last one accepted changes the probe's state or its coverage."""
        now = self.clock()
        verdict = self._statuses.check(topic, payload, now)
        if isinstance(verdict, Rejected):
            return self._reject(verdict.reason, topic, verdict.detail)
        status = verdict.status
        # the retained copy again, on a resubscribe; on a shared store it may be another
        # replica that stored it first: taken again here (every step of it is idempotent)
        if verdict.duplicate and (not self.store.shared or self._applied.get(status.probe) == status.order):
            logger.debug("status of %s seen already", status.probe)
            return None
        previous = self._probe_status.get(status.probe)
        stored = ProbeStatus(status.probe, status.online, now, status.version, status.targets)
        if status.online and (previous is None or not previous.online):
            # coverage counts from when the probe signed that it came online, not from when
            # the message arrived: an announcement delivered late covers nothing
            self._online_since[status.probe] = min(status.at, now)
        self._probe_status[status.probe] = stored
        self.store.set_probe_status(stored)
        self._statuses.record(status)
        self._applied[status.probe] = status.order
        if status.outbox is not None:
            self._outbox_health[status.probe] = status.outbox
            self.delivery.status(status.probe, status.outbox, now)
        if status.online:
            logger.info("probe %s is online (%d targets)", status.probe, len(status.targets))
        else:
            logger.info("probe %s is OFFLINE (%s)", status.probe, status.reason)
        return None

    # ------------------------------------------------------------ state and incidents

    def evaluate(self, now: datetime | None = None) -> Snapshot:
        """Recompute every target's state; record changes; open/resolve incidents; new snapshot."""
        now = now or self.clock()
        if self.store.shared:
            self._follow(now)
            self.delivery.follow(now)
        if not (self.evaluator and self._synced):  # another monitor may have recorded states
            self._sync_states()
        self._synced = self.evaluator
        open_by_key: OpenIncidents = {(i.target, i.kind): i for i in self.store.open_incidents()}
        views: dict[str, TargetView] = {}
        for target_id, tracker in self.trackers.items():
            verdict = self._verdict(target_id, tracker, now)
            standing = self._record(target_id, verdict, now)
            if self.evaluator:
                self._down_rule(open_by_key, tracker, verdict, now)
                self._gap_rule(open_by_key, tracker, standing, now)
            views[target_id] = self._target_view(tracker, verdict, standing, open_by_key)
        escalated = self.evaluator and self._escalate(now)
        self.store.commit()  # state changes and incidents together (pages commit with their incident)
        self._snapshot = Snapshot(
            at=now,
            targets=views,
            probes=self._probe_views(now),
            open_incidents=tuple(
                sorted(self.store.open_incidents() if escalated else open_by_key.values(), key=lambda i: i.id)
            ),
            services=service_views(self.config.services, views),
            timeline=self._timeline(now),
            max_clock_skew=self.config.ingest.max_clock_skew,
        )
        return self._snapshot

    def _verdict(self, target_id: str, tracker: TargetTracker, now: datetime) -> Verdict:
        """The tracker's verdict, expecting the probes that have been online for an interval;
        a silence the monitor itself caused (cut off from its broker) says so."""
        since_online = now - timedelta(seconds=tracker.target.interval)
        verdict = tracker.evaluate(now, self._expected(target_id, since_online))
        if verdict.state == "unknown" and self._cut_off is not None:
            verdict = replace(verdict, why=f"{self._cut_off}; {verdict.why}")
        return verdict

    def _sync_states(self) -> None:
        """Each target's state as recorded in the store (by the evaluating monitor)."""
        for target, (state, since) in self.store.latest_states().items():
            if target in self.trackers:
                known = self._states.get(target)
                self._states[target] = _Standing(state, since, known.why if known else "as recorded")

    def _record(self, target_id: str, verdict: Verdict, now: datetime) -> _Standing:
        """Store a change of state (since now); the standing keeps its ``since`` otherwise and
        always carries the latest reason. A monitor that does not evaluate records nothing:
        it shows a change (since now) until the evaluator's record of it arrives."""
        previous = self._states.get(target_id)
        since = now
        if previous is not None and previous.state == verdict.state:
            since = previous.since
        elif self.evaluator:
            self.store.add_state_change(target_id, verdict.state, now, verdict.why)
            if previous is not None:
                logger.info("target %s: %s → %s (%s)", target_id, previous.state, verdict.state, verdict.why)
        standing = _Standing(verdict.state, since, verdict.why)
        if self.evaluator:
            self._states[target_id] = standing
        return standing

    def _down_rule(
        self, open_by_key: OpenIncidents, tracker: TargetTracker, verdict: Verdict, now: datetime
    ) -> None:
        """Down opens a down incident; leaving down (up or degraded) resolves it, but only
        ``resolve_after`` out of down: a flapping path is one incident."""
        target_id = tracker.target.id
        down = open_by_key.get((target_id, "down"))
        if verdict.state == "down" and down is None:
            last_good, first_failed = tracker.failure_run()
            self._open(
                open_by_key, target_id, "down",
                at=now, last_good=last_good, first_failed=first_failed, why=verdict.why,
            )  # fmt: skip
        elif verdict.state in ("up", "degraded") and down is not None:
            left = self._left_down.setdefault(target_id, now)
            if (now - left).total_seconds() >= self.config.reachability.resolve_after:
                self._resolve(down, now)
                del open_by_key[(target_id, "down")]
                del self._left_down[target_id]
        if verdict.state == "down":
            self._left_down.pop(target_id, None)

    def _gap_rule(
        self, open_by_key: OpenIncidents, tracker: TargetTracker, standing: _Standing, now: datetime
    ) -> None:
        """A monitoring gap (unknown) longer than ``gap_incident_after`` opens a gap incident;
        any known state resolves it."""
        target_id = tracker.target.id
        gap = open_by_key.get((target_id, "gap"))
        if standing.state != "unknown":
            if gap is not None:
                self._resolve(gap, now)
                del open_by_key[(target_id, "gap")]
            return
        in_gap_for = (now - standing.since).total_seconds()
        if in_gap_for >= self.config.reachability.gap_incident_after and gap is None:
            self._open(
                open_by_key, target_id, "gap",
                at=now, last_good=tracker.last_success(), first_failed=None, why=standing.why,
            )  # fmt: skip

    @staticmethod
    def _target_view(
        tracker: TargetTracker, verdict: Verdict, standing: _Standing, open_by_key: OpenIncidents
    ) -> TargetView:
        target = tracker.target
        last_ok = tracker.last_success()
        latest: dict[tuple[str, str], ResultSummary] = {}  # (probe, check): newest first
        for r in tracker.recent():
            latest.setdefault((r.probe, r.check), r)
        current = open_by_key.get((target.id, "down")) or open_by_key.get((target.id, "gap"))
        return TargetView(
            id=target.id,
            description=target.description,
            interval=target.interval,
            state=standing.state,
            since=standing.since,
            why=standing.why,
            last_success_at=None if last_ok is None else last_ok.judged,
            covering_probes=verdict.covering_probes,
            latest=tuple(latest.values()),
            open_incident=None if current is None else current.id,
        )

    def _expected(self, target: str, since: datetime) -> frozenset[str]:
        """Probes online that announced ``target`` and came online (offline → online,
        not merely re-announced) after ``since``."""
        return frozenset(
            s.probe
            for s in self._probe_status.values()
            if s.online and target in s.targets and self._online_since.get(s.probe, since) > since
        )

    def _timeline(self, now: datetime) -> tuple[StateChange, ...]:
        """State changes of the last 24 h, each target starting with its state at the window's start."""
        start = now - TIMELINE
        baseline = [
            StateChange(target, state, start)
            for target in self.trackers
            if (state := self.store.state_before(target, start)) is not None
        ]
        return (*baseline, *self.store.state_changes(start))

    def _open(
        self,
        open_by_key: OpenIncidents,
        target: str,
        kind: IncidentKind,
        *,
        at: datetime,
        last_good: ResultSummary | None,
        first_failed: ResultSummary | None,
        why: str,
    ) -> None:
        opened = self.store.open_incident(
            target=target, kind=kind, at=at, last_good=last_good, first_failed=first_failed, summary=why
        )
        if opened is None:  # already open (the database allows one per target and kind)
            return
        duties = duties_at(self.config.duties_for(target, kind), opened.opened_at)
        if duties:
            self.store.add_duties(opened.id, duties)  # commits with the incident and its page
            opened = replace(opened, duties=duties)
        open_by_key[(target, kind)] = opened
        logger.error("INCIDENT %d opened: %s %s: %s", opened.id, target, kind, why)
        self.pager(opened, "trigger")

    def _escalate(self, now: datetime) -> bool:
        """Page the route of every duty unacknowledged at its escalation time, once
        (``monitor.duties``): marked escalated in the transaction of its page. True if any was."""
        escalated = False
        for incident_id, name in self.store.escalations_due(now):
            incident = self.store.incident(incident_id)
            duty = None if incident is None else next((d for d in incident.duties if d.name == name), None)
            if incident is None or duty is None or not self.store.mark_escalated(incident_id, name, now):
                continue
            logger.error("INCIDENT %d: duty %s unacknowledged, due %s: escalating", incident_id, name,
                         format_time(duty.due_at))  # fmt: skip
            self.escalator(incident, replace(duty, escalated_at=now))
            escalated = True
        return escalated

    def _resolve(self, incident: Incident, now: datetime) -> None:
        self.store.resolve_incident(incident.id, now)
        resolved = replace(incident, resolved_at=now)
        logger.info("INCIDENT %d resolved: %s %s", incident.id, incident.target, incident.kind)
        self.pager(resolved, "resolve")

    def _probe_views(self, now: datetime) -> dict[str, ProbeView]:
        stale = timedelta(seconds=self.config.reachability.probe_stale_after)
        views = {}
        for probe in self.config.probes:
            status = self._probe_status.get(probe.id)
            last = self._last_result_at.get(probe.id)
            skew = self.skew.estimate(probe.id, now)
            reporting = last is not None and now - last <= stale
            online = None if status is None else status.online
            views[probe.id] = ProbeView(
                id=probe.id,
                online=online,
                status_at=None if status is None else status.at,
                last_result_at=last,
                up=bool(online) and reporting,
                version=None if status is None else status.version,
                targets=() if status is None else status.targets,
                outbox=self._outbox_health.get(probe.id),
                outstanding=self.delivery.outstanding.get(probe.id, 0),
                clock_skew=skew,
                clock_skewed=skewed(skew, self.config.ingest.max_clock_skew),
            )
        return views
