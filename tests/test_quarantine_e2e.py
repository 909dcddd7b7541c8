"""Defence in depth, end to end: a row the store cannot read (a signed result with
``timings.ringing = 10**400``, written straight into SQLite as an older monitor stored
it) and a damaged one. A real ``ecpm monitor`` on a real mosquitto starts, serves its
status page, API and metrics, keeps ingesting and restarts cleanly; ``ecpm report``
and ``ecpm ledger verify`` name both rows and exit 0."""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
from prometheus_client.parser import text_string_to_metric_families

from monitor.store import SqliteStore
from tests.support.brokers import Broker
from tests.support.hostile import append_raw_row, sign, signed_payload
from tests.support.monitor import ProbeSim
from tests.support.net import HOST, free_port
from tests.support.processes import Process, wait_for
from tests.support.processes import run_ecpm as ecpm

pytestmark = pytest.mark.peers("mosquitto")

KEY = "key-p1"


def get(http: str, path: str) -> tuple[int, bytes] | None:
    try:
        with urllib.request.urlopen(f"http://{http}{path}", timeout=2) as resp:
            return resp.status, bytes(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, b""
    except OSError:
        return None


def metric(http: str, name: str, labels: dict[str, str] | None = None) -> float | None:
    got = get(http, "/metrics")
    if got is None:
        return None
    for family in text_string_to_metric_families(got[1].decode()):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in (labels or {}).items()):
                return float(sample.value)
    return None


async def publish(port: int, messages: list[tuple[str, bytes]]) -> None:
    async with aiomqtt.Client(HOST, port) as client:
        for topic, payload in messages:
            await client.publish(topic, payload, qos=1)


def huge_timing_result(sim: ProbeSim, at: datetime) -> dict[str, Any]:
    data = dict(json.loads(sim.result("t1", "pass", at).to_json()))
    data["timings"] = {**data["timings"], "ringing": 10**400}
    return sign(data, sim.key)


def test_a_store_with_unreadable_rows_starts_serves_reports_and_verifies(tmp_path: Path) -> None:
    db = tmp_path / "monitor.db"
    now = datetime.now(UTC)
    sim = ProbeSim("p1", key=KEY)
    store = SqliteStore(db)
    for i in range(3):
        at = now - timedelta(seconds=90 - 10 * i)
        assert store.add_result(sim.result("t1", "pass", at), at)
    store.set_last_seq("p1", sim.seq)
    store.commit()
    store.close()
    bad = append_raw_row(db, huge_timing_result(sim, now - timedelta(seconds=30)))
    junk = append_raw_row(db, '{"schema": "ecpm.result/1", "id": [', received_at="2026-01-01T00:00:00.000Z")

    with Broker(tmp_path) as broker:
        http = f"{HOST}:{free_port()}"
        config = {
            "kind": "monitor",
            "id": "m1",
            "mqtt": {"host": broker.host, "port": broker.port, "keepalive": "5s"},
            "store": {"path": str(db), "commit_interval": "100ms"},
            "http": {"listen": http},
            "probes": [{"id": "p1", "key": KEY}],
            "targets": [{"id": "t1", "interval": "60s"}],
        }
        monitor = Process("monitor", config, tmp_path, "monitor")
        try:
            wait_for(lambda: get(http, "/healthz") == (200, b"ok"), 20, "the monitor's /healthz")
            assert monitor.proc.poll() is None
            # state restored from the readable rows; the unreadable one skipped and counted
            targets = json.loads((get(http, "/api/v1/targets") or (0, b"{}"))[1])["targets"]
            assert targets[0]["id"] == "t1" and targets[0]["state"] == "up"
            for path in ("/", "/api/v1/probes", "/api/v1/incidents"):
                assert (get(http, path) or (0,))[0] == 200, path
            assert metric(http, "ecpm_results_quarantined_total") == 1.0
            assert "quarantined" in monitor.text() and f"row {bad} " in monitor.text()
            # it keeps ingesting: a fresh result is stored, the huge timing again is rejected
            fresh = sim.result("t1", "fail", datetime.now(UTC))
            hostile = signed_payload(huge_timing_result(sim, datetime.now(UTC)), KEY)
            asyncio.run(publish(broker.port, [("ecpm/v1/results/p1/t1", fresh.to_json()),
                                              ("ecpm/v1/results/p1/t1", hostile)]))  # fmt: skip
            wait_for(
                lambda: metric(http, "ecpm_results_rejected_total", {"reason": "out_of_range"}) == 1.0,
                15, "the huge timing rejected as out_of_range",
            )  # fmt: skip
            wait_for(
                lambda: json.loads((get(http, "/api/v1/targets") or (0, b"{}"))[1])["targets"][0]["state"]
                == "degraded",
                15, "the fresh failure to count",
            )  # fmt: skip
            # and restarts cleanly, as often as it likes
            assert monitor.stop() == 0
            monitor.start()
            wait_for(lambda: get(http, "/healthz") == (200, b"ok"), 20, "the monitor back")
            assert monitor.proc.poll() is None
        finally:
            code = monitor.stop()
        assert code == 0, monitor.text()[-2000:]
        assert "Traceback" not in monitor.text()

    out = tmp_path / "report"
    day = now.date()
    period = ("--from", str(day - timedelta(days=1)), "--to", str(day + timedelta(days=1)))
    done = ecpm("report", "--db", str(db), *period, "--out", str(out), "--format", "html,json,csv")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "cannot be read (quarantined)" in done.stderr and "Traceback" not in done.stderr
    report = json.loads((out / "report.json").read_text())
    problems = [u["problem"] for u in report["unreadable"]]
    assert any(p.startswith(f"row {bad} (result ") and "out_of_range" in p for p in problems), problems
    assert report["ledger"]["ok"] is True
    calls = report["targets"][0]["calls"]
    assert calls["placed"] == 4  # three stored before, one fresh; neither hostile one
    assert f"row {bad} (result " in (out / "report.html").read_text()

    done = ecpm("ledger", "verify", "--db", str(db))
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("ok: 6 results, chain intact; last hash ")
    assert lines[1].startswith("QUARANTINED: 2 stored result(s) cannot be read")
    assert lines[2].startswith(f"  row {bad} (result ") and lines[3].startswith(f"  row {junk} (result ")
