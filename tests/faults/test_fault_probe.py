"""Fault cases at a probe: ``kill -9``, its outbox on a full disk, its clock 5 minutes off.

Run with ``make faults`` (not part of ``make test``); see docs/monitor.md, "Fault suite".
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import subprocess
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiomqtt
import pytest

from tests.faults.common import (
    CLOCK_SKEW,
    MISSING,
    OUTBOX_ERROR,
    PROBE_LOST,
    incidents,
    metric_of,
    need_root,
    settle,
    stored_by_probe,
)
from tests.support.monitor import ProbeSim, StatusSim
from tests.support.system import System

pytestmark = [pytest.mark.faults, pytest.mark.peers("mosquitto")]


def online(system: System, probe: str) -> bool | None:
    body = system.api("/api/v1/probes")["probes"]
    return next((bool(p["online"]) for p in body if p["id"] == probe), None)


@pytest.mark.timeout(240)
def test_probe_kill_9_last_will_and_seq_continuous_after_restart(tmp_path: Path) -> None:
    with System(tmp_path) as system:
        system.add_responder("r1")
        probe = system.add_probe("p1", {"t1": "r1"}, check="options", start=False)
        system.add_probe("p2", {"t1": "r1"}, check="options", start=False)  # t1 stays covered meanwhile
        system.start_monitor()
        system.start_probes()  # after the monitor: it sees every result from seq 1
        system.wait_state("t1", "up")
        system.wait_for(lambda: online(system, "p1") is True, 20, "p1 online")
        probe.kill()
        system.wait_for(lambda: online(system, "p1") is False, 20, "p1's Last Will (offline)")
        before = max(stored_by_probe(system).get("p1", [0]))
        probe.start()
        system.wait_for(lambda: online(system, "p1") is True, 30, "p1 online again")
        system.wait_for(
            lambda: max(stored_by_probe(system).get("p1", [0])) >= before + 3, 30, "p1's results again"
        )
        ledger = settle(system)
        assert sorted(ledger.stored["p1"]) == list(range(1, ledger.numbered["p1"] + 1))
        assert metric_of(system, MISSING, "p1") == 0  # the seq went on where it was
        assert incidents(system) == []
        assert system.receiver.bodies == []


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs, unmounted afterwards (after the System stopped the probe using it)."""
    need_root("mounts a small tmpfs for the probe's outbox")
    mount = tmp_path / "small-disk"
    mount.mkdir()
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m,mode=0700", "ecpm-faults", str(mount)],
        check=True,
        timeout=30,
    )
    try:
        yield mount
    finally:
        done = subprocess.run(["umount", str(mount)], check=False, timeout=30, capture_output=True)
        if done.returncode != 0:
            subprocess.run(["umount", "-l", str(mount)], check=False, timeout=30)


def fill(directory: Path) -> Path:
    """Write a file until the filesystem has no byte left."""
    filler = directory / "filler"
    with filler.open("wb", buffering=0) as out:
        for chunk in (65536, 4096, 512, 1):
            with contextlib.suppress(OSError):
                while True:
                    try:
                        out.write(b"\0" * chunk)
                    except OSError as exc:
                        if exc.errno != errno.ENOSPC:
                            raise
                        break
    return filler


