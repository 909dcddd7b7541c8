"""``ecpm report``: a scripted day through the real ingest path, checked in every format.

The day (2026-11-02, UTC) is built by ``MonitorCore`` with a test clock from signed
results, as the monitor would see them: one probe (``p1``) calls two targets every 30 s
and pings ``uk-999`` with OPTIONS every quarter hour (at :05:15, :20:15, ...); the
monitor evaluates on every result and on a 10-second tick. Scripted events:

- 05:59:30  p1 is restarted for a software update 0.1.0 -> 0.1.1: its uk-999 call in
            flight ends inconclusive (``shutdown``); offline 05:59:40, online 05:59:50.
- 10:07:30 - 10:22:30  the uk-999 responder fails every call (503); after each failed
            scheduled call the probe places its immediate confirmation (3 s later).
- 12:00:00  a post-change verification (CHG-2041) of uk-999; its call passes at 12:00:05.
- 13:00:00 - 13:10:00  slow post-dial delay (3.6 s) on uk-999: degraded, still available.
- 14:59:40 - 15:09:50  p1 offline: no results 15:00:00 - 15:10:00 (a monitoring gap).
- 18:00:00  p1's uk-999 result is lost on the way (a sequence gap).
- 20:00:10  the live-number guard refuses an ie-112 call at the SIP send.
"""

from __future__ import annotations

import argparse
import csv
import heapq
import itertools
import json
import math
import os
import shutil
import sqlite3
import statistics
import subprocess
import sys
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast

import jsonschema
import pytest
from prometheus_client import CollectorRegistry

from ecpm import cli
from monitor import report_command
from monitor.core import MonitorCore
from monitor.model import Incident
from monitor.notify import incident_event
from monitor.report import IdentityCounts, PingCounts, Report, TargetInfo, build_report
from monitor.report_render import CSV_FILES, formula_like, pct, write
from monitor.report_render.json import report_json
from monitor.store import Verification, is_url, open_store
from probes.outcome import CheckOutcome, MediaStats
from probes.result import Result
from tests.support import browser
from tests.support.monitor import ProbeSim, StatusSim, key_for, monitor_config, store_section

ROOT = Path(__file__).resolve().parent.parent
SCHEMA = json.loads((ROOT / "docs/schema/report-v1.json").read_text())

DAY = datetime(2026, 11, 2, tzinfo=UTC)
NEXT_DAY = DAY + timedelta(days=1)
GENERATED = datetime(2026, 11, 5, 9, 0, tzinfo=UTC)
TARGETS = (TargetInfo("uk-999", "BT 999 test route"), TargetInfo("ie-112", "112 test route, Dublin"))
SLACK_ERROR = "HTTP 503: <em>upstream unavailable</em>"  # markup from a peer: must stay text


def at(clock: str) -> datetime:
    """``"10:07:30"`` on the scripted day."""
    h, m, s = (int(x) for x in clock.split(":"))
    return DAY + timedelta(hours=h, minutes=m, seconds=s)


def between(t: datetime, start: str, end: str) -> bool:
    return at(start) <= t < at(end)


class Probe:
    """Signed results from one probe, numbered in sequence, with its software version."""

    def __init__(self, probe: str) -> None:
        self.probe = probe
        self.seq = 0
        self.version = "0.1.0"

    def result(
        self,
        target: str,
        outcome: str,
        finished: datetime,
        *,
        check: str = "invite",
        confirm: bool = False,
        request_id: str | None = None,
        reason: str | None = None,
        stage: str | None = None,
        pdd: float = 0.9,
    ) -> Result:
        self.seq += 1
        failed = outcome == "fail"
        status: tuple[int | None, str | None] = (503, "Service Unavailable") if failed else (200, "OK")
        if reason == "guard_refused" or outcome == "inconclusive":
            status = (None, None)  # never sent, or no final answer
        timings = {"transport": 0.002, "trying": 0.02}
        if check == "invite" and outcome == "pass":
            timings |= {"ringing": pdd, "answer": pdd + 0.4, "media": 1.0, "teardown": 0.05}
        out = CheckOutcome(
            check=check,
            outcome=outcome,  # type: ignore[arg-type]
            started_at=finished - timedelta(seconds=2),
            finished_at=finished,
            stage=stage or (None if outcome == "pass" else "answer"),
            reason=reason or ("service_unavailable" if failed else None),
            sip_status=status[0],
            sip_reason=status[1],
            timings=timings,
            media=MediaStats(100, 100, 0.0, 0.4, 1.0, 4.3, True, True)
            if outcome == "pass" and check == "invite"
            else None,
        )
        return Result.from_outcome(
            out,
            probe=self.probe,
            seq=self.seq,
            target=target,
            key=key_for(self.probe),
            confirm=confirm,
            request_id=request_id,
            version=self.version,
        )


@dataclass
class Day:
    path: Path | str  # the store: a SQLite file, or a PostgreSQL URL (``any_day``)
    config: Path  # a monitor.yaml pointing at it
    rows: dict[str, int]  # result id -> stored row


