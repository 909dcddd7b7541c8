"""``ecpm responder``: the answering end a provider points its emergency TEST route at.

Per call: 180 Ringing for ``ring_time``, then 200 OK whose body is multipart/mixed:
the SDP and a NENA-style ``text/plain`` test-call answer (answering point name, the
service URN it was called on, the location it received in the PIDF-LO). Media by
``mode``: ``tone`` plays ``tone_hz``; ``echo`` returns what it receives;
``echo+tone`` (default) does both. Above ``max_calls`` concurrent calls it answers
486; after ``max_call_duration`` it sends BYE. OPTIONS get 200 (pjsua answers them).

Faults, switchable at run time through the loopback HTTP control
(``GET /fault``, ``PUT /fault`` with the name as body, ``GET /status``,
``GET /health``; header ``X-ECPM-Token`` when a token is configured):

=================  ==============================================================
``none``           normal service
``answer_503``     503 Service Unavailable instead of ringing
``never_answer``   180 Ringing and nothing more (480 after ``max_call_duration``)
``no_media``       answers with a normal SDP but no RTP behind it (loop transport)
``one_way_media``  plays its tone but never returns what it receives
``delayed_answer`` rings for ``answer_delay`` before answering
=================  ==============================================================

The responder must be reached with a ``sip:``/``sips:`` Request-URI: pjsip cannot
parse a ``urn:`` Request-URI on receipt (it sends them fine). Behind an ESRP that
routes ``urn:service:test.sos`` to it, the URN is read from the To header.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hmac
import ipaddress
import json
import logging
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, get_args

from ecpm.configfile import read_yaml, secret_of, validate
from ecpm.errors import ConfigError, UsageError
from probes.config import Fault, ResponderConfig, SipSettings
from probes.guard import Guard
from probes.nena import format_test_answer, location_in_request, parse_sip_message, service_in_request
from probes.sip import IncomingCall, Part, SipEngine

logger = logging.getLogger(__name__)

FAULTS: Final[tuple[str, ...]] = get_args(Fault)
TOKEN_HEADER: Final = "x-ecpm-token"
MAX_HTTP: Final = 8192


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
            self.engine.set_incoming_media(value != "no_media")

    def start(self) -> None:
        self.engine.set_incoming_media(self._fault != "no_media")
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
        request = parse_sip_message(call.request.message)
        body = format_test_answer(
            cfg.answering_point, service_in_request(request), location_in_request(request)
        )
        if fault != "no_media":
            if cfg.mode in ("tone", "echo+tone"):
                await call.play_tone(cfg.tone_hz)
            if cfg.mode in ("echo", "echo+tone") and fault != "one_way_media":
                await call.echo(True)
        if not await call.answer(200, parts=(Part("text/plain", body),), max_duration=cfg.max_call_duration):
            return
        self.answered_total += 1
        if await call.wait_ended(cfg.max_call_duration) is None:
            logger.info("call reached max_call_duration (%.0f s): BYE", cfg.max_call_duration)
            await call.hangup()


# ------------------------------------------------------------------ HTTP control


class ControlServer:
    """A very small HTTP/1.1 server for the fault switch (loopback, stdlib only)."""

    def __init__(self, responder: Responder, listen: str, token: str | None) -> None:
        self.responder = responder
        host, _, port = listen.rpartition(":")
        self.host = host.strip("[]")
        self.port = int(port)
        self.token = token
        self._server: asyncio.Server | None = None

    async def start(self) -> str:
        self._server = await asyncio.start_server(self._client, self.host, self.port)
        sock = self._server.sockets[0].getsockname()
        host = f"[{sock[0]}]" if ":" in sock[0] else sock[0]
        return f"http://{host}:{sock[1]}"

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            status, body, ctype = await asyncio.wait_for(self._request(reader), 5.0)
        except (
            TimeoutError,
            ValueError,
            asyncio.IncompleteReadError,
            asyncio.LimitOverrunError,
            ConnectionError,
        ):
            status, body, ctype = 400, "bad request\n", "text/plain"
        reason = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found",
                  405: "Method Not Allowed"}.get(status, "Error")  # fmt: skip
        data = body.encode()
        head = (
            f"HTTP/1.1 {status} {reason}\r\nContent-Type: {ctype}\r\n"
            f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n"
        )
        with contextlib.suppress(ConnectionError):
            writer.write(head.encode() + data)
            await writer.drain()
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()

    async def _request(self, reader: asyncio.StreamReader) -> tuple[int, str, str]:
        head = await reader.readuntil(b"\r\n\r\n")
        if len(head) > MAX_HTTP:
            raise ValueError("header too large")
        lines = head.decode("latin-1").split("\r\n")
        method, path, _ = lines[0].split(" ", 2)
        headers = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if sep:
                headers[name.strip().lower()] = value.strip()
        length = int(headers.get("content-length", "0") or 0)
        if not 0 <= length <= 1024:
            raise ValueError("body too large")
        body = (await reader.readexactly(length)).decode("utf-8", "replace") if length else ""
        if self.token is not None and not hmac.compare_digest(
            headers.get(TOKEN_HEADER, "").encode(), self.token.encode()
        ):
            return 401, "missing or wrong X-ECPM-Token\n", "text/plain"
        path = path.split("?", 1)[0]
        if path == "/health" and method == "GET":
            return 200, "ok\n", "text/plain"
        if path == "/status" and method == "GET":
            return 200, self.responder.status().to_json() + "\n", "application/json"
        if path == "/fault":
            if method == "GET":
                return 200, self.responder.fault + "\n", "text/plain"
            if method in ("PUT", "POST"):
                wanted = body.strip()
                try:
                    self.responder.fault = wanted
                except ValueError as exc:
                    return 400, f"{exc}\n", "text/plain"
                return 200, wanted + "\n", "text/plain"
            return 405, "GET or PUT\n", "text/plain"
        return 404, "not found: /fault, /status, /health\n", "text/plain"


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
    if control.listen is not None and token is None:
        host = control.listen.rpartition(":")[0].strip("[]")
        if not ipaddress.ip_address(host).is_loopback:
            raise UsageError(f"control.listen {control.listen} is not loopback: set control.token")
    # The responder never dials out; its guard exists because the engine requires one.
    engine = SipEngine(sip_settings(config), Guard(home_region="GB"))
    await engine.start()
    server: ControlServer | None = None
    try:
        responder = Responder(config, engine)
        responder.start()
        url = None
        if control.listen is not None:
            server = ControlServer(responder, control.listen, token)
            url = await server.start()
        if on_ready is not None:
            on_ready(engine.local_addresses, url)
        await stop.wait()
        engine.serve(None)
    finally:
        if server is not None:
            await server.close()
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
    except OSError as exc:  # e.g. the control port is taken
        print(f"ecpm responder: {exc}", file=sys.stderr)
        return 2
    return 0
