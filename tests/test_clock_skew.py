"""Time is judged by the monitor: each result's judged time, each probe's clock skew —
virtual time, real signed results, real SQLite (a restart is a new ``MonitorCore`` on
the same store)."""

from __future__ import annotations

import csv
import json
import math
import sqlite3
from datetime import datetime, timedelta
from pathlib import Path

import jsonschema
from prometheus_client import CollectorRegistry

from monitor.core import MonitorCore
from monitor.report import TargetInfo, build_report
from monitor.report_render import write
from monitor.skew import SkewEstimator, judge
from monitor.store import SqliteStore
from monitor.store.sql import SCHEMA as store_schema
from probes.result import format_time
from tests.support.hostile import append_raw_row
from tests.support.monitor import T0, Clock, Pages, ProbeSim, make_core, monitor_config, state

FIVE_MIN = timedelta(minutes=5)
REPORT_SCHEMA = json.loads(
    (Path(__file__).resolve().parent.parent / "docs/schema/report-v1.json").read_text()
)


def make(tmp_path: Path, clock: Clock, **kw: object) -> tuple[MonitorCore, CollectorRegistry, Pages]:
    """A core as the service starts it: built, then evaluated once (its first snapshot)."""
    core, registry, pages = make_core(tmp_path, clock, **kw)
    core.evaluate()
    return core, registry, pages


def send(core: MonitorCore, sim: ProbeSim, outcome: str, stamped: datetime, **kw: object) -> None:
    """One result the probe stamped ``stamped`` (its own clock), received now."""
    result = sim.result("t1", outcome, stamped, **kw)  # type: ignore[arg-type]
    assert core.handle(sim.topic("t1"), result.to_json()) is None
    core.store.commit()


def live(
    core: MonitorCore, sim: ProbeSim, clock: Clock, offset: timedelta, *, seconds: int, every: int = 3
) -> None:
    """A probe whose clock is ``offset`` off calling every ``every`` s, each result arriving
    as it finishes, the monitor evaluating every second."""
    for tick in range(seconds):
        if tick % every == 0:
            send(core, sim, "pass", clock.now + offset)
        core.evaluate(clock())
        clock.advance(1)


def skew_gauge(registry: CollectorRegistry, probe: str = "p1") -> float | None:
    return registry.get_sample_value("ecpm_probe_clock_skew_seconds", {"probe": probe})


def stored(core: MonitorCore) -> list[tuple[str, str, str, float | None]]:
    """(finished_at, received_at, judged_at, clock_skew) of every stored row, oldest first."""
    db = core.store._db  # type: ignore[attr-defined]
    return list(
        db.execute("SELECT finished_at, received_at, judged_at, clock_skew FROM results ORDER BY row")
    )


# ------------------------------------------------------------------ the estimate


def test_the_estimate_is_the_largest_sample_of_the_window() -> None:
    est = SkewEstimator(window=timedelta(minutes=5), max_samples=8)
    assert est.estimate("p1", T0) is None
    # live, 300 s slow: every sample is -300 s minus a little transit delay
    assert est.observe("p1", T0 - timedelta(seconds=300.2), T0) == -300.2
    assert est.observe("p1", T0 - timedelta(seconds=297.05), T0 + timedelta(seconds=3)) == -300.05
    # a late result (60 s in transit) does not pull the estimate down
    at = T0 + timedelta(seconds=6)
    assert est.observe("p1", at - timedelta(seconds=360), at) == -300.05
    assert est.estimate("p1", at) == -300.05
    # a clock that steps forward is learned at once; one that steps back only when the
    # higher samples leave the window
    at = T0 + timedelta(seconds=9)
    assert est.observe("p1", at, at) == 0.0
    at = T0 + timedelta(seconds=12)
    assert est.observe("p1", at - FIVE_MIN, at) == 0.0
    # another probe is estimated on its own
    assert est.observe("p2", T0 + timedelta(seconds=40), T0) == 40.0
    assert est.estimate("p1", T0 + timedelta(seconds=12)) == 0.0
    assert est.estimate("p1", T0 + timedelta(seconds=9) + FIVE_MIN + timedelta(seconds=1)) == -300.0


def test_after_a_silent_window_the_last_estimate_carries_over() -> None:
    """A backlog drained oldest first after an outage: every sample is its own delay, so
    the estimate is the skew the probe had before, not the backlog's delays."""
    est = SkewEstimator()
    assert est.observe("p1", T0, T0) == 0.0
    outage_end = T0 + timedelta(minutes=20)
    for n in range(100):  # results of the outage, delivered within a second
        finished = T0 + timedelta(seconds=3 * (n + 1))
        received = outage_end + timedelta(milliseconds=10 * n)
        assert est.observe("p1", finished, received) == 0.0
        assert judge(finished, received, 0.0) == finished  # judged at its own old time
    # a restart rebuilds the same from the store's rows
    again = SkewEstimator()
    again.restore([], {"p1": -300.0})
    assert again.observe("p1", outage_end - timedelta(minutes=10), outage_end) == -300.0


