"""The SIP engine: the only module in ecpm that imports pjsua2.

Use it as ``async with SipEngine(settings, guard) as engine:``. One engine (one
pjsua2 ``Endpoint``) per process; a second concurrent engine is refused.

Threading (docs/checks.md, "The SIP engine")
    pjsip runs in one dedicated thread that creates the library (so it is pjsua2's
    main thread), with ``threadCnt = 0`` and ``mainThreadOnly``. That thread loops:
    run at most :data:`BATCH` queued closures from asyncio, admit waiting calls
    (slot and rate limits), enforce per-call hard limits, then
    ``libHandleEvents(0 if more is queued else poll)``. Every pjsua2 call is made
    there; pjsua2 objects (``Call``, ``Account``, recorders, tone generators) never
    leave it. Results and events go to asyncio with ``loop.call_soon_threadsafe``
    as plain frozen dataclasses; timestamps are ``time.monotonic()`` taken in the
    pjsua2 thread when pjsip reported the event.

Traps designed around (each measured on the pinned pjsua2 wheel)
    - a ``Call`` wrapper is dropped *inside* its DISCONNECTED callback, so an old
      wrapper can never hang up a later call that reuses its id;
    - no pjsua2 object outlives ``libDestroy``: shutdown hangs up, waits for
      DISCONNECTED and for outstanding OPTIONS transactions (an account deleted
      under a live transaction trips a C assertion), drops every object, runs the
      garbage collector and only then destroys the library;
    - no Python ``AudioMediaPort``: received audio goes to pjmedia's own WAV
      recorder and is analysed offline (probes.media);
    - ``noVad``, ``sndAutoCloseTime = -1``, null sound device, 8 kHz bridge;
    - pjsip's log goes to the ``probes.sip.pjsip`` logger, never to stdout;
    - the wheel's limits (4 calls, slots held until the INVITE transaction ends,
      a C assertion when calls churn faster than about 75/s) are enforced here:
      calls wait for a free slot (counted by pjsua itself, so held slots count)
      and are spaced at ``SipSettings.max_call_rate``.

Safety
    :meth:`_Core.hand_over` is the one function that gives a URI (request URI and
    outbound proxy) to pjsua2, for INVITE and OPTIONS alike; it runs the guard
    first. A refusal is logged and counted by the guard, counted by the engine,
    raised as :class:`~probes.guard.GuardRefusal`, and nothing is sent.

    The far end chooses the rest: the Contact of its 18x/2xx (or of its INVITE, for
    an incoming call, and of every re-INVITE, UPDATE or other target refresh) becomes
    the Request-URI of every later request in the dialog. :mod:`probes.sip_targets`
    (a pjsip module) hands each such Contact to :meth:`_Core.judge_inbound`, which
    runs :meth:`~probes.guard.Guard.check_remote_target`; a refused one never reaches
    the dialog (a response is dropped, a request answered 403 statelessly), and the
    call is ended locally (:meth:`_Core.end_refused`): ``pjsip_inv_terminate``, so
    nothing at all is sent in that dialog — except, for a call not yet answered whose
    18x was refused, the CANCEL, which goes to the INVITE's own Request-URI. The same
    module judges the Request-URI of every request leaving the process
    (:meth:`_Core.judge_outbound`) and refuses to send one that fails. The call ends
    with cause ``guard_refused`` and the refusal in :attr:`CallEvent.refusal`.

Errors::

    EcpmError
    └── SipError            the engine could not do what was asked
        ├── EngineClosed    the engine is not running
        ├── CallSetupError  pjsua2 refused to start the request (bad URI, transport)
        └── NoCallSlot      no call slot became free in time
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import ctypes
import functools
import gc
import ipaddress
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal, TypeVar, cast

import pjsua2 as pj
from pjsua2 import pjsua2 as _swig  # the SWIG module; its _pjsua2 is the C extension

from ecpm.errors import EcpmError
from ecpm.settings import Transport
from probes.config import Auth, SipSettings
from probes.guard import CarrierTestService, Guard, GuardRefusal
from probes.media import wav_complete
from probes.sip_targets import Inbound, LayoutError, Outbound, Screen, is_sip_uri

logger = logging.getLogger(__name__)
pjsip_logger = logging.getLogger("probes.sip.pjsip")

T = TypeVar("T")

BATCH: Final = 8  # closures run per loop turn (an unbounded burst caused retransmits)
CLOCK_RATE: Final = 8000  # conference bridge and recorder rate: G.711 needs no more
DEFAULT_TRANSACTION_TIMEOUT: Final = 8.0  # pjsip TD (timers B, D, F, H) unless a request sets its own
SLOT_WAIT: Final = 60.0  # longest a call waits for a free slot before NoCallSlot
SHUTDOWN_CALL_WAIT: Final = 2.0  # hang-ups at shutdown: wait this long for DISCONNECTED
MAX_MESSAGE: Final = 64 * 1024  # SIP message text handed to asyncio is cut here
REQUEST_TAG: Final = "X-ECPM-Request"  # matches an OPTIONS completion to its request
_T1, _T2, _T4 = 500, 4000, 5000  # RFC 3261 timers in ms, left at their defaults


class _ProcessSlot:
    """The one engine a process may run (pjsua2 has one Endpoint per process)."""

    lock = threading.Lock()
    engine: SipEngine | None = None


# --------------------------------------------------------------------- errors


class SipError(EcpmError):
    """The SIP engine could not do what was asked."""


class EngineClosed(SipError):
    """The engine is not running (not started, or closed)."""


class CallSetupError(SipError):
    """pjsua2 refused to start a request: bad URI, transport not enabled, ..."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        self.status = status
        super().__init__(message)


class NoCallSlot(SipError):
    """No call slot became free within the wait limit (all in use or held)."""


# ---------------------------------------------------------------- plain values


@dataclass(frozen=True, slots=True)
class Dial:
    """Where a request goes, and everything the guard judges about it."""

    uri: str
    target: str  # target id, for logs and counters
    declared_test_endpoint: bool
    proxy: str | None = None  # outbound proxy (loose route), e.g. "sip:10.0.0.1:5060;lr"
    transport: Transport = "udp"
    auth: Auth | None = None
    carrier_test_service: CarrierTestService | None = None


@dataclass(frozen=True, slots=True)
class Part:
    """An extra MIME part sent next to the SDP (multipart/mixed)."""

    content_type: str  # "application/pidf+xml"
    body: str
    headers: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class CallOptions:
    headers: tuple[tuple[str, str], ...] = ()
    parts: tuple[Part, ...] = ()
    tone_hz: float | None = None  # play this tone into the call while media is up
    record: Path | None = None  # record what we receive (WAV, 8 kHz mono 16-bit)
    first_response_timeout: float = 5.0  # pjsip timer B for this INVITE
    max_duration: float = 60.0  # the engine hangs up after this, whatever the caller does


CallEventKind = Literal["sent", "response", "media", "confirmed", "disconnected"]
DisconnectCause = Literal[
    "local",  # we hung up (BYE, CANCEL or a rejection we sent)
    "rejected",  # a final non-2xx response came from the network
    "remote_bye",  # the far end ended an established call
    "cancelled",  # the caller cancelled before we answered (UAS)
    "timeout",  # no final response: pjsip's own timeout (408, timer B)
    "transport",  # the transport failed (connect refused, TLS, ICMP)
    "max_duration",  # the engine's hard limit
    "engine_closed",
    "guard_refused",  # the far end named a remote target the guard refused: ended locally
]


@dataclass(frozen=True, slots=True)
class RemoteRefusal:
    """A URI the far end gave us to send to, refused by the guard (the call was ended)."""

    uri: str
    reason: str  # the guard's reason (probes.guard.REASONS)
    detail: str  # the guard's sentence
    where: str  # "Contact of 200 to INVITE", "Record-Route of 200 to INVITE", "Route of ACK", ...
    status: int | None = None  # the response that carried it


