"""Ingest: one validation before anything is stored (a signed result out of bounds,
signed nonsense), bounded labels, and a store that survives a row it cannot read.
Real signed results, real SQLite."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import MappingProxyType
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from monitor.core import MonitorCore
from monitor.ingest import MONITOR_REASONS
from monitor.metrics import REJECT_LABELS
from monitor.report import TargetInfo, build_report
from monitor.store import SqliteStore
from probes import result as r
from probes.result import ResultError
from tests.support.hostile import append_raw_row, rows, series, sign, signed_payload
from tests.support.monitor import T0, Clock, ProbeSim, key_for, monitor_config
from tests.support.paths import REPO


def make(tmp_path: Path, clock: Clock, **kw: Any) -> tuple[MonitorCore, CollectorRegistry]:
    config = monitor_config(tmp_path, **kw)
    registry = CollectorRegistry()
    return MonitorCore(config, SqliteStore(config.store.path), registry, clock=clock), registry


def wire(sim: ProbeSim, clock: Clock, **kw: Any) -> dict[str, Any]:
    """A valid result from ``sim`` as its JSON object, to be altered and re-signed."""
    return dict(json.loads(sim.result("t1", "pass", clock(), **kw).to_json()))


def rejected(registry: CollectorRegistry, reason: str) -> float:
    return registry.get_sample_value("ecpm_results_rejected_total", {"reason": reason}) or 0.0


def stored(core: MonitorCore) -> int:
    return core.store.check_chain().rows


def ledger(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ecpm", "ledger", "verify", *args],
        cwd=REPO, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


# ------------------------------------------------------------------ a signed value out of bounds


HUGE = 10**400


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"timings": {"ringing": HUGE}}, "out_of_range"),
        ({"timings": {"ringing": 1e308}}, "out_of_range"),
        ({"timings": {"answer": 3600.5}}, "out_of_range"),
        ({"timings": {"ringing": -0.001}}, "out_of_range"),
        ({"media": "jitter_ms=1e400"}, "out_of_range"),
        ({"media": f"rtt_ms={HUGE}"}, "out_of_range"),
        ({"media": "mos=5.5"}, "out_of_range"),
        ({"seq": HUGE}, "out_of_range"),
        ({"sip_status": 10**30}, "out_of_range"),
    ],
)
def test_a_signed_result_with_an_impossible_number_is_rejected_before_anything_is_stored(
    tmp_path: Path, change: dict[str, Any], reason: str
) -> None:
    clock = Clock()
    core, registry = make(tmp_path, clock)
    sim = ProbeSim("p1")
    data = wire(sim, clock)
    raw = None
    for key, value in change.items():
        if key == "media":  # "name=JSON number text", written into the payload as it is
            name, raw = value.split("=")
            data["media"][name] = 12345.678
        else:
            data[key] = value
    message = signed_payload(data, sim.key)
    if raw is not None:
        message = message.replace(b"12345.678", raw.encode())
    assert core.handle(sim.topic("t1"), message) == reason
    assert rejected(registry, reason) == 1.0
    core.store.commit()
    assert stored(core) == 0  # rejected means not stored: not one row in the chain
    assert core.store.last_seq("p1") is None
    # and a restart, the report and the ledger all go on as if it had never arrived
    core.store.close()
    again, _ = make(tmp_path, clock)
    assert again.evaluate(clock()).targets["t1"].state == "unknown"
    good = sim.result("t1", "pass", clock())
    assert again.handle(sim.topic("t1"), good.to_json()) is None
    again.store.commit()
    assert isinstance(again.store, SqliteStore)
    report = build_report(
        again.store, start=T0 - timedelta(hours=1), end=T0 + timedelta(hours=1),
        targets=[TargetInfo("t1")], generated_at=T0 + timedelta(hours=2),
    )  # fmt: skip
    assert report.targets[0].calls.passed == 1 and report.unreadable == ()
    assert again.store.check_chain(read=True).quarantined == ()


def test_the_store_refuses_a_result_it_could_not_read_back(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "m.db")
    good = ProbeSim("p1").result("t1", "pass", T0)
    bad = replace(good, timings=MappingProxyType({"ringing": HUGE}))
    with pytest.raises(ResultError):
        store.add_result(bad, T0)
    with pytest.raises(ResultError):
        store.add_result(replace(good, finished_at=good.started_at - timedelta(seconds=1)), T0)
    store.commit()
    assert store.check_chain().rows == 0
    assert store.add_result(good, T0) and store.check_chain().rows == 1


# ------------------------------------------------------------------ signed nonsense


def test_signed_nonsense_is_rejected_with_its_own_reason(tmp_path: Path) -> None:
    clock = Clock()
    core, registry = make(tmp_path, clock)
    sim = ProbeSim("p1")
    cases: list[tuple[dict[str, Any], str]] = [
        ({"finished_at": "2026-11-01T11:59:57.000Z"}, "time_order"),  # started 11:59:58
        ({"started_at": "1970-01-01T00:00:00.000Z", "finished_at": "1970-01-01T00:00:01.000Z"}, "too_old"),
        ({"started_at": "2999-01-01T00:00:00.000Z", "finished_at": "2999-01-01T00:00:01.000Z"}, "in_future"),
        ({"started_at": "2026-11-01T10:00:00.000Z"}, "out_of_range"),  # a two-hour "check"
        ({"check": "subscribe"}, "unknown_check"),
    ]
    for change, reason in cases:
        data = {**wire(sim, clock), **change}
        assert core.handle(sim.topic("t1"), signed_payload(data, sim.key)) == reason, change
    data = wire(sim, clock)
    data["media"] = {**data["media"], "rx_packets": 10**30}
    assert core.handle(sim.topic("t1"), signed_payload(data, sim.key)) == "out_of_range"
    core.store.commit()
    assert stored(core) == 0
    for reason in ("time_order", "too_old", "in_future", "unknown_check"):
        assert rejected(registry, reason) == 1.0
    assert rejected(registry, "out_of_range") == 2.0
    assert core.store.gaps_between(datetime(2000, 1, 1, tzinfo=UTC), datetime(3000, 1, 1, tzinfo=UTC)) == []


def test_seq_going_backwards_is_rejected_not_recorded_as_a_gap(tmp_path: Path) -> None:
    clock = Clock()
    core, registry = make(tmp_path, clock)
    sim = ProbeSim("p1")

    def send(seq: int) -> str | None:
        sim.seq = seq - 1
        clock.advance(1)
        outcome = core.handle(sim.topic("t1"), sim.result("t1", "pass", clock()).to_json())
        core.store.commit()
        return outcome

    assert send(5) is None  # the first result seen: no gap before it can be known
    assert send(3) == "seq_reused"  # below the last, filling no gap
    assert send(5) == "seq_reused"  # the same seq under another id
    assert send(8) is None  # 6 and 7 are missing: one gap
    assert send(6) is None  # a late result fills the gap: accepted, no new gap
    assert send(6) == "seq_reused"  # ... once
    assert send(8) == "seq_reused"
    assert send(7) is None
    assert send(1) == "seq_reused"
    assert send(9) is None
    gaps = core.store.gaps_between(T0 - timedelta(days=1), T0 + timedelta(days=1))
    assert [(g.probe, g.after_seq, g.next_seq, g.missing, g.repaired) for g in gaps] == [("p1", 5, 8, 2, 2)]
    assert registry.get_sample_value("ecpm_results_missing_total", {"probe": "p1"}) == 2.0
    assert rejected(registry, "seq_reused") == 5.0
    assert [row[3] for row in rows(core.config.store.path)] == [5, 8, 6, 7, 9]
    assert core.store.last_seq("p1") == 9


def test_a_redelivered_result_is_a_duplicate_not_a_seq_problem(tmp_path: Path) -> None:
    clock = Clock()
    core, registry = make(tmp_path, clock)
    sim = ProbeSim("p1")
    first = sim.result("t1", "pass", clock()).to_json()
    assert core.handle(sim.topic("t1"), first) is None
    core.store.commit()
    assert core.handle(sim.topic("t1"), first) is None
    assert registry.get_sample_value("ecpm_results_duplicate_total") == 1.0
    assert rejected(registry, "seq_reused") == 0.0 and stored(core) == 1


def test_the_time_window_is_configured_and_judged_by_the_monitor_clock(tmp_path: Path) -> None:
    clock = Clock()
    core, registry = make(tmp_path, clock, ingest={"max_result_age": "1h", "max_clock_ahead": "1m"})
    sim = ProbeSim("p1")
    for offset, reason in (
        (-3601, "too_old"),
        (-3500, None),
        (-5, None),
        (50, None),
        (61, "in_future"),
    ):
        result = sim.result("t1", "pass", clock.now + timedelta(seconds=offset))
        assert core.handle(sim.topic("t1"), result.to_json()) == reason, offset
    assert (rejected(registry, "too_old"), rejected(registry, "in_future")) == (1.0, 1.0)


# ------------------------------------------------------------------ bounded labels


def test_every_reason_is_bounded_and_its_series_exists_from_the_start(tmp_path: Path) -> None:
    clock = Clock()
    _, registry = make(tmp_path, clock)
    assert set(MONITOR_REASONS) <= set(REJECT_LABELS)
    for reason in (*r.REJECT_REASONS, *MONITOR_REASONS, "stale", "too_large"):
        assert registry.get_sample_value("ecpm_results_rejected_total", {"reason": reason}) == 0.0, reason
    assert registry.get_sample_value("ecpm_results_quarantined_total") == 0.0


def test_flooding_every_label_bearing_field_adds_no_series(tmp_path: Path) -> None:
    clock = Clock()
    core, registry = make(tmp_path, clock, probes=("p1", "p2"), targets=("t1", "t2"))
    sims = {p: ProbeSim(p) for p in ("p1", "p2")}
    for each in sims.values():  # every legitimate series: a call from each probe to each target
        for target in ("t1", "t2"):
            assert core.handle(each.topic(target), each.result(target, "pass", clock()).to_json()) is None
    core.store.commit()
    core.evaluate(clock())
    before = series(registry)
    sim = sims["p1"]
    n = 500

    def signed(i: int, **change: Any) -> bytes:  # i: one distinct value per message
        clock.advance(0.01)
        return signed_payload({**wire(sim, clock), **change}, sim.key)

    floods: dict[str, list[tuple[str, bytes]]] = {
        # accepted: free-form fields that must never become labels
        "stage": [(sim.topic("t1"), signed(i, outcome="fail", stage=f"stage_{i}")) for i in range(n)],
        "reason": [(sim.topic("t1"), signed(i, outcome="fail", reason=f"why_{i}")) for i in range(n)],
        "timings": [(sim.topic("t1"), signed(i, timings={f"stage_{i}": 0.1})) for i in range(n)],
        "detail": [(sim.topic("t1"), signed(i, detail={f"k{i}": "v"})) for i in range(n)],
        "sip_status": [(sim.topic("t1"), signed(i, sip_status=100 + i)) for i in range(n)],
        "version": [(sim.topic("t1"), signed(i, version=f"9.{i}")) for i in range(n)],
        "request_id": [(sim.topic("t1"), signed(i, request_id=f"req-{i}")) for i in range(n)],
        # rejected: values that are not configured or not known
        "check": [(sim.topic("t1"), signed(i, check=f"check_{i}")) for i in range(n)],
        "outcome": [(sim.topic("t1"), signed(i, outcome=f"o{i}")) for i in range(n)],
        "target": [(f"ecpm/v1/results/p1/x{i}", signed(i, target=f"x{i}")) for i in range(n)],
        "probe": [
            (f"ecpm/v1/results/q{i}/t1", signed_payload({**wire(sim, clock), "probe": f"q{i}"}, f"k{i}"))
            for i in range(n)
        ],
        "topic": [(f"ecpm/v1/results/p1/t1/{i}", signed(i)) for i in range(n)],
        "other_topics": [(f"ecpm/v1/thing{i}/p1", signed(i)) for i in range(n)],
        "status": [(f"ecpm/v1/status/q{i}", b'{"online": true, "targets": ["t1"]}') for i in range(n)],
    }
    outcomes: dict[str, set[str | None]] = {}
    for name, messages in floods.items():
        got = set()
        for topic, message in messages:  # each from a fresh sim.result: its own seq
            got.add(core.handle(topic, message))
        for target in ("t1", "t2"):  # p2 keeps calling meanwhile (else it ages out of the latest)
            assert (
                core.handle(sims["p2"].topic(target), sims["p2"].result(target, "pass", clock()).to_json())
                is None
            )
        core.store.commit()
        core.evaluate(clock())
        outcomes[name] = got
    assert outcomes["stage"] == outcomes["timings"] == outcomes["detail"] == {None}
    assert outcomes["check"] == {"unknown_check"} and outcomes["probe"] == {"unknown_probe"}
    assert outcomes["target"] == {"unknown_target"}
    after = series(registry)
    assert len(after) == len(before), (
        sorted(set(after) - set(before))[:10],
        sorted(set(before) - set(after))[:10],
    )
    assert set(after) == set(before)


# ------------------------------------------------------------------ defence in depth: quarantine


def huge_timing_row(clock: Clock, sim: ProbeSim) -> dict[str, Any]:
    """A correctly signed result with timings.ringing = 10**400 (an older monitor stored it)."""
    data = wire(sim, clock)
    data["timings"] = {**data["timings"], "ringing": HUGE}
    return sign(data, sim.key)


def test_an_unreadable_stored_row_is_quarantined_everywhere_never_fatal(tmp_path: Path) -> None:
    clock = Clock()
    core, _ = make(tmp_path, clock)
    sim = ProbeSim("p1")
    assert core.handle(sim.topic("t1"), sim.result("t1", "pass", clock()).to_json()) is None
    core.store.commit()
    core.store.close()
    path = str(tmp_path / "monitor.db")
    clock.advance(5)
    bad_row = append_raw_row(path, huge_timing_row(clock, sim))
    clock.advance(5)
    junk_row = append_raw_row(path, "{", received_at="2026-11-01T12:00:10.000Z")

    # a restart reads the last 24 h: both rows are skipped, counted and remembered
    again, registry = make(tmp_path, clock)
    assert again.evaluate(clock()).targets["t1"].state == "up"
    assert registry.get_sample_value("ecpm_results_quarantined_total") == 1.0  # the JSON row is in the window
    assert [q.row for q in again.store.quarantined()] == [bad_row]
    clock.advance(1)
    assert again.handle(sim.topic("t1"), sim.result("t1", "fail", clock()).to_json()) is None
    again.store.commit()
    assert again.evaluate(clock()).targets["t1"].state == "degraded"

    # the chain is intact; the full walk names both unreadable rows
    chain = again.store.check_chain(read=True)
    assert chain.ok and [q.row for q in chain.quarantined] == [bad_row, junk_row]
    assert "out_of_range" in chain.quarantined[0].problem
    again.store.close()

    # the report names the row it could not read and counts only the readable calls
    store = SqliteStore(path)
    report = build_report(
        store, start=T0 - timedelta(hours=1), end=T0 + timedelta(hours=1),
        targets=[TargetInfo("t1")], generated_at=T0 + timedelta(hours=2),
    )  # fmt: skip
    store.close()
    assert report.ledger.ok
    assert report.targets[0].calls.placed == 2
    assert any(u.problem.startswith(f"row {bad_row} (result ") for u in report.unreadable)

    # ecpm ledger verify: ok (exit 0), naming every quarantined row
    done = ledger("--db", path)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("ok: 4 results, chain intact; last hash ")
    assert lines[1].startswith("QUARANTINED: 2 stored result(s) cannot be read")
    assert lines[2].startswith(f"  row {bad_row} (result ") and "out_of_range" in lines[2]
    assert lines[3].startswith(f"  row {junk_row} (result not-an-id") and "not a JSON object" in lines[3]
    assert "Traceback" not in done.stderr


def test_ledger_with_config_checks_the_readable_signatures_and_names_the_rest(tmp_path: Path) -> None:
    clock = Clock()
    config = monitor_config(tmp_path)
    sim = ProbeSim("p1")
    store = SqliteStore(config.store.path)
    assert store.add_result(sim.result("t1", "pass", clock()), clock())
    store.commit()
    store.close()
    row = append_raw_row(config.store.path, huge_timing_row(clock, sim))
    config_file = tmp_path / "monitor.yaml"
    config_file.write_text(
        "kind: monitor\n"
        f"store: {{path: {json.dumps(config.store.path)}}}\n"
        f"probes: [{{id: p1, key: {key_for('p1')}}}]\n"
        "targets: [{id: t1}]\n"
    )
    done = ledger("-c", str(config_file))
    assert done.returncode == 0, done.stdout + done.stderr
    assert ", every readable result's signature verified;" in done.stdout.splitlines()[0]
    assert f"  row {row} (result " in done.stdout
    # a forged readable row is still found behind the quarantined one
    forged = ProbeSim("p1", key="not-the-key")
    forged.seq = 5
    append_raw_row(config.store.path, json.loads(forged.result("t1", "pass", clock()).to_json()))
    done = ledger("-c", str(config_file))
    assert done.returncode == 1 and "does not verify with p1's key" in done.stdout
