"""The checks a probe runs: ``invite`` (the test call) and ``options`` (a ping).

Shape (blackbox_exporter's): every check is ``async (engine, target, settings) ->
CheckOutcome`` and has one entry in the registry, ``probes.check_kinds.REGISTRY``
(its settings model, stages and reasons); a failure is a value with a failing stage and
a bounded reason, never an exception. One attempt, no retry: a retry hides an
outage. docs/checks.md defines every stage, timer and reason.

invite, in order (each stage's timing in seconds goes into ``timings``)::

    transport  start -> INVITE on the wire        (no response at all within
                                                    first_response_timeout: fail here)
    trying     INVITE sent -> first response (any)
    ringing    INVITE sent -> first 18x (post-dial delay; the 200 when no 18x came)
    answer     INVITE sent -> 200 OK               (ring-no-answer: CANCEL at answer_timeout)
    identity   INVITE sent -> the 200 OK reporting the callback number and location that
               arrived (emergency-shaped targets that expect them; nena.score_identity)
    media      200 OK -> every expected tone heard  (listen for media_time)
    dtmf       our DTMF digits sent -> the last one back (checks.invite.dtmf; RFC 4733
               telephone-events, or in-band tones found in the echoed audio)
    teardown   BYE -> call released
"""

from __future__ import annotations

import asyncio
import re
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Final

from probes import media, nena, sdp
from probes.config import INBAND_DIGIT_SECONDS, EmergencyShape, InviteCheck, OptionsCheck, Srtp, Target
from probes.guard import GuardRefusal
from probes.outcome import CheckOutcome, MediaStats, Outcome
from probes.scheduler import verdict_ready
from probes.sip import (
    CallEvent,
    CallOptions,
    CallSetupError,
    Dial,
    EngineClosed,
    NoCallSlot,
    OutgoingCall,
    Part,
    RemoteRefusal,
    RtpStats,
    SipEngine,
    SipError,
    TlsState,
)

ANNOUNCEMENT: Final = Path(__file__).with_name("data") / "announcement.wav"
ENGINE_MARGIN: Final = 10.0  # the engine's own hard limit is the check's max_duration + this
TEARDOWN_WAIT: Final = 5.0  # BYE or CANCEL sent -> call released, or fail at teardown
NO_ANSWER_WAIT: Final = 2.0  # no response at all: how long the hangup may take before the result goes
STATS_EVERY: Final = 0.25  # RTCP figures sampled this often while listening
CONFIRM_WAIT: Final = 1.0  # 2xx received -> pjsua's CONFIRMED (ACK sent); media judges the call after it
INBAND_TAIL: Final = 1.0  # in-band digits played -> recording stopped (at most; dtmf_timeout if shorter)

# Bounded reason codes (the registry's per-kind ``reasons``; docs/checks.md explains each)
# Every check: the guard refused the target, pjsua2 refused the request, no response,
# a transport failure, the probe stopped mid-check
SETUP_REASONS: Final = ("guard_refused", "call_setup", "no_response", "transport_error", "shutdown")
# What reason_for_status gives a final error status (tests check every status 300..699)
STATUS_REASONS: Final = (
    "redirected", "auth_failed", "forbidden", "not_found", "timeout", "unavailable", "busy",
    "cancelled", "not_acceptable", "rejected", "service_unavailable", "server_timeout",
    "server_error", "declined",
)  # fmt: skip
# What nena.score_answer gives an emergency-shaped call's answer
NENA_REASONS: Final = ("unsupported_service", "test_call_limit")
# The invite check's own: the registration of a call from an account, a call slot, the answer
# timer, media and teardown, the hard cap
CALL_REASONS: Final = (
    "not_registered", "no_call_slot", "answer_timeout", "srtp_refused", "no_media", "no_rtp", "no_tone",
    "no_echo", "remote_hangup", "dtmf_unsupported", "dtmf_missing", "dtmf_mismatch", "teardown_timeout",
    "max_duration",
)  # fmt: skip


def reason_for_status(status: int) -> str:
    """The bounded reason for a final SIP error status."""
    specific = {
        401: "auth_failed",
        407: "auth_failed",
        403: "forbidden",
        404: "not_found",
        408: "timeout",
        410: "not_found",
        480: "unavailable",
        486: "busy",
        600: "busy",
        487: "cancelled",
        488: "not_acceptable",
        606: "not_acceptable",
        503: "service_unavailable",
        504: "server_timeout",
    }
    if status in specific:
        return specific[status]
    if 300 <= status < 400:
        return "redirected"
    if 500 <= status < 600:
        return "server_error"
    if status >= 600:
        return "declined"
    return "rejected"


