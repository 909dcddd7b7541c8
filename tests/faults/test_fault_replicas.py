"""Fault cases of monitor replicas (docs/scaling.md): two ``ecpm monitor`` processes on one
PostgreSQL store and one shared subscription — the evaluator killed with ``kill -9``
mid-stream, PostgreSQL restarted under load, a replica started late.

Run with ``make faults`` (not part of ``make test``); see docs/monitor.md, "Fault suite".
The PostgreSQL cluster is the tests' own (``tests/support/postgres.py``: a unix socket in
a private directory, no TCP).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tests.faults.common import settle
from tests.support.net import HOST, free_port
from tests.support.postgres import Cluster
from tests.support.processes import Process
from tests.support.system import System

pytestmark = [pytest.mark.faults, pytest.mark.peers("mosquitto")]

EVALUATOR = "ecpm_monitor_evaluator"
STORE_UP = "ecpm_monitor_store_up"
RECONNECTS = "ecpm_monitor_store_reconnects_total"
CHECKS = "ecpm_checks_total"


class Replicas(System):
    """``System`` with its monitors on one PostgreSQL database: ``start_replica(name)``
    starts one more (its own id, client id and HTTP port); ``use(name)`` points the
    observing helpers (``state``, ``metric``, ``api``) at that replica."""

    def __init__(self, workdir: Path, url: str, **kw: Any) -> None:
        super().__init__(workdir, **kw)
        self.url = url
        self.replicas: dict[str, Process] = {}
        self.listen: dict[str, str] = {}

    def replica_config(self, name: str) -> dict[str, Any]:
        config = self.monitor_config()
        config["id"] = name
        config["store"] = {"backend": "postgres", "url": self.url, "commit_interval": "100ms"}
        config["http"] = {**config["http"], "listen": self.listen[name]}
        # a dead replica's session takes its round-robin share until it expires (mosquitto
        # 2.0: docs/scaling.md); what it took is then a seq gap the evaluator has replayed
        config["mqtt"] = {**config["mqtt"], "session_expiry": "1m"}
        return config

    def start_replica(self, name: str) -> Process:
        self.listen.setdefault(name, f"{HOST}:{free_port()}")
        self.replicas[name] = Process("monitor", self.replica_config(name), self.workdir, name)
        self.monitor = self.replicas[name]
        self.use(name)
        self.wait_monitor()
        return self.replicas[name]

    def use(self, name: str) -> None:
        self.http = self.listen[name]
        self.monitor = self.replicas[name]

    def metric_of(self, name: str, replica: str) -> float | None:
        return self.metric(name, self.listen[replica])

    def stored(self) -> list[tuple[str, int, str]]:
        with psycopg.connect(self.url) as db:
            rows = db.execute("SELECT probe, seq, id FROM results").fetchall()
        return [(str(p), int(q), str(i)) for p, q, i in rows]

    def incidents(self) -> list[tuple[int, str, str, bool]]:
        with psycopg.connect(self.url) as db:
            rows = db.execute("SELECT id, target, kind, resolved_at IS NOT NULL FROM incidents ORDER BY id")
            return [(int(i), str(t), str(k), bool(r)) for i, t, k, r in rows]

    def __exit__(self, *exc: object) -> None:
        try:
            for replica in self.replicas.values():
                replica.stop()
        finally:
            self.monitor = None
            super().__exit__(*exc)


@pytest.fixture
def replicas(tmp_path: Path, postgres_url: str) -> Iterator[Replicas]:
    with Replicas(tmp_path, postgres_url) as system:
        yield system


def evaluators(system: Replicas) -> dict[str, float | None]:
    return {name: system.metric_of(EVALUATOR, name) for name in system.replicas}


@pytest.mark.timeout(300)
def test_evaluator_kill_9_mid_stream_the_other_carries_on_and_pages_once(replicas: Replicas) -> None:
    system = replicas
    responder = system.add_responder("r1")
    system.add_probe("p1", {"t1": "r1"}, start=False)
    system.add_probe("p2", {"t2": "r1"}, check="options", start=False)
    system.start_replica("m1")  # first: it holds the evaluator's lock
    system.start_replica("m2")
    system.start_probes()
    system.wait_state("t1", "up")
    system.wait_for(lambda: evaluators(system) == {"m1": 1, "m2": 0}, 20, "m1 the evaluator, m2 not")
    responder.set_fault("answer_503")
    receiver = system.receiver
    system.wait_for(lambda: 200 in receiver.answered, 40, "the trigger page answered")
    system.use("m2")
    system.wait_state("t1", "down", timeout=20)  # the replica shows the evaluator's truth
    system.replicas["m1"].kill()
    system.wait_for(lambda: system.metric_of(EVALUATOR, "m2") == 1, 20, "m2 evaluating")
    responder.set_fault("none")
    system.wait_state("t1", "up", timeout=40)
    system.wait_for(lambda: any(b["event"] == "resolve" for b in receiver.bodies), 20, "the resolve page")
    # what m1's session took after the kill is gone at its expiry: gaps, replayed by m2
    settle(system, timeout=150)
    assert system.incidents() == [(1, "t1", "down", True)]
    assert receiver.events() == [("trigger", 1), ("resolve", 1)]


@pytest.mark.timeout(240)
def test_postgres_restarted_under_load_loses_nothing_and_the_replicas_reconnect(
    replicas: Replicas, postgres_cluster: Cluster
) -> None:
    system = replicas
    system.add_responder("r1")
    for probe in ("p1", "p2"):
        system.add_probe(probe, {f"t-{probe}": "r1"}, check="options", start=False)
    system.start_replica("m1")
    system.start_replica("m2")
    system.start_probes()
    system.wait_state("t-p1", "up")
    postgres_cluster.stop()  # immediate: every connection cut, as in a crash
    try:
        system.wait_for(
            lambda: all(system.metric_of(STORE_UP, n) == 0 for n in system.replicas), 30, "store_up 0 on both"
        )
    finally:
        postgres_cluster.serve()  # whatever happens: later tests share the cluster
    system.wait_for(
        lambda: all(system.metric_of(STORE_UP, n) == 1 for n in system.replicas), 60, "store_up 1 again"
    )
    assert all((system.metric_of(RECONNECTS, n) or 0) >= 1 for n in system.replicas)
    system.wait_state("t-p1", "up", timeout=40)
    settle(system, timeout=90)
    assert system.incidents() == []


@pytest.mark.timeout(240)
def test_a_replica_started_late_joins_without_double_counting(replicas: Replicas) -> None:
    system = replicas
    system.add_responder("r1")
    for probe in ("p1", "p2"):
        system.add_probe(probe, {"t1": "r1"}, check="options", start=False)
    system.start_replica("m1")
    system.start_probes()
    system.wait_for(lambda: len(system.stored()) >= 10, 40, "ten results stored by m1 alone")
    system.start_replica("m2")
    system.wait_for(lambda: total(system, CHECKS, "m2") >= 5, 40, "m2 taking its share")
    system.wait_state("t1", "up")  # m2's view, with m1's results in it
    ledger = settle(system)
    assert system.incidents() == []
    stored = sum(len(seqs) for seqs in ledger.stored.values())
    # each result counted by exactly one replica; no history mistaken for a gap
    assert total(system, CHECKS, "m1") + total(system, CHECKS, "m2") == stored
    assert [total(system, "ecpm_results_missing_total", n) for n in ("m1", "m2")] == [0, 0]


def total(system: Replicas, name: str, replica: str) -> float:
    """Every sample of ``name`` on one replica's /metrics, summed over its labels."""
    return sum(v for (n, _), v in system.metrics(system.listen[replica]).items() if n == name)
