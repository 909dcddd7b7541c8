"""The monitor keeping up with the broker, vs a plain aiomqtt subscriber.

    .venv/bin/python bench/ingest.py [--n 10000] [--rounds 2] [--protocol auto|5|3.1.1]

ecpm: a real ``ecpm monitor`` subprocess (persistent MQTT 5 session, shared
subscription ``$share/ecpm/...``, each message checked, signature verified, stored
in SQLite with its hash chain, acknowledged after the commit) is running; this
process publishes N signed results (tests.support.monitor.ProbeSim) to mosquitto
with one aiomqtt client, QoS 1, 10 in flight, and the clock stops when the
monitor's ``results`` table (read-only, polled every 10 ms) holds all N. Peer: the
same N payloads, published the same way to a topic the monitor does not hear,
received by a plain aiomqtt QoS 1 subscriber in its own process. Rounds alternate
the order; the best round of each is shown. CPU is each receiving process's own.
The monitor's peak RSS is its VmHWM once subscribed and again at the end.
``--protocol 3.1.1`` runs the monitor on MQTT 3.1.1 (``auto`` picks 5 on mosquitto),
where mosquitto caps unacknowledged deliveries at ``max_inflight_messages`` (20).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.outbox_drain import Subscriber, publish_plain, vmhwm_kb  # noqa: E402
from tests.support.brokers import Broker  # noqa: E402
from tests.support.monitor import ProbeSim, key_for  # noqa: E402
from tests.support.net import HOST, free_port  # noqa: E402

TOPIC = "ecpm/v1/results/p1/t1"
PEER_TOPIC = "peer/v1/results/p1/t1"  # same length and shape; the monitor is not subscribed
CONFIG = """kind: monitor
id: bench
mqtt: {{host: {host}, port: {port}, protocol: "{protocol}"}}
store: {{path: {db}}}
http: {{listen: "{host}:{http}"}}
probes: [{{id: p1, key: {key}}}]
targets: [{{id: t1, interval: 10s}}]
"""


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


class Monitor:
    """``ecpm monitor`` in a subprocess, connected and subscribed when constructed."""

    def __init__(self, tmp: Path, port: int, protocol: str) -> None:
        self.db = tmp / "monitor.db"
        config = tmp / "monitor.yaml"
        config.write_text(
            CONFIG.format(
                host=HOST, port=port, protocol=protocol, db=self.db, http=free_port(), key=key_for("p1")
            ),
            encoding="utf-8",
        )
        self.log = tmp / "monitor.log"
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "ecpm", "--log-level", "info", "monitor", "-c", str(config)],
                cwd=ROOT,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 30
        while "subscribed to" not in self.log.read_text(errors="replace"):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"monitor did not start: {self.log.read_text(errors='replace')}")
            time.sleep(0.05)
        self.reader = sqlite3.connect(f"file:{self.db}?mode=ro", uri=True)
        self.idle_kb = vmhwm_kb(str(self.proc.pid))

    def stored(self) -> int:
        return int(self.reader.execute("SELECT count(*) FROM results").fetchone()[0])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


async def monitor_round(monitor: Monitor, port: int, payloads: list[bytes]) -> tuple[float, float, float]:
    """(msg/s stored, CPU µs per message in the monitor, publisher msg/s)."""
    target = monitor.stored() + len(payloads)
    cpu, start = cpu_seconds(monitor.proc.pid), time.monotonic()
    await publish_plain(port, TOPIC, payloads)
    published = time.monotonic()
    deadline = published + 90
    while monitor.stored() < target:
        if time.monotonic() > deadline or monitor.proc.poll() is not None:
            raise RuntimeError(f"monitor stored {monitor.stored()} of {target}")
        await asyncio.sleep(0.01)
    end, cpu = time.monotonic(), cpu_seconds(monitor.proc.pid) - cpu
    n = len(payloads)
    return n / (end - start), cpu / n * 1e6, n / (published - start)


async def peer_round(port: int, payloads: list[bytes]) -> tuple[float, float, float]:
    """(msg/s received, CPU µs per message in the subscriber, publisher msg/s)."""
    with Subscriber(port, PEER_TOPIC, len(payloads)) as sub:
        start = time.monotonic()
        await publish_plain(port, PEER_TOPIC, payloads)
        published = time.monotonic()
        got = sub.finish(timeout=90)
    n = len(payloads)
    return n / (got["last"] - start), got["cpu"] / n * 1e6, n / (published - start)


async def main(n: int, rounds: int, protocol: str) -> None:
    sim = ProbeSim("p1")
    batches = [
        [sim.result("t1", "pass", datetime.now(UTC)).to_json() for _ in range(n)] for _ in range(rounds)
    ]
    ours, peers = [], []
    with tempfile.TemporaryDirectory(prefix="ecpm-bench-") as tmp, Broker(Path(tmp)) as broker:
        monitor = Monitor(Path(tmp), broker.port, protocol)
        try:
            for i, batch in enumerate(batches):  # alternate the order
                if i % 2:
                    ours.append(await monitor_round(monitor, broker.port, batch))
                peers.append(await peer_round(broker.port, batch))
                if not i % 2:
                    ours.append(await monitor_round(monitor, broker.port, batch))
            idle, hwm = monitor.idle_kb, vmhwm_kb(str(monitor.proc.pid))
        finally:
            monitor.stop()
    e_rate, e_cpu, e_pub = max(o[0] for o in ours), min(o[1] for o in ours), max(o[2] for o in ours)
    p_rate, p_cpu, p_pub = max(p[0] for p in peers), min(p[1] for p in peers), max(p[2] for p in peers)
    print(
        f"ingest: {n} signed results per round ({len(batches[0][0])} B), QoS 1, {rounds} rounds,"
        f" monitor mqtt.protocol {protocol}"
    )
    print(f"{'':38} {'monitor':>10} {'peer':>10} {'ratio':>7}")
    rows = [
        ("msg/s received (monitor: stored)", e_rate, p_rate),
        ("CPU µs per message (receiving proc)", e_cpu, p_cpu),
        ("publisher msg/s in the same round", e_pub, p_pub),
    ]
    for name, e, p in rows:
        print(f"{name:38} {e:10.0f} {p:10.0f} {e / p:6.2f}x")
    print(f"monitor peak RSS (VmHWM): {idle / 1024:.0f} MB after startup, {hwm / 1024:.0f} MB at the end")
    print(
        "rounds (msg/s monitor / peer): "
        + ", ".join(f"{o[0]:.0f} / {p[0]:.0f}" for o, p in zip(ours, peers, strict=True))
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--n", type=int, default=10_000, help="results per round")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of monitor and peer (best shown)")
    parser.add_argument(
        "--protocol", choices=["auto", "5", "3.1.1"], default="auto", help="monitor's mqtt.protocol"
    )
    args = parser.parse_args()
    asyncio.run(main(args.n, args.rounds, args.protocol))
