"""The probe agent as a provider runs it: ``ecpm probe`` in its own process, a real
mosquitto, real calls to the project's responder, a real MQTT subscriber.

Nothing lost: results survive a broker outage and a kill -9 of the probe, arrive
signed and in sequence; the Last Will marks a killed probe offline; SIGHUP swaps a
valid config and refuses a broken one.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from probes.result import Result
from probes.result import verify_signature as verify
from tests.support.brokers import Broker
from tests.support.mqtt import Subscriber
from tests.support.net import free_port
from tests.support.paths import REPO
from tests.support.peers import peer_path
from tests.support.processes import Process, wait_for
from tests.support.sip import ResponderProcess

# a broker that keeps sessions across a restart, as the shipped one
pytestmark = [pytest.mark.peers("mosquitto", "mosquitto_sub"), pytest.mark.broker(persistence=True)]
KEY = "agent-test-key"


def probe_config(
    tmp_path: Path, broker: Broker, responder: ResponderProcess, targets: tuple[str, ...] = ("a", "b")
) -> dict[str, Any]:
    return {
        "kind": "probe",
        "probe": {"id": "p1", "region": "GB", "key": KEY},
        "mqtt": {"host": broker.host, "port": broker.port, "keepalive": "5s"},
        "outbox": {"path": str(tmp_path / "outbox.db")},
        "schedule": {"jitter": 0.0},
        "health": {"listen": f"127.0.0.1:{free_port()}"},
        "targets": [
            {
                "id": t,
                "uri": f"sip:ecpm-{t}@127.0.0.1:{responder.port}",
                "test_endpoint": True,
                "min_spacing": "500ms",
                "checks": {
                    "invite": {
                        "interval": "3s",
                        "media_time": "500ms",
                        "answer_timeout": "3s",
                        "max_duration": "8s",
                    },
                },
            }
            for t in targets
        ],
    }


class ProbeProcess(Process):
    def __init__(self, tmp_path: Path, config: dict[str, Any]) -> None:
        self.health = config["health"]["listen"]  # the probe's own /metrics, for its outbox depth
        super().__init__("probe", config, tmp_path, "probe")


def outbox_depth(path: Path) -> int:
    """Unpublished rows in a stopped probe's outbox (a running probe holds it locked);
    published ones stay until a monitor confirms them."""
    with contextlib.closing(sqlite3.connect(path)) as db:
        return int(db.execute("SELECT COUNT(*) FROM outbox WHERE published = 0").fetchone()[0])


def live_depth(health: str) -> int:
    """Outbox depth from a running probe's own /metrics."""
    try:
        with urllib.request.urlopen(f"http://{health}/metrics", timeout=2) as resp:
            text = resp.read().decode()
    except OSError:
        return -1
    for family in text_string_to_metric_families(text):
        if family.name == "ecpm_probe_outbox_depth":
            return int(family.samples[0].value)
    return -1


def assert_complete(results: list[Result]) -> list[Result]:
    """Every result signed; after dropping QoS 1 redeliveries, seq is 1..N in arrival order."""
    unique: dict[str, Result] = {}
    for r in results:
        assert verify(r, KEY), f"bad signature on seq {r.seq}"
        unique.setdefault(r.id, r)
    seqs = [r.seq for r in unique.values()]
    assert seqs == list(range(1, len(seqs) + 1)), f"sequence not complete and ordered: {seqs}"
    assert len({r.seq for r in unique.values()}) == len(unique)  # no seq reused with another id
    return list(unique.values())


