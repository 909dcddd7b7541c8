"""The whole system for end-to-end tests: real mosquitto, responders, probes, monitor,
and an HTTP receiver standing in for a pager — every piece its own process, as deployed;
and ``start_monitor``, one ``ecpm monitor`` on a broker, for tests that bring their own pieces.

    with System(tmp_path) as system:
        system.add_responder("r1"); system.add_probe("p1", {"t1": "r1"}); system.start_monitor()
        system.wait_state("t1", "up")
"""

from __future__ import annotations

import contextlib
import copy
import json
import sqlite3
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from tests.support.brokers import Broker
from tests.support.monitor import ProbeSim, key_for
from tests.support.net import HOST, free_port
from tests.support.processes import Process, wait_for
from tests.support.sip import ResponderProcess


@dataclass(frozen=True)
class Delivery:
    at: float  # time.monotonic() on receipt
    path: str
    body: dict[str, Any]


class Receiver:
    """A real HTTP server that records every JSON body POSTed to it (a pager, a webhook).

    ``headers`` holds each request's headers (names in lower case), ``received_at`` its
    time.monotonic() on receipt and ``answered`` the status each got (None: never
    answered). ``hold(n)`` makes it keep the next ``n`` POSTs open, recorded but
    unanswered, until ``release()`` (or ``max_hold`` seconds), and then drop their
    connections without an answer: a page POST in flight that never completes, for tests
    that kill the monitor at that moment. Later POSTs are answered."""

    def __init__(self, *, max_hold: float = 60.0) -> None:
        self.bodies: list[dict[str, Any]] = []
        self.paths: list[str] = []
        self.headers: list[dict[str, str]] = []
        self.answered: list[int | None] = []
        self.received_at: list[float] = []
        self.statuses: list[int] = []  # answer these first, in order; then 200
        self._to_hold = 0
        self._release = threading.Event()
        self._release.set()
        received, paths, statuses = self.bodies, self.paths, self.statuses
        headers, answered, release = self.headers, self.answered, self._release
        receiver = self
        lock = self._lock = threading.Lock()

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                body = json.loads(self.rfile.read(length))
                with lock:
                    index = len(received)
                    headers.append({k.lower(): v for k, v in self.headers.items()})
                    answered.append(None)
                    receiver.received_at.append(time.monotonic())
                    paths.append(self.path)
                    received.append(body)
                    held = receiver._to_hold > 0
                    receiver._to_hold -= held
                if held:
                    release.wait(max_hold)
                    self.close_connection = True
                    return  # no answer at all
                status = statuses.pop(0) if statuses else 200
                try:
                    self.send_response(status)
                    self.end_headers()
                    self.wfile.write(b"ok" if status == 200 else b"nope")
                    self.wfile.flush()
                except OSError:
                    return
                answered[index] = status

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer((HOST, 0), Handler)
        self.base = f"http://{HOST}:{self.server.server_port}"
        self.url = f"{self.base}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def hold(self, count: int = 1) -> None:
        self._release.clear()
        self._to_hold = count

    def release(self) -> None:
        self._release.set()

    def events(self) -> list[tuple[str, int]]:
        return [(b["event"], b["incident"]["id"]) for b in self.bodies]

    def deliveries(self) -> list[Delivery]:
        with self._lock:
            return [
                Delivery(at, path, body)
                for at, path, body in zip(self.received_at, self.paths, self.bodies, strict=True)
            ]

    def close(self) -> None:
        self._release.set()
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self) -> Receiver:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class System:
    """Every piece as its own process. ``persistence`` and ``max_queued_messages`` shape the
    broker; ``notifier`` adds keys to the webhook notifier's config, ``monitor`` to the
    monitor's (top-level sections, e.g. ``{"ingest": {"shared_group": None}}``)."""

    def __init__(
        self,
        workdir: Path,
        *,
        interval: str = "2s",
        reachability: dict[str, Any] | None = None,
        persistence: bool = True,
        max_queued_messages: int = 0,
        notifier: dict[str, Any] | None = None,
        monitor: dict[str, Any] | None = None,
    ) -> None:
        self.workdir = workdir
        self.interval = interval
        self.reachability = {"resolve_after": "1s", **(reachability or {})}
        self.broker = Broker(workdir, persistence=persistence, max_queued_messages=max_queued_messages)
        self.receiver = Receiver()
        self.responders: dict[str, ResponderProcess] = {}
        self.probes: dict[str, Process] = {}
        self.sim_probes: list[str] = []  # known to the monitor, played by a test (ProbeSim)
        self.outboxes: dict[str, Path] = {}
        self.health: dict[str, str] = {}  # probe → host:port of its /metrics
        self.monitor: Process | None = None
        self.http = f"{HOST}:{free_port()}"
        self.targets: set[str] = set()
        self.token = "system-test-token"
        self.notifier = dict(notifier or {})
        self.monitor_sections = dict(monitor or {})

    def __enter__(self) -> System:
        self.broker.start()
        return self

    def __exit__(self, *exc: object | TracebackType | None) -> None:
        # every process is stopped by its pid, whatever else fails
        stops: list[Callable[[], object]] = [p.stop for p in self.probes.values()]
        if self.monitor is not None:
            stops.append(self.monitor.stop)
        stops += [r.stop for r in self.responders.values()]
        stops += [self.receiver.close, self.broker.stop]
        errors: list[BaseException] = []
        for stop in stops:
            try:
                stop()
            except Exception as error:  # keep stopping the others
                errors.append(error)
        if errors and exc[0] is None:
            raise errors[0]

    # ------------------------------------------------------------ pieces

    def add_responder(self, name: str) -> ResponderProcess:
        self.responders[name] = ResponderProcess()
        return self.responders[name]

    def probe_key(self, probe: str) -> str:
        return f"key-{probe}"

    def add_probe(
        self,
        probe: str,
        targets: dict[str, str],
        *,
        check: str = "invite",
        health: bool = False,
        outbox: Path | None = None,
        start: bool = True,
        target: Mapping[str, Any] | None = None,
    ) -> Process:
        """A probe checking each target (id → responder name) every ``interval``: real
        INVITE calls (``check="invite"``) or OPTIONS pings (``"options"``, cheaper).
        ``health`` serves the probe's own /metrics (``self.health[probe]``); ``outbox`` puts
        its outbox file elsewhere (e.g. on a small tmpfs). ``start=False``: started later by
        ``start_probes()`` (e.g. after the monitor, so that it sees every result from seq 1).
        ``target`` adds fields to every target (its ``checks`` to the checks above), e.g.
        the SIP account the calls are placed from."""
        self.targets.update(targets)
        self.outboxes[probe] = outbox or self.workdir / f"{probe}-outbox.db"
        checks: dict[str, Any] = (
            {"invite": {"interval": self.interval, "media_time": "500ms", "answer_timeout": "3s",
                        "first_response_timeout": "2s", "max_duration": "8s"}}
            if check == "invite"
            else {"options": {"interval": self.interval, "timeout": "2s"}}
        )  # fmt: skip
        extra = dict(target or {})  # copied into each target below
        checks.update(extra.pop("checks", {}))
        config: dict[str, Any] = {
            "kind": "probe",
            "probe": {"id": probe, "region": "GB", "key": self.probe_key(probe)},
            "mqtt": {"host": self.broker.host, "port": self.broker.port, "keepalive": "5s"},
            "outbox": {"path": str(self.outboxes[probe])},
            "schedule": {"jitter": 0.0},
            "targets": [
                {
                    "id": target,
                    "uri": self.responders[responder].uri,
                    "test_endpoint": True,
                    "min_spacing": "500ms",
                    "checks": copy.deepcopy(checks),  # no YAML aliases: the config loader refuses them
                    **copy.deepcopy(extra),
                }
                for target, responder in targets.items()
            ],
        }
        if health:
            self.health[probe] = f"{HOST}:{free_port()}"
            config["health"] = {"listen": self.health[probe]}
        self.probes[probe] = Process("probe", config, self.workdir, probe, start=start)
        return self.probes[probe]

    def start_probes(self) -> None:
        """Start every probe added with ``start=False`` (and not started since)."""
        for probe in self.probes.values():
            if probe.proc is None:
                probe.start()

    def add_sim_probe(self, probe: str, targets: list[str]) -> ProbeSim:
        """A probe the monitor knows (its key) whose results a test crafts and publishes."""
        self.targets.update(targets)
        self.sim_probes.append(probe)
        return ProbeSim(probe, key=self.probe_key(probe))

    def monitor_config(self) -> dict[str, Any]:
        probes = [*self.probes, *self.sim_probes]
        return {
            "kind": "monitor",
            "id": "m1",
            "mqtt": {"host": self.broker.host, "port": self.broker.port, "keepalive": "5s"},
            "store": {"path": str(self.workdir / "monitor.db"), "commit_interval": "100ms"},
            "http": {"listen": self.http, "token": self.token},
            "reachability": self.reachability,
            "probes": [{"id": p, "key": self.probe_key(p)} for p in probes] or [{"id": "none", "key": "x"}],
            "targets": [{"id": t, "interval": self.interval} for t in sorted(self.targets)],
            "notifiers": [
                {
                    "type": "webhook",
                    "name": "hook",
                    "url": self.receiver.url,
                    "backoff": "200ms",
                    **self.notifier,
                }
            ],
            **self.monitor_sections,
        }

    def start_monitor(self) -> Process:
        self.monitor = Process("monitor", self.monitor_config(), self.workdir, "monitor")
        self.wait_monitor()
        return self.monitor

    def wait_monitor(self, timeout: float = 20) -> None:
        """Until the monitor answers /healthz; fails at once (with its log) if it exits."""
        monitor = self.monitor
        assert monitor is not None

        def up() -> bool:
            if not monitor.running:
                code = monitor.proc and monitor.proc.returncode
                raise AssertionError(f"the monitor exited ({code}):\n{monitor.text()[-3000:]}")
            return self.get("/healthz") is not None

        self.wait_for(up, timeout, "the monitor's /healthz")

    # ------------------------------------------------------------ observing

    def get(self, path: str, base: str | None = None) -> bytes | None:
        try:
            with urllib.request.urlopen(f"http://{base or self.http}{path}", timeout=2) as resp:
                return bytes(resp.read())
        except OSError:
            return None

    def api(self, path: str) -> dict[str, Any]:
        body = self.get(path)
        assert body is not None, f"GET {path} failed"
        return dict(json.loads(body))

    def metrics(self, base: str | None = None) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
        """Every sample of the monitor's /metrics (or ``base``'s, e.g. a probe's health
        endpoint) by (sample name, labels); empty when it does not answer."""
        body = self.get("/metrics", base)
        if body is None:
            return {}
        return {
            (s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(body.decode())
            for s in family.samples
        }

    def metric(self, name: str, base: str | None = None, **labels: str) -> float | None:
        """One sample (``name`` as exposed, e.g. ``ecpm_results_missing_total``), or None."""
        return self.metrics(base).get((name, frozenset(labels.items())))

    def probe_metric(self, probe: str, name: str, **labels: str) -> float | None:
        """A sample of a probe's own /metrics (the probe was added with ``health=True``)."""
        return self.metric(name, self.health[probe], **labels)

    def stored(self) -> list[tuple[str, int, str]]:
        """(probe, seq, id) of every result row in the monitor's store (read with sqlite3)."""
        path = self.workdir / "monitor.db"
        if not path.exists():
            return []
        db = sqlite3.connect(path, timeout=10)
        try:
            return [(str(p), int(q), str(i)) for p, q, i in db.execute("SELECT probe, seq, id FROM results")]
        except sqlite3.OperationalError:  # not created yet
            return []
        finally:
            db.close()

    def outbox_numbers(self, probe: str) -> tuple[int, set[int]]:
        """What a stopped probe's outbox numbered (seq 1..N: returns N) and the seqs it still
        holds (not yet published, or not yet acknowledged by the monitor). The outbox is
        locked while its probe runs: stop the probe first."""
        assert not self.probes[probe].running, f"stop {probe} before reading its outbox"
        db = sqlite3.connect(self.outboxes[probe], timeout=10)
        try:
            last = int(db.execute("SELECT value FROM meta WHERE name = 'seq'").fetchone()[0])
            held = {int(row[0]) for row in db.execute("SELECT seq FROM outbox")}
        finally:
            db.close()
        return last, held

    def state(self, target: str) -> str | None:
        body = self.get("/api/v1/targets")
        if body is None:
            return None
        return next((t["state"] for t in json.loads(body)["targets"] if t["id"] == target), None)

    def wait_state(self, target: str, state: str, timeout: float = 40) -> float:
        """Wait until ``target`` is in ``state``; seconds it took."""
        started = time.monotonic()
        self.wait_for(lambda: self.state(target) == state, timeout, f"{target} to be {state}")
        return time.monotonic() - started

    wait_for = staticmethod(wait_for)  # system.wait_for(...) reads well in tests


class Monitor:
    """An ``ecpm monitor`` started by ``start_monitor``: its config and HTTP endpoints."""

    def __init__(self, proc: Process, config: dict[str, Any]) -> None:
        self.proc = proc
        self.config = config
        self.url = proc.url
        self.listen = config["http"]["listen"]

    def metrics_text(self) -> str:
        response = self.proc.get("/metrics")
        response.raise_for_status()
        return response.text

    def target_state(self, target: str) -> str | None:
        for t in self.proc.get("/api/v1/targets").json()["targets"]:
            if t["id"] == target:
                return str(t["state"])
        return None


@contextlib.contextmanager
def start_monitor(
    workdir: Path,
    broker: Broker,
    *,
    probes: Sequence[str] = ("p1",),
    targets: Sequence[str] = ("t1",),
    interval: str = "10s",
    keys: Mapping[str, str] | None = None,
    notifiers: Sequence[Mapping[str, Any]] = (),
    **sections: Any,
) -> Iterator[Monitor]:
    """``ecpm monitor -c <config>`` as a subprocess on loopback, once its HTTP answers;
    ``sections`` are more top-level keys of its config (e.g. ``services``)."""
    port = free_port()
    config: dict[str, Any] = {
        "kind": "monitor",
        "id": "test",
        "mqtt": {"host": broker.host, "port": broker.port},
        "store": {"path": str(workdir / "monitor.db")},
        "http": {"listen": f"{HOST}:{port}"},
        "probes": [{"id": p, "key": (keys or {}).get(p, key_for(p))} for p in probes],
        "targets": [{"id": t, "interval": interval} for t in targets],
        "notifiers": [dict(n) for n in notifiers],
        **sections,
    }
    proc = Process("monitor", config, workdir, "monitor", start=False, url=f"http://{HOST}:{port}")
    with proc.start():
        proc.ready("/healthz")
        yield Monitor(proc, config)
