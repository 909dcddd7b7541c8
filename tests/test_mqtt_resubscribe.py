"""Subscriptions are the monitor's, not the broker's: what mosquitto 2.0.11 keeps of a
persistent session across its own restart, and the monitor's answer (subscribe on every
connect). Real mosquitto with persistence, real clients (ecpm.mqtt)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from ecpm.mqtt import connect
from ecpm.settings import MqttSettings
from tests.support.brokers import Broker
from tests.support.peers import peer_path

pytestmark = pytest.mark.peers("mosquitto")

SHARED = "$share/ecpm/t/results/#"
PLAIN = "t/results/#"


async def _session(settings: MqttSettings, topic: str | None, got: list[int], ident: str = "mon") -> None:
    """Connect the persistent session ``ident``, subscribe to ``topic`` (None: trust the
    session), take what arrives until it is quiet, disconnect (the session stays)."""
    async with connect(settings, identifier=ident, persistent=True) as client:
        if topic is not None:
            await client.subscribe(topic, qos=1)
        await client.subscribe("t/marker", qos=1)  # plain, never shared out: the end of the queue
        await client.publish("t/marker", b"-1", qos=1)  # a round trip: queued ones come first
        async for message in client.messages:
            value = int(bytes(message.payload))  # type: ignore[arg-type]
            if value == -1:
                break
            got.append(value)


async def _publish(settings: MqttSettings, values: range) -> None:
    async with connect(settings, identifier="probe") as client:
        for i in values:
            await client.publish("t/results/p1", str(i).encode(), qos=1)


def _restart_scenario(tmp_path: Path, topic: str, resubscribe: bool, protocol: str) -> list[int]:
    async def go(broker: Broker) -> list[int]:
        settings = MqttSettings(host=broker.host, port=broker.port, protocol=protocol)  # type: ignore[arg-type]
        got: list[int] = []
        await _session(settings, topic, got)  # subscribed once; now offline, session kept
        await _publish(settings, range(0, 10))  # queued in the offline session
        broker.restart()  # persistence on: the session comes back from disk
        await _publish(settings, range(10, 20))  # before the monitor is back
        await _session(settings, topic if resubscribe else None, got)
        await _publish(settings, range(20, 30))  # after it subscribed again (or not)
        await _session(settings, topic if resubscribe else None, got)
        return got

    tmp_path.mkdir(exist_ok=True)
    with Broker(tmp_path, persistence=True) as broker:
        return asyncio.run(go(broker))


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_mosquitto_restores_a_session_without_its_shared_subscription(tmp_path: Path, protocol: str) -> None:
    """The finding behind 'subscribe on every connect' (if this starts failing, the broker
    was fixed or changed: update docs/deploy.md and ecpm/mqtt.py's docstring)."""
    got = _restart_scenario(tmp_path, SHARED, resubscribe=False, protocol=protocol)
    assert got == list(range(10))  # the queue came back; the subscription did not
    got = _restart_scenario(tmp_path / "plain", PLAIN, resubscribe=False, protocol=protocol)
    assert got == list(range(30))  # a plain subscription is restored


def test_subscribing_on_every_connect_makes_the_shared_subscription_effective(tmp_path: Path) -> None:
    got = _restart_scenario(tmp_path, SHARED, resubscribe=True, protocol="5")
    # what was published while nobody held the shared subscription (between the broker's
    # start and the monitor's subscribe) is gone — a seq gap that replay repairs — and
    # everything after the subscribe arrives
    assert got == [*range(10), *range(20, 30)]


def test_retiring_a_monitor_session_stops_it_taking_a_share(tmp_path: Path) -> None:
    """docs/deploy.md, "Retiring or renaming a monitor": an offline session in the share
    group takes its round-robin share until it is deleted; one clean connect deletes it."""

    async def go(broker: Broker) -> tuple[list[int], list[int]]:
        settings = MqttSettings(host=broker.host, port=broker.port)
        await _session(settings, SHARED, [], ident="ecpm-monitor-old")  # retired, session left behind
        async with connect(settings, identifier="ecpm-monitor-new", persistent=True) as client:
            await client.subscribe(SHARED, qos=1)
            await client.subscribe("t/marker", qos=1)

            async def take(values: range) -> list[int]:
                await _publish(settings, values)
                await client.publish("t/marker", b"-1", qos=1)
                got = []
                async for message in client.messages:
                    if (value := int(bytes(message.payload))) == -1:  # type: ignore[arg-type]
                        return got
                    got.append(value)
                raise AssertionError("the client stopped")

            before = await take(range(0, 10))
            # the documented retirement: connect once with the old id and a clean session
            retire = await asyncio.create_subprocess_exec(
                peer_path("mosquitto_sub"), "-h", broker.host, "-p", str(broker.port),
                "-i", "ecpm-monitor-old", "-t", "ecpm/retire", "-E",
            )  # fmt: skip
            assert await asyncio.wait_for(retire.wait(), 30) == 0
            return before, await take(range(10, 20))

    with Broker(tmp_path) as broker:
        before, after = asyncio.run(go(broker))
    assert 0 < len(before) < 10  # the retired session took its share of 0..9
    assert after == list(range(10, 20))  # deleted: the new monitor gets everything
