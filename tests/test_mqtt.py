"""The MQTT publisher against a real mosquitto: order, signatures, outages, Last Will, commands."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiomqtt
import pytest

from ecpm.settings import MqttSettings, TlsFiles
from probes.mqtt import Command, Publisher, PublisherError, parse_command
from probes.outbox import Outbox
from probes.outcome import CheckOutcome
from probes.result import Result, parse_result
from probes.result import verify_signature as verify
from tests.support.brokers import Broker
from tests.support.mqtt import accept, eventually, publishing, settings

ROOT = Path(__file__).resolve().parent.parent
KEY = b"probe-key"
T0 = datetime(2024, 5, 1, tzinfo=UTC)
pytestmark = pytest.mark.peers("mosquitto")


def maker(target: str = "t1") -> Callable[[int], Result]:
    outcome = CheckOutcome(
        check="invite", outcome="pass", started_at=T0, finished_at=T0, timings={"answer": 0.25}
    )

    def make(seq: int) -> Result:
        return Result.from_outcome(outcome, probe="p1", seq=seq, target=target, key=KEY)

    return make


@dataclass
class Watcher:
    """A separate client subscribed to ecpm/v1/#, reconnecting with a persistent session."""

    b: Broker
    messages: list[aiomqtt.Message] = field(default_factory=list)
    subscribed: asyncio.Event = field(default_factory=asyncio.Event)

    async def run(self) -> None:
        while True:
            try:
                async with aiomqtt.Client(
                    self.b.host,
                    self.b.port,
                    identifier="test-watcher",
                    clean_session=False,
                    protocol=aiomqtt.ProtocolVersion.V311,
                ) as client:
                    await client.subscribe("ecpm/v1/#", qos=1)
                    self.subscribed.set()
                    async for message in client.messages:
                        self.messages.append(message)
            except aiomqtt.MqttError:
                self.subscribed.clear()
                await asyncio.sleep(0.05)

    def results(self) -> list[Result]:
        return [parse_result(bytes(m.payload)) for m in self.messages if "/results/" in str(m.topic)]  # type: ignore[arg-type]

    def statuses(self) -> list[dict[str, Any]]:
        return [json.loads(m.payload) for m in self.messages if "/status/" in str(m.topic)]  # type: ignore[arg-type]


