"""ecpm/mqtt.py against a real mosquitto: both protocol versions, persistent sessions that
keep QoS 1 messages while the monitor is away, and PUBACK only after ``ack``."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiomqtt
import pytest

from ecpm.mqtt import ack, connect
from ecpm.settings import MqttSettings
from tests.support.brokers import Broker

pytestmark = pytest.mark.peers("mosquitto")


async def _publish(port: int, topic: str, payloads: list[bytes]) -> None:
    async with aiomqtt.Client("127.0.0.1", port, identifier="pub") as pub:
        for payload in payloads:
            await pub.publish(topic, payload, qos=1)


async def _receive(settings: MqttSettings, count: int, *, acked: bool) -> list[bytes]:
    got: list[bytes] = []
    async with connect(settings, identifier="mon", persistent=True, manual_ack=True) as client:
        await client.subscribe("t/#", qos=1)
        async with asyncio.timeout(5):
            async for message in client.messages:
                got.append(bytes(message.payload))  # type: ignore[arg-type]
                if acked:
                    ack(client, message)
                if len(got) == count:
                    break
    return got


@pytest.mark.parametrize("protocol", ["5", "3.1.1", "auto"])
def test_persistent_session_keeps_messages_and_redelivers_unacked(tmp_path: Path, protocol: str) -> None:
    with Broker(tmp_path) as broker:
        settings = MqttSettings(host=broker.host, port=broker.port, protocol=protocol)  # type: ignore[arg-type]

        async def subscribe_once() -> None:  # creates the session and subscription, then goes away
            async with connect(settings, identifier="mon", persistent=True, manual_ack=True) as client:
                await client.subscribe("t/#", qos=1)

        asyncio.run(subscribe_once())
        asyncio.run(_publish(broker.port, "t/x", [b"1", b"2", b"3"]))  # while the monitor is away
        assert asyncio.run(_receive(settings, 3, acked=False)) == [b"1", b"2", b"3"]
        # nothing was acknowledged: the broker delivers them again on the next connection
        again = asyncio.run(_receive(settings, 3, acked=True))
        assert sorted(again) == [b"1", b"2", b"3"]
