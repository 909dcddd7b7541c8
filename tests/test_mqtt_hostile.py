"""Hostile MQTT against a real mosquitto: bounded reads, bounded memory, signed status.

- the client's own queue is bounded (it stops reading) and loses nothing;
- MQTT 5 Maximum Packet Size keeps oversized messages at the broker; on 3.1.1 the
  client cuts them so they are rejected as ``too_large``;
- a real ``ecpm monitor`` draining a backlog, and under a flood of 1–20 MB messages,
  stays within a generous RSS bound;
- a real probe publisher's signed status and signed Last Will work end to end; forged,
  unsigned, replayed and oversized statuses change neither probe state nor coverage.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
from prometheus_client.parser import text_string_to_metric_families

from bench.monitor_memory import flood_sizes, padded_results, proc_kb
from ecpm.mqtt import build_client, packet_limit
from ecpm.settings import MqttSettings
from monitor.config import Ingest as MonitorIngest
from probes.mqtt import MAX_COMMAND_BYTES
from probes.outcome import CheckOutcome
from probes.result import Result
from probes.status import MAX_STATUS_BYTES, MAX_STATUS_TARGETS
from tests.support.brokers import Broker
from tests.support.monitor import ProbeSim, StatusSim, key_for
from tests.support.mqtt import Subscriber
from tests.support.net import free_port
from tests.support.processes import Process, wait_for

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.peers("mosquitto", "mosquitto_sub")
MB = 1024 * 1024


async def publish(
    port: int, messages: list[tuple[str, bytes]], *, retain: bool = False, wait: float = 60
) -> None:
    async with aiomqtt.Client("127.0.0.1", port, protocol=aiomqtt.ProtocolVersion.V5) as client:
        for topic, payload in messages:
            await client.publish(topic, payload, qos=1, retain=retain, timeout=wait)


# ------------------------------------------------------------------ the client itself


def test_the_client_queue_is_bounded_and_loses_nothing(tmp_path: Path) -> None:
    n, bound = 3000, 50

    async def main(broker: Broker) -> None:
        settings = MqttSettings(host=broker.host, port=broker.port, protocol="5")
        v5 = aiomqtt.ProtocolVersion.V5

        def client() -> Any:
            return build_client(
                settings, identifier="bounded", protocol=v5, persistent=True, max_buffered=bound
            )

        async with client() as c:
            await c.subscribe("q/#", qos=1)
        await publish(broker.port, [("q/x", b"%d" % i) for i in range(n)])
        async with client() as c:  # automatic acks: without the bound all 3,000 would queue up
            await asyncio.sleep(1.5)
            assert len(c.messages) <= bound + 10, len(c.messages)
            assert c.paused_total >= 1
            got = []
            async with asyncio.timeout(30):
                async for message in c.messages:
                    got.append(int(message.payload))  # type: ignore[arg-type]
                    if len(got) == n:
                        break
            assert got == list(range(n))

    with Broker(tmp_path) as broker:
        asyncio.run(main(broker))


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_an_oversized_message_is_never_read_whole(tmp_path: Path, protocol: str) -> None:
    limit = packet_limit(64 * 1024)

    async def main(broker: Broker) -> list[tuple[str, int]]:
        settings = MqttSettings(host=broker.host, port=broker.port, protocol=protocol)  # type: ignore[arg-type]
        version = aiomqtt.ProtocolVersion.V5 if protocol == "5" else aiomqtt.ProtocolVersion.V311
        got: list[tuple[str, int]] = []
        async with build_client(settings, identifier="small", protocol=version, max_packet_size=limit) as c:
            await c.subscribe("big/#", qos=1)
            await publish(broker.port, [("big/1", b"x" * (5 * MB)), ("big/2", b"ok")])
            async with asyncio.timeout(10):
                async for message in c.messages:
                    got.append((message.topic.value, len(message.payload)))  # type: ignore[arg-type]
                    if message.topic.value == "big/2":
                        break
        return got

    with Broker(tmp_path, message_size_limit=0) as broker:  # the broker takes anything
        got = asyncio.run(main(broker))
        log = broker.log.read_text(errors="replace")
    if protocol == "5":  # the broker honours Maximum Packet Size: it never sends it
        assert got == [("big/2", 2)]
        assert "Dropping too large outgoing PUBLISH" in log
    else:  # 3.1.1 cannot ask: the client cut it, longer than any payload limit, and went on
        assert [t for t, _ in got] == ["big/1", "big/2"] and got[1][1] == 2
        assert 64 * 1024 < got[0][1] <= limit + 64 * 1024


def test_the_test_broker_refuses_payloads_over_its_limit(tmp_path: Path) -> None:
    """tests.brokers sets message_size_limit as deploy/ does. mosquitto 2.0.11 drops such a
    message and disconnects its publisher (the man page says it completes the QoS flow)."""

    async def main(broker: Broker) -> list[str]:
        got = []
        async with aiomqtt.Client(broker.host, broker.port) as c:
            await c.subscribe("s/#", qos=1)
            with contextlib.suppress(aiomqtt.MqttError, TimeoutError):
                async with aiomqtt.Client(broker.host, broker.port) as hostile:
                    await hostile.publish("s/big", b"x" * (MB + 1), qos=1, timeout=3)
            await publish(broker.port, [("s/small", b"x" * MB)])
            async with asyncio.timeout(10):
                async for message in c.messages:
                    got.append(message.topic.value)
                    if message.topic.value == "s/small":
                        return got
        return got

    with Broker(tmp_path) as broker:
        assert asyncio.run(main(broker)) == ["s/small"]


# ------------------------------------------------------------------ a real monitor


class Monitor:
    """``ecpm monitor`` as its own process, on a broker, with probes p1 and p2 and target t1."""

    def __init__(
        self, workdir: Path, broker: Broker, *, protocol: str = "auto", name: str = "monitor"
    ) -> None:
        self.workdir = workdir
        self.http = f"127.0.0.1:{free_port()}"
        self.db = workdir / f"{name}.db"
        config = {
            "kind": "monitor",
            "id": "m1",
            "mqtt": {"host": broker.host, "port": broker.port, "keepalive": "5s", "protocol": protocol},
            "store": {"path": str(self.db), "commit_interval": "100ms"},
            "http": {"listen": self.http},
            "probes": [{"id": p, "key": key_for(p)} for p in ("p1", "p2")],
            "targets": [{"id": "t1", "interval": "10s"}],
        }
        self.process = Process("monitor", config, workdir, name)
        self.wait_subscribed()

    def wait_subscribed(self, before: int = 0) -> None:
        wait_for(lambda: self.process.text().count("subscribed to") > before, 30, "the monitor subscribed")

    def restart(self) -> None:
        before = self.process.text().count("subscribed to")
        assert self.process.stop() == 0
        self.process.start()
        self.wait_subscribed(before)

    @property
    def pid(self) -> int:
        return self.process.proc.pid

    def get(self, path: str) -> bytes:
        with urllib.request.urlopen(f"http://{self.http}{path}", timeout=5) as resp:
            return bytes(resp.read())

    def probe(self, probe: str) -> dict[str, Any]:
        probes = json.loads(self.get("/api/v1/probes"))["probes"]
        return dict(next(p for p in probes if p["id"] == probe))

    def target(self, target: str = "t1") -> dict[str, Any]:
        return dict(next(t for t in json.loads(self.get("/api/v1/targets"))["targets"] if t["id"] == target))

    def rejected(self) -> dict[str, float]:
        return {
            s.labels["reason"]: s.value
            for f in text_string_to_metric_families(self.get("/metrics").decode())
            if f.name == "ecpm_results_rejected"
            for s in f.samples
            if s.name == "ecpm_results_rejected_total" and s.value
        }

    def stored(self) -> int:
        with sqlite3.connect(f"file:{self.db}?mode=ro", uri=True) as db:
            return int(db.execute("SELECT count(*) FROM results").fetchone()[0])

    def stop(self) -> None:
        self.process.stop()


@contextmanager
def monitor_on(workdir: Path, broker: Broker, **kw: Any) -> Iterator[Monitor]:
    monitor = Monitor(workdir, broker, **kw)
    try:
        yield monitor
    finally:
        monitor.stop()


def rss_mb(pid: int) -> float:
    return proc_kb(pid, "VmRSS") / 1024


@pytest.mark.parametrize("protocol", ["auto", "3.1.1"])
def test_a_flood_of_oversized_messages_costs_the_monitor_no_memory(tmp_path: Path, protocol: str) -> None:
    """Once, twelve 1–20 MB messages took the monitor from 55 to 315 MB, never released."""
    with (
        Broker(tmp_path, message_size_limit=0) as broker,
        monitor_on(tmp_path, broker, protocol=protocol) as m,
    ):
        before = rss_mb(m.pid)
        topics = ("ecpm/v1/results/p1/t1", "ecpm/v1/status/p1")
        flood = [(topics[i % 2], b"{" * size) for i, size in enumerate(flood_sizes(12))]
        good = ProbeSim("p1").result("t1", "pass", datetime.now(UTC))
        asyncio.run(publish(broker.port, [*flood, ("ecpm/v1/results/p1/t1", good.to_json())]))
        wait_for(lambda: m.stored() == 1, 30, "the valid result after the flood")
        peak = proc_kb(m.pid, "VmHWM") / 1024
        after = rss_mb(m.pid)
        assert after - before < 25, (before, after)
        assert peak < before + 40, (before, peak)
        if protocol == "3.1.1":  # delivered cut, and rejected
            wait_for(lambda: m.rejected().get("too_large") == 12.0, 10, "12 too_large")
        else:  # never delivered at all
            assert "too_large" not in m.rejected()
            assert broker.log.read_text(errors="replace").count("Dropping too large outgoing PUBLISH") == 12


def test_draining_a_backlog_keeps_the_monitor_rss_bounded(tmp_path: Path) -> None:
    """Once, draining a 100,000-result backlog peaked at 532 MB. 20,000 results of
    5.6 KB (108 MB) peaked at 216 MB before the client's queue was bounded, 59 MB after."""
    n = 20_000
    payloads = padded_results(n, 5000)
    with Broker(tmp_path) as broker, monitor_on(tmp_path, broker) as m:
        m.process.stop()  # away: its persistent session (and shared subscription) stays
        asyncio.run(publish(broker.port, [("ecpm/v1/results/p1/t1", p) for p in payloads]))
        m.process.start()
        peak = 0.0
        deadline = time.monotonic() + 240
        while m.stored() < n:
            assert time.monotonic() < deadline, f"stored {m.stored()} of {n}"
            assert m.process.proc.poll() is None, m.process.text()[-2000:]
            peak = max(peak, rss_mb(m.pid))
            time.sleep(0.05)
        peak = max(peak, proc_kb(m.pid, "VmHWM") / 1024)
    assert peak < 160, f"peak RSS {peak:.0f} MB draining {n} results"


