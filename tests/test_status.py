"""Signed probe status (``ecpm.status/1``): schema, signature, order, and what the monitor
does with it — only a verified, newer status changes a probe's state or coverage."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

import probes.result as r
import probes.status as s
from monitor.core import MonitorCore
from monitor.store import SqliteStore
from probes.status import MAX_STATUS_BYTES, Status, StatusError, parse_status
from probes.status import verify_status_signature as verify_status
from tests.support.monitor import Clock, ProbeSim, StatusSim, key_for, monitor_config

ROOT = Path(__file__).resolve().parent.parent
SCHEMA = json.loads((ROOT / "docs/schema/status-v1.json").read_text(encoding="utf-8"))
VALIDATOR = jsonschema.Draft202012Validator(SCHEMA)
T0 = datetime(2026, 11, 1, 12, tzinfo=UTC)


def status(**kw: Any) -> Status:
    fields: dict[str, Any] = {
        "probe": "p1",
        "online": True,
        "reason": None,
        "version": "0.1.0",
        "started_at": T0,
        "connected_at": T0 + timedelta(seconds=1),
        "at": T0 + timedelta(seconds=2),
        "targets": ["t1", "t2"],
        "key": "k",
    }
    fields.update(kw)
    return Status.make(**fields)


# ------------------------------------------------------------------ the wire form


def test_round_trip_schema_and_signature() -> None:
    for st_ in (status(), status(online=False, reason="connection_lost", at=T0 + timedelta(seconds=1))):
        payload = st_.to_json()
        VALIDATOR.validate(json.loads(payload))
        back = parse_status(payload)
        assert back == st_ and back.to_json() == payload
        assert verify_status(back, "k") and not verify_status(back, "other")


def test_any_change_breaks_the_signature() -> None:
    data = json.loads(status().to_json())
    for name, value in (("online", False), ("targets", ["t1"]), ("at", "2026-11-01T12:00:09.000Z")):
        forged = {**data, name: value}
        if name == "online":
            forged["reason"] = "shutdown"
        back = parse_status(json.dumps(forged).encode())
        assert not verify_status(back, "k"), name


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"x" * (MAX_STATUS_BYTES + 1), "too_large"),
        (b"\xff\xfe", "encoding"),
        (b"[", "json"),
        (b"[1]", "json"),
        (b'{"online": true, "online": false}', "json"),
        (b'{"schema": "ecpm.status/1", "n": ' + b"9" * 5000 + b"}", "json"),
        (b"[" * 40_000, "json"),
        (b'{"online": false}', "schema"),  # the old unsigned status
        (b'{"schema": "ecpm.status/1"}', "fields"),
    ],
)
def test_malformed_payloads_are_rejected_with_a_bounded_reason(payload: bytes, reason: str) -> None:
    with pytest.raises(StatusError) as caught:
        parse_status(payload)
    assert caught.value.reason == reason and reason in s.REJECT_REASONS


@pytest.mark.parametrize(
    "change",
    [
        {"online": "yes"},
        {"reason": "connection_lost"},  # online with a reason
        {"online": False},  # offline without one
        {"probe": "P1"},
        {"targets": ["t1", "t1"]},
        {"targets": [f"t{i}" for i in range(s.MAX_STATUS_TARGETS + 1)]},
        {"targets": "t1"},
        {"version": "v" * 65},
        {"at": "2026-11-01T12:00:00.000Z"},  # before connected_at
        {"started_at": "2026-11-01T12:00:01.500Z"},  # after connected_at
        {"at": "2026-02-30T12:00:00.000Z"},
        {"sig": "00"},
        {"extra": 1},
    ],
)
def test_fields_out_of_shape_are_rejected(change: dict[str, Any]) -> None:
    data = {**json.loads(status().to_json()), **change}
    with pytest.raises(StatusError) as caught:
        parse_status(json.dumps(data).encode())
    assert caught.value.reason == "fields"
    assert not VALIDATOR.is_valid(data) or "at" in change or "started_at" in change  # order: parser only


def test_schema_patterns_match_the_modules() -> None:
    defs, props = SCHEMA["$defs"], SCHEMA["properties"]
    assert defs["name"]["pattern"] == r.NAME_RE and defs["code"]["pattern"] == r.CODE_RE
    assert defs["time"]["pattern"] == r.TIME_RE and props["sig"]["pattern"] == r.SIG_RE
    assert props["targets"]["maxItems"] == s.MAX_STATUS_TARGETS
    assert set(SCHEMA["required"]) == s.FIELDS == set(props)
    assert f"{MAX_STATUS_BYTES:,}" in SCHEMA["description"]


def test_order_puts_a_sessions_end_after_its_announcements() -> None:
    connect = T0 + timedelta(seconds=1)
    will = status(online=False, reason="connection_lost", at=connect)
    online, later = status(at=connect + timedelta(seconds=1)), status(at=connect + timedelta(hours=5))
    next_session = status(connected_at=connect + timedelta(hours=6), at=connect + timedelta(hours=6))
    assert online.order < later.order < will.order < next_session.order
    assert s.parse_order(s.order_text(will.order)) == will.order


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2000) | st.from_regex(rb'\A\{"schema":"ecpm\.status/1".{0,200}\}\Z'))
def test_any_bytes_parse_or_are_rejected_with_a_known_reason(payload: bytes) -> None:
    try:
        parse_status(payload)
    except StatusError as exc:
        assert exc.reason in s.REJECT_REASONS


# ------------------------------------------------------------------ the monitor


def make(tmp_path: Path, clock: Clock, **kw: Any) -> tuple[MonitorCore, CollectorRegistry]:
    config = monitor_config(tmp_path, **kw)
    registry = CollectorRegistry()
    return MonitorCore(config, SqliteStore(config.store.path), registry, clock=clock), registry


def rejected(registry: CollectorRegistry, reason: str) -> float:
    return registry.get_sample_value("ecpm_results_rejected_total", {"reason": reason}) or 0.0


def probe_online(core: MonitorCore, clock: Clock, probe: str = "p1") -> bool | None:
    return core.evaluate(clock()).probes[probe].online


def test_unsigned_forged_and_misaddressed_statuses_change_nothing(tmp_path: Path) -> None:
    clock = Clock()
    core, registry = make(tmp_path, clock, probes=("p1", "p2"))
    p1 = StatusSim("p1")
    assert core.handle(p1.topic(), p1.online(clock())) is None
    legacy = json.dumps({"online": False, "probe": "p1", "version": "0.1.0"}).encode()
    forged = StatusSim("p1", key="not-the-key").offline(clock())
    p2_says_p1 = StatusSim("p2").offline(clock())  # signed by p2, published on p1's topic
    stranger = StatusSim("p9").offline(clock())
    assert core.handle(p1.topic(), legacy) == "schema"
    assert core.handle(p1.topic(), forged) == "signature"
    assert core.handle(p1.topic(), p2_says_p1) == "topic_mismatch"
    assert core.handle("ecpm/v1/status/p9", stranger) == "unknown_probe"
    assert core.handle(p1.topic(), b"{" * (MAX_STATUS_BYTES + 1)) == "too_large"
    assert probe_online(core, clock) is True
    for reason in ("schema", "signature", "topic_mismatch", "unknown_probe", "too_large"):
        assert rejected(registry, reason) == 1.0, reason


def test_a_forged_announcement_does_not_cover_a_target(tmp_path: Path) -> None:
    """Coverage only from verified status: a forged 'p2 came online with t1' must not make
    the monitor wait for p2 before it calls t1 down on p1's confirmed failures."""
    clock = Clock()
    core, _ = make(tmp_path, clock, probes=("p1", "p2"))
    forged = StatusSim("p2", key="wrong").online(clock())
    unsigned = json.dumps({"online": True, "probe": "p2", "targets": ["t1"], "version": "0"}).encode()
    assert core.handle("ecpm/v1/status/p2", forged) == "signature"
    assert core.handle("ecpm/v1/status/p2", unsigned) == "schema"
    bad = ProbeSim("p1")
    for confirm in (False, True):
        result = bad.result("t1", "fail", clock(), confirm=confirm)
        assert core.handle(bad.topic("t1"), result.to_json()) is None
    view = core.evaluate(clock()).targets["t1"]
    assert view.state == "down" and view.covering_probes == ("p1",)