def dial_for(target: Target) -> Dial:
    return Dial(
        uri=target.uri,
        target=target.id,
        declared_test_endpoint=target.test_endpoint,
        proxy=target.outbound_proxy,
        transport=target.transport,
        auth=target.auth,
        carrier_test_service=target.carrier(),
        account=target.account,
        srtp=target.srtp,
    )


def registrar_dial(target: Target) -> Dial:
    """The REGISTER of the target's account: its registrar, judged by the guard as any dial."""
    account = target.account
    if account is None:
        raise CallSetupError(f"target {target.id} has no account to register")
    return replace(dial_for(target), uri=account.registrar, transport=account.transport, auth=None)


@dataclass(slots=True)
class Findings:
    """What a check found so far: the first failure wins; ``done()`` freezes it into the
    ``CheckOutcome``. Every runner fills one in."""

    check: str
    started_at: datetime
    outcome: Outcome = "pass"
    stage: str | None = None
    reason: str | None = None
    sip_status: int | None = None
    sip_reason: str | None = None
    timings: dict[str, float] = field(default_factory=dict)
    media: MediaStats | None = None
    detail: dict[str, str] = field(default_factory=dict)

    def fail(
        self,
        stage: str | None,
        reason: str,
        *,
        outcome: Outcome = "fail",
        status: int | None = None,
        sip_reason: str | None = None,
    ) -> None:
        """Record the first failure only: later stages do not overwrite it."""
        if self.outcome != "pass":
            return
        self.outcome, self.stage, self.reason = outcome, stage, reason
        if status is not None:
            self.sip_status, self.sip_reason = status, sip_reason

    def time(self, stage: str, seconds: float | None) -> None:
        if seconds is not None:
            self.timings[stage] = round(max(0.0, seconds), 6)

    def done(self) -> CheckOutcome:
        return CheckOutcome(
            check=self.check,
            outcome=self.outcome,
            started_at=self.started_at,
            finished_at=datetime.now(UTC),
            stage=self.stage,
            reason=self.reason,
            sip_status=self.sip_status,
            sip_reason=self.sip_reason,
            timings=dict(self.timings),
            media=self.media,
            detail={k: v[:1024] for k, v in list(self.detail.items())[:32]},
        )

    def refused(self, refusal: GuardRefusal) -> CheckOutcome:
        """The guard refused the target itself: nothing was sent."""
        self.fail("transport", "guard_refused")
        self.detail["guard.reason"] = refusal.reason
        self.detail["guard.detail"] = refusal.detail
        return self.done()

    def not_sent(self, error: SipError) -> CheckOutcome:
        """The engine did not send: it is shutting down, or pjsua2 refused the request."""
        if isinstance(error, EngineClosed):
            self.fail(None, "shutdown", outcome="inconclusive")
        else:
            self.fail("transport", "call_setup")
            self.detail["error"] = str(error)
        return self.done()


def _refused_remote(result: Findings, refusal: RemoteRefusal, stage: str) -> None:
    """The far end named a remote target the guard refused; the engine ended the call
    without sending anything to it. ``guard.where`` says which header of which message."""
    result.fail(stage, "guard_refused")
    result.detail["guard.reason"] = refusal.reason
    result.detail["guard.detail"] = refusal.detail
    result.detail["guard.where"] = refusal.where


# ---------------------------------------------------------------------- invite


@dataclass(slots=True)
class _Dialog:
    """What the signalling phase saw."""

    sent_at: float | None = None
    first: CallEvent | None = None
    ringing_at: float | None = None
    answer: CallEvent | None = None  # the 2xx response (or CONFIRMED when no response event)
    last: CallEvent | None = None
    media_at: float | None = None
    media_active: bool = False
    ended: CallEvent | None = None
    digits: list[str] = field(default_factory=list)  # DTMF received after the answer

    def note(self, event: CallEvent, start: float) -> None:
        """An event that does not end the signalling stage: sent, a response, media."""
        if event.kind == "sent":
            self.sent_at = event.at
        elif event.kind == "response" and event.status is not None:
            if self.sent_at is None:
                self.sent_at = start
            if self.first is None:
                self.first = event
            self.last = event
            if 180 <= event.status < 200 and self.ringing_at is None:
                self.ringing_at = event.at
            if 200 <= event.status < 300:
                self.answer = event
        elif event.kind == "media":
            self.note_media(event)

    def note_media(self, event: CallEvent) -> None:
        self.media_active = bool(event.media_active)
        if self.media_active and self.media_at is None:
            self.media_at = event.at