# ------------------------------------------------------------------ signed status end to end


PUBLISHER = textwrap.dedent(
    """
    import asyncio, signal, sys
    from ecpm.settings import MqttSettings
    from probes.mqtt import Publisher
    from probes.outbox import Outbox
    port, outbox, key = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    box = Outbox(outbox, max_results=100)
    async def main():
        pub = Publisher(settings=MqttSettings(port=port, keepalive="60s"), probe_id="p1", outbox=box,
                        on_command=lambda c: None, targets=["t1"], key=key)
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, lambda: loop.create_task(pub.stop(drain=1.0)))
        await pub.run()
    asyncio.run(main())
    """
)


def start_probe(port: int, workdir: Path) -> subprocess.Popen[bytes]:
    """The real probe publisher (``probes.mqtt.Publisher``) for p1, in its own process."""
    return subprocess.Popen(
        [sys.executable, "-c", PUBLISHER, str(port), str(workdir / "outbox.db"), key_for("p1")], cwd=ROOT
    )


def test_signed_status_and_last_will_end_to_end_and_forgeries_change_nothing(tmp_path: Path) -> None:
    with Broker(tmp_path, persistence=True) as broker, monitor_on(tmp_path, broker) as m:
        seen = Subscriber(broker, "ecpm/v1/status/p1", tmp_path / "statuses.txt")
        probe = start_probe(broker.port, tmp_path)
        try:
            wait_for(lambda: m.probe("p1")["online"] is True, 20, "p1 online from its signed status")
            assert m.probe("p1")["targets"] == ["t1"]
            online = seen.payloads()[-1]
            assert json.loads(online)["schema"] == "ecpm.status/1"

            # anyone who can publish on the topic, without the key: unsigned, forged, oversized
            now = datetime.now(UTC)
            unsigned = json.dumps({"online": False, "probe": "p1", "reason": "x", "version": "0"})
            forged_p2 = StatusSim("p2", key="guess").online(now)
            asyncio.run(
                publish(
                    broker.port,
                    [
                        ("ecpm/v1/status/p1", unsigned.encode()),
                        ("ecpm/v1/status/p1", StatusSim("p1", key="guess").offline(now)),
                        ("ecpm/v1/status/p1", b"{" * (64 * 1024)),  # over the 48 KiB status limit
                        ("ecpm/v1/status/p2", forged_p2),
                    ],
                    retain=True,
                )
            )
            with contextlib.suppress(aiomqtt.MqttError, TimeoutError):  # the broker refuses it
                asyncio.run(publish(broker.port, [("ecpm/v1/status/p1", b"{" * 2_300_000)], wait=3))
            want = {"schema": 1.0, "signature": 2.0, "too_large": 1.0}
            wait_for(lambda: m.rejected() == want, 10, f"rejections {want}")
            assert m.probe("p1")["online"] is True and m.probe("p2")["online"] is None
            assert "p2" not in m.target()["covering_probes"]

            # the probe dies: the broker publishes its Last Will, signed when it connected
            probe.send_signal(signal.SIGKILL)
            probe.wait(5)
            wait_for(lambda: m.probe("p1")["online"] is False, 20, "the signed Last Will")
            will = json.loads(seen.payloads()[-1])
            assert (will["online"], will["reason"], will["at"]) == (
                False,
                "connection_lost",
                will["connected_at"],
            )

            # an old signed "online", replayed (and retained), cannot bring it back, even
            # across a monitor restart (the order is stored with the batch)
            asyncio.run(publish(broker.port, [("ecpm/v1/status/p1", online)], retain=True))
            wait_for(lambda: m.rejected().get("stale") == 1.0, 10, "the replay refused as stale")
            m.restart()
            wait_for(lambda: m.rejected().get("stale") == 1.0, 10, "the retained replay refused again")
            assert m.probe("p1")["online"] is False
        finally:
            if probe.poll() is None:
                probe.kill()
                probe.wait(5)
            seen.stop()