def test_a_genuine_fresh_announcement_covers_but_a_late_one_does_not(tmp_path: Path) -> None:
    clock = Clock()
    core, _ = make(tmp_path, clock, probes=("p1", "p2"))
    p2 = StatusSim("p2")
    old = p2.online(clock() - timedelta(minutes=10))  # signed 10 min ago, delivered now
    assert core.handle(p2.topic(), old) is None
    bad = ProbeSim("p1")
    for confirm in (False, True):
        assert (
            core.handle(bad.topic("t1"), bad.result("t1", "fail", clock(), confirm=confirm).to_json()) is None
        )
    assert core.evaluate(clock()).targets["t1"].state == "down"  # p2 came online long ago: no cover
    (tmp_path / "fresh").mkdir()
    core2, _ = make(tmp_path / "fresh", clock, probes=("p1", "p2"))
    fresh = StatusSim("p2")
    assert core2.handle(fresh.topic(), fresh.online(clock())) is None
    bad = ProbeSim("p1")
    for confirm in (False, True):
        assert (
            core2.handle(bad.topic("t1"), bad.result("t1", "fail", clock(), confirm=confirm).to_json())
            is None
        )
    assert core2.evaluate(clock()).targets["t1"].state == "degraded"  # p2 just came online: wait


def test_replayed_old_statuses_are_stale_the_retained_copy_a_duplicate(tmp_path: Path) -> None:
    clock = Clock()
    core, registry = make(tmp_path, clock)
    sim = StatusSim("p1")
    first_online = sim.online(clock())
    assert core.handle(sim.topic(), first_online) is None
    assert core.handle(sim.topic(), first_online) is None  # retained copy on a resubscribe
    clock.advance(60)
    will = sim.offline(clock())  # stamped at the session's connect, arrives a minute later
    assert core.handle(sim.topic(), will) is None
    assert probe_online(core, clock) is False
    assert core.handle(sim.topic(), first_online) == "stale"  # replayed after the probe went away
    assert probe_online(core, clock) is False
    clock.advance(5)
    second_online = sim.online(clock())  # a new session
    assert core.handle(sim.topic(), second_online) is None
    assert core.handle(sim.topic(), will) == "stale"  # the old Last Will cannot take it offline
    assert probe_online(core, clock) is True
    assert rejected(registry, "stale") == 2.0
    # a restart remembers the order (stored with the batch): the replay is still refused
    core.store.commit()
    core.store.close()
    again, registry2 = make(tmp_path, clock)
    assert again.handle(sim.topic(), second_online) is None  # the retained copy: a duplicate
    assert again.handle(sim.topic(), will) == "stale"
    assert again.handle(sim.topic(), first_online) == "stale"
    assert probe_online(again, clock) is True and rejected(registry2, "stale") == 2.0


def test_a_status_signed_in_the_future_is_refused(tmp_path: Path) -> None:
    clock = Clock()
    core, registry = make(tmp_path, clock)
    ahead = StatusSim("p1").online(clock() + timedelta(hours=2))
    assert core.handle("ecpm/v1/status/p1", ahead) == "in_future"
    assert probe_online(core, clock) is None and rejected(registry, "in_future") == 1.0


def test_a_23_mb_status_is_refused_before_parsing(tmp_path: Path) -> None:
    clock = Clock()
    core, registry = make(tmp_path, clock)
    body = json.loads(StatusSim("p1").online(clock()))
    body["targets"] = [f"t{i}" for i in range(300_000)]
    huge = json.dumps(body).encode()
    assert len(huge) > 2_300_000
    assert core.handle("ecpm/v1/status/p1", huge) == "too_large"
    assert probe_online(core, clock) is None and rejected(registry, "too_large") == 1.0


def test_the_probe_key_of_the_sim_is_the_monitors(tmp_path: Path) -> None:
    assert StatusSim("p1").key == key_for("p1")
