"""Monitor replicas on one PostgreSQL store (docs/scaling.md): one probe's results split
between two monitors keep one sequence book, one evaluator is elected and fails over,
an incident is opened and a page claimed once, a broken connection is reopened; and
SQLite refuses a second monitor on its file."""

from __future__ import annotations

import threading
from contextlib import closing
from datetime import timedelta
from pathlib import Path

import psycopg
import pytest

from monitor.core import MonitorCore
from monitor.store import StoreError, StoreLost, open_store
from monitor.store.postgres import PostgresStore
from monitor.store.sqlite import SqliteStore
from probes.delivery import OutboxHealth
from probes.status import Status
from tests.support.monitor import Clock, ProbeSim, StatusSim
from tests.support.monitor import make_core as make
from tests.support.processes import wait_for


def feed(core: MonitorCore, sim: ProbeSim, outcome: str, clock: Clock, **kw: object) -> None:
    result = sim.result("t1", outcome, clock(), **kw)  # type: ignore[arg-type]
    assert core.handle(sim.topic("t1"), result.to_json()) is None
    core.store.commit()


def test_one_probes_results_split_between_replicas_keep_one_sequence_book(postgres_url: str) -> None:
    clock = Clock()
    a, _, _ = make(postgres_url, clock)
    b, _, _ = make(postgres_url, clock)
    sim = ProbeSim("p1")
    results = [sim.result("t1", "pass", clock()) for _ in range(5)]
    topic = sim.topic("t1")
    assert a.handle(topic, results[0].to_json()) is None
    a.store.commit()
    # seq 2 at a, not committed yet, while seq 3 reaches b: b reads the book after a commits
    assert a.handle(topic, results[1].to_json()) is None
    at_b = threading.Thread(target=lambda: (b.handle(topic, results[2].to_json()), b.store.commit()))
    at_b.start()
    at_b.join(0.5)
    a.store.commit()
    at_b.join(10)
    assert not at_b.is_alive()
    # out of order between them: seq 5 first (a gap), then seq 4 fills it
    assert b.handle(topic, results[4].to_json()) is None
    b.store.commit()
    assert a.store.outstanding() == {"p1": 1}
    assert a.handle(topic, results[3].to_json()) is None
    a.store.commit()
    assert b.store.outstanding() == {}
    assert b.store.contiguous_seq("p1") == 5 and a.store.last_seq("p1") == 5


def test_a_probes_first_results_split_lower_seq_second_fill_the_head(postgres_url: str) -> None:
    clock = Clock()
    a, _, _ = make(postgres_url, clock)
    b, _, _ = make(postgres_url, clock)
    probe = StatusSim("p1")
    probe.connected_at = clock()
    outbox = OutboxHealth(
        unpublished=2, unconfirmed=0, last_seq=2, confirmed_seq=0, lost=0, evicted=0, overflow=0,
        oldest_age=None, error=None, gone=(),
    )  # fmt: skip
    status = Status.make(
        probe="p1", online=True, reason=None, version="0.1.0", started_at=clock(), connected_at=clock(),
        at=clock(), targets=("t1",), key=probe.key, outbox=outbox,
    ).to_json()  # fmt: skip
    for core in (a, b):  # the retained status reaches every replica
        assert core.handle(probe.topic(), status) is None
        core.store.commit()
    sim = ProbeSim("p1")
    first, second = (sim.result("t1", "pass", clock()) for _ in range(2))
    assert b.handle(sim.topic("t1"), second.to_json()) is None  # seq 2 is stored first
    b.store.commit()
    assert a.handle(sim.topic("t1"), first.to_json()) is None  # seq 1: the head, not seq_reused
    a.store.commit()
    assert a.store.outstanding() == {} and b.store.contiguous_seq("p1") == 2