def test_a_clean_stop_publishes_a_signed_offline(tmp_path: Path) -> None:
    with Broker(tmp_path) as broker, monitor_on(tmp_path, broker) as m:
        probe = start_probe(broker.port, tmp_path)
        try:
            wait_for(lambda: m.probe("p1")["online"] is True, 20, "p1 online")
            probe.send_signal(signal.SIGTERM)  # Publisher.stop(): a signed offline, then disconnect
            assert probe.wait(15) == 0
        finally:
            if probe.poll() is None:
                probe.kill()
                probe.wait(5)
        wait_for(lambda: m.probe("p1")["online"] is False, 20, "p1 offline")
        assert m.rejected() == {}


def test_the_shipped_broker_limit_is_above_anything_a_probe_publishes() -> None:
    """deploy/ sets message_size_limit; mosquitto 2.0.11 disconnects a publisher over it, so
    it must exceed the largest result (far-end text in every detail value, 4-byte UTF-8),
    status and command a probe can send, and the largest payload the monitor accepts."""
    conf = (ROOT / "deploy" / "mosquitto" / "mosquitto.conf").read_text(encoding="utf-8")
    limits = [int(line.split()[1]) for line in conf.splitlines() if line.startswith("message_size_limit ")]
    assert len(limits) == 1
    now = datetime.now(UTC)
    worst = CheckOutcome(
        check="invite",
        outcome="fail",
        started_at=now,
        finished_at=now,
        stage="answer",
        reason="sip_error",
        sip_status=500,
        sip_reason="\U0001f600" * 1000,
        timings={f"stage_{i}": 1.0 for i in range(40)},
        detail={f"k{i:062d}": "\U0001f600" * 2000 for i in range(40)},
    )
    result = Result.from_outcome(worst, probe="p" * 63, seq=2**53, target="t" * 63, key="k")
    targets = [f"{i:063d}" for i in range(MAX_STATUS_TARGETS)]
    status = StatusSim("p" * 63).online(now, targets)
    largest = max(len(result.to_json()), len(status), MAX_COMMAND_BYTES, MonitorIngest().max_payload_bytes)
    assert len(status) <= MAX_STATUS_BYTES
    assert limits[0] > largest, (limits[0], largest)