async def invite_check(
    engine: SipEngine,
    target: Target,
    check: InviteCheck | None = None,
    *,
    announcement: Path | None = ANNOUNCEMENT,
) -> CheckOutcome:
    """One test call: signalling, two-way media, teardown. Never raises for a failed
    path; an exception from here is a bug. Over TLS, the handshake's protocol version,
    cipher and certificate verification go into ``detail`` (``tls.*``)."""
    outcome = await _invite(engine, target, check, announcement=announcement)
    hop = next_hop(target) if target.transport == "tls" else None
    tls = engine.tls_state(hop) if hop is not None else None
    if tls is None:
        return outcome
    return replace(outcome, detail={**outcome.detail, **tls_detail(tls)})


def next_hop(target: Target) -> str | None:
    """ "ip:port" of the first hop of the target's requests: its outbound proxy, else its URI
    (5061, the sips/TLS default, when the URI has no port)."""
    m = re.match(r"sips?:(?:[^@;>]*@)?([^;:?>]+)(?::(\d+))?", target.outbound_proxy or target.uri, re.I)
    return f"{m.group(1)}:{m.group(2) or 5061}" if m else None


def tls_detail(tls: TlsState) -> dict[str, str]:
    return {
        "tls.protocol": tls.protocol,
        "tls.cipher": tls.cipher,
        "tls.verified": "yes" if tls.verified else "no",
        "tls.verify": tls.verify,
        "tls.peer": tls.peer or "none",
    }


async def _invite(
    engine: SipEngine, target: Target, check: InviteCheck | None, *, announcement: Path | None
) -> CheckOutcome:
    cfg = check or target.checks.invite or InviteCheck()
    result = Findings("invite", datetime.now(UTC))
    begin = time.monotonic()
    deadline = begin + cfg.max_duration
    shape = target.emergency
    headers: tuple[tuple[str, str], ...] = ()
    parts: tuple[Part, ...] = ()
    if shape is not None:
        cid = f"ecpm-loc-{uuid.uuid4().hex[:16]}@ecpm.invalid" if shape.location else None
        headers = tuple(nena.emergency_headers(shape, cid))
        if shape.location is not None and cid is not None:
            pidf = nena.build_pidf_lo(shape.location)
            parts = (Part("application/pidf+xml", pidf, (("Content-ID", f"<{cid}>"),)),)
    if target.account is not None and (unregistered := await _registered(engine, target, cfg, result)):
        return unregistered
    workdir = Path(tempfile.mkdtemp(prefix="ecpm-call-"))
    recording = workdir / "received.wav"
    try:
        try:
            call = await engine.call(
                dial_for(target),
                CallOptions(
                    headers=headers,
                    parts=parts,
                    tone_hz=cfg.tone_hz,
                    record=recording,
                    first_response_timeout=cfg.first_response_timeout,
                    max_duration=cfg.max_duration + ENGINE_MARGIN,
                ),
            )
        except GuardRefusal as refusal:
            return result.refused(refusal)
        except NoCallSlot as exc:
            result.fail("transport", "no_call_slot", outcome="inconclusive")
            result.detail["error"] = str(exc)
            return result.done()
        except (EngineClosed, CallSetupError, SipError) as exc:
            return result.not_sent(exc)
        if call.waited > 0.05:
            result.detail["slot_wait_ms"] = f"{call.waited * 1000:.0f}"
        async with call:
            dialog = await _signalling(call, cfg, result, deadline, shape)
            _srtp_refused(result, target.srtp)
            if dialog.answer is None:
                return result.done()
            answer = dialog.answer
            result.sip_status, result.sip_reason = answer.status, answer.reason
            if dialog.ended is not None:  # released before it was confirmed: no media to judge
                return result.done()
            await _media_and_teardown(
                call,
                cfg,
                result,
                dialog,
                deadline=deadline,
                recording=recording,
                announcement=announcement,
                shape=shape,
                srtp=target.srtp,
            )
        return result.done()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