def test_one_evaluator_opens_the_incident_the_other_shows_it_and_takes_over(postgres_url: str) -> None:
    clock = Clock()
    a, _, pages_a = make(postgres_url, clock)
    b, _, pages_b = make(postgres_url, clock)
    with closing(a.store.election()) as leader, closing(b.store.election()) as follower:
        a.evaluator, b.evaluator = leader.held(), follower.held()
        assert (a.evaluator, b.evaluator) == (True, False)
        sim = ProbeSim("p1")
        feed(a, sim, "pass", clock)
        assert b.evaluate(clock()).targets["t1"].state == "up"  # a's result, followed by b
        clock.advance(10)
        feed(b, sim, "fail", clock)
        clock.advance(2)
        feed(a, sim, "fail", clock, confirm=True)
        assert b.evaluate(clock()).targets["t1"].state == "down"
        assert pages_b == [] and b.store.open_incidents() == []  # b records nothing
        assert a.evaluate(clock()).targets["t1"].state == "down"
        assert pages_a == [(1, "down", "trigger")]
        snapshot = b.evaluate(clock())
        assert snapshot.targets["t1"].open_incident == 1
        assert snapshot.targets["t1"].since == a.evaluate(clock()).targets["t1"].since
        leader.close()  # a dies: its session, and the lock with it, is gone (once the server sees it)
        b.evaluator = wait_for(follower.held, 10, "b holding the evaluator's lock")
        clock.advance(10)
        feed(b, sim, "fail", clock)
        assert b.evaluate(clock()).targets["t1"].state == "down"
        assert pages_b == []  # the incident stands: not opened twice
        clock.advance(10)
        feed(a, sim, "pass", clock)
        assert b.evaluate(clock()).targets["t1"].state == "up"
        assert pages_b == [(1, "down", "resolve")]
    assert [(i.id, i.resolved_at is not None) for i in b.store.incidents()] == [(1, True)]


def test_a_page_is_claimed_by_one_connection_and_let_go_when_it_dies(postgres_url: str) -> None:
    clock = Clock()
    core, _, _ = make(
        postgres_url, clock, notifiers=[{"type": "webhook", "name": "hook", "url": "http://h/"}]
    )
    sim = ProbeSim("p1")
    for confirm in (False, True):
        feed(core, sim, "fail", clock, confirm=confirm)
    incident = core.evaluate(clock()).open_incidents[0]
    with core.store.transaction():
        assert core.store.enqueue_notification(incident.id, "hook", "trigger", {"k": 1}, clock())
    first, second = open_store(postgres_url), open_store(postgres_url)
    due = first.due_notifications(clock())
    assert len(due) == 1
    held = first.claim_notification(due[0].id, clock())
    mine = held.__enter__()
    assert mine is not None and mine.payload == {"k": 1}
    with second.claim_notification(due[0].id, clock()) as theirs:
        assert theirs is None  # held by the first: skipped, not waited for
    first.close()  # killed mid-send: the lock goes with its session (once the server sees it)
    with pytest.raises(StoreLost):
        held.__exit__(None, None, None)

    def send() -> bool:
        with second.claim_notification(due[0].id, clock()) as theirs:
            if theirs is not None:
                second.mark_notification(theirs.id, state="sent", attempts=1, at=clock())
            return theirs is not None

    wait_for(send, 10, "the page free for the second connection")
    with second.claim_notification(due[0].id, clock() + timedelta(days=1)) as again:
        assert again is None  # sent: no one sends it again
    second.close()


def test_a_broken_connection_raises_store_lost_and_reconnects(postgres_url: str) -> None:
    store = open_store(postgres_url)
    assert isinstance(store, PostgresStore)
    store.set_mark("before", "1")
    store.commit()
    pid = store._db.conn.info.backend_pid
    with psycopg.connect(postgres_url, autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
    with pytest.raises(StoreLost):
        store.set_mark("lost", "1")
    store.reconnect()
    assert store.mark("before") == "1" and store.mark("lost") is None
    store.close()


def test_sqlite_takes_one_monitor_per_file(tmp_path: Path) -> None:
    path = tmp_path / "monitor.db"
    first = SqliteStore(path)
    with closing(first.election()) as sole:
        assert sole.held()
        with pytest.raises(StoreError, match="one SQLite file takes one monitor"):
            SqliteStore(path).election()
    SqliteStore(path).election().close()  # free again once the first let go
    first.close()