@dataclass(frozen=True, slots=True)
class CallEvent:
    kind: CallEventKind
    at: float  # time.monotonic() in the pjsua2 thread
    status: int | None = None
    reason: str | None = None
    message: str | None = None  # "response": the whole SIP response as received
    media_active: bool | None = None  # "media": audio is flowing (per SDP)
    cause: DisconnectCause | None = None  # "disconnected"
    refusal: RemoteRefusal | None = None  # "disconnected" with cause "guard_refused"


@dataclass(frozen=True, slots=True)
class RtpStats:
    rx_packets: int
    rx_lost: int
    jitter_ms: float  # mean RFC 3550 interarrival jitter of what we received
    tx_packets: int
    rtt_ms: float | None  # mean RTCP round trip, None until an RTCP report came back
    codec: str


@dataclass(frozen=True, slots=True)
class OptionsReply:
    status: int
    reason: str
    from_network: bool  # False: pjsip made it up (timeout 408, transport error 503)
    sent_at: float
    finished_at: float
    message: str | None


@dataclass(frozen=True, slots=True)
class IncomingRequest:
    message: str  # the whole INVITE as received
    source: str  # "ip:port" it came from
    received_at: float


@dataclass(frozen=True, slots=True)
class EngineStats:
    calls_active: int  # calls with a live wrapper
    slots_in_use: int  # pjsua's own count, held slots included
    calls_waiting: int  # waiting for a slot or the rate limit
    calls_placed_total: int
    calls_incoming_total: int
    refused_total: int  # refused by the guard here (the guard counts by reason)
    options_total: int


# --------------------------------------------------------------- ctypes access

_clib_cache: list[ctypes.CDLL] = []


def _clib() -> ctypes.CDLL:
    """The extension module itself, for the few C functions pjsua2 does not wrap."""
    if not _clib_cache:
        _clib_cache.append(ctypes.CDLL(_swig._pjsua2.__file__))
    return _clib_cache[0]


def _set_tsx_timeout(seconds: float) -> None:
    """pjsip's TD: timer B (no response to INVITE), F (non-INVITE), D and H."""
    td = max(100, round(seconds * 1000))
    _clib().pjsip_tsx_set_timers(_T1, _T2, _T4, td)


def _disable_tcp_switch(td_seconds: float) -> None:
    """Keep a request on the transport the target asked for (RFC 3261 18.1.1 would move
    a >1300-byte UDP request, e.g. an INVITE with a PIDF-LO, to TCP)."""
    cfg = (ctypes.c_uint * 18).in_dll(_clib(), "pjsip_sip_cfg_var")
    # layout of pjsip_cfg_t in 2.15: 13 endpt flags, then tsx {max_count, t1, t2, t4, td};
    # check it against the timers we have just set before writing anything
    expected = [_T1, _T2, _T4, max(100, round(td_seconds * 1000))]
    if list(cfg[14:18]) != expected or cfg[4] not in (0, 1):
        logger.warning("pjsip_cfg_t layout not as expected; TCP switch left on")
        return
    cfg[4] = 1  # endpt.disable_tcp_switch


def _pj_error(exc: Exception) -> str:
    reason = getattr(exc, "reason", None) or str(exc)
    status = getattr(exc, "status", None)
    return f"{reason} (pj status {status})" if status else str(reason)


def _host(address: str) -> str:
    return f"[{address}]" if ipaddress.ip_address(address).version == 6 else address


def _post(loop: asyncio.AbstractEventLoop, fn: Callable[..., object], *args: object) -> None:
    with contextlib.suppress(RuntimeError):  # a closed loop: nobody is waiting any more
        loop.call_soon_threadsafe(fn, *args)


def _resolve(fut: asyncio.Future[Any], value: object) -> None:
    if not fut.done():
        fut.set_result(value)


def _reject(fut: asyncio.Future[Any], exc: BaseException) -> None:
    if not fut.done():
        fut.set_exception(exc)


# ------------------------------------------------------ pjsua2 thread classes

F = TypeVar("F", bound=Callable[..., None])


def _callback(fn: F) -> F:
    """A pjsua2 callback: an exception must never unwind into C; log it as the bug it is."""

    @functools.wraps(fn)
    def wrapper(*args: Any) -> None:
        try:
            fn(*args)
        except Exception:
            logger.exception("error in pjsua2 callback %s (a bug in ecpm)", fn.__name__)

    return cast(F, wrapper)


class _LogWriter(pj.LogWriter):  # type: ignore[misc]
    """pjsip's log into Python logging (pjsip 1 -> WARNING, 2 -> INFO, 3+ -> DEBUG)."""

    def write(self, entry: Any) -> None:
        level = logging.WARNING if entry.level <= 1 else logging.INFO if entry.level == 2 else logging.DEBUG
        if pjsip_logger.isEnabledFor(level):
            pjsip_logger.log(level, "%s", str(entry.msg).rstrip())


class _Endpoint(pj.Endpoint):  # type: ignore[misc]
    def __init__(self, core: _Core) -> None:
        super().__init__()
        self._core = core

    @_callback
    def onSelectAccount(self, prm: Any) -> None:
        prm.accountIndex = self._core.incoming_account_id()


class _Account(pj.Account):  # type: ignore[misc]
    def __init__(self, core: _Core, name: str) -> None:
        super().__init__()
        self._core = core
        self.name = name
        self.options: dict[int, _PendingOptions] = {}  # outstanding OPTIONS by request tag
        self.calls = 0

    @_callback
    def onIncomingCall(self, prm: Any) -> None:
        self._core.on_incoming(self, prm)

    @_callback
    def onSendRequest(self, prm: Any) -> None:
        self._core.on_request_done(self, prm)


@dataclass(slots=True)
class _MediaWish:
    tone_hz: float | None = None
    echo: bool = False
    record: Path | None = None
    play: Path | None = None


