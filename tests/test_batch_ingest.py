"""Batched ingest, receive to commit (monitor.service, monitor.store.sql): a batch's
messages are handled at one receive time, stored in one transaction, and acknowledged only
after it committed. A duplicate and a rejected message in a batch count as they do one by
one; a store failure in the middle of a batch loses nothing (the broker delivers it again).
Real mosquitto, real stores (SQLite and PostgreSQL)."""

from __future__ import annotations

import asyncio
import sqlite3
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiomqtt
import psycopg
import pytest
from prometheus_client import CollectorRegistry

from monitor.core import MonitorCore
from monitor.service import MonitorService
from monitor.store import open_store
from monitor.store.records import chain_hash
from probes.wire import canonical, unsigned
from tests.support.brokers import Broker
from tests.support.monitor import Clock, ProbeSim, monitor_config
from tests.support.mqtt import eventually
from tests.support.net import free_port

N = 12  # results in the backlog, seq 1..N


def value(registry: CollectorRegistry, name: str, **labels: str) -> float:
    return registry.get_sample_value(name, labels) or 0.0


def rows(where: str) -> list[tuple[str, int, str, str, str]]:
    """(id, seq, payload, prev_hash, hash) of every stored row, in chain order."""
    sql = "SELECT id, seq, payload, prev_hash, hash FROM results ORDER BY row"
    if where.startswith("postgresql:"):
        with psycopg.connect(where) as db:
            return [tuple(r) for r in db.execute(sql).fetchall()]  # type: ignore[misc]
    with sqlite3.connect(where) as db:
        return [tuple(r) for r in db.execute(sql).fetchall()]


# ---------------------------------------------------------------- the wire form


def test_the_signed_bytes_cut_from_the_wire_form_are_the_canonical_bytes() -> None:
    """``unsigned`` is exact: for results with and without media, detail with quotes and
    non-ASCII text, and an object whose ``sig`` is its first or only member."""
    sim, clock = ProbeSim("p1"), Clock()
    plain = sim.result("t1", "pass", clock.advance(10))
    odd = replace(plain, detail={"note": 'a "quoted" ,"sig":"x" é', "z": "\u2028"}).signed(sim.key)
    for r in (plain, sim.result("t1", "fail", clock.advance(10)), odd):
        assert unsigned(r.to_json(), r.sig) == r.canonical()
        assert r.signature_ok(sim.key, wire=r.to_json())
        assert not replace(r, seq=r.seq + 1).signature_ok(sim.key, wire=replace(r, seq=r.seq + 1).to_json())
    for data in ({"a": 1, "sig": "x", "z": {"sig": "y"}}, {"sig": "ab", "t": '"sig":"ab"'}, {"sig": "é"}):
        wire = canonical(data)
        assert unsigned(wire, str(data["sig"])) == canonical({k: v for k, v in data.items() if k != "sig"})
    # a nested member with the same value: not cut at all (the caller encodes again)
    assert unsigned(canonical({"a": {"sig": "s"}, "sig": "s"}), "s") is None


def test_a_non_canonical_payload_still_verifies_and_a_tampered_one_does_not(tmp_path: Path) -> None:
    clock = Clock()
    config = monitor_config(tmp_path)
    store = open_store(config.store.where)
    core = MonitorCore(config, store, CollectorRegistry(), clock=clock)
    sim = ProbeSim("p1")
    r1, r2 = sim.result("t1", "pass", clock.advance(5)), sim.result("t1", "pass", clock.advance(5))
    spaced = r1.to_json().replace(b'","', b'", "')  # same JSON, not the wire form
    tampered = r2.to_json().replace(b'"outcome":"pass"', b'"outcome":"fail"')
    assert core.handle_batch([(sim.topic("t1"), spaced), (sim.topic("t1"), tampered)]) == [None, "signature"]
    store.commit()
    stored = rows(str(tmp_path / "monitor.db"))
    assert [(r[0], r[2]) for r in stored] == [(r1.id, r1.to_json().decode())]  # stored canonical
    assert store.check_chain().ok


# ---------------------------------------------------------------- one transaction per batch


def test_a_batch_is_one_transaction_with_its_duplicates_and_rejections_counted(store_where: str) -> None:
    """In one batch: a result, its redelivery, another id reusing a seq of the batch, a bad
    signature, then more results; rows are written at the commit (one executemany), the
    chain links them in order, and each counter says what one-by-one handling says."""
    clock = Clock()
    config = monitor_config(store_where)
    registry = CollectorRegistry()
    store = open_store(config.store.where)
    core = MonitorCore(config, store, registry, clock=clock)
    sim, forger = ProbeSim("p1"), ProbeSim("p1", key="not-the-key")
    topic = sim.topic("t1")
    results = [sim.result("t1", "pass", clock.advance(1)) for _ in range(5)]
    reused = ProbeSim("p1")
    reused.seq = 1  # its next result is seq 2 under a new id
    batch = [
        (topic, results[0].to_json()),
        (topic, results[1].to_json()),
        (topic, results[1].to_json()),  # QoS 1 redelivery inside the batch
        (topic, reused.result("t1", "pass", clock()).to_json()),  # seq 2 again, another id
        (topic, forger.result("t1", "pass", clock()).to_json()),
        *[(topic, r.to_json()) for r in results[2:]],
    ]
    assert core.handle_batch(batch) == [None, None, None, "seq_reused", "signature", None, None, None]
    assert len(store._pending) == 5 and rows(store_where) == []  # written at the commit, together
    store.commit()
    stored = rows(store_where)
    assert [r[0] for r in stored] == [r.id for r in results]
    prev = stored[0][3]
    for _, _, payload, prev_hash, digest in stored:
        assert prev_hash == prev and digest == chain_hash(prev_hash, payload)
        prev = digest
    assert value(registry, "ecpm_results_duplicate_total") == 1.0
    assert value(registry, "ecpm_results_rejected_total", reason="seq_reused") == 1.0
    assert value(registry, "ecpm_results_rejected_total", reason="signature") == 1.0
    assert store.last_seq("p1") == 5
    # the batch's start again (a redelivery after the commit): three duplicates, nothing stored
    assert core.handle_batch(batch[:3]) == [None, None, None]
    store.commit()
    assert len(rows(store_where)) == 5
    assert value(registry, "ecpm_results_duplicate_total") == 4.0
    assert store.check_chain().ok
    store.close()


