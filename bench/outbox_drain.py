"""Draining the probe's outbox through a real mosquitto, vs a plain aiomqtt publisher.

    .venv/bin/python bench/outbox_drain.py [--n 10000] [--rounds 3] [--pairs 2000]

ecpm: N signed results (tests.support.monitor.ProbeSim) are stored in a probe
``Outbox`` (SQLite, synchronous=FULL), then the real ``Publisher`` drains it to
mosquitto (MQTT 5, QoS 1, 10 in flight, each result marked published after its PUBACK);
the clock stops when nothing is unpublished and a subscriber (its own process) has all N.
Peer: one aiomqtt client publishing the same N payloads to the same topic, QoS 1,
10 in flight, to the same broker and subscriber. Each round runs both (in
alternating order); the best round of each is shown. Also, without a broker:
a result's whole outbox life per second (``add``, ``mark_published`` on the PUBACK,
``confirm`` on the monitor's ack: three transactions), vs the same SQL in plain sqlite3
with the same PRAGMAs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import aiomqtt

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.emit import emit  # noqa: E402
from ecpm.settings import MqttSettings  # noqa: E402
from probes.mqtt import Publisher  # noqa: E402
from probes.outbox import Outbox  # noqa: E402
from probes.result import Result  # noqa: E402
from tests.support.brokers import Broker  # noqa: E402
from tests.support.monitor import ProbeSim  # noqa: E402
from tests.support.net import HOST  # noqa: E402

TOPIC = "ecpm/v1/results/p1/t1"
IN_FLIGHT = 10


def results(n: int) -> list[Result]:
    sim, now = ProbeSim("p1"), datetime.now(UTC)
    return [sim.result("t1", "pass", now) for _ in range(n)]  # seq 1..n


def already(result: Result) -> Callable[[int], Result]:
    """``make(seq)`` for ``Outbox.add`` returning a result signed beforehand (seq matches)."""
    return lambda seq: result


def vmhwm_kb(pid: str = "self") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


# ------------------------------------------------------------------ subscriber process


def subscribe(port: int, topic: str, n: int) -> None:
    """``--subscriber``: print "ready" after SUBACK; after N messages, the times of the
    first and last, peak RSS and CPU seconds since "ready" (JSON)."""

    async def run() -> None:
        async with (
            asyncio.timeout(120),  # never outlives the benchmark, whatever happens to it
            aiomqtt.Client(HOST, port, protocol=aiomqtt.ProtocolVersion.V5) as client,
        ):
            await client.subscribe(topic, qos=1)
            print("ready", flush=True)
            cpu, count, first = time.process_time(), 0, 0.0
            async for _ in client.messages:
                count += 1
                first = first or time.monotonic()
                if count >= n:
                    break
            last, cpu = time.monotonic(), time.process_time() - cpu
            print(json.dumps({"first": first, "last": last, "hwm_kb": vmhwm_kb(), "cpu": cpu}), flush=True)

    asyncio.run(run())


class Subscriber:
    """A plain aiomqtt QoS 1 subscriber in its own process, ready when constructed."""

    def __init__(self, port: int, topic: str, n: int) -> None:
        cmd = [sys.executable, __file__, "--subscriber", str(port), topic, str(n)]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        if self.proc.stdout.readline().strip() != "ready":
            self.stop()
            raise RuntimeError("subscriber did not start")

    def finish(self, timeout: float = 60.0) -> dict[str, float]:
        """Wait for all N; "last" is when it had them (time.monotonic is system-wide)."""
        try:
            out, _ = self.proc.communicate(timeout=timeout)
        finally:
            self.stop()
        return dict(json.loads(out.splitlines()[-1]))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)

    def __enter__(self) -> Subscriber:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


async def publish_plain(port: int, topic: str, payloads: list[bytes]) -> None:
    """The peer publisher: one aiomqtt client, QoS 1, ``IN_FLIGHT`` publishes awaiting PUBACK."""
    feed: Iterator[bytes] = iter(payloads)
    async with aiomqtt.Client(HOST, port, protocol=aiomqtt.ProtocolVersion.V5) as client:
        client.pending_calls_threshold = IN_FLIGHT + 2  # as the Publisher does

        async def worker() -> None:
            for payload in feed:
                await client.publish(topic, payload, qos=1)

        await asyncio.gather(*(worker() for _ in range(IN_FLIGHT)))


# ------------------------------------------------------------------ the two publishers


async def fill(box: Outbox, batch: list[Result]) -> float:
    """Store every result, one ``add`` (one fsync'd transaction) each; return adds/s."""
    start = time.perf_counter()
    for result in batch:
        await box.add(already(result))
    return len(batch) / (time.perf_counter() - start)


async def ecpm_round(port: int, path: Path, batch: list[Result]) -> tuple[float, float, float]:
    """(msg/s, CPU µs per message in this process, adds/s while filling)."""
    box = Outbox(path, max_results=len(batch) + 1)
    try:
        add_rate = await fill(box, batch)
        with Subscriber(port, TOPIC, len(batch)) as sub:
            publisher = Publisher(
                settings=MqttSettings(host=HOST, port=port),
                probe_id="p1",
                outbox=box,
                on_command=lambda command: None,
                key="bench-key",
                targets=["t1"],
            )
            cpu, start = time.process_time(), time.monotonic()
            task = asyncio.create_task(publisher.run())
            async with asyncio.timeout(90):
                while box.depth():  # noqa: ASYNC110 - no event tells when acks are deleted
                    await asyncio.sleep(0.005)
            emptied, cpu = time.monotonic(), time.process_time() - cpu
            await publisher.stop(drain=1.0)
            await task
            end = max(emptied, sub.finish()["last"])
    finally:
        box.close()
    return len(batch) / (end - start), cpu / len(batch) * 1e6, add_rate


async def peer_round(port: int, payloads: list[bytes]) -> tuple[float, float]:
    """(msg/s, CPU µs per message in this process)."""
    with Subscriber(port, TOPIC, len(payloads)) as sub:
        cpu, start = time.process_time(), time.monotonic()
        await publish_plain(port, TOPIC, payloads)
        cpu = time.process_time() - cpu
        end = sub.finish()["last"]
    return len(payloads) / (end - start), cpu / len(payloads) * 1e6


# ------------------------------------------------------------------ add+ack without a broker


async def outbox_pairs(path: Path, batch: list[Result]) -> float:
    box = Outbox(path, max_results=len(batch) + 1)
    try:
        start = time.perf_counter()
        for result in batch:
            stored = await box.add(already(result))
            await box.mark_published([stored.id])  # the broker's PUBACK
            await box.confirm(stored.seq)  # the monitor's ack
        return len(batch) / (time.perf_counter() - start)
    finally:
        box.close()


def sqlite_pairs(path: Path, batch: list[Result]) -> float:
    db = sqlite3.connect(path, isolation_level=None)
    for pragma in ("locking_mode=EXCLUSIVE", "journal_mode=WAL", "synchronous=FULL"):
        db.execute(f"PRAGMA {pragma}")
    db.execute("CREATE TABLE meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL)")
    db.execute(
        "CREATE TABLE outbox (seq INTEGER PRIMARY KEY, id TEXT NOT NULL UNIQUE, probe TEXT NOT NULL,"
        " target TEXT NOT NULL, created REAL NOT NULL, payload BLOB NOT NULL,"
        " published INTEGER NOT NULL DEFAULT 0)"
    )
    db.execute("CREATE INDEX outbox_unpublished ON outbox (published, seq)")
    db.execute("INSERT INTO meta VALUES ('seq', 0)")
    db.execute("INSERT INTO meta VALUES ('confirmed', 0)")
    start = time.perf_counter()
    for r in batch:
        db.execute("BEGIN IMMEDIATE")
        db.execute("SELECT value FROM meta WHERE name='seq'").fetchone()
        db.execute(
            "INSERT INTO outbox VALUES (?, ?, ?, ?, ?, ?, 0)",
            (r.seq, r.id, r.probe, r.target, time.time(), r.to_json()),
        )
        db.execute("UPDATE meta SET value=? WHERE name='seq'", (r.seq,))
        db.execute("COMMIT")
        db.execute("BEGIN IMMEDIATE")
        db.execute("UPDATE outbox SET published = 1 WHERE published = 0 AND id IN (?)", (r.id,))
        db.execute("COMMIT")
        db.execute("BEGIN IMMEDIATE")
        db.execute("DELETE FROM outbox WHERE seq <= ?", (r.seq,))
        db.execute("UPDATE meta SET value = max(value, ?) WHERE name = 'confirmed'", (r.seq,))
        db.execute("COMMIT")
    rate = len(batch) / (time.perf_counter() - start)
    db.close()
    return rate


async def main(n: int, rounds: int, pairs: int) -> None:
    batch = results(n)
    payloads = [r.to_json() for r in batch]
    with tempfile.TemporaryDirectory(prefix="ecpm-bench-") as tmp, Broker(Path(tmp)) as broker:
        ours, peers = [], []
        for i in range(rounds):  # alternate the order: load from elsewhere hits both alike
            if i % 2:
                peers.append(await peer_round(broker.port, payloads))
            ours.append(await ecpm_round(broker.port, Path(tmp) / f"outbox-{i}.db", batch))
            if not i % 2:
                peers.append(await peer_round(broker.port, payloads))
        small = batch[:pairs]
        box_pairs = await outbox_pairs(Path(tmp) / "pairs.db", small)
        raw_pairs = sqlite_pairs(Path(tmp) / "raw.db", small)
    e_rate, e_cpu, add_rate = (max(o[0] for o in ours), min(o[1] for o in ours), max(o[2] for o in ours))
    p_rate, p_cpu = max(p[0] for p in peers), min(p[1] for p in peers)
    print(f"outbox drain: {n} signed results ({len(payloads[0])} B), MQTT 5 QoS 1, {IN_FLIGHT} in flight")
    print(f"{'':40} {'ecpm':>10} {'peer':>10} {'ratio':>7}")
    print(f"{'msg/s to the subscriber':40} {e_rate:10.0f} {p_rate:10.0f} {e_rate / p_rate:6.2f}x")
    print(f"{'CPU µs per message (publishing process)':40} {e_cpu:10.0f} {p_cpu:10.0f} {e_cpu / p_cpu:6.2f}x")
    print(f"{'outbox add+ack pairs/s (sqlite3 peer)':40} {box_pairs:10.0f} {raw_pairs:10.0f}", end="")
    print(f" {box_pairs / raw_pairs:6.2f}x")
    print(f"{'outbox adds/s while filling':40} {add_rate:10.0f} {'-':>10}")
    emit("outbox_drain", msg_s=e_rate, peer_msg_s=p_rate, cpu_us=e_cpu, peer_cpu_us=p_cpu,
         life_s=box_pairs, peer_life_s=raw_pairs)  # fmt: skip
    print(
        "rounds (msg/s ecpm / peer): "
        + ", ".join(f"{o[0]:.0f} / {p[0]:.0f}" for o, p in zip(ours, peers, strict=True))
    )


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--subscriber":
        subscribe(int(sys.argv[2]), sys.argv[3], int(sys.argv[4]))
        sys.exit(0)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--n", type=int, default=10_000, help="results to drain")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of ecpm and peer (best shown)")
    parser.add_argument("--pairs", type=int, default=2000, help="add+ack pairs timed without a broker")
    args = parser.parse_args()
    asyncio.run(main(args.n, args.rounds, min(args.pairs, args.n)))
