"""Notification duties (monitor.duties) and redundancy (monitor.redundancy) on a core with a
virtual clock, on both store backends."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

import pytest

from monitor.config import MonitorConfig
from monitor.core import MonitorCore
from monitor.duties import Acknowledgements
from monitor.model import StateChange
from monitor.redundancy import lost_periods, service_state
from monitor.web import ActionError
from tests.support.monitor import T0, Clock, ProbeSim, monitor_config, state
from tests.support.monitor import make_core as make

PSAP = {"preset": "us-fcc-psap"}  # 30 min, escalates 10 min before
NORS = {"preset": "us-nors", "escalate_before": "20m"}


def feed(core: MonitorCore, sim: ProbeSim, target: str, outcome: str, clock: Clock) -> None:
    assert core.handle(sim.topic(target), sim.result(target, outcome, clock()).to_json()) is None
    core.store.commit()


def break_path(core: MonitorCore, clock: Clock, target: str = "t1") -> None:
    sim = ProbeSim("p1")
    feed(core, sim, target, "pass", clock)
    clock.advance(10)
    feed(core, sim, target, "fail", clock)
    clock.advance(2)
    feed(core, sim, target, "fail", clock)
    assert state(core, clock, target) == "down"


def ack(core: MonitorCore, clock: Clock, **body: Any) -> dict[str, Any]:
    return asyncio.run(Acknowledgements(store=core.store, clock=clock).ack({"by": "jo", **body}))


def test_presets_fill_in_their_figures_and_a_target_duty_replaces_a_global_one(tmp_path: Any) -> None:
    config = monitor_config(
        tmp_path,
        targets=("t1", "t2"),
        duties=[PSAP, NORS, {"preset": "us-nors-voip"}, {"preset": "uk-ofcom-s105k", "deadline": "1h"}],
    )
    by_name = {d.name: d for d in config.duties}
    assert {n: d.deadline for n, d in by_name.items()} == {
        "us-fcc-psap": 1800.0, "us-nors": 7200.0, "us-nors-voip": 14400.0, "uk-ofcom-s105k": 3600.0,
    }  # fmt: skip
    assert "FCC 22-88" in by_name["us-fcc-psap"].text and "s105K" in by_name["uk-ofcom-s105k"].text
    own = MonitorConfig.model_validate(
        {
            "kind": "monitor",
            "probes": [{"id": "p1", "key": "k"}],
            "targets": [
                {"id": "t1", "duties": [{"name": "us-fcc-psap", "deadline": "15m", "text": "call our PSAP"}]},
                {"id": "t2"},
            ],
            "duties": [
                PSAP,
                NORS,
                {"preset": "us-nors-voip"},
                {"preset": "uk-ofcom-s105k", "deadline": "1h"},
            ],
        }
    )
    assert [(d.name, d.deadline) for d in own.duties_for("t1", "down")][-1] == ("us-fcc-psap", 900.0)
    assert len(own.duties_for("t1", "down")) == 4 and own.duties_for("t1", "gap") == []
    assert [d.deadline for d in own.duties_for("t2", "down") if d.name == "us-fcc-psap"] == [1800.0]


def test_a_down_incident_carries_its_duties_and_escalates_each_once_before_its_deadline(
    store_where: str,
) -> None:
    clock = Clock()
    core, _, pages = make(store_where, clock, duties=[PSAP, NORS])
    break_path(core, clock)
    detected = clock()
    [incident] = core.store.open_incidents()
    due = {d.name: d.due_at for d in incident.duties}
    assert due == {"us-fcc-psap": detected + timedelta(minutes=30), "us-nors": detected + timedelta(hours=2)}
    assert [d.status(clock()) for d in incident.duties] == ["pending", "pending"]
    assert pages == [(1, "down", "trigger")]
    clock.advance(19 * 60)  # 20 min before the PSAP deadline, lead 10 min: not yet
    core.evaluate(clock())
    assert pages == [(1, "down", "trigger")]
    clock.advance(61)  # 10 min before it: escalates
    core.evaluate(clock())
    assert pages == [(1, "down", "trigger"), (1, "down", "escalate:us-fcc-psap")]
    for _ in range(3):  # once: every later evaluation (and a restart) leaves it
        clock.advance(60)
        core.evaluate(clock())
    restarted, _, again = make(store_where, clock, duties=[PSAP, NORS])
    restarted.evaluate(clock())
    assert again == [] and len(pages) == 2
    clock.advance(11 * 60)  # the PSAP deadline passed unacknowledged: missed
    [incident] = restarted.store.open_incidents()
    psap = next(d for d in incident.duties if d.name == "us-fcc-psap")
    assert psap.escalated_at is not None and psap.status(clock()) == "missed"
    clock.advance(66 * 60)  # 20 min before the NORS deadline (the silence opened a gap incident meanwhile)
    restarted.evaluate(clock())
    assert again == [(2, "gap", "trigger"), (1, "down", "escalate:us-nors")]
    assert restarted.store.incident(2).duties == ()  # type: ignore[union-attr]  # duties are for down


def test_an_acknowledged_duty_is_met_and_never_escalates(store_where: str) -> None:
    clock = Clock()
    core, _, pages = make(store_where, clock, duties=[PSAP])
    break_path(core, clock)
    clock.advance(5 * 60)
    view = ack(core, clock, incident=1, duty="us-fcc-psap", ref="PSAP log 4711")
    [duty] = view["incident"]["duties"]
    assert duty["status"] == "met" and duty["ack"]["ref"] == "PSAP log 4711" and duty["ack"]["by"] == "jo"
    assert duty["remaining_seconds"] == pytest.approx(25 * 60)
    clock.advance(60 * 60)
    core.evaluate(clock())
    assert pages == [(1, "down", "trigger")]
    # a second ack keeps the first one's time and reference: when it was done is the evidence
    ack(core, clock, incident=1, duty="us-fcc-psap", ref="again")
    [incident] = core.store.open_incidents()
    assert incident.duties[0].ack is not None and incident.duties[0].ack.ref == "PSAP log 4711"
    assert incident.duties[0].status(clock()) == "met"


def test_acking_the_incident_silences_escalation_without_hiding_it(store_where: str) -> None:
    clock = Clock()
    core, _, pages = make(store_where, clock, duties=[PSAP])
    break_path(core, clock)
    view = ack(core, clock, incident=1, ref="INC-9")
    assert view["incident"]["ack"]["ref"] == "INC-9" and view["incident"]["state"] == "open"
    clock.advance(40 * 60)
    snap = core.evaluate(clock())
    assert pages == [(1, "down", "trigger")]
    assert [i.id for i in snap.open_incidents] == [1]  # still open and shown
    assert snap.open_incidents[0].duties[0].status(clock()) == "missed"  # the duty itself was not done


@pytest.mark.parametrize(
    ("body", "error"),
    [
        ({"incident": 99, "ref": "x"}, "no incident 99"),
        ({"incident": 1, "duty": "nope", "ref": "x"}, "incident 1 has no duty nope"),
        ({"incident": "1", "ref": "x"}, "incident must be an incident id"),
        ({"incident": 1}, "ref must be a non-empty string"),
        ({"incident": 1, "ref": "a\nb"}, "ref must be at most 200 printable characters"),
    ],
)
def test_a_bad_ack_is_refused_with_its_reason(tmp_path: Any, body: dict[str, Any], error: str) -> None:
    clock = Clock()
    core, _, _ = make(tmp_path, clock, duties=[PSAP])
    break_path(core, clock)
    with pytest.raises(ActionError, match=error):
        ack(core, clock, **body)


def test_a_lost_backup_is_degraded_while_the_primary_works(store_where: str) -> None:
    clock = Clock()
    services = [{"id": "uk-999", "primary": ["t1"], "backup": ["t2"]}]
    core, registry, _ = make(store_where, clock, targets=("t1", "t2"), services=services)
    sim = ProbeSim("p1")
    for target in ("t1", "t2"):
        feed(core, sim, target, "pass", clock)
    snap = core.evaluate(clock())
    assert snap.services["uk-999"].state == "up"
    assert registry.get_sample_value("ecpm_service_redundancy_lost", {"service": "uk-999"}) == 0.0
    clock.advance(10)
    feed(core, sim, "t1", "pass", clock)
    feed(core, sim, "t2", "fail", clock)
    clock.advance(2)
    feed(core, sim, "t2", "fail", clock)
    snap = core.evaluate(clock())
    assert snap.targets["t2"].state == "down" and snap.targets["t1"].state == "up"
    assert snap.services["uk-999"].state == "degraded"
    assert [(p.target, p.role, p.lost) for p in snap.services["uk-999"].paths] == [
        ("t1", "primary", False), ("t2", "backup", True),
    ]  # fmt: skip
    assert registry.get_sample_value("ecpm_service_redundancy_lost", {"service": "uk-999"}) == 1.0
    assert registry.get_sample_value("ecpm_service_state", {"service": "uk-999", "state": "degraded"}) == 1.0
    assert registry.get_sample_value("ecpm_service_paths_lost", {"service": "uk-999"}) == 1.0


def test_service_state_and_lost_periods() -> None:
    assert service_state(["up", "degraded"]) == "up"
    assert service_state(["up", "unknown"]) == "degraded"
    assert service_state(["down", "unknown"]) == "down"
    assert service_state(["unknown", "unknown"]) == "unknown"
    config = monitor_config(
        "x.db", targets=("a", "b"), services=[{"id": "s", "primary": ["a"], "backup": ["b"]}]
    )
    at = [T0 + timedelta(minutes=m) for m in range(10)]
    changes = [
        StateChange("b", "down", at[1]),
        StateChange("a", "down", at[2]),
        StateChange("a", "up", at[3]),
        StateChange("b", "up", at[4]),
        StateChange("a", "unknown", at[6]),
    ]
    periods = lost_periods(config.services[0], {"a": "up", "b": "up"}, changes, start=at[0], end=at[8])
    assert [(p.start, p.end, p.lost, p.worst) for p in periods] == [
        (at[1], at[4], ("a", "b"), "down"),
        (at[6], at[8], ("a",), "degraded"),
    ]


def test_two_monitors_evaluating_at_once_escalate_a_duty_once(postgres_url: str) -> None:
    """Replicas: even two evaluators at one moment (a failover's overlap) page a duty once:
    the first to mark it escalated wins, the other's mark finds it taken."""
    clock = Clock()
    a, _, pages_a = make(postgres_url, clock, targets=("t1", "t2"), duties=[PSAP])
    b, _, pages_b = make(postgres_url, clock, targets=("t1", "t2"), duties=[PSAP])
    break_path(a, clock)
    clock.advance(20 * 60)
    assert a.store.escalations_due(clock()) == b.store.escalations_due(clock()) == [(1, "us-fcc-psap")]
    assert a.store.mark_escalated(1, "us-fcc-psap", clock())
    a.store.commit()
    assert not b.store.mark_escalated(1, "us-fcc-psap", clock())
    b.store.commit()
    clock.advance(60)
    a.evaluate(clock())
    b.evaluate(clock())
    assert [
        e for _, _, e in pages_a + pages_b if e.startswith("escalate")
    ] == []  # marked: nobody pages it again