@contextlib.asynccontextmanager
async def watching(b: Broker) -> AsyncIterator[Watcher]:
    watcher = Watcher(b)
    task = asyncio.create_task(watcher.run())
    await asyncio.wait_for(watcher.subscribed.wait(), 5)
    try:
        yield watcher
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def test_results_arrive_in_order_signed_without_gaps(broker: Broker, tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.db", max_results=10_000)

    async def main() -> None:
        for i in range(150):  # waiting before the publisher starts
            await box.add(maker(f"t{i % 3}"))
        async with watching(broker) as w:
            pub = Publisher(
                settings=settings(broker),
                probe_id="p1",
                outbox=box,
                on_command=accept,
                key=KEY,
                targets=["t0", "t1", "t2"],
            )
            async with publishing(pub):
                for _ in range(150):  # and while it runs
                    await box.add(maker("t1"))
                await eventually(lambda: len(w.results()) >= 300 and box.depth() == 0)
                assert pub.stats().connected and pub.stats().protocol == "5"
            results = w.results()
            assert [r.seq for r in results] == list(range(1, 301))
            assert len({r.id for r in results}) == 300
            assert all(verify(r, KEY) for r in results)
            topics = [str(m.topic) for m in w.messages if "/results/" in str(m.topic)]
            assert topics[:3] == ["ecpm/v1/results/p1/t0", "ecpm/v1/results/p1/t1", "ecpm/v1/results/p1/t2"]
            assert all(m.qos == 1 and not m.retain for m in w.messages if "/results/" in str(m.topic))
            assert pub.stats().published_total == 300
            statuses = w.statuses()
            assert statuses[0]["online"] is True and statuses[0]["targets"] == ["t0", "t1", "t2"]
            assert statuses[-1]["online"] is False and statuses[-1]["reason"] == "shutdown"
            assert box.stats().acked_total == 300

    asyncio.run(main())
    box.close()


def test_broker_outage_loses_nothing(tmp_path: Path) -> None:
    b = Broker(tmp_path, persistence=True)  # the watcher's session (and queue) survives the restart
    b.start()
    box = Outbox(tmp_path / "o.db", max_results=10_000)

    async def produce(stop: asyncio.Event) -> None:
        while not stop.is_set():
            await box.add(maker())
            await asyncio.sleep(0.005)

    async def main() -> None:
        async with watching(b) as w:
            pub = Publisher(
                settings=settings(b),
                probe_id="p1",
                outbox=box,
                on_command=accept,
                key=KEY,
                backoff_initial=0.2,
                backoff_max=0.5,
            )
            async with publishing(pub):
                stop = asyncio.Event()
                producer = asyncio.create_task(produce(stop))
                await eventually(lambda: len(w.results()) >= 50)
                b.stop()
                await eventually(lambda: not pub.stats().connected)
                before = box.depth()
                await asyncio.sleep(1.5)
                assert box.depth() > before + 50  # the outbox absorbs the outage
                b.start()
                await asyncio.sleep(0.5)
                stop.set()
                await producer
                last = box.stats().last_seq
                await eventually(
                    lambda: box.depth() == 0 and {r.seq for r in w.results()} >= set(range(1, last + 1)), 20
                )
            stats = pub.stats()
            assert stats.connects_total >= 2
            results = w.results()
            first_seen: dict[int, str] = {}
            for r in results:
                assert first_seen.setdefault(r.seq, r.id) == r.id  # a repeat is the same result
            order = list(first_seen)
            assert order == sorted(order) == list(range(1, last + 1))  # in order, no gap
            assert all(verify(r, KEY) for r in results)

    try:
        asyncio.run(main())
    finally:
        b.stop()
        box.close()


def test_a_killed_probe_goes_offline_by_last_will(broker: Broker, tmp_path: Path) -> None:
    child = textwrap.dedent(
        f"""
        import asyncio
        from ecpm.settings import MqttSettings
        from probes.mqtt import Publisher
        from probes.outbox import Outbox
        box = Outbox({str(tmp_path / "child.db")!r}, max_results=100)
        async def main():
            pub = Publisher(settings=MqttSettings(host={broker.host!r}, port={broker.port}, keepalive="60s"),
                            probe_id="doomed", outbox=box, on_command=lambda c: None, targets=["t1"],
                            key={KEY!r})
            await pub.run()
        asyncio.run(main())
        """
    )

    async def main() -> None:
        async with watching(broker) as w:
            proc = await asyncio.create_subprocess_exec(sys.executable, "-c", child, cwd=ROOT)
            try:
                await eventually(lambda: any(s["online"] and s["probe"] == "doomed" for s in w.statuses()))
                os.kill(proc.pid, signal.SIGKILL)
                await eventually(lambda: not w.statuses()[-1]["online"], 5)
            finally:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
            last = w.statuses()[-1]
            assert last == {**last, "online": False, "probe": "doomed", "reason": "connection_lost"}
            will = [m for m in w.messages if "/status/" in str(m.topic)][-1]
            assert str(will.topic) == "ecpm/v1/status/doomed"
        # a newcomer sees the retained offline status
        async with aiomqtt.Client(broker.host, broker.port) as client:
            await client.subscribe("ecpm/v1/status/doomed", qos=1)
            async with asyncio.timeout(5):
                message = await anext(aiter(client.messages))
            assert message.retain and json.loads(message.payload)["online"] is False  # type: ignore[arg-type]

    asyncio.run(main())


def test_commands_are_checked_counted_and_never_crash(broker: Broker, tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.db", max_results=100)
    got: list[Command] = []

    def on_command(cmd: Command) -> str | None:
        if cmd.target == "boom":
            raise RuntimeError("handler bug")
        if cmd.target not in ("t1", "t2"):
            return "unknown_target"
        got.append(cmd)
        return None

    sends: list[tuple[str, bytes | str, bool]] = [
        ("ecpm/v1/commands/p1", json.dumps({"target": "t1", "check": "invite", "request_id": "r1"}), False),
        ("ecpm/v1/commands/all", json.dumps({"target": "t2", "check": "options"}), False),
        ("ecpm/v1/commands/p1", json.dumps({"target": "t1", "check": "invite", "request_id": "r1"}), False),
        ("ecpm/v1/commands/p1", b"{not json", False),
        ("ecpm/v1/commands/p1", b"\xff\xfe\x00", False),
        ("ecpm/v1/commands/p1", json.dumps([1, 2]), False),
        ("ecpm/v1/commands/p1", json.dumps({"target": "t1", "check": "subscribe"}), False),
        ("ecpm/v1/commands/p1", json.dumps({"target": "t1", "check": "invite", "x": 1}), False),
        ("ecpm/v1/commands/p1", json.dumps({"target": "T 1", "check": "invite"}), False),
        ("ecpm/v1/commands/p1", json.dumps({"target": "t1", "check": "invite", "request_id": 5}), False),
        ("ecpm/v1/commands/p1", b"{" + b" " * 5000 + b"}", False),
        ("ecpm/v1/commands/p1", json.dumps({"target": "nope", "check": "invite"}), False),
        ("ecpm/v1/commands/p1", json.dumps({"target": "boom", "check": "invite"}), False),
        ("ecpm/v1/commands/other-probe", json.dumps({"target": "t1", "check": "invite"}), False),
        ("ecpm/v1/commands/p1", json.dumps({"target": "t1", "check": "options", "request_id": "r9"}), False),
    ]

    async def main() -> None:
        async with watching(broker) as w:
            async with aiomqtt.Client(broker.host, broker.port) as sender:
                # left retained on the command topic: it would fire on every (re)connect
                await sender.publish(
                    "ecpm/v1/commands/p1", json.dumps({"target": "t1", "check": "invite"}), qos=1, retain=True
                )
            pub = Publisher(
                settings=settings(broker), probe_id="p1", outbox=box, on_command=on_command, key=KEY
            )
            async with publishing(pub):
                await eventually(lambda: pub.stats().connected)
                async with aiomqtt.Client(broker.host, broker.port) as sender:
                    for topic, payload, retain in sends:
                        await sender.publish(topic, payload, qos=1, retain=retain)
                await eventually(lambda: pub.stats().commands_accepted_total == 3)
                await eventually(lambda: sum(pub.stats().commands_refused_total.values()) == 12)
                # still alive and publishing
                await box.add(maker())
                await eventually(lambda: len(w.results()) == 1)
                stats = pub.stats()
        assert [(c.target, c.check, c.request_id, c.broadcast) for c in got] == [
            ("t1", "invite", "r1", False),
            ("t2", "options", None, True),
            ("t1", "options", "r9", False),
        ]
        assert stats.commands_refused_total == {
            "duplicate": 1,
            "json": 2,
            "encoding": 1,
            "check": 1,
            "fields": 3,
            "too_large": 1,
            "unknown_target": 1,
            "error": 1,
            "retained": 1,
        }

    asyncio.run(main())
    box.close()


def test_parse_command_reasons() -> None:
    ok = parse_command(b'{"target":"t1","check":"invite","request_id":"verify-1"}', broadcast=True)
    assert ok == Command("t1", "invite", "verify-1", True)
    for payload, reason in [
        (b'{"check":"invite"}', "fields"),
        (b'{"target":"t1"}', "fields"),
        (b'{"target":"t1","check":"INVITE"}', "check"),
        (b'{"target":"t1","check":"invite","request_id":"a b"}', "fields"),
        (b"[" * 100_000, "too_large"),
        (b"[" * 4000, "json"),  # deep nesting is refused, not a crash
    ]:
        with pytest.raises(Exception) as caught:
            parse_command(payload, broadcast=False)
        assert getattr(caught.value, "reason", None) == reason, payload[:40]


async def _v311_only_proxy(upstream: tuple[str, int]) -> tuple[asyncio.Server, int]:
    """A listener that refuses MQTT 5 CONNECTs as a 3.1.1-only broker does, else forwards."""

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.close()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readexactly(1)  # CONNECT fixed header, then a varint length
        length, shift = 0, 0
        while True:
            byte = await reader.readexactly(1)
            head += byte
            length |= (byte[0] & 0x7F) << shift
            shift += 7
            if not byte[0] & 0x80:
                break
        body = await reader.readexactly(length)
        if body[6] == 5:  # protocol level after the 2+4 byte protocol name "MQTT"
            writer.write(b"\x20\x02\x00\x01")  # CONNACK: unacceptable protocol version
            await writer.drain()
            writer.close()
            return
        up_reader, up_writer = await asyncio.open_connection(*upstream)
        up_writer.write(head + body)
        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


def test_auto_falls_back_to_mqtt_311(broker: Broker, tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.db", max_results=100)

    async def main() -> None:
        server, port = await _v311_only_proxy((broker.host, broker.port))
        async with server, watching(broker) as w:
            pub = Publisher(
                settings=MqttSettings(host="127.0.0.1", port=port),
                probe_id="p1",
                outbox=box,
                on_command=accept,
                key=KEY,
            )
            async with publishing(pub):
                await box.add(maker())
                await eventually(lambda: len(w.results()) == 1)
                assert pub.stats().protocol == "3.1.1"
                assert pub.stats().connection_failures_total == 1
            strict = Publisher(
                settings=MqttSettings(host="127.0.0.1", port=port, protocol="5"),
                probe_id="p2",
                outbox=box,
                on_command=accept,
                key=KEY,
                backoff_initial=0.05,
            )
            async with publishing(strict):
                await eventually(lambda: strict.stats().connection_failures_total >= 2)
                assert not strict.stats().connected  # "5" means 5: no fallback

    asyncio.run(main())
    box.close()


def test_stop_while_the_broker_is_down_is_prompt(tmp_path: Path) -> None:
    b = Broker(tmp_path)  # never started
    box = Outbox(tmp_path / "o.db", max_results=100)

    async def main() -> None:
        pub = Publisher(
            settings=settings(b), probe_id="p1", outbox=box, on_command=accept, key=KEY, backoff_initial=5
        )
        task = asyncio.create_task(pub.run())
        await eventually(lambda: pub.stats().connection_failures_total >= 1)
        await box.add(maker())
        await pub.stop()
        await asyncio.wait_for(task, 2)
        assert box.depth() == 1  # kept for next time
        assert "refused" in (pub.stats().last_error or "").lower()

    asyncio.run(main())
    box.close()


def test_set_targets_republishes_status(broker: Broker, tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.db", max_results=100)

    async def main() -> None:
        async with watching(broker) as w:
            pub = Publisher(
                settings=settings(broker),
                probe_id="p1",
                outbox=box,
                on_command=accept,
                key=KEY,
                targets=["a"],
            )
            async with publishing(pub):
                await eventually(lambda: len(w.statuses()) == 1)
                pub.set_targets(["a", "b"])
                await eventually(lambda: len(w.statuses()) == 2)
            assert [s["online"] for s in w.statuses()] == [True, True, False]
            assert w.statuses()[1]["targets"] == ["a", "b"]

    asyncio.run(main())
    box.close()


def _certs(d: Path) -> dict[str, str]:
    """A CA, a server certificate for 127.0.0.1 and a client certificate (openssl CLI)."""

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True)

    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    openssl(
        "req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.crt", "-subj", "/CN=ecpm test CA", "-days", "1"
    )
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    for name, extra in (("server", ("-extfile", "san.ext")), ("client", ())):
        openssl("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}")
        openssl(
            "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
            "-CAcreateserial", "-out", f"{name}.crt", "-days", "1", *extra,
        )  # fmt: skip
    return {n: str(d / n) for n in ("ca.crt", "server.crt", "server.key", "client.crt", "client.key")}


@pytest.mark.peers("mosquitto", "openssl", "mosquitto_passwd")
def test_tls_with_client_certificate_and_password(tmp_path: Path) -> None:
    certs = _certs(tmp_path)
    passwords = tmp_path / "passwords"
    passwords.write_text("p1:s3cret\n")
    subprocess.run(["mosquitto_passwd", "-U", str(passwords)], check=True)
    b = Broker(
        tmp_path,
        anonymous=False,
        extra=[
            f"cafile {certs['ca.crt']}",
            f"certfile {certs['server.crt']}",
            f"keyfile {certs['server.key']}",
            "require_certificate true",
            f"password_file {passwords}",
        ],
    )
    tls = TlsFiles(ca_file=certs["ca.crt"], cert_file=certs["client.crt"], key_file=certs["client.key"])
    box = Outbox(tmp_path / "o.db", max_results=100)

    async def main() -> None:
        good = Publisher(
            settings=settings(b, tls=tls, username="p1", password="s3cret"),
            probe_id="p1",
            outbox=box,
            on_command=accept,
            key=KEY,
        )
        async with publishing(good):
            await box.add(maker())
            await eventually(lambda: good.stats().published_total == 1 and box.depth() == 0)
        wrong = Publisher(
            settings=settings(b, tls=tls, username="p1", password="wrong"),
            probe_id="p1",
            outbox=box,
            on_command=accept,
            key=KEY,
            backoff_initial=0.05,
        )
        async with publishing(wrong):
            await eventually(lambda: wrong.stats().connection_failures_total >= 2)
            assert not wrong.stats().connected
        no_cert = Publisher(
            settings=settings(b, tls=TlsFiles(ca_file=certs["ca.crt"]), username="p1", password="s3cret"),
            probe_id="p1",
            outbox=box,
            on_command=accept,
            key=KEY,
            backoff_initial=0.05,
            connect_timeout=0.5,  # the broker's TLS alert never becomes a CONNACK
        )
        async with publishing(no_cert):
            await eventually(lambda: no_cert.stats().connection_failures_total >= 2)
            assert not no_cert.stats().connected

    with b:
        asyncio.run(main())
    box.close()
    with pytest.raises(PublisherError, match="cannot load certificates"):
        Publisher(
            settings=settings(b, tls=TlsFiles(ca_file=str(tmp_path / "missing.crt"))),
            probe_id="p1",
            outbox=box,
            on_command=accept,
            key=KEY,
        )
