"""Notification duties and redundancy end to end: real mosquitto, a probe calling two real
responders (a primary and a backup path), the monitor as its own process, a real HTTP
receiver as the pager, ``ecpm incident ack`` against its API, Chromium on the status page."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.browser import dump_dom, parse
from tests.support.paths import REPO
from tests.support.system import System

pytestmark = pytest.mark.peers("mosquitto", "chromium")

DUTIES = [
    # escalates 6 s after detection, due at 20 s: never acknowledged, so missed
    {"name": "psap", "deadline": "20s", "escalate_before": "14s", "text": "notify the affected PSAPs"},
    # would escalate at 20 s, due at 25 s: acknowledged at once, so met and never escalated
    {"name": "nors", "deadline": "25s", "escalate_before": "5s", "text": "file the NORS notification"},
]
SERVICES = [{"id": "uk-999", "description": "two platforms", "primary": ["t1"], "backup": ["t2"]}]


def ack(system: System, *args: str) -> subprocess.CompletedProcess[str]:
    token = system.workdir / "token"
    token.write_text(system.token)
    return subprocess.run(
        [sys.executable, "-m", "ecpm", "incident", "ack", *args, "--monitor", f"http://{system.http}",
         "--token-file", str(token), "--by", "duty-manager"],
        cwd=REPO, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


def test_a_lost_backup_is_degraded_and_its_incident_duties_count_down_escalate_once_and_are_judged(
    tmp_path: Path,
) -> None:
    with System(tmp_path, monitor={"duties": DUTIES, "services": SERVICES}) as system:
        system.add_responder("primary")
        backup = system.add_responder("backup")
        system.add_probe("p1", {"t1": "primary", "t2": "backup"})  # the probe calls both paths
        system.start_monitor()
        system.wait_state("t1", "up")
        system.wait_state("t2", "up")
        assert system.api("/api/v1/services")["services"][0]["state"] == "up"

        backup.set_fault("answer_503")  # the backup breaks while the primary works
        system.wait_state("t2", "down", timeout=20)
        detected = time.monotonic()
        [service] = system.api("/api/v1/services")["services"]
        assert service["state"] == "degraded" and service["redundancy_lost"] is True
        assert [(p["target"], p["lost"]) for p in service["paths"]] == [("t1", False), ("t2", True)]
        system.wait_for(
            lambda: system.metric("ecpm_service_redundancy_lost", service="uk-999") == 1.0, 5, "the metric"
        )
        assert system.state("t1") == "up"

        [incident] = system.api("/api/v1/incidents")["incidents"]
        assert incident["target"] == "t2" and [d["name"] for d in incident["duties"]] == ["psap", "nors"]
        done = ack(system, str(incident["id"]), "--duty", "nors", "--ref", "NORS-2026-1")
        assert done.returncode == 0, done.stdout + done.stderr
        assert "acknowledged duty nors" in done.stdout and "NORS-2026-1" in done.stdout

        # the status page counts the open duty down (its script, in Chromium)
        page = parse(dump_dom(f"http://{system.http}/", budget_ms=1500))
        row = page.find("tr", data_incident=str(incident["id"]))
        psap = row.find(data_duty="psap")
        assert psap.attrs["data-status"] == "pending" and psap.find(class_="countdown").text.endswith(" left")
        assert row.find(data_duty="nors").attrs["data-status"] == "met"

        # psap escalates once (6 s after detection), through the webhook; nors never does
        system.wait_for(
            lambda: ("escalate", incident["id"]) in system.receiver.events(), 20, "the escalation page"
        )
        escalation = next(b for b in system.receiver.bodies if b["event"] == "escalate")
        assert (
            escalation["duty"]["name"] == "psap" and escalation["duty"]["text"] == "notify the affected PSAPs"
        )
        assert escalation["dedup_key"] == f"ecpm-m1-incident-{incident['id']}-duty-psap"
        time.sleep(max(0.0, detected + 27 - time.monotonic()))  # past both deadlines
        assert system.receiver.events() == [("trigger", incident["id"]), ("escalate", incident["id"])]

        [incident] = system.api("/api/v1/incidents")["incidents"]
        statuses = {d["name"]: (d["status"], (d["ack"] or {}).get("ref")) for d in incident["duties"]}
        assert statuses == {"psap": ("missed", None), "nors": ("met", "NORS-2026-1")}
        assert incident["duties"][1]["ack"]["by"] == "duty-manager"

        done = ack(system, "99", "--duty", "nors", "--ref", "x")
        assert done.returncode == 2 and "no incident 99" in done.stderr and "Traceback" not in done.stderr
