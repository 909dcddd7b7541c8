"""Probe clocks ±5 min end to end: the monitor as its own process, a real mosquitto,
signed results crafted with a clock five minutes fast and five minutes slow, the state
and the skew read back over HTTP, and a restart."""

from __future__ import annotations

import asyncio
import math
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiomqtt
import pytest
from prometheus_client.parser import text_string_to_metric_families

from probes.result import parse_time
from tests.support.monitor import ProbeSim
from tests.support.processes import Process
from tests.support.system import System

pytestmark = pytest.mark.peers("mosquitto")

FIVE_MIN = timedelta(minutes=5)
CLOCKS = {"fast": FIVE_MIN, "slow": -FIVE_MIN}  # probe -> its clock minus the true time
COVERS = {"fast": "t-fast", "slow": "t-slow"}


async def _calls(port: int, sims: dict[str, ProbeSim], *, count: int, every: float) -> None:
    """Each probe publishes a passing call every ``every`` s, stamped by its own clock."""
    async with aiomqtt.Client("127.0.0.1", port) as client:
        for _ in range(count):
            for probe, sim in sims.items():
                stamped = datetime.now(UTC) + CLOCKS[probe]
                result = sim.result(COVERS[probe], "pass", stamped)
                await client.publish(sim.topic(COVERS[probe]), result.to_json(), qos=1, timeout=10)
            await asyncio.sleep(every)


def _skews(system: System) -> dict[str, float]:
    body = system.get("/metrics") or b""
    return {
        s.labels["probe"]: s.value
        for f in text_string_to_metric_families(body.decode())
        if f.name == "ecpm_probe_clock_skew_seconds"
        for s in f.samples
    }


def _start(system: System) -> None:
    config = system.monitor_config()
    config["probes"] = [{"id": p, "key": system.probe_key(p)} for p in CLOCKS]
    config["ingest"] = {"max_clock_skew": "30s"}
    system.monitor = Process("monitor", config, system.workdir, "monitor")
    system.wait_for(lambda: system.get("/healthz") is not None, 20, "the monitor's /healthz")


def test_probe_clocks_five_minutes_off_either_way(tmp_path: Path) -> None:
    # interval 2 s: a target is unknown after 6 s without a fresh result, and a gap of 4 s
    # pages: far shorter than the five minutes either clock is off by
    with System(tmp_path, interval="2s", reachability={"gap_incident_after": "4s"}) as system:
        system.targets.update(COVERS.values())
        _start(system)
        skews = _skews(system)
        assert set(skews) == set(CLOCKS) and all(math.isnan(v) for v in skews.values())  # NaN until known
        sims = {p: ProbeSim(p, key=system.probe_key(p)) for p in CLOCKS}

        # 12 s of live results, one per second from each probe
        asyncio.run(_calls(system.broker.port, sims, count=12, every=1.0))
        system.wait_for(
            lambda: (s := _skews(system)).keys() == CLOCKS.keys() and not any(map(math.isnan, s.values())),
            10,
            "both skews known",
        )
        skews = _skews(system)
        # the estimate is the skew less the smallest transit delay seen (loopback: ms)
        assert 299.0 < skews["fast"] <= 300.0, skews
        assert -301.0 < skews["slow"] <= -300.0, skews
        targets = {t["id"]: t for t in system.api("/api/v1/targets")["targets"]}
        assert targets["t-fast"]["state"] == "up", targets["t-fast"]["why"]
        assert targets["t-slow"]["state"] == "up", targets["t-slow"]["why"]  # was unknown, and paged
        assert system.receiver.events() == []  # no gap was paged while results arrived
        now = datetime.now(UTC)
        for t in targets.values():
            last = parse_time(t["last_success_at"])
            assert now - timedelta(seconds=30) < last <= now, t  # the monitor's time, not the probe's
        probes = {p["id"]: p for p in system.api("/api/v1/probes")["probes"]}
        assert probes["fast"]["clock_skewed"] and probes["slow"]["clock_skewed"]
        latest = targets["t-fast"]["latest"][0]
        assert parse_time(latest["finished_at"]) - parse_time(latest["judged_at"]) > timedelta(seconds=299)
        stopped_at = datetime.now(UTC)

        # silence: the fast probe's results stop being fresh when they stop arriving, not
        # five minutes later
        system.wait_state("t-fast", "unknown", timeout=30)
        system.wait_state("t-slow", "unknown", timeout=30)
        assert datetime.now(UTC) < stopped_at + FIVE_MIN

        # a restart does not revive the results stamped in the future
        assert system.monitor is not None
        system.monitor.stop()
        _start(system)
        targets = {t["id"]: t for t in system.api("/api/v1/targets")["targets"]}
        assert targets["t-fast"]["state"] == "unknown", targets["t-fast"]["why"]
        assert parse_time(targets["t-fast"]["last_success_at"]) <= stopped_at
        skews = _skews(system)  # rebuilt from the store
        assert 299.0 < skews["fast"] <= 300.0 and -301.0 < skews["slow"] <= -300.0, skews
