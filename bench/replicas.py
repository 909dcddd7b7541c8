"""Monitor ingest from a backlog: SQLite vs PostgreSQL, one vs two replicas, vs a plain subscriber.

    .venv/bin/python bench/replicas.py [--n 5000]

Each setup drains the same backlog: its monitors (real ``ecpm monitor`` subprocesses,
MQTT 5 persistent sessions, shared subscription ``$share/ecpm/...``) subscribe and store
each probe's first result, are stopped, N signed results (tests.support.monitor.ProbeSim,
5 probes) are published to mosquitto, and the monitors are started again, together: the
broker hands each session its queued share. The clock runs from the first row stored
after every monitor has subscribed to the last (the store polled every 10 ms), so
start-up is not counted; CPU is the monitors' own over the same span, and on PostgreSQL
the server's too (the postmaster and its backends). Setups: ``sqlite`` (one monitor),
``postgres`` (one), ``postgres x2`` (two replicas on one database). Peer, in the same
run: a plain aiomqtt QoS 1 subscriber with a persistent session, in its own process,
draining a backlog of the same N payloads. PostgreSQL is the tests' own cluster
(``tests/support/postgres.py``: a unix socket, ``fsync=off``, as SQLite's
``synchronous=NORMAL`` does not sync each commit either).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import aiomqtt

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import monitor_memory  # noqa: E402
from bench.ingest import cpu_seconds  # noqa: E402
from bench.outbox_drain import publish_plain  # noqa: E402
from tests.support.brokers import Broker  # noqa: E402
from tests.support.monitor import ProbeSim, key_for  # noqa: E402
from tests.support.net import HOST, free_port  # noqa: E402
from tests.support.postgres import Cluster, _bindir  # noqa: E402

PROBES = [f"p{i}" for i in range(1, 6)]
PEER_TOPIC = "peer/v1/results/p1/t1"


def monitor_config(name: str, port: int, store: str) -> str:
    where = (
        f"{{backend: postgres, url: '{store}'}}" if store.startswith("postgresql") else f"{{path: {store}}}"
    )
    probes = ", ".join(f"{{id: {p}, key: {key_for(p)}}}" for p in PROBES)
    return (
        f"kind: monitor\nid: {name}\nmqtt: {{host: {HOST}, port: {port}}}\nstore: {where}\n"
        f'http: {{listen: "{HOST}:{free_port()}"}}\nprobes: [{probes}]\n'
        "targets: [{id: t1, interval: 10s}]\n"
    )


class Monitor(monitor_memory.Monitor):
    """One ``ecpm monitor`` subprocess on ``store`` (a SQLite file or a PostgreSQL URL);
    ``start()`` returns once it has subscribed."""

    def __init__(self, tmp: Path, name: str, port: int, store: str) -> None:
        super().__init__(tmp, port, "auto", name)
        self.config.write_text(monitor_config(name, port, store), encoding="utf-8")


def tree_cpu(root: int) -> float:
    """CPU seconds of ``root`` and its children (the postmaster and its backends)."""
    total = 0.0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(entry.name) == root or int(fields[1]) == root:
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def measure(
    count: Callable[[], int], n: int, cpu: Callable[[], float], *, before: int
) -> tuple[float, float]:
    """(results/s, CPU seconds) from the first row stored beyond ``before`` to the Nth."""
    deadline = time.monotonic() + 60
    while (first := count()) == before:
        if time.monotonic() > deadline:
            raise RuntimeError("nothing stored")
        time.sleep(0.01)
    start, cpu0 = time.monotonic(), cpu()
    while (stored := count()) < n:
        if time.monotonic() > deadline + 60:
            raise RuntimeError(f"stored {stored} of {n}")
        time.sleep(0.01)
    return (n - first) / (time.monotonic() - start), cpu() - cpu0


def backlog(sims: list[ProbeSim], n: int) -> list[tuple[str, bytes]]:
    now = datetime.now(UTC)
    return [(sims[i % 5].topic("t1"), sims[i % 5].result("t1", "pass", now).to_json()) for i in range(n)]


async def publish(port: int, messages: list[tuple[str, bytes]]) -> None:
    async with aiomqtt.Client(HOST, port, protocol=aiomqtt.ProtocolVersion.V5) as client:
        client.pending_calls_threshold = 12
        feed = iter(messages)

        async def worker() -> None:
            for topic, payload in feed:
                await client.publish(topic, payload, qos=1)

        await asyncio.gather(*(worker() for _ in range(10)))


def counter(store: str) -> Callable[[], int]:
    """Rows in the store's ``results``, read as the bench polls it."""
    if store.startswith("postgresql"):
        import psycopg  # noqa: PLC0415 - the postgres extra

        reader = psycopg.connect(store, autocommit=True)
        return lambda: int(reader.execute("SELECT count(*) FROM results").fetchone()[0])
    db = sqlite3.connect(store, check_same_thread=False)
    return lambda: int(db.execute("SELECT count(*) FROM results").fetchone()[0])