async def _registered(
    engine: SipEngine, target: Target, cfg: InviteCheck, result: Findings
) -> CheckOutcome | None:
    """A call from an account needs its registration (registered now, if it never was): a
    lost one fails the call at once, at transport, with the registrar's last word."""
    try:
        reg = await asyncio.wait_for(
            engine.register(registrar_dial(target), timeout=cfg.first_response_timeout, fresh=False),
            2 * cfg.first_response_timeout + 1.0,
        )
    except GuardRefusal as refusal:
        return result.refused(refusal)
    except TimeoutError:
        result.fail("transport", "not_registered")
        return result.done()
    except (EngineClosed, CallSetupError, SipError) as exc:
        return result.not_sent(exc)
    if reg.registered:
        return None
    result.fail("transport", "not_registered")
    result.detail["registration"] = f"{reg.status} {reg.reason}"
    if reg.lost is not None:
        result.detail["lost"] = reg.lost
    return result.done()


async def _signalling(
    call: OutgoingCall,
    cfg: InviteCheck,
    result: Findings,
    deadline: float,
    shape: EmergencyShape | None,
) -> _Dialog:
    """INVITE sent -> answered (confirmed), refused, or out of time; every stage timed."""
    d = _Dialog()
    start = call.started_at
    while True:
        now = time.monotonic()
        limit, why = _signal_timer(d, cfg, start, deadline)
        event = await call.next_event(limit - now)
        if event is None and d.answer is not None:  # answered but not yet confirmed: the media
            _signal_timings(result, d, start)  # stage judges the call (it has the deadline too)
            return d
        if event is None:  # our own timer fired first
            await _signal_timed_out(call, result, d, start, why)
            return d
        if event.kind == "confirmed":
            if d.answer is None:
                d.answer = event
            _signal_timings(result, d, start)
            return d
        if event.kind == "disconnected":
            d.ended = event
            _signal_timings(result, d, start)
            _ended_before_answer(result, d, event, shape)
            return d
        d.note(event, start)


def _signal_timer(d: _Dialog, cfg: InviteCheck, start: float, deadline: float) -> tuple[float, str]:
    """When the signalling stage we are in runs out, and the reason it then fails with."""
    if d.first is None:
        limit, why = start + cfg.first_response_timeout, "no_response"
    elif d.answer is None:
        limit, why = (d.sent_at or start) + cfg.answer_timeout, "answer_timeout"
    else:  # a 2xx came: answered, whatever comes next; pjsua confirms it (ACK) at once
        limit, why = d.answer.at + CONFIRM_WAIT, "confirm"
    if deadline < limit:
        limit, why = deadline, "max_duration"
    return limit, why


async def _signal_timed_out(call: OutgoingCall, result: Findings, d: _Dialog, start: float, why: str) -> None:
    stage = "transport" if d.first is None else "answer"
    last = d.last
    result.fail(stage, why, status=last.status if last else None, sip_reason=last.reason if last else None)
    _signal_timings(result, d, start)
    await call.hangup()  # CANCEL once a provisional came; pjsip waits for one otherwise
    # after a provisional the peer answers the CANCEL (487, then our ACK): wait for that as
    # for any teardown, so a loaded machine still ends the dialog cleanly; with none, the
    # INVITE can only time out (Timer B, 32 s), which no result should wait for
    await call.wait_ended(TEARDOWN_WAIT if d.first is not None else NO_ANSWER_WAIT)


def _signal_timings(result: Findings, d: _Dialog, start: float) -> None:
    sent = d.sent_at
    if sent is None:
        return
    result.time("transport", sent - start)
    if d.first is not None:
        result.time("trying", d.first.at - sent)
    if d.ringing_at is not None:
        result.time("ringing", d.ringing_at - sent)
    elif d.answer is not None:
        result.time("ringing", d.answer.at - sent)  # no 18x: post-dial delay ends at answer
    if d.answer is not None:
        result.time("answer", d.answer.at - sent)


