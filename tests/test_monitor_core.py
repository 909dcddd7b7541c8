"""Monitor core: ingest checks, reachability, incidents, restart — real signed results, real SQLite."""

from __future__ import annotations

import math
import re
from datetime import timedelta

import pytest

from monitor.core import MonitorCore
from probes.result import format_time
from tests.support.monitor import Clock, ProbeSim, StatusSim, state
from tests.support.monitor import make_core as make


def feed(core: MonitorCore, sim: ProbeSim, target: str, outcome: str, clock: Clock, **kw: object) -> None:
    result = sim.result(target, outcome, clock(), **kw)  # type: ignore[arg-type]
    assert core.handle(sim.topic(target), result.to_json()) is None
    core.store.commit()


def test_single_probe_fail_then_confirm_goes_down_and_pages_once(store_where: str) -> None:
    clock = Clock()
    core, registry, pages = make(store_where, clock)
    sim = ProbeSim("p1")
    feed(core, sim, "t1", "pass", clock)
    assert state(core, clock) == "up"
    clock.advance(10)
    feed(core, sim, "t1", "fail", clock)
    assert state(core, clock) == "degraded"  # one failure is not yet confirmed
    clock.advance(2)
    feed(core, sim, "t1", "fail", clock, confirm=True)
    assert state(core, clock) == "down"
    assert pages == [(1, "down", "trigger")]
    incident = core.store.open_incidents()[0]
    assert incident.first_failed_at is not None and incident.last_good_at is not None
    assert incident.detection_latency == pytest.approx(4.0)  # first failed call started 2 s before it ended
    assert registry.get_sample_value("ecpm_target_up", {"target": "t1"}) == 0.0
    assert registry.get_sample_value("ecpm_incidents_open", {"target": "t1"}) == 1.0
    clock.advance(10)
    feed(core, sim, "t1", "fail", clock)
    assert state(core, clock) == "down"
    assert len(pages) == 1  # still one incident, one page
    clock.advance(10)
    feed(core, sim, "t1", "pass", clock)
    assert state(core, clock) == "up"
    assert pages == [(1, "down", "trigger"), (1, "down", "resolve")]
    assert core.store.open_incidents() == []


def test_two_probes_one_failing_is_degraded_never_down(store_where: str) -> None:
    clock = Clock()
    core, _, pages = make(store_where, clock, probes=("p1", "p2"))
    good, bad = ProbeSim("p1"), ProbeSim("p2")
    for _ in range(6):
        feed(core, good, "t1", "pass", clock)
        clock.advance(1)
        feed(core, bad, "t1", "fail", clock)
        clock.advance(1)
        feed(core, bad, "t1", "fail", clock, confirm=True)
        clock.advance(8)
        assert state(core, clock) == "degraded"
    assert pages == []


def test_a_probe_that_just_came_online_covers_the_target_before_its_first_result(store_where: str) -> None:
    clock = Clock()
    core, _, pages = make(store_where, clock, probes=("p1", "p2"))
    assert core.handle("ecpm/v1/status/p1", StatusSim("p1").online(clock())) is None
    assert core.handle("ecpm/v1/status/p2", StatusSim("p2").online(clock())) is None
    bad = ProbeSim("p2")
    feed(core, bad, "t1", "fail", clock)
    feed(core, bad, "t1", "fail", clock, confirm=True)
    assert state(core, clock) == "degraded"  # p1 is due to report: not down on p2 alone
    assert pages == []
    clock.advance(31)  # p1 never reports within 3 x 10 s: p2 alone now covers the target
    feed(core, bad, "t1", "fail", clock)
    feed(core, bad, "t1", "fail", clock, confirm=True)
    assert state(core, clock) == "down"


def test_two_probes_both_failing_is_down(store_where: str) -> None:
    clock = Clock()
    core, _, pages = make(store_where, clock, probes=("p1", "p2"))
    a, b = ProbeSim("p1"), ProbeSim("p2")
    feed(core, a, "t1", "pass", clock)
    feed(core, b, "t1", "pass", clock)
    clock.advance(10)
    feed(core, a, "t1", "fail", clock)
    feed(core, a, "t1", "fail", clock, confirm=True)
    assert state(core, clock) == "degraded"  # only one of two probes fails so far
    clock.advance(1)
    feed(core, b, "t1", "fail", clock)
    assert state(core, clock) == "down"
    assert pages == [(1, "down", "trigger")]