def pdd_at(t: datetime) -> float:
    """A deterministic, gently varying post-dial delay; slow between 13:00 and 13:10."""
    if between(t, "13:00:00", "13:10:00"):
        return 3.6
    seconds = (t - DAY).total_seconds()
    return round(0.9 + 0.25 * math.sin(seconds / 21600 * 2 * math.pi) + 0.05 * ((seconds // 30) % 5), 3)


def build_day(directory: Path, where: str | None = None) -> Day:
    """The scripted day, stored in ``directory``'s monitor.db, or at ``where``."""
    directory.mkdir(parents=True, exist_ok=True)
    config = monitor_config(where or directory, probes=("p1",), targets=("uk-999", "ie-112"), interval="30s")
    path: Path | str = config.store.where if is_url(config.store.where) else Path(config.store.path)
    store = open_store(path)
    now = [DAY - timedelta(minutes=2)]

    def page(incident: Incident, event: str) -> None:
        """As monitor.notify.Dispatcher would: queue a page per notifier, then deliver."""
        payload = incident_event(incident, event, monitor="monitor", status_url=None)
        for notifier in ("webhook", "slack"):
            store.enqueue_notification(incident.id, notifier, event, payload, now[0])
        for item in store.due_notifications(now[0]):
            if item.notifier == "webhook":
                sent = now[0] + timedelta(seconds=1.5)
                store.mark_notification(item.id, state="sent", attempts=1, at=sent)
            else:
                store.mark_notification(
                    item.id, state="failed", attempts=3, at=now[0] + timedelta(seconds=14), error=SLACK_ERROR
                )

    core = MonitorCore(config, store, CollectorRegistry(), pager=page, clock=lambda: now[0])
    order = itertools.count()
    p1 = Probe("p1")
    p1_status = StatusSim("p1")

    def status(online: bool) -> None:
        p1_status.version = p1.version
        targets = ["uk-999", "ie-112"]
        body = p1_status.online(now[0], targets) if online else p1_status.offline(now[0], targets=targets)
        assert core.handle("ecpm/v1/status/p1", body) is None

    def deliver(result: Result) -> None:
        assert core.handle(f"ecpm/v1/results/p1/{result.target}", result.to_json()) is None

    events: list[tuple[datetime, int, Any]] = []  # a heap: (when, order, action)

    def plan(moment: datetime, action: Any) -> None:
        heapq.heappush(events, (moment, next(order), action))

    plan(now[0], lambda: status(True))
    t = now[0]
    while t < NEXT_DAY + timedelta(minutes=2):
        silent = between(t, "15:00:00", "15:10:00")
        if not silent:
            for target in ("uk-999", "ie-112"):
                plan(t, _scheduled_call(p1, target, t, plan, deliver))
        t += timedelta(seconds=30)
    quarter = DAY + timedelta(minutes=5, seconds=15)
    while quarter < NEXT_DAY:
        if not between(quarter, "15:00:00", "15:10:00"):
            plan(quarter, _options_ping(p1, quarter, plan, deliver))
        quarter += timedelta(minutes=15)

    def update() -> None:
        p1.version = "0.1.1"
        status(True)

    plan(at("05:59:40"), lambda: status(False))
    plan(at("05:59:50"), update)
    plan(at("14:59:40"), lambda: status(False))
    plan(at("15:09:50"), lambda: status(True))
    plan(
        at("20:00:10"),
        lambda: deliver(
            p1.result("ie-112", "fail", at("20:00:10"), reason="guard_refused", stage="transport")
        ),
    )

    def verification_requested() -> None:
        store.add_verification(
            Verification(
                request_id="verify-chg-2041",
                target="uk-999",
                probes=("p1",),
                required=1,
                change_ref="CHG-2041",
                requested_at=at("12:00:00"),
                deadline=at("12:01:00"),
                finished_at=None,
                outcome="pending",
                detail={},
            )
        )

    def verification_call() -> None:
        deliver(p1.result("uk-999", "pass", at("12:00:05"), request_id="verify-chg-2041", pdd=0.8))
        store.finish_verification(
            "verify-chg-2041",
            outcome="pass",
            at=at("12:00:05"),
            detail={"p1": {"outcome": "pass", "sip_status": 200}},
        )

    plan(at("12:00:00"), verification_requested)
    plan(at("12:00:05"), verification_call)

    tick = DAY - timedelta(minutes=2)
    while tick < NEXT_DAY + timedelta(minutes=2):
        plan(tick, lambda: None)
        tick += timedelta(seconds=10)
    while events:
        moment = events[0][0]
        now[0] = moment
        while events and events[0][0] == moment:  # everything due now, then one evaluation
            heapq.heappop(events)[2]()
        store.commit()
        core.evaluate(moment)
    rows = {result_id: row for row, result_id, *_ in store.iter_chain()}
    store.close()
    config_file = directory / "monitor.yaml"
    config_file.write_text(
        "kind: monitor\n"
        f"store: {json.dumps(store_section(path if isinstance(path, str) else directory))}\n"
        "probes: [{id: p1, key: key-of-p1}]\n"
        "targets:\n"
        "  - {id: uk-999, interval: 30s, description: BT 999 test route}\n"
        "  - {id: ie-112, interval: 30s, description: '112 test route, Dublin'}\n"
    )
    return Day(path, config_file, rows)


def _scheduled_call(p1: Probe, target: str, t: datetime, plan: Any, deliver: Any) -> Any:
    def call() -> None:
        if target == "uk-999" and t == at("18:00:00"):
            p1.seq += 1  # placed, but the result never reaches the monitor
            return
        if target == "uk-999" and t == at("05:59:30"):
            deliver(p1.result(target, "inconclusive", t, reason="shutdown", stage="media"))
            return
        if target == "uk-999" and between(t, "10:07:30", "10:22:30"):
            deliver(p1.result(target, "fail", t))
            confirm = t + timedelta(seconds=3)
            plan(confirm, lambda: deliver(p1.result(target, "fail", confirm, confirm=True)))
            return
        deliver(p1.result(target, "pass", t, pdd=pdd_at(t) if target == "uk-999" else 0.7))

    return call


def _options_ping(p1: Probe, t: datetime, plan: Any, deliver: Any) -> Any:
    def ping() -> None:
        if between(t, "10:07:30", "10:22:30"):
            deliver(p1.result("uk-999", "fail", t, check="options", stage="trying"))
            confirm = t + timedelta(seconds=3)
            plan(
                confirm,
                lambda: deliver(
                    p1.result("uk-999", "fail", confirm, check="options", stage="trying", confirm=True)
                ),
            )
            return
        deliver(p1.result("uk-999", "pass", t, check="options"))

    return ping


# ------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def day(tmp_path_factory: pytest.TempPathFactory) -> Day:
    """The day in SQLite: for the tests that alter or read the file itself."""
    return build_day(tmp_path_factory.mktemp("day"))


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def any_day(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Day:
    """The day on each backend (the database lives as long as the session's cluster)."""
    if request.param == "sqlite":
        return cast(Day, request.getfixturevalue("day"))
    cluster = request.getfixturevalue("postgres_cluster")
    return build_day(tmp_path_factory.mktemp("pg-day"), cluster.url(cluster.create_database()))


def store_args(day: Day) -> tuple[str, str]:
    return ("--url", str(day.path)) if is_url(day.path) else ("--db", str(day.path))


def report_of(path: Path | str, **kw: Any) -> Report:
    store = open_store(path)
    try:
        return build_report(
            store,
            start=kw.pop("start", DAY),
            end=kw.pop("end", NEXT_DAY),
            targets=kw.pop("targets", TARGETS),
            generated_at=GENERATED,
            store_name="monitor.db",
            **kw,
        )
    finally:
        store.close()


@pytest.fixture(scope="module")
def written(day: Day, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("report")
    write(report_of(day.path), out, ["html", "json", "csv"])
    return out


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def by_target(rows: list[dict[str, str]], target: str) -> list[dict[str, str]]:
    return [r for r in rows if r["target"] == target]


def iso(clock: str) -> str:
    return f"2026-11-02T{clock}.000Z"


# ------------------------------------------------------------------ the expected figures

# uk-999: down 10:07:33 -> 10:22:30 (897 s); unmonitored 15:01:00 -> 15:10:00 (540 s: the last
# result before the gap, at 14:59:30, is fresh for 3 x 30 s; the monitor itself, ticking every
# 10 s here, recorded unknown from 15:01:10).
DOWN_S, UNKNOWN_S, DAY_S = 897, 540, 86400
DEGRADED_S = 30 + 3 + 600  # 05:59:30-06:00:00 inconclusive, 10:07:30-10:07:33 one failure, 13:00-13:10 slow
TIME_AVAILABILITY = (DAY_S - UNKNOWN_S - DOWN_S) / (DAY_S - UNKNOWN_S)  # 84963 / 85860
# 2880 scheduled calls a day - 20 while p1 was offline - 1 lost = 2859, + 30 confirmations + 1 on demand
PLACED, FAILED, INCONCLUSIVE = 2890, 60, 1
PASSED = PLACED - FAILED - INCONCLUSIVE  # 2829
CALL_AVAILABILITY = PASSED / (PASSED + FAILED)


def test_figures_of_the_scripted_day(any_day: Day) -> None:
    day = any_day
    report = report_of(day.path)
    uk, ie = report.targets
    assert (uk.id, ie.id) == ("uk-999", "ie-112")
    c = uk.calls
    assert (c.placed, c.passed, c.failed, c.inconclusive) == (PLACED, PASSED, FAILED, INCONCLUSIVE)
    assert (c.scheduled, c.confirmations, c.on_demand) == (2859, 30, 1)
    p = uk.pings
    assert (p.sent, p.passed, p.failed, p.inconclusive) == (96, 94, 2, 0)  # 96 - 1 silent + 1 confirmation
    tw = uk.time
    assert tw.down_seconds == DOWN_S and tw.unmonitored_seconds == UNKNOWN_S
    assert tw.degraded_seconds == DEGRADED_S
    assert tw.up_seconds == DAY_S - DOWN_S - UNKNOWN_S - DEGRADED_S
    assert tw.monitored_seconds == DAY_S - UNKNOWN_S
    assert tw.availability == TIME_AVAILABILITY
    assert tw.lower_bound == (DAY_S - UNKNOWN_S - DOWN_S) / DAY_S
    assert tw.allowed_downtime_seconds == pytest.approx(0.8586)
    assert tw.met is False
    assert uk.by_calls.availability == CALL_AVAILABILITY and uk.by_calls.met is False
    assert pct(TIME_AVAILABILITY) == "98.9552 %" and pct(CALL_AVAILABILITY) == "97.9231 %"

    # ie-112: every call passed; only the gap is unmonitored; the guard refusal is not a call
    assert (ie.calls.placed, ie.calls.passed, ie.calls.failed) == (2860, 2860, 0)
    assert ie.blocked == 1 and ie.refusals[0].finished_at == at("20:00:10")
    assert ie.time.availability == 1.0 and ie.time.met is True and ie.by_calls.met is True
    assert ie.time.degraded_seconds == 20 and ie.time.unmonitored_seconds == UNKNOWN_S

    assert [(s.state, s.start, s.end) for s in uk.timeline] == [
        ("up", DAY, at("05:59:30")),
        ("degraded", at("05:59:30"), at("06:00:00")),
        ("up", at("06:00:00"), at("10:07:30")),
        ("degraded", at("10:07:30"), at("10:07:33")),
        ("down", at("10:07:33"), at("10:22:30")),
        ("up", at("10:22:30"), at("13:00:00")),
        ("degraded", at("13:00:00"), at("13:10:00")),
        ("up", at("13:10:00"), at("15:01:00")),
        ("unknown", at("15:01:00"), at("15:10:00")),
        ("up", at("15:10:00"), NEXT_DAY),
    ]
    assert uk.timeline[0].open_at_start and uk.timeline[-1].open_at_end
    assert [(g.start, g.end) for g in uk.gaps] == [(at("15:01:00"), at("15:10:00"))]
    assert uk.longest_silence.start == at("14:59:30") and uk.longest_silence.end == at("15:10:00")


def test_quarter_hour_buckets(any_day: Day) -> None:
    day = any_day
    uk = report_of(day.path).targets[0]
    assert len(uk.buckets) == 96
    b = {bucket.start: bucket for bucket in uk.buckets}
    first, second = b[at("10:00:00")], b[at("10:15:00")]
    # 30 scheduled calls each; 15 failed in each quarter, each with its confirmation
    assert (first.calls, first.passed, first.failed, first.inconclusive, first.pings) == (45, 15, 30, 0, 1)
    assert (first.up_seconds, first.degraded_seconds, first.down_seconds) == (450, 3, 447)
    assert first.availability == 453 / 900 and first.worst_state == "down"
    assert (second.calls, second.passed, second.failed, second.pings) == (45, 15, 30, 2)
    assert (second.up_seconds, second.down_seconds, second.availability) == (450, 450, 0.5)
    gap = b[at("15:00:00")]
    assert (gap.calls, gap.pings, gap.unmonitored_seconds, gap.up_seconds) == (10, 0, 540, 360)
    assert gap.availability == 1.0 and gap.worst_state == "unknown"
    update = b[at("05:45:00")]
    assert (update.calls, update.passed, update.inconclusive, update.worst_state) == (30, 29, 1, "degraded")
    assert b[at("18:00:00")].calls == 29  # one result lost
    slow = b[at("13:00:00")]
    assert (slow.pdd_max, slow.pdd_median, slow.worst_state) == (3.6, 3.6, "degraded")
    quiet = b[at("00:00:00")]
    delays = [pdd_at(at("00:00:00") + timedelta(seconds=30 * i)) for i in range(30)]
    assert quiet.perfect and quiet.availability == 1.0
    assert (quiet.pdd_median, quiet.pdd_max) == (statistics.median(delays), max(delays))
    assert sum(x.calls for x in uk.buckets) == PLACED
    assert sum(x.down_seconds for x in uk.buckets) == DOWN_S


def test_incidents_latencies_and_pages(any_day: Day) -> None:
    day = any_day
    uk, ie = report_of(day.path).targets
    down, gap = uk.incidents
    assert (down.kind, down.last_good_at, down.first_failed_at) == ("down", at("10:07:00"), at("10:07:28"))
    assert (down.detected_at, down.resolved_at) == (at("10:07:33"), at("10:22:30"))
    assert down.detection_latency_seconds == 5.0  # the failed call started 10:07:28; confirmed 10:07:33
    assert down.time_to_notify_seconds == 1.5
    assert down.duration_seconds == 902.0
    pages = [(n.notifier, n.event, n.state, n.sent_at) for n in down.notifications]
    assert pages == [
        ("webhook", "trigger", "sent", at("10:07:33") + timedelta(seconds=1.5)),
        ("slack", "trigger", "failed", None),
        ("webhook", "resolve", "sent", at("10:22:30") + timedelta(seconds=1.5)),
        ("slack", "resolve", "failed", None),
    ]
    # a monitoring gap longer than 300 s is an incident of its own, on both targets
    assert (gap.kind, gap.detected_at, gap.resolved_at) == ("gap", at("15:06:10"), at("15:10:00"))
    assert gap.last_good_at == at("14:59:30") and gap.detection_latency_seconds is None
    assert [i.kind for i in ie.incidents] == ["gap"]


def test_probes_versions_verifications(any_day: Day) -> None:
    day = any_day
    report = report_of(day.path)
    assert [(o.probe, o.start, o.end) for o in report.probe_outages] == [
        ("p1", at("05:59:40"), at("05:59:50")),
        ("p1", at("14:59:40"), at("15:09:50")),
    ]
    (gap,) = report.seq_gaps
    assert (gap.probe, gap.missing, gap.next_seq - gap.after_seq, gap.detected_at) == (
        "p1",
        1,
        2,
        at("18:00:00"),
    )
    assert [(v.version, v.first_seen, v.last_seen) for v in report.versions] == [
        ("0.1.0", DAY, at("05:59:30")),
        ("0.1.1", at("06:00:00"), at("23:59:30")),
    ]
    assert sum(v.results for v in report.versions) == PLACED + 96 + 2860 + 1
    (v,) = report.targets[0].verifications
    assert (v.change_ref, v.outcome, v.requested_at, v.finished_at) == (
        "CHG-2041",
        "pass",
        at("12:00:00"),
        at("12:00:05"),
    )
    assert report.ledger.ok and report.ledger.rows_checked == report.ledger.rows_total == len(day.rows)
    assert report.ledger.period_last_row is not None and report.ledger.last_row == len(day.rows)
    assert report.ledger.period_last_row < report.ledger.last_row  # results after midnight are not in it


def test_json_follows_the_schema_and_carries_the_figures(written: Path) -> None:
    data = json.loads((written / "report.json").read_text())
    jsonschema.Draft202012Validator.check_schema(SCHEMA)
    jsonschema.Draft202012Validator(SCHEMA).validate(data)
    assert list(data)[:2] == ["schema", "ledger"]
    assert data["ledger"]["status"].startswith("verified: ") and data["ledger"]["ok"] is True
    assert data["period"] == {
        "start": "2026-11-02T00:00:00.000Z",
        "end": "2026-11-03T00:00:00.000Z",
        "measured_until": "2026-11-03T00:00:00.000Z",
        "seconds": 86400.0,
    }
    uk = data["targets"][0]
    assert uk["calls"] == {
        "placed": PLACED,
        "passed": PASSED,
        "failed": FAILED,
        "inconclusive": INCONCLUSIVE,
        "scheduled": 2859,
        "confirmations": 30,
        "on_demand": 1,
    }
    tw = uk["availability"]["time_weighted"]
    assert (tw["availability"], tw["met"], tw["down_seconds"], tw["unmonitored_seconds"]) == (
        TIME_AVAILABILITY,
        False,
        897.0,
        540.0,
    )
    cw = uk["availability"]["call_weighted"]
    assert (cw["availability"], cw["passed"], cw["failed"], cw["met"]) == (
        CALL_AVAILABILITY,
        PASSED,
        FAILED,
        False,
    )
    down = uk["incidents"][0]
    assert (down["first_failed_at"], down["detected_at"], down["notified_at"], down["resolved_at"]) == (
        iso("10:07:28"),
        iso("10:07:33"),
        "2026-11-02T10:07:34.500Z",
        iso("10:22:30"),
    )
    assert (down["detection_latency_seconds"], down["time_to_notify_seconds"]) == (5.0, 1.5)
    bucket = next(b for b in uk["buckets"] if b["start"] == iso("10:00:00"))
    assert (bucket["calls"], bucket["failed"], bucket["down_seconds"], bucket["worst_state"]) == (
        45,
        30,
        447.0,
        "down",
    )
    assert data["targets"][1]["refusals"][0]["at"] == iso("20:00:10")
    assert data["probes"]["sequence_gaps"][0]["missing"] == 1


def test_csv_tables(written: Path) -> None:
    assert sorted(p.name for p in written.glob("*.csv")) == sorted(CSV_FILES)
    summary = {r["target"]: r for r in read_csv(written / "summary.csv")}
    uk = summary["uk-999"]
    assert uk["ledger"].startswith("verified: ")
    assert (uk["calls_placed"], uk["calls_passed"], uk["calls_failed"], uk["calls_inconclusive"]) == (
        "2890",
        "2829",
        "60",
        "1",
    )
    assert float(uk["availability_time"]) == pytest.approx(TIME_AVAILABILITY, abs=1e-9)
    assert float(uk["availability_calls"]) == pytest.approx(CALL_AVAILABILITY, abs=1e-9)
    assert (uk["availability_time_met"], uk["downtime_seconds"], uk["unmonitored_seconds"]) == (
        "false",
        "897.0",
        "540.0",
    )
    assert summary["ie-112"]["availability_time_met"] == "true"
    assert summary["ie-112"]["blocked_dial_attempts"] == "1"
    buckets = by_target(read_csv(written / "buckets.csv"), "uk-999")
    assert len(buckets) == 96
    row = next(b for b in buckets if b["start"] == iso("10:15:00"))
    assert (row["calls"], row["passed"], row["failed"], row["down_seconds"], row["availability"]) == (
        "45",
        "15",
        "30",
        "450.0",
        "0.5",
    )
    incidents = by_target(read_csv(written / "incidents.csv"), "uk-999")
    assert [(i["kind"], i["detected_at"], i["detection_latency_seconds"]) for i in incidents] == [
        ("down", iso("10:07:33"), "5.0"),
        ("gap", iso("15:06:10"), ""),
    ]
    assert incidents[0]["time_to_notify_seconds"] == "1.5"
    notes = read_csv(written / "notifications.csv")
    assert {n["last_error"] for n in notes if n["state"] == "failed"} == {SLACK_ERROR}
    gaps = read_csv(written / "gaps.csv")
    assert [(g["target"], g["start"], g["end"], g["seconds"]) for g in gaps] == [
        ("uk-999", iso("15:01:00"), iso("15:10:00"), "540.0"),
        ("ie-112", iso("15:01:00"), iso("15:10:00"), "540.0"),
    ]
    outages = read_csv(written / "probe_outages.csv")
    assert [(o["start"], o["seconds"]) for o in outages] == [
        (iso("05:59:40"), "10.0"),
        (iso("14:59:40"), "610.0"),
    ]
    (v,) = read_csv(written / "verifications.csv")
    assert (v["change_ref"], v["outcome"], v["took_seconds"], v["probes"]) == (
        "CHG-2041",
        "pass",
        "5.0",
        "p1",
    )
    assert [r["version"] for r in read_csv(written / "versions.csv")] == ["0.1.0", "0.1.1"]
    (refusal,) = read_csv(written / "refusals.csv")
    assert (refusal["target"], refusal["at"], refusal["stage"]) == ("ie-112", iso("20:00:10"), "transport")
    (ledger,) = read_csv(written / "ledger.csv")
    assert ledger["ok"] == "true" and ledger["scope"] == "every row in the store"


@pytest.mark.peers("chromium")
def test_html_in_chromium(written: Path, tmp_path: Path) -> None:
    page = written / "report.html"
    markup = page.read_text()
    assert "<script" not in markup and "<em>" not in markup  # no script at all; peer text escaped
    assert "http://" not in markup.replace('xmlns="http://www.w3.org/2000/svg"', "")  # no external asset
    assert "https://" not in markup
    dom = browser.parse(browser.dump_dom(page.as_uri()))
    assert dom.find(data_ledger=True).attrs["data-ledger"] == "verified"
    assert not dom.find_all("script") and not dom.find_all("em")  # the slack error's markup stayed text
    uk = dom.find("section", data_target="uk-999")
    figure = uk.find(data_figure="availability-time").text
    assert "98.9552 %" in figure and "not met" in figure and "down 14 min 57 s" in figure
    assert "97.9231 %" in uk.find(data_figure="availability-calls").text
    assert "2890" in uk.find(data_figure="calls").text and "60 failed" in uk.find(data_figure="calls").text
    incident = uk.find("tr", data_incident="1")
    assert "2026-11-02 10:07:33Z" in incident.text and "5 s" in incident.text and "1.5 s" in incident.text
    pages = uk.find("tr", data_incident_detail="1").text
    assert "webhook trigger sent 2026-11-02 10:07:34.500Z (+1.5 s)" in pages
    assert f"slack trigger failed after 3 attempts: {SLACK_ERROR}" in pages
    flagged = {r.attrs["data-bucket"] for r in uk.find_all("tr", data_bucket=True)}
    assert {iso("10:00:00"), iso("10:15:00"), iso("15:00:00")} <= flagged
    assert len(uk.find("div", data_chart="timeline").find_all("rect", data_state="down")) == 1
    assert uk.find("div", data_chart="pdd").find_all("polyline")
    ie = dom.find("section", data_target="ie-112")
    assert "met" in ie.find(data_figure="availability-time").text
    assert "2026-11-02 20:00:10Z" in ie.find("table", data_table="refusals").text
    assert "CHG-2041" in uk.find("table", data_table="verifications").text
    shot = browser.screenshot(page.as_uri(), tmp_path / "report.png", width=1200, height=1500)
    assert shot.stat().st_size > 20_000
    if target := os.environ.get("ECPM_REPORT_PNG"):  # to refresh docs/img/report.png
        shutil.copyfile(shot, target)


# ------------------------------------------------------------------ a tampered store


def tampered(day: Day, directory: Path) -> tuple[Path, int, str]:
    """A copy of the day's store with one failed call rewritten as a pass, and one payload
    damaged beyond reading; returns the first altered row and its result id."""
    path = directory / "tampered.db"
    shutil.copyfile(day.path, path)
    db = sqlite3.connect(path)
    row, result_id = db.execute(
        "SELECT row, id FROM results WHERE target = 'uk-999' AND outcome = 'fail' ORDER BY row LIMIT 1"
    ).fetchone()
    db.execute("UPDATE results SET payload = replace(payload, '\"fail\"', '\"pass\"') WHERE row = ?", (row,))
    db.execute("UPDATE results SET payload = '{' WHERE row = ?", (row + 100,))
    db.commit()
    db.close()
    return path, row, result_id


def test_a_tampered_row_makes_every_format_say_broken(day: Day, tmp_path: Path) -> None:
    path, row, result_id = tampered(day, tmp_path)
    report = report_of(path)
    problem = "hash does not match the row's content (the row was altered)"
    status = f"BROKEN at row {row} (result {result_id}): {problem}"
    assert report.ledger.status == status
    (unreadable,) = report.unreadable  # the damaged payload is named, not silently dropped
    assert unreadable.target == "uk-999" and "json" in unreadable.problem
    out = tmp_path / "out"
    write(report, out, ["html", "json", "csv"])
    data = json.loads((out / "report.json").read_text())
    jsonschema.Draft202012Validator(SCHEMA).validate(data)
    assert data["ledger"]["status"] == status and data["ledger"]["first_broken_row"] == row
    assert {r["ledger"] for r in read_csv(out / "summary.csv")} == {status}
    assert read_csv(out / "ledger.csv")[0]["status"] == status
    markup = (out / "report.html").read_text()
    banner = markup.index('data-ledger="broken"')
    assert banner < markup.index("<h1>")  # first thing on the page
    assert f"BROKEN at row {row} (result {result_id})" in markup[banner : banner + 400]


def test_report_reads_never_writes(day: Day) -> None:
    before = day.path.read_bytes()
    report_of(day.path)
    assert day.path.read_bytes() == before


def test_partial_period_and_a_period_in_the_future(any_day: Day) -> None:
    day = any_day
    report = report_of(day.path, start=at("10:10:00"), end=at("10:20:00"), targets=TARGETS[:1])
    (uk,) = report.targets
    assert [b.start for b in uk.buckets] == [at("10:10:00"), at("10:15:00")]  # clipped to the period
    assert uk.time.down_seconds == 600 and uk.time.availability == 0.0
    assert [i.kind for i in uk.incidents] == ["down"]  # overlaps the period
    # The scripted monitor stopped after 00:02 with uk-999 recorded "up"; its last result
    # (00:01:30) is fresh until 00:03:00. From then on nothing was watching: unmonitored.
    later = report_of(day.path, start=at("23:00:00"), end=GENERATED + timedelta(days=30))
    assert later.measured_until == GENERATED
    last = later.targets[0].timeline[-1]
    assert (last.state, last.start, last.end) == ("unknown", NEXT_DAY + timedelta(minutes=3), GENERATED)
    assert later.targets[0].time.up_seconds == 3600 + 180


# ------------------------------------------------------------------ the command line


DAY_ARGS = ("--from", "2026-11-02", "--to", "2026-11-03")


def ecpm_report(*argv: str) -> int:
    """``ecpm report ARGV`` in this process (the CLI's own error handling included)."""
    return cli.main(["report", *argv])


def test_cli_writes_every_format(any_day: Day, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    day = any_day
    out = tmp_path / "evidence"
    period = ("--from", "2026-11-02", "--to", "2026-11-03T00:00:00Z")
    assert ecpm_report(*period, "--out", str(out), "-c", str(day.config), "--progress") == 0
    captured = capsys.readouterr()
    assert "report.json" in captured.out and "ecpm report [" in captured.err
    assert {"report.html", "report.json", "summary.csv"} <= {p.name for p in out.iterdir()}
    data = json.loads((out / "report.json").read_text())
    assert [t["id"] for t in data["targets"]] == ["uk-999", "ie-112"]
    assert data["targets"][0]["description"] == "BT 999 test route"
    one = tmp_path / "one"
    period = ("--from", "2026-11-02T11:00:00+01:00", "--to", "2026-11-02T11:30:00+01:00")
    only = ("--target", "uk-999", "--format", "json")
    assert ecpm_report(*period, *only, "--out", str(one), *store_args(day)) == 0
    data = json.loads((one / "report.json").read_text())
    assert [t["id"] for t in data["targets"]] == ["uk-999"] and data["period"]["start"] == iso("10:00:00")
    assert sorted(p.name for p in one.iterdir()) == ["report.json"]


def test_cli_exit_1_when_the_ledger_is_broken(
    day: Day, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path, row, _ = tampered(day, tmp_path)
    assert ecpm_report(*DAY_ARGS, "--out", str(tmp_path / "o"), "--db", str(path)) == 1
    assert f"ledger BROKEN at row {row}" in capsys.readouterr().err
    assert (tmp_path / "o" / "report.html").is_file()


USAGE_ERRORS = [
    (("--from", "2026-11-32", "--to", "2026-12-01"), "--from '2026-11-32': day is out of range for month"),
    (("--from", "yesterday", "--to", "2026-12-01"), "--from 'yesterday' is not a time"),
    (("--from", "2026-11-02T10:00:00", "--to", "2026-12-01"), "is not a time: use RFC 3339 with an offset"),
    (("--from", "2026-11-03", "--to", "2026-11-02"), "--from 2026-11-03 must be before --to 2026-11-02"),
    (("--from", "2026-11-02", "--to", "2026-11-02"), "must be before --to"),
    (("--from", "2999-01-01", "--to", "2999-01-02"), "is in the future"),
    ((*DAY_ARGS, "--target", "uk-998"), "unknown target uk-998 (known: ie-112, uk-999)"),
    ((*DAY_ARGS, "--format", "pdf"), "--format 'pdf': choose from html"),
]


@pytest.mark.parametrize("case", USAGE_ERRORS, ids=[m for _, m in USAGE_ERRORS])
def test_cli_usage_errors(
    day: Day,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    case: tuple[tuple[str, ...], str],
) -> None:
    args, message = case
    assert ecpm_report(*args, "--out", str(tmp_path / "o"), "--db", str(day.path)) == 2
    err = capsys.readouterr().err
    assert err.startswith("ecpm report: ") and message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_cli_missing_store_and_bad_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nothing.db"
    assert ecpm_report(*DAY_ARGS, "--out", str(tmp_path), "--db", str(missing)) == 2
    assert f"no store at {missing}" in capsys.readouterr().err
    assert not missing.exists()  # asking does not create one
    bad = tmp_path / "monitor.yaml"
    bad.write_text("kind: monitor\nprobes: []\ntargets: []\nbogus: 1\n")
    assert ecpm_report(*DAY_ARGS, "--out", str(tmp_path), "-c", str(bad)) == 2
    assert "monitor.yaml:" in capsys.readouterr().err
    assert ecpm_report(*DAY_ARGS) == 2  # argparse: --out and the store are required
    assert "required" in capsys.readouterr().err


def test_the_real_entry_point_prints_one_line_and_no_traceback(tmp_path: Path) -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "ecpm",
            "report",
            *DAY_ARGS,
            "--out",
            str(tmp_path),
            "--db",
            str(tmp_path / "x.db"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr == f"ecpm report: no store at {tmp_path / 'x.db'}\n"


def test_the_module_plugs_into_any_parser() -> None:
    parser = argparse.ArgumentParser()
    report_command.add_arguments(parser)
    args = parser.parse_args([*DAY_ARGS, "--out", "x", "--db", "y"])
    assert (args.start, args.end, args.target, args.format) == (
        "2026-11-02",
        "2026-11-03",
        [],
        "html,json,csv",
    )


# ------------------------------------------------------------------ CSV formula injection

FORMULA_COUSINS = [
    "=1+1",  # the plain forms
    "+1",
    "-1",
    "@SUM(A1)",
    "\t=1",
    "\r=1",
    ' =HYPERLINK("http://x")',  # past leading blanks: a spreadsheet trims them
    "   +1",
    "\n=1",
    "\r\n@x",
    "\u00a0=1",  # NBSP
    "\u3000=1",  # ideographic space
    "\u200b=1",  # zero-width space (a format character)
    "\ufeff-1",  # a BOM
    "\x0b=1",  # a control character
    "\uff1d1+1",  # fullwidth ＝ ＋ － ＠: NFKC makes them = + - @
    "\uff0b1",
    "\uff0d1",
    "\uff20SUM(A1)",
    "\ufe661",  # small equals sign ﹦
    " \u00a0\n\uff1d1",  # all of it at once
]
HARMLESS = ["BT 999 test route", "a=1", "x\n=1", "", "   ", "1-2", "'=already quoted"]


@pytest.mark.parametrize("text", FORMULA_COUSINS)
def test_csv_neutralises_every_formula_cousin(text: str) -> None:
    assert formula_like(text)


@pytest.mark.parametrize("text", HARMLESS)
def test_csv_leaves_harmless_text_alone(text: str) -> None:
    assert not formula_like(text)


def test_csv_cells_from_the_store_are_quoted_in_the_file(day: Day, tmp_path: Path) -> None:
    """End to end: target descriptions holding every cousin come out of summary.csv with
    a leading quote (and the harmless ones unchanged)."""
    texts = FORMULA_COUSINS + HARMLESS
    targets = tuple(TargetInfo(f"t{i}", text) for i, text in enumerate(texts))
    write(report_of(day.path, targets=targets), tmp_path, ["csv"])
    got = {r["target"]: r["description"] for r in read_csv(tmp_path / "summary.csv")}
    for i, text in enumerate(texts):
        expected = "'" + text if text in FORMULA_COUSINS else text
        assert got[f"t{i}"] == expected, (text, got[f"t{i}"])


class RowByRow:
    """A store that aggregates nothing: the report reads every window from the payloads."""

    def __init__(self, store: Any) -> None:
        self.store = store
        self.windows = 0

    def report_window(self, *args: Any, **kw: Any) -> None:
        self.windows += 1

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)


def test_sql_aggregates_give_the_figures_of_reading_every_row(any_day: Day) -> None:
    store = open_store(any_day.path, read_only=True)
    try:
        kw: dict[str, Any] = {"start": DAY, "end": NEXT_DAY, "targets": TARGETS, "generated_at": GENERATED}
        slow = RowByRow(store)
        by_rows = build_report(cast(Any, slow), **kw)
        counted: list[int] = []
        real = store.report_window

        def window(*args: Any, **kw: Any) -> Any:
            found = real(*args, **kw)
            counted.append(found is not None)
            return found

        store.report_window = window  # type: ignore[method-assign]
        assert build_report(store, **kw) == by_rows
    finally:
        store.close()
    assert slow.windows == len(counted) and sum(counted) == len(counted) - 1  # ie-112's refusal: by rows


def test_register_results_are_not_counted_as_options_pings(tmp_path: Path) -> None:
    """The report's ``options`` figures are OPTIONS pings (report-v1); a register check's
    results are neither calls nor pings there."""
    path = tmp_path / "monitor.db"
    store = open_store(path)
    sim = ProbeSim("p1")
    t0 = DAY + timedelta(hours=1)
    for i, check in enumerate(("options", "register", "register", "options", "register")):
        at = t0 + timedelta(minutes=i)
        store.add_result(sim.result("t1", "pass", at, check=check), at)
    store.add_state_change("t1", "up", t0, "passing")
    store.commit()
    store.close()
    report = report_of(path, targets=[TargetInfo("t1")])
    (t,) = report.targets
    assert (t.pings.sent, t.pings.passed) == (2, 2)
    assert t.calls.placed == 0


def test_registrations_and_lost_numbers_and_locations_by_rows_and_aggregated(tmp_path: Path) -> None:
    """Per target: register checks by outcome, and calls that failed at stage identity by
    reason (from the reason column: no other stage fails with those reasons); the store's
    aggregates give what reading every row gives."""
    path = tmp_path / "monitor.db"
    store = open_store(path)
    p1 = Probe("p1")
    results = [
        ("register", "pass", None, None), ("register", "fail", "answer", "auth_failed"),
        ("register", "fail", "transport", "no_response"), ("invite", "pass", None, None),
        ("invite", "fail", "identity", "cli_missing"), ("invite", "fail", "identity", "cli_mismatch"),
        ("invite", "fail", "identity", "location_mismatch"),
        ("invite", "fail", "identity", "location_mismatch"),
        ("invite", "fail", "answer", "service_unavailable"), ("options", "fail", "answer", "cli_missing"),
    ]  # fmt: skip
    t0 = DAY + timedelta(hours=1)
    for i, (check, outcome, stage, reason) in enumerate(results):
        at = t0 + timedelta(minutes=i)
        store.add_result(p1.result("t1", outcome, at, check=check, stage=stage, reason=reason), at)
    store.add_state_change("t1", "up", t0, "passing")
    store.commit()
    store.close()
    report = report_of(path, targets=[TargetInfo("t1")])
    (t,) = report.targets
    assert t.registrations == PingCounts(sent=3, passed=1, failed=2, inconclusive=0)
    assert t.identity == IdentityCounts(cli_missing=1, cli_mismatch=1, location_mismatch=2)
    assert t.identity.failed == 4 and t.calls.failed == 5
    store = open_store(path, read_only=True)
    try:
        kw: dict[str, Any] = {"start": DAY, "end": NEXT_DAY, "targets": [TargetInfo("t1")]}
        by_rows = build_report(cast(Any, RowByRow(store)), generated_at=GENERATED, **kw)
        real, aggregated = store.report_window, []

        def window(*args: Any, **kw: Any) -> Any:
            found = real(*args, **kw)
            aggregated.append(found is not None and bool(found.failures))
            return found

        store.report_window = window  # type: ignore[method-assign]
        assert build_report(store, generated_at=GENERATED, **kw) == by_rows
        assert any(aggregated)  # the day was counted in SQL
        assert by_rows.targets[0].identity == t.identity
    finally:
        store.close()
    document = report_json(report)
    assert document["targets"][0]["register"] == {"sent": 3, "passed": 1, "failed": 2, "inconclusive": 0}
    assert document["targets"][0]["identity"]["location_mismatch"] == 2