def _ended_before_answer(
    result: Findings, d: _Dialog, event: CallEvent, shape: EmergencyShape | None
) -> None:
    cause = event.cause
    if cause == "guard_refused" and event.refusal is not None:
        _refused_remote(result, event.refusal, "answer")
    elif cause == "engine_closed":
        result.fail(None, "shutdown", outcome="inconclusive")
    elif cause == "max_duration":
        result.fail("answer" if d.first else "transport", "max_duration")
    elif cause == "rejected" or (d.last is not None and (d.last.status or 0) >= 300):
        final = d.last if d.last is not None and (d.last.status or 0) >= 300 else event
        status = final.status or event.status or 0
        reason = reason_for_status(status)
        outcome: Outcome = "fail"
        if shape is not None:  # NENA i3 test-call semantics
            score = nena.score_answer(status, final.message, shape)
            reason = score.reason or reason
            outcome = score.outcome
        # A 486 outside NENA test-call semantics is a failure: on a plain path it is call
        # admission refusing calls, which is what an emergency caller would meet.
        result.fail("answer", reason, outcome=outcome, status=status, sip_reason=final.reason)
    elif d.answer is not None:  # a 2xx came, then pjsua ended the call before confirming it:
        # its answer was unusable (e.g. no SDP in it: our stack reads at most 4000 bytes of
        # a message, docs/checks.md), so there is no media to judge
        unusable = event.status in (406, 415, 488)  # pjsua's SDP offer/answer failures
        result.fail("answer", "not_acceptable" if unusable else "transport_error")
        result.detail["local"] = f"{event.status} {event.reason}"
        result.detail["answer_bytes"] = str(len(d.answer.message or ""))
    elif d.first is None and cause == "timeout":
        result.fail("transport", "no_response")
        result.detail["local"] = f"{event.status} {event.reason}"
    elif d.first is None:
        result.fail("transport", "transport_error")
        result.detail["local"] = f"{event.status} {event.reason}"
    else:  # provisional seen, then the transaction died without a final response
        result.fail("answer", "no_response" if cause == "timeout" else "transport_error")
        result.detail["local"] = f"{event.status} {event.reason}"


@dataclass(frozen=True, slots=True)
class _Listened:
    """What the media window gave: RTCP figures and whether the far end hung up in it."""

    until: float  # when listening was due to stop: answer + media_time, or the deadline
    stats: RtpStats | None  # the last RTCP figures sampled (they vanish with the call)
    remote_end: CallEvent | None  # the far end ended the call inside the window


@dataclass(frozen=True, slots=True)
class _Heard:
    """The tones found in the audio received after the answer (None: none recorded)."""

    tone: media.ToneReport | None  # the responder's tone (expect_tone_hz)
    echo: media.ToneReport | None  # our own tone come back (tone_hz)
    expect_tone: bool
    expect_echo: bool

    @property
    def tone_heard(self) -> bool:
        return bool(self.tone and self.tone.heard)

    @property
    def echo_heard(self) -> bool:
        return bool(self.echo and self.echo.heard)

    @property
    def required(self) -> list[media.ToneReport | None]:
        return ([self.tone] if self.expect_tone else []) + ([self.echo] if self.expect_echo else [])

    @property
    def all_heard(self) -> bool:
        return all(r is not None and r.heard for r in self.required)

    @property
    def identified(self) -> bool:
        """A test endpoint is on the line (else a person may have answered)."""
        return self.tone_heard if self.expect_tone else self.echo_heard


async def _media_and_teardown(
    call: OutgoingCall,
    cfg: InviteCheck,
    result: Findings,
    d: _Dialog,
    *,
    deadline: float,
    recording: Path,
    announcement: Path | None,
    shape: EmergencyShape | None,
    srtp: Srtp,
) -> None:
    """An answered call: score a NENA answer and its SRTP, listen, judge the media, say who we are if
    no test endpoint answered, then hang up."""
    assert d.answer is not None
    answer_at = d.answer.at
    if shape is not None:
        _score_emergency_answer(result, d.answer, shape)
        if nena.expects_identity(shape):
            _score_identity(result, d, shape)
    _judge_srtp(result, d.answer, srtp)
    listened = await _listen(call, d, until=min(answer_at + cfg.media_time, deadline))
    await call.record(None)  # closes the WAV (waits until pjmedia has written it)
    heard = await _hear(recording, cfg, skip=_early_media(d, answer_at))
    result.media = _media_stats(
        listened.stats, heard.tone_heard, heard.echo_heard if cfg.expect_echo else None
    )
    _time_media(result, heard, d, answer_at, listened.until)
    _judge_media(result, heard, d, listened, shape)
    if cfg.dtmf and result.outcome == "pass" and listened.remote_end is None and not call.ended:
        until = min(time.monotonic() + cfg.dtmf_time, deadline)
        await _dtmf(call, cfg, result, d, until=until, recording=recording.with_name("dtmf.wav"))
    ended = listened.remote_end
    if ended is None and not heard.identified and not call.ended and announcement is not None:
        ended = await _announce(call, result, announcement, deadline)
    if ended is not None or call.ended:
        return
    await _teardown(call, result, deadline)


