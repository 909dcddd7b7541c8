"""The monitor end to end: real mosquitto, real probes and responders, the monitor as its
own process, a real HTTP receiver as the pager, Chromium on the status page."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sqlite3
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import aiomqtt
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.browser import dump_dom, parse, screenshot
from tests.support.monitor import ProbeSim
from tests.support.paths import REPO
from tests.support.system import System

pytestmark = pytest.mark.peers("mosquitto")


def test_outage_opens_one_incident_pages_once_and_resolves(tmp_path: Path) -> None:
    with System(tmp_path) as system:
        responder = system.add_responder("r1")
        system.add_probe("p1", {"t1": "r1"})
        system.start_monitor()
        system.wait_state("t1", "up")
        responder.set_fault("answer_503")
        took = system.wait_state("t1", "down", timeout=20)
        system.wait_for(lambda: system.receiver.events() == [("trigger", 1)], 10, "one trigger page")
        responder.set_fault("no_media")  # still broken, differently: no second incident
        time.sleep(5)
        assert system.state("t1") == "down"
        assert system.receiver.events() == [("trigger", 1)]
        responder.set_fault("none")
        system.wait_state("t1", "up", timeout=20)
        system.wait_for(lambda: len(system.receiver.events()) == 2, 10, "the resolve page")
        assert system.receiver.events() == [("trigger", 1), ("resolve", 1)]
        incident = system.api("/api/v1/incidents")["incidents"][0]
        assert incident["state"] == "resolved"
        assert incident["first_failed_at"] is not None and incident["last_good_at"] is not None
        assert [n["state"] for n in incident["notifications"]] == ["sent", "sent"]
        trigger = system.receiver.bodies[0]
        assert trigger["incident"]["target"] == "t1" and trigger["dedup_key"] == "ecpm-m1-incident-1"
        # detection: failure → confirmed down within one interval plus a few seconds
        assert took < 2 + 8, f"down after {took:.1f}s"


def test_one_failing_probe_of_two_is_degraded_without_a_page(tmp_path: Path) -> None:
    with System(tmp_path) as system:
        system.add_responder("good")
        bad = system.add_responder("bad")
        bad.set_fault("answer_503")
        system.add_probe("p1", {"t1": "good"})
        system.add_probe("p2", {"t1": "bad"})
        system.start_monitor()
        system.wait_state("t1", "degraded")
        time.sleep(8)  # several intervals and confirmations: still not down
        assert system.state("t1") == "degraded"
        assert system.receiver.bodies == []
        assert system.api("/api/v1/incidents")["incidents"] == []


def test_silence_is_unknown_then_a_gap_incident(tmp_path: Path) -> None:
    with System(tmp_path, reachability={"gap_incident_after": "3s"}) as system:
        system.add_responder("r1")
        probe = system.add_probe("p1", {"t1": "r1"})
        system.start_monitor()
        system.wait_state("t1", "up")
        probe.stop()
        system.wait_state("t1", "unknown", timeout=15)  # 3 × 2 s without a result
        system.wait_for(lambda: system.receiver.events() == [("trigger", 1)], 10, "a gap page")
        assert system.receiver.bodies[0]["incident"]["kind"] == "gap"
        probes = system.api("/api/v1/probes")["probes"]
        assert probes[0]["online"] is False  # the clean stop published offline


async def _publish(port: int, messages: list[tuple[str, bytes]], wait: float = 10) -> None:
    async with aiomqtt.Client("127.0.0.1", port) as client:
        for topic, payload in messages:
            await client.publish(topic, payload, qos=1, timeout=wait)


def test_bad_messages_are_rejected_counted_and_the_monitor_keeps_serving(tmp_path: Path) -> None:
    with System(tmp_path) as system:
        system.add_responder("r1")
        system.add_probe("p1", {"t1": "r1"})
        system.start_monitor()
        system.wait_state("t1", "up")
        honest = ProbeSim("p1", key=system.probe_key("p1"))
        honest.seq = 10_000
        good = honest.result("t1", "pass", datetime.now(UTC))
        forged = ProbeSim("p1", key="wrong").result("t1", "fail", good.finished_at)
        stranger = ProbeSim("p9", key="x").result("t1", "fail", good.finished_at)
        topic = "ecpm/v1/results/p1/t1"
        asyncio.run(_publish(system.broker.port, [
            (topic, forged.to_json()),
            (topic, good.to_json().replace(b"ecpm.result/1", b"ecpm.result/2")),
            (topic, b"\x00\x01 garbage \xff"),
            (topic, b"{" * (64 * 1024 + 1)),  # delivered, over ingest.max_payload_bytes
            ("ecpm/v1/results/p9/t1", stranger.to_json()),
        ]))  # fmt: skip
        # over the broker's message_size_limit: never delivered (mosquitto 2.0.11 drops the
        # message and disconnects its publisher)
        with contextlib.suppress(aiomqtt.MqttError, TimeoutError):
            asyncio.run(_publish(system.broker.port, [(topic, b"{" * 10 * 1024 * 1024)], wait=3))

        def rejected() -> dict[str, float]:
            body = system.get("/metrics") or b""
            return {
                s.labels["reason"]: s.value
                for f in text_string_to_metric_families(body.decode())
                if f.name == "ecpm_results_rejected"
                for s in f.samples
                if s.name == "ecpm_results_rejected_total"
            }

        want = {"signature": 1.0, "schema": 1.0, "encoding": 1.0, "too_large": 1.0, "unknown_probe": 1.0}
        system.wait_for(
            lambda: all(rejected().get(k) == v for k, v in want.items()), 15, f"rejections {want}"
        )
        assert system.state("t1") == "up"  # the forged failure changed nothing
        count = len(system.api("/api/v1/targets")["targets"][0]["latest"])
        assert count >= 1 and system.get("/healthz") == b"ok"


def test_kill_9_monitor_loses_nothing_duplicates_nothing_and_the_chain_verifies(tmp_path: Path) -> None:
    with System(tmp_path) as system:
        responder = system.add_responder("r1")
        probe = system.add_probe("p1", {"t1": "r1"})
        monitor = system.start_monitor()
        system.wait_state("t1", "up")
        responder.set_fault("answer_503")
        system.wait_state("t1", "down", timeout=20)
        monitor.stop(signal.SIGKILL)
        time.sleep(6)  # results keep flowing into the broker's session for the monitor
        monitor.start()
        system.wait_for(lambda: system.get("/healthz") is not None, 20, "the monitor back")
        responder.set_fault("none")
        system.wait_state("t1", "up", timeout=25)
        probe.stop()
        time.sleep(2)
        monitor.stop()
        db = sqlite3.connect(tmp_path / "monitor.db")
        seqs = [row[0] for row in db.execute("SELECT seq FROM results WHERE probe = 'p1' ORDER BY seq")]
        incidents = db.execute("SELECT COUNT(*) FROM incidents").fetchone()[0]
        db.close()
    assert seqs == list(range(1, len(seqs) + 1)), f"lost or duplicated results: {seqs}"
    assert incidents == 1
    done = subprocess.run(
        [sys.executable, "-m", "ecpm", "ledger", "verify", "--db", str(tmp_path / "monitor.db")],
        cwd=REPO, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.startswith(f"ok: {len(seqs)} results")


DESIGN_SERIES = {
    "ecpm_target_up": "gauge",
    "ecpm_target_state": "gauge",
    "ecpm_probe_up": "gauge",
    "ecpm_checks": "counter",
    "ecpm_check_failures": "counter",
    "ecpm_check_stage_seconds": "histogram",
    "ecpm_media_mos": "gauge",
    "ecpm_last_success_timestamp_seconds": "gauge",
    "ecpm_results_rejected": "counter",
    "ecpm_results_missing": "counter",
    "ecpm_incidents_open": "gauge",
}


@pytest.mark.peers("mosquitto", "chromium")
def test_metrics_and_status_page_from_a_live_monitor(tmp_path: Path) -> None:
    with System(tmp_path) as system:
        responder = system.add_responder("r1")
        system.add_probe("p1", {"t1": "r1"})
        system.start_monitor()
        system.wait_state("t1", "up")
        families = {
            f.name: f for f in text_string_to_metric_families((system.get("/metrics") or b"").decode())
        }
        for name, kind in DESIGN_SERIES.items():
            assert name in families and families[name].type == kind, name
        ringing = [
            s for s in families["ecpm_check_stage_seconds"].samples
            if s.name.endswith("_count") and s.labels["stage"] == "ringing" and s.labels["check"] == "invite"
        ]  # fmt: skip
        assert ringing and ringing[0].value >= 1
        page = parse(dump_dom(f"http://{system.http}/"))
        card = page.find_all("article", **{"data-target": "t1"})
        assert card and card[0].attrs["data-state"] == "up"
        responder.set_fault("answer_503")
        system.wait_state("t1", "down", timeout=20)
        page = parse(dump_dom(f"http://{system.http}/"))
        assert page.find_all("article", **{"data-target": "t1"})[0].attrs["data-state"] == "down"
        assert "DOWN" in page.text
        shot = screenshot(f"http://{system.http}/", tmp_path / "status-down.png")
        assert shot.stat().st_size > 10_000


def verify(system: System, *args: str) -> subprocess.CompletedProcess[str]:
    token = system.workdir / "token"
    token.write_text(system.token)
    return subprocess.run(
        [sys.executable, "-m", "ecpm", "verify", "--monitor", f"http://{system.http}",
         "--token-file", str(token), *args],
        cwd=REPO, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip


def test_verify_gate_passes_then_fails_after_breaking_the_path(tmp_path: Path) -> None:
    with System(tmp_path, interval="30s") as system:  # scheduled calls rare: verify asks for its own
        system.add_responder("r1")
        bad = system.add_responder("r2")
        system.add_probe("p1", {"t1": "r1"})
        system.add_probe("p2", {"t1": "r2"})
        system.start_monitor()
        system.wait_for(
            lambda: all(p["online"] for p in system.api("/api/v1/probes")["probes"]), 20, "both probes online"
        )
        done = verify(system, "--target", "t1", "--change-ref", "CHG-1234", "--timeout", "30s")
        assert done.returncode == 0, done.stdout + done.stderr
        assert "t1 for CHG-1234" in done.stdout and "PASS — 2 of 2 required passes" in done.stdout
        assert "/2 answered [p1 " in done.stderr  # the progress line names the probes
        lines = done.stdout.splitlines()
        assert lines[1].split() == ["PROBE", "OUTCOME", "STAGE", "SIP", "POST-DIAL", "DELAY", "MOS"]
        assert {ln.split()[0] for ln in lines[2:]} == {"p1", "p2"}
        bad.set_fault("answer_503")
        done = verify(system, "--target", "t1", "--change-ref", "CHG-1235", "--timeout", "30s")
        assert done.returncode == 1, done.stdout + done.stderr
        assert "FAIL — 1 of 2 required passes" in done.stdout
        assert any(ln.split()[:4] == ["p2", "fail", "answer", "503"] for ln in done.stdout.splitlines())
        # one probe is enough when the pipeline says so
        done = verify(system, "--target", "t1", "--probe", "p1", "--timeout", "30s")
        assert done.returncode == 0, done.stdout + done.stderr
        db = sqlite3.connect(tmp_path / "monitor.db")
        rows = db.execute("SELECT change_ref, outcome FROM verifications ORDER BY id").fetchall()
        db.close()
    assert rows == [("CHG-1234", "pass"), ("CHG-1235", "fail"), (None, "pass")]


def test_verify_usage_errors_exit_2(tmp_path: Path) -> None:
    with System(tmp_path) as system:
        system.add_responder("r1")
        system.add_probe("p1", {"t1": "r1"})
        system.start_monitor()
        done = verify(system, "--target", "nope")
        assert done.returncode == 2 and "unknown target 'nope'" in done.stderr
        system.token = "wrong"
        done = verify(system, "--target", "t1")
        assert done.returncode == 2 and "monitor refused (401)" in done.stderr
        assert "Traceback" not in done.stderr
