"""The monitor's Prometheus metrics. Their names are a contract: the alert rules and the
dashboard in ``deploy/`` use them, and ``tests/test_deploy.py`` checks that they match.

State that is "latest per target/probe" comes from a custom collector over the
current immutable ``Snapshot``; event counts and stage timings are ordinary
counters and histograms. Everything lives in the registry the caller passes in
(never the global one), and every configured target and probe has its series
from the start, so a dashboard or alert never waits for a first failure.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from monitor.ingest import MONITOR_REASONS
from monitor.model import TARGET_STATES, Snapshot
from monitor.status_ingest import STATUS_MONITOR_REASONS
from probes.result import CALL_KINDS, CHECK_KINDS, REJECT_REASONS, STAGES, Result
from probes.status import REJECT_REASONS as STATUS_REJECT_REASONS

NAMESPACE = "ecpm"
CHECKS = CHECK_KINDS  # the registry's kinds; ingest refuses any other (unknown_check)
OUTCOMES = ("pass", "fail", "inconclusive")
# SIP stages span a loopback INVITE (~1 ms) to timer B (32 s)
STAGE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 3, 5, 10, 20, 30)
# every bounded reason a message can be rejected for: the results and status parsers' own,
# then the monitor's checks on each (monitor.ingest, monitor.status_ingest)
REJECT_LABELS = tuple(
    dict.fromkeys((*REJECT_REASONS, *STATUS_REJECT_REASONS, *MONITOR_REASONS, *STATUS_MONITOR_REASONS))
)
# the failing-stage label: a stage from the wire that is not one of STAGES counts as this
OTHER_STAGE = "other"
NOTIFY_OUTCOMES = ("sent", "retry", "failed")


class StateCollector(Collector):
    """Gauges read from the current snapshot at scrape time."""

    def __init__(self, snapshot: Callable[[], Snapshot]) -> None:
        self._snapshot = snapshot

    def collect(self) -> Iterable[Metric]:
        snap = self._snapshot()
        up = GaugeMetricFamily(
            f"{NAMESPACE}_target_up", "1 reachable, 0 down (confirmed), NaN unknown", labels=["target"]
        )
        state = GaugeMetricFamily(
            f"{NAMESPACE}_target_state", "Reachability state of a target, one-hot", labels=["target", "state"]
        )
        last_ok = GaugeMetricFamily(
            f"{NAMESPACE}_last_success_timestamp_seconds",
            "Unix time of the target's last passing call",
            labels=["target"],
        )
        incidents = GaugeMetricFamily(
            f"{NAMESPACE}_incidents_open", "Open incidents for a target", labels=["target"]
        )
        mos = GaugeMetricFamily(
            f"{NAMESPACE}_media_mos", "E-model MOS estimate of the latest call", labels=["target", "probe"]
        )
        probe_up = GaugeMetricFamily(
            f"{NAMESPACE}_probe_up", "1 when the probe is online and reporting on time", labels=["probe"]
        )
        skew = GaugeMetricFamily(
            f"{NAMESPACE}_probe_clock_skew_seconds",
            "Estimated clock skew of the probe (probe minus monitor, > 0 ahead), NaN until known",
            labels=["probe"],
        )
        open_by_target: dict[str, int] = {}
        for incident in snap.open_incidents:
            open_by_target[incident.target] = open_by_target.get(incident.target, 0) + 1
        for view in snap.targets.values():
            value = {"up": 1.0, "degraded": 1.0, "down": 0.0}.get(view.state, math.nan)
            up.add_metric([view.id], value)
            for name in TARGET_STATES:
                state.add_metric([view.id, name], 1.0 if view.state == name else 0.0)
            if view.last_success_at is not None:
                last_ok.add_metric([view.id], view.last_success_at.timestamp())
            incidents.add_metric([view.id], float(open_by_target.get(view.id, 0)))
            seen: set[str] = set()
            for r in view.latest:
                if r.check in CALL_KINDS and r.probe not in seen and r.mos is not None:
                    seen.add(r.probe)
                    mos.add_metric([view.id, r.probe], r.mos)
        outstanding = GaugeMetricFamily(
            f"{NAMESPACE}_results_outstanding",
            "Results found missing from a probe and neither repaired (replayed) nor known gone",
            labels=["probe"],
        )
        outbox = GaugeMetricFamily(
            f"{NAMESPACE}_probe_outbox_results",
            "Results in the probe's outbox as its latest status reported: unpublished (not yet"
            " acknowledged by the broker), unconfirmed (published, kept until the monitor's ack)",
            labels=["probe", "state"],
        )
        outbox_error = GaugeMetricFamily(
            f"{NAMESPACE}_probe_outbox_error",
            "1 while the probe reports that it cannot store results (e.g. a full disk)",
            labels=["probe"],
        )
        lost = CounterMetricFamily(
            f"{NAMESPACE}_probe_results_lost",
            "Results the probe could not store, as it reports them (since it started): unrecoverable",
            labels=["probe"],
        )
        evicted = CounterMetricFamily(
            f"{NAMESPACE}_probe_outbox_evicted",
            "Published results the probe dropped over its keep bounds before the monitor's ack",
            labels=["probe"],
        )
        for probe in snap.probes.values():
            probe_up.add_metric([probe.id], 1.0 if probe.up else 0.0)
            outstanding.add_metric([probe.id], float(probe.outstanding))
            # every probe has these series from the start: NaN (gauges) and 0 (counters)
            # until its first status with outbox health
            h = probe.outbox
            outbox.add_metric([probe.id, "unpublished"], math.nan if h is None else float(h.unpublished))
            outbox.add_metric([probe.id, "unconfirmed"], math.nan if h is None else float(h.unconfirmed))
            outbox_error.add_metric([probe.id], math.nan if h is None else float(h.error is not None))
            lost.add_metric([probe.id], 0.0 if h is None else float(h.lost))
            evicted.add_metric([probe.id], 0.0 if h is None else float(h.evicted))
            skew.add_metric([probe.id], math.nan if probe.clock_skew is None else probe.clock_skew)
        yield from (up, state, last_ok, incidents, mos, probe_up, skew)
        yield from (outstanding, outbox, outbox_error, lost, evicted)


class QuarantineCollector(Collector):
    """``ecpm_results_quarantined_total``: stored rows found unreadable and skipped."""

    def __init__(self, count: Callable[[], int]) -> None:
        self._count = count

    def collect(self) -> Iterable[Metric]:
        yield CounterMetricFamily(
            f"{NAMESPACE}_results_quarantined",
            "Stored results found unreadable and skipped by every reader (each row once)",
            value=float(self._count()),
        )


class MonitorMetrics:
    """Counters and histograms the ingest path updates, plus the snapshot collector."""

    def __init__(
        self,
        registry: CollectorRegistry,
        *,
        targets: Sequence[str],
        probes: Sequence[str],
        notifiers: Sequence[str],
        snapshot: Callable[[], Snapshot],
        quarantined: Callable[[], int] = lambda: 0,
        max_clock_skew: float = 30.0,
    ) -> None:
        self.checks = Counter(
            "checks",
            "Results received, by outcome",
            ["target", "probe", "check", "outcome"],
            namespace=NAMESPACE,
            registry=registry,
        )
        self.failures = Counter(
            "check_failures",
            "Failed checks by the stage that failed",
            ["target", "probe", "check", "stage"],
            namespace=NAMESPACE,
            registry=registry,
        )
        self.stage_seconds = Histogram(
            "check_stage_seconds",
            "Time spent in each stage of a check (post-dial delay: stage=ringing)",
            ["target", "check", "stage"],
            namespace=NAMESPACE,
            registry=registry,
            buckets=STAGE_BUCKETS,
        )
        self.rejected = Counter(
            "results_rejected",
            "Messages refused by ingest, by reason",
            ["reason"],
            namespace=NAMESPACE,
            registry=registry,
        )
        self.missing = Counter(
            "results_missing",
            "Results never received: gaps in a probe's sequence numbers",
            ["probe"],
            namespace=NAMESPACE,
            registry=registry,
        )
        self.repaired = Counter(
            "results_repaired",
            "Missing results received later (replayed from the probe's outbox): a gap repaired",
            ["probe"],
            namespace=NAMESPACE,
            registry=registry,
        )
        self.unrecoverable = Counter(
            "results_unrecoverable",
            "Missing results the probe no longer has (never stored, or evicted unconfirmed)",
            ["probe"],
            namespace=NAMESPACE,
            registry=registry,
        )
        self.duplicates = Counter(
            "results_duplicate",
            "Results received again (QoS 1 redelivery), stored once",
            namespace=NAMESPACE,
            registry=registry,
        )
        self.notifications = Counter(
            "notifications",
            "Pages sent by the monitor's own notifiers",
            ["notifier", "outcome"],
            namespace=NAMESPACE,
            registry=registry,
        )
        self.max_clock_skew = Gauge(
            "ingest_max_clock_skew_seconds",
            "ingest.max_clock_skew: a probe clock skew beyond this is alerted on (EcpmProbeClockSkew)",
            namespace=NAMESPACE,
            registry=registry,
        )
        self.max_clock_skew.set(max_clock_skew)
        # the monitor's own broker connection (set by the service): when it is cut off, every
        # target goes unknown for a reason that is not the probes'
        self.mqtt_connected = Gauge(
            "monitor_mqtt_connected",
            "1 while the monitor is connected to its MQTT broker and subscribed, else 0",
            namespace=NAMESPACE,
            registry=registry,
        )
        self.mqtt_last_message = Gauge(
            "monitor_mqtt_last_message_timestamp_seconds",
            "Unix time of the last MQTT message the monitor received (0: none since it started)",
            namespace=NAMESPACE,
            registry=registry,
        )
        registry.register(StateCollector(snapshot))
        registry.register(QuarantineCollector(quarantined))
        for reason in REJECT_LABELS:
            self.rejected.labels(reason)
        for probe in probes:
            self.missing.labels(probe)
            self.repaired.labels(probe)
            self.unrecoverable.labels(probe)
            for target in targets:
                for check in CHECKS:
                    for outcome in OUTCOMES:
                        self.checks.labels(target, probe, check, outcome)
                    for stage in (*STAGES, OTHER_STAGE):
                        self.failures.labels(target, probe, check, stage)
        for target in targets:
            for check in CHECKS:
                for stage in STAGES:
                    self.stage_seconds.labels(target, check, stage)
        for notifier in notifiers:
            for outcome in NOTIFY_OUTCOMES:
                self.notifications.labels(notifier, outcome)

    def observe(self, result: Result) -> None:
        self.checks.labels(result.target, result.probe, result.check, result.outcome).inc()
        if result.outcome == "fail":
            stage = result.stage if result.stage in STAGES else OTHER_STAGE  # bounded labels
            self.failures.labels(result.target, result.probe, result.check, stage).inc()
        for stage, seconds in result.timings.items():
            if stage in STAGES:  # bounded labels: a stage name from the wire is not trusted blindly
                self.stage_seconds.labels(result.target, result.check, stage).observe(seconds)
