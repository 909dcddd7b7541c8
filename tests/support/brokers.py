"""A real mosquitto for tests, on a free loopback port, that can stop and come back.

Use the ``broker`` fixture (tests/conftest.py, function scope) from a test marked
``@pytest.mark.peers("mosquitto")``, or build a ``Broker`` yourself. Its config is
the four lines aiomqtt's own tests use plus the queue and session settings of the shipped
``deploy/mosquitto/mosquitto.conf`` (reasons in docs/deploy.md, "The broker: what it keeps
and what it drops"), and a payload limit as there (but at 1 MiB, the largest
``ingest.max_payload_bytes``, so the monitor's own ``too_large`` stays testable)::

    listener PORT 127.0.0.1
    allow_anonymous true
    max_queued_messages 200000        # mosquitto's default of 1000 drops QoS 1 messages
    max_queued_bytes 536870912        # ... for a subscriber that falls behind; these hold hours
    max_inflight_messages 20
    persistent_client_expiration 1d   # a 3.1.1 persistent session, as the monitor's MQTT 5 one
    persistence false
    autosave_interval 60
    message_size_limit 1048576

``max_queued_messages`` is a parameter (e.g. 50, to make a queue overflow);
``message_size_limit=0`` lifts the limit (to test what reaches a client when the broker
accepts anything, e.g. the monitor's MQTT 5 Maximum Packet Size).

``Broker(tmp_path, persistence=True)`` keeps its state (retained messages, sessions and
their queued messages, plain subscriptions) in ``tmp_path`` across ``stop()``/``start()``
— mosquitto writes it on a clean stop (SIGTERM) and every ``autosave_interval``; a
``stop(kill=True)`` loses what changed since. mosquitto 2.0.11 does **not** keep shared
subscriptions across a restart, even with persistence (tests/test_mqtt_resubscribe.py).
``restart()`` comes back on the same port. ``extra`` lines are appended (e.g. TLS
listener options, ``password_file``; with ``anonymous=False`` a client must authenticate).
``pid`` is the running broker's pid.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

from tests.support.net import HOST, free_port
from tests.support.peers import peer_path

MESSAGE_SIZE_LIMIT = 1024 * 1024  # bytes of payload the test brokers accept
# as deploy/mosquitto/mosquitto.conf (tests/test_deploy.py keeps the two in step)
MAX_QUEUED_MESSAGES = 200_000
MAX_QUEUED_BYTES = 512 * 1024 * 1024
MAX_INFLIGHT_MESSAGES = 20
PERSISTENT_CLIENT_EXPIRATION = "1d"
AUTOSAVE_INTERVAL = 60


class Broker:
    def __init__(
        self,
        workdir: Path,
        *,
        port: int | None = None,
        persistence: bool = False,
        anonymous: bool = True,
        message_size_limit: int = MESSAGE_SIZE_LIMIT,
        max_queued_messages: int = MAX_QUEUED_MESSAGES,
        extra: Sequence[str] = (),
    ) -> None:
        self.workdir = workdir
        self.host = HOST
        self.port = port if port is not None else free_port()
        self.persistence = persistence
        self.anonymous = anonymous
        self.message_size_limit = message_size_limit
        self.max_queued_messages = max_queued_messages
        self.extra = list(extra)
        self.conf = workdir / f"mosquitto-{self.port}.conf"
        self.log = workdir / f"mosquitto-{self.port}.log"
        self._proc: subprocess.Popen[bytes] | None = None

    def config_text(self) -> str:
        lines = [
            f"listener {self.port} {self.host}",
            f"allow_anonymous {'true' if self.anonymous else 'false'}",
            f"max_queued_messages {self.max_queued_messages}",
            f"max_queued_bytes {MAX_QUEUED_BYTES}",
            f"max_inflight_messages {MAX_INFLIGHT_MESSAGES}",
            f"persistent_client_expiration {PERSISTENT_CLIENT_EXPIRATION}",
            f"persistence {'true' if self.persistence else 'false'}",
            f"autosave_interval {AUTOSAVE_INTERVAL}",
            f"message_size_limit {self.message_size_limit}",
        ]
        if self.persistence:
            lines.append(f"persistence_location {self.workdir}/")
        if os.geteuid() == 0:
            lines.append("user root")  # else mosquitto drops to 'mosquitto', who cannot write here
        return "\n".join([*lines, *self.extra, ""])

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self.running and self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, timeout: float = 5.0) -> None:
        if self.running:
            return
        self.conf.write_text(self.config_text(), encoding="utf-8")
        with self.log.open("ab") as log:
            self._proc = subprocess.Popen(
                [peer_path("mosquitto"), "-c", str(self.conf)],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"mosquitto exited at start: {self.log.read_text(errors='replace')}")
            with contextlib.suppress(OSError), socket.create_connection((self.host, self.port), 0.2):
                return
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"mosquitto did not listen on {self.port}: {self.log.read_text(errors='replace')}")

    def stop(self, *, kill: bool = False) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)

    def restart(self) -> None:
        self.stop()
        self.start()

    def __enter__(self) -> Broker:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
