"""The pjsua2 thread: everything that runs in it, and the engine's lifecycle.

One thread owns pjsua2 (see probes.sip). :class:`Core` is created for one run of the
engine, in state STARTING, and moves through :class:`EngineState` as :data:`NEXT`
allows; :meth:`Core.move` is the one place a state changes.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import enum
import gc
import ipaddress
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final, TypeVar

import pjsua2 as pj

from probes.config import SipSettings
from probes.guard import Guard
from probes.sip.bridge import CLOCK_RATE
from probes.sip.calls import (
    Account,
    Call,
    PendingCall,
    PendingOptions,
    PendingRegister,
    RegisterAttempt,
    RegisteredAccount,
)
from probes.sip.crossing import fail, post, reject, resolve
from probes.sip.errors import CallSetupError, EngineClosed, NoCallSlot, SipError
from probes.sip.native import (
    REQUEST_TAG,
    LogWriter,
    add_headers,
    add_parts,
    callback,
    clib,
    disable_tcp_switch,
    host_literal,
    pj_error,
    request_tag,
    set_tsx_timeout,
    uri_host,
)
from probes.sip.safety import Gate
from probes.sip.values import (
    MAX_MESSAGE,
    CallEvent,
    Dial,
    IncomingRequest,
    OptionsReply,
    Part,
    Registration,
    Renewal,
    TlsState,
)
from probes.sip_targets import LayoutError, Outbound, Screen

if TYPE_CHECKING:
    from probes.sip.engine import SipEngine

logger = logging.getLogger(__name__)

T = TypeVar("T")

BATCH: Final = 8  # closures run per loop turn (an unbounded burst caused retransmits)
SHUTDOWN_CALL_WAIT: Final = 2.0  # hang-ups at shutdown: wait this long for DISCONNECTED
REGISTER_RETRY: Final = 30  # s: pjsua registers again this long after a registration failed


class EngineState(enum.Enum):
    UNOPENED = "unopened"  # not started (the engine has no Core yet)
    STARTING = "starting"  # the thread is creating the library; work may be queued
    RUNNING = "running"  # the thread loops: queued work, admission, limits, pjsip events
    STOPPING = "stopping"  # asked to stop: the loop ends after its turn; no new work
    CLOSING = "closing"  # hanging up, waiting for DISCONNECTED; incoming calls get 503
    CLOSED = "closed"  # library destroyed; anything queued fails with EngineClosed


NEXT: Final[dict[EngineState, frozenset[EngineState]]] = {
    EngineState.UNOPENED: frozenset({EngineState.STARTING}),
    # a failed start closes at once; a stop may come before the thread is up
    EngineState.STARTING: frozenset({EngineState.RUNNING, EngineState.STOPPING, EngineState.CLOSED}),
    # CLOSING straight from RUNNING: the loop died of an error in pjsip
    EngineState.RUNNING: frozenset({EngineState.STOPPING, EngineState.CLOSING}),
    # CLOSED straight from STOPPING: a start that failed after a stop was asked
    EngineState.STOPPING: frozenset({EngineState.CLOSING, EngineState.CLOSED}),
    EngineState.CLOSING: frozenset({EngineState.CLOSED}),
    EngineState.CLOSED: frozenset(),
}


SRTP_USE: Final[dict[str, int]] = {
    "off": pj.PJMEDIA_SRTP_DISABLED,
    "optional": pj.PJMEDIA_SRTP_OPTIONAL,
    "mandatory": pj.PJMEDIA_SRTP_MANDATORY,
}


def set_srtp(media: Any, srtp: str) -> None:
    """SDES-SRTP (RFC 4568) on an account's media. Keys go in the SDP whatever the
    signalling transport (``srtpSecureSignaling`` 0): a test call's keys protect nothing
    secret, and refusing them over UDP would make SRTP untestable without TLS."""
    media.srtpUse = SRTP_USE[srtp]
    media.srtpSecureSignaling = 0


class Endpoint(pj.Endpoint):  # type: ignore[misc]
    def __init__(self, core: Core) -> None:
        super().__init__()
        self._core = core

    @callback
    def onSelectAccount(self, prm: Any) -> None:
        prm.accountIndex = self._core.incoming_account_id()

    @callback
    def onTransportState(self, prm: Any) -> None:
        state = tls_state(prm.tlsInfo)
        if state is not None:
            post(self._core.loop, self._core.engine._tls_seen, state)


# the newest first: pjsip reports the negotiated version as one bit of its protocol mask
_TLS_VERSIONS: Final = (
    (pj.PJ_SSL_SOCK_PROTO_TLS1_3, "TLSv1.3"),
    (pj.PJ_SSL_SOCK_PROTO_TLS1_2, "TLSv1.2"),
    (pj.PJ_SSL_SOCK_PROTO_TLS1_1, "TLSv1.1"),
    (pj.PJ_SSL_SOCK_PROTO_TLS1, "TLSv1"),
    (pj.PJ_SSL_SOCK_PROTO_SSL3, "SSLv3"),
)


def tls_state(info: Any) -> TlsState | None:
    """A transport's TLS figures (None for a transport that is not TLS)."""
    if info is None or info.isEmpty():
        return None
    proto = int(info.protocol)
    version = next((name for bit, name in _TLS_VERSIONS if proto & bit), "unknown")
    status = int(info.verifyStatus)
    messages = "; ".join(str(m) for m in info.verifyMsgs)[:256]
    cert = info.remoteCertInfo
    return TlsState(
        remote=str(info.remoteAddr),
        established=bool(info.established),
        protocol=version,
        cipher=str(info.cipherName)[:64],
        verified=status == pj.PJ_SSL_CERT_ESUCCESS,
        verify="ok" if status == pj.PJ_SSL_CERT_ESUCCESS else messages or f"verify status {status:#x}",
        peer="" if cert.isEmpty() else str(cert.subjectCn)[:128],
    )


