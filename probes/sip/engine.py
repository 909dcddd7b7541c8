"""The SIP engine as asyncio uses it: one pjsua2 endpoint in its own thread."""

from __future__ import annotations

import asyncio
import atexit
import itertools
import logging
import threading
import time
from collections.abc import Callable
from typing import Final, TypeVar

from probes.config import SipSettings
from probes.guard import Guard
from probes.sip.calls import PendingCall, PendingOptions, PendingRegister
from probes.sip.core import Core, EngineState
from probes.sip.crossing import post, resolve
from probes.sip.errors import EngineClosed, SipError
from probes.sip.handles import CallHandle, IncomingCall, IncomingHandler, OutgoingCall
from probes.sip.native import clib
from probes.sip.values import (
    CallEvent,
    CallOptions,
    Dial,
    EngineStats,
    IncomingRequest,
    OptionsReply,
    Registration,
    TlsState,
)

logger = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_TRANSACTION_TIMEOUT: Final = 8.0  # pjsip TD (timers B, D, F, H) unless a request sets its own
SLOT_WAIT: Final = 60.0  # longest a call waits for a free slot before NoCallSlot


class _ProcessSlot:
    """The one engine a process may run (pjsua2 has one Endpoint per process)."""

    lock = threading.Lock()
    engine: SipEngine | None = None


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
        self._core: Core | None = None
        self._state = EngineState.UNOPENED  # while there is no Core
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._handles: dict[int, CallHandle] = {}
        self._keys = itertools.count(1)
        self._keys_lock = threading.Lock()
        self._handler: IncomingHandler | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._stopped: asyncio.Future[None] | None = None
        self._tls: dict[str, TlsState] = {}  # the latest TLS state per peer "ip:port"

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
        core = Core(
            self.settings,
            self.guard,
            loop,
            self,
            transaction_timeout=self._transaction_timeout,
            poll_interval=self._poll,
        )

        def body() -> None:
            try:
                core.run(lambda err: post(loop, resolve, ready, err))
            finally:
                post(loop, resolve, stopped, None)

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
        core.move(EngineState.STOPPING)
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
        self._state = EngineState.CLOSED
        self._thread = None
        with _ProcessSlot.lock:
            if _ProcessSlot.engine is self:
                _ProcessSlot.engine = None

    def _atexit(self) -> None:  # the interpreter is exiting with the engine still up
        core, thread = self._core, self._thread
        if core is not None and thread is not None and thread.is_alive():
            core.move(EngineState.STOPPING)
            thread.join(timeout=30)

    # properties --------------------------------------------------------------------

    @property
    def state(self) -> EngineState:
        return self._core.state if self._core is not None else self._state

    @property
    def running(self) -> bool:
        """Starting or running: taking calls and operations."""
        return self._core is not None and self._core.open

    @property
    def local_addresses(self) -> dict[str, str]:
        """Transport -> "host:port" we listen on."""
        return dict(self._core.local) if self._core is not None else {}

    def stats(self) -> EngineStats:
        core = self._core
        if core is None:
            return EngineStats(0, 0, 0, 0, 0, 0, 0)
        try:
            in_use = int(clib().pjsua_call_get_count())
        except (OSError, AttributeError):
            in_use = len(core.calls)
        return EngineStats(
            calls_active=len(core.calls),
            slots_in_use=in_use,
            calls_waiting=len(core.pending_calls),
            calls_placed_total=core.placed,
            calls_incoming_total=core.incoming,
            refused_total=core.gate.refused,
            options_total=core.options_sent,
        )

    # plumbing ------------------------------------------------------------------------

    def new_key(self) -> int:
        with self._keys_lock:
            return next(self._keys)

    def _require(self) -> tuple[Core, asyncio.AbstractEventLoop]:
        core, loop = self._core, self._loop
        if core is None or loop is None or not core.open:
            raise EngineClosed("the SIP engine is not running")
        return core, loop

    async def _run(self, op: Callable[[Core], T]) -> T:
        core, loop = self._require()
        fut: asyncio.Future[T] = loop.create_future()
        core.submit(lambda: op(core), fut)
        return await fut

    def _tls_seen(self, state: TlsState) -> None:
        if len(self._tls) >= 256 and state.remote not in self._tls:  # bounded: drop the oldest
            del self._tls[next(iter(self._tls))]
        self._tls[state.remote] = state

    def tls_state(self, remote: str) -> TlsState | None:
        """The latest TLS connection state seen with peer ``remote`` ("ip:port"): the
        protocol version negotiated and the certificate verification result."""
        return self._tls.get(remote)

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
        req = PendingCall(key, dial, opts, fut, now, now + self._slot_wait)
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
        opt = PendingOptions(dial, timeout, headers, fut, time.monotonic())
        core.queue(lambda: core.pending_options.append(opt), fut)
        try:
            return await fut
        except BaseException:
            opt.cancelled = True
            raise

    async def register(
        self,
        dial: Dial,
        *,
        timeout: float,  # noqa: ASYNC109 - pjsip's own transaction timeout, not an asyncio one
        fresh: bool = True,
    ) -> Registration:
        """Register ``dial.account`` at ``dial.uri`` (its registrar) and wait for the end of
        the attempt; pjsua then refreshes it. ``fresh=False``: the account's last state,
        registering only if it never has (what a call from the account needs). Raises
        GuardRefusal (nothing sent), CallSetupError, EngineClosed."""
        core, loop = self._require()
        fut: asyncio.Future[Registration] = loop.create_future()
        req = PendingRegister(dial, timeout, fresh, fut)
        core.queue(lambda: core.register(req), fut)
        return await fut

    def serve(self, handler: IncomingHandler | None) -> None:
        """Hand every incoming INVITE to ``handler`` (a task per call; the call is
        hung up when it returns). None stops serving: new calls get 480."""
        core, _ = self._require()
        self._handler = handler
        core.accepting = handler is not None

    def set_incoming_srtp(self, enabled: bool) -> None:
        """False: answer new calls with plain RTP even when SRTP was offered (the responder's
        ``plain_rtp`` fault); True (the default): SDES-SRTP when the offer has keys."""
        core, _ = self._require()
        core.incoming_srtp = enabled

    def set_incoming_media(self, enabled: bool) -> None:
        """False: answer new calls with a normal SDP but no RTP socket behind it
        (pjmedia's loop transport), the "no media" fault of the responder."""
        core, _ = self._require()
        core.incoming_media = enabled