class _Call(pj.Call):  # type: ignore[misc]
    """A pjsua2 call; lives only in the pjsua2 thread and only until DISCONNECTED."""

    def __init__(
        self, core: _Core, account: _Account, key: int, *, call_id: int, outgoing: bool, deadline: float
    ) -> None:
        super().__init__(account, call_id)
        self.core = core
        self.account = account
        self.key = key
        self.outgoing = outgoing
        self.deadline = deadline
        self.want = _MediaWish()
        self.media_active = False
        self.port_id: int | None = None  # the call's conference slot the connections below are on
        self.tone: Any = None
        self.tone_hz: float | None = None
        self.echoing = False
        self.recorder: Any = None
        self.recording: Path | None = None
        self.player: Any = None
        self.playing: Path | None = None
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

    # Safety: pjsua never places a call on its own. By default it accepts an in-dialog
    # REFER and dials the Refer-To URI itself, answers an INVITE with Replaces, and may
    # follow a 3xx — each a request the live-number guard never saw. These are declined
    # here, first thing and deliberately not wrapped in _callback: an exception there
    # would be swallowed and pjsua's accepting default would stand (fail open).
    def onCallTransferRequest(self, prm: Any) -> None:
        prm.statusCode = 603  # Decline: we never transfer
        with contextlib.suppress(Exception):
            logger.warning("declined a transfer (REFER) to %s: ecpm dials only guarded targets", prm.dstUri)

    def onCallReplaceRequest(self, prm: Any) -> None:
        prm.statusCode = 603
        with contextlib.suppress(Exception):
            logger.warning("declined an INVITE with Replaces: ecpm calls are never replaced")

    def onCallRedirected(self, prm: Any) -> int:
        with contextlib.suppress(Exception):
            logger.warning("not following a redirect to %s: ecpm dials only guarded targets", prm.targetUri)
        return int(pj.PJSIP_REDIRECT_STOP)

    @_callback
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

    @_callback
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

    @_callback
    def onCallMediaState(self, prm: Any) -> None:
        active = self.audio_index() is not None
        if active != self.media_active:
            self.media_active = active
            self.core.emit(self, CallEvent("media", time.monotonic(), media_active=active))
        self.apply_media()

    # media (pjsua2 thread only) ------------------------------------------------

    def audio_index(self) -> int | None:
        info = self.getInfo()  # keep the owner alive: .media points into it (SWIG)
        for m in info.media:
            if m.type == pj.PJMEDIA_TYPE_AUDIO and m.status == pj.PJSUA_CALL_MEDIA_ACTIVE:
                return int(m.index)
        return None

    def apply_media(self) -> None:
        """Bring the bridge connections in line with ``self.want``."""
        if not self.media_active:
            return
        try:
            am = self.getAudioMedia(-1)
        except pj.Error:
            return
        port = am.getPortId()
        if self.port_id is not None and port != self.port_id:
            # a re-INVITE or an answer SDP differing from early media restarted the stream on
            # a new conference slot: every bridge connection was dropped with the old one
            if self.tone is not None:
                self.tone.startTransmit(am)
            if self.echoing:
                am.startTransmit(am)
            if self.recorder is not None:
                am.startTransmit(self.recorder)
            if self.player is not None:
                self.player.startTransmit(am)
        self.port_id = port
        want = self.want
        if self.tone_hz != want.tone_hz or (want.play is not None and self.tone is not None):
            self._drop_tone(am)
            if want.tone_hz is not None and want.play is None:
                tone = pj.ToneGenerator()
                tone.createToneGenerator(CLOCK_RATE, 1)
                desc = pj.ToneDesc()
                desc.freq1 = round(want.tone_hz)
                desc.freq2 = 0
                desc.on_msec = 30000
                desc.off_msec = 0
                desc.volume = 0  # pjmedia's default level, about -8 dBFS
                tones = pj.ToneDescVector()
                tones.append(desc)
                tone.play(tones, True)
                tone.startTransmit(am)
                self.tone, self.tone_hz = tone, want.tone_hz
        if self.echoing != want.echo:
            if want.echo:
                am.startTransmit(am)
            else:
                am.stopTransmit(am)
            self.echoing = want.echo
        if self.recording != want.record:
            self._drop_recorder(am)
            if want.record is not None:
                recorder = pj.AudioMediaRecorder()
                recorder.createRecorder(str(want.record))
                am.startTransmit(recorder)
                self.recorder, self.recording = recorder, want.record
        if self.playing != want.play:
            self._drop_player(am)
            if want.play is not None:
                player = pj.AudioMediaPlayer()
                player.createPlayer(str(want.play), pj.PJMEDIA_FILE_NO_LOOP)
                player.startTransmit(am)
                self.player, self.playing = player, want.play

    def _drop_tone(self, am: Any) -> None:
        if self.tone is not None:
            if am is not None:
                with contextlib.suppress(pj.Error):
                    self.tone.stopTransmit(am)
            self.tone = None  # the C++ destructor removes it from the bridge
        self.tone_hz = None

    def _drop_recorder(self, am: Any) -> None:
        if self.recorder is not None:
            if am is not None:
                with contextlib.suppress(pj.Error):
                    am.stopTransmit(self.recorder)
            self.recorder = None  # destructor closes the WAV file (header written)
        self.recording = None

    def _drop_player(self, am: Any) -> None:
        if self.player is not None:
            if am is not None:
                with contextlib.suppress(pj.Error):
                    self.player.stopTransmit(am)
            self.player = None
        self.playing = None

    def drop_media(self) -> None:
        """Destroy every media object of this call (at DISCONNECTED and shutdown)."""
        self._drop_tone(None)
        self._drop_recorder(None)
        self._drop_player(None)
        self.echoing = False

    def stats(self) -> RtpStats | None:
        index = self.audio_index()
        if index is None:
            return None
        try:
            stat = self.getStreamStat(index)
            info = self.getStreamInfo(index)
        except pj.Error:
            return None
        rtcp = stat.rtcp
        rx, tx = rtcp.rxStat, rtcp.txStat
        rtt = rtcp.rttUsec
        return RtpStats(
            rx_packets=int(rx.pkt),
            rx_lost=int(rx.loss),
            jitter_ms=float(rx.jitterUsec.mean) / 1000.0 if int(rx.jitterUsec.n) > 0 else 0.0,
            tx_packets=int(tx.pkt),
            rtt_ms=float(rtt.mean) / 1000.0 if int(rtt.n) > 0 else None,
            codec=str(getattr(info, "codecName", "") or "PCMU"),
        )


@dataclass(slots=True)
class _PendingCall:
    key: int
    dial: Dial
    options: CallOptions
    fut: asyncio.Future[float]
    queued_at: float
    deadline: float
    cancelled: bool = False


@dataclass(slots=True)
class _PendingOptions:
    dial: Dial
    timeout: float
    headers: tuple[tuple[str, str], ...]
    fut: asyncio.Future[OptionsReply]
    queued_at: float
    sent_at: float = 0.0
    cancelled: bool = False


# ---------------------------------------------------------- the pjsua2 thread


