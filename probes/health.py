"""The probe's own health endpoint: ``/metrics`` and ``/healthz`` (off unless configured).

``HealthSettings.listen`` (e.g. ``127.0.0.1:9469``) turns it on; keep it on loopback
unless a scraper elsewhere needs it. It is the shared HTTP server (``ecpm.http``) on a
thread and event loop of its own, so a scrape never waits for the agent's event loop
(and ``/healthz`` can say that loop has stalled), and uses its own ``CollectorRegistry``,
never the global one.

Metrics come from one custom collector that reads an immutable ``ProbeSnapshot``
taken at scrape time (``snapshot()`` is called from the HTTP thread; every stats
source it reads is thread-safe). Series, all prefixed ``ecpm_probe_``:

==============================================  =======  ===========================
name                                            type     labels
==============================================  =======  ===========================
ecpm_probe_info                                 gauge    probe, version
ecpm_probe_outbox_depth                         gauge
ecpm_probe_outbox_oldest_age_seconds            gauge    (0 when empty)
ecpm_probe_outbox_overflow_total                counter  results stored over the bound
ecpm_probe_outbox_lost_total                    counter  results that could not be stored
ecpm_probe_outbox_last_seq                      gauge
ecpm_probe_outbox_unconfirmed                   gauge    published, kept until the monitor's ack
ecpm_probe_outbox_confirmed_seq                 gauge    the monitor's last ack
ecpm_probe_outbox_evicted_total                 counter  kept results dropped over the bound unconfirmed
ecpm_probe_mqtt_acks_total                      counter  the monitor's verified acks
ecpm_probe_mqtt_replays_total                   counter  replay requests answered
ecpm_probe_mqtt_connected                       gauge    (1 connected, 0 not)
ecpm_probe_mqtt_published_total                 counter
ecpm_probe_mqtt_publish_errors_total            counter
ecpm_probe_mqtt_connection_failures_total       counter
ecpm_probe_commands_accepted_total              counter
ecpm_probe_commands_refused_total               counter  reason
ecpm_probe_checks_total                         counter  target, check, outcome
ecpm_probe_checks_in_flight                     gauge
ecpm_probe_checks_stuck                         gauge
ecpm_probe_check_hard_timeouts_total            counter
ecpm_probe_check_internal_errors_total          counter
ecpm_probe_result_handover_errors_total         counter
ecpm_probe_guard_refusals_total                 counter  reason
ecpm_probe_sip_workers                          gauge    configured SIP worker processes
ecpm_probe_sip_workers_up                       gauge    running and taking checks
ecpm_probe_sip_call_slots                       gauge    call slots of the running workers
ecpm_probe_sip_call_slots_busy                  gauge    checks in flight on workers
ecpm_probe_sip_worker_restarts_total            counter  workers started again after one died
ecpm_probe_sip_worker_lost_checks_total         counter  checks lost with their worker
ecpm_probe_loop_heartbeat_age_seconds           gauge
==============================================  =======  ===========================

``ecpm_probe_checks_total`` has every (target, check, outcome) of the current config
from the start (zeros), so a rate never starts from a missing series.

``/healthz`` answers 200 ``ok`` while the agent's event loop beats (``run_heartbeat``
ticks every second) and 503 when it has not beaten for ``stale_after`` seconds.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Final

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from ecpm import __version__
from ecpm.http import ListenError, ThreadedServer
from ecpm.settings import Listen
from probes.mqtt import Publisher, PublisherStats
from probes.outbox import Outbox, OutboxStats
from probes.scheduler import Scheduler, SchedulerStats
from probes.workers import WorkerPool, WorkerPoolStats

logger = logging.getLogger(__name__)

OUTCOMES: Final = ("pass", "fail", "inconclusive")
_NS: Final = "ecpm_probe"


class HealthError(ListenError):
    """The health endpoint cannot listen where configured."""


@dataclass(frozen=True, slots=True)
class ProbeSnapshot:
    probe: str
    version: str
    now: float  # Unix time the snapshot was taken
    heartbeat_age: float  # seconds since the event loop last beat
    outbox: OutboxStats | None = None
    mqtt: PublisherStats | None = None
    scheduler: SchedulerStats | None = None
    guard_refusals: Mapping[str, int] = field(default_factory=dict)
    workers: WorkerPoolStats | None = None


class ProbeCollector(Collector):
    """Yields the probe's metrics from ``snapshot()``; register it in your own registry."""

    def __init__(self, snapshot: Callable[[], ProbeSnapshot]) -> None:
        self._snapshot = snapshot

    def describe(self) -> Iterable[Metric]:
        return []  # collected at scrape time only: no call to snapshot() at registration

    def collect(self) -> Iterator[Metric]:
        s = self._snapshot()
        info = GaugeMetricFamily(f"{_NS}_info", "Probe identity.", labels=["probe", "version"])
        info.add_metric([s.probe, s.version], 1)
        yield info
        yield _gauge(
            "loop_heartbeat_age_seconds", "Seconds since the agent's event loop last beat.", s.heartbeat_age
        )
        if s.outbox is not None:
            o = s.outbox
            age = 0.0 if o.oldest_created is None else max(0.0, s.now - o.oldest_created)
            yield _gauge("outbox_depth", "Results stored and not yet acknowledged by the broker.", o.depth)
            yield _gauge(
                "outbox_oldest_age_seconds", "Age of the oldest unpublished result (0 when none).", age
            )
            yield _gauge("outbox_last_seq", "Last sequence number handed out.", o.last_seq)
            yield _counter(
                "outbox_overflow", "Results stored while the outbox was over its bound.", o.overflow_total
            )
            yield _counter(
                "outbox_lost", "Results that could not be stored (a seq gap follows).", o.lost_total
            )
            yield _gauge(
                "outbox_unconfirmed", "Published results kept until the monitor confirms them.", o.unconfirmed
            )
            yield _gauge(
                "outbox_confirmed_seq", "The monitor's last ack (results stored up to it).", o.confirmed_seq
            )
            yield _counter(
                "outbox_evicted",
                "Published results dropped over keep_unconfirmed/keep_for before the monitor confirmed them.",
                o.evicted_total,
            )
        if s.mqtt is not None:
            m = s.mqtt
            yield _gauge("mqtt_connected", "1 while connected to the MQTT broker.", 1 if m.connected else 0)
            yield _counter("mqtt_published", "Results acknowledged by the broker.", m.published_total)
            yield _counter("mqtt_publish_errors", "Result publishes that failed.", m.publish_errors_total)
            yield _counter("mqtt_acks", "Signed acks from the monitor (results it stored).", m.acks_total)
            yield _counter("mqtt_replays", "Replay requests from the monitor answered.", m.replays_total)
            yield _counter(
                "mqtt_connection_failures",
                "Failed attempts to connect to the broker.",
                m.connection_failures_total,
            )
            yield _counter(
                "commands_accepted", "On-demand check commands accepted.", m.commands_accepted_total
            )
            yield _by_reason(
                "commands_refused", "On-demand check commands refused.", m.commands_refused_total
            )
        if s.scheduler is not None:
            sch = s.scheduler
            checks = CounterMetricFamily(
                f"{_NS}_checks", "Checks run, by outcome.", labels=["target", "check", "outcome"]
            )
            counts = dict.fromkeys(
                ((t, k, o) for t, k in sch.configured for o in OUTCOMES),
                0,
            )
            counts.update(sch.checks_total)
            for (target, kind, outcome), n in sorted(counts.items()):
                checks.add_metric([target, kind, outcome], n)
            yield checks
            yield _gauge("checks_in_flight", "Checks running now.", sch.in_flight)
            yield _gauge("checks_stuck", "Checks still running after hard timeout and margin.", sch.stuck)
            yield _counter(
                "check_hard_timeouts", "Checks cut off at their hard timeout.", sch.hard_timeouts_total
            )
            yield _counter(
                "check_internal_errors",
                "Checks that raised (bugs), reported as failed.",
                sch.internal_errors_total,
            )
            yield _counter(
                "result_handover_errors", "Check results the outbox did not take.", sch.sink_errors_total
            )
        yield _by_reason(
            "guard_refusals", "Dial attempts refused by the live-number guard.", s.guard_refusals
        )
        if s.workers is not None:
            w = s.workers
            yield _gauge("sip_workers", "SIP worker processes configured.", w.workers)
            yield _gauge("sip_workers_up", "SIP worker processes running and taking checks.", w.up)
            yield _gauge("sip_call_slots", "Call slots of the running SIP workers.", w.slots)
            yield _gauge("sip_call_slots_busy", "Checks in flight on SIP workers.", w.busy)
            yield _counter(
                "sip_worker_restarts", "SIP workers started again after one died.", w.restarts_total
            )
            yield _counter(
                "sip_worker_lost_checks",
                "Checks lost with the SIP worker that ran them (reported as internal_error).",
                w.lost_checks_total,
            )


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(f"{_NS}_{name}", doc, value=value)


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(f"{_NS}_{name}", doc, value=value)


