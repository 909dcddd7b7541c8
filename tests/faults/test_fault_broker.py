"""Fault cases at the broker: stopped 60 s and restarted (with and without persistence), and
its queue for a stopped monitor overflowing (``max_queued_messages 50``).

Run with ``make faults`` (not part of ``make test``); see docs/monitor.md, "Fault suite".
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.faults.common import (
    MISSING,
    MQTT_CONNECTED,
    incidents,
    metric_of,
    settle,
)
from tests.support.system import System

pytestmark = [pytest.mark.faults, pytest.mark.peers("mosquitto")]

BROKER_DOWN = 60.0  # seconds the broker stays stopped


@pytest.mark.timeout(300)
@pytest.mark.parametrize("persistence", [True, False], ids=["persistence", "no-persistence"])
def test_broker_stopped_60s_and_restarted_loses_nothing(tmp_path: Path, persistence: bool) -> None:
    # the default shared subscription ($share/ecpm/...): the broker may restore the monitor's
    # session without it, or (no persistence) forget the session; the monitor subscribes again
    with System(tmp_path, persistence=persistence) as system:
        system.add_responder("r1")
        system.add_probe("p1", {"t1": "r1"}, check="options", start=False)
        system.add_probe("p2", {"t1": "r1"}, check="options", start=False)
        system.start_monitor()
        system.start_probes()  # after the monitor: it sees every result from seq 1
        system.wait_state("t1", "up")
        system.wait_for(lambda: system.metric(MQTT_CONNECTED) == 1, 20, f"{MQTT_CONNECTED} 1")
        system.broker.stop()
        system.wait_for(lambda: system.metric(MQTT_CONNECTED) == 0, 30, f"{MQTT_CONNECTED} 0 (cut off)")
        time.sleep(BROKER_DOWN)  # the fault lasts this long; the probes' outboxes fill
        system.broker.start()
        # the probes' and the monitor's reconnect backoff reaches 30 s after a minute down
        system.wait_for(lambda: system.metric(MQTT_CONNECTED) == 1, 60, f"{MQTT_CONNECTED} 1 again")
        system.wait_state("t1", "up", timeout=60)
        settle(system, repair=True)  # and every missing result repaired, none unrecoverable
        # 60 s is well under gap_incident_after (300 s): no incident, no page
        assert incidents(system) == []
        assert system.receiver.bodies == []


@pytest.mark.timeout(300)
def test_monitor_stopped_while_the_broker_queue_overflows_every_gap_is_repaired(tmp_path: Path) -> None:
    # one result a second per target, three targets, two probes: six results a second for
    # a monitor whose queue at the broker holds 50 (plus its in-flight window)
    with System(tmp_path, interval="1s", max_queued_messages=50) as system:
        system.add_responder("r1")
        targets = {"t1": "r1", "t2": "r1", "t3": "r1"}
        system.add_probe("p1", targets, check="options", health=True, start=False)
        system.add_probe("p2", targets, check="options", health=True, start=False)
        monitor = system.start_monitor()
        system.start_probes()  # after the monitor: it sees every result from seq 1
        for target in targets:
            system.wait_state(target, "up")

        def published() -> float:
            return sum(system.probe_metric(p, "ecpm_probe_mqtt_published_total") or 0.0 for p in ("p1", "p2"))

        monitor.stop()  # a clean stop: its persistent session stays at the broker, queueing
        before = published()
        system.wait_for(lambda: published() - before >= 150, 90, "150 results published to a full queue")
        monitor.start()
        system.wait_monitor()
        system.wait_for(
            lambda: sum(metric_of(system, MISSING, p) for p in ("p1", "p2")) > 0,
            30,
            "the overflow to show as seq gaps (else the case proved nothing)",
        )
        settle(system, repair=True)  # and every missing result repaired, none unrecoverable
        assert incidents(system) == []
        assert system.receiver.bodies == []