class Core:
    """Everything that runs in the pjsua2 thread. Only ``queue``/``submit``, ``move``
    and the flag setters are called from other threads."""

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
        self.loop = loop
        self.engine = engine
        self.td = transaction_timeout
        self.poll_ms = max(1, round(poll_interval * 1000))
        self.commands: deque[tuple[Callable[[], None], asyncio.Future[Any] | None]] = deque()
        self.lock = threading.RLock()
        self.state = EngineState.STARTING
        self.pending_calls: deque[PendingCall] = deque()
        self.pending_options: deque[PendingOptions] = deque()
        self.incoming_media = True
        self.accepting = False
        self.ep: Any = None
        self.writer: Any = None
        self.calls: dict[int, Call] = {}
        self.accounts: dict[tuple[str, ...], Account] = {}
        self.uas: Account | None = None
        self.no_media: Account | None = None
        self.plain: Account | None = None  # answers SRTP offers with plain RTP (incoming_srtp False)
        self.incoming_srtp = True
        self.local: dict[str, str] = {}
        self.transport_ids: dict[str, int] = {}
        self.next_start = 0.0
        self.tags = itertools.count(1)
        self.placed = self.incoming = self.options_sent = 0
        self.gate = Gate(guard)
        self.screen: Screen | None = None  # probes.sip_targets: hands remote targets to the gate
        self.gate.registers = self._register_sent
        self.registering: RegisteredAccount | None = None  # whose REGISTER is being sent now

    # lifecycle --------------------------------------------------------------------

    def move(self, to: EngineState) -> bool:
        """Go to state ``to`` if :data:`NEXT` allows it from the current one (any thread).
        A move it does not allow is ignored: a second stop, a stop after the end."""
        with self.lock:
            if to not in NEXT[self.state]:
                return False
            self.state = to
            return True

    @property
    def open(self) -> bool:
        """Taking new work: calls, OPTIONS, operations on calls."""
        return self.state in (EngineState.STARTING, EngineState.RUNNING)

    # thread entry ----------------------------------------------------------------

    def run(self, ready: Callable[[BaseException | None], None]) -> None:
        try:
            self._init()
        except Exception as exc:
            message = str(exc) if isinstance(exc, SipError) else pj_error(exc)
            try:
                self._destroy()
            finally:
                self._close()
            ready(SipError(f"cannot start the SIP engine: {message}"))
            return
        self.move(EngineState.RUNNING)  # unless a stop came first
        ready(None)
        try:
            while self.state is EngineState.RUNNING:
                self.turn()
        finally:
            try:
                self._wind_down()
                self._destroy()
            finally:
                self._close()

    def _close(self) -> None:
        with self.lock:
            self.move(EngineState.CLOSED)
            leftovers = list(self.commands)
            self.commands.clear()
        for _, fut in leftovers:
            if fut is not None:
                post(self.loop, reject, fut, EngineClosed("the SIP engine has stopped"))

    def turn(self) -> None:
        if self.gate.to_end:
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
        """Run one step and keep the pjsua2 thread (and every other call) alive: an error
        fails its caller (``fut``), or is logged as the bug it is when nobody waits."""
        try:
            fn()
        except Exception as exc:
            if fut is None:
                logger.exception("error in the pjsua2 thread (a bug in ecpm)")
            else:
                fail(self.loop, fut, exc)

    def submit(self, fn: Callable[[], T], fut: asyncio.Future[T]) -> None:
        """Queue ``fn`` for the pjsua2 thread; its value (or error) resolves ``fut``."""
        self.queue(lambda: post(self.loop, resolve, fut, fn()), fut)

    def queue(self, fn: Callable[[], None], fut: asyncio.Future[Any] | None) -> None:
        """Queue a closure for the pjsua2 thread (any thread may call this)."""
        with self.lock:
            if self.state is not EngineState.CLOSED:
                self.commands.append((fn, fut))
                return
        if fut is not None:
            post(self.loop, reject, fut, EngineClosed("the SIP engine has stopped"))

    # start and stop ------------------------------------------------------------------

    def _init(self) -> None:
        s = self.settings
        if ipaddress.ip_address(s.bind).version == 6:
            # The wheel is built without IPv6 (PJ_HAS_IPV6 0): pjsua_acc_add would abort
            # the process on an IPv6 account, so refuse here with words instead.
            raise SipError(f"bind {s.bind}: this pjsua2 build has no IPv6 support; bind an IPv4 address")
        clib().pj_log_set_level(0)  # nothing on stdout before our writer is installed
        self.ep = Endpoint(self)
        self.ep.libCreate()
        cfg = pj.EpConfig()
        ua = cfg.uaConfig
        ua.threadCnt = 0
        ua.mainThreadOnly = True
        ua.maxCalls = s.max_calls
        ua.userAgent = s.user_agent
        self.writer = LogWriter()
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
        set_tsx_timeout(self.td)
        disable_tcp_switch(self.td)
        self.uas = self._new_account(("uas",), "ecpm", default=True)
        self.no_media = self._new_account(("no-media",), "ecpm-no-media", loop_media=True)
        self.plain = self._new_account(("plain",), "ecpm-plain", plain=True)

    def _screen(self) -> None:
        try:
            screen = Screen(clib(), inbound=self.gate.judge_inbound, outbound=self.gate.judge_outbound)
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
        plain: bool = False,
        dial: Dial | None = None,
    ) -> Account:
        """An account: a caller's (``dial``: its proxy, credentials, transport and SRTP), or
        one that answers: SRTP when offered (RFC 4568 SDES), plain RTP only with ``plain``."""
        s = self.settings
        acc = Account(self, "/".join(key))
        cfg = pj.AccountConfig()
        domain = host_literal(s.bind)
        if dial is not None and dial.auth is not None:
            domain = uri_host(dial.proxy or dial.uri) or domain
        cfg.idUri = f"sip:{user}@{domain}"
        cfg.regConfig.registerOnAdd = False
        cfg.callConfig.timerUse = pj.PJSUA_SIP_TIMER_INACTIVE
        mt = cfg.mediaConfig.transportConfig
        mt.boundAddress = s.bind
        mt.port = 0  # a random free RTP port per call
        if loop_media:
            cfg.mediaConfig.useLoopMedTp = True  # SDP as usual, no RTP socket at all
            cfg.mediaConfig.enableLoopback = False
        set_srtp(cfg.mediaConfig, dial.srtp if dial is not None else "off" if plain else "optional")
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

    def account_for(self, dial: Dial) -> Account:
        if dial.account is not None:
            return self._registered(dial)
        auth = dial.auth
        key = (
            "uac",
            dial.transport,
            dial.srtp,
            dial.proxy or "",
            "" if auth is None else auth.username,
            "" if auth is None else auth.realm,
            "" if auth is None else auth.secret.get_secret_value(),
        )
        found = self.accounts.get(key)
        if found is not None:
            return found
        uac = [k for k in self.accounts if k[0] == "uac"]
        if len(self.accounts) >= 7:  # PJSUA_MAX_ACC is 8: keep room; drop an idle one
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

    # registrations ------------------------------------------------------------------

    def _registered(self, dial: Dial) -> RegisteredAccount:
        """The registered account of ``dial.account`` (created unregistered the first time)."""
        a = dial.account
        assert a is not None
        key = (
            "reg", a.registrar, a.username, a.auth_user, a.realm, a.secret.get_secret_value(),
            a.transport, str(a.expiry), dial.proxy or "", dial.srtp,
        )  # fmt: skip
        found = self.accounts.get(key)
        if isinstance(found, RegisteredAccount):
            return found
        if len(self.accounts) >= 7:
            raise CallSetupError("too many distinct accounts and proxy/auth/transport combinations in use")
        tid = self.transport_ids.get(a.transport)
        if tid is None:
            raise CallSetupError(f"transport {a.transport} is not enabled (sip.transports)")
        acc = RegisteredAccount(self, "/".join(key[:3]))
        cfg = pj.AccountConfig()
        cfg.idUri = f"sip:{a.username}@{uri_host(a.registrar) or host_literal(self.settings.bind)}"
        reg = cfg.regConfig
        reg.registrarUri = a.registrar
        reg.registerOnAdd = False  # Core.register sends it, timed
        reg.timeoutSec = int(a.expiry)
        reg.retryIntervalSec = REGISTER_RETRY
        reg.firstRetryIntervalSec = REGISTER_RETRY
        cfg.callConfig.timerUse = pj.PJSUA_SIP_TIMER_INACTIVE
        mt = cfg.mediaConfig.transportConfig
        mt.boundAddress = self.settings.bind
        mt.port = 0
        set_srtp(cfg.mediaConfig, dial.srtp)
        if dial.proxy:
            cfg.sipConfig.proxies.append(dial.proxy)
        cred = pj.AuthCredInfo("digest", a.realm, a.auth_user, 0, a.secret.get_secret_value())
        cfg.sipConfig.authCreds.append(cred)
        cfg.sipConfig.transportId = tid
        acc.create(cfg, False)
        self.accounts[key] = acc
        return acc

    def register(self, req: PendingRegister) -> None:
        """A registration of ``req.dial.account``: a fresh REGISTER (the register check), or
        for a call, its state unless it has never registered. The guard judges the registrar
        and the outbound proxy first (``Gate.hand_over``), as for any request."""

        def send(acc: Account) -> None:
            assert isinstance(acc, RegisteredAccount)
            if not req.fresh and acc.last is not None and acc.attempt is None:
                post(self.loop, resolve, req.fut, acc.last)
                return
            acc.waiting.append(req)
            if acc.attempt is not None:  # one in flight: its end answers this too
                return
            acc.attempt = RegisterAttempt(time.monotonic())
            self.registering = acc
            set_tsx_timeout(req.timeout)
            try:
                acc.setRegistration(True)
            except pj.Error as exc:
                acc.attempt = None
                acc.waiting.remove(req)
                raise CallSetupError(f"cannot register at {req.dial.uri}: {pj_error(exc)}") from None
            finally:
                set_tsx_timeout(self.td)
                self.registering = None

        try:
            self.gate.hand_over(req.dial, self.account_for, send)
        except Exception as exc:
            fail(self.loop, req.fut, exc, pj_as=CallSetupError)

    def _register_sent(self, msg: Outbound) -> None:
        mine = (a for a in self.accounts.values() if isinstance(a, RegisteredAccount))
        acc = next((a for a in mine if a.reg_call_id == msg.call_id), self.registering)
        if acc is None:
            return
        acc.reg_call_id = msg.call_id
        if acc.attempt is not None:
            acc.attempt.sent(time.monotonic(), msg.cseq)

    def on_reg_state(self, acc: RegisteredAccount, prm: Any) -> None:
        now = time.monotonic()
        status, reason, expires = int(prm.code), str(prm.reason), int(prm.expiration)
        from_network = bool(str(prm.rdata.wholeMsg)) if prm.rdata is not None else False
        registered = 200 <= status < 300 and expires > 0
        attempt, acc.attempt = acc.attempt, None
        if self.state is not EngineState.RUNNING and not acc.waiting:
            return  # the unregistration at shutdown
        renewal: Renewal = "new" if acc.last is None else "re-registered" if acc.lost else "refresh"
        lost = acc.lost
        if registered:
            acc.lost = None
        elif acc.lost is None:
            acc.lost = f"{status} {reason}"
        waiting, acc.waiting = acc.waiting, []
        if registered and not waiting:  # pjsua's own refresh, before the binding expired
            acc.refreshes += 1
        result = Registration(
            status=status, reason=reason, from_network=from_network, registered=registered,
            expires=max(0, expires), renewal=renewal, lost=lost, refreshes=acc.refreshes,
            started_at=attempt.started_at if attempt else now,
            sent_at=attempt.sent_at if attempt else None,
            credentials_at=attempt.credentials_at if attempt else None, finished_at=now,
        )  # fmt: skip
        acc.last = result
        if waiting:
            acc.refreshes = 0
        for req in waiting:
            post(self.loop, resolve, req.fut, result)
        if not waiting and not registered:
            logger.warning("registration of %s lost: %s %s", acc.name, status, reason)

    def _wind_down(self) -> None:
        """Hang up, let DISCONNECTED and OPTIONS completions arrive, then drop everything."""
        self.move(EngineState.CLOSING)
        if self.ep is not None:
            while True:  # let queued operations finish (hang-ups, media changes)
                with self.lock:
                    if not self.commands:
                        break
                    fn, fut = self.commands.popleft()
                self._guarded(fn, fut)
        self._drop_pending()
        if self.ep is None:
            return
        for call in list(self.calls.values()):
            call.cause_hint = "engine_closed"
        with contextlib.suppress(pj.Error):
            self.ep.hangupAllCalls()
        calls_until = time.monotonic() + SHUTDOWN_CALL_WAIT
        while True:
            now = time.monotonic()
            until = self._transactions_until()
            if (not self.calls or now >= calls_until) and (until is None or now >= until):
                break
            self.ep.libHandleEvents(10)
        for call in list(self.calls.values()):  # still not DISCONNECTED: give up on them
            call.media.drop()
            post(
                self.loop,
                self.engine._dispatch,
                call.key,
                CallEvent("disconnected", time.monotonic(), None, "engine closed", cause="engine_closed"),
            )
        self.calls.clear()

    def _drop_pending(self) -> None:
        """Fail every request still waiting: calls, OPTIONS, registrations."""
        closed = EngineClosed("the SIP engine is shutting down")
        waiting: list[asyncio.Future[Any]] = [req.fut for req in self.pending_calls]
        waiting += [opt.fut for opt in self.pending_options]
        for acc in self.accounts.values():
            if isinstance(acc, RegisteredAccount):
                waiting += [req.fut for req in acc.waiting]
                acc.waiting.clear()
        self.pending_calls.clear()
        self.pending_options.clear()
        for fut in waiting:
            post(self.loop, reject, fut, closed)

    def _transactions_until(self) -> float | None:
        """When the last OPTIONS or REGISTER in flight ends (an account deleted under a live
        transaction trips a C assertion); None when there is none."""
        ends = [o.sent_at + o.timeout + 1.0 for a in self.accounts.values() for o in a.options.values()]
        ends += [
            a.attempt.started_at + self.td for a in self.accounts.values()
            if isinstance(a, RegisteredAccount) and a.attempt is not None
        ]  # fmt: skip
        return max(ends, default=None)

    def _destroy(self) -> None:
        accounts = list(self.accounts.values())
        self.accounts.clear()
        self.uas = self.no_media = self.plain = None
        for acc in accounts:
            with contextlib.suppress(pj.Error):
                acc.shutdown()
        del accounts
        gc.collect()
        if self.ep is not None:
            try:
                self.ep.libDestroy(pj.PJSUA_DESTROY_NO_NETWORK)
            except pj.Error as exc:
                logger.warning("libDestroy: %s", pj_error(exc))
            self.ep = None
        if self.screen is not None:  # libDestroy has unregistered the module
            self.screen.release()
            self.screen = None
        self.writer = None
        gc.collect()

    # calls the guard refused ----------------------------------------------------------

    def end_refused(self) -> None:
        """End the calls whose remote target was refused, without sending to it: the
        dialog's target never changed (the screen dropped the message), and nothing is
        sent in the dialog at all — except the CANCEL of a call not yet answered that
        has had a provisional response, which goes to the INVITE's own Request-URI."""
        while self.gate.to_end:
            call_id, verdict, provisional = self.gate.to_end.popleft()
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

    def _end_locally(self, call: Call) -> None:
        """``pjsip_inv_terminate``: the session is DISCONNECTED at once and nothing is sent
        (no ACK, BYE or CANCEL); pjsua itself uses it to give up on a call."""
        call.hung_up = True
        lib = clib()  # signatures set by probes.sip_targets
        pcall, dlg = ctypes.c_void_p(), ctypes.c_void_p()
        status = lib.acquire_call(
            b"ecpm end_refused", int(call.getId()), ctypes.byref(pcall), ctypes.byref(dlg)
        )
        if status != 0 or not dlg.value:
            logger.warning("call %d: no dialog to end (pj status %s)", call.key, status)
            return
        try:
            inv = lib.pjsip_dlg_get_inv_session(dlg)
            if inv:
                lib.pjsip_inv_terminate(inv, 403, 1)
        finally:
            lib.pjsip_dlg_dec_lock(dlg)

    # calls (UAC) -------------------------------------------------------------------

    def _slots_free(self) -> bool:
        return int(clib().pjsua_call_get_count()) < self.settings.max_calls

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
                post(
                    self.loop,
                    reject,
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

    def _place(self, req: PendingCall) -> None:
        opts = req.options

        def send(acc: Account) -> float:
            call = Call(
                self,
                acc,
                req.key,
                call_id=pj.PJSUA_INVALID_ID,
                outgoing=True,
                deadline=time.monotonic() + opts.max_duration,
            )
            call.media.want.tone_hz = opts.tone_hz
            call.media.want.record = opts.record
            prm = pj.CallOpParam(True)
            prm.opt.audioCount = 1
            prm.opt.videoCount = 0
            add_headers(prm.txOption, opts.headers)
            add_parts(prm.txOption, opts.parts)
            started = time.monotonic()
            set_tsx_timeout(opts.first_response_timeout)
            try:
                call.makeCall(req.dial.uri, prm)
            except pj.Error as exc:
                if not call.released:
                    acc.calls -= 1
                raise CallSetupError(
                    f"cannot call {req.dial.uri}: {pj_error(exc)}", status=getattr(exc, "status", None)
                ) from None
            finally:
                set_tsx_timeout(self.td)
            if call.released:  # disconnected inside makeCall (a send that failed at once)
                return started
            call.sip_call_id = str(call.getInfo().callIdString)
            self.gate.contexts[call.sip_call_id] = req.dial
            self.calls[req.key] = call
            self.placed += 1
            if req.cancelled:  # the caller gave up while we were placing it
                self.hangup(call, None, None)
            return started

        try:
            started = self.gate.hand_over(req.dial, self.account_for, send)
        except Exception as exc:
            fail(self.loop, req.fut, exc, pj_as=CallSetupError)
        else:
            post(self.loop, resolve, req.fut, started)

    def emit(self, call: Call, event: CallEvent) -> None:
        post(self.loop, self.engine._dispatch, call.key, event)

    def release(self, call: Call, event: CallEvent) -> None:
        """DISCONNECTED: destroy the call's media, drop the wrapper, tell asyncio."""
        if call.released:
            return
        call.released = True
        call.media.drop()
        call.account.calls -= 1
        self.calls.pop(call.key, None)
        self.gate.contexts.pop(call.sip_call_id, None)
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

    def hangup(self, call: Call, status: int | None, reason: str | None) -> None:
        call.hung_up = True
        prm = pj.CallOpParam()
        if status is not None:
            prm.statusCode = status
        if reason:
            prm.reason = reason
        try:
            call.hangup(prm)
        except pj.Error as exc:
            logger.debug("hangup of call %d: %s", call.key, pj_error(exc))

    # calls (UAS) --------------------------------------------------------------------

    def incoming_account_id(self) -> int:
        acc = self.uas if self.incoming_media or self.no_media is None else self.no_media
        if acc is self.uas and not self.incoming_srtp and self.plain is not None:
            acc = self.plain
        return int(acc.getId()) if acc is not None else -1

    def on_incoming(self, acc: Account, prm: Any) -> None:
        key = self.engine.new_key()
        call = Call(self, acc, key, call_id=prm.callId, outgoing=False, deadline=time.monotonic() + 3600.0)
        call.sip_call_id = str(call.getInfo().callIdString)
        self.calls[key] = call
        self.incoming += 1
        closing = self.state in (EngineState.CLOSING, EngineState.CLOSED)
        if closing or not self.accepting:
            call.cause_hint = "local"
            self.hangup(call, 503 if closing else 480, None)
            return
        rdata = prm.rdata
        request = IncomingRequest(str(rdata.wholeMsg)[:MAX_MESSAGE], str(rdata.srcAddress), time.monotonic())
        post(self.loop, self.engine._incoming, key, request)

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
        add_headers(prm.txOption, headers)
        add_parts(prm.txOption, parts)
        if status >= 300:
            call.hung_up = True
        if max_duration is not None:
            call.deadline = time.monotonic() + max_duration
        call.answer(prm)
        return True

    # OPTIONS --------------------------------------------------------------------------

    def _send_options(self, opt: PendingOptions) -> None:
        tag = next(self.tags)

        def send(acc: Account) -> None:
            sp = pj.SendRequestParam()
            sp.method = "OPTIONS"
            sp.txOption.targetUri = opt.dial.uri
            add_headers(sp.txOption, (*opt.headers, (REQUEST_TAG, str(tag))))
            set_tsx_timeout(opt.timeout)
            try:
                opt.sent_at = time.monotonic()
                acc.sendRequest(sp)
            except pj.Error as exc:
                raise CallSetupError(
                    f"cannot send OPTIONS to {opt.dial.uri}: {pj_error(exc)}",
                    status=getattr(exc, "status", None),
                ) from None
            finally:
                set_tsx_timeout(self.td)
            acc.options[tag] = opt
            self.options_sent += 1

        try:
            self.gate.hand_over(opt.dial, self.account_for, send)
        except Exception as exc:
            fail(self.loop, opt.fut, exc, pj_as=CallSetupError)

    def on_request_done(self, acc: Account, prm: Any) -> None:
        e = prm.e
        if e.type != pj.PJSIP_EVENT_TSX_STATE:
            return
        ts = e.body.tsxState
        tsx = ts.tsx
        status = int(tsx.statusCode)
        if status < 200:
            return
        tag = request_tag(str(tsx.lastTx.wholeMsg)) if tsx.lastTx is not None else None
        opt = acc.options.pop(tag, None) if tag is not None else None
        if opt is None:
            return
        from_network = ts.type == pj.PJSIP_EVENT_RX_MSG
        message = str(ts.src.rdata.wholeMsg)[:MAX_MESSAGE] if from_network else None
        reply = OptionsReply(
            status, str(tsx.statusText), from_network, opt.sent_at, time.monotonic(), message
        )
        post(self.loop, resolve, opt.fut, reply)
