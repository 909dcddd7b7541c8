"""Calls as asyncio sees them: events in order, and operations that run in the pjsua2
thread. A handle holds no pjsua2 object and is safe to keep after the call ended."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING

from probes.media import wav_complete
from probes.sip.bridge import MediaWish
from probes.sip.errors import EngineClosed
from probes.sip.values import CallEvent, IncomingRequest, Part, RtpStats

if TYPE_CHECKING:
    from probes.sip.core import Core
    from probes.sip.engine import SipEngine


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

        def op(core: Core) -> None:
            call = core.calls.get(self.key)
            if call is not None and not call.hung_up:
                core.hangup(call, status, reason)

        await self._engine._run(op)

    async def _media(self, change: Callable[[MediaWish], None]) -> bool:
        if self.ended:
            return False

        def op(core: Core) -> bool:
            call = core.calls.get(self.key)
            if call is None:
                return False
            change(call.media.want)
            call.apply_media()
            return call.media.active

        return await self._engine._run(op)

    async def play_tone(self, hz: float | None) -> bool:
        """Send a continuous tone (None stops it); True when media is up already."""

        def change(w: MediaWish) -> None:
            w.tone_hz = hz

        return await self._media(change)

    async def echo(self, on: bool) -> bool:
        """Return what we receive to the sender (conference bridge loop)."""

        def change(w: MediaWish) -> None:
            w.echo = on

        return await self._media(change)

    async def record(self, path: Path | None, *, finalise_timeout: float = 1.0) -> bool:
        """Record what we receive into ``path`` (WAV). None stops recording and waits
        (up to ``finalise_timeout``) until the file is complete; returns whether it is."""
        if path is not None:
            self._recording = path

            def start(w: MediaWish) -> None:
                w.record = path

            return await self._media(start)
        current: list[Path | None] = []

        def op(core: Core) -> None:
            call = core.calls.get(self.key)
            if call is not None:
                current.append(call.media.recording)
                call.media.want.record = None
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

        def change(w: MediaWish) -> None:
            w.play = path

        return await self._media(change)

    async def send_dtmf(self, digits: str) -> bool:
        """Send DTMF ``digits`` (0-9, *, #, A-D) as RFC 4733 telephone-events; False when the
        call has ended, has no audio, or the far end offered no telephone-event. Digits
        received come as ``dtmf`` events."""
        if self.ended or not digits:
            return False

        def op(core: Core) -> bool:
            call = core.calls.get(self.key)
            return False if call is None else call.send_dtmf(digits)

        return await self._engine._run(op)

    async def play_digits(self, digits: str | None) -> bool:
        """Play DTMF ``digits`` once as in-band tone pairs (``probes.media.DTMF_ON`` of tone,
        ``DTMF_OFF`` of silence each; our tone is off meanwhile); None stops them and our
        tone resumes. True when media is up."""

        def change(w: MediaWish) -> None:
            w.digits = digits

        return await self._media(change)

    async def stats(self) -> RtpStats | None:
        """RTP/RTCP figures now; None when no audio stream is active."""
        if self.ended:
            return None

        def op(core: Core) -> RtpStats | None:
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