class _Core:
    """Everything that runs in the pjsua2 thread. Only ``submit``/``stop`` and the
    flag setters are called from other threads."""

    def __init__(
        self,
        settings: SipSettings,
        guard: Guard,
        loop: asyncio.AbstractEventLoop,
        engine: SipEngine,
        *,
        transaction_timeout: float,
        poll_interval: float,
    ) -> None:
        self.settings = settings
        self.guard = guard
        self.loop = loop
        self.engine = engine
        self.td = transaction_timeout
        self.poll_ms = max(1, round(poll_interval * 1000))
        self.commands: deque[tuple[Callable[[], None], asyncio.Future[Any] | None]] = deque()
        self.lock = threading.Lock()
        self.dead = False
        self.pending_calls: deque[_PendingCall] = deque()
        self.pending_options: deque[_PendingOptions] = deque()
        self.stopping = False
        self.closing = False
        self.incoming_media = True
        self.accepting = False
        self.ep: Any = None
        self.writer: Any = None
        self.calls: dict[int, _Call] = {}
        self.accounts: dict[tuple[str, ...], _Account] = {}
        self.uas: _Account | None = None
        self.no_media: _Account | None = None
        self.local: dict[str, str] = {}
        self.transport_ids: dict[str, int] = {}
        self.next_start = 0.0
        self.tags = itertools.count(1)
        self.placed = self.incoming = self.refused = self.options_sent = 0
        # remote targets (probes.sip_targets): the screen, the dial each Call-ID belongs
        # to (for the guard's target name and carrier opt-in), the dial being handed over
        # right now, verdicts already reached, and calls to end
        self.screen: Screen | None = None
        self.contexts: dict[str, Dial] = {}
        self.sending: Dial | None = None
        self.passed: dict[tuple[str, str, CarrierTestService | None], None] = {}
        self.verdicts: dict[tuple[str, str], RemoteRefusal] = {}
        self.to_end: deque[tuple[str, RemoteRefusal, bool]] = deque()

    # thread entry ----------------------------------------------------------------

    def run(self, ready: Callable[[BaseException | None], None]) -> None:
        try:
            self._init()
        except Exception as exc:
            message = str(exc) if isinstance(exc, SipError) else _pj_error(exc)
            self._destroy()
            ready(SipError(f"cannot start the SIP engine: {message}"))
            return
        ready(None)
        try:
            while not self.stopping:
                self.turn()
        finally:
            try:
                self._wind_down()
                self._destroy()
            finally:
                with self.lock:
                    self.dead = True
                    leftovers = list(self.commands)
                    self.commands.clear()
                for _, fut in leftovers:
                    if fut is not None:
                        _post(self.loop, _reject, fut, EngineClosed("the SIP engine has stopped"))

    def turn(self) -> None:
        if self.to_end:
            self._guarded(self.end_refused, None)
        done = 0
        while self.commands and done < BATCH:
            fn, fut = self.commands.popleft()
            self._guarded(fn, fut)
            done += 1
        self._guarded(self._admit, None)
        self._guarded(self._enforce_limits, None)
        self.ep.libHandleEvents(0 if self.commands else self.poll_ms)

    def _guarded(self, fn: Callable[[], None], fut: asyncio.Future[Any] | None) -> None:
        """Run one step; an exception here is a bug in ecpm: log it, fail its caller,
        and keep the pjsua2 thread (and every other call) alive."""
        try:
            fn()
        except Exception as exc:
            logger.exception("error in the pjsua2 thread (a bug in ecpm)")
            if fut is not None:
                _post(self.loop, _reject, fut, SipError(f"internal error: {exc!r}"))

    def submit(self, fn: Callable[[], T], fut: asyncio.Future[T]) -> None:
        """Queue ``fn`` for the pjsua2 thread; its value (or error) resolves ``fut``."""

        def job() -> None:
            try:
                value = fn()
            except GuardRefusal as refusal:
                _post(self.loop, _reject, fut, GuardRefusal(refusal.uri, refusal.reason, refusal.detail))
            except SipError as exc:
                _post(self.loop, _reject, fut, type(exc)(str(exc)))
            except pj.Error as exc:
                _post(self.loop, _reject, fut, SipError(_pj_error(exc)))
            except Exception as exc:  # a bug in ecpm: report it without pjsua2 objects attached
                logger.exception("error in the pjsua2 thread")
                _post(self.loop, _reject, fut, SipError(f"internal error: {exc!r}"))
            else:
                _post(self.loop, _resolve, fut, value)

        self.queue(job, fut)

    def queue(self, fn: Callable[[], None], fut: asyncio.Future[Any] | None) -> None:
        """Queue a closure for the pjsua2 thread (any thread may call this)."""
        with self.lock:
            if not self.dead:
                self.commands.append((fn, fut))
                return
        if fut is not None:
            _post(self.loop, _reject, fut, EngineClosed("the SIP engine has stopped"))

    # start and stop ------------------------------------------------------------------

    def _init(self) -> None:
        s = self.settings
        if ipaddress.ip_address(s.bind).version == 6:
            # The wheel is built without IPv6 (PJ_HAS_IPV6 0): pjsua_acc_add would abort
            # the process on an IPv6 account, so refuse here with words instead.
            raise SipError(f"bind {s.bind}: this pjsua2 build has no IPv6 support; bind an IPv4 address")
        clib = _clib()
        clib.pj_log_set_level(0)  # nothing on stdout before our writer is installed
        self.ep = _Endpoint(self)
        self.ep.libCreate()
        cfg = pj.EpConfig()
        ua = cfg.uaConfig
        ua.threadCnt = 0
        ua.mainThreadOnly = True
        ua.maxCalls = s.max_calls
        ua.userAgent = s.user_agent
        self.writer = _LogWriter()
        log = cfg.logConfig
        log.writer = self.writer
        log.level = s.log_level
        log.consoleLevel = s.log_level
        log.decor = pj.PJ_LOG_HAS_SENDER | pj.PJ_LOG_HAS_INDENT
        med = cfg.medConfig
        med.noVad = True
        med.sndAutoCloseTime = -1
        med.clockRate = CLOCK_RATE
        med.sndClockRate = CLOCK_RATE
        med.ecTailLen = 0
        med.ptime = 20
        med.audioFramePtime = 20
        self.ep.libInit(cfg)
        self._screen()  # before any transport exists: nothing is received or sent unjudged
        self.ep.audDevManager().setNullDev()
        self._transports()
        self.ep.libStart()
        for codec in self.ep.codecEnum2():
            name = str(codec.codecId)
            priority = 255 if name.startswith("PCMU/") else 254 if name.startswith("PCMA/") else 0
            self.ep.codecSetPriority(name, priority)
        _set_tsx_timeout(self.td)
        _disable_tcp_switch(self.td)
        self.uas = self._new_account(("uas",), "ecpm", default=True)
        self.no_media = self._new_account(("no-media",), "ecpm-no-media", loop_media=True)

    def _screen(self) -> None:
        try:
            screen = Screen(_clib(), inbound=self.judge_inbound, outbound=self.judge_outbound)
            screen.check_layout()
            screen.register()
        except (LayoutError, OSError, AttributeError) as exc:
            raise SipError(f"cannot judge remote targets with this pjsua2 build: {exc}") from None
        self.screen = screen

    def _transports(self) -> None:
        s = self.settings
        v6 = ipaddress.ip_address(s.bind).version == 6
        kinds = {
            "udp": pj.PJSIP_TRANSPORT_UDP6 if v6 else pj.PJSIP_TRANSPORT_UDP,
            "tcp": pj.PJSIP_TRANSPORT_TCP6 if v6 else pj.PJSIP_TRANSPORT_TCP,
            "tls": pj.PJSIP_TRANSPORT_TLS6 if v6 else pj.PJSIP_TRANSPORT_TLS,
        }
        shared_port = s.port
        for name in ("udp", "tcp", "tls"):
            if name not in s.transports:
                continue
            tc = pj.TransportConfig()
            tc.boundAddress = s.bind
            port = shared_port if name != "tls" else (s.port + 1 if s.port else 0)
            if name == "tls" and s.tls is not None:
                tls = tc.tlsConfig
                tls.CaListFile = s.tls.ca_file or ""
                tls.certFile = s.tls.cert_file or ""
                tls.privKeyFile = s.tls.key_file or ""
                tls.verifyServer = s.tls.verify_peer
                tls.verifyClient = False
            tc.port = port
            try:
                tid = self.ep.transportCreate(kinds[name], tc)
            except pj.Error:
                if s.port or port == 0:
                    raise
                tc.port = 0  # the UDP port number is taken for TCP: any port will do
                tid = self.ep.transportCreate(kinds[name], tc)
            self.transport_ids[name] = tid
            local = str(self.ep.transportGetInfo(tid).localName)
            self.local[name] = local
            if name == "udp" and not s.port:
                shared_port = int(local.rpartition(":")[2])

    def _new_account(
        self,
        key: tuple[str, ...],
        user: str,
        *,
        default: bool = False,
        loop_media: bool = False,
        dial: Dial | None = None,
    ) -> _Account:
        s = self.settings
        acc = _Account(self, "/".join(key))
        cfg = pj.AccountConfig()
        domain = _host(s.bind)
        if dial is not None and dial.auth is not None:
            domain = _uri_host(dial.proxy or dial.uri) or domain
        cfg.idUri = f"sip:{user}@{domain}"
        cfg.regConfig.registerOnAdd = False
        cfg.callConfig.timerUse = pj.PJSUA_SIP_TIMER_INACTIVE
        mt = cfg.mediaConfig.transportConfig
        mt.boundAddress = s.bind
        mt.port = 0  # a random free RTP port per call
        if loop_media:
            cfg.mediaConfig.useLoopMedTp = True  # SDP as usual, no RTP socket at all
            cfg.mediaConfig.enableLoopback = False
        if dial is not None:
            if dial.proxy:
                cfg.sipConfig.proxies.append(dial.proxy)
            if dial.auth is not None:
                cred = pj.AuthCredInfo(
                    "digest", dial.auth.realm, dial.auth.username, 0, dial.auth.secret.get_secret_value()
                )
                cfg.sipConfig.authCreds.append(cred)
            tid = self.transport_ids.get(dial.transport)
            if tid is None:
                raise CallSetupError(
                    f"transport {dial.transport} is not enabled (sip.transports: "
                    f"{', '.join(self.settings.transports)})"
                )
            cfg.sipConfig.transportId = tid
        acc.create(cfg, default)
        self.accounts[key] = acc
        return acc

    def account_for(self, dial: Dial) -> _Account:
        auth = dial.auth
        key = (
            "uac",
            dial.transport,
            dial.proxy or "",
            "" if auth is None else auth.username,
            "" if auth is None else auth.realm,
            "" if auth is None else auth.secret.get_secret_value(),
        )
        found = self.accounts.get(key)
        if found is not None:
            return found
        uac = [k for k in self.accounts if k[0] == "uac"]
        if len(uac) >= 5:  # PJSUA_MAX_ACC is 8: keep room; drop an idle one
            for k in uac:
                acc = self.accounts[k]
                if acc.calls == 0 and not acc.options:
                    del self.accounts[k]
                    acc.shutdown()
                    break
            else:
                raise CallSetupError("too many distinct proxy/auth/transport combinations in use")
        user = "ecpm-probe" if auth is None else auth.username
        return self._new_account(key, user, dial=dial)

    def _wind_down(self) -> None:
        """Hang up, let DISCONNECTED and OPTIONS completions arrive, then drop everything."""
        self.closing = True
        if self.ep is not None:
            while True:  # let queued operations finish (hang-ups, media changes)
                with self.lock:
                    if not self.commands:
                        break
                    fn, fut = self.commands.popleft()
                self._guarded(fn, fut)
        for req in self.pending_calls:
            _post(self.loop, _reject, req.fut, EngineClosed("the SIP engine is shutting down"))
        self.pending_calls.clear()
        for opt in self.pending_options:
            _post(self.loop, _reject, opt.fut, EngineClosed("the SIP engine is shutting down"))
        self.pending_options.clear()
        if self.ep is None:
            return
        for call in list(self.calls.values()):
            call.cause_hint = "engine_closed"
        with contextlib.suppress(pj.Error):
            self.ep.hangupAllCalls()
        calls_until = time.monotonic() + SHUTDOWN_CALL_WAIT
        while True:
            now = time.monotonic()
            outstanding = [o for a in self.accounts.values() for o in a.options.values()]
            options_until = max((o.sent_at + o.timeout + 1.0 for o in outstanding), default=0.0)
            if (not self.calls or now >= calls_until) and (not outstanding or now >= options_until):
                break
            self.ep.libHandleEvents(10)
        for call in list(self.calls.values()):  # still not DISCONNECTED: give up on them
            call.drop_media()
            _post(
                self.loop,
                self.engine._dispatch,
                call.key,
                CallEvent("disconnected", time.monotonic(), None, "engine closed", cause="engine_closed"),
            )
        self.calls.clear()

    def _destroy(self) -> None:
        accounts = list(self.accounts.values())
        self.accounts.clear()
        self.uas = self.no_media = None
        for acc in accounts:
            with contextlib.suppress(pj.Error):
                acc.shutdown()
        del accounts
        gc.collect()
        if self.ep is not None:
            try:
                self.ep.libDestroy(pj.PJSUA_DESTROY_NO_NETWORK)
            except pj.Error as exc:
                logger.warning("libDestroy: %s", _pj_error(exc))
            self.ep = None
        if self.screen is not None:  # libDestroy has unregistered the module
            self.screen.release()
            self.screen = None
        self.writer = None
        gc.collect()

    # the guard and the hand-over --------------------------------------------------------

    def hand_over(self, dial: Dial, send: Callable[[_Account], T]) -> T:
        """The one function that gives a URI to pjsua2. The guard judges the request URI
        and the outbound proxy first; a refusal is raised and nothing is sent."""
        try:
            for uri in (dial.uri, dial.proxy):
                if uri is not None:
                    self.guard.check(
                        uri,
                        target=dial.target,
                        declared_test_endpoint=dial.declared_test_endpoint,
                        carrier_test_service=dial.carrier_test_service,
                    )
        except GuardRefusal:
            self.refused += 1
            raise
        if dial.proxy is None and not dial.uri.lower().startswith(("sip:", "sips:")):
            raise CallSetupError(f"{dial.uri}: a non-SIP Request-URI (urn:, tel:) needs an outbound proxy")
        account = self.account_for(dial)
        self.sending = dial  # requests leaving now belong to this dial (judge_outbound)
        try:
            return send(account)
        finally:
            self.sending = None

    # remote targets (called by probes.sip_targets, inside pjsip) --------------------------

    def _context(self, call_id: str) -> tuple[str, CarrierTestService | None, Dial | None]:
        dial = self.contexts.get(call_id)
        if dial is None and self.sending is not None and call_id:
            dial = self.sending
            if len(self.contexts) >= 256:  # OPTIONS leave no trace to drop them by
                self.contexts.pop(next(iter(self.contexts)))
            self.contexts[call_id] = dial
        if dial is None:
            return "remote", None, None
        return dial.target, dial.carrier_test_service, dial

    def _judge(
        self, uri: str, call_id: str, where: str, status: int | None, *, sip_only: bool = True
    ) -> RemoteRefusal | None:
        """The guard's verdict on one URI; with ``sip_only`` (a Contact, Record-Route or
        Route: what pjsip routes by) anything but a sip:/sips: URI is refused as well,
        even where the guard allows it — pjsip cannot send to it and asserts."""
        target, carrier, _ = self._context(call_id)
        if (uri, target, carrier) in self.passed and (not sip_only or is_sip_uri(uri)):
            return None
        known = self.verdicts.get((call_id, uri))
        if known is not None:  # a retransmission: judged, logged and counted once
            return known
        try:
            self.guard.check_remote_target(uri, target=target, carrier_test_service=carrier)
            if sip_only and not is_sip_uri(uri):
                logger.warning("refused %s in the %s: not a sip: or sips: URI", uri[:200], where)
                raise GuardRefusal(uri, "unsupported_uri", f"the {where} is not a sip: or sips: URI")
        except GuardRefusal as refusal:
            self.refused += 1
            verdict = RemoteRefusal(refusal.uri, refusal.reason, refusal.detail, where, status)
            if len(self.verdicts) >= 1024:
                self.verdicts.clear()
            self.verdicts[(call_id, uri)] = verdict
            return verdict
        if len(self.passed) >= 1024:
            self.passed.clear()
        self.passed[(uri, target, carrier)] = None
        return None

    def judge_inbound(self, msg: Inbound) -> bool:
        """A Contact that would become a remote target, or a Record-Route entry that would
        join the route set: True refuses the message (the screen drops it, or answers a
        request 403) and the call is ended."""
        for where, uri in msg.targets():
            verdict = self._judge(uri, msg.call_id, where, msg.status)
            if verdict is not None:
                provisional = not msg.request and msg.method == "INVITE" and (msg.status or 0) < 200
                self._queue_end(msg.call_id, verdict, provisional=provisional)
                return True
        return False

    def judge_outbound(self, msg: Outbound) -> bool:
        """Every request about to be sent (its Request-URI and each Route URI): True
        refuses to send it."""
        verdict = None
        for where, uri in msg.targets():
            verdict = self._judge(uri, msg.call_id, where, None, sip_only=where != msg.where)
            if verdict is not None:
                break
        if verdict is None:
            return False
        logger.error(
            "not sending %s (Call-ID %s): its %s was refused by the guard",
            msg.method,
            msg.call_id,
            verdict.where.partition(" of ")[0],
            extra={"guard_reason": verdict.reason},
        )
        self._queue_end(msg.call_id, verdict, provisional=False)
        return True

    def _queue_end(self, call_id: str, verdict: RemoteRefusal, *, provisional: bool) -> None:
        if call_id and not any(c == call_id for c, _, _ in self.to_end):
            self.to_end.append((call_id, verdict, provisional))

    def end_refused(self) -> None:
        """End the calls whose remote target was refused, without sending to it: the
        dialog's target never changed (the screen dropped the message), and nothing is
        sent in the dialog at all — except the CANCEL of a call not yet answered that
        has had a provisional response, which goes to the INVITE's own Request-URI."""
        while self.to_end:
            call_id, verdict, provisional = self.to_end.popleft()
            call = next((c for c in self.calls.values() if c.sip_call_id == call_id), None)
            if call is None or call.released:
                continue
            if call.refusal is None:
                call.refusal = verdict
            call.cause_hint = "guard_refused"
            logger.warning(
                "ending call %d: the far end's %s was refused by the guard", call.key, verdict.where
            )
            if provisional and call.outgoing and not call.confirmed and not call.hung_up and call.responses:
                self.hangup(call, None, None)  # CANCEL (pjsua waits for a 1xx if none came)
            else:
                self._end_locally(call)

    def _end_locally(self, call: _Call) -> None:
        """``pjsip_inv_terminate``: the session is DISCONNECTED at once and nothing is sent
        (no ACK, BYE or CANCEL); pjsua itself uses it to give up on a call."""
        call.hung_up = True
        clib = _clib()  # signatures set by probes.sip_targets
        pcall, dlg = ctypes.c_void_p(), ctypes.c_void_p()
        status = clib.acquire_call(
            b"ecpm end_refused", int(call.getId()), ctypes.byref(pcall), ctypes.byref(dlg)
        )
        if status != 0 or not dlg.value:
            logger.warning("call %d: no dialog to end (pj status %s)", call.key, status)
            return
        try:
            inv = clib.pjsip_dlg_get_inv_session(dlg)
            if inv:
                clib.pjsip_inv_terminate(inv, 403, 1)
        finally:
            clib.pjsip_dlg_dec_lock(dlg)

    # calls (UAC) -------------------------------------------------------------------

    def _slots_free(self) -> bool:
        return int(_clib().pjsua_call_get_count()) < self.settings.max_calls

    def _admit(self) -> None:
        now = time.monotonic()
        while self.pending_options and now >= self.next_start:
            opt = self.pending_options.popleft()
            if opt.cancelled:
                continue
            self.next_start = now + 1.0 / self.settings.max_call_rate
            self._send_options(opt)
        while self.pending_calls:
            req = self.pending_calls[0]
            if req.cancelled:
                self.pending_calls.popleft()
                continue
            if now >= req.deadline:
                self.pending_calls.popleft()
                _post(
                    self.loop,
                    _reject,
                    req.fut,
                    NoCallSlot(
                        f"no call slot free for {req.deadline - req.queued_at:.0f} s "
                        f"({self.settings.max_calls} per process; slots stay held until the INVITE "
                        "transaction ends)"
                    ),
                )
                continue
            if now < self.next_start or not self._slots_free():
                break
            self.pending_calls.popleft()
            self.next_start = now + 1.0 / self.settings.max_call_rate
            self._place(req)

    def _place(self, req: _PendingCall) -> None:
        opts = req.options

        def send(acc: _Account) -> float:
            call = _Call(
                self,
                acc,
                req.key,
                call_id=pj.PJSUA_INVALID_ID,
                outgoing=True,
                deadline=time.monotonic() + opts.max_duration,
            )
            call.want.tone_hz = opts.tone_hz
            call.want.record = opts.record
            prm = pj.CallOpParam(True)
            prm.opt.audioCount = 1
            prm.opt.videoCount = 0
            _add_headers(prm.txOption, opts.headers)
            _add_parts(prm.txOption, opts.parts)
            started = time.monotonic()
            _set_tsx_timeout(opts.first_response_timeout)
            try:
                call.makeCall(req.dial.uri, prm)
            except pj.Error as exc:
                if not call.released:
                    acc.calls -= 1
                raise CallSetupError(
                    f"cannot call {req.dial.uri}: {_pj_error(exc)}", status=getattr(exc, "status", None)
                ) from None
            finally:
                _set_tsx_timeout(self.td)
            if call.released:  # disconnected inside makeCall (a send that failed at once)
                return started
            call.sip_call_id = str(call.getInfo().callIdString)
            self.contexts[call.sip_call_id] = req.dial
            self.calls[req.key] = call
            self.placed += 1
            if req.cancelled:  # the caller gave up while we were placing it
                self.hangup(call, None, None)
            return started

        try:
            started = self.hand_over(req.dial, send)
        except GuardRefusal as refusal:
            _post(self.loop, _reject, req.fut, GuardRefusal(refusal.uri, refusal.reason, refusal.detail))
        except SipError as exc:
            _post(self.loop, _reject, req.fut, type(exc)(str(exc)))
        except pj.Error as exc:
            _post(self.loop, _reject, req.fut, CallSetupError(_pj_error(exc)))
        else:
            _post(self.loop, _resolve, req.fut, started)

    def emit(self, call: _Call, event: CallEvent) -> None:
        _post(self.loop, self.engine._dispatch, call.key, event)

    def release(self, call: _Call, event: CallEvent) -> None:
        """DISCONNECTED: destroy the call's media, drop the wrapper, tell asyncio."""
        if call.released:
            return
        call.released = True
        call.drop_media()
        call.account.calls -= 1
        self.calls.pop(call.key, None)
        self.contexts.pop(call.sip_call_id, None)
        self.emit(call, event)

    def _enforce_limits(self) -> None:
        if not self.calls:
            return
        now = time.monotonic()
        for call in list(self.calls.values()):
            if now >= call.deadline and not call.hung_up:
                logger.warning("call %d reached its hard maximum duration: hanging up", call.key)
                call.cause_hint = "max_duration"
                self.hangup(call, None, None)

    def hangup(self, call: _Call, status: int | None, reason: str | None) -> None:
        call.hung_up = True
        prm = pj.CallOpParam()
        if status is not None:
            prm.statusCode = status
        if reason:
            prm.reason = reason
        try:
            call.hangup(prm)
        except pj.Error as exc:
            logger.debug("hangup of call %d: %s", call.key, _pj_error(exc))

    # calls (UAS) --------------------------------------------------------------------

    def incoming_account_id(self) -> int:
        acc = self.uas if self.incoming_media or self.no_media is None else self.no_media
        return int(acc.getId()) if acc is not None else -1

    def on_incoming(self, acc: _Account, prm: Any) -> None:
        key = self.engine.new_key()
        call = _Call(self, acc, key, call_id=prm.callId, outgoing=False, deadline=time.monotonic() + 3600.0)
        call.sip_call_id = str(call.getInfo().callIdString)
        self.calls[key] = call
        self.incoming += 1
        if self.closing or not self.accepting:
            call.cause_hint = "local"
            self.hangup(call, 503 if self.closing else 480, None)
            return
        rdata = prm.rdata
        request = IncomingRequest(str(rdata.wholeMsg)[:MAX_MESSAGE], str(rdata.srcAddress), time.monotonic())
        _post(self.loop, self.engine._incoming, key, request)

    def answer(
        self,
        key: int,
        status: int,
        reason: str | None,
        *,
        headers: tuple[tuple[str, str], ...],
        parts: tuple[Part, ...],
        max_duration: float | None,
    ) -> bool:
        call = self.calls.get(key)
        if call is None:
            return False
        prm = pj.CallOpParam()
        prm.statusCode = status
        if reason:
            prm.reason = reason
        _add_headers(prm.txOption, headers)
        _add_parts(prm.txOption, parts)
        if status >= 300:
            call.hung_up = True
        if max_duration is not None:
            call.deadline = time.monotonic() + max_duration
        call.answer(prm)
        return True

    # OPTIONS --------------------------------------------------------------------------

    def _send_options(self, opt: _PendingOptions) -> None:
        tag = next(self.tags)

        def send(acc: _Account) -> None:
            sp = pj.SendRequestParam()
            sp.method = "OPTIONS"
            sp.txOption.targetUri = opt.dial.uri
            _add_headers(sp.txOption, (*opt.headers, (REQUEST_TAG, str(tag))))
            _set_tsx_timeout(opt.timeout)
            try:
                opt.sent_at = time.monotonic()
                acc.sendRequest(sp)
            except pj.Error as exc:
                raise CallSetupError(f"cannot send OPTIONS to {opt.dial.uri}: {_pj_error(exc)}") from None
            finally:
                _set_tsx_timeout(self.td)
            acc.options[tag] = opt
            self.options_sent += 1

        try:
            self.hand_over(opt.dial, send)
        except GuardRefusal as refusal:
            _post(self.loop, _reject, opt.fut, GuardRefusal(refusal.uri, refusal.reason, refusal.detail))
        except SipError as exc:
            _post(self.loop, _reject, opt.fut, type(exc)(str(exc)))
        except pj.Error as exc:
            _post(self.loop, _reject, opt.fut, CallSetupError(_pj_error(exc)))

    def on_request_done(self, acc: _Account, prm: Any) -> None:
        e = prm.e
        if e.type != pj.PJSIP_EVENT_TSX_STATE:
            return
        ts = e.body.tsxState
        tsx = ts.tsx
        status = int(tsx.statusCode)
        if status < 200:
            return
        tag = _request_tag(str(tsx.lastTx.wholeMsg)) if tsx.lastTx is not None else None
        opt = acc.options.pop(tag, None) if tag is not None else None
        if opt is None:
            return
        from_network = ts.type == pj.PJSIP_EVENT_RX_MSG
        message = str(ts.src.rdata.wholeMsg)[:MAX_MESSAGE] if from_network else None
        reply = OptionsReply(
            status, str(tsx.statusText), from_network, opt.sent_at, time.monotonic(), message
        )
        _post(self.loop, _resolve, opt.fut, reply)


