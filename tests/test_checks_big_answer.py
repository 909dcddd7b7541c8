"""Scoring follows what happened: an answered call is judged at the media stage,
however long its answer took to be confirmed and whatever its header size.

Two halves:

- A scripted call (no pjsua2 call is placed): the 2xx arrives just before the answer
  deadline and pjsua's CONFIRMED just after it. Before the fix this was scored
  ``fail / answer / answer_timeout`` with ``sip_status 200`` while the answer and the media
  stage were recorded too; now it passes at the media stage. And a 2xx that pjsua could
  not use (it ends the call before confirming it) fails at the answer, with no media stage.
- SIPp as the far end, answering 200 OK with few or about 60 KB of header lines. The
  pjsua2 wheel reads at most 4000 bytes of a SIP message (pjsip's compile-time
  PJSIP_MAX_PKT_LEN, docs/checks.md): over TCP a larger 200 is dropped whole
  (PJSIP_ERXOVERFLOW), over UDP it is cut at 4000 bytes. Each is scored consistently
  with what the probe could read.
"""

from __future__ import annotations

import asyncio
import time
import wave
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import pytest

from probes import media
from probes.checks import invite_check
from probes.config import Target
from probes.outcome import CheckOutcome
from probes.sip import CallEvent, CallOptions, Dial, RtpStats, SipEngine
from tests.support.sip import Sipp, make_target, with_engine

RATE = 8000
RTP = RtpStats(rx_packets=100, rx_lost=0, jitter_ms=1.0, tx_packets=100, rtt_ms=None, codec="PCMU")


# ------------------------------------------------------------------ a scripted call


def _write_tones(path: Path, seconds: float) -> None:
    """What a working test responder sends back: its 1400 Hz tone and our 1000 Hz echo."""
    a = media.tone(1400.0, RATE, seconds, dbfs=-16.0)
    b = media.tone(1000.0, RATE, seconds, dbfs=-16.0)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(RATE)
        w.writeframes(b"".join((x + y).to_bytes(2, "little", signed=True) for x, y in zip(a, b, strict=True)))


Script = list[tuple[float, Callable[[float], CallEvent]]]


class ScriptedCall:
    """The parts of ``OutgoingCall`` that ``invite_check`` uses, fed by a timed script."""

    def __init__(self, script: Script) -> None:
        self.started_at = time.monotonic()
        self.waited = 0.0
        self.ended = False
        self.queue: asyncio.Queue[CallEvent] = asyncio.Queue()
        self.feeder = asyncio.create_task(self._feed(script))

    async def _feed(self, script: Script) -> None:
        for at, make in script:
            await asyncio.sleep(max(0.0, self.started_at + at - time.monotonic()))
            self.queue.put_nowait(make(time.monotonic()))

    async def next_event(self, timeout: float | None = None) -> CallEvent | None:  # noqa: ASYNC109
        try:
            event = await asyncio.wait_for(self.queue.get(), timeout)
        except TimeoutError:
            return None
        if event.kind == "disconnected":
            self.ended = True
        return event

    async def wait_ended(self, timeout: float | None = None) -> CallEvent | None:  # noqa: ASYNC109
        until = time.monotonic() + (timeout or 0.0)
        while not self.ended and time.monotonic() < until:
            event = await self.next_event(until - time.monotonic())
            if event is not None and event.kind == "disconnected":
                return event
        return None

    async def hangup(self, status: int | None = None, reason: str | None = None) -> None:
        if not self.ended:
            self.feeder.cancel()
            self.queue.put_nowait(CallEvent("disconnected", time.monotonic(), 200, "OK", cause="local"))

    async def stats(self) -> RtpStats | None:
        return RTP

    async def record(self, path: Path | None, *, finalise_timeout: float = 1.0) -> bool:
        return True

    async def play_file(self, path: Path | None) -> bool:
        return True

    async def __aenter__(self) -> ScriptedCall:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.feeder.cancel()


class ScriptedEngine:
    def __init__(self, script: Script) -> None:
        self.script = script

    async def call(self, dial: Dial, options: CallOptions | None = None) -> ScriptedCall:
        assert options is not None and options.record is not None
        _write_tones(options.record, 1.5)
        return ScriptedCall(self.script)


def _response(status: int, reason: str, message: str = "") -> Callable[[float], CallEvent]:
    return lambda at: CallEvent(
        "response", at, status, reason, message or f"SIP/2.0 {status} {reason}\r\n\r\n"
    )


def _event(kind: Any, **kw: Any) -> Callable[[float], CallEvent]:
    return lambda at: CallEvent(kind, at, **kw)


def verdict(out: CheckOutcome) -> tuple[str, str | None, str | None, int | None]:
    return out.outcome, out.stage, out.reason, out.sip_status


