"""A monitor that starts on stored state that pages at once: it stays up and pages once.

The monitor as its own process (tests/support/system.py), a real mosquitto, probe and responder,
and a real HTTP receiver as the pager.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.support.system import System

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


def _metric(system: System, name: str) -> float | None:
    body = system.get("/metrics")
    if body is None:
        return None
    for line in body.decode().splitlines():
        if line.startswith(f"{name} "):
            return float(line.split()[1])
    return None


def test_a_broker_outage_is_named_as_the_monitor_cut_off_and_it_resubscribes(tmp_path: Path) -> None:
    with System(tmp_path, reachability={"gap_incident_after": "3s"}) as system:
        system.add_responder("r1")
        system.add_probe("p1", {"t1": "r1"})
        system.start_monitor()  # default ingest.shared_group: ecpm, a shared subscription
        system.wait_state("t1", "up")
        assert _metric(system, "ecpm_monitor_mqtt_connected") == 1.0
        heard = _metric(system, "ecpm_monitor_mqtt_last_message_timestamp_seconds")
        assert heard is not None and heard > 0
        system.broker.stop()
        system.wait_for(lambda: _metric(system, "ecpm_monitor_mqtt_connected") == 0.0, 20, "connected 0")
        system.wait_state("t1", "unknown", timeout=20)
        system.wait_for(lambda: system.receiver.events() == [("trigger", 1)], 15, "one gap page")
        summary = system.receiver.bodies[0]["incident"]["summary"]
        assert summary.startswith("the monitor lost its MQTT connection at "), summary
        target = system.api("/api/v1/targets")["targets"][0]
        assert target["why"].startswith("the monitor lost its MQTT connection at "), target
        system.broker.start()  # persistence on: the session is back, its shared subscription is not
        system.wait_for(lambda: _metric(system, "ecpm_monitor_mqtt_connected") == 1.0, 20, "connected 1")
        system.wait_state("t1", "up", timeout=30)  # results reach it again: subscribed anew
        system.wait_for(lambda: len(system.receiver.events()) == 2, 15, "the resolve page")
        assert system.receiver.events() == [("trigger", 1), ("resolve", 1)]
        later = _metric(system, "ecpm_monitor_mqtt_last_message_timestamp_seconds")
        assert later is not None and later > heard