def _request_tag(text: str) -> int | None:
    marker = REQUEST_TAG.lower() + ":"
    for line in text.split("\r\n"):
        if line.lower().startswith(marker):
            value = line.split(":", 1)[1].strip()
            return int(value) if value.isdigit() else None
    return None


def _uri_host(uri: str) -> str | None:
    scheme, sep, rest = uri.partition(":")
    if not sep or scheme.lower() not in ("sip", "sips"):
        return None
    rest = rest.split(";", 1)[0].split("?", 1)[0]
    host = rest.rpartition("@")[2]
    if host.startswith("["):
        return host[: host.find("]") + 1] if "]" in host else None
    return host.split(":", 1)[0] or None


def _add_headers(tx: Any, headers: tuple[tuple[str, str], ...]) -> None:
    for name, value in headers:
        h = pj.SipHeader()
        h.hName = name
        h.hValue = value
        tx.headers.append(h)


def _add_parts(tx: Any, parts: tuple[Part, ...]) -> None:
    if not parts:
        return
    tx.multipartContentType.type = "multipart"
    tx.multipartContentType.subType = "mixed"
    for part in parts:
        p = pj.SipMultipartPart()
        main, _, sub = part.content_type.partition("/")
        p.contentType.type = main
        p.contentType.subType = sub
        p.body = part.body
        _add_headers(p, part.headers)
        tx.multipartParts.append(p)


