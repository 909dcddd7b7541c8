"""A monitor that starts on stored state that pages at once: it stays up and pages once.

The monitor as its own process (tests/system.py), a real mosquitto, probe and responder,
and a real HTTP receiver as the pager.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.system import System

pytestmark = pytest.mark.peers("mosquitto")


def test_a_monitor_away_longer_than_gap_incident_after_starts_and_pages_once(tmp_path: Path) -> None:
    with System(tmp_path, reachability={"gap_incident_after": "3s"}) as system:
        system.add_responder("r1")
        probe = system.add_probe("p1", {"t1": "r1"})
        monitor = system.start_monitor()
        system.wait_state("t1", "up")
        probe.stop()  # no result will come while the monitor is away, nor after it is back
        assert monitor.stop() == 0
        assert system.receiver.events() == []  # the target was up when the monitor stopped
        # away longer than the heartbeat gap (10 s) and gap_incident_after (3 s): the first
        # evaluation after the restart finds the target unknown for too long and opens a gap
        time.sleep(12)
        monitor.start()
        system.wait_for(lambda: system.get("/healthz") is not None, 20, "the monitor back")
        system.wait_for(lambda: system.receiver.events() == [("trigger", 1)], 15, "one gap page")
        assert monitor.proc.poll() is None, monitor.text()[-3000:]
        assert system.receiver.bodies[0]["incident"]["kind"] == "gap"
        incidents = system.api("/api/v1/incidents")["incidents"]
        assert [(i["kind"], i["state"]) for i in incidents] == [("gap", "open")]
        assert [n["state"] for n in incidents[0]["notifications"]] == ["sent"]
        # a second restart finds the incident open in the store: no second page
        assert monitor.stop() == 0
        monitor.start()
        system.wait_for(lambda: system.get("/healthz") is not None, 20, "the monitor back again")
        system.wait_for(lambda: system.state("t1") == "unknown", 10, "t1 unknown after the restart")
        assert monitor.proc.poll() is None, monitor.text()[-3000:]
        assert system.receiver.events() == [("trigger", 1)]
        assert len(system.api("/api/v1/incidents")["incidents"]) == 1