def scripted(script: Script, **invite: Any) -> CheckOutcome:
    target = make_target("sip:ecpm-test@127.0.0.1:5090", **invite)
    return asyncio.run(invite_check(cast(SipEngine, ScriptedEngine(script)), target, announcement=None))


def test_an_answer_confirmed_after_the_answer_deadline_is_judged_at_media() -> None:
    """200 OK at 0.9 s of a 1 s answer_timeout, CONFIRMED at 1.3 s: the call was answered
    before the deadline, so the answer stage passed; the media stage judges the call."""
    out = scripted(
        [
            (0.0, _event("sent")),
            (0.01, _response(100, "Trying")),
            (0.02, _response(180, "Ringing")),
            (0.9, _response(200, "OK", "SIP/2.0 200 OK\r\n" + "X-Pad: x\r\n" * 4000 + "\r\n")),
            (0.91, _event("media", media_active=True)),
            (1.3, _event("confirmed", status=200)),
        ],
        answer_timeout="1s",
        media_time="1s",
    )
    assert verdict(out) == ("pass", None, None, 200), out
    assert 0.85 < out.timings["answer"] < 1.0
    assert "media" in out.timings and "teardown" in out.timings
    assert out.media is not None and out.media.tone_heard and out.media.echo_heard


def test_an_answer_pjsua_could_not_use_fails_at_answer_without_a_media_stage() -> None:
    """A 2xx whose SDP pjsua cannot use (e.g. cut short): pjsua ends the call before it is
    confirmed. Judged at the answer: no media stage is run or recorded."""
    out = scripted(
        [
            (0.0, _event("sent")),
            (0.01, _response(180, "Ringing")),
            (0.05, _response(200, "OK")),
            (0.06, _event("disconnected", status=415, reason="SDP negotiation failed", cause="transport")),
        ],
    )
    assert verdict(out) == ("fail", "answer", "not_acceptable", 200), out
    assert "answer" in out.timings and "media" not in out.timings
    assert out.media is None
    assert out.detail["local"] == "415 SDP negotiation failed"


# ------------------------------------------------------------------ SIPp as the far end


@pytest.fixture
def far_end(tmp_path: Path) -> Iterator[Callable[..., Sipp]]:
    started: list[Sipp] = []

    def start(*, padding: int, transport: str) -> Sipp:
        peer = Sipp(
            tmp_path,
            "uas_big_headers.xml",
            rtp_echo=True,
            transport={"tcp": "t1", "udp": "u1"}[transport],
            keys={"padding": "x" * padding},
        )
        started.append(peer)
        return peer

    yield start
    for peer in started:
        peer.stop()


def call(peer: Sipp, transport: str) -> CheckOutcome:
    target: Target = make_target(peer.uri, transport=transport, expect_tone=False)

    async def body(engine: SipEngine) -> CheckOutcome:
        return await invite_check(engine, target, announcement=None)

    return with_engine(body)


@pytest.mark.peers("sipp")
@pytest.mark.parametrize("padding", [10, 30])  # a 200 of ~2.6 KB, and of ~3.8 KB: just under 4000 bytes
def test_headers_the_stack_can_read_pass_at_media(far_end: Callable[..., Sipp], padding: int) -> None:
    peer = far_end(padding=padding, transport="tcp")
    out = call(peer, "tcp")
    assert (out.outcome, out.sip_status) == ("pass", 200), out
    assert {"answer", "media", "teardown"} <= set(out.timings)
    assert out.media is not None and out.media.echo_heard
    assert peer.wait() == 0


@pytest.mark.peers("sipp")
def test_a_60kb_answer_over_tcp_is_unreadable_and_fails_at_answer(far_end: Callable[..., Sipp]) -> None:
    """About 60 KB of headers (60 lines of 1000 characters) over TCP: pjsip drops the 200
    whole, so the probe saw 180 and nothing after it. Failed at the answer stage, with
    nothing recorded for answer or media (the far end never got its ACK: SIPp fails)."""
    peer = far_end(padding=1000, transport="tcp")
    out = call(peer, "tcp")
    assert verdict(out) == ("fail", "answer", "answer_timeout", 180), out
    assert "answer" not in out.timings and "media" not in out.timings
    assert out.media is None


@pytest.mark.peers("sipp")
def test_a_60kb_answer_over_udp_is_cut_and_fails_at_answer(far_end: Callable[..., Sipp]) -> None:
    """The same 200 in one UDP datagram: pjsip reads its first 4000 bytes, a 200 without
    its SDP; pjsua ends the call (406) before confirming it. Answered, then unusable:
    failed at the answer stage with sip_status 200, and no media stage recorded."""
    peer = far_end(padding=1000, transport="udp")
    out = call(peer, "udp")
    assert verdict(out) == ("fail", "answer", "not_acceptable", 200), out
    assert "answer" in out.timings and "media" not in out.timings
    assert out.media is None
    assert out.detail["answer_bytes"] == "4000"