def _fail_once(service: MonitorService, where: str) -> dict[str, int]:
    """Make the store fail while it writes the backlog's seq 6, once: on PostgreSQL a trigger
    kills the writer's own connection; on SQLite a trigger calls a function that raises."""
    fired = {"n": 0}
    if where.startswith("postgresql:"):
        with psycopg.connect(where, autocommit=True) as db:
            db.execute("CREATE SEQUENCE fail_once")
            db.execute(
                "CREATE FUNCTION fail_once() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN"
                " IF NEW.seq = 6 AND nextval('fail_once') = 1 THEN"
                " PERFORM pg_terminate_backend(pg_backend_pid()); END IF; RETURN NEW; END $$"
            )
            db.execute(
                "CREATE TRIGGER fail_once BEFORE INSERT ON results FOR EACH ROW EXECUTE FUNCTION fail_once()"
            )
        return fired

    def boom(seq: int) -> int:
        if seq == 6 and not fired["n"]:
            fired["n"] += 1
            raise OSError("disk full (test)")
        return 0

    db: Any = service.store._db  # type: ignore[attr-defined]
    db.create_function("fail_once", 1, boom)
    db.execute("CREATE TEMP TRIGGER fail_once BEFORE INSERT ON results BEGIN SELECT fail_once(NEW.seq); END")
    return fired


@pytest.mark.peers("mosquitto")
@pytest.mark.parametrize("fail", [False, True], ids=["clean", "store-fails-mid-batch"])
def test_a_backlog_batch_with_a_duplicate_a_rejection_and_a_store_failure_loses_nothing(
    tmp_path: Path, store_where: str, fail: bool
) -> None:
    """The monitor subscribes and stops; N results, a redelivered copy and a forged one wait
    at the broker; it starts again and drains them in batches. With the store failing in
    the middle of a batch, nothing of that batch was acknowledged: the broker delivers it
    again and every result is stored once, in one chain."""
    broker = Broker(tmp_path)
    broker.start()
    config = monitor_config(
        store_where,
        mqtt={"host": broker.host, "port": broker.port, "client_id": "batch-test"},
        http={"listen": f"127.0.0.1:{free_port()}"},
    )
    sim, forger = ProbeSim("p1"), ProbeSim("p1", key="not-the-key")
    now = datetime.now(UTC)
    results = [sim.result("t1", "pass", now - timedelta(seconds=N - i)) for i in range(N)]
    payloads = [r.to_json() for r in results]
    payloads.insert(4, payloads[2])  # seq 3 again
    payloads.insert(7, forger.result("t1", "pass", now).to_json())

    async def run(service: MonitorService, until: Any) -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(service.run(stop))
        try:
            await asyncio.wait_for(service.connected.wait(), 10)
            await until()
        finally:
            stop.set()
            await asyncio.wait_for(task, 10)

    async def main() -> MonitorService:
        async def nothing() -> None:
            return None

        await run(MonitorService(config), nothing)  # the persistent session and its subscription
        async with aiomqtt.Client(broker.host, broker.port, identifier="batch-pub") as pub:
            for payload in payloads:
                await pub.publish(sim.topic("t1"), payload, qos=1)
        service = MonitorService(config)
        fired = _fail_once(service, store_where) if fail else {"n": 0}

        async def drained() -> None:  # read on a connection of its own: the service's may break
            await eventually(lambda: len(rows(store_where)) >= N, 30)
            await asyncio.sleep(0.3)  # anything more would show now

        await run(service, drained)
        if fail and not store_where.startswith("postgresql:"):
            assert fired["n"] == 1
        again = MonitorService(config)  # every message was acknowledged: nothing comes again

        async def a_while() -> None:
            await asyncio.sleep(1.0)

        await run(again, a_while)
        assert value(again.registry, "ecpm_results_duplicate_total") == 0.0
        return service

    try:
        service = asyncio.run(main())
    finally:
        broker.stop()
    assert_drained(service.registry, store_where, fail)


def assert_drained(registry: CollectorRegistry, where: str, fail: bool) -> None:
    """Every result once, in one verified chain; counted as one by one (after a failure
    the redelivered batch counts again)."""
    assert sorted(r[1] for r in rows(where)) == list(range(1, N + 1))
    assert value(registry, "ecpm_monitor_store_reconnects_total") == (1.0 if fail else 0.0)
    duplicates = value(registry, "ecpm_results_duplicate_total")
    forged = value(registry, "ecpm_results_rejected_total", reason="signature")
    assert (duplicates, forged) == (1.0, 1.0) if not fail else duplicates >= 1.0 and forged >= 1.0
    store = open_store(where, read_only=True)
    report = store.check_chain()
    assert report.ok and report.rows == N
    store.close()
