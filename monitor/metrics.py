"""The monitor's Prometheus metrics. Their names are a contract: the alert rules and the
dashboard in ``deploy/`` use them, and ``tests/test_deploy.py`` checks that they match.

Sized for a Prometheus (docs/monitor.md "Metrics"; tests/test_metrics_budget.py): the
per-target and per-probe families are plain values rendered straight to text
(``Family``), because prometheus_client's per-sample objects alone cost more than a
scrape's budget at 1,000 targets; ``exposition`` renders a registry without ``_created``
series, and the web app runs it in a thread. "Latest per target/probe" state is read from
the current immutable ``Snapshot`` at scrape time. Call kinds' series exist from the
start, so an alert or a dashboard never waits for a first failure; another check kind's
appear with its first result for that target and probe. Everything lives in the registry
the caller passes in (never the global one).
"""

from __future__ import annotations

import functools
import gzip
import math
from collections.abc import Callable, Iterable, Sequence
from functools import lru_cache

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.core import Metric
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample

from monitor.ingest import MONITOR_REASONS
from monitor.model import TARGET_STATES, Snapshot
from monitor.status_ingest import STATUS_MONITOR_REASONS
from probes.result import CALL_KINDS, CHECK_KINDS, REJECT_REASONS, STAGES, Result
from probes.status import REJECT_REASONS as STATUS_REJECT_REASONS

NAMESPACE = "ecpm"
CHECKS = CHECK_KINDS  # the registry's kinds; ingest refuses any other (unknown_check)
OUTCOMES = ("pass", "fail", "inconclusive")
# the stages of calls whose quantiles the dashboard reads (post-dial delay, answer time)
# have buckets; every other stage's histogram is +Inf only: its mean, in 3 series
QUANTILE_STAGES = ("ringing", "answer")
# post-dial delay and answer time: from a loopback answer (~50 ms) to timer B (32 s)
STAGE_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
# every bounded reason a message can be rejected for: the results and status parsers' own,
# then the monitor's checks on each (monitor.ingest, monitor.status_ingest)
REJECT_LABELS = tuple(
    dict.fromkeys((*REJECT_REASONS, *STATUS_REJECT_REASONS, *MONITOR_REASONS, *STATUS_MONITOR_REASONS))
)
# the failing-stage label: a stage from the wire that is not one of STAGES counts as this
OTHER_STAGE = "other"
NOTIFY_OUTCOMES = ("sent", "retry", "failed")
REGISTER = "register"  # the check kind whose latest result per probe is ecpm_registration_up
REGISTERED = {"pass": 1.0, "fail": 0.0}

Key = tuple[str, ...]


def _num(value: float) -> str:
    if value - value == 0.0:  # finite: the common case first
        return repr(float(value))
    if math.isnan(value):
        return "NaN"
    return "+Inf" if value > 0 else "-Inf"


@lru_cache(maxsize=1 << 18)  # label sets are bounded: configured targets × probes × vocabularies
def _head(name: str, names: Key, values: Key) -> str:
    """``name{label="value",...} ``: a sample line up to its value."""
    if not values:
        return f"{name} "
    escaped = (v.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"") for v in values)
    return name + "{" + ",".join(f'{n}="{v}"' for n, v in zip(names, escaped, strict=True)) + "} "