def test_two_targets_signed_results_without_gaps(
    tmp_path: Path, broker: Broker, responder: ResponderProcess
) -> None:
    sub = Subscriber(broker, "ecpm/v1/#", tmp_path / "sub.txt", name="ecpm-test-sub")
    probe = ProbeProcess(tmp_path, probe_config(tmp_path, broker, responder))
    try:
        wait_for(
            lambda: {r.target for r in sub.results()} == {"a", "b"} and len(sub.results()) >= 6,
            40,
            "results for both targets",
        )
    finally:
        assert probe.stop() == 0, probe.text()
        time.sleep(0.5)
        sub.stop()
    results = assert_complete(sub.results())
    assert all(r.outcome == "pass" and r.check == "invite" for r in results), [r.stage for r in results]
    assert all(r.media is not None and r.media.tone_heard and r.media.echo_heard for r in results)
    statuses = [json.loads(p) for t, p in sub.lines() if t == "ecpm/v1/status/p1"]
    assert statuses[0]["online"] is True and statuses[0]["targets"] == ["a", "b"]
    assert statuses[-1]["online"] is False  # a clean stop says so before disconnecting
    assert outbox_depth(tmp_path / "outbox.db") == 0


def probe_metric(health: str, name: str) -> float | None:
    """One unlabelled sample from a running probe's own /metrics."""
    try:
        with urllib.request.urlopen(f"http://{health}/metrics", timeout=2) as resp:
            text = resp.read().decode()
    except OSError:
        return None
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                return float(sample.value)
    return None


def children(pid: int) -> list[int]:
    return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def test_a_killed_sip_worker_is_restarted_and_the_agent_keeps_publishing(
    tmp_path: Path, broker: Broker, responder: ResponderProcess
) -> None:
    config = probe_config(tmp_path, broker, responder)
    config["sip"] = {"workers": 2}
    sub = Subscriber(broker, "ecpm/v1/results/#", tmp_path / "sub.txt", name="ecpm-test-sub")
    probe = ProbeProcess(tmp_path, config)
    try:
        assert probe.proc is not None
        wait_for(lambda: len(children(probe.proc.pid)) == 2, 30, "two SIP workers")
        wait_for(lambda: len(sub.results()) >= 2, 40, "first results")
        victim = children(probe.proc.pid)[0]
        os.kill(victim, signal.SIGKILL)
        health = probe.health
        wait_for(
            lambda: probe_metric(health, "ecpm_probe_sip_worker_restarts_total") == 1,
            30,
            "the worker restarted",
        )
        assert probe_metric(health, "ecpm_probe_sip_workers_up") == 2
        assert victim not in children(probe.proc.pid) and len(children(probe.proc.pid)) == 2
        count = len(sub.results())
        wait_for(lambda: len(sub.results()) >= count + 4, 40, "results after the restart")
        assert probe.proc.poll() is None
    finally:
        assert probe.stop() == 0, probe.text()
        time.sleep(0.5)
        sub.stop()
    results = assert_complete(sub.results())  # seq 1..N: the agent numbered through the crash
    lost = [r for r in results if r.reason == "internal_error"]
    assert all("worker-" in r.detail["worker"] and "SIGKILL" in r.detail["worker"] for r in lost)
    assert all(r.outcome == "pass" for r in results if r.reason != "internal_error")
    assert results[-1].outcome == "pass"


def test_broker_outage_loses_nothing(tmp_path: Path, broker: Broker, responder: ResponderProcess) -> None:
    sub = Subscriber(broker, "ecpm/v1/results/#", tmp_path / "sub.txt", name="ecpm-test-sub")
    probe = ProbeProcess(tmp_path, probe_config(tmp_path, broker, responder, ("a",)))
    try:
        wait_for(lambda: len(sub.results()) >= 2, 30, "first results")
        broker.stop()
        time.sleep(10)  # several 3 s intervals: the probe keeps calling into its outbox
        assert probe.proc.poll() is None
        health = probe.health
        assert live_depth(health) >= 2, "results should have accumulated while the broker was down"
        broker.start()
        wait_for(lambda: live_depth(health) == 0, 40, "the outbox to drain")
    finally:
        assert probe.stop() == 0, probe.text()
        time.sleep(1)
        sub.stop()
    results = assert_complete(sub.results())
    assert len(results) >= 4


