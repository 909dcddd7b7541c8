"""The whole system for end-to-end tests: real mosquitto, responders, probes, monitor,
and an HTTP receiver standing in for a pager — every piece its own process, as deployed.

    with System(tmp_path) as system:
        system.add_responder("r1"); system.add_probe("p1", {"t1": "r1"}); system.start_monitor()
        system.wait_state("t1", "up")
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any

import yaml

from tests.brokers import Broker
from tests.test_sip_helpers import REPO, ResponderProcess, free_port

HOST = "127.0.0.1"


def run_ecpm(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """``ecpm ARGS`` as a user runs it, from the repository; ``timeout`` is a safety net."""
    return subprocess.run(
        [sys.executable, "-m", "ecpm", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll ``condition`` until it holds; fail the test naming ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


class Receiver:
    """A real HTTP server that records every JSON body POSTed to it, and its headers.

    While ``hold`` is cleared, a request is recorded but not answered until it is set
    (a POST in flight when its sender dies)."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []
        self.paths: list[str] = []
        self.headers: list[dict[str, str]] = []
        self.statuses: list[int] = []  # answer these first, in order; then 200
        self.hold = threading.Event()
        self.hold.set()
        received, paths, headers, statuses, hold = (
            self.bodies,
            self.paths,
            self.headers,
            self.statuses,
            self.hold,
        )

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                body = json.loads(self.rfile.read(length))
                headers.append({k.lower(): v for k, v in self.headers.items()})  # names: lower case
                received.append(body)
                paths.append(self.path)
                hold.wait(30)
                status = statuses.pop(0) if statuses else 200
                self.send_response(status)
                self.end_headers()
                self.wfile.write(b"ok" if status == 200 else b"nope")

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer((HOST, 0), Handler)
        self.base = f"http://{HOST}:{self.server.server_port}"
        self.url = f"{self.base}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def events(self) -> list[tuple[str, int]]:
        return [(b["event"], b["incident"]["id"]) for b in self.bodies]

    def close(self) -> None:
        self.hold.set()
        self.server.shutdown()
        self.server.server_close()


class Process:
    """``python -m ecpm <role> -c <config>`` with its output in a log file."""

    def __init__(self, role: str, config: dict[str, Any], workdir: Path, name: str) -> None:
        self.role, self.name = role, name
        self.config_path = workdir / f"{name}.yaml"
        self.write(config)
        self.log_path = workdir / f"{name}.log"
        self.start()

    def write(self, config: dict[str, Any] | str) -> None:
        """(Re)write the config file; a str is written as it is (e.g. a broken file)."""
        text = config if isinstance(config, str) else yaml.safe_dump(config)
        self.config_path.write_text(text, encoding="utf-8")

    def start(self) -> None:
        self._log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ecpm", self.role, "-c", str(self.config_path)],
            cwd=REPO, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )  # fmt: skip

    def text(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            code = self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        self._log.close()
        return code


class System:
    def __init__(
        self, workdir: Path, *, interval: str = "2s", reachability: dict[str, Any] | None = None
    ) -> None:
        self.workdir = workdir
        self.interval = interval
        self.reachability = {"resolve_after": "1s", **(reachability or {})}
        self.broker = Broker(workdir, persistence=True)
        self.receiver = Receiver()
        self.responders: dict[str, ResponderProcess] = {}
        self.probes: dict[str, Process] = {}
        self.monitor: Process | None = None
        self.http = f"{HOST}:{free_port()}"
        self.targets: set[str] = set()
        self.token = "system-test-token"

    def __enter__(self) -> System:
        self.broker.start()
        return self

    def __exit__(self, *exc: object | TracebackType | None) -> None:
        for probe in self.probes.values():
            probe.stop()
        if self.monitor is not None:
            self.monitor.stop()
        for responder in self.responders.values():
            responder.stop()
        self.receiver.close()
        self.broker.stop()

    # ------------------------------------------------------------ pieces

    def add_responder(self, name: str) -> ResponderProcess:
        self.responders[name] = ResponderProcess()
        return self.responders[name]

    def probe_key(self, probe: str) -> str:
        return f"key-{probe}"

    def add_probe(self, probe: str, targets: dict[str, str]) -> Process:
        """A probe calling each target (id → responder name) every ``interval``."""
        self.targets.update(targets)
        config = {
            "kind": "probe",
            "probe": {"id": probe, "region": "GB", "key": self.probe_key(probe)},
            "mqtt": {"host": self.broker.host, "port": self.broker.port, "keepalive": "5s"},
            "outbox": {"path": str(self.workdir / f"{probe}-outbox.db")},
            "schedule": {"jitter": 0.0},
            "targets": [
                {
                    "id": target,
                    "uri": self.responders[responder].uri,
                    "test_endpoint": True,
                    "min_spacing": "500ms",
                    "checks": {
                        "invite": {"interval": self.interval, "media_time": "500ms", "answer_timeout": "3s",
                                   "first_response_timeout": "2s", "max_duration": "8s"},
                    },
                }
                for target, responder in targets.items()
            ],
        }  # fmt: skip
        self.probes[probe] = Process("probe", config, self.workdir, probe)
        return self.probes[probe]

    def monitor_config(self) -> dict[str, Any]:
        return {
            "kind": "monitor",
            "id": "m1",
            "mqtt": {"host": self.broker.host, "port": self.broker.port, "keepalive": "5s"},
            "store": {"path": str(self.workdir / "monitor.db"), "commit_interval": "100ms"},
            "http": {"listen": self.http, "token": self.token},
            "reachability": self.reachability,
            "probes": [{"id": p, "key": self.probe_key(p)} for p in self.probes]
            or [{"id": "none", "key": "x"}],
            "targets": [{"id": t, "interval": self.interval} for t in sorted(self.targets)],
            "notifiers": [{"type": "webhook", "name": "hook", "url": self.receiver.url, "backoff": "200ms"}],
        }

    def start_monitor(self) -> Process:
        self.monitor = Process("monitor", self.monitor_config(), self.workdir, "monitor")
        self.wait_for(lambda: self.get("/healthz") is not None, 20, "the monitor's /healthz")
        return self.monitor

    # ------------------------------------------------------------ observing

    def get(self, path: str) -> bytes | None:
        try:
            with urllib.request.urlopen(f"http://{self.http}{path}", timeout=2) as resp:
                return bytes(resp.read())
        except OSError:
            return None

    def api(self, path: str) -> dict[str, Any]:
        body = self.get(path)
        assert body is not None, f"GET {path} failed"
        return dict(json.loads(body))

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
