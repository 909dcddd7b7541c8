"""The SIP engine itself: the guard at the hand-over, the wheel's limits enforced in
Python (call slots, held slots, call rate), lifecycle and clean process exit."""

from __future__ import annotations

import asyncio
import itertools
import subprocess
import sys
import textwrap
import time

import pytest

from probes.checks import invite_check, options_check
from probes.config import SipSettings
from probes.guard import Guard, GuardRefusal
from probes.outcome import CheckOutcome
from probes.sip import (
    CallOptions,
    CallSetupError,
    Dial,
    EngineClosed,
    EngineState,
    NoCallSlot,
    OptionsReply,
    SipEngine,
    SipError,
)
from tests.support.net import UdpSink
from tests.support.paths import REPO
from tests.support.sip import ResponderProcess, make_target, with_engine

# ------------------------------------------------------------------- the guard


@pytest.mark.parametrize(
    ("uri", "proxy"),
    [
        ("sip:999@127.0.0.1:{port}", None),
        ("sip:112@127.0.0.1:{port};user=phone", None),
        ("tel:+44999", "sip:127.0.0.1:{port};lr"),
        ("urn:service:sos", "sip:127.0.0.1:{port};lr"),
        ("sip:ecpm-test@127.0.0.1:{port}", "sip:999@127.0.0.1:{port};lr"),
    ],
)
def test_engine_refuses_live_numbers_and_sends_nothing(sink: UdpSink, uri: str, proxy: str | None) -> None:
    """Called directly, bypassing config validation: refused inside the engine, and
    not one packet reaches the far end (INVITE or OPTIONS)."""
    guard = Guard(home_region="GB")
    dial = Dial(
        uri.format(port=sink.port),
        "live",
        declared_test_endpoint=True,
        proxy=None if proxy is None else proxy.format(port=sink.port),
    )

    async def body(engine: SipEngine) -> tuple[int, int]:
        with pytest.raises(GuardRefusal):
            await engine.call(dial, CallOptions(first_response_timeout=0.5))
        with pytest.raises(GuardRefusal):
            await engine.options(dial, timeout=0.5)
        stats = engine.stats()
        return stats.refused_total, stats.calls_placed_total

    refused, placed = with_engine(body, guard=guard)
    assert (refused, placed) == (2, 0)
    assert sum(guard.refusals.values()) == 2
    assert sink.received(0.5) == []


def test_invite_check_refuses_a_live_number_target(sink: UdpSink) -> None:
    target = make_target(f"sip:999@127.0.0.1:{sink.port}")  # Target alone does not run the guard

    async def body(engine: SipEngine) -> tuple[CheckOutcome, CheckOutcome]:
        return await invite_check(engine, target), await options_check(engine, target)

    invite, options = with_engine(body)
    for out in (invite, options):
        assert (out.outcome, out.stage, out.reason) == ("fail", "transport", "guard_refused")
        assert out.detail["guard.reason"] == "emergency_number"
    assert sink.received(0.5) == []


def test_undeclared_target_is_refused(sink: UdpSink) -> None:
    dial = Dial(f"sip:ecpm-test@127.0.0.1:{sink.port}", "t", declared_test_endpoint=False)

    async def body(engine: SipEngine) -> None:
        with pytest.raises(GuardRefusal) as info:
            await engine.call(dial)
        assert info.value.reason == "undeclared"

    with_engine(body)
    assert sink.received(0.3) == []


def test_call_setup_error_keeps_pjsips_status() -> None:
    """pjsua2 refuses the Request-URI (port 99999) before anything is sent: the error
    asyncio gets is a CallSetupError that still carries pjsip's status."""
    dial = Dial("sip:ecpm-test@127.0.0.1:99999", "t", declared_test_endpoint=True)

    async def body(engine: SipEngine) -> CallSetupError:
        with pytest.raises(CallSetupError) as caught:
            await engine.call(dial, CallOptions(first_response_timeout=0.5))
        return caught.value

    error = with_engine(body)
    assert error.status == 171042  # PJSIP_EINVALIDREQURI
    assert "Invalid Request URI" in str(error)


# ------------------------------------------------------------- the wheel's limits


def test_fifth_call_waits_for_held_slots(sink: UdpSink) -> None:
    """Four calls to a black hole, hung up at once: DISCONNECTED comes at once, but
    pjsua keeps each slot until its INVITE transaction ends (timer B = the call's
    first-response timeout). A fifth call must wait for that, not hit PJ_ETOOMANY."""
    dial = Dial(f"sip:ecpm-test@127.0.0.1:{sink.port}", "t", declared_test_endpoint=True)
    opts = CallOptions(first_response_timeout=1.0)

    async def body(engine: SipEngine) -> tuple[float, int]:
        calls = [await engine.call(dial, opts) for _ in range(4)]
        for call in calls:
            await call.hangup()
            assert (await call.wait_ended(1.0)) is not None
        held = engine.stats().slots_in_use
        fifth = await engine.call(dial, opts)
        await fifth.hangup()
        return fifth.waited, held

    waited, held = with_engine(body)
    assert held == 4
    assert 0.6 <= waited < 2.0
    assert len(sink.received(0.1)) >= 5  # the INVITEs did go out (to the black hole)


def test_no_call_slot_when_the_wait_is_too_long(sink: UdpSink) -> None:
    dial = Dial(f"sip:ecpm-test@127.0.0.1:{sink.port}", "t", declared_test_endpoint=True)

    async def body(engine: SipEngine) -> None:
        calls = [await engine.call(dial, CallOptions(first_response_timeout=5.0)) for _ in range(4)]
        started = time.monotonic()
        with pytest.raises(NoCallSlot):
            await engine.call(dial)
        assert 0.3 <= time.monotonic() - started < 1.0
        for call in calls:
            await call.hangup()

    with_engine(body, slot_wait=0.3)


