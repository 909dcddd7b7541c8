"""The monitor's memory draining a backlog and under a flood of oversized messages.

    .venv/bin/python bench/monitor_memory.py [--backlog 100000] [--pad 5000] [--flood 12]
                                             [--protocol auto|5|3.1.1] [--skip-peers]

Backlog: a real ``ecpm monitor`` subprocess subscribes (persistent session, shared
subscription) and stops; N signed results, each padded with ``detail`` to about
``--pad`` bytes, are published to mosquitto while it is away; then the monitor starts
again and drains them. Its RSS (``/proc/PID/status`` VmRSS) is sampled every 20 ms
until its ``results`` table holds all N; the peak (VmHWM), the RSS at the end and the
drain rate are printed. Peers, draining the same N payloads from their own
persistent sessions in the same run: ``mosquitto_sub -c -q 1 -C N`` (C, libmosquitto)
and a plain aiomqtt subscriber (persistent session, automatic acknowledgements, no
Receive Maximum, no bound on its queue: what the library does by default).

Flood: a fresh monitor on a broker *without* ``message_size_limit`` (so only the
monitor's own defences apply: MQTT 5 Maximum Packet Size on CONNECT, and the
client-side read bound on 3.1.1) receives ``--flood`` messages of 1–20 MB on its
results and status topics, then one valid result; the clock stops when that result is
stored. Peer: ``mosquitto_sub`` subscribed to the same topics, no packet limit.

All on 127.0.0.1; the broker and every process started here are stopped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiomqtt

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from probes.outcome import CheckOutcome, MediaStats  # noqa: E402
from probes.result import Result  # noqa: E402
from tests.support.brokers import Broker  # noqa: E402
from tests.support.monitor import key_for  # noqa: E402
from tests.support.net import HOST, free_port  # noqa: E402

TOPIC = "ecpm/v1/results/p1/t1"
PEER_TOPIC = "peer/v1/results/p1/t1"
CONFIG = """kind: monitor
id: bench
mqtt: {{host: {host}, port: {port}, protocol: "{protocol}", client_id: {client_id}}}
store: {{path: {db}}}
http: {{listen: "{host}:{http}"}}
probes: [{{id: p1, key: {key}}}]
targets: [{{id: t1, interval: 10s}}]
"""
MB = 1024 * 1024


def proc_kb(pid: int, field: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0


class Sampler:
    """Samples a process's VmRSS every 20 ms in a thread; ``peak`` is the highest seen."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, proc_kb(self.pid, "VmRSS"))
            self._stop.wait(0.02)

    def stop(self) -> int:
        self.peak = max(self.peak, proc_kb(self.pid, "VmRSS"))
        self._stop.set()
        self._thread.join()
        return self.peak


def padded_results(n: int, pad: int) -> list[bytes]:
    """N signed results of about ``pad`` bytes (detail values of up to 1,000 characters)."""
    now = datetime.now(UTC)
    detail = {f"pad{i}": "x" * min(1000, pad - i * 1000) for i in range(max(0, pad - 700) // 1000 + 1)}
    out = []
    for seq in range(1, n + 1):
        outcome = CheckOutcome(
            check="invite",
            outcome="pass",
            started_at=now - timedelta(seconds=2),
            finished_at=now,
            sip_status=200,
            sip_reason="OK",
            timings={"transport": 0.001, "trying": 0.002, "ringing": 0.05, "answer": 0.06},
            media=MediaStats(100, 100, 0.0, 0.3, 1.0, 4.3, True, True),
            detail=detail,
        )
        result = Result.from_outcome(outcome, probe="p1", seq=seq, target="t1", key=key_for("p1"))
        out.append(result.to_json())
    return out


async def publish(port: int, topic: str, payloads: list[bytes], in_flight: int = 20) -> None:
    feed = iter(payloads)
    async with aiomqtt.Client(HOST, port, protocol=aiomqtt.ProtocolVersion.V5) as client:
        client.pending_calls_threshold = in_flight + 2

        async def worker() -> None:
            for payload in feed:
                await client.publish(topic, payload, qos=1, timeout=60)

        await asyncio.gather(*(worker() for _ in range(in_flight)))


class Monitor:
    """``ecpm monitor`` in a subprocess; ``start()`` returns once it has subscribed."""

    def __init__(self, tmp: Path, port: int, protocol: str, name: str) -> None:
        self.db = tmp / f"{name}.db"
        self.config = tmp / f"{name}.yaml"
        self.config.write_text(
            CONFIG.format(
                host=HOST,
                port=port,
                protocol=protocol,
                client_id=f"bench-{name}",
                db=self.db,
                http=free_port(),
                key=key_for("p1"),
            ),
            encoding="utf-8",
        )
        self.log = tmp / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> int:
        """Start; return VmRSS (kB) once subscribed."""
        offset = self.log.stat().st_size if self.log.exists() else 0
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "ecpm", "--log-level", "info", "monitor", "-c", str(self.config)],
                cwd=ROOT,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 30
        while "subscribed to" not in self.log.read_bytes()[offset:].decode(errors="replace"):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"monitor did not start: {self.log.read_text(errors='replace')}")
            time.sleep(0.01)
        return proc_kb(self.proc.pid, "VmRSS")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stored(self) -> int:
        if not self.db.exists():
            return 0
        with sqlite3.connect(f"file:{self.db}?mode=ro", uri=True) as db:
            try:
                return int(db.execute("SELECT count(*) FROM results").fetchone()[0])
            except sqlite3.OperationalError:
                return 0

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def mosquitto_sub() -> str:
    found = shutil.which("mosquitto_sub")
    if found is None:
        raise SystemExit("mosquitto_sub is not installed (apt-get install mosquitto-clients)")
    return found


