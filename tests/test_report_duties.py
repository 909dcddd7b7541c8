"""The evidence report's notification duties and redundancy-lost periods: a store written by a
real core on a virtual clock (both backends), the report built from it in every format."""

from __future__ import annotations

import asyncio
import csv
import json
from datetime import timedelta
from pathlib import Path

import jsonschema

from ecpm import cli
from monitor.duties import Acknowledgements
from monitor.report import TargetInfo, build_report
from monitor.report_render import write
from monitor.store import open_store
from probes.result import format_time
from tests.support.browser import parse
from tests.support.monitor import T0, Clock, ProbeSim, state
from tests.support.monitor import make_core as make

ROOT = Path(__file__).resolve().parent.parent
SCHEMA = json.loads((ROOT / "docs/schema/report-v1.json").read_text())
DUTIES = [{"preset": "us-fcc-psap"}, {"preset": "us-nors", "escalate_before": "20m"}]
SERVICES = [{"id": "uk-999", "primary": ["t1"], "backup": ["t2"]}]


def test_the_report_lists_every_duty_met_or_missed_and_every_redundancy_lost_period(  # noqa: PLR0915
    store_where: str, tmp_path: Path
) -> None:
    clock = Clock()
    core, _, pages = make(store_where, clock, targets=("t1", "t2"), duties=DUTIES, services=SERVICES)
    sim = ProbeSim("p1")

    def call(target: str, outcome: str) -> None:
        assert core.handle(sim.topic(target), sim.result(target, outcome, clock()).to_json()) is None
        core.store.commit()

    for _ in range(3):  # both paths up; then the backup breaks while the primary works
        call("t1", "pass")
        call("t2", "pass")
        core.evaluate(clock())
        clock.advance(10)
    lost_at = clock()
    call("t1", "pass")
    call("t2", "fail")
    call("t2", "fail")
    assert state(core, clock, "t2") == "down"
    detected = clock()
    acks = Acknowledgements(store=core.store, clock=clock)
    for tick in range(1, 241):  # 40 minutes of calls every 10 s: the backup fails until the last
        clock.advance(10)
        call("t1", "pass")
        call("t2", "fail" if tick < 240 else "pass")
        core.evaluate(clock())
        if tick == 30:  # 5 minutes in, the NORS filing is acknowledged
            asyncio.run(acks.ack({"incident": 1, "duty": "us-nors", "ref": "NORS-77", "by": "jo"}))
    back_at = clock()
    assert state(core, clock, "t2") == "up"
    assert ("escalate:us-fcc-psap" in [e for _, _, e in pages]) and len(
        [p for p in pages if "escalate" in p[2]]
    ) == 1

    store = open_store(store_where, read_only=True)
    try:
        report = build_report(
            store, start=T0, end=T0 + timedelta(hours=3), generated_at=T0 + timedelta(hours=3),
            targets=(TargetInfo("t1"), TargetInfo("t2")), services=core.config.services,
        )  # fmt: skip
    finally:
        store.close()
    out = tmp_path / "report"
    out.mkdir()
    write(report, out, ["html", "json", "csv"])

    data = json.loads((out / "report.json").read_text())
    jsonschema.Draft202012Validator(SCHEMA).validate(data)
    [incident] = next(t for t in data["targets"] if t["id"] == "t2")["incidents"]
    psap, nors = incident["duties"]
    due = detected + timedelta(minutes=30)
    assert psap["name"] == "us-fcc-psap" and psap["due_at"] == format_time(due)
    assert psap["status"] == "missed" and psap["ack"] is None and psap["escalated_at"] is not None
    assert (nors["status"], nors["ack"]["ref"], nors["ack"]["by"]) == ("met", "NORS-77", "jo")
    [lost] = data["redundancy_lost"]
    assert (lost["service"], lost["lost_paths"], lost["worst_state"]) == ("uk-999", ["t2"], "degraded")
    assert lost["start"] == format_time(lost_at) == format_time(detected)  # one evaluation: failed, confirmed
    assert lost["end"] == format_time(back_at)

    with (out / "duties.csv").open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert [(r["target"], r["incident"], r["name"], r["status"], r["reference"]) for r in rows] == [
        ("t2", "1", "us-fcc-psap", "missed", ""), ("t2", "1", "us-nors", "met", "NORS-77"),
    ]  # fmt: skip
    with (out / "redundancy_lost.csv").open(newline="", encoding="utf-8") as f:
        [row] = list(csv.DictReader(f))
    assert (row["service"], row["lost_paths"], row["worst_state"]) == ("uk-999", "t2", "degraded")

    page = parse((out / "report.html").read_text())
    assert page.find(data_duty="us-fcc-psap").attrs["data-status"] == "missed"
    assert page.find(data_duty="us-nors").attrs["data-status"] == "met" and "NORS-77" in page.text
    assert "uk-999" in page.find(data_section="redundancy").text


def test_ecpm_report_takes_the_services_from_the_monitor_config(tmp_path: Path) -> None:
    clock = Clock()
    core, _, _ = make(tmp_path, clock, targets=("t1", "t2"), services=SERVICES)
    sim = ProbeSim("p1")
    for outcome in ("pass", "fail", "fail"):  # the backup breaks, the primary works
        for target in ("t1", "t2"):
            core.handle(
                sim.topic(target),
                sim.result(target, "pass" if target == "t1" else outcome, clock()).to_json(),
            )
        core.store.commit()
        core.evaluate(clock())
        clock.advance(10)
    core.store.close()
    config = tmp_path / "monitor.yaml"
    config.write_text(
        json.dumps(
            {  # JSON is YAML
                "kind": "monitor",
                "store": {"path": str(tmp_path / "monitor.db")},
                "probes": [{"id": "p1", "key": "k"}],
                "targets": [{"id": "t1"}, {"id": "t2"}],
                "services": SERVICES,
            }
        )
    )
    out = tmp_path / "evidence"
    period = ("--from", format_time(T0), "--to", format_time(T0 + timedelta(hours=1)))
    assert cli.main(["report", *period, "--format", "json", "--out", str(out), "-c", str(config)]) == 0
    [lost] = json.loads((out / "report.json").read_text())["redundancy_lost"]
    assert (lost["service"], lost["lost_paths"], lost["worst_state"]) == ("uk-999", ["t2"], "degraded")
