"""A real PostgreSQL for the store tests (Debian's ``postgresql``; ``make test`` installs it).

One cluster per session, started by ``initdb``/``pg_ctl`` from the server's own bin
directory (Debian keeps them off PATH), as an unprivileged user (``postgres`` when the
tests run as root: initdb refuses root), listening on a unix socket in a private
directory only — no TCP at all. Each test gets a fresh database (``postgres_url``).
``store_where`` runs a test once per backend: a SQLite file, then a PostgreSQL URL.

Missing server or psycopg: the PostgreSQL runs are skipped, loudly (a line at the end),
and fail instead under ``ECPM_REQUIRE_PEERS=1``, as every peer does (``tests/conftest.py``).
"""

from __future__ import annotations

import glob
import itertools
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

PORT = 5432  # names the socket file only: the directory is private, nothing listens on TCP
_missing: list[str] = []
_names = itertools.count(1)


def _bindir() -> Path | None:
    found = shutil.which("pg_ctl")
    dirs = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda d: int(d.split("/")[-2]), reverse=True)
    for d in [*dirs, *([os.path.dirname(found)] if found else [])]:
        if Path(d, "initdb").is_file() and Path(d, "pg_ctl").is_file():
            return Path(d)
    return None


def _absent(what: str) -> None:
    _missing.append(what)
    if os.environ.get("ECPM_REQUIRE_PEERS") == "1":
        pytest.fail(f"peer missing and ECPM_REQUIRE_PEERS=1: {what}", pytrace=False)
    pytest.skip(f"peer missing: {what}")


class Cluster:
    """A throwaway PostgreSQL cluster under ``root``, run by ``user`` (None: this process's)."""

    def __init__(self, bindir: Path, root: Path, user: str | None) -> None:
        self.bindir, self.root, self.user = bindir, root, user
        self.data, self.socket = root / "data", root / "socket"

    def _run(self, program: str, *args: str) -> None:
        command = [str(self.bindir / program), *args]
        if self.user is not None:
            command = ["runuser", "-u", self.user, "--", *command]
        done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"{program} failed ({done.returncode}): {done.stdout}{done.stderr}")

    def start(self) -> None:
        self.socket.mkdir()
        if self.user is not None:
            owner = pwd.getpwnam(self.user)
            for path in (self.root, self.socket):
                os.chown(path, owner.pw_uid, owner.pw_gid)
        self._run("initdb", "-D", str(self.data), "-U", "ecpm", "--auth=trust", "-E", "UTF8",
                  "--locale=C", "--no-sync")  # fmt: skip
        self.serve()

    def serve(self) -> None:
        """Start the server on the cluster (again, after ``stop``: the fault suite's restart)."""
        options = f"-p {PORT} -k {self.socket} -c listen_addresses='' -c fsync=off -c full_page_writes=off"
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.root / "log"), "-w", "-o", options, "start")

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")

    def url(self, database: str) -> str:
        return f"postgresql://ecpm@/{database}?host={self.socket}&port={PORT}"

    def create_database(self) -> str:
        """A new, empty database; its name."""
        name = f"ecpm_test_{next(_names)}"
        self.admin(f"CREATE DATABASE {name}")
        return name

    def admin(self, sql: str) -> None:
        import psycopg  # noqa: PLC0415 - only once psycopg is known to be there

        with psycopg.connect(self.url("postgres"), autocommit=True) as conn:
            conn.execute(sql)  # type: ignore[arg-type]  # a name of ours, never input


@pytest.fixture(scope="session")
def postgres_cluster() -> Iterator[Cluster]:
    bindir = _bindir()
    if bindir is None:
        _absent("PostgreSQL server, initdb and pg_ctl (apt-get install postgresql)")
    try:
        import psycopg  # noqa: F401, PLC0415 - the postgres extra
    except ImportError:
        _absent("psycopg (pip install -e '.[test]')")
    user = None
    if os.geteuid() == 0:
        try:
            user = pwd.getpwnam("postgres").pw_name
        except KeyError:
            _absent("the user postgres to run the server as (Debian's postgresql creates it)")
    assert bindir is not None
    cluster = Cluster(bindir, Path(tempfile.mkdtemp(prefix="ecpm-pg-")), user)
    try:
        cluster.start()
        yield cluster
    finally:
        if (cluster.data / "postmaster.pid").exists():
            cluster.stop()
        shutil.rmtree(cluster.root, ignore_errors=True)


@pytest.fixture
def postgres_url(postgres_cluster: Cluster) -> Iterator[str]:
    """A new, empty database on the session's cluster, dropped after the test."""
    name = postgres_cluster.create_database()
    yield postgres_cluster.url(name)
    postgres_cluster.admin(f"DROP DATABASE {name} WITH (FORCE)")


@pytest.fixture(params=["sqlite", "postgres"])
def store_where(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Where a test's store lives, once per backend: what ``open_store`` and ``--db`` take."""
    if request.param == "sqlite":
        return str(tmp_path / "monitor.db")
    return str(request.getfixturevalue("postgres_url"))


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if _missing:
        terminalreporter.write_sep("!", f"POSTGRESQL TESTS DID NOT RUN: {_missing[0]}", red=True, bold=True)