def test_memory_is_bounded() -> None:
    est = SkewEstimator(max_samples=16)
    for n in range(10_000):  # samples falling steadily: every one could still become the maximum
        at = T0 + timedelta(milliseconds=n)
        est.observe("p1", at - timedelta(milliseconds=n), at)
    assert len(est._samples["p1"]) == 16


def test_judged_time_is_never_after_arrival() -> None:
    received = T0
    assert judge(T0 + FIVE_MIN, received, 0.0) == received  # stamped ahead, skew not known
    assert judge(T0 + FIVE_MIN, received, 300.0) == received
    assert judge(T0 - FIVE_MIN, received, -300.0) == received  # slow probe, live result
    assert judge(T0 - timedelta(minutes=10), received, -300.0) == T0 - FIVE_MIN  # ... late by 5 min
    assert judge(T0 - timedelta(minutes=10), received, None) == T0 - timedelta(minutes=10)


# ------------------------------------------------------------------ the monitor


def test_future_stamped_results_are_not_fresh_again_after_a_restart(tmp_path: Path) -> None:
    """Once, results stamped 5 min ahead counted as fresh at every restart (a false
    ``down`` span, a false last success). Judged at arrival and stored so, they cannot."""
    clock = Clock()
    core, registry, pages = make(tmp_path, clock)
    sim = ProbeSim("p1")
    send(core, sim, "pass", clock.now + FIVE_MIN)
    passed_at = clock.now
    clock.advance(10)
    send(core, sim, "fail", clock.now + FIVE_MIN)
    clock.advance(2)
    send(core, sim, "fail", clock.now + FIVE_MIN, confirm=True)
    assert state(core, clock) == "down"
    assert pages == [(1, "down", "trigger")]
    view = core.snapshot().targets["t1"]
    assert view.last_success_at == passed_at  # when it arrived, not 5 min from now
    assert registry.get_sample_value("ecpm_last_success_timestamp_seconds", {"target": "t1"}) == (
        passed_at.timestamp()
    )
    incident = core.store.open_incidents()[0]
    assert incident.last_good_at == passed_at
    assert incident.first_failed_at == passed_at + timedelta(seconds=10 - 2)  # its judged start
    for finished, received, judged, skew in stored(core):
        assert judged == received < finished and skew == 300.0
    core.store.close()

    for _ in range(3):  # restart, again and again, while the stamps are still in the future
        clock.advance(40)
        assert clock.now < T0 + FIVE_MIN
        core, registry, pages = make(tmp_path, clock)
        view = core.snapshot().targets["t1"]
        assert view.state == "unknown", view.why  # no fresh result: 3 x 10 s have passed
        assert view.last_success_at == passed_at
        assert pages == []
        core.store.close()


def test_a_probe_five_minutes_slow_with_live_results_is_up(tmp_path: Path) -> None:
    """Once, a probe clock 5 min slow made the target ``unknown`` and paged a gap while
    its results arrived every 3 s."""
    clock = Clock()
    core, registry, pages = make(tmp_path, clock, reachability={"gap_incident_after": "20s"})
    sim = ProbeSim("p1")
    assert math.isnan(skew_gauge(registry) or 0.0)  # the series exists, NaN until known
    live(core, sim, clock, -FIVE_MIN, seconds=600)
    assert state(core, clock) == "up"
    assert pages == [] and core.store.incidents() == []
    changes = core.store.state_changes(T0 - timedelta(seconds=1))
    assert [(c.state, c.at) for c in changes] == [("unknown", T0), ("up", T0)]  # started with no result
    assert skew_gauge(registry) == -300.0
    assert core.snapshot().probes["p1"].clock_skewed
    last = core.snapshot().targets["t1"].last_success_at
    assert last is not None and clock.now - last <= timedelta(seconds=4)
    core.store.close()
    # a restart judges on with the same estimate (rebuilt from the stored rows)
    clock.advance(1)
    core, registry, pages = make(tmp_path, clock, reachability={"gap_incident_after": "20s"})
    assert skew_gauge(registry) == -300.0
    live(core, sim, clock, -FIVE_MIN, seconds=60)
    assert state(core, clock) == "up" and pages == []