def _score_emergency_answer(result: Findings, answer: CallEvent, shape: EmergencyShape) -> None:
    score = nena.score_answer(answer.status or 200, answer.message, shape)
    result.detail.update(score.detail)
    if score.outcome != "pass" and score.reason is not None:
        result.fail("answer", score.reason, outcome=score.outcome)


def _score_identity(result: Findings, d: _Dialog, shape: EmergencyShape) -> None:
    assert d.answer is not None
    score = nena.score_identity(d.answer.message, shape)
    result.detail.update(score.detail)
    if score.outcome != "pass" and score.reason is not None:
        result.fail("identity", score.reason, outcome=score.outcome)
    elif d.sent_at is not None:
        result.time("identity", d.answer.at - d.sent_at)


def _srtp_refused(result: Findings, srtp: Srtp) -> None:
    """A mandatory-SRTP call the far end could not take (488/606, or an answer pjsua could
    not use: RTP/AVP to our RTP/SAVP offer) failed for its SRTP: say so, not just
    ``not_acceptable``."""
    if srtp == "mandatory" and result.reason == "not_acceptable":
        result.reason = "srtp_refused"
        result.detail["srtp"] = "mandatory: the far end did not accept RTP/SAVP with SDES keys"


def _judge_srtp(result: Findings, answer: CallEvent, srtp: Srtp) -> None:
    """Record whether the answered media is encrypted (``detail["media.encrypted"]``, with the
    profile and suite); a mandatory-SRTP call answered with plain RTP fails at media."""
    security = sdp.audio_security(answer.message)
    if security is None:
        result.detail["media.encrypted"] = "unknown"  # no SDP answer to read
        return
    result.detail["media.encrypted"] = "yes" if security.encrypted else "no"
    result.detail["media.profile"] = security.profile[:32]
    if security.crypto is not None:
        result.detail["media.srtp"] = security.crypto[:64]
    if srtp == "mandatory" and not security.encrypted:
        result.fail("media", "srtp_refused")
        result.detail["srtp"] = "mandatory: the far end answered with plain RTP"


async def _listen(call: OutgoingCall, d: _Dialog, *, until: float) -> _Listened:
    """Listen until ``until`` or the far end hangs up, sampling RTCP figures as we go."""
    remote_end: CallEvent | None = None
    stats: RtpStats | None = None
    while True:
        now = time.monotonic()
        if now >= until:
            break
        event = await call.next_event(min(STATS_EVERY, until - now))
        if event is not None and event.kind == "media":
            d.note_media(event)
        elif event is not None and event.kind == "dtmf" and event.digit:
            d.digits.append(event.digit)  # the far end's own, before ours: the dtmf stage judges
        elif event is not None and event.kind == "disconnected":
            remote_end = event
            break
        stats = await call.stats() or stats
    stats = await call.stats() or stats
    return _Listened(until=until, stats=stats, remote_end=remote_end)


def _early_media(d: _Dialog, answer_at: float) -> float:
    """Seconds of the recording before the answer. Only audio after the answer counts:
    early media (183) that stops at the 200 OK is not a working call. The recorder
    started with the media, ``d.media_at``."""
    return 0.0 if d.media_at is None else max(0.0, answer_at - d.media_at)


async def _hear(recording: Path, cfg: InviteCheck, *, skip: float) -> _Heard:
    """The tones in the closed recording, after its first ``skip`` seconds."""
    reports: dict[float, media.ToneReport] = {}
    try:
        samples, rate = await asyncio.to_thread(media.read_wav, recording)
        samples = samples[round(skip * rate) :]
        reports = await asyncio.to_thread(
            media.detect_tones, samples, rate, [cfg.expect_tone_hz, cfg.tone_hz]
        )
    except (ValueError, OSError):  # no audio was ever recorded (no media)
        reports = {}
    return _Heard(
        tone=reports.get(cfg.expect_tone_hz),
        echo=reports.get(cfg.tone_hz),
        expect_tone=cfg.expect_tone,
        expect_echo=cfg.expect_echo,
    )


