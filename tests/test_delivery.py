"""End-to-end delivery (probes.delivery, monitor.delivery): acks, replay of seq gaps, gone.

From the bookkeeping in the monitor's store (virtual time), through the probe's
publisher against a real mosquitto, to a monitor and a probe whose broker drops what
it cannot queue: every gap is repaired from the probe's outbox.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
from prometheus_client import CollectorRegistry

from monitor.core import MonitorCore
from monitor.service import MonitorService
from monitor.store import open_store
from probes import delivery as d
from probes.mqtt import Publisher
from probes.outbox import Outbox
from probes.outcome import CheckOutcome
from probes.result import Result
from probes.status import Status, parse_status
from probes.status import verify_status_signature as verify_status
from tests.support.brokers import Broker
from tests.support.monitor import T0, Clock, ProbeSim, StatusSim, key_for, monitor_config
from tests.support.mqtt import accept, eventually, publishing, settings
from tests.support.net import free_port

KEY = key_for("p1")


def health(**kw: Any) -> d.OutboxHealth:
    base: dict[str, Any] = dict(
        unpublished=0, unconfirmed=0, last_seq=0, confirmed_seq=0, lost=0, evicted=0, overflow=0,
        oldest_age=None, error=None, gone=(),
    )  # fmt: skip
    base.update(kw)
    return d.OutboxHealth(**base)


def status_with(sim: StatusSim, at: datetime, outbox: d.OutboxHealth) -> bytes:
    sim.connected_at = sim.connected_at or at
    return Status.make(
        probe=sim.probe,
        online=True,
        reason=None,
        version="0.1.0",
        started_at=sim.connected_at,
        connected_at=sim.connected_at,
        at=at,
        targets=("t1",),
        key=sim.key,
        outbox=outbox,
    ).to_json()


def value(registry: CollectorRegistry, name: str, probe: str = "p1") -> float | None:
    return registry.get_sample_value(name, {"probe": probe})


def gauge(core: MonitorCore, registry: CollectorRegistry, name: str) -> float | None:
    core.evaluate()  # gauges come from the snapshot, rebuilt every tick
    return value(registry, name)


# ------------------------------------------------------------------ messages


def test_ack_and_replay_are_signed_bounded_and_for_one_probe() -> None:
    ack = d.make_ack("p1", 41, T0, KEY)
    parsed = d.parse_message(ack, schema=d.ACK_SCHEMA, probe="p1", key=KEY)
    assert isinstance(parsed, d.Ack) and parsed.seq == 41
    replay = d.make_replay("p1", 5, 9, T0, KEY)
    got = d.parse_message(replay, schema=d.REPLAY_SCHEMA, probe="p1", key=KEY)
    assert isinstance(got, d.Replay) and (got.first, got.last) == (5, 9)
    forged = json.loads(ack)
    forged["seq"] = 10**6  # a forged ack would make the probe delete what nobody stored
    cases = [
        (json.dumps(forged).encode(), "p1", KEY),
        (ack, "p2", KEY),  # another probe's ack
        (ack, "p1", "another-key"),
        (b"\xff", "p1", KEY),
        (b"[]", "p1", KEY),
        (b"x" * 2000, "p1", KEY),
        (replay, "p1", KEY),  # a replay is not an ack
    ]
    for payload, probe, key in cases:
        with pytest.raises(d.DeliveryError):
            d.parse_message(payload, schema=d.ACK_SCHEMA, probe=probe, key=key)
    with pytest.raises(ValueError):
        d.make_replay("p1", 1, d.MAX_REPLAY + 1, T0, KEY)
    with pytest.raises(ValueError):
        d.make_replay("p1", 9, 5, T0, KEY)


def test_status_carries_outbox_health_signed() -> None:
    h = health(
        unpublished=3, unconfirmed=7, last_seq=10, confirmed_seq=0, lost=1, error="disk_full", gone=((4, 4),)
    )
    payload = status_with(StatusSim("p1"), T0, h)
    status = parse_status(payload)
    assert status.outbox == h and verify_status(status, KEY)
    data = json.loads(payload)
    data["outbox"]["lost"] = 0  # hiding a loss breaks the signature
    assert not verify_status(parse_status(json.dumps(data).encode()), KEY)


# ------------------------------------------------------------------ the monitor's bookkeeping


def test_a_gap_is_asked_for_repaired_or_gone_and_then_acked(store_where: str) -> None:
    clock = Clock()
    registry = CollectorRegistry()
    config = monitor_config(store_where)
    core = MonitorCore(config, open_store(config.store.where), registry, clock=clock)
    sim = ProbeSim("p1")
    results = [sim.result("t1", "pass", clock.advance(1)) for _ in range(10)]

    def send(result: Result) -> None:
        assert core.handle(sim.topic("t1"), result.to_json()) is None

    for r in results[:3] + results[6:]:  # 4, 5, 6 never arrive
        send(r)
    core.store.commit()
    out = core.delivery.outgoing(clock.now)
    acks = [o for o in out if "/acks/" in o.topic]
    replays = [o for o in out if "/commands/" in o.topic]
    assert len(acks) == 1 and acks[0].retain and acks[0].topic == "ecpm/v1/acks/p1"
    assert d.parse_message(acks[0].payload, schema=d.ACK_SCHEMA, probe="p1", key=KEY).seq == 3  # type: ignore[union-attr]
    asked = d.parse_message(replays[0].payload, schema=d.REPLAY_SCHEMA, probe="p1", key=KEY)
    assert isinstance(asked, d.Replay) and (asked.first, asked.last) == (4, 6)
    assert gauge(core, registry, "ecpm_results_outstanding") == 3.0
    assert core.delivery.outgoing(clock.now) == []  # nothing new: no repeat at once

    send(results[3])  # replayed: repaired
    send(results[3])  # twice: stored once, counted once
    core.store.commit()
    assert value(registry, "ecpm_results_repaired_total") == 1.0
    clock.advance(11)
    again = [o for o in core.delivery.outgoing(clock.now) if "/commands/" in o.topic]
    asked = d.parse_message(again[0].payload, schema=d.REPLAY_SCHEMA, probe="p1", key=KEY)
    assert (asked.first, asked.last) == (5, 6)  # type: ignore[union-attr]  # only what is still missing

    send(results[4])
    status = StatusSim("p1")
    at = clock.advance(1)
    assert core.handle(status.topic(), status_with(status, at, health(last_seq=10, gone=((6, 6),)))) is None
    assert (
        core.handle(
            status.topic(), status_with(status, clock.advance(1), health(last_seq=10, gone=((6, 6),)))
        )
        is None
    )
    core.store.commit()
    assert value(registry, "ecpm_results_unrecoverable_total") == 1.0  # the same answer twice: once
    assert gauge(core, registry, "ecpm_results_outstanding") == 0.0
    out = core.delivery.outgoing(clock.now)
    assert [d.parse_message(o.payload, schema=d.ACK_SCHEMA, probe="p1", key=KEY).seq for o in out] == [10]  # type: ignore[union-attr]
    gap = core.store.gaps_between(T0, clock.now)[0]
    assert (gap.missing, gap.repaired, gap.unrecoverable, gap.closed_at) == (
        3,
        2,
        1,
        clock.now - timedelta(seconds=1),
    )

    # a restart asks for nothing and acks again once connected
    core.store.commit()
    again_core = MonitorCore(config, open_store(config.store.where), CollectorRegistry(), clock=clock)
    again_core.delivery.resend_acks()
    out = again_core.delivery.outgoing(clock.advance(20))
    assert [o.topic for o in out] == ["ecpm/v1/acks/p1"]


def test_a_result_said_gone_that_arrives_after_all_counts_as_repaired(store_where: str) -> None:
    """The probe no longer had seq 3, but a stranded broker session still held it."""
    clock = Clock()
    config = monitor_config(store_where)
    core = MonitorCore(config, open_store(config.store.where), CollectorRegistry(), clock=clock)
    sim, status = ProbeSim("p1"), StatusSim("p1")
    results = [sim.result("t1", "pass", clock.advance(1)) for _ in range(4)]
    for r in (results[0], results[3]):
        assert core.handle(sim.topic("t1"), r.to_json()) is None
    gone = status_with(status, clock.advance(1), health(last_seq=4, gone=((3, 3),)))
    assert core.handle(status.topic(), gone) is None
    gap = core.store.gaps_between(T0, clock.now)[0]
    assert (gap.repaired, gap.unrecoverable, gap.closed_at) == (0, 1, None)
    for r in (results[2], results[1]):
        assert core.handle(sim.topic("t1"), r.to_json()) is None
    gap = core.store.gaps_between(T0, clock.now)[0]
    assert (gap.repaired, gap.unrecoverable, gap.closed_at) == (2, 0, clock.now)


def test_many_small_gaps_are_asked_for_in_few_requests_and_big_ones_split(store_where: str) -> None:
    """A retired monitor's stranded session took every other result; one huge gap."""
    clock = Clock()
    config = monitor_config(store_where)
    core = MonitorCore(config, open_store(config.store.where), CollectorRegistry(), clock=clock)
    sim = ProbeSim("p1")
    for r in [sim.result("t1", "pass", clock.advance(1)) for _ in range(400)][::2]:  # 1, 3, 5, ...
        assert core.handle(sim.topic("t1"), r.to_json()) is None
    sim.seq += 2 * d.MAX_REPLAY + 10
    assert core.handle(sim.topic("t1"), sim.result("t1", "pass", clock.advance(1)).to_json()) is None
    core.store.commit()
    asked = [
        d.parse_message(o.payload, schema=d.REPLAY_SCHEMA, probe="p1", key=KEY)
        for o in core.delivery.outgoing(clock.now)
        if "/commands/" in o.topic
    ]
    ranges = [(a.first, a.last) for a in asked if isinstance(a, d.Replay)]
    assert ranges[0] == (2, 398)  # 199 gaps of one: one request (what lies between is sent again)
    assert all(last - first < d.MAX_REPLAY for first, last in ranges)
    assert ranges[1:] == [(400, 100_399), (100_400, 200_399), (200_400, 200_410)]  # split