class Family(Metric):
    """A counter or gauge family kept as label values → value, rendered to text by
    ``render``; ``samples`` (for registry readers such as ``get_sample_value``) is built
    only when read."""

    def __init__(self, name: str, documentation: str, typ: str, labels: Sequence[str] = ()) -> None:
        super().__init__(name, documentation, typ)
        self.label_names: Key = tuple(labels)
        self.values: dict[Key, float] = {}
        self.sample_name = f"{name}_total" if typ == "counter" else name

    @property
    def samples(self) -> list[Sample]:
        return [
            Sample(name, dict(zip(self.label_names, key, strict=True)), v) for name, key, v in self.rows()
        ]

    @samples.setter
    def samples(self, _: object) -> None:  # Metric.__init__ sets it; ours are derived
        pass

    def rows(self) -> Iterable[tuple[str, Key, float]]:
        # a copy: a scrape renders in a thread while the event loop adds series
        return ((self.sample_name, key, value) for key, value in list(self.values.items()))

    def render(self, out: list[str]) -> None:
        doc = self.documentation.replace("\\", r"\\").replace("\n", r"\n")
        out.append(f"# HELP {self.sample_name} {doc}\n# TYPE {self.sample_name} {self.type}\n")
        name, names = self.sample_name, self.label_names
        out.extend(f"{_head(name, names, key)}{_num(value)}\n" for key, value in list(self.values.items()))


class Histogram(Family):
    """A histogram family: per label set its bucket bounds, cumulative counts and sum.
    Each label set's entry is replaced whole, so a scrape in a thread reads a consistent one."""

    def __init__(self, name: str, documentation: str, labels: Sequence[str]) -> None:
        super().__init__(name, documentation, "histogram", (*labels, "le"))
        self.observed: dict[Key, tuple[tuple[float, ...], tuple[float, ...], float]] = {}
        self._rendered: dict[Key, tuple[str, ...]] = {}  # sample heads per label set, built once

    def start(self, key: Key, bounds: tuple[float, ...]) -> None:
        if key not in self.observed:
            self.observed[key] = ((*bounds, math.inf), (0.0,) * (len(bounds) + 1), 0.0)

    def observe(self, key: Key, value: float, bounds: tuple[float, ...]) -> None:
        self.start(key, bounds)
        les, counts, total = self.observed[key]
        self.observed[key] = (
            les,
            tuple(c + (value <= le) for c, le in zip(counts, les, strict=True)),
            total + value,
        )

    def rows(self) -> Iterable[tuple[str, Key, float]]:
        name = self.name
        for key, (les, counts, total) in list(self.observed.items()):
            for le, count in zip(les, counts, strict=True):
                yield f"{name}_bucket", (*key, _num(le)), count
            yield f"{name}_count", key, counts[-1]
            yield f"{name}_sum", key, total

    @property
    def samples(self) -> list[Sample]:
        names, short = self.label_names, self.label_names[:-1]
        return [
            Sample(n, dict(zip(names if n.endswith("_bucket") else short, key, strict=True)), v)
            for n, key, v in self.rows()
        ]

    @samples.setter
    def samples(self, _: object) -> None:
        pass

    def _heads(self, key: Key, les: tuple[float, ...]) -> tuple[str, ...]:
        """A label set's sample lines up to their values: its buckets, then count and sum."""
        heads = self._rendered.get(key)  # a label set's bounds never change (``start``)
        if heads is None:
            name, names, short = self.name, self.label_names, self.label_names[:-1]
            heads = (
                *(_head(f"{name}_bucket", names, (*key, _num(le))) for le in les),
                _head(f"{name}_count", short, key),
                _head(f"{name}_sum", short, key),
            )
            self._rendered[key] = heads
        return heads

    def render(self, out: list[str]) -> None:
        doc = self.documentation.replace("\\", r"\\").replace("\n", r"\n")
        out.append(f"# HELP {self.name} {doc}\n# TYPE {self.name} histogram\n")
        for key, (les, counts, total) in list(self.observed.items()):
            heads = self._heads(key, les)
            out.extend(f"{h}{_num(v)}\n" for h, v in zip(heads, (*counts, counts[-1], total), strict=True))


class _Families(Collector):
    def __init__(self, families: Callable[[], Iterable[Metric]]) -> None:
        self._families = families

    def collect(self) -> Iterable[Metric]:
        return self._families()


