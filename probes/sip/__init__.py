"""The SIP engine: the only package in ecpm that imports pjsua2.

Use it as ``async with SipEngine(settings, guard) as engine:``. One engine (one
pjsua2 ``Endpoint``) per process; a second concurrent engine is refused.

Threading (docs/checks.md, "The SIP engine")
    pjsip runs in one dedicated thread that creates the library (so it is pjsua2's
    main thread), with ``threadCnt = 0`` and ``mainThreadOnly``. That thread loops:
    run at most :data:`~probes.sip.core.BATCH` queued closures from asyncio, admit waiting calls
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

Safety (probes.sip.safety)
    :meth:`Gate.hand_over <probes.sip.safety.Gate.hand_over>` is the one function that
    gives a URI (request URI and outbound proxy) to pjsua2, for INVITE, OPTIONS and
    REGISTER alike; it runs the guard first. A refusal is logged and counted by the guard,
    counted by the engine, raised as :class:`~probes.guard.GuardRefusal`, and nothing
    is sent. Every Contact and Record-Route the far end names, and the Request-URI of
    every request leaving the process, is judged inside pjsip
    (:mod:`probes.sip_targets`); a call whose remote target was refused is ended locally
    (:meth:`Core.end_refused <probes.sip.core.Core.end_refused>`), with cause
    ``guard_refused`` and the refusal in :attr:`CallEvent.refusal`. pjsua's own
    transfers, Replaces and redirects are declined.

Layout
    ``engine``   SipEngine: the asyncio side, start and close, the one-per-process slot
    ``core``     the pjsua2 thread: its loop, lifecycle (EngineState), transports,
                 accounts, admission, placing, answering, OPTIONS, shutdown
    ``calls``    the pjsua2 Call and Account of the thread, and requests waiting there
    ``handles``  CallHandle, OutgoingCall, IncomingCall: calls as asyncio sees them
    ``bridge``   one call's tone, echo, recorder and player on the conference bridge
    ``safety``   the guard at every place a URI reaches pjsip; declined transfers
    ``crossing`` values and errors from the pjsua2 thread to asyncio (one error copy)
    ``native``   ctypes access to pjsip, pjsip's log, headers and parts
    ``values``   the frozen dataclasses that cross threads; ``errors`` the tree below

Errors::

    EcpmError
    └── SipError            the engine could not do what was asked
        ├── EngineClosed    the engine is not running
        ├── CallSetupError  pjsua2 refused to start the request (bad URI, transport)
        └── NoCallSlot      no call slot became free in time
"""

from probes.sip.core import EngineState
from probes.sip.engine import SipEngine
from probes.sip.errors import CallSetupError, EngineClosed, NoCallSlot, SipError
from probes.sip.handles import CallHandle, IncomingCall, OutgoingCall
from probes.sip.values import (
    CallEvent,
    CallOptions,
    Dial,
    EngineStats,
    IncomingRequest,
    OptionsReply,
    Part,
    Registration,
    RemoteRefusal,
    RtpStats,
    TlsState,
)

__all__ = [
    "CallEvent",
    "CallHandle",
    "CallOptions",
    "CallSetupError",
    "Dial",
    "EngineClosed",
    "EngineState",
    "EngineStats",
    "IncomingCall",
    "IncomingRequest",
    "NoCallSlot",
    "OptionsReply",
    "OutgoingCall",
    "Part",
    "Registration",
    "RemoteRefusal",
    "RtpStats",
    "SipEngine",
    "SipError",
    "TlsState",
]