def sub_args(port: int, *more: str) -> list[str]:
    return [mosquitto_sub(), "-h", HOST, "-p", str(port), "-V", "mqttv5", *more]


# ------------------------------------------------------------------ backlog


def wait_until(cond: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.02)


def backlog_monitor(tmp: Path, port: int, protocol: str, payloads: list[bytes]) -> dict[str, float]:
    monitor = Monitor(tmp, port, protocol, "backlog")
    try:
        monitor.start()
        monitor.stop()  # the session stays at the broker, with its (shared) subscription
        asyncio.run(publish(port, TOPIC, payloads))
        idle = monitor.start()
        sampler, start = Sampler(monitor.pid), time.monotonic()
        n = len(payloads)
        wait_until(lambda: monitor.stored() >= n or monitor.proc.poll() is not None, 1800, "the drain")  # type: ignore[union-attr]
        took = time.monotonic() - start
        peak = sampler.stop()
        if monitor.stored() < n:
            raise RuntimeError(f"monitor exited: {monitor.log.read_text(errors='replace')[-2000:]}")
        return {
            "idle_mb": idle / 1024,
            "peak_mb": peak / 1024,
            "hwm_mb": proc_kb(monitor.pid, "VmHWM") / 1024,
            "end_mb": proc_kb(monitor.pid, "VmRSS") / 1024,
            "rate": n / took,
        }
    finally:
        monitor.stop()


def backlog_mosquitto_sub(port: int, payloads: list[bytes]) -> dict[str, float]:
    ident = ["-c", "-i", "bench-peer-sub", "-q", "1", "-t", "peer-sub/#"]
    subprocess.run([*sub_args(port, *ident), "-E"], check=True, timeout=10)  # make the session
    asyncio.run(publish(port, "peer-sub/v1/results/p1/t1", payloads))
    start = time.monotonic()
    proc = subprocess.Popen([*sub_args(port, *ident), "-C", str(len(payloads))], stdout=subprocess.DEVNULL)
    sampler = Sampler(proc.pid)
    proc.wait(1800)
    took = time.monotonic() - start
    return {"peak_mb": sampler.stop() / 1024, "rate": len(payloads) / took}


AIOMQTT_PEER = textwrap.dedent(
    """
    import asyncio, sys, aiomqtt
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties
    port, n, only_session = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "1"
    async def main():
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 3600
        async with aiomqtt.Client("127.0.0.1", port, identifier="bench-peer-aiomqtt",
                                  protocol=aiomqtt.ProtocolVersion.V5, clean_start=False,
                                  properties=props) as client:
            await client.subscribe("peer-aio/#", qos=1)
            if only_session:
                return
            count = 0
            async for _ in client.messages:
                count += 1
                if count >= n:
                    return
    asyncio.run(main())
    """
)


def backlog_aiomqtt(port: int, payloads: list[bytes]) -> dict[str, float]:
    n = str(len(payloads))
    subprocess.run([sys.executable, "-c", AIOMQTT_PEER, str(port), n, "1"], check=True, timeout=30)
    asyncio.run(publish(port, "peer-aio/v1/results/p1/t1", payloads))
    start = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-c", AIOMQTT_PEER, str(port), n, "0"])
    sampler = Sampler(proc.pid)
    proc.wait(1800)
    took = time.monotonic() - start
    return {"peak_mb": sampler.stop() / 1024, "rate": len(payloads) / took}


# ------------------------------------------------------------------ flood


def flood_sizes(count: int) -> list[int]:
    """``count`` sizes spread over 1..20 MB."""
    if count == 1:
        return [20 * MB]
    return [int(MB + i * (19 * MB) / (count - 1)) for i in range(count)]