def run_setup(
    tmp: Path, port: int, store: str, replicas: int, n: int, *, server: int | None
) -> tuple[float, float, float]:
    """(results/s, monitors' CPU µs per result, server CPU µs per result)."""
    monitors = [Monitor(tmp, f"m{i}", port, store) for i in range(1, replicas + 1)]
    sims = [ProbeSim(p) for p in PROBES]
    count = counter(store)
    for m in monitors:  # subscribe (the sessions) and store each probe's first result
        m.start()
    asyncio.run(publish(port, backlog(sims, len(sims))))
    measure(count, len(sims), lambda: 0.0, before=0)
    for m in monitors:  # then away while the backlog is published
        m.stop()
    asyncio.run(publish(port, backlog(sims, n)))
    try:
        starts = [threading.Thread(target=m.start) for m in monitors]  # together: each its share
        for thread in starts:
            thread.start()
        for thread in starts:
            thread.join()
        pids = [m.pid for m in monitors]
        cpu0 = tree_cpu(server) if server else 0.0
        rate, cpu = measure(count, len(sims) + n, lambda: sum(cpu_seconds(p) for p in pids), before=count())
        return rate, cpu / n * 1e6, ((tree_cpu(server) if server else 0.0) - cpu0) / n * 1e6
    except RuntimeError:
        for m in monitors:
            print(m.log.read_text(errors="replace")[-3000:], file=sys.stderr)
        raise
    finally:
        for m in monitors:
            m.stop()


def peer_main(port: int, n: int, phase: str) -> None:
    """``--peer``: subscribe with a persistent session and leave (phase ``subscribe``), or
    come back and drain N queued messages (``drain``), printing (results/s, CPU s)."""

    async def go() -> None:
        client = aiomqtt.Client(
            HOST, port, identifier="bench-peer", protocol=aiomqtt.ProtocolVersion.V5,
            clean_start=False, properties=_expiry(),
        )  # fmt: skip
        async with client:
            if phase == "subscribe":
                await client.subscribe(PEER_TOPIC, qos=1)
                return
            got, start, cpu0 = 0, 0.0, 0.0
            async for _ in client.messages:
                if got == 0:
                    start, cpu0 = time.monotonic(), time.process_time()
                got += 1
                if got == n:
                    break
            print(
                json.dumps({"rate": (n - 1) / (time.monotonic() - start), "cpu": time.process_time() - cpu0})
            )

    asyncio.run(go())


def _expiry() -> object:
    from paho.mqtt.packettypes import PacketTypes  # noqa: PLC0415
    from paho.mqtt.properties import Properties  # noqa: PLC0415

    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = 3600
    return props


def run_peer(port: int, n: int) -> tuple[float, float]:
    peer = [sys.executable, __file__, "--peer", str(port), str(n)]
    subprocess.run([*peer, "subscribe"], check=True, timeout=30)
    payloads = [payload for _, payload in backlog([ProbeSim(p) for p in PROBES], n)]
    asyncio.run(publish_plain(port, PEER_TOPIC, payloads))
    done = subprocess.run([*peer, "drain"], check=True, timeout=300, capture_output=True, text=True)
    got = json.loads(done.stdout.splitlines()[-1])
    return float(got["rate"]), float(got["cpu"]) / n * 1e6


def main(n: int) -> None:
    rows: list[tuple[str, float, float, float]] = []
    with tempfile.TemporaryDirectory(prefix="ecpm-bench-") as tmp_name:
        tmp = Path(tmp_name)
        bindir = _bindir()
        if bindir is None:
            raise SystemExit("PostgreSQL's initdb/pg_ctl not found (apt-get install postgresql)")
        pg_root = Path(tempfile.mkdtemp(prefix="ecpm-bench-pg-"))
        cluster = Cluster(bindir, pg_root, "postgres" if os.geteuid() == 0 else None)
        cluster.start()
        try:
            postmaster = int((cluster.data / "postmaster.pid").read_text().split()[0])
            with Broker(tmp, max_queued_messages=max(n * 2, 1000)) as broker:
                peer_rate, peer_cpu = run_peer(broker.port, n)
                rows.append(("peer (plain subscriber)", peer_rate, peer_cpu, 0.0))
                for label, backend, replicas in (
                    ("sqlite", "sqlite", 1),
                    ("postgres", "postgres", 1),
                    ("postgres x2 replicas", "postgres", 2),
                ):
                    setup = tmp / label.replace(" ", "-")
                    setup.mkdir()
                    store = str(setup / "monitor.db")
                    if backend == "postgres":
                        store = cluster.url(cluster.create_database())
                    server = postmaster if backend == "postgres" else None
                    rate, cpu, server_cpu = run_setup(setup, broker.port, store, replicas, n, server=server)
                    rows.append((label, rate, cpu, server_cpu))
        finally:
            cluster.stop()
            shutil.rmtree(pg_root, ignore_errors=True)
    print(f"replicas: a backlog of {n} signed results (5 probes), QoS 1, drained from mosquitto")
    print(f"{'':26} {'results/s':>10} {'vs peer':>8} {'CPU µs/result':>14} {'+ server':>9}")
    for label, rate, cpu, server in rows:
        print(f"{label:26} {rate:10.0f} {rate / peer_rate:7.2f}x {cpu:14.0f} {server:9.0f}")


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--peer":
        peer_main(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
        raise SystemExit(0)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--n", type=int, default=5000, help="results in the backlog")
    main(parser.parse_args().n)
