"""The probe's MQTT publisher in tests against a real broker: settings for a test broker,
a publisher running for a block, a command handler that accepts everything, and waiting
for a condition that other clients and processes make true."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

from ecpm.settings import MqttSettings
from probes.mqtt import Command, Publisher
from tests.support.brokers import Broker


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