# ------------------------------------------------------------------ asyncio side


class CallHandle:
    """A call as asyncio sees it: events in order, and operations that run in the
    pjsua2 thread. Holds no pjsua2 object; safe to keep after the call ended."""

    def __init__(self, engine: SipEngine, key: int) -> None:
        self._engine = engine
        self.key = key
        self._events: asyncio.Queue[CallEvent] = asyncio.Queue()
        self._ended = asyncio.Event()
        self.disconnected: CallEvent | None = None
        self._recording: Path | None = None

    def _deliver(self, event: CallEvent) -> None:
        if self.disconnected is not None:
            return
        if event.kind == "disconnected":
            self.disconnected = event
            self._ended.set()
        self._events.put_nowait(event)

    @property
    def ended(self) -> bool:
        return self.disconnected is not None

    async def next_event(self, timeout: float | None = None) -> CallEvent | None:  # noqa: ASYNC109
        """The next event, or None when ``timeout`` passes first."""
        if timeout is not None and timeout <= 0:
            return self._events.get_nowait() if not self._events.empty() else None
        try:
            return await asyncio.wait_for(self._events.get(), timeout)
        except TimeoutError:
            return None

    async def wait_ended(self, timeout: float | None = None) -> CallEvent | None:  # noqa: ASYNC109
        try:
            await asyncio.wait_for(self._ended.wait(), timeout)
        except TimeoutError:
            return None
        return self.disconnected

    async def hangup(self, status: int | None = None, reason: str | None = None) -> None:
        """BYE, CANCEL, or a final response (``status``) to an unanswered incoming call."""
        if self.ended:
            return

        def op(core: _Core) -> None:
            call = core.calls.get(self.key)
            if call is not None and not call.hung_up:
                core.hangup(call, status, reason)

        await self._engine._run(op)

    async def _media(self, change: Callable[[_MediaWish], None]) -> bool:
        if self.ended:
            return False

        def op(core: _Core) -> bool:
            call = core.calls.get(self.key)
            if call is None:
                return False
            change(call.want)
            call.apply_media()
            return call.media_active

        return await self._engine._run(op)

    async def play_tone(self, hz: float | None) -> bool:
        """Send a continuous tone (None stops it); True when media is up already."""

        def change(w: _MediaWish) -> None:
            w.tone_hz = hz

        return await self._media(change)

    async def echo(self, on: bool) -> bool:
        """Return what we receive to the sender (conference bridge loop)."""

        def change(w: _MediaWish) -> None:
            w.echo = on

        return await self._media(change)

    async def record(self, path: Path | None, *, finalise_timeout: float = 1.0) -> bool:
        """Record what we receive into ``path`` (WAV). None stops recording and waits
        (up to ``finalise_timeout``) until the file is complete; returns whether it is."""
        if path is not None:
            self._recording = path

            def start(w: _MediaWish) -> None:
                w.record = path

            return await self._media(start)
        current: list[Path | None] = []

        def op(core: _Core) -> None:
            call = core.calls.get(self.key)
            if call is not None:
                current.append(call.recording)
                call.want.record = None
                call.apply_media()

        if not self.ended:
            await self._engine._run(op)
        done = current[0] if current else self._recording
        if done is None:
            return False
        deadline = time.monotonic() + finalise_timeout
        while not wav_complete(done):
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.01)
        return True

    async def play_file(self, path: Path | None) -> bool:
        """Play a WAV file once into the call (stops our tone while it plays)."""

        def change(w: _MediaWish) -> None:
            w.play = path

        return await self._media(change)

    async def stats(self) -> RtpStats | None:
        """RTP/RTCP figures now; None when no audio stream is active."""
        if self.ended:
            return None

        def op(core: _Core) -> RtpStats | None:
            call = core.calls.get(self.key)
            return None if call is None else call.stats()

        return await self._engine._run(op)

    async def __aenter__(self) -> CallHandle:
        return self

    async def __aexit__(self, *exc: object) -> None:
        """Never leave a call up: hang up on the way out, even when cancelled."""
        if not self.ended:
            with contextlib.suppress(EngineClosed, asyncio.CancelledError):
                await asyncio.shield(self.hangup())


