"""The agent's SIP worker processes (probes.workers, probes.worker) against real peers:
SIPp echoing RTP, real pjsua2 workers, a real SIGKILL.

More than 4 verified calls at once from one pool; a worker killed mid-call loses only its
own calls (internal_error, naming the signal), the others pass, the worker comes back and
takes calls again; a cancelled check is hung up in its worker; an early verdict crosses
over; an account's checks stay with the worker holding its registration; the guard
refuses a live number in the agent and, on its own, inside a worker spoken to directly.
(The agent's own process with workers: tests/test_agent.py.)
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from ecpm.configfile import load_config
from ecpm.errors import ConfigError
from probes.config import ProbeConfig, Target
from probes.guard import Guard
from probes.outcome import CheckOutcome
from probes.scheduler import relay_verdicts
from probes.sip import SipError
from probes.worker_wire import MAX_REPLY_BYTES, Reply, Run, Start, parse_reply, request_frame
from probes.workers import WorkerPool
from tests.support.kamailio import PASSWORD, USER, Kamailio
from tests.support.mqtt import eventually
from tests.support.net import HOST, free_port
from tests.support.paths import REPO
from tests.support.sip import ResponderProcess, Sipp, account_target, make_target

SipFactory = Callable[..., Sipp]
pytestmark = pytest.mark.peers("sipp")


def config(targets: list[Target], **sip: Any) -> ProbeConfig:
    return ProbeConfig.model_validate(
        {
            "kind": "probe",
            "probe": {"id": "p1", "region": "GB", "key": "k"},
            "sip": {"transports": ["udp"], **sip},
            "schedule": {"max_concurrent_checks": 64},
            "targets": targets,
        }
    )


def echo_targets(peer: Sipp, n: int, media_time: str = "1s") -> list[Target]:
    base = make_target(peer.uri, options=False, expect_tone=False, media_time=media_time)
    return [base.model_copy(update={"id": f"t{i}"}) for i in range(n)]


def pool_for(targets: list[Target], workers: int) -> WorkerPool:
    cfg = config(targets)
    return WorkerPool(cfg, Guard(home_region="GB"), workers=workers)


def test_auto_workers_fit_the_checks_that_may_run_at_once() -> None:
    peer_uri = f"sip:ecpm-test@{HOST}:5099"
    target = make_target(peer_uri)  # invite and options: two checks may run at once
    many = [target.model_copy(update={"id": f"t{i}"}) for i in range(9)]
    assert config(many).sip_workers() == 5  # min(64, 18) / 4, rounded up
    assert config(many[:1]).sip_workers() == 1
    assert config(many, workers=3).sip_workers() == 3


@pytest.mark.parametrize("value", [0, 65, "many", True, 2.0])
def test_bad_workers_values_get_one_clear_error(tmp_path: Path, value: object) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(
        "kind: probe\nprobe: {id: p1, region: GB, key: k}\n"
        f"sip: {{workers: {str(value).lower() if value is True else value}}}\n"
        'targets: [{id: t1, uri: "sip:ecpm-test@127.0.0.1:5090", test_endpoint: true}]\n'
    )
    with pytest.raises(ConfigError) as caught:
        load_config(path, ProbeConfig)
    assert str(caught.value) == (
        f"{path}:3: sip.workers: must be a number of worker processes from 1 to 64, or auto"
    )


def test_more_than_four_verified_calls_at_once(sipp_factory: SipFactory) -> None:
    peer = sipp_factory("uas_echo.xml", rtp_echo=True, calls=8)
    targets = echo_targets(peer, 8)

    async def main() -> tuple[list[CheckOutcome], int, set[int | None]]:
        async with pool_for(targets, workers=2) as pool:
            pids = set(pool.pids())
            runs = [asyncio.create_task(pool.run(t, "invite")) for t in targets]
            busy = 0
            while not all(r.done() for r in runs):
                busy = max(busy, pool.stats().busy)
                await asyncio.sleep(0.05)
            return [r.result() for r in runs], busy, pids

    outcomes, busy, pids = asyncio.run(main())
    assert [o.outcome for o in outcomes] == ["pass"] * 8, [(o.stage, o.reason) for o in outcomes]
    assert all(o.media is not None and o.media.echo_heard for o in outcomes)
    assert busy == 8 and len(pids) == 2  # 8 calls at once, on two processes
    assert peer.wait() == 0


def test_a_worker_killed_mid_call_loses_only_its_calls(sipp_factory: SipFactory) -> None:
    peer = sipp_factory("uas_echo.xml", rtp_echo=True, calls=9, timeout=60)
    targets = echo_targets(peer, 9, media_time="4s")

    async def main() -> tuple[list[CheckOutcome], CheckOutcome, Any, int | None, int | None]:
        async with pool_for(targets, workers=2) as pool:
            first = pool.pids()[0]
            assert first is not None
            runs = [asyncio.create_task(pool.run(t, "invite")) for t in targets[:8]]
            await eventually(lambda: pool.stats().busy == 8)
            await asyncio.sleep(1.5)  # every call answered, media flowing
            os.kill(first, signal.SIGKILL)
            outcomes = await asyncio.gather(*runs)
            await eventually(lambda: pool.stats().up == 2)
            again = pool.pids()[0]
            stats = pool.stats()
            after = await pool.run(targets[8], "invite")  # the pool still places calls
            return outcomes, after, stats, first, again

    outcomes, after, stats, first, again = asyncio.run(main())
    lost = [o for o in outcomes if o.reason == "internal_error"]
    passed = [o for o in outcomes if o.outcome == "pass"]
    assert len(lost) == 4 and len(passed) == 4, [(o.outcome, o.reason) for o in outcomes]
    assert all(o.outcome == "fail" and "worker-0" in o.detail["worker"] for o in lost)
    assert all("SIGKILL" in o.detail["worker"] for o in lost)
    assert all((o.finished_at - o.started_at).total_seconds() > 1 for o in lost)  # from the dispatch
    assert again is not None and again != first
    assert stats.restarts_total == 1 and stats.lost_checks_total == 4 and stats.up == 2
    assert after.outcome == "pass", (after.stage, after.reason)


def test_a_cancelled_check_is_hung_up_in_its_worker_before_its_slot_frees(
    sipp_factory: SipFactory,
) -> None:
    """What the scheduler's hard timeout does: cancel the runner. The worker hangs up
    (CANCEL, 487, ACK) and the slot stays taken until it says so."""
    peer = sipp_factory("uas_ring_forever.xml")
    ringing = make_target(
        peer.uri, options=False, expect_tone=False, answer_timeout="20s", max_duration="30s"
    )

    async def main() -> tuple[float, int]:
        async with pool_for([ringing], workers=1) as pool:
            run = asyncio.create_task(pool.run(ringing, "invite"))
            await eventually(lambda: pool.stats().busy == 1)
            await asyncio.sleep(1.0)  # ringing: on loopback the 180 comes within milliseconds
            run.cancel()
            began = time.monotonic()
            with pytest.raises(asyncio.CancelledError):
                await run
            return time.monotonic() - began, pool.stats().busy

    took, busy = asyncio.run(main())
    assert took < 5 and busy == 0
    assert peer.wait() == 0  # SIPp's scenario completes only after CANCEL, 487 and ACK
    assert "CANCEL sip:" in peer.log()


def test_a_worker_that_cannot_start_is_named() -> None:
    """A fixed sip.port already taken: the pool does not start, and says which worker and why."""
    taken = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    taken.bind((HOST, 0))
    port = taken.getsockname()[1]
    cfg = config([make_target(f"sip:ecpm-test@{HOST}:5099")], port=port)

    async def main() -> None:
        async with WorkerPool(cfg, Guard(home_region="GB"), workers=1):
            pass

    try:
        with pytest.raises(SipError, match=r"^SIP worker-0 did not start: .+"):
            asyncio.run(main())
    finally:
        taken.close()


def test_an_early_verdict_crosses_from_the_worker(sipp_factory: SipFactory) -> None:
    """A person may have answered (no responder tone): the verdict goes out as the
    announcement starts, from the worker through the pool to the scheduler's runner task,
    while the call goes on until the announcement has played."""
    peer = sipp_factory("uas_echo.xml", rtp_echo=True)
    target = make_target(peer.uri, options=False)  # expects the responder's tone: not here

    async def main() -> tuple[list[tuple[float, CheckOutcome]], float, CheckOutcome]:
        early: list[tuple[float, CheckOutcome]] = []
        async with pool_for([target], workers=1) as pool:

            async def runner() -> CheckOutcome:  # what Scheduler._call_runner does
                relay_verdicts(lambda outcome: early.append((time.monotonic(), outcome)))
                return await pool.run(target, "invite")

            out = await asyncio.create_task(runner())
            return early, time.monotonic(), out

    early, ended, out = asyncio.run(main())
    assert len(early) == 1, early
    at, verdict = early[0]
    assert (verdict.outcome, verdict.stage, verdict.reason) == ("fail", "media", "no_tone")
    assert out.detail["announcement"] == "played" and out.reason == "no_tone"
    assert ended - at > 2.0  # the 3.75 s announcement played after the verdict


def test_a_worker_that_breaks_the_protocol_is_killed_and_replaced() -> None:
    """What a worker says is input: a frame over the limit ends that worker, its check is
    internal_error naming the protocol error, and a new worker is started."""
    target = make_target(f"sip:ecpm-test@{HOST}:5099", options=False)
    command = (sys.executable, "-m", "tests.support.broken_worker")

    async def main() -> tuple[CheckOutcome, Any]:
        async with WorkerPool(config([target]), Guard(home_region="GB"), workers=1, command=command) as pool:
            out = await pool.run(target, "invite")
            await eventually(lambda: pool.stats().restarts_total == 1 and pool.stats().up == 1)
            return out, pool.stats()

    out, stats = asyncio.run(main())
    assert (out.outcome, out.reason) == ("fail", "internal_error")
    assert "protocol error" in out.detail["worker"] and "over the 1048576 byte limit" in out.detail["worker"]
    assert stats.lost_checks_total == 1


def test_the_agent_guard_refuses_before_any_worker(sipp_factory: SipFactory) -> None:
    peer = sipp_factory("uas_echo.xml", rtp_echo=True)
    live = echo_targets(peer, 1)[0].model_copy(update={"uri": f"sip:999@{HOST}:{peer.port}"})

    async def main() -> tuple[CheckOutcome, int, dict[str, int]]:
        async with pool_for(echo_targets(peer, 1), workers=1) as pool:
            out = await pool.run(live, "invite")
            return out, sum(pool.guard.refusals.values()), pool.guard_refusals()

    out, agent_refusals, worker_refusals = asyncio.run(main())
    assert (out.outcome, out.stage, out.reason) == ("fail", "transport", "guard_refused")
    assert agent_refusals == 1 and sum(worker_refusals.values()) == 0
    assert "INVITE" not in peer.log()


def _frames(stream: Any) -> Reply:
    head = stream.read(4)
    assert len(head) == 4, "the worker closed its reply pipe"
    size = int.from_bytes(head, "big")
    assert size <= MAX_REPLY_BYTES
    return parse_reply(stream.read(size))


def test_a_worker_refuses_a_live_number_on_its_own(tmp_path: Path) -> None:
    """Spoken to directly, without the agent's guard, a worker still sends nothing to 999."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    listener.bind((HOST, 0))
    listener.settimeout(0.5)
    port = listener.getsockname()[1]
    target = make_target(f"sip:999@{HOST}:{port}", options=False)
    cfg = config([make_target(f"sip:ecpm-test@{HOST}:{port}")])
    worker = subprocess.Popen(
        [sys.executable, "-m", "probes.worker"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert worker.stdin is not None and worker.stdout is not None
    try:
        start = Start("worker-t", cfg.sip.model_copy(update={"port": free_port()}), "GB", (), 30)
        worker.stdin.write(request_frame(start))
        worker.stdin.flush()
        assert _frames(worker.stdout).kind == "ready"
        for kind in ("invite", "options"):
            worker.stdin.write(request_frame(Run(1, target, kind)))
            worker.stdin.flush()
            reply = _frames(worker.stdout)
            assert reply.kind == "outcome" and reply.outcome is not None
            assert (reply.outcome.reason, reply.outcome.stage) == ("guard_refused", "transport")
            assert reply.refusals.get("emergency_number", 0) >= 1, reply.refusals
        with pytest.raises(TimeoutError):
            listener.recv(4096)  # nothing reached the far end
        worker.stdin.close()
        assert worker.wait(20) == 0  # end of input: a clean stop
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
        worker.stdout.close()
        listener.close()


@pytest.mark.peers("kamailio")
def test_an_account_lives_in_one_worker_and_moves_with_its_restart(
    kamailio: Kamailio, responder: ResponderProcess
) -> None:
    """The register check and the calls from an account go to the worker holding its
    registration (a second register is a refresh there, not a new binding on the idler
    worker); the worker's replacement registers afresh."""
    desk = account_target(kamailio.registrar, kamailio.service_uri, username=USER, password=PASSWORD)
    plain = make_target(responder.uri, options=False, media_time="7s").model_copy(update={"id": "plain"})

    async def main() -> tuple[list[CheckOutcome], CheckOutcome]:
        async with pool_for([desk, plain], workers=2) as pool:
            busy = asyncio.create_task(pool.run(plain, "invite"))  # on worker-0: it had the most free slots
            await eventually(lambda: pool.stats().busy == 1)
            seen = [await pool.run(desk, "register")]  # the account goes to worker-0 (fewest accounts)
            seen.append(await pool.run(desk, "register"))  # worker-1 has more free slots: not there
            seen.append(await pool.run(desk, "invite"))
            owner = next(s for s in pool._slots if s.accounts)
            assert owner.index == 0 and owner.proc is not None
            os.kill(owner.proc.pid, signal.SIGKILL)
            await eventually(lambda: pool.stats().restarts_total == 1 and pool.stats().up == 2)
            seen.append(await pool.run(desk, "register"))
            return seen, await busy

    (first, again, call, after), lost = asyncio.run(main())
    assert (first.outcome, first.detail["registration"]) == ("pass", "new"), first
    assert (again.outcome, again.detail["registration"]) == ("pass", "refresh"), again
    assert call.outcome == "pass" and call.media is not None and call.media.echo_heard, call
    assert (after.outcome, after.detail["registration"]) == ("pass", "new"), after
    assert lost.reason == "internal_error"  # the plain call died with worker-0
