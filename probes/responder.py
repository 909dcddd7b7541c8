"""``ecpm responder``: the answering end a provider points its emergency TEST route at.

Per call: 180 Ringing for ``ring_time``, then 200 OK whose body is multipart/mixed:
the SDP and a NENA-style ``text/plain`` test-call answer (answering point name, the
service URN it was called on, the location it received in the PIDF-LO, and the From,
P-Asserted-Identity and Geolocation headers it received, so the probe can check that
the caller's number and location were delivered). Media by
``mode``: ``tone`` plays ``tone_hz``; ``echo`` returns what it receives;
``echo+tone`` (default) does both; DTMF digits received (RFC 4733) are sent back.
Above ``max_calls`` concurrent calls it answers 486; after ``max_call_duration`` it
sends BYE. OPTIONS get 200 (pjsua answers them).

Faults, switchable at run time through the loopback HTTP control (``ecpm.http``:
``GET /fault``, ``PUT /fault`` with the name as body, ``GET /status``, ``GET /health``;
every request needs the token, ``Authorization: Bearer`` or header ``X-ECPM-Token``,
when one is configured):

=================  ==============================================================
``none``           normal service
``answer_503``     503 Service Unavailable instead of ringing
``never_answer``   180 Ringing and nothing more (480 after ``max_call_duration``)
``no_media``       answers with a normal SDP but no RTP behind it (loop transport)
``one_way_media``  plays its tone but never returns what it receives
``delayed_answer`` rings for ``answer_delay`` before answering
``strip_identity`` reports the call as though the network lost the caller's number:
                   no P-Asserted-Identity, an anonymous From (RFC 3323)
``strip_location`` reports the call as though the network lost its location: no
                   Geolocation, no PIDF-LO
``plain_rtp``      answers with plain RTP even when SRTP was offered (SDES keys refused)
``dtmf_lost``      does not send back the DTMF digits it receives
=================  ==============================================================

The responder must be reached with a ``sip:``/``sips:`` Request-URI: pjsip cannot
parse a ``urn:`` Request-URI on receipt (it sends them fine). Behind an ESRP that
routes ``urn:service:test.sos`` to it, the URN is read from the To header.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, Final, get_args

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from ecpm import http
from ecpm.configfile import read_yaml, secret_of, validate
from ecpm.errors import ConfigError, UsageError
from probes.config import Fault, ResponderConfig, SipSettings
from probes.guard import Guard
from probes.nena import (
    ReceivedIdentity,
    format_test_answer,
    location_in_request,
    parse_sip_message,
    service_in_request,
)
from probes.sip import CallEvent, IncomingCall, Part, SipEngine

logger = logging.getLogger(__name__)

FAULTS: Final[tuple[str, ...]] = get_args(Fault)
MAX_BODY: Final = 1024  # a fault name, with room to spare
ANONYMOUS: Final = '"Anonymous" <sip:anonymous@anonymous.invalid>'  # RFC 3323 section 4.1.1.3


@dataclass(frozen=True, slots=True)
class ResponderStatus:
    fault: str
    mode: str
    active_calls: int
    calls_total: int
    answered_total: int
    busy_total: int
    faulted_total: int

    def to_json(self) -> str:
        return json.dumps(
            {
                "fault": self.fault,
                "mode": self.mode,
                "active_calls": self.active_calls,
                "calls_total": self.calls_total,
                "answered_total": self.answered_total,
                "busy_total": self.busy_total,
                "faulted_total": self.faulted_total,
            },
            sort_keys=True,
        )


def sip_settings(config: ResponderConfig) -> SipSettings:
    """The engine settings of a responder (the wheel's 4 call slots; our own limit is
    ``max_calls``, answered with 486 above it)."""
    s = config.sip
    return SipSettings(
        bind=s.bind,
        port=s.port,
        transports=list(s.transports),
        tls=s.tls,
        log_level=s.log_level,
        user_agent="ecpm-responder",
    )


class Responder:
    """The test responder on a running :class:`SipEngine`."""

    def __init__(self, config: ResponderConfig, engine: SipEngine) -> None:
        self.config = config
        self.engine = engine
        self._fault: str = config.fault
        self.active = 0
        self.calls_total = 0
        self.answered_total = 0
        self.busy_total = 0
        self.faulted_total = 0

    @property
    def fault(self) -> str:
        return self._fault

    @fault.setter
    def fault(self, value: str) -> None:
        if value not in FAULTS:
            raise ValueError(f"unknown fault {value!r}; one of {', '.join(FAULTS)}")
        if value != self._fault:
            logger.warning("responder fault: %s -> %s", self._fault, value)
        self._fault = value
        if self.engine.running:
            self._media_fault()

    def _media_fault(self) -> None:
        self.engine.set_incoming_media(self._fault != "no_media")
        self.engine.set_incoming_srtp(self._fault != "plain_rtp")

    def start(self) -> None:
        self._media_fault()
        self.engine.serve(self.handle)

    def status(self) -> ResponderStatus:
        return ResponderStatus(
            self._fault, self.config.mode, self.active, self.calls_total,
            self.answered_total, self.busy_total, self.faulted_total,
        )  # fmt: skip

    async def handle(self, call: IncomingCall) -> None:
        cfg = self.config
        self.calls_total += 1
        if self.active >= cfg.max_calls:
            self.busy_total += 1
            await call.reject(486, "Busy Here")
            return
        self.active += 1
        try:
            await self._serve(call, self._fault)
        finally:
            self.active -= 1

    async def _serve(self, call: IncomingCall, fault: str) -> None:
        cfg = self.config
        if fault != "none":
            self.faulted_total += 1
        if fault == "answer_503":
            await call.reject(503, "Service Unavailable")
            return
        await call.ring()
        if fault == "never_answer":
            if await call.wait_ended(cfg.max_call_duration) is None:
                await call.reject(480, "Temporarily Unavailable")
            return
        delay = cfg.answer_delay if fault == "delayed_answer" else cfg.ring_time
        if await call.wait_ended(delay) is not None:
            return  # the caller gave up (CANCEL)
        body = self._test_answer(call, fault)
        if fault != "no_media":
            if cfg.mode in ("tone", "echo+tone"):
                await call.play_tone(cfg.tone_hz)
            if cfg.mode in ("echo", "echo+tone") and fault != "one_way_media":
                await call.echo(True)
        if not await call.answer(200, parts=(Part("text/plain", body),), max_duration=cfg.max_call_duration):
            return
        self.answered_total += 1
        if await self._until_ended(call, echo_dtmf=fault != "dtmf_lost") is None:
            logger.info("call reached max_call_duration (%.0f s): BYE", cfg.max_call_duration)
            await call.hangup()

    async def _until_ended(self, call: IncomingCall, *, echo_dtmf: bool) -> CallEvent | None:
        """The answered call until it ends (its end), or None at ``max_call_duration``;
        every DTMF digit received is sent back (RFC 4733), unless ``echo_dtmf`` is off."""
        until = time.monotonic() + self.config.max_call_duration
        while (left := until - time.monotonic()) > 0:
            event = await call.next_event(left)
            if event is None:
                break
            if event.kind == "disconnected":
                return event
            if event.kind == "dtmf" and event.digit and echo_dtmf:
                await call.send_dtmf(event.digit)
        return None

    def _test_answer(self, call: IncomingCall, fault: str) -> str:
        """The NENA-style answer: what the call asked for and what arrived with it (less
        what a ``strip_*`` fault pretends the network lost)."""
        request = parse_sip_message(call.request.message)
        location = None if fault == "strip_location" else location_in_request(request)
        identity = ReceivedIdentity.of(request)
        if fault == "strip_identity":
            identity = replace(identity, from_=ANONYMOUS, p_asserted_identity=None)
        elif fault == "strip_location":
            identity = replace(identity, geolocation=None)
        service = service_in_request(request)
        return format_test_answer(self.config.answering_point, service, location, identity)


# ------------------------------------------------------------------ HTTP control


def control_app(responder: Responder, token: str | None) -> ASGIApp:
    """The fault switch's HTTP API (served by ``ecpm.http``); every request needs the token
    when one is configured."""

    async def health(request: Request) -> Response:
        return _text("ok")

    async def status(request: Request) -> Response:
        return Response(responder.status().to_json() + "\n", media_type="application/json")

    async def fault(request: Request) -> Response:
        if request.method == "GET":
            return _text(responder.fault)
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_BODY:
                return _text("body too large", 400)
        wanted = body.decode("utf-8", "replace").strip()
        try:
            responder.fault = wanted
        except ValueError as exc:
            return _text(str(exc), 400)
        return _text(wanted)

    async def not_found(request: Request, exc: Exception) -> Response:
        return _text("not found: /fault, /status, /health", 404)

    async def wrong_method(request: Request, exc: Exception) -> Response:
        return _text("GET or PUT", 405)

    app = Starlette(
        routes=[
            Route("/health", health, methods=["GET"]),
            Route("/status", status, methods=["GET"]),
            Route("/fault", fault, methods=["GET", "PUT", "POST"]),
        ],
        exception_handlers={404: not_found, 405: wrong_method},
    )
    return app if token is None else _guarded(app, token)


def _guarded(app: ASGIApp, token: str) -> ASGIApp:
    """``app`` behind the token: 401 before routing, so even a wrong path needs it."""

    async def guarded(scope: Scope, receive: Receive, send: Send) -> None:
        refused = http.token_refusal(Request(scope), token) if scope["type"] == "http" else None
        if refused is None:
            await app(scope, receive, send)
        else:
            await _text(refused.message, 401, refused.headers)(scope, receive, send)

    return guarded


def _text(body: str, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return PlainTextResponse(body + "\n", status_code=status, headers=headers)


# ------------------------------------------------------------------- running it


async def serve(
    config: ResponderConfig,
    stop: asyncio.Event,
    *,
    on_ready: Callable[[dict[str, str], str | None], None] | None = None,
) -> None:
    """Run the responder until ``stop`` is set; hang up and shut down cleanly."""
    control = config.control
    token_secret = secret_of(control, "token")
    token = token_secret.get_secret_value() if token_secret is not None else None
    if control.listen is not None and token is None and not control.listen.loopback:
        raise UsageError(f"control.listen {control.listen} is not loopback: set control.token")
    # The responder never dials out; its guard exists because the engine requires one.
    engine = SipEngine(sip_settings(config), Guard(home_region="GB"))
    await engine.start()
    control_task: asyncio.Task[None] | None = None
    try:
        responder = Responder(config, engine)
        responder.start()
        url = None
        if control.listen is not None:
            sock = http.bind(control.listen, key="control.listen")
            url = http.url_of(sock).rstrip("/")
            control_task = asyncio.create_task(http.serve(control_app(responder, token), sock))
        if on_ready is not None:
            on_ready(engine.local_addresses, url)
        await stop.wait()
        engine.serve(None)
    finally:
        if control_task is not None:
            control_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await control_task
        await engine.aclose()


# ------------------------------------------------------------------ command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-c", "--config", metavar="FILE", help="responder config (YAML, kind: responder)")
    parser.add_argument("--bind", help="SIP/RTP address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="SIP port (default 5090)")
    parser.add_argument("--transport", action="append", choices=["udp", "tcp", "tls"],
                        help="enable a transport (repeat; default udp and tcp)")  # fmt: skip
    parser.add_argument(
        "--mode", choices=["echo+tone", "echo", "tone"], help="media mode (default echo+tone)"
    )
    parser.add_argument("--tone-hz", type=float, help="tone we play (default 1400)")
    parser.add_argument("--answering-point", help="name in the NENA-style 200 OK body")
    parser.add_argument("--ring-time", help="180 Ringing this long before 200 OK (default 50ms)")
    parser.add_argument("--answer-delay", help="ring time of the delayed_answer fault (default 20s)")
    parser.add_argument("--max-calls", type=int, help="concurrent calls; 486 above (default 4)")
    parser.add_argument("--max-call-duration", help="BYE after this (default 60s)")
    parser.add_argument("--fault", choices=FAULTS, help="initial fault mode (default none)")
    parser.add_argument(
        "--control",
        metavar="HOST:PORT|off",
        help="HTTP control listen address (default 127.0.0.1:8091; off disables)",
    )
    parser.add_argument("--sip-log-level", type=int, help="pjsip's own log level 0-6 (default 1)")


def load(args: argparse.Namespace) -> ResponderConfig:
    """The config file (if any) with the command-line flags laid over it."""
    name = "command line"
    data: dict[str, Any] = {"kind": "responder"}
    lines: dict[tuple[str | int, ...], int] = {}
    if args.config:
        loaded, lines = read_yaml(args.config)
        if not isinstance(loaded, dict):
            raise ConfigError([f"{args.config}:1: (top): must be a mapping"])
        data, name = loaded, args.config
    sip = data.setdefault("sip", {}) if isinstance(data.get("sip", {}), dict) else {}
    for flag, key in (("bind", "bind"), ("port", "port"), ("transport", "transports"),
                      ("sip_log_level", "log_level")):  # fmt: skip
        value = getattr(args, flag)
        if value is not None:
            sip[key] = value
    for flag, key in (("mode", "mode"), ("tone_hz", "tone_hz"), ("answering_point", "answering_point"),
                      ("ring_time", "ring_time"), ("answer_delay", "answer_delay"),
                      ("max_calls", "max_calls"), ("max_call_duration", "max_call_duration"),
                      ("fault", "fault")):  # fmt: skip
        value = getattr(args, flag)
        if value is not None:
            data[key] = value
    if args.control is not None:
        control = data.setdefault("control", {})
        if isinstance(control, dict):
            control["listen"] = None if args.control == "off" else args.control
    config = validate(name, data, lines, ResponderConfig)
    try:
        sip_settings(config)
    except ValueError as exc:  # pydantic ValidationError is a ValueError
        raise ConfigError([f"{name}: sip: {str(exc).splitlines()[-1].strip()}"]) from None
    return config


def run(args: argparse.Namespace) -> int:
    config = load(args)

    def ready(addresses: dict[str, str], url: str | None) -> None:
        sip = ", ".join(f"{k} {v}" for k, v in addresses.items())
        control = f"; control {url}" if url else ""
        print(f"ecpm responder ready: sip {sip}{control}; fault {config.fault}", flush=True)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await serve(config, stop, on_ready=ready)

    try:
        asyncio.run(main())
    except OSError as exc:  # a taken control port is a ListenError: the CLI prints it, exit 2 too
        print(f"ecpm responder: {exc}", file=sys.stderr)
        return 2
    return 0