def _time_media(result: Findings, heard: _Heard, d: _Dialog, answer_at: float, until: float) -> None:
    """The media stage: answer -> every expected tone heard; on failure, the listening time."""
    required = heard.required
    if heard.all_heard and required:
        # the trimmed audio starts at the answer, or at the media if that came later
        media_start = answer_at if d.media_at is None else max(d.media_at, answer_at)
        firsts = [r.first_at or 0.0 for r in required if r is not None]
        result.time("media", media_start - answer_at + max(firsts))
    else:
        result.time("media", min(time.monotonic(), until) - answer_at)


def _judge_media(
    result: Findings, heard: _Heard, d: _Dialog, listened: _Listened, shape: EmergencyShape | None
) -> None:
    """The verdict on media, the far end's hang-up inside the window first."""
    remote_end, stats = listened.remote_end, listened.stats
    if remote_end is not None and remote_end.cause == "guard_refused" and remote_end.refusal is not None:
        _refused_remote(result, remote_end.refusal, "media")  # a target refresh, ended by us
    elif remote_end is not None:
        result.detail["hangup"] = "far end, during media"
    # a NENA test service may hang up after its loop-back; any other far end dropping the
    # call inside the media window is a call an emergency caller would have lost
    if remote_end is not None and (not heard.all_heard or shape is None):
        result.fail("media", "remote_hangup", status=remote_end.status, sip_reason=remote_end.reason)
    elif not d.media_active and not heard.all_heard:
        result.fail("media", "no_media")
    elif stats is None or stats.rx_packets == 0:
        result.fail("media", "no_rtp")
    elif heard.expect_tone and not heard.tone_heard:
        result.fail("media", "no_tone")
    elif heard.expect_echo and not heard.echo_heard:
        result.fail("media", "no_echo")


_DtmfBack = tuple[str, float, CallEvent | None]  # digits received, sent -> last back, a hang-up


async def _dtmf(
    call: OutgoingCall, cfg: InviteCheck, result: Findings, d: _Dialog, *, until: float, recording: Path
) -> None:
    """The dtmf stage: send ``cfg.dtmf`` by its method (``auto``: RFC 4733 when the far end's
    SDP answer offers telephone-event, else in-band), then every digit must come back before
    ``until``: digits sent -> the last one back."""
    digits = cfg.dtmf or ""
    method = cfg.dtmf_method
    if method == "auto":
        answer = d.answer.message if d.answer is not None else None
        method = "rfc4733" if sdp.offers_telephone_event(answer) else "inband"
    result.detail["dtmf.method"] = method
    result.detail["dtmf.sent"] = digits
    back: _DtmfBack | None
    if method == "inband":
        back = await _inband_dtmf(call, cfg, recording, until=until)
    else:
        back = await _rfc4733_dtmf(call, digits, d, until=until)
    if back is None:
        result.fail("dtmf", "dtmf_unsupported")  # no telephone-event in the far end's SDP
        return
    received, took, ended = back
    if ended is not None:
        result.fail("dtmf", "remote_hangup", status=ended.status, sip_reason=ended.reason)
        return
    result.detail["dtmf.received"] = received or "none"
    if received == digits:
        result.time("dtmf", took)
    else:
        result.fail("dtmf", "dtmf_mismatch" if received else "dtmf_missing")


async def _rfc4733_dtmf(call: OutgoingCall, digits: str, d: _Dialog, *, until: float) -> _DtmfBack | None:
    """Send telephone-events; the digits that came back as events (the far end's own, sent
    after the answer, count too). None: nothing could be sent."""
    began = time.monotonic()
    if not await call.send_dtmf(digits):
        return None
    last = began
    while len(d.digits) < len(digits) and (now := time.monotonic()) < until:
        event = await call.next_event(until - now)
        if event is None:
            break
        if event.kind == "dtmf" and event.digit:
            d.digits.append(event.digit)
            last = event.at
        elif event.kind == "disconnected":
            return "".join(d.digits), 0.0, event
    return "".join(d.digits), last - began, None