def test_inconclusive_never_counts_as_pass(store_where: str) -> None:
    clock = Clock()
    core, _, _ = make(store_where, clock)
    sim = ProbeSim("p1")
    feed(core, sim, "t1", "inconclusive", clock, sip_status=486, stage="answer")
    assert state(core, clock) == "degraded"
    assert core.snapshot().targets["t1"].last_success_at is None


def test_slow_post_dial_delay_and_poor_mos_are_degraded(store_where: str) -> None:
    clock = Clock()
    core, _, _ = make(store_where, clock)
    sim = ProbeSim("p1")
    feed(core, sim, "t1", "pass", clock, pdd=4.0)
    assert state(core, clock) == "degraded"
    clock.advance(10)
    feed(core, sim, "t1", "pass", clock, mos=2.5)
    assert state(core, clock) == "degraded"
    clock.advance(10)
    feed(core, sim, "t1", "pass", clock)
    assert state(core, clock) == "up"


def test_silence_is_unknown_then_a_gap_incident(store_where: str) -> None:
    clock = Clock()
    core, registry, pages = make(store_where, clock, reachability={"gap_incident_after": "60s"})
    sim = ProbeSim("p1")
    feed(core, sim, "t1", "pass", clock)
    clock.advance(29)
    assert state(core, clock) == "up"  # within 3 × 10 s
    clock.advance(2)
    assert state(core, clock) == "unknown"
    value = registry.get_sample_value("ecpm_target_up", {"target": "t1"})
    assert value is not None and math.isnan(value)  # NaN: unknown
    clock.advance(59)
    core.evaluate(clock())
    assert pages == []
    clock.advance(2)
    core.evaluate(clock())
    assert pages == [(1, "gap", "trigger")]
    feed(core, sim, "t1", "pass", clock)
    assert state(core, clock) == "up"
    assert pages[-1] == (1, "gap", "resolve")


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda p: re.sub(rb'"sig":"[0-9a-f]{64}"', b'"sig":"' + b"0" * 64 + b'"', p), "signature"),
        (lambda p: p.replace(b"ecpm.result/1", b"ecpm.result/9"), "schema"),
        (lambda p: b"\x00\xffgarbage", "encoding"),
        (lambda p: b"{not json", "json"),
        (lambda p: p.replace(b'"seq":', b'"seqq":'), "fields"),
        (lambda p: b" " * (11 * 1024 * 1024), "too_large"),
    ],
)
def test_bad_messages_are_rejected_and_counted(store_where: str, mutate, reason: str) -> None:  # type: ignore[no-untyped-def]
    clock = Clock()
    core, registry, _ = make(store_where, clock)
    sim = ProbeSim("p1")
    payload = mutate(sim.result("t1", "pass", clock()).to_json())
    assert core.handle(sim.topic("t1"), payload) == reason
    assert registry.get_sample_value("ecpm_results_rejected_total", {"reason": reason}) == 1.0
    assert core.store.results_between(clock.now.replace(year=2000), clock.advance(1)) == []


@pytest.mark.parametrize(
    "payload",
    [
        b'{"schema":"ecpm.result/1","jitter_ms":1e400}',
        b'{"schema":"ecpm.result/1","seq":' + b"9" * 5000 + b"}",
    ],
)
def test_payloads_that_trip_the_parser_are_rejected_not_fatal(store_where: str, payload: bytes) -> None:
    clock = Clock()
    core, _, _ = make(store_where, clock)
    sim = ProbeSim("p1")
    assert core.handle(sim.topic("t1"), payload) in ("fields", "json")
    good = sim.result("t1", "pass", clock())
    bad = good.to_json().replace(b'"jitter_ms":0.3', b'"jitter_ms":1e400')
    assert core.handle(sim.topic("t1"), bad) == "out_of_range"
    assert core.handle("ecpm/v1/status/p1", b"[" * 5000) in ("fields", "json")
    assert core.handle(sim.topic("t1"), good.to_json()) is None  # and it goes on


def test_forged_key_unknown_probe_and_topic_mismatch(store_where: str) -> None:
    clock = Clock()
    core, registry, _ = make(store_where, clock)
    forged = ProbeSim("p1", key="not-the-key").result("t1", "pass", clock())
    assert core.handle("ecpm/v1/results/p1/t1", forged.to_json()) == "signature"
    stranger = ProbeSim("p9").result("t1", "pass", clock())
    assert core.handle("ecpm/v1/results/p9/t1", stranger.to_json()) == "unknown_probe"
    honest = ProbeSim("p1").result("t1", "pass", clock())
    assert core.handle("ecpm/v1/results/p1/other", honest.to_json()) == "topic_mismatch"
    odd_target = ProbeSim("p1").result("t9", "pass", clock())
    assert core.handle("ecpm/v1/results/p1/t9", odd_target.to_json()) == "unknown_target"
    for reason in ("signature", "unknown_probe", "topic_mismatch", "unknown_target"):
        assert registry.get_sample_value("ecpm_results_rejected_total", {"reason": reason}) == 1.0


