"""Child processes for tests: the one process wrapper (``Proc``), ``ecpm <role>`` on it
(``Process``), ``ecpm ARGS`` run to completion (``run_ecpm``), and the one ``wait_for``."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Self, TypeVar

import httpx
import yaml

from tests.support.net import HOST, free_port
from tests.support.paths import REPO
from tests.support.peers import peer_path

T = TypeVar("T")


def run_ecpm(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """``ecpm ARGS`` as a user runs it, from the repository; ``timeout`` is a safety net."""
    return subprocess.run(
        [sys.executable, "-m", "ecpm", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def wait_for(
    cond: Callable[[], T], timeout: float, what: str, procs: Sequence[Proc] = (), every: float = 0.2
) -> T:
    """Poll ``cond`` until it returns something truthy, and return that; fail naming ``what``
    (and the log of any watched process that died) when ``timeout`` passes first. A peer
    not answering yet (OSError, httpx.HTTPError, a half-written body) counts as not yet."""
    deadline = time.monotonic() + timeout
    while True:
        for proc in procs:
            proc.check()
        with contextlib.suppress(httpx.HTTPError, OSError, ValueError, KeyError):
            if value := cond():
                return value
        if time.monotonic() >= deadline:
            logs = "".join(f"\n{p.tail()}" for p in procs)
            raise AssertionError(f"timed out after {timeout}s waiting for {what}{logs}")
        time.sleep(every)


class Proc:
    """A child process with its output (stdout and stderr) in ``workdir/NAME.log``, stopped
    by its own pid. ``url`` is where it serves HTTP, if it does; ``proc`` the Popen."""

    def __init__(
        self, name: str, argv: Sequence[str | Path], workdir: Path, *, url: str = "", cwd: Path | None = None
    ) -> None:
        self.name = name
        self.argv = [str(a) for a in argv]
        self.workdir = workdir
        self.cwd = cwd or workdir
        self.url = url
        self.log = workdir / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._stopped = False

    def start(self, env: Mapping[str, str] | None = None) -> Self:
        self._stopped = False
        with self.log.open("ab") as log:  # the child keeps its own descriptor
            self.proc = subprocess.Popen(
                self.argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=self.cwd,
                env=None if env is None else dict(env), start_new_session=True,
            )  # fmt: skip
        return self

    @property
    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def text(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace") if self.log.exists() else ""

    def tail(self, lines: int = 40) -> str:
        return f"--- {self.name} ({' '.join(self.argv[:3])} ...) log tail:\n" + "\n".join(
            self.text().splitlines()[-lines:]
        )

    def check(self) -> None:
        """Fail at once (with its log) if the process exited without being stopped."""
        if self.proc is not None and not self._stopped and self.proc.poll() is not None:
            raise AssertionError(f"{self.name} exited with {self.proc.returncode}\n{self.tail()}")

    def stop(self, sig: int = signal.SIGTERM) -> int:
        """Signal the process (by its pid), reap it (``kill -9`` after 30 s); its exit code."""
        if self.proc is None:
            return 0  # never started
        self._stopped = True
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    def kill(self) -> int:
        """``kill -9`` this process (by its pid) and reap it."""
        return self.stop(signal.SIGKILL)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def get(self, path: str, **kw: Any) -> httpx.Response:
        with httpx.Client(base_url=self.url, timeout=5) as client:
            return client.get(path, **kw)

    def ready(self, path: str, timeout: float = 30) -> Self:
        wait_for(lambda: self.get(path).status_code == 200, timeout, f"{self.name} {path}", [self], every=0.1)
        return self

    # ---- the servers this project talks to

    @classmethod
    @contextlib.contextmanager
    def _served(
        cls, workdir: Path, name: str, program: str, config: Path, storage_flag: str, *extra: str
    ) -> Iterator[Proc]:
        """A Prometheus-family server on a free loopback port with a fresh data directory,
        once its /-/ready answers."""
        port = free_port()
        storage = workdir / f"{name}-data"
        storage.mkdir()
        argv = [
            peer_path(program), f"--config.file={config}", f"{storage_flag}={storage}",
            f"--web.listen-address={HOST}:{port}", *extra,
        ]  # fmt: skip
        with cls(name, argv, workdir, url=f"http://{HOST}:{port}").start() as proc:
            yield proc.ready("/-/ready")

    @classmethod
    def alertmanager(cls, workdir: Path, config: Path) -> contextlib.AbstractContextManager[Proc]:
        # no gossip port: one instance on loopback
        return cls._served(
            workdir, "alertmanager", "prometheus-alertmanager", config, "--storage.path",
            "--cluster.listen-address=",
        )  # fmt: skip

    @classmethod
    def prometheus(cls, workdir: Path, config: Path) -> contextlib.AbstractContextManager[Proc]:
        return cls._served(workdir, "prometheus", "prometheus", config, "--storage.tsdb.path")


class Process(Proc):
    """``python -m ecpm <role> -c <config>`` from the repository, its config written to
    ``workdir/NAME.yaml``; started at once unless ``start=False``."""

    def __init__(
        self,
        role: str,
        config: dict[str, Any],
        workdir: Path,
        name: str,
        *,
        start: bool = True,
        url: str = "",
    ) -> None:
        self.role = role
        self.config_path = workdir / f"{name}.yaml"
        argv: list[str | Path] = [sys.executable, "-m", "ecpm", role, "-c", self.config_path]
        super().__init__(name, argv, workdir, url=url, cwd=REPO)
        self.write(config)
        if start:
            self.start()

    def write(self, config: dict[str, Any] | str) -> None:
        """(Re)write the config file; a str is written as it is (e.g. a broken file)."""
        text = config if isinstance(config, str) else yaml.safe_dump(config, sort_keys=False)
        self.config_path.write_text(text, encoding="utf-8")