@pytest.mark.timeout(240)
def test_probe_outbox_on_a_full_disk_is_visible_at_the_monitor_within_one_interval(
    tmp_path: Path, small_disk: Path
) -> None:
    with System(tmp_path) as system:
        system.add_responder("r1")
        system.add_probe(
            "p1", {"t1": "r1"}, check="options", health=True, outbox=small_disk / "outbox.db", start=False
        )
        system.start_monitor()
        system.start_probes()  # after the monitor: it sees every result from seq 1
        system.wait_state("t1", "up")
        system.wait_for(lambda: system.metric(OUTBOX_ERROR, probe="p1") == 0, 20, f"{OUTBOX_ERROR} 0")
        filler = fill(small_disk)
        seen: dict[str, float] = {}

        def trouble_shown() -> bool:
            samples = system.metrics()
            error = samples.get((OUTBOX_ERROR, frozenset({("probe", "p1")})))
            seen["lost"] = samples.get((PROBE_LOST, frozenset({("probe", "p1")})), -1.0)
            return error == 1

        system.wait_for(trouble_shown, 30, f"{OUTBOX_ERROR}{{probe='p1'}} 1 at the monitor")
        # within one interval: shown by the first failed write (one target, one check: one
        # result an interval), so at most one result was lost before the monitor knew
        assert 0 <= seen["lost"] <= 1, f"the monitor saw the trouble only after {seen['lost']} lost results"
        system.wait_for(
            lambda: (system.probe_metric("p1", "ecpm_probe_outbox_lost_total") or 0) >= 1,
            20,
            "a result lost on the full disk (the probe's own count)",
        )
        filler.unlink()
        system.wait_for(lambda: system.metric(OUTBOX_ERROR, probe="p1") == 0, 30, "the disk recovered")
        own = system.probe_metric("p1", "ecpm_probe_outbox_lost_total")
        assert own is not None and own >= 1
        system.wait_for(lambda: system.metric(PROBE_LOST, probe="p1") == own, 20, "the probe's count")
        ledger = settle(system, lost={"p1": int(own)})
        # the lost numbers are exactly the gap the monitor detected, nothing else is missing
        assert metric_of(system, MISSING, "p1") == own
        assert len(ledger.lost("p1")) == own
        assert incidents(system) == []
        assert system.receiver.bodies == []


SKEW = timedelta(minutes=5)


async def publish_flow(
    system: System, sims: dict[str, tuple[ProbeSim, timedelta, str]], rounds: int
) -> list[tuple[str | None, str | None]]:
    """Signed statuses, then a signed pass from each probe every interval, stamped by its
    skewed clock, over the real broker; the states of t1 and t2 after each round."""
    sample: list[tuple[str | None, str | None]] = []
    async with aiomqtt.Client(system.broker.host, system.broker.port) as client:
        for probe, (_, skew, target) in sims.items():
            status = StatusSim(probe, key=system.probe_key(probe))
            payload = status.online(datetime.now(UTC) + skew, targets=(target,))
            await client.publish(status.topic(), payload, qos=1, retain=True, timeout=10)
        for _ in range(rounds):
            for sim, skew, target in sims.values():
                result = sim.result(target, "pass", datetime.now(UTC) + skew)
                await client.publish(sim.topic(target), result.to_json(), qos=1, timeout=10)
            await asyncio.sleep(2.0)  # the targets' interval
            sample.append((system.state("t1"), system.state("t2")))
    return sample


@pytest.mark.timeout(240)
def test_probe_clock_5_minutes_off_is_shown_and_never_makes_a_false_gap(tmp_path: Path) -> None:
    with System(tmp_path, reachability={"gap_incident_after": "6s"}) as system:
        # p1's clock 5 min fast (it covers t1), p2's 5 min slow (it covers t2)
        sims = {
            "p1": (system.add_sim_probe("p1", ["t1"]), SKEW, "t1"),
            "p2": (system.add_sim_probe("p2", ["t2"]), -SKEW, "t2"),
        }
        system.start_monitor()
        states = asyncio.run(publish_flow(system, sims, 14))  # 28 s: beyond stale (6 s) and gap (6 s)
        # up from the second result on (the first may still be evaluating), never unknown or down
        assert states[1:] == [("up", "up")] * (len(states) - 1), states
        assert system.receiver.bodies == [], "a false gap page"
        fast = metric_of(system, CLOCK_SKEW, "p1")
        slow = metric_of(system, CLOCK_SKEW, "p2")
        assert abs(fast - 300) < 30 and abs(slow + 300) < 30, (fast, slow)  # probe minus monitor
        # the monitor judges time: silence after future-stamped results is still silence
        system.wait_state("t1", "unknown", timeout=20)
        system.wait_state("t2", "unknown", timeout=20)
        stored = stored_by_probe(system)
        for probe in ("p1", "p2"):
            assert sorted(stored[probe]) == list(range(1, 15)), (probe, stored[probe])
        assert all(kind == "gap" for _, _, kind, _ in incidents(system))  # the true silence, at most