def test_duplicates_stored_once_and_gaps_counted(store_where: str) -> None:
    clock = Clock()
    core, registry, _ = make(store_where, clock)
    sim = ProbeSim("p1")
    first = sim.result("t1", "pass", clock())
    assert core.handle(sim.topic("t1"), first.to_json()) is None
    assert core.handle(sim.topic("t1"), first.to_json()) is None  # QoS 1 redelivery
    sim.seq += 3  # three results never arrive
    clock.advance(1)
    assert core.handle(sim.topic("t1"), sim.result("t1", "pass", clock()).to_json()) is None
    core.store.commit()
    assert len(core.store.results_between(clock.now.replace(year=2000), clock.advance(1))) == 2
    assert registry.get_sample_value("ecpm_results_duplicate_total") == 1.0
    assert registry.get_sample_value("ecpm_results_missing_total", {"probe": "p1"}) == 3.0


def test_restart_keeps_state_and_opens_no_duplicate_incident(store_where: str) -> None:
    clock = Clock()
    core, _, pages = make(store_where, clock)
    sim = ProbeSim("p1")
    feed(core, sim, "t1", "fail", clock)
    feed(core, sim, "t1", "fail", clock, confirm=True)
    assert state(core, clock) == "down"
    assert len(pages) == 1
    since = core.snapshot().targets["t1"].since
    core.store.close()
    clock.advance(3)
    again, _, pages_after = make(store_where, clock)
    view = again.evaluate(clock()).targets["t1"]
    assert (view.state, view.since) == ("down", since)
    assert pages_after == []  # the open incident was found, not re-opened
    assert len(again.store.open_incidents()) == 1
    feed(again, sim, "t1", "fail", clock)
    assert state(again, clock) == "down"
    assert len(again.store.incidents()) == 1


def test_probe_status_from_last_will(store_where: str) -> None:
    clock = Clock()
    core, registry, _ = make(store_where, clock)
    sim, status = ProbeSim("p1"), StatusSim("p1")
    assert core.handle(status.topic(), status.online(clock())) is None
    feed(core, sim, "t1", "pass", clock)
    core.evaluate(clock())
    assert registry.get_sample_value("ecpm_probe_up", {"probe": "p1"}) == 1.0
    clock.advance(5)
    assert core.handle(status.topic(), status.offline(clock())) is None  # the Last Will
    core.evaluate(clock())
    assert registry.get_sample_value("ecpm_probe_up", {"probe": "p1"}) == 0.0
    assert core.handle("ecpm/v1/status/p1", b"offline") == "json"


def test_a_flapping_path_is_one_incident_and_one_page(store_where: str) -> None:
    clock = Clock()
    core, _, pages = make(store_where, clock, reachability={"resolve_after": "60s"})
    sim = ProbeSim("p1")
    for _ in range(5):  # fails, recovers for 20 s, fails again ...
        feed(core, sim, "t1", "fail", clock)
        feed(core, sim, "t1", "fail", clock, confirm=True)
        assert state(core, clock) == "down"
        clock.advance(10)
        feed(core, sim, "t1", "pass", clock)
        assert state(core, clock) == "up"
        clock.advance(20)
        core.evaluate(clock())
    assert pages == [(1, "down", "trigger")]
    clock.advance(60)
    feed(core, sim, "t1", "pass", clock)
    core.evaluate(clock())
    assert pages == [(1, "down", "trigger"), (1, "down", "resolve")]


def test_options_answering_while_calls_stopped_is_unknown_not_up(store_where: str) -> None:
    clock = Clock()
    core, _, _ = make(store_where, clock)
    sim = ProbeSim("p1")
    feed(core, sim, "t1", "pass", clock)
    for _ in range(6):  # the invite checks stop (a broken update); OPTIONS keep passing
        clock.advance(10)
        feed(core, sim, "t1", "pass", clock, check="options", stage=None)
    view = core.evaluate(clock()).targets["t1"]
    assert view.state == "unknown"
    assert "OPTIONS still answer" in view.why


