"""Repairing what a broker dropped (replay from the probe's outbox) vs draining what it kept.

    .venv/bin/python bench/replay.py [--n 20000] [--rounds 2] [--queued 1000]

Both runs: a real mosquitto, a real ``ecpm monitor`` subprocess (default config: shared
subscription, persistent session) and a probe's real ``Publisher`` and ``Outbox``
in this process. The monitor stores seq 1, stops; the probe publishes N more results
while it is away; the monitor starts again, one more result follows, and the clock
runs from that start until the monitor's store holds every seq 1..N+2.

- **replay**: the broker queues at most ``--queued`` messages for the absent monitor
  (``max_queued_messages``; mosquitto's default 1,000) and drops the rest: the monitor
  sees the gap, asks the probe to replay it, and the probe sends what it kept again
  (``probes.delivery``). The same bound applies while the replay flows: what the probe
  sends faster than the monitor stores overflows it again and is asked for again.
- **peer, backlog**: the broker queues everything (the shipped 200,000): the monitor
  drains its persistent session, nothing to repair.

Printed: seconds to a complete store, results/s, the ratio replay / backlog, and the
monitor's repaired count. All on 127.0.0.1; every process is stopped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.emit import emit  # noqa: E402
from ecpm.settings import MqttSettings  # noqa: E402
from probes.mqtt import Command, Publisher  # noqa: E402
from probes.outbox import Outbox  # noqa: E402
from probes.outcome import CheckOutcome  # noqa: E402
from probes.result import Result  # noqa: E402
from tests.support.brokers import Broker  # noqa: E402
from tests.support.monitor import key_for  # noqa: E402
from tests.support.net import HOST, free_port  # noqa: E402

KEY = key_for("p1")
CONFIG = """kind: monitor
id: bench
mqtt: {{host: {host}, port: {port}}}
store: {{path: {db}}}
http: {{listen: "{host}:{http}"}}
probes: [{{id: p1, key: {key}}}]
targets: [{{id: t1, interval: 10s}}]
"""


def make(seq: int) -> Result:
    now = datetime.now(UTC)
    outcome = CheckOutcome(check="options", outcome="pass", started_at=now, finished_at=now)
    return Result.from_outcome(outcome, probe="p1", seq=seq, target="t1", key=KEY)


def stored(db: Path) -> int:
    if not db.exists():
        return 0
    with sqlite3.connect(db, timeout=5) as conn:
        try:
            return int(conn.execute("SELECT count(DISTINCT seq) FROM results").fetchone()[0])
        except sqlite3.OperationalError:
            return 0


def repaired(db: Path) -> int:
    with sqlite3.connect(db, timeout=5) as conn:
        return int(conn.execute("SELECT coalesce(sum(repaired), 0) FROM seq_gaps").fetchone()[0])


async def until(cond: Callable[[], bool], limit: float, what: str) -> None:
    try:
        async with asyncio.timeout(limit):
            while not cond():  # noqa: ASYNC110 - the condition lives in another process
                await asyncio.sleep(0.05)
    except TimeoutError:
        raise SystemExit(f"timed out waiting for {what}") from None


def accept(command: Command) -> str | None:
    return None


async def one(tmp: Path, n: int, queued: int) -> tuple[float, int]:
    broker = Broker(tmp, max_queued_messages=queued)
    broker.start()
    db = tmp / "monitor.db"
    conf = tmp / "monitor.yaml"
    log = (tmp / "monitor.log").open("ab")

    def monitor() -> subprocess.Popen[bytes]:
        # a fresh HTTP port at each start: the last one may be taken meanwhile
        conf.write_text(CONFIG.format(host=HOST, port=broker.port, db=db, http=free_port(), key=KEY))
        return subprocess.Popen(
            [sys.executable, "-m", "ecpm", "monitor", "-c", str(conf)], cwd=ROOT, stdout=log, stderr=log
        )

    box = Outbox(tmp / "outbox.db", max_results=10 * n)
    pub = Publisher(
        settings=MqttSettings(host=HOST, port=broker.port),
        probe_id="p1",
        outbox=box,
        on_command=accept,
        key=KEY,
    )
    proc = monitor()
    logged = tmp / "monitor.log"
    task = asyncio.create_task(asyncio.sleep(0))
    try:
        await until(lambda: "connected to MQTT" in logged.read_text(errors="replace"), 30, "the monitor")
        task = asyncio.create_task(pub.run())
        await box.add(make)
        await until(lambda: stored(db) == 1, 30, "the first result")
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
        for _ in range(n):
            await box.add(make)
        await until(lambda: box.depth() == 0, 120, "the probe to publish")
        started = time.monotonic()
        proc = monitor()
        await asyncio.sleep(0.5)
        await box.add(make)  # a result after the gap shows it
        await until(lambda: stored(db) == n + 2 or proc.poll() is not None, 600, "a complete store")
        if proc.poll() is not None:
            raise SystemExit(f"the monitor exited ({proc.returncode}) before its store was complete")
        took = time.monotonic() - started
        return took, repaired(db)
    except SystemExit:
        print((tmp / "monitor.log").read_text(errors="replace")[-3000:], file=sys.stderr)
        raise
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
        await pub.stop(drain=1.0)
        await asyncio.wait_for(task, 15)
        box.close()
        broker.stop()
        log.close()


async def main(n: int, rounds: int, queued: int) -> None:
    best: dict[str, tuple[float, int]] = {}
    for i in range(rounds):
        for name, bound in (("replay", queued), ("backlog", 200_000))[:: 1 if i % 2 == 0 else -1]:
            with tempfile.TemporaryDirectory(prefix="ecpm-bench-") as tmp:
                took, fixed = await one(Path(tmp), n, bound)
            print(f"round {i + 1} {name}: {took:.1f} s, {n / took:,.0f} results/s, repaired {fixed}")
            if name not in best or took < best[name][0]:
                best[name] = (took, fixed)
    replay, backlog = best["replay"], best["backlog"]
    print(f"\n{n} results missing at the monitor's return (best of {rounds})")
    print(f"replay:  {replay[0]:.1f} s to a complete store ({n / replay[0]:,.0f}/s), repaired {replay[1]}")
    print(f"backlog: {backlog[0]:.1f} s to a complete store ({n / backlog[0]:,.0f}/s)")
    print(f"ratio replay / backlog time: {replay[0] / backlog[0]:.2f}x")
    emit("replay", replay_s=replay[0], backlog_s=backlog[0], repaired=replay[1])


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--queued", type=int, default=1000)
    args = parser.parse_args()
    asyncio.run(main(args.n, args.rounds, args.queued))