def test_a_tail_the_monitor_never_saw_is_a_gap(store_where: str) -> None:
    """The broker dropped the probe's newest results and the probe then went quiet: its
    status (nothing unpublished, last_seq 8) shows what is missing."""
    clock = Clock()
    registry = CollectorRegistry()
    config = monitor_config(store_where)
    core = MonitorCore(config, open_store(config.store.where), registry, clock=clock)
    sim, status = ProbeSim("p1"), StatusSim("p1")
    results = [sim.result("t1", "pass", clock.advance(1)) for _ in range(8)]
    for r in results[:5]:
        core.handle(sim.topic("t1"), r.to_json())
    # results still in the probe's outbox are not missing yet
    core.handle(status.topic(), status_with(status, clock.advance(1), health(last_seq=8, unpublished=3)))
    assert value(registry, "ecpm_results_missing_total") == 0.0
    core.handle(status.topic(), status_with(status, clock.advance(1), health(last_seq=8)))
    core.store.commit()
    assert value(registry, "ecpm_results_missing_total") == 3.0
    replay = next(o for o in core.delivery.outgoing(clock.now) if "/commands/" in o.topic)
    asked = d.parse_message(replay.payload, schema=d.REPLAY_SCHEMA, probe="p1", key=KEY)
    assert (asked.first, asked.last) == (6, 8)  # type: ignore[union-attr]
    for r in results[5:]:
        assert core.handle(sim.topic("t1"), r.to_json()) is None  # the replayed tail is accepted
    assert value(registry, "ecpm_results_repaired_total") == 3.0
    assert gauge(core, registry, "ecpm_results_outstanding") == 0.0