class OutgoingCall(CallHandle):
    """An INVITE we sent. ``started_at``: when ``makeCall`` ran (after any wait for a
    slot or the rate limit, which ``waited`` says)."""

    started_at: float = 0.0
    waited: float = 0.0


class IncomingCall(CallHandle):
    """An INVITE we received (the responder's side)."""

    def __init__(self, engine: SipEngine, key: int, request: IncomingRequest) -> None:
        super().__init__(engine, key)
        self.request = request

    async def ring(self, status: int = 180) -> bool:
        return await self.answer(status)

    async def answer(
        self,
        status: int = 200,
        reason: str | None = None,
        *,
        headers: tuple[tuple[str, str], ...] = (),
        parts: tuple[Part, ...] = (),
        max_duration: float | None = None,
    ) -> bool:
        """Send a response: 18x, 200 (with extra body parts next to the SDP), or a
        final error. False when the call has already ended."""
        if self.ended:
            return False
        return await self._engine._run(
            lambda core: core.answer(
                self.key, status, reason, headers=headers, parts=parts, max_duration=max_duration
            )
        )

    async def reject(self, status: int, reason: str | None = None) -> bool:
        return await self.answer(status, reason)


IncomingHandler = Callable[[IncomingCall], Awaitable[None]]


class SipEngine:
    """One pjsua2 endpoint in its own thread, for checks (UAC) and the responder (UAS).

    ``transaction_timeout`` is pjsip's TD for transactions that do not set their own
    (BYE, CANCEL, the responder's): how long a final response is absorbed and a
    held call slot stays taken. ``poll_interval`` is the longest a queued operation
    waits for the pjsua2 thread when nothing else happens (SIP input wakes it at once).
    ``slot_wait`` is how long :meth:`call` waits for a free call slot (NoCallSlot after).
    """

    def __init__(
        self,
        settings: SipSettings,
        guard: Guard,
        *,
        transaction_timeout: float = DEFAULT_TRANSACTION_TIMEOUT,
        poll_interval: float = 0.01,
        slot_wait: float = SLOT_WAIT,
    ) -> None:
        self.settings = settings
        self._slot_wait = slot_wait
        self.guard = guard
        self._transaction_timeout = transaction_timeout
        self._poll = poll_interval
        self._core: _Core | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._handles: dict[int, CallHandle] = {}
        self._keys = itertools.count(1)
        self._keys_lock = threading.Lock()
        self._handler: IncomingHandler | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._stopped: asyncio.Future[None] | None = None

    # lifecycle ------------------------------------------------------------------------

    async def __aenter__(self) -> SipEngine:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def start(self) -> None:
        if self._core is not None:
            raise SipError("this SIP engine is already started")
        with _ProcessSlot.lock:
            if _ProcessSlot.engine is not None:
                raise SipError("a SIP engine is already running in this process (one pjsua2 endpoint)")
            _ProcessSlot.engine = self
        loop = asyncio.get_running_loop()
        self._loop = loop
        ready: asyncio.Future[BaseException | None] = loop.create_future()
        stopped: asyncio.Future[None] = loop.create_future()
        self._stopped = stopped
        core = _Core(
            self.settings,
            self.guard,
            loop,
            self,
            transaction_timeout=self._transaction_timeout,
            poll_interval=self._poll,
        )

        def body() -> None:
            try:
                core.run(lambda err: _post(loop, _resolve, ready, err))
            finally:
                _post(loop, _resolve, stopped, None)

        thread = threading.Thread(target=body, name="pjsua2", daemon=True)
        self._core, self._thread = core, thread
        thread.start()
        error = await ready
        if error is not None:
            await asyncio.to_thread(thread.join)
            self._forget()
            raise error
        atexit.register(self._atexit)
        logger.debug("SIP engine listening on %s", ", ".join(f"{k} {v}" for k, v in core.local.items()))

    async def aclose(self) -> None:
        """Hang up every call, wait for the library to be destroyed, stop the thread."""
        core, thread = self._core, self._thread
        if core is None or thread is None:
            return
        core.stopping = True
        if self._stopped is not None:
            await asyncio.shield(self._stopped)
        await asyncio.to_thread(thread.join)
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        for handle in list(self._handles.values()):
            handle._deliver(
                CallEvent("disconnected", time.monotonic(), None, "engine closed", cause="engine_closed")
            )
        self._handles.clear()
        atexit.unregister(self._atexit)
        self._forget()

    def _forget(self) -> None:
        self._core = None
        self._thread = None
        with _ProcessSlot.lock:
            if _ProcessSlot.engine is self:
                _ProcessSlot.engine = None

    def _atexit(self) -> None:  # the interpreter is exiting with the engine still up
        core, thread = self._core, self._thread
        if core is not None and thread is not None and thread.is_alive():
            core.stopping = True
            thread.join(timeout=30)

    # properties --------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._core is not None and not self._core.stopping

    @property
    def local_addresses(self) -> dict[str, str]:
        """Transport -> "host:port" we listen on."""
        return dict(self._core.local) if self._core is not None else {}

    def stats(self) -> EngineStats:
        core = self._core
        if core is None:
            return EngineStats(0, 0, 0, 0, 0, 0, 0)
        try:
            in_use = int(_clib().pjsua_call_get_count())
        except (OSError, AttributeError):
            in_use = len(core.calls)
        return EngineStats(
            calls_active=len(core.calls),
            slots_in_use=in_use,
            calls_waiting=len(core.pending_calls),
            calls_placed_total=core.placed,
            calls_incoming_total=core.incoming,
            refused_total=core.refused,
            options_total=core.options_sent,
        )

    # plumbing ------------------------------------------------------------------------

    def new_key(self) -> int:
        with self._keys_lock:
            return next(self._keys)

    def _require(self) -> tuple[_Core, asyncio.AbstractEventLoop]:
        core, loop = self._core, self._loop
        if core is None or loop is None or core.stopping or core.closing:
            raise EngineClosed("the SIP engine is not running")
        return core, loop

    async def _run(self, op: Callable[[_Core], T]) -> T:
        core, loop = self._require()
        fut: asyncio.Future[T] = loop.create_future()
        core.submit(lambda: op(core), fut)
        return await fut

    def _dispatch(self, key: int, event: CallEvent) -> None:
        handle = self._handles.get(key)
        if handle is None:
            return
        handle._deliver(event)
        if event.kind == "disconnected":
            self._handles.pop(key, None)

    def _incoming(self, key: int, request: IncomingRequest) -> None:
        handler = self._handler
        handle = IncomingCall(self, key, request)
        self._handles[key] = handle
        task = asyncio.ensure_future(self._serve_one(handler, handle))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve_one(self, handler: IncomingHandler | None, handle: IncomingCall) -> None:
        try:
            async with handle:
                if handler is None:  # no longer serving
                    await handle.reject(480)
                else:
                    await handler(handle)
        except EngineClosed:
            pass
        except Exception:
            logger.exception("incoming call handler failed (a bug in ecpm)")

    # public operations -----------------------------------------------------------------

    async def call(self, dial: Dial, options: CallOptions | None = None) -> OutgoingCall:
        """Place an INVITE. Waits for a call slot and the rate limit, runs the guard
        and starts the call; events then arrive on the returned handle.

        Raises GuardRefusal (nothing sent), CallSetupError, NoCallSlot, EngineClosed.
        """
        core, loop = self._require()
        opts = options or CallOptions()
        key = self.new_key()
        handle = OutgoingCall(self, key)
        handle._recording = opts.record
        self._handles[key] = handle
        now = time.monotonic()
        fut: asyncio.Future[float] = loop.create_future()
        req = _PendingCall(key, dial, opts, fut, now, now + self._slot_wait)
        core.queue(lambda: core.pending_calls.append(req), fut)
        try:
            started = await fut
        except BaseException:
            req.cancelled = True
            self._handles.pop(key, None)

            def drop() -> None:  # placed just as we gave up: hang it up
                call = core.calls.get(key)
                if call is not None and not call.hung_up:
                    core.hangup(call, None, None)

            core.queue(drop, None)
            raise
        handle.started_at = started
        handle.waited = started - now
        return handle

    async def options(
        self,
        dial: Dial,
        *,
        timeout: float,  # noqa: ASYNC109 - pjsip's own transaction timeout, not an asyncio one
        headers: tuple[tuple[str, str], ...] = (),
    ) -> OptionsReply:
        """Send one OPTIONS and wait for its final response (pjsip answers 408 itself
        after ``timeout``). Raises GuardRefusal (nothing sent), CallSetupError, EngineClosed."""
        core, loop = self._require()
        fut: asyncio.Future[OptionsReply] = loop.create_future()
        opt = _PendingOptions(dial, timeout, headers, fut, time.monotonic())
        core.queue(lambda: core.pending_options.append(opt), fut)
        try:
            return await fut
        except BaseException:
            opt.cancelled = True
            raise

    def serve(self, handler: IncomingHandler | None) -> None:
        """Hand every incoming INVITE to ``handler`` (a task per call; the call is
        hung up when it returns). None stops serving: new calls get 480."""
        core, _ = self._require()
        self._handler = handler
        core.accepting = handler is not None

    def set_incoming_media(self, enabled: bool) -> None:
        """False: answer new calls with a normal SDP but no RTP socket behind it
        (pjmedia's loop transport), the "no media" fault of the responder."""
        core, _ = self._require()
        core.incoming_media = enabled


__all__ = [
    "CallEvent",
    "CallHandle",
    "CallOptions",
    "CallSetupError",
    "Dial",
    "EngineClosed",
    "EngineStats",
    "IncomingCall",
    "IncomingRequest",
    "NoCallSlot",
    "OptionsReply",
    "OutgoingCall",
    "Part",
    "RemoteRefusal",
    "RtpStats",
    "SipEngine",
    "SipError",
]
