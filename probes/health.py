"""The probe's own health endpoint: ``/metrics`` and ``/healthz`` (off unless configured).

``HealthSettings.listen`` (e.g. ``127.0.0.1:9469``) turns it on; keep it on loopback
unless a scraper elsewhere needs it. It serves from a small threaded WSGI server
(prometheus_client's ``ThreadingWSGIServer``) so a scrape never waits for the event
loop, and uses its own ``CollectorRegistry``, never the global one.

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
ecpm_probe_loop_heartbeat_age_seconds           gauge
==============================================  =======  ===========================

``ecpm_probe_checks_total`` has every (target, check, outcome) of the current config
from the start (zeros), so a rate never starts from a missing series.

``/healthz`` answers 200 ``ok`` while the agent's event loop beats (``run_heartbeat``
ticks every second) and 503 when it has not beaten for ``stale_after`` seconds.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Final
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import ThreadingWSGIServer
from prometheus_client.registry import Collector

from ecpm import __version__
from ecpm.errors import EcpmError
from probes.mqtt import Publisher, PublisherStats
from probes.outbox import Outbox, OutboxStats
from probes.scheduler import Scheduler, SchedulerStats

logger = logging.getLogger(__name__)

OUTCOMES: Final = ("pass", "fail", "inconclusive")
_NS: Final = "ecpm_probe"


class HealthError(EcpmError):
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


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(f"{_NS}_{name}", doc, value=value)


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(f"{_NS}_{name}", doc, value=value)


def _by_reason(name: str, doc: str, counts: Mapping[str, int]) -> CounterMetricFamily:
    family = CounterMetricFamily(f"{_NS}_{name}", doc, labels=["reason"])
    for reason, n in sorted(counts.items()):
        family.add_metric([reason], n)
    return family


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("health: " + format, *args)


class HealthServer:
    """``/metrics`` and ``/healthz`` on ``listen`` (``HOST:PORT``; port 0 picks one).

    Any of ``outbox``, ``publisher``, ``scheduler`` may be None (their series are then
    absent); ``guard_refusals`` returns refusals by reason (thread-safe, cheap).
    """

    def __init__(
        self,
        *,
        listen: str,
        probe: str,
        version: str = __version__,
        outbox: Outbox | None = None,
        publisher: Publisher | None = None,
        scheduler: Scheduler | None = None,
        guard_refusals: Callable[[], Mapping[str, int]] = dict,
        registry: CollectorRegistry | None = None,
        stale_after: float = 10.0,
    ) -> None:
        host, _, port = listen.rpartition(":")
        self._host = host.strip("[]")
        self._port = int(port)
        self._probe = probe
        self._version = version
        self._outbox = outbox
        self._publisher = publisher
        self._scheduler = scheduler
        self._guard_refusals = guard_refusals
        self._stale_after = stale_after
        self._beat = time.monotonic()
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=False)
        self.registry.register(ProbeCollector(self.snapshot))
        self._metrics_app = make_wsgi_app(self.registry)
        self._server: ThreadingWSGIServer | None = None
        self._thread: threading.Thread | None = None

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

    def _app(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "/")
        if path == "/metrics":
            return self._metrics_app(environ, start_response)  # type: ignore[no-any-return]
        if path == "/healthz":
            age = self.heartbeat_age()
            if age <= self._stale_after:
                start_response("200 OK", [("Content-Type", "text/plain; charset=utf-8")])
                return [b"ok\n"]
            start_response("503 Service Unavailable", [("Content-Type", "text/plain; charset=utf-8")])
            return [f"event loop has not run for {age:.0f} s\n".encode()]
        start_response("404 Not Found", [("Content-Type", "text/plain; charset=utf-8")])
        return [b"not found: try /metrics or /healthz\n"]

    @property
    def port(self) -> int:
        if self._server is None:
            return self._port
        return int(self._server.server_address[1])

    def start(self) -> None:
        family = socket.AF_INET6 if ":" in self._host else socket.AF_INET

        class Server(ThreadingWSGIServer):
            address_family = family

        try:
            server = make_server(self._host, self._port, self._app, Server, handler_class=_QuietHandler)
        except OSError as exc:
            raise HealthError(
                f"health.listen: cannot listen on {self._host}:{self._port}: {exc.strerror or exc}"
            ) from None
        if not ipaddress.ip_address(self._host).is_loopback:
            logger.warning("health endpoint listens on %s, not loopback", self._host)
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, name="ecpm-health", daemon=True)
        self._thread.start()
        logger.info("health endpoint on http://%s:%d/metrics and /healthz", self._host, self.port)

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if self._thread is not None:
            self._thread.join(5)
