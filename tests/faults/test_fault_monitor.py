"""Fault cases at the monitor: ``kill -9`` in steady flow and while a page POST is in flight,
and a monitor down longer than ``reachability.gap_incident_after``.

Run with ``make faults`` (not part of ``make test``); see docs/monitor.md, "Fault suite".
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.faults.common import incidents, settle
from tests.support.system import System

pytestmark = [pytest.mark.faults, pytest.mark.peers("mosquitto")]


def published(system: System, probe: str) -> float:
    return system.probe_metric(probe, "ecpm_probe_mqtt_published_total") or 0.0


@pytest.mark.timeout(240)
def test_monitor_kill_9_in_steady_flow_loses_nothing(tmp_path: Path) -> None:
    # real INVITE calls with media, two probes, two responders
    with System(tmp_path) as system:
        system.add_responder("r1")
        system.add_responder("r2")
        system.add_probe("p1", {"t1": "r1"}, health=True, start=False)
        system.add_probe("p2", {"t1": "r2"}, health=True, start=False)
        monitor = system.start_monitor()
        system.start_probes()  # after the monitor: it sees every result from seq 1
        system.wait_state("t1", "up")
        for _ in range(2):  # twice: the second start replays the first one's unacknowledged batch
            monitor.kill()
            before = {p: published(system, p) for p in ("p1", "p2")}
            system.wait_for(
                lambda before=before: all(published(system, p) >= before[p] + 2 for p in before),
                30,
                "two results from each probe while the monitor is dead",
            )
            monitor.start()
            system.wait_monitor()
            system.wait_state("t1", "up", timeout=30)
        settle(system)
        assert incidents(system) == []
        assert system.receiver.bodies == []


@pytest.mark.timeout(240)
def test_monitor_kill_9_during_a_page_post_pages_again_with_the_same_idempotency_key(
    tmp_path: Path,
) -> None:
    # the webhook timeout is long: the POST is still in flight when the monitor dies
    with System(tmp_path, notifier={"timeout": "30s"}) as system:
        responder = system.add_responder("r1")
        system.add_probe("p1", {"t1": "r1"}, start=False)
        monitor = system.start_monitor()
        system.start_probes()  # after the monitor: it sees every result from seq 1
        system.wait_state("t1", "up")
        receiver = system.receiver
        receiver.hold(1)  # the first page POST: recorded, never answered
        responder.set_fault("answer_503")
        system.wait_for(lambda: len(receiver.bodies) == 1, 30, "the trigger POST (held open)")
        monitor.kill()
        monitor.start()
        system.wait_monitor()
        system.wait_for(lambda: 200 in receiver.answered, 30, "the trigger page answered 200")
        responder.set_fault("none")
        system.wait_state("t1", "up", timeout=30)
        system.wait_for(lambda: any(b["event"] == "resolve" for b in receiver.bodies), 20, "the resolve page")
        settle(system)
        receiver.release()
        assert incidents(system) == [(1, "t1", "down", True)]
        triggers = [i for i, b in enumerate(receiver.bodies) if b["event"] == "trigger"]
        resolves = [i for i, b in enumerate(receiver.bodies) if b["event"] == "resolve"]
        # the held POST never got an answer, its repeat did; nothing else was sent
        assert [receiver.answered[i] for i in triggers] == [None, 200]
        assert [receiver.answered[i] for i in resolves] == [200]
        assert {receiver.bodies[i]["incident"]["id"] for i in triggers + resolves} == {1}
        keys = [receiver.headers[i].get("idempotency-key") for i in triggers]
        assert keys[0] is not None and keys == [keys[0]] * len(keys), f"Idempotency-Key headers: {keys}"
        assert len({receiver.bodies[i]["dedup_key"] for i in triggers}) == 1
        resolve_key = receiver.headers[resolves[0]].get("idempotency-key")
        assert resolve_key is not None and resolve_key != keys[0]  # another page, another key


@pytest.mark.timeout(240)
def test_monitor_down_longer_than_gap_incident_after_starts_and_pages_once(tmp_path: Path) -> None:
    gap_after, interval, stale_after = 4.0, 2.0, 3  # the reachability rules below
    with System(tmp_path, reachability={"gap_incident_after": f"{gap_after:g}s"}) as system:
        system.add_responder("r1")
        probe = system.add_probe("p1", {"t1": "r1"}, check="options", start=False)
        monitor = system.start_monitor()
        system.start_probes()  # after the monitor: it sees every result from seq 1
        system.wait_state("t1", "up")
        monitor.stop()
        probe.stop()
        # the stored state now says: last result long ago, a gap beyond gap_incident_after
        time.sleep(stale_after * interval + gap_after + 2)
        monitor.start()
        system.wait_monitor()  # fails at once if it exits (it once crash-looped after such a stop)
        system.wait_for(lambda: system.receiver.events() == [("trigger", 1)], 30, "one gap page")
        assert monitor.running, monitor.text()[-3000:]
        # again, with the gap incident open: no crash, no second page
        monitor.stop()
        monitor.start()
        system.wait_monitor()
        probe.start()
        system.wait_state("t1", "up", timeout=30)
        system.wait_for(lambda: len(system.receiver.events()) >= 2, 20, "the resolve page")
        assert monitor.running, monitor.text()[-3000:]
        settle(system)
        assert system.receiver.events() == [("trigger", 1), ("resolve", 1)]
        assert system.receiver.answered == [200, 200]
        assert system.receiver.bodies[0]["incident"]["kind"] == "gap"
        assert incidents(system) == [(1, "t1", "gap", True)]
        assert "Traceback" not in monitor.text()
