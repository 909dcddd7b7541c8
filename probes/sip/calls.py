"""The pjsua2 objects of a call and of a request: they live only in the pjsua2 thread,
a ``Call`` only until DISCONNECTED. asyncio sees them through probes.sip.handles."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

import pjsua2 as pj

from probes.sip.bridge import CallMedia, audio_index, rtp_stats
from probes.sip.native import callback
from probes.sip.safety import NoTransfers
from probes.sip.values import (
    MAX_MESSAGE,
    CallEvent,
    CallOptions,
    Dial,
    DisconnectCause,
    OptionsReply,
    Registration,
    RemoteRefusal,
    RtpStats,
)

if TYPE_CHECKING:
    from probes.sip.core import Core

DTMF_DURATION_MS: Final = 160  # each telephone-event's length (pjsua's default); pjsua adds a gap


class Account(pj.Account):  # type: ignore[misc]
    def __init__(self, core: Core, name: str) -> None:
        super().__init__()
        self._core = core
        self.name = name
        self.options: dict[int, PendingOptions] = {}  # outstanding OPTIONS by request tag
        self.calls = 0

    @callback
    def onIncomingCall(self, prm: Any) -> None:
        self._core.on_incoming(self, prm)

    @callback
    def onSendRequest(self, prm: Any) -> None:
        self._core.on_request_done(self, prm)


class RegisteredAccount(Account):
    """An account that registers (``Dial.account``): pjsua refreshes it before it expires
    and retries after a failure; each end of an attempt comes to ``Core.on_reg_state``."""

    def __init__(self, core: Core, name: str) -> None:
        super().__init__(core, name)
        self.reg_call_id = ""  # the Call-ID of its REGISTERs (pjsua keeps one per account)
        self.attempt: RegisterAttempt | None = None  # ours, in flight
        self.waiting: list[PendingRegister] = []
        self.last: Registration | None = None
        self.lost: str | None = None  # why the registration was lost, until it is back
        self.refreshes = 0  # pjsua's own refreshes that kept the binding, since our last attempt

    @property
    def registered(self) -> bool:
        return self.last is not None and self.last.registered

    @callback
    def onRegState(self, prm: Any) -> None:
        self._core.on_reg_state(self, prm)


@dataclass(slots=True)
class RegisterAttempt:
    """The REGISTERs of one attempt as they left (``Gate`` sees each): the first, and the
    first with a new CSeq (the one with credentials, after a 401/407; a retransmission
    keeps its CSeq)."""

    started_at: float
    sent_at: float | None = None
    cseq: int = 0
    credentials_at: float | None = None

    def sent(self, at: float, cseq: int) -> None:
        if self.sent_at is None:
            self.sent_at, self.cseq = at, cseq
        elif cseq != self.cseq and self.credentials_at is None:
            self.credentials_at = at


class Call(NoTransfers, pj.Call):  # type: ignore[misc]
    """A pjsua2 call; lives only in the pjsua2 thread and only until DISCONNECTED.
    (NoTransfers first: its hooks decline what pjsua would otherwise dial itself.)"""

    def __init__(
        self, core: Core, account: Account, key: int, *, call_id: int, outgoing: bool, deadline: float
    ) -> None:
        super().__init__(account, call_id)
        self.core = core
        self.account = account
        self.key = key
        self.outgoing = outgoing
        self.deadline = deadline
        self.media = CallMedia()
        self.sent = False
        self.responses: set[int] = set()
        self.final_from_network: int | None = None
        self.hung_up = False
        self.cause_hint: DisconnectCause | None = None
        self.confirmed = False
        self.sip_call_id = ""  # the Call-ID header, once pjsua has made it
        self.refusal: RemoteRefusal | None = None
        self.released = False
        account.calls += 1

    # callbacks -------------------------------------------------------------

    @callback
    def onCallTsxState(self, prm: Any) -> None:
        e = prm.e
        if e.type != pj.PJSIP_EVENT_TSX_STATE:
            return
        ts = e.body.tsxState
        tsx = ts.tsx
        if not self.outgoing or tsx.method != "INVITE" or tsx.role != pj.PJSIP_ROLE_UAC:
            return
        now = time.monotonic()
        if not self.sent and tsx.state >= pj.PJSIP_TSX_STATE_CALLING and ts.type == pj.PJSIP_EVENT_TX_MSG:
            self.sent = True
            self.core.emit(self, CallEvent("sent", now))
        if ts.type == pj.PJSIP_EVENT_RX_MSG:
            self._response(int(tsx.statusCode), str(tsx.statusText), ts.src.rdata, now)

    def _response(self, status: int, reason: str, rdata: Any, now: float) -> None:
        """Emit each response once, in arrival order (the state callback may see it first)."""
        if status in self.responses:
            return
        self.responses.add(status)
        if status >= 300:
            self.final_from_network = status
        text = str(rdata.wholeMsg)[:MAX_MESSAGE]
        self.core.emit(self, CallEvent("response", now, status, reason, text))

    @callback
    def onCallState(self, prm: Any) -> None:
        info = self.getInfo()
        state = info.state
        now = time.monotonic()
        e = prm.e
        if self.outgoing and e.type == pj.PJSIP_EVENT_TSX_STATE:
            ts = e.body.tsxState
            tsx = ts.tsx
            if ts.type == pj.PJSIP_EVENT_RX_MSG and tsx.method == "INVITE" and tsx.role == pj.PJSIP_ROLE_UAC:
                self._response(int(tsx.statusCode), str(tsx.statusText), ts.src.rdata, now)
        if state == pj.PJSIP_INV_STATE_CONFIRMED and not self.confirmed:
            self.confirmed = True
            self.core.emit(self, CallEvent("confirmed", now, int(info.lastStatusCode)))
        elif state == pj.PJSIP_INV_STATE_DISCONNECTED:
            status = int(info.lastStatusCode)
            reason = str(info.lastReason)
            cause = self._cause(prm.e, status)
            refusal = self.refusal if cause == "guard_refused" else None
            self.core.release(
                self, CallEvent("disconnected", now, status, reason, cause=cause, refusal=refusal)
            )

    def _cause(self, e: Any, status: int) -> DisconnectCause:
        if self.cause_hint is not None:
            return self.cause_hint
        if self.hung_up:
            return "local"
        if self.final_from_network is not None:
            return "rejected"
        if self.confirmed:
            return "remote_bye"
        if not self.outgoing:
            return "cancelled"
        if e.type == pj.PJSIP_EVENT_TSX_STATE and e.body.tsxState.type == pj.PJSIP_EVENT_TRANSPORT_ERROR:
            return "transport"
        return "timeout" if status == 408 else "transport"

    @callback
    def onCallMediaState(self, prm: Any) -> None:
        active = audio_index(self) is not None
        if active != self.media.active:
            self.media.active = active
            self.core.emit(self, CallEvent("media", time.monotonic(), media_active=active))
        self.apply_media()

    @callback
    def onDtmfDigit(self, prm: Any) -> None:
        digit = str(prm.digit)[:1]
        if digit:
            self.core.emit(self, CallEvent("dtmf", time.monotonic(), digit=digit))

    def send_dtmf(self, digits: str) -> bool:
        """Send ``digits`` as RFC 4733 telephone-events (pjsua queues them, one after the
        other); False when the far end's SDP offered no telephone-event or media is down."""
        if not self.media.active:
            return False
        prm = pj.CallSendDtmfParam()
        prm.method = pj.PJSUA_DTMF_METHOD_RFC2833
        prm.digits = digits
        prm.duration = DTMF_DURATION_MS
        try:
            self.sendDtmf(prm)
        except pj.Error:
            return False
        return True

    # media (pjsua2 thread only) ------------------------------------------------

    def apply_media(self) -> None:
        """Bring the bridge connections in line with ``self.media.want``."""
        if not self.media.active:
            return
        try:
            am = self.getAudioMedia(-1)
        except pj.Error:
            return
        self.media.apply(am)

    def stats(self) -> RtpStats | None:
        return rtp_stats(self)


@dataclass(slots=True)
class PendingCall:
    key: int
    dial: Dial
    options: CallOptions
    fut: asyncio.Future[float]
    queued_at: float
    deadline: float
    cancelled: bool = False


@dataclass(slots=True)
class PendingRegister:
    dial: Dial  # uri: the registrar; account: the account
    timeout: float  # pjsip's transaction timeout for the first REGISTER
    fresh: bool  # send a REGISTER; False: the account's current state will do (a call's check)
    fut: asyncio.Future[Registration]


@dataclass(slots=True)
class PendingOptions:
    dial: Dial
    timeout: float
    headers: tuple[tuple[str, str], ...]
    fut: asyncio.Future[OptionsReply]
    queued_at: float
    sent_at: float = 0.0
    cancelled: bool = False
