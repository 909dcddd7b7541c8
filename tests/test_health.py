"""The probe's /metrics and /healthz: own registry, snapshot collector, heartbeat."""

from __future__ import annotations

import asyncio
import socket
import time
import urllib.error
import urllib.request
from datetime import UTC, datetime
from pathlib import Path

import prometheus_client
import pytest

from ecpm.settings import MqttSettings
from probes.config import ScheduleSettings, Target
from probes.health import HealthError, HealthServer
from probes.mqtt import Publisher
from probes.outbox import Outbox
from probes.outcome import CheckOutcome
from probes.result import Result
from probes.scheduler import CheckReport, Scheduler

T0 = datetime(2024, 5, 1, tzinfo=UTC)


def _target(tid: str) -> Target:
    return Target(
        id=tid,
        uri=f"sip:{tid}@127.0.0.1:5090",
        test_endpoint=True,
        checks={"invite": {"interval": "30s"}, "options": {"interval": "10s"}},
    )


async def _runner(target: Target, kind: str) -> CheckOutcome:
    return CheckOutcome(check=kind, outcome="fail", started_at=T0, finished_at=T0, stage="transport")


async def _sink(report: CheckReport) -> None:
    return None


def _parts(tmp_path: Path) -> tuple[Outbox, Publisher, Scheduler]:
    box = Outbox(tmp_path / "o.db", max_results=100)
    pub = Publisher(
        settings=MqttSettings(port=1), probe_id="p1", outbox=box, on_command=lambda c: None, key="k"
    )
    sched = Scheduler(
        targets=[_target("t1"), _target("t2")],
        settings=ScheduleSettings(confirm_failures=False, jitter=0),
        runner=_runner,
        sink=_sink,
    )
    return box, pub, sched


def test_metrics_from_a_snapshot_in_an_own_registry(tmp_path: Path) -> None:
    box, pub, sched = _parts(tmp_path)
    refusals = {"emergency_number": 2}
    health = HealthServer(
        listen="127.0.0.1:0",
        probe="p1",
        version="1.2.3",
        outbox=box,
        publisher=pub,
        scheduler=sched,
        guard_refusals=lambda: refusals,
    )
    get = health.registry.get_sample_value

    async def main() -> None:
        outcome = CheckOutcome(check="invite", outcome="pass", started_at=T0, finished_at=T0)
        for _ in range(3):
            await box.add(lambda s: Result.from_outcome(outcome, probe="p1", seq=s, target="t1", key=b"k"))
        pub._handle_command("ecpm/v1/commands/p1", b"{bad", False)
        task = asyncio.create_task(sched.run())
        await asyncio.sleep(0.2)  # first checks run at start
        await sched.stop()
        await task

    asyncio.run(main())
    assert get("ecpm_probe_info", {"probe": "p1", "version": "1.2.3"}) == 1
    assert get("ecpm_probe_outbox_depth") == 3
    assert 0 <= get("ecpm_probe_outbox_oldest_age_seconds") < 5  # type: ignore[operator]
    assert get("ecpm_probe_outbox_last_seq") == 3
    assert get("ecpm_probe_outbox_overflow_total") == 0
    assert get("ecpm_probe_outbox_lost_total") == 0
    assert get("ecpm_probe_mqtt_connected") == 0
    assert get("ecpm_probe_mqtt_publish_errors_total") == 0
    assert get("ecpm_probe_commands_refused_total", {"reason": "json"}) == 1
    assert get("ecpm_probe_guard_refusals_total", {"reason": "emergency_number"}) == 2
    assert get("ecpm_probe_checks_in_flight") == 0
    # every configured series exists from the start, zeros included
    for target in ("t1", "t2"):
        for kind in ("invite", "options"):
            assert get("ecpm_probe_checks_total", {"target": target, "check": kind, "outcome": "pass"}) == 0
            assert (
                get("ecpm_probe_checks_total", {"target": target, "check": kind, "outcome": "fail"})
                is not None
            )
    ran = sum(
        get("ecpm_probe_checks_total", {"target": t, "check": k, "outcome": "fail"}) or 0
        for t in ("t1", "t2")
        for k in ("invite", "options")
    )
    assert ran >= 1
    # never the global registry
    assert prometheus_client.REGISTRY.get_sample_value("ecpm_probe_outbox_depth") is None
    box.close()


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as err:
        with err:
            return err.code, err.read().decode()


def test_http_metrics_healthz_and_heartbeat(tmp_path: Path) -> None:
    box, pub, _ = _parts(tmp_path)
    health = HealthServer(listen="127.0.0.1:0", probe="p1", outbox=box, publisher=pub, stale_after=0.5)
    health.start()
    try:
        base = f"http://127.0.0.1:{health.port}"
        status, body = _get(base + "/metrics")
        assert status == 200 and "ecpm_probe_outbox_depth 0.0" in body
        assert "ecpm_probe_mqtt_connected 0.0" in body
        assert "ecpm_probe_checks_total" not in body  # no scheduler given: no series
        assert _get(base + "/healthz") == (200, "ok\n")
        assert _get(base + "/nope")[0] == 404

        async def stall_then_beat() -> None:
            time.sleep(0.7)  # noqa: ASYNC251 - a blocked event loop is the point
            status, body = _get(base + "/healthz")
            assert status == 503 and "has not run" in body
            beating = asyncio.create_task(health.run_heartbeat(every=0.05))
            await asyncio.sleep(0.1)
            assert _get(base + "/healthz") == (200, "ok\n")
            beating.cancel()

        health.beat()
        asyncio.run(stall_then_beat())
    finally:
        health.stop()
        health.stop()
        box.close()


def test_a_busy_port_is_a_clear_error(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        health = HealthServer(listen=f"127.0.0.1:{port}", probe="p1")
        with pytest.raises(HealthError, match=f"cannot listen on 127.0.0.1:{port}"):
            health.start()