def flood(tmp: Path, protocol: str, count: int, peers: bool) -> dict[str, float]:
    good = padded_results(1, 600)[0]
    sizes = flood_sizes(count)
    # no broker limit: only the monitor's own defences stand between it and the flood
    (tmp / "flood").mkdir(exist_ok=True)
    with Broker(tmp / "flood", message_size_limit=0) as broker:
        monitor = Monitor(tmp, broker.port, protocol, f"flood-{protocol.replace('.', '')}")
        peer = None
        try:
            idle = monitor.start()
            if peers:
                peer = subprocess.Popen(
                    sub_args(broker.port, "-q", "1", "-t", "ecpm/v1/results/#", "-t", "ecpm/v1/status/+"),
                    stdout=subprocess.DEVNULL,
                )
                peer_sampler = Sampler(peer.pid)
                time.sleep(0.5)
                peer_idle = proc_kb(peer.pid, "VmRSS")
            sampler, start = Sampler(monitor.pid), time.monotonic()
            topics = (TOPIC, "ecpm/v1/status/p1")
            junk = [(topics[i % 2], b"{" * size) for i, size in enumerate(sizes)]

            async def send() -> None:
                async with aiomqtt.Client(HOST, broker.port, protocol=aiomqtt.ProtocolVersion.V5) as c:
                    for topic, payload in junk:
                        await c.publish(topic, payload, qos=1, timeout=60)
                    await c.publish(TOPIC, good, qos=1)

            asyncio.run(send())
            wait_until(lambda: monitor.stored() >= 1, 120, "the valid result after the flood")
            took = time.monotonic() - start
            time.sleep(0.5)
            out = {
                "idle_mb": idle / 1024,
                "peak_mb": sampler.stop() / 1024,
                "end_mb": proc_kb(monitor.pid, "VmRSS") / 1024,
                "seconds": took,
                "total_mb": sum(sizes) / MB,
            }
            if peer is not None:
                time.sleep(1.0)
                out["peer_idle_mb"] = peer_idle / 1024
                out["peer_peak_mb"] = peer_sampler.stop() / 1024
                out["peer_end_mb"] = proc_kb(peer.pid, "VmRSS") / 1024
            return out
        finally:
            monitor.stop()
            if peer is not None and peer.poll() is None:
                peer.terminate()
                peer.wait(5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--backlog", type=int, default=100_000, help="results queued for the monitor")
    parser.add_argument("--pad", type=int, default=5000, help="approximate bytes per result")
    parser.add_argument("--flood", type=int, default=12, help="oversized messages (1-20 MB)")
    parser.add_argument("--protocol", choices=["auto", "5", "3.1.1"], default="auto", help="mqtt.protocol")
    parser.add_argument("--skip-peers", action="store_true", help="measure the monitor only")
    args = parser.parse_args()
    payloads = padded_results(args.backlog, args.pad)
    print(
        f"monitor memory: backlog {args.backlog} results of {len(payloads[0])} B"
        f" ({sum(map(len, payloads)) / MB:.0f} MB), monitor mqtt.protocol {args.protocol},"
        f" Python {sys.version.split()[0]}, pid {os.getpid()}"
    )
    with tempfile.TemporaryDirectory(prefix="ecpm-bench-") as tmp_name:
        tmp = Path(tmp_name)
        if args.backlog:
            # no byte limit on a session's queue: the tests' 512 MiB would drop part of 541 MB
            with Broker(tmp, extra=["max_queued_bytes 0"]) as broker:
                ours = backlog_monitor(tmp, broker.port, args.protocol, payloads)
                print(
                    f"backlog  monitor:        RSS {ours['idle_mb']:.0f} MB after start,"
                    f" peak {ours['peak_mb']:.0f} MB (VmHWM {ours['hwm_mb']:.0f}),"
                    f" {ours['end_mb']:.0f} MB at the end;"
                    f" {ours['rate']:.0f} results stored/s"
                )
                if not args.skip_peers:
                    sub = backlog_mosquitto_sub(broker.port, payloads)
                    print(
                        f"backlog  mosquitto_sub:  peak RSS {sub['peak_mb']:.1f} MB, {sub['rate']:.0f} msg/s;"
                        f" ratio monitor/mosquitto_sub peak {ours['peak_mb'] / sub['peak_mb']:.1f}x"
                    )
                    aio = backlog_aiomqtt(broker.port, payloads)
                    print(
                        f"backlog  plain aiomqtt:  peak RSS {aio['peak_mb']:.0f} MB, {aio['rate']:.0f} msg/s;"
                        f" ratio monitor/aiomqtt peak {ours['peak_mb'] / aio['peak_mb']:.2f}x"
                    )
        if args.flood:
            got = flood(tmp, args.protocol, args.flood, not args.skip_peers)
            line = (
                f"flood    monitor:        {args.flood} messages, {got['total_mb']:.0f} MB in all:"
                f" RSS {got['idle_mb']:.0f} MB before, peak {got['peak_mb']:.0f} MB,"
                f" {got['end_mb']:.0f} MB after; valid result stored {got['seconds']:.1f} s after the first"
            )
            print(line)
            if "peer_peak_mb" in got:
                print(
                    f"flood    mosquitto_sub:  RSS {got['peer_idle_mb']:.1f} MB before, peak"
                    f" {got['peer_peak_mb']:.1f} MB, {got['peer_end_mb']:.1f} MB after;"
                    f" growth monitor / mosquitto_sub {got['peak_mb'] - got['idle_mb']:.1f}"
                    f" / {got['peer_peak_mb'] - got['peer_idle_mb']:.1f} MB"
                )


if __name__ == "__main__":
    main()