def state_families(snap: Snapshot) -> list[Family]:
    """Gauges (and the probes' own counters) read from the current snapshot."""
    up = Family(f"{NAMESPACE}_target_up", "1 reachable, 0 down (confirmed), NaN unknown", "gauge", ["target"])
    state = Family(
        f"{NAMESPACE}_target_state", "Reachability state of a target, one-hot", "gauge", ["target", "state"]
    )
    last_ok = Family(
        f"{NAMESPACE}_last_success_timestamp_seconds",
        "Unix time of the target's last passing call",
        "gauge",
        ["target"],
    )
    incidents = Family(f"{NAMESPACE}_incidents_open", "Open incidents for a target", "gauge", ["target"])
    mos = Family(
        f"{NAMESPACE}_media_mos", "E-model MOS estimate of the latest call", "gauge", ["target", "probe"]
    )
    registration = Family(
        f"{NAMESPACE}_registration_up",
        "1 when the latest register check of the target's account passed, 0 when it failed"
        " (NaN: inconclusive); only for targets that run a register check",
        "gauge",
        ["target", "probe"],
    )
    open_by_target: dict[str, int] = {}
    for incident in snap.open_incidents:
        open_by_target[incident.target] = open_by_target.get(incident.target, 0) + 1
    for view in snap.targets.values():
        target = (view.id,)
        up.values[target] = {"up": 1.0, "degraded": 1.0, "down": 0.0}.get(view.state, math.nan)
        for name in TARGET_STATES:
            state.values[(view.id, name)] = 1.0 if view.state == name else 0.0
        if view.last_success_at is not None:
            last_ok.values[target] = view.last_success_at.timestamp()
        incidents.values[target] = float(open_by_target.get(view.id, 0))
        for r in view.latest:
            if r.check in CALL_KINDS and r.mos is not None and (view.id, r.probe) not in mos.values:
                mos.values[(view.id, r.probe)] = r.mos
            if r.check == REGISTER and (view.id, r.probe) not in registration.values:
                registration.values[(view.id, r.probe)] = REGISTERED.get(r.outcome, math.nan)
    probe_up = Family(
        f"{NAMESPACE}_probe_up", "1 when the probe is online and reporting on time", "gauge", ["probe"]
    )
    skew = Family(
        f"{NAMESPACE}_probe_clock_skew_seconds",
        "Estimated clock skew of the probe (probe minus monitor, > 0 ahead), NaN until known",
        "gauge",
        ["probe"],
    )
    outstanding = Family(
        f"{NAMESPACE}_results_outstanding",
        "Results found missing from a probe and neither repaired (replayed) nor known gone",
        "gauge",
        ["probe"],
    )
    outbox = Family(
        f"{NAMESPACE}_probe_outbox_results",
        "Results in the probe's outbox as its latest status reported: unpublished (not yet"
        " acknowledged by the broker), unconfirmed (published, kept until the monitor's ack)",
        "gauge",
        ["probe", "state"],
    )
    outbox_error = Family(
        f"{NAMESPACE}_probe_outbox_error",
        "1 while the probe reports that it cannot store results (e.g. a full disk)",
        "gauge",
        ["probe"],
    )
    lost = Family(
        f"{NAMESPACE}_probe_results_lost",
        "Results the probe could not store, as it reports them (since it started): unrecoverable",
        "counter",
        ["probe"],
    )
    evicted = Family(
        f"{NAMESPACE}_probe_outbox_evicted",
        "Published results the probe dropped over its keep bounds before the monitor's ack",
        "counter",
        ["probe"],
    )
    for probe in snap.probes.values():
        key = (probe.id,)
        probe_up.values[key] = 1.0 if probe.up else 0.0
        outstanding.values[key] = float(probe.outstanding)
        # every probe has these series from the start: NaN (gauges) and 0 (counters)
        # until its first status with outbox health
        h = probe.outbox
        outbox.values[(probe.id, "unpublished")] = math.nan if h is None else float(h.unpublished)
        outbox.values[(probe.id, "unconfirmed")] = math.nan if h is None else float(h.unconfirmed)
        outbox_error.values[key] = math.nan if h is None else float(h.error is not None)
        lost.values[key] = 0.0 if h is None else float(h.lost)
        evicted.values[key] = 0.0 if h is None else float(h.evicted)
        skew.values[key] = math.nan if probe.clock_skew is None else probe.clock_skew
    return [
        up,
        state,
        last_ok,
        incidents,
        *service_families(snap),
        mos,
        registration,
        probe_up,
        skew,
        outstanding,
        outbox,
        outbox_error,
        lost,
        evicted,
    ]