def test_a_probe_five_minutes_fast_with_live_results_is_up(tmp_path: Path) -> None:
    clock = Clock()
    core, registry, pages = make(tmp_path, clock, reachability={"gap_incident_after": "20s"})
    sim = ProbeSim("p1")
    live(core, sim, clock, FIVE_MIN, seconds=600)
    assert state(core, clock) == "up"
    assert pages == [] and core.store.incidents() == []
    assert skew_gauge(registry) == 300.0
    last = core.snapshot().targets["t1"].last_success_at
    assert last is not None and clock.now - timedelta(seconds=4) <= last <= clock.now
    # it stops: 3 x 10 s later the target is unknown, not 5 min later
    clock.advance(31)
    assert state(core, clock) == "unknown"


def test_old_results_delivered_late_do_not_make_a_target_fresh(tmp_path: Path) -> None:
    """An outbox drained after a broker outage, across a monitor restart: each result is
    judged at its own (old) time."""
    clock = Clock()
    core, registry, pages = make(tmp_path, clock, reachability={"gap_incident_after": "1h"})
    sim = ProbeSim("p1")
    live(core, sim, clock, timedelta(0), seconds=60)
    assert state(core, clock) == "up"
    core.beat(clock())
    core.store.close()
    outage_start = clock.now
    backlog = [sim.result("t1", "pass", outage_start + timedelta(seconds=3 * n)) for n in range(1, 101)]
    clock.advance(600)  # the probe kept calling for 300 s, then stopped; delivered 600 s in
    core, registry, pages = make(tmp_path, clock, reachability={"gap_incident_after": "1h"})
    for result in backlog:
        assert core.handle(sim.topic("t1"), result.to_json()) is None
        clock.advance(0.01)
    core.store.commit()
    view = core.evaluate(clock())
    assert view.targets["t1"].state == "unknown"
    assert view.targets["t1"].last_success_at == backlog[-1].finished_at  # its own time: 5 min ago
    assert view.probes["p1"].last_result_at == backlog[-1].finished_at
    assert skew_gauge(registry) == 0.0
    rows = stored(core)[-100:]
    assert [judged for _, _, judged, _ in rows] == [format_time(r.finished_at) for r in backlog]
    # a live result brings it back; an old one replayed among live ones stays old
    send(core, sim, "pass", clock.now)
    assert state(core, clock) == "up"
    clock.advance(3)
    replayed = backlog[0]
    db = core.store._db  # type: ignore[attr-defined]
    db.execute("DELETE FROM results WHERE id = ?", (replayed.id,))  # as if it had been lost
    db.execute(
        "INSERT INTO seq_gaps (probe, after_seq, next_seq, missing, detected_at) VALUES ('p1', ?, ?, 1, ?)",
        (replayed.seq - 1, replayed.seq + 1, format_time(clock.now)),
    )
    assert core.handle(sim.topic("t1"), replayed.to_json()) is None
    core.store.commit()
    assert stored(core)[-1][2] == format_time(replayed.finished_at)
    assert pages == []


def test_skew_gauge_and_bound(tmp_path: Path) -> None:
    clock = Clock()
    core, registry, _ = make(tmp_path, clock, probes=("p1", "p2", "p3"), ingest={"max_clock_skew": "1m"})
    assert registry.get_sample_value("ecpm_ingest_max_clock_skew_seconds") == 60.0
    for probe in ("p1", "p2", "p3"):
        value = skew_gauge(registry, probe)
        assert value is not None and math.isnan(value)
    send(core, ProbeSim("p1"), "pass", clock.now + timedelta(seconds=90))
    send(core, ProbeSim("p2"), "pass", clock.now - timedelta(seconds=42.5))
    core.evaluate(clock())
    assert skew_gauge(registry, "p1") == 90.0
    assert skew_gauge(registry, "p2") == -42.5
    assert math.isnan(skew_gauge(registry, "p3") or 0.0)
    probes = core.snapshot().probes
    assert (probes["p1"].clock_skewed, probes["p2"].clock_skewed, probes["p3"].clock_skewed) == (
        True, False, False
    )  # fmt: skip
    # the estimate outlives the window (the probe fell silent): the last one known stays
    clock.advance(3600)
    core.evaluate(clock())
    assert skew_gauge(registry, "p1") == 90.0


def test_a_store_from_before_judged_time_is_migrated(tmp_path: Path) -> None:
    """Rows stored before the columns existed are judged at min(their time, arrival)."""
    clock = Clock()
    config = monitor_config(tmp_path)
    old_schema = "\n".join(
        line
        for line in store_schema.splitlines()
        if not line.lstrip().startswith(("judged_at", "clock_skew"))
    ).replace("hash TEXT NOT NULL,\n);", "hash TEXT NOT NULL\n);")
    db = sqlite3.connect(config.store.path)
    db.executescript(old_schema)
    db.close()
    sim = ProbeSim("p1")
    ahead, behind = (
        sim.result("t1", "pass", T0 + FIVE_MIN),
        sim.result("t1", "pass", T0 - timedelta(seconds=5)),
    )
    append_raw_row(config.store.path, json.loads(ahead.to_json()), received_at=format_time(T0))
    append_raw_row(config.store.path, json.loads(behind.to_json()), received_at=format_time(T0))

    clock.advance(40)
    core = MonitorCore(
        config, SqliteStore(config.store.path), CollectorRegistry(), pager=Pages(), clock=clock
    )
    core.evaluate()
    assert [(judged, skew) for _, _, judged, skew in stored(core)] == [
        (format_time(T0), None),
        (format_time(T0 - timedelta(seconds=5)), None),
    ]
    assert core.snapshot().targets["t1"].state == "unknown"  # the future stamp is not fresh
    assert core.store.check_chain(read=True).ok  # the chain covers the payload only
    assert core.store.quarantined() == []