def test_kill_9_with_results_in_the_outbox_then_restart(
    tmp_path: Path, broker: Broker, responder: ResponderProcess
) -> None:
    broker.stop()  # the broker is unreachable from the start: results pile up
    config = probe_config(tmp_path, broker, responder, ("a",))
    probe = ProbeProcess(tmp_path, config)
    wait_for(lambda: live_depth(probe.health) >= 2, 40, "results in the outbox")
    probe.stop(signal.SIGKILL)
    stranded = outbox_depth(tmp_path / "outbox.db")
    broker.start()
    sub = Subscriber(broker, "ecpm/v1/results/#", tmp_path / "sub.txt", name="ecpm-test-sub")
    time.sleep(0.5)
    again = ProbeProcess(tmp_path, config)
    try:
        wait_for(lambda: len({r.id for r in sub.results()}) >= stranded + 2, 40, "old and new results")
    finally:
        assert again.stop() == 0, again.text()
        time.sleep(0.5)
        sub.stop()
    results = assert_complete(sub.results())  # seq continues across the kill: 1..N, no gap
    assert len(results) >= stranded + 2


def test_last_will_marks_a_killed_probe_offline(
    tmp_path: Path, broker: Broker, responder: ResponderProcess
) -> None:
    probe = ProbeProcess(tmp_path, probe_config(tmp_path, broker, responder, ("a",)))
    status = tmp_path / "status.txt"

    def retained() -> dict[str, Any] | None:
        done = subprocess.run(
            [peer_path("mosquitto_sub"), "-h", broker.host, "-p", str(broker.port),
             "-t", "ecpm/v1/status/p1", "-C", "1", "-W", "2"],
            capture_output=True, check=False,
        )  # fmt: skip
        status.write_bytes(done.stdout)
        return json.loads(done.stdout) if done.stdout.strip() else None

    try:
        wait_for(lambda: (s := retained()) is not None and s["online"], 30, "retained online status")
        probe.stop(signal.SIGKILL)
        # keepalive 5 s: the broker notices within 1.5 x keepalive and publishes the will
        wait_for(lambda: (s := retained()) is not None and not s["online"], 15, "the Last Will")
    finally:
        probe.stop()


def test_sighup_swaps_a_valid_config_and_refuses_a_broken_one(
    tmp_path: Path, broker: Broker, responder: ResponderProcess
) -> None:
    sub = Subscriber(broker, "ecpm/v1/results/#", tmp_path / "sub.txt", name="ecpm-test-sub")
    config = probe_config(tmp_path, broker, responder, ("a",))
    probe = ProbeProcess(tmp_path, config)
    try:
        wait_for(lambda: any(r.target == "a" for r in sub.results()), 30, "results for a")
        probe.write(probe_config(tmp_path, broker, responder, ("a", "b")))
        probe.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: any(r.target == "b" for r in sub.results()), 30, "results for the new target b")
        probe.write("kind: probe\nprobe: {id: p1, region: GB, key: k}\ntargets: []\ncolour: red\n")
        probe.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "config reload refused" in probe.text(), 10, "the refusal in the log")
        assert "colour: unknown key" in probe.text()
        count = len(sub.results())
        wait_for(lambda: len(sub.results()) >= count + 2, 30, "results after the refused reload")
        assert probe.proc.poll() is None
    finally:
        assert probe.stop() == 0, probe.text()
        time.sleep(0.5)
        sub.stop()
    assert_complete(sub.results())


def test_bad_config_exits_2_without_traceback(tmp_path: Path) -> None:
    bad = tmp_path / "p.yaml"
    bad.write_text(
        "kind: probe\nprobe: {id: p1, region: GB, key: k}\ntargets:\n"
        "  - {id: t, uri: 'sip:999@127.0.0.1', test_endpoint: true}\n"
    )
    done = subprocess.run(
        [sys.executable, "-m", "ecpm", "probe", "-c", str(bad)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    assert "targets[0].uri: refused by the live-number guard" in done.stderr
    assert "Traceback" not in done.stderr