def test_a_head_published_before_the_monitor_subscribed_is_a_gap(store_where: str) -> None:
    """Probes started first: their first results went to a broker with no subscriber."""
    clock = Clock()
    registry = CollectorRegistry()
    config = monitor_config(store_where)
    core = MonitorCore(config, open_store(config.store.where), registry, clock=clock)
    sim, status = ProbeSim("p1"), StatusSim("p1")
    results = [sim.result("t1", "pass", clock.advance(1)) for _ in range(6)]
    for r in results[3:]:  # 4, 5, 6 arrive; 1..3 went nowhere
        assert core.handle(sim.topic("t1"), r.to_json()) is None
    assert core.handle(status.topic(), status_with(status, clock.advance(1), health(last_seq=6))) is None
    core.store.commit()
    asked = next(o for o in core.delivery.outgoing(clock.now) if "/commands/" in o.topic)
    replay = d.parse_message(asked.payload, schema=d.REPLAY_SCHEMA, probe="p1", key=KEY)
    assert (replay.first, replay.last) == (1, 3)  # type: ignore[union-attr]
    for r in results[:3]:
        assert core.handle(sim.topic("t1"), r.to_json()) is None
    assert value(registry, "ecpm_results_repaired_total") == 3.0
    # a probe whose earlier results another store confirmed has no head gap here
    again = status_with(status, clock.advance(1), health(last_seq=6, confirmed_seq=6))
    assert core.handle(status.topic(), again) is None
    assert value(registry, "ecpm_results_missing_total") == 3.0


# ------------------------------------------------------------------ the probe's publisher, real broker


def maker(target: str = "t1") -> Callable[[int], Result]:
    outcome = CheckOutcome(check="options", outcome="pass", started_at=T0, finished_at=T0)

    def make(seq: int) -> Result:
        now = datetime.now(UTC).replace(microsecond=0)
        return Result.from_outcome(
            outcome.__class__(check="options", outcome="pass", started_at=now, finished_at=now),
            probe="p1",
            seq=seq,
            target=target,
            key=KEY,
        )

    return make