# ------------------------------------------------------------------ the evidence


def test_the_report_uses_judged_time_and_marks_skewed_results(tmp_path: Path) -> None:
    """p1 on time, then p2 five minutes ahead; the monitor then hears nothing and (as if
    it were not running) records nothing. The report counts p2's results where they
    arrived, not five minutes later, and marks every one of them as judged with a skew."""
    clock = Clock()
    core, _, _ = make(tmp_path, clock, probes=("p1", "p2"), ingest={"max_clock_skew": "30s"})
    p1, p2 = ProbeSim("p1"), ProbeSim("p2")
    for _ in range(20):
        send(core, p1, "pass", clock.now)
        core.evaluate(clock())
        clock.advance(3)
    ahead = []
    for _ in range(100):
        result = p2.result("t1", "pass", clock.now + FIVE_MIN)
        assert core.handle(p2.topic("t1"), result.to_json()) is None
        core.store.commit()
        ahead.append((result, clock.now))
        core.evaluate(clock())
        clock.advance(3)
    last_arrival = ahead[-1][1]
    clock.advance(600)
    core.store.close()

    store = SqliteStore(tmp_path / "monitor.db")
    try:
        report = build_report(
            store,
            start=T0,
            end=T0 + timedelta(hours=1),
            targets=[TargetInfo("t1", fresh_within=30.0)],
            generated_at=clock.now,
            max_clock_skew=30.0,
        )
    finally:
        store.close()
    (t,) = report.targets
    # fresh until 30 s after the last arrival; by the probe's stamps it would be 5 min more
    assert t.time.up_seconds == (last_arrival + timedelta(seconds=30) - T0).total_seconds()
    coverage = {c.probe: c for c in t.coverage}
    assert (coverage["p2"].first_at, coverage["p2"].last_at) == (ahead[0][1], last_arrival)
    on_time, fast = report.clock_skew
    assert (on_time.probe, on_time.results, on_time.estimated, on_time.skewed) == ("p1", 20, 20, 0)
    assert (on_time.min_seconds, on_time.max_seconds, on_time.listed) == (0.0, 0.0, ())
    assert (fast.probe, fast.results, fast.skewed, fast.min_seconds, fast.max_seconds) == (
        "p2",
        100,
        100,
        300.0,
        300.0,
    )
    assert (fast.first_skewed_at, fast.last_skewed_at) == (ahead[0][1], last_arrival)
    assert [(x.id, x.finished_at, x.judged_at, x.clock_skew) for x in fast.listed] == [
        (r.id, r.finished_at, received, 300.0) for r, received in ahead
    ]

    out = tmp_path / "report"
    write(report, out, ["html", "json", "csv"])
    data = json.loads((out / "report.json").read_text())
    jsonschema.Draft202012Validator(REPORT_SCHEMA).validate(data)
    assert data["definitions"]["max_clock_skew_seconds"] == 30.0
    by_probe = {k["probe"]: k for k in data["probes"]["clock_skew"]}
    assert (by_probe["p1"]["skewed"], by_probe["p2"]["skewed"]) == (0, 100)
    first = by_probe["p2"]["skewed_results"][0]
    assert first == {
        "result_id": ahead[0][0].id,
        "target": "t1",
        "seq": 1,
        "finished_at": format_time(ahead[0][0].finished_at),
        "judged_at": format_time(ahead[0][1]),
        "clock_skew_seconds": 300.0,
    }
    with (out / "clock_skew.csv").open(newline="") as f:
        rows = {r["probe"]: r for r in csv.DictReader(f)}
    assert (rows["p1"]["skewed"], rows["p2"]["skewed"], rows["p2"]["max_seconds"]) == ("0", "100", "300.0")
    with (out / "skewed_results.csv").open(newline="") as f:
        listed = list(csv.DictReader(f))
    assert [r["result_id"] for r in listed] == [r.id for r, _ in ahead]
    html = (out / "report.html").read_text()
    assert 'data-table="clock-skew"' in html and 'data-table="skewed-results"' in html
    assert "+300.000 s" in html and "beyond 30 s" in html
