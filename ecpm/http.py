"""Serving HTTP, the same way for every ecpm server: a Starlette app on uvicorn.

Used by the monitor (API, status page, ``/metrics``), the probe's health endpoint and
the responder's fault control.

- ``bind(listen, key=)``: the listening socket, or ``ListenError`` naming the config key.
- ``serve(app, listen)``: serve on the running event loop until cancelled.
- ``ThreadedServer``: the same on a thread and event loop of its own, for an endpoint
  that must answer while the caller's loop is blocked (the probe's ``/healthz`` says so).
- ``token_refusal(request, token)``: the one token rule. The token comes in
  ``Authorization: Bearer <token>`` or, the same token, in ``X-ECPM-Token: <token>`` (the
  responder's documented header, kept); it is compared in constant time. What a server
  does without a configured token is its own rule (the monitor refuses, the loopback
  responder allows).

uvicorn here never installs signal handlers (the process owns them) and leaves the
logging configuration alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import socket
import threading
from collections.abc import Callable, Generator
from typing import NamedTuple

import uvicorn
from starlette.requests import Request
from starlette.types import ASGIApp

from ecpm.errors import EcpmError
from ecpm.settings import Listen

logger = logging.getLogger(__name__)

GRACE = 5.0  # seconds requests in flight get to finish when a server stops
TOKEN_HEADER = "x-ecpm-token"
_REALM = 'Bearer realm="ecpm"'


class ListenError(EcpmError):
    """An HTTP listener cannot be opened (address in use, not local, ...)."""


class TokenRefusal(NamedTuple):
    message: str
    headers: dict[str, str]  # the WWW-Authenticate challenge


def token_refusal(request: Request, token: str) -> TokenRefusal | None:
    """None if ``request`` carries ``token``; else why not, with the challenge to send (401)."""
    scheme, _, presented = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer":
        presented = "" if scheme else request.headers.get(TOKEN_HEADER, "")
    if not presented.strip():
        return TokenRefusal("Authorization: Bearer <token> required", {"WWW-Authenticate": _REALM})
    # header values arrive decoded as latin-1: encoding back gives the bytes the client sent
    if not hmac.compare_digest(presented.strip().encode("latin-1"), token.encode()):
        return TokenRefusal("wrong token", {"WWW-Authenticate": f'{_REALM}, error="invalid_token"'})
    return None


def bind(listen: Listen | str, *, key: str, error: type[ListenError] = ListenError) -> socket.socket:
    """A listening socket on ``listen`` (port 0: a free one); ``error`` names ``key``."""
    try:
        where = Listen.parse(listen, any_port=True)
        family = socket.AF_INET6 if ":" in where.host else socket.AF_INET
        return socket.create_server((where.host, where.port), family=family, backlog=128)
    except (OSError, ValueError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        raise error(f"{key}: cannot listen on {listen}: {reason}") from None


def url_of(sock: socket.socket) -> str:
    """The base URL of a bound socket, e.g. ``http://127.0.0.1:9470/``."""
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"


class _Server(uvicorn.Server):
    """uvicorn that leaves the process's signals alone and says when it accepts connections."""

    def __init__(self, app: ASGIApp, on_started: Callable[[], None]) -> None:
        super().__init__(
            uvicorn.Config(
                app,
                log_config=None,
                log_level="warning",
                access_log=False,
                lifespan="off",
                ws="none",
                server_header=False,
                timeout_graceful_shutdown=int(GRACE),
            )
        )
        self._on_started = on_started

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        if self.started:
            self._on_started()


async def serve(
    app: ASGIApp,
    listen: Listen | str | socket.socket,
    *,
    key: str = "listen",
    ready: Callable[[str], None] | None = None,
) -> None:
    """Serve ``app`` on ``listen`` (or a socket from ``bind``) until cancelled.

    ``ready(url)`` is called once the socket accepts connections. Cancelled, it stops
    accepting, lets requests in flight finish (at most ``GRACE`` s; cancelled again: at
    once), closes the socket, then re-raises ``CancelledError``. Raises ``ListenError``
    naming ``key`` if the address cannot be bound.
    """
    sock = listen if isinstance(listen, socket.socket) else bind(listen, key=key)
    url = url_of(sock)

    def started() -> None:
        logger.info("HTTP on %s", url)
        if ready is not None:
            ready(url)

    server = _Server(app, started)
    task = asyncio.create_task(server.serve(sockets=[sock]), name=f"http {url}")
    try:
        await asyncio.shield(task)
    except asyncio.CancelledError:
        server.should_exit = True
        while not task.done():
            try:
                await asyncio.shield(task)
            except asyncio.CancelledError:
                server.force_exit = True  # cancelled again: stop waiting for requests in flight
        raise
    finally:
        sock.close()


class ThreadedServer:
    """``serve`` on a daemon thread with its own event loop: ``start()``, then ``stop()``."""

    def __init__(
        self, app: ASGIApp, listen: Listen | str, *, key: str, error: type[ListenError] = ListenError
    ) -> None:
        self._app, self._listen, self._key, self._error = app, listen, key, error
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self.port = Listen.parse(listen, any_port=True).port  # the bound one once started

    def start(self, name: str = "ecpm-http") -> str:
        """Bind (raising ``error`` on failure) and serve; returns the base URL at once."""
        sock = bind(self._listen, key=self._key, error=self._error)
        self.port = int(sock.getsockname()[1])
        server = self._server = _Server(self._app, lambda: None)

        def run() -> None:
            try:
                asyncio.run(server.serve(sockets=[sock]))
            finally:
                sock.close()

        self._thread = threading.Thread(target=run, name=name, daemon=True)
        self._thread.start()
        return url_of(sock)

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.should_exit = True  # uvicorn looks at it every 0.1 s
        if self._thread is not None:
            self._thread.join(GRACE + 1)