def test_a_reannounced_probe_cannot_hold_down_off(store_where: str) -> None:
    clock = Clock()
    core, _, pages = make(store_where, clock, probes=("p1", "p2"))
    p2 = StatusSim("p2")
    assert core.handle(p2.topic(), p2.online(clock())) is None  # p2 comes online, then never calls
    bad = ProbeSim("p1")
    feed(core, bad, "t1", "fail", clock)
    feed(core, bad, "t1", "fail", clock, confirm=True)
    assert state(core, clock) == "degraded"  # p2's first call is due
    for _ in range(3):
        clock.advance(5)
        assert core.handle(p2.topic(), p2.online(clock())) is None  # re-announced, no transition
    feed(core, bad, "t1", "fail", clock)
    feed(core, bad, "t1", "fail", clock, confirm=True)
    assert state(core, clock) == "down"
    assert len(pages) == 1


def test_a_probe_clock_ahead_cannot_keep_a_result_fresh(store_where: str) -> None:
    clock = Clock()
    core, _, _ = make(store_where, clock)
    sim = ProbeSim("p1")
    future = sim.result("t1", "pass", clock.now + timedelta(minutes=10))
    assert core.handle(sim.topic("t1"), future.to_json()) is None
    assert state(core, clock) == "up"
    clock.advance(31)  # 3 x 10 s after it arrived, whatever the probe's clock said
    assert state(core, clock) == "unknown"


def test_time_the_monitor_was_not_running_is_unknown(store_where: str) -> None:
    clock = Clock()
    core, _, _ = make(store_where, clock)
    feed(core, ProbeSim("p1"), "t1", "pass", clock)
    assert state(core, clock) == "up"
    core.beat(clock())
    stopped_at = clock()
    core.store.close()
    clock.advance(7200)  # two hours down
    again, _, pages = make(store_where, clock, reachability={"gap_incident_after": "5m"})
    changes = again.store.state_changes(stopped_at - timedelta(seconds=1))
    assert (changes[-1].state, changes[-1].at) == ("unknown", stopped_at)  # not two hours of "up"
    assert pages == []  # constructing a core evaluates nothing, so pages nothing
    assert again.evaluate(clock()).targets["t1"].state == "unknown"
    # two hours unknown > gap_incident_after: the first evaluation opens a gap, paged once
    assert [(kind, event) for _, kind, event in pages] == [("gap", "trigger")]
    assert [i.kind for i in again.store.open_incidents()] == ["gap"]
    again.evaluate(clock.advance(1))
    assert len(pages) == 1


def test_a_gap_while_the_monitor_is_cut_off_from_its_broker_names_that_cause(store_where: str) -> None:
    clock = Clock()
    core, registry, pages = make(store_where, clock, reachability={"gap_incident_after": "30s"})
    assert registry.get_sample_value("ecpm_monitor_mqtt_connected") == 0.0  # not yet connected
    core.broker_connection(True, clock())
    assert registry.get_sample_value("ecpm_monitor_mqtt_connected") == 1.0
    feed(core, ProbeSim("p1"), "t1", "pass", clock)
    assert state(core, clock) == "up"
    lost_at = clock.advance(5)
    core.broker_connection(False, lost_at)
    core.broker_connection(False, clock.advance(2))  # a failed reconnect: the cause keeps its time
    assert registry.get_sample_value("ecpm_monitor_mqtt_connected") == 0.0
    clock.advance(30)  # 3 × 10 s without a result
    view = core.evaluate(clock()).targets["t1"]
    assert view.state == "unknown"
    assert view.why.startswith("the monitor lost its MQTT connection at 2026-")
    assert format_time(lost_at) in view.why and "no fresh result within 30s" in view.why
    core.evaluate(clock.advance(30))
    [(_, kind, event)] = pages
    assert (kind, event) == ("gap", "trigger")
    [gap] = core.store.open_incidents()
    assert gap.summary.startswith(f"the monitor lost its MQTT connection at {format_time(lost_at)}")
    core.broker_connection(True, clock())  # back: a silence from now on is the probes' again
    assert not core.evaluate(clock.advance(1)).targets["t1"].why.startswith("the monitor")


def test_a_monitor_that_never_reached_its_broker_says_so(store_where: str) -> None:
    clock = Clock()
    core, _, _ = make(store_where, clock)
    core.broker_connection(False, clock())
    why = core.evaluate(clock()).targets["t1"].why
    assert why.startswith(f"the monitor has not reached its MQTT broker since {format_time(clock())}; no ")