def service_families(snap: Snapshot) -> list[Family]:
    """Each service's state (``monitor.redundancy``): one-hot, and whether a path is lost."""
    state = Family(
        f"{NAMESPACE}_service_state",
        "State of a service of redundant paths, one-hot (degraded: available, a path lost)",
        "gauge",
        ["service", "state"],
    )
    lost = Family(
        f"{NAMESPACE}_service_redundancy_lost",
        "1 while some path (primary or backup) of the service is down or unknown",
        "gauge",
        ["service"],
    )
    paths = Family(
        f"{NAMESPACE}_service_paths_lost", "Paths of the service down or unknown", "gauge", ["service"]
    )
    for view in snap.services.values():
        for name in TARGET_STATES:
            state.values[(view.id, name)] = 1.0 if view.state == name else 0.0
        lost.values[(view.id,)] = 1.0 if view.redundancy_lost else 0.0
        paths.values[(view.id,)] = float(sum(p.lost for p in view.paths))
    return [state, lost, paths]


class MonitorMetrics:
    """Counters and histograms the ingest path updates, plus the snapshot's families."""

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
        self._probes = tuple(probes)
        # labels: target and probe (which path, seen from where) × check × outcome; the
        # failing stage only on failures; the timings per target (the probes agree on them)
        self.checks = Family(
            f"{NAMESPACE}_checks",
            "Results received, by outcome",
            "counter",
            ["target", "probe", "check", "outcome"],
        )
        self.failures = Family(
            f"{NAMESPACE}_check_failures",
            "Failed checks by the stage that failed",
            "counter",
            ["target", "probe", "check", "stage"],
        )
        self.stage_seconds = Histogram(
            f"{NAMESPACE}_check_stage_seconds",
            "Time spent in each stage of a check (post-dial delay: stage=ringing); buckets for"
            " calls' ringing and answer, +Inf only (a mean) for other stages",
            ["target", "check", "stage"],
        )
        quarantine = Family(
            f"{NAMESPACE}_results_quarantined",
            "Stored results found unreadable and skipped by every reader (each row once)",
            "counter",
        )

        def families() -> list[Metric]:
            quarantine.values[()] = float(quarantined())
            return [self.checks, self.failures, self.stage_seconds, *state_families(snapshot()), quarantine]

        registry.register(_Families(families))
        # few series each (per reason, probe or notifier): ordinary prometheus_client metrics
        counter = functools.partial(Counter, namespace=NAMESPACE, registry=registry)
        gauge = functools.partial(Gauge, namespace=NAMESPACE, registry=registry)
        self.rejected = counter("results_rejected", "Messages refused by ingest, by reason", ["reason"])
        self.missing = counter(
            "results_missing", "Results never received: gaps in a probe's sequence numbers", ["probe"]
        )
        self.repaired = counter(
            "results_repaired",
            "Missing results received later (replayed from the probe's outbox): a gap repaired",
            ["probe"],
        )
        self.unrecoverable = counter(
            "results_unrecoverable",
            "Missing results the probe no longer has (never stored, or evicted unconfirmed)",
            ["probe"],
        )
        self.duplicates = counter(
            "results_duplicate", "Results received again (QoS 1 redelivery), stored once"
        )
        self.notifications = counter(
            "notifications", "Pages sent by the monitor's own notifiers", ["notifier", "outcome"]
        )
        self.max_clock_skew = gauge(
            "ingest_max_clock_skew_seconds",
            "ingest.max_clock_skew: a probe clock skew beyond this is alerted on (EcpmProbeClockSkew)",
        )
        self.max_clock_skew.set(max_clock_skew)
        # the monitor's own broker connection (set by the service): when it is cut off, every
        # target goes unknown for a reason that is not the probes'
        self.mqtt_connected = gauge(
            "monitor_mqtt_connected",
            "1 while the monitor is connected to its MQTT broker and subscribed, else 0",
        )
        self.mqtt_last_message = gauge(
            "monitor_mqtt_last_message_timestamp_seconds",
            "Unix time of the last MQTT message the monitor received (0: none since it started)",
        )
        # the store's connection and, with replicas, which monitor evaluates (docs/scaling.md)
        self.store_up = gauge(
            "monitor_store_up", "1 while the monitor's store answers, 0 while it reconnects (PostgreSQL)"
        )
        self.store_up.set(1.0)
        self.store_reconnects = counter(
            "monitor_store_reconnects", "Times the monitor reopened its store after losing the connection"
        )
        self.evaluator = gauge(
            "monitor_evaluator",
            "1 on the monitor that evaluates reachability, opens incidents and asks for replays"
            " (one per store), 0 on its replicas",
        )
        for reason in REJECT_LABELS:
            self.rejected.labels(reason)
        for probe in probes:
            self.missing.labels(probe)
            self.repaired.labels(probe)
            self.unrecoverable.labels(probe)
            for target in targets:
                for check in CALL_KINDS:
                    self._start(target, probe, check)
        for target in targets:
            for check in CALL_KINDS:
                for stage in STAGES:
                    self.stage_seconds.start((target, check, stage), _bounds(check, stage))
        for notifier in notifiers:
            for outcome in NOTIFY_OUTCOMES:
                self.notifications.labels(notifier, outcome)

    def _start(self, target: str, probe: str, check: str) -> None:
        for outcome in OUTCOMES:
            self.checks.values[(target, probe, check, outcome)] = 0.0
        for stage in (*STAGES, OTHER_STAGE):
            self.failures.values[(target, probe, check, stage)] = 0.0

    def observe(self, result: Result) -> None:
        """One accepted result (its target, probe and check are configured and known)."""
        key = (result.target, result.probe, result.check, result.outcome)
        if key not in self.checks.values:  # a check kind's first result for this target and probe
            self._start(result.target, result.probe, result.check)
        self.checks.values[key] += 1.0
        if result.outcome == "fail":
            stage = result.stage if result.stage in STAGES else OTHER_STAGE  # bounded labels
            self.failures.values[(result.target, result.probe, result.check, stage)] += 1.0
        for stage, seconds in result.timings.items():
            if stage in STAGES:  # bounded labels: a stage name from the wire is not trusted blindly
                bounds = _bounds(result.check, stage)
                self.stage_seconds.observe((result.target, result.check, stage), seconds, bounds)


def _bounds(check: str, stage: str) -> tuple[float, ...]:
    return STAGE_BUCKETS if check in CALL_KINDS and stage in QUANTILE_STAGES else ()


class _One(Collector):
    def __init__(self, metric: Metric) -> None:
        self._metric = metric

    def collect(self) -> Iterable[Metric]:
        yield self._metric


def exposition(registry: Collector, *, compress: bool = False) -> bytes:
    """The registry in Prometheus' text format, without ``_created`` series (a start time
    per label set doubles the series and no rule reads them): ``Family`` straight from its
    values, any other metric through prometheus_client. Safe to run in a thread."""
    out: list[str] = []
    for metric in registry.collect():
        if isinstance(metric, Family):
            metric.render(out)
        else:
            metric.samples = [s for s in metric.samples if not s.name.endswith("_created")]
            out.append(generate_latest(_One(metric)).decode())
    body = "".join(out).encode()
    return gzip.compress(body, compresslevel=1) if compress else body
