"""MQTT in tests against a real broker: settings for a test broker, a publisher running
for a block, a command handler that accepts everything, waiting for a condition that
other clients and processes make true, and a mosquitto_sub recording what it sees."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from ecpm.settings import MqttSettings
from probes.mqtt import Command, Publisher
from probes.result import Result, parse_result
from tests.support.brokers import Broker
from tests.support.peers import peer_path


def settings(b: Broker, **kw: Any) -> MqttSettings:
    return MqttSettings(host=b.host, port=b.port, **kw)


async def eventually(cond: Callable[[], bool], limit: float = 20.0) -> None:
    async with asyncio.timeout(limit):
        while not cond():  # noqa: ASYNC110 - the condition lives in other clients and processes
            await asyncio.sleep(0.01)


def accept(cmd: Command) -> str | None:
    return None


@contextlib.asynccontextmanager
async def publishing(pub: Publisher) -> AsyncIterator[Publisher]:
    """``pub`` running for the block, then stopped with a second to drain."""
    task = asyncio.create_task(pub.run())
    try:
        yield pub
    finally:
        await pub.stop(drain=1.0)
        await asyncio.wait_for(task, 15)


class Subscriber:
    """mosquitto_sub on ``topic``, every message written to ``out`` as its topic and its
    payload in hex (so any payload survives). With ``name`` the session is persistent
    (QoS 1, that client id, no clean session): it misses nothing while it is connected."""

    def __init__(self, broker: Broker, topic: str, out: Path, *, name: str | None = None) -> None:
        self.out = out
        self._file = out.open("ab")
        session = [] if name is None else ["-q", "1", "-c", "-i", name]
        self.proc = subprocess.Popen(
            [peer_path("mosquitto_sub"), "-h", broker.host, "-p", str(broker.port), "-t", topic,
             *session, "-F", "%t %x"],
            stdout=self._file,
        )  # fmt: skip
        time.sleep(0.3)  # time to subscribe before the test publishes

    def lines(self) -> list[tuple[str, bytes]]:
        out = []
        for line in self.out.read_text().splitlines():
            topic, _, payload = line.partition(" ")
            if topic:
                out.append((topic, bytes.fromhex(payload)))
        return out

    def payloads(self) -> list[bytes]:
        return [p for _, p in self.lines()]

    def results(self) -> list[Result]:
        return [parse_result(p) for t, p in self.lines() if "/results/" in t]

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)
        self._file.close()