async def _inband_dtmf(call: OutgoingCall, cfg: InviteCheck, recording: Path, *, until: float) -> _DtmfBack:
    """Play the digits as tone pairs into the call while recording what comes back, then
    decode the recording (``media.detect_dtmf``; the responder's tone and ours are removed
    first). The recording runs while the digits play and ``INBAND_TAIL`` (or
    ``dtmf_timeout``, when shorter) after."""
    digits = cfg.dtmf or ""
    await call.record(recording)
    await call.play_digits(digits)
    listen = len(digits) * INBAND_DIGIT_SECONDS + min(cfg.dtmf_timeout, INBAND_TAIL)
    ended = await call.wait_ended(max(0.0, min(listen, until - time.monotonic())))
    if ended is None:
        await call.play_digits(None)
    await call.record(None)
    if ended is not None:
        return "", 0.0, ended
    try:
        samples, rate = await asyncio.to_thread(media.read_wav, recording)
        found = await asyncio.to_thread(
            media.detect_dtmf, samples, rate, ignore=(cfg.expect_tone_hz, cfg.tone_hz)
        )
    except (ValueError, OSError):  # nothing was recorded
        found = []
    took = found[-1].end if found else 0.0
    return "".join(f.digit for f in found), took, None


async def _announce(
    call: OutgoingCall, result: Findings, announcement: Path, deadline: float
) -> CallEvent | None:
    """A person may have answered: say so before hanging up. The call's end, if it ended
    while the announcement played (the far end hung up, or we refused its target).

    The media verdict is already a failure (no test endpoint was heard) and the first
    failure wins, so the result goes out as the prompt starts (``verdict_ready``) rather
    than 3.75 s later; the scheduler keeps the slot until the call has ended."""
    length = media.wav_duration(announcement)
    if not await call.play_file(announcement):
        return None
    result.detail["announcement"] = "played"
    if result.outcome != "pass":  # always so here; a pass would wait for its teardown timing
        verdict_ready(result.done())
    ended = await call.wait_ended(max(0.0, min(length + 0.3, deadline - time.monotonic())))
    if ended is not None and ended.cause == "guard_refused" and ended.refusal is not None:
        _refused_remote(result, ended.refusal, "media")
    return ended


async def _teardown(call: OutgoingCall, result: Findings, deadline: float) -> None:
    """BYE -> call released, timed; past the deadline the media stage failed first."""
    if time.monotonic() >= deadline:
        result.fail("media", "max_duration")
    began = time.monotonic()
    await call.hangup()
    ended = await call.wait_ended(TEARDOWN_WAIT)
    if ended is None:
        result.fail("teardown", "teardown_timeout")
        return
    result.time("teardown", ended.at - began)


def _media_stats(stats: RtpStats | None, tone_heard: bool, echo_heard: bool | None) -> MediaStats:
    if stats is None:
        return MediaStats(0, 0, 0.0, 0.0, None, None, tone_heard, echo_heard)
    loss = media.loss_fraction(stats.rx_packets, stats.rx_lost)
    mos = (
        media.estimate_mos(loss=loss, jitter_ms=stats.jitter_ms, rtt_ms=stats.rtt_ms, codec=stats.codec)
        if stats.rx_packets > 0
        else None
    )
    return MediaStats(
        rx_packets=stats.rx_packets,
        tx_packets=stats.tx_packets,
        loss=round(loss, 4),
        jitter_ms=round(stats.jitter_ms, 3),
        rtt_ms=None if stats.rtt_ms is None else round(stats.rtt_ms, 3),
        mos=mos,
        tone_heard=tone_heard,
        echo_heard=echo_heard,
    )


# --------------------------------------------------------------------- options


async def options_check(engine: SipEngine, target: Target, check: OptionsCheck | None = None) -> CheckOutcome:
    """One OPTIONS: any 2xx (or a status in ``accept``) passes."""
    cfg = check or target.checks.options or OptionsCheck()
    result = Findings("options", datetime.now(UTC))
    begin = time.monotonic()
    try:
        reply = await engine.options(dial_for(target), timeout=cfg.timeout)
    except GuardRefusal as refusal:
        return result.refused(refusal)
    except (EngineClosed, CallSetupError, SipError) as exc:
        return result.not_sent(exc)
    waited = reply.sent_at - begin
    if waited > 0.05:
        result.detail["rate_wait_ms"] = f"{waited * 1000:.0f}"
    if not reply.from_network:
        result.fail("transport", "no_response" if reply.status == 408 else "transport_error")
        result.detail["local"] = f"{reply.status} {reply.reason}"
        return result.done()
    result.time("answer", reply.finished_at - reply.sent_at)
    if not (200 <= reply.status < 300 or reply.status in cfg.accept):
        result.fail("answer", reason_for_status(reply.status), status=reply.status, sip_reason=reply.reason)
    else:
        result.sip_status, result.sip_reason = reply.status, reply.reason
    return result.done()