def _by_reason(name: str, doc: str, counts: Mapping[str, int]) -> CounterMetricFamily:
    family = CounterMetricFamily(f"{_NS}_{name}", doc, labels=["reason"])
    for reason, n in sorted(counts.items()):
        family.add_metric([reason], n)
    return family


class HealthServer:
    """``/metrics`` and ``/healthz`` on ``listen`` (``HOST:PORT``; port 0 picks one).

    Any of ``outbox``, ``publisher``, ``scheduler``, ``workers`` may be None (their series are then
    absent); ``guard_refusals`` returns refusals by reason (thread-safe, cheap).
    """

    def __init__(
        self,
        *,
        listen: Listen | str,
        probe: str,
        version: str = __version__,
        outbox: Outbox | None = None,
        publisher: Publisher | None = None,
        scheduler: Scheduler | None = None,
        guard_refusals: Callable[[], Mapping[str, int]] = dict,
        workers: WorkerPool | None = None,
        registry: CollectorRegistry | None = None,
        stale_after: float = 10.0,
    ) -> None:
        self._listen = Listen.parse(listen, any_port=True)
        self._probe = probe
        self._version = version
        self._outbox = outbox
        self._publisher = publisher
        self._scheduler = scheduler
        self._guard_refusals = guard_refusals
        self._workers = workers
        self._stale_after = stale_after
        self._beat = time.monotonic()
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=False)
        self.registry.register(ProbeCollector(self.snapshot))
        self._server = ThreadedServer(self._app(), self._listen, key="health.listen", error=HealthError)

    def snapshot(self) -> ProbeSnapshot:
        return ProbeSnapshot(
            probe=self._probe,
            version=self._version,
            now=time.time(),
            heartbeat_age=self.heartbeat_age(),
            outbox=None if self._outbox is None else self._outbox.stats(),
            mqtt=None if self._publisher is None else self._publisher.stats(),
            scheduler=None if self._scheduler is None else self._scheduler.stats(),
            guard_refusals=dict(self._guard_refusals()),
            workers=None if self._workers is None else self._workers.stats(),
        )

    # ------------------------------------------------------------ heartbeat

    def beat(self) -> None:
        self._beat = time.monotonic()

    def heartbeat_age(self) -> float:
        return max(0.0, time.monotonic() - self._beat)

    async def run_heartbeat(self, every: float = 1.0) -> None:
        """Beat from the event loop until cancelled (run it as a task of the agent)."""
        while True:
            self.beat()
            await asyncio.sleep(every)

    # ------------------------------------------------------------ HTTP

    def _app(self) -> Starlette:
        async def metrics(request: Request) -> Response:
            return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)

        async def healthz(request: Request) -> Response:
            age = self.heartbeat_age()
            if age <= self._stale_after:
                return PlainTextResponse("ok\n")
            return PlainTextResponse(f"event loop has not run for {age:.0f} s\n", status_code=503)

        async def not_found(request: Request, exc: Exception) -> Response:
            return PlainTextResponse("not found: try /metrics or /healthz\n", status_code=404)

        return Starlette(
            routes=[Route("/metrics", metrics, methods=["GET"]), Route("/healthz", healthz, methods=["GET"])],
            exception_handlers={404: not_found},
        )

    @property
    def port(self) -> int:
        return self._server.port

    def start(self) -> None:
        """Listen and serve; ``HealthError`` naming ``health.listen`` if it cannot."""
        url = self._server.start("ecpm-health")
        if not self._listen.loopback:
            logger.warning("health endpoint listens on %s, not loopback", self._listen.host)
        logger.info("health endpoint on %smetrics and /healthz", url)

    def stop(self) -> None:
        self._server.stop()