def test_call_rate_is_limited(clean_responder: ResponderProcess) -> None:
    dial = Dial(clean_responder.uri, "t", declared_test_endpoint=True)

    async def body(engine: SipEngine) -> list[OptionsReply]:
        return list(await asyncio.gather(*(engine.options(dial, timeout=1.0) for _ in range(5))))

    replies = with_engine(body, settings=SipSettings(max_call_rate=10.0))
    assert all(r.status == 200 for r in replies)
    sent = sorted(r.sent_at for r in replies)
    gaps = [b - a for a, b in itertools.pairwise(sent)]
    assert min(gaps) >= 0.095, gaps  # 10 per second


# ----------------------------------------------------------------- lifecycle


def test_one_engine_per_process() -> None:
    async def body(engine: SipEngine) -> None:
        second = SipEngine(SipSettings(), Guard(home_region="GB"))
        with pytest.raises(SipError, match="already running"):
            await second.start()
        assert engine.running
        assert set(engine.local_addresses) == {"udp", "tcp"}

    with_engine(body)
    # and once closed, a new one starts
    with_engine(lambda engine: asyncio.sleep(0))


def test_lifecycle_states() -> None:
    async def main() -> None:
        engine = SipEngine(SipSettings(), Guard(home_region="GB"))
        assert engine.state is EngineState.UNOPENED
        async with engine:
            assert engine.state is EngineState.RUNNING
        assert engine.state is EngineState.CLOSED
        assert not engine.running
        with pytest.raises(EngineClosed):
            await engine.options(
                Dial("sip:ecpm-test@127.0.0.1:9", "t", declared_test_endpoint=True), timeout=0.5
            )

    asyncio.run(main())


def test_start_fails_cleanly_on_an_address_we_do_not_have() -> None:
    async def main() -> None:
        engine = SipEngine(SipSettings(bind="192.0.2.1"), Guard(home_region="GB"))
        with pytest.raises(SipError, match="cannot start"):
            await engine.start()
        assert not engine.running

    asyncio.run(main())
    with_engine(lambda engine: asyncio.sleep(0))  # the process may start another


def test_ipv6_bind_is_refused_in_words() -> None:
    """The wheel has no IPv6 (pjsua_acc_add asserts on an IPv6 account): a clear
    error instead of an aborted process."""

    async def main() -> None:
        engine = SipEngine(SipSettings(bind="::1"), Guard(home_region="GB"))
        with pytest.raises(SipError, match="no IPv6 support"):
            await engine.start()

    asyncio.run(main())


SHUTDOWN_SCRIPT = textwrap.dedent(
    """
    import asyncio, logging, os, signal, sys
    logging.basicConfig(level=logging.DEBUG, stream=sys.stderr)
    from probes.config import SipSettings
    from probes.guard import Guard
    from probes.sip import CallOptions, Dial, SipEngine

    async def main():
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        loop.add_signal_handler(signal.SIGTERM, task.cancel)
        engine = SipEngine(SipSettings(log_level=5), Guard(home_region="GB"))
        await engine.start()
        try:
            calls = []
            for uri in sys.argv[1:]:
                dial = Dial(uri, "t", declared_test_endpoint=True)
                calls.append(await engine.call(dial, CallOptions(tone_hz=1000, first_response_timeout=3)))
            hole = Dial(sys.argv[1], "t", declared_test_endpoint=True)
            options = asyncio.ensure_future(engine.options(hole, timeout=2.0))
            await asyncio.sleep(0.8)
            os.kill(os.getpid(), signal.SIGTERM)
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            pass
        finally:
            await engine.aclose()
            options.cancel()
        print("closed cleanly")

    asyncio.run(main())
    """
)


def test_process_shutdown_with_calls_in_flight_exits_0(
    sink: UdpSink, clean_responder: ResponderProcess
) -> None:
    """SIGTERM with an answered call, a ringing-less call to a black hole and an
    OPTIONS outstanding: hang-ups, then libDestroy, exit 0, no C assertion; and
    pjsip's own log (level 5 here) never reaches stdout."""
    clean_responder.set_fault("none")
    run = subprocess.run(
        [sys.executable, "-c", SHUTDOWN_SCRIPT, f"sip:ecpm-test@127.0.0.1:{sink.port}", clean_responder.uri],
        cwd=REPO, capture_output=True, text=True, check=False, timeout=30,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout == "closed cleanly\n"
    assert "Assertion" not in run.stderr and "Traceback" not in run.stderr
    assert "probes.sip.pjsip" in run.stderr  # the log went to logging
    _, status = clean_responder.http("GET", "/status")
    assert '"active_calls": 0' in status  # the answered call got its BYE


EXIT_SCRIPT = textwrap.dedent(
    """
    import asyncio
    from probes.config import SipSettings
    from probes.guard import Guard
    from probes.sip import SipEngine

    loop = asyncio.new_event_loop()
    engine = SipEngine(SipSettings(), Guard(home_region="GB"))
    loop.run_until_complete(engine.start())
    print("started; exiting without aclose()")
    """
)


def test_exit_without_close_is_still_clean() -> None:
    """The atexit hook stops the pjsua2 thread and destroys the library first."""
    run = subprocess.run(
        [sys.executable, "-c", EXIT_SCRIPT], cwd=REPO, capture_output=True, text=True, check=False, timeout=30
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "Assertion" not in run.stderr