@pytest.mark.peers("mosquitto")
def test_the_probe_deletes_on_ack_and_replays_unchanged(tmp_path: Path) -> None:
    b = Broker(tmp_path)
    b.start()
    box = Outbox(tmp_path / "o.db", max_results=1000)

    async def main() -> None:
        seen: list[tuple[str, bytes]] = []

        async def watch(client: aiomqtt.Client) -> None:
            async for m in client.messages:
                seen.append((str(m.topic), bytes(m.payload)))  # type: ignore[arg-type]

        async with aiomqtt.Client(b.host, b.port, identifier="fake-monitor") as mon:
            await mon.subscribe("ecpm/v1/#", qos=1)
            watcher = asyncio.create_task(watch(mon))
            pub = Publisher(
                settings=settings(b), probe_id="p1", outbox=box, on_command=accept, key=KEY, targets=["t1"]
            )
            async with publishing(pub):
                added = [await box.add(maker()) for _ in range(10)]
                await eventually(lambda: box.depth() == 0 and box.stats().unconfirmed == 10)
                # a forged ack does nothing; a signed one deletes what it covers
                await mon.publish("ecpm/v1/acks/p1", d.make_ack("p1", 10, T0, "wrong"), qos=1, retain=True)
                await mon.publish("ecpm/v1/acks/p1", d.make_ack("p1", 4, T0, KEY), qos=1, retain=True)
                await eventually(lambda: box.stats().unconfirmed == 6 and box.stats().confirmed_seq == 4)
                assert pub.stats().commands_refused_total.get("ack") == 1
                before = len([t for t, _ in seen if "/results/" in t])
                await mon.publish("ecpm/v1/commands/p1", d.make_replay("p1", 2, 7, T0, KEY), qos=1)
                await eventually(lambda: len([t for t, _ in seen if "/results/" in t]) >= before + 3)
                again = [p for t, p in seen if "/results/" in t][before:]
                assert again == [r.to_json() for r in added[4:7]]  # the very bytes: same id, signature

                def gone_reported() -> bool:
                    statuses = [parse_status(p) for t, p in seen if t == "ecpm/v1/status/p1" and p]
                    return any(s.outbox is not None and s.outbox.gone == ((2, 4),) for s in statuses)

                await eventually(gone_reported)  # 2..4 were confirmed, so deleted: gone
            watcher.cancel()

    try:
        asyncio.run(main())
    finally:
        box.close()
        b.stop()


@pytest.mark.peers("mosquitto")
def test_a_broker_that_drops_while_the_monitor_is_away_loses_nothing(
    tmp_path: Path, store_where: str
) -> None:
    """The monitor stops; its broker queue holds 5 messages and drops the rest (mosquitto's
    max_queued_messages); the monitor comes back, sees the gap, asks, and gets every result."""
    b = Broker(tmp_path, max_queued_messages=5)
    b.start()
    box = Outbox(tmp_path / "o.db", max_results=1000)
    config = monitor_config(
        store_where,
        mqtt={"host": b.host, "port": b.port},
        http={"listen": f"127.0.0.1:{free_port()}"},
        ingest={"shared_group": None},
    )

    async def monitor_for(stop: asyncio.Event) -> MonitorService:
        service = MonitorService(config)
        task = asyncio.create_task(service.run(stop))
        await asyncio.wait_for(service.connected.wait(), 10)
        service.task = task  # type: ignore[attr-defined]
        return service

    async def main() -> None:
        pub = Publisher(
            settings=settings(b), probe_id="p1", outbox=box, on_command=accept, key=KEY, targets=["t1"]
        )
        async with publishing(pub):
            stop = asyncio.Event()
            service = await monitor_for(stop)
            for _ in range(5):
                await box.add(maker())
            await eventually(lambda: service.store.last_seq("p1") == 5)
            stop.set()
            await asyncio.wait_for(service.task, 10)  # type: ignore[attr-defined]
            for _ in range(40):  # the monitor is away: the broker keeps 5, drops 35
                await box.add(maker())
            await eventually(lambda: box.depth() == 0)
            stop = asyncio.Event()
            service = await monitor_for(stop)
            await box.add(maker())  # seq 46 shows the gap
            store = service.store

            def complete() -> bool:
                return {
                    r.seq
                    for r in store.results_between(
                        T0 - timedelta(days=1), datetime.now(UTC) + timedelta(days=1)
                    )
                } == set(range(1, 47))

            await eventually(complete, 40)
            registry = service.registry
            assert value(registry, "ecpm_results_missing_total") == 35.0  # lost by the broker ...
            assert value(registry, "ecpm_results_repaired_total") == 35.0  # ... and every one repaired
            service.core.evaluate()
            assert value(registry, "ecpm_results_outstanding") == 0.0
            await eventually(lambda: box.stats().unconfirmed == 0 and box.stats().confirmed_seq == 46)
            stop.set()
            await asyncio.wait_for(service.task, 10)  # type: ignore[attr-defined]

    try:
        asyncio.run(main())
    finally:
        box.close()
        b.stop()
    store = open_store(config.store.where)
    assert store.check_chain().ok
    rows = store._db.execute(
        "SELECT count(*), count(DISTINCT id), count(DISTINCT seq) FROM results"
    ).fetchone()
    assert rows == (46, 46, 46)  # no duplicate rows
