"""SIP peers for tests: a SIPp UAS (or UAC), the project's responder in a subprocess,
test targets with short timers, and a quick way to run a check on a fresh engine.

Every peer listens on 127.0.0.1 only.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from probes.config import (
    Checks,
    EmergencyShape,
    InviteCheck,
    OptionsCheck,
    RegisterCheck,
    SipAccount,
    SipSettings,
    Target,
)
from probes.guard import Guard
from probes.sip import SipEngine
from tests.support.net import HOST, free_port, tcp_listening, udp_port_in_use
from tests.support.paths import REPO, SIPP_DIR
from tests.support.peers import peer_path
from tests.support.processes import Proc, wait_for

T = TypeVar("T")


class Sipp:
    """SIPp as a UAS on 127.0.0.1, one scenario, ``calls`` calls, then it exits; with
    ``remote`` ("127.0.0.1:PORT") a UAC calling it."""

    def __init__(
        self,
        tmp: Path,
        scenario: str | Path,
        *,
        rtp_echo: bool = False,
        keys: dict[str, str] | None = None,
        calls: int = 1,
        timeout: float = 20.0,
        transport: str = "u1",
        remote: str | None = None,
    ) -> None:
        self.port = free_port()
        self.media_port = free_port()
        self.messages = tmp / f"sipp-{self.port}-messages.log"
        self.errors = tmp / f"sipp-{self.port}-errors.log"
        path = Path(scenario) if Path(scenario).is_absolute() else SIPP_DIR / scenario
        cmd = [
            peer_path("sipp"), "-sf", str(path), "-i", HOST, "-p", str(self.port),
            "-mi", HOST, "-mp", str(self.media_port), "-t", transport, "-m", str(calls), "-nostdin",
            "-timeout", f"{timeout:.0f}s", "-timeout_error",
            "-trace_msg", "-message_file", str(self.messages),
            "-trace_err", "-error_file", str(self.errors),
        ]  # fmt: skip
        if rtp_echo:
            cmd.append("-rtp_echo")
        if remote is not None:
            cmd.append(remote)
        for key, value in (keys or {}).items():
            cmd += ["-key", key, value]
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        deadline = time.monotonic() + 5
        while not udp_port_in_use(self.port) if transport == "u1" else not tcp_listening(self.port):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self._give_up()
            time.sleep(0.02)

    def _give_up(self) -> None:
        """A SIPp that exited, or did not listen in time: stopped, its pipe closed, its words raised."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        said = self.stderr()
        self.stop()
        raise RuntimeError(f"sipp did not start: {said}")

    @property
    def uri(self) -> str:
        return f"sip:ecpm-test@{HOST}:{self.port}"

    def stderr(self) -> str:
        if self.proc.poll() is None:
            return ""
        assert self.proc.stderr is not None
        return self.proc.stderr.read().decode(errors="replace")

    def wait(self, timeout: float = 10.0) -> int:
        """SIPp's exit status: 0 when every call followed the scenario."""
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.stop()
            return -999

    def log(self) -> str:
        return self.messages.read_text(errors="replace") if self.messages.exists() else ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stderr is not None:
            self.proc.stderr.close()


class ResponderProcess(Proc):
    """``python -m ecpm responder`` on free loopback ports, once it says it is ready; its
    output in a temporary directory, removed (and kept in ``stderr_text``) when it stops."""

    def __init__(self, *extra: str, token: str | None = None) -> None:
        self.port = free_port()
        self.control_port = free_port()
        self.token = token
        self.stderr_text = ""
        argv = [
            sys.executable, "-m", "ecpm", "--log-level", "warning", "responder",
            "--port", str(self.port), "--control", f"{HOST}:{self.control_port}",
            "--ring-time", "20ms", *extra,
        ]  # fmt: skip
        super().__init__("responder", argv, Path(tempfile.mkdtemp(prefix="ecpm-responder-")), cwd=REPO)
        env = dict(os.environ)
        if token is not None:
            env["ECPM_TEST_TOKEN"] = token
        self.start(env)
        try:
            self.ready_line = wait_for(self._ready_line, 30, "the responder's ready line", [self], every=0.02)
        except AssertionError as error:
            self.stop()
            raise RuntimeError(f"responder did not start: {error}") from None

    def _ready_line(self) -> str:
        return next((line for line in self.text().splitlines(True) if "ecpm responder ready" in line), "")

    @property
    def uri(self) -> str:
        return f"sip:ecpm-test@{HOST}:{self.port}"

    def http(
        self, method: str, path: str, body: str | None = None, token: str | None = None
    ) -> tuple[int, str]:
        req = urllib.request.Request(
            f"http://{HOST}:{self.control_port}{path}",
            data=None if body is None else body.encode(),
            method=method,
        )
        if token is not None:
            req.add_header("X-ECPM-Token", token)
        try:
            with urllib.request.urlopen(req, timeout=5) as resp:
                return int(resp.status), resp.read().decode()
        except urllib.error.HTTPError as err:
            return int(err.code), err.read().decode()

    def set_fault(self, fault: str) -> None:
        status, body = self.http("PUT", "/fault", fault, self.token)
        assert status == 200, body

    def stop(self, sig: int = signal.SIGTERM) -> int:
        code = super().stop(sig)
        if self.workdir.exists():
            self.stderr_text = self.text()
            shutil.rmtree(self.workdir, ignore_errors=True)
        return code


def make_target(
    uri: str,
    *,
    transport: str = "udp",
    proxy: str | None = None,
    emergency: EmergencyShape | None = None,
    options: bool = True,
    **invite: Any,
) -> Target:
    """A test target with short timers (tests must be quick)."""
    settings: dict[str, Any] = {
        "first_response_timeout": "1s",
        "answer_timeout": "2s",
        "media_time": "1s",
        "max_duration": "10s",
    }
    settings.update(invite)
    return Target(
        id="t",
        uri=uri,
        test_endpoint=True,
        transport=transport,  # type: ignore[arg-type]
        outbound_proxy=proxy,
        emergency=emergency,
        checks=Checks(
            invite=InviteCheck.model_validate(settings),
            options=OptionsCheck.model_validate({"timeout": "1s"}) if options else None,
        ),
    )


def account_target(registrar: str, uri: str, **account: Any) -> Target:
    """A target called from a SIP account (``account`` overrides its fields), with a
    register check and short timers."""
    fields = {"registrar": registrar, "username": "desk", "password": "secret", "expiry": "60s", **account}
    return Target(
        id="desk",
        uri=uri,
        test_endpoint=True,  # Target alone does not run the guard: the engine must
        account=SipAccount.model_validate(fields),
        checks=Checks(
            register=RegisterCheck.model_validate({"timeout": "1s"}),
            invite=InviteCheck.model_validate(
                {
                    "first_response_timeout": "2s",
                    "answer_timeout": "3s",
                    "media_time": "1s",
                    "max_duration": "10s",
                }
            ),
        ),
    )


def with_engine(
    body: Callable[[SipEngine], Awaitable[T]],
    *,
    settings: SipSettings | None = None,
    guard: Guard | None = None,
    **engine_kwargs: Any,
) -> T:
    """Run ``body(engine)`` on a fresh engine in a fresh event loop."""

    async def main() -> T:
        engine = SipEngine(settings or SipSettings(), guard or Guard(home_region="GB"), **engine_kwargs)
        async with engine:
            return await body(engine)

    return asyncio.run(main())


@contextlib.contextmanager
def elapsed() -> Iterator[list[float]]:
    box: list[float] = []
    start = time.monotonic()
    try:
        yield box
    finally:
        box.append(time.monotonic() - start)
