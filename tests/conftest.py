"""Shared test plumbing: real peers.

Tests that talk to a real peer (mosquitto, sipp, promtool, ...) carry
``@pytest.mark.peers("mosquitto", ...)``. When a peer's program is missing the test
fails if ``ECPM_REQUIRE_PEERS=1`` (as in CI), and is otherwise skipped with a loud
line at the end of the run saying what to install.
"""

from __future__ import annotations

import os
import shutil

import pytest
from hypothesis import settings

pytest_plugins = ["tests.support.postgres"]  # the PostgreSQL peer and the per-backend store fixture

# CI (CI=true) runs the property tests with a fixed seed, so a landing is reproducible;
# developers' runs stay random and keep finding new cases (a failure prints its example).
settings.register_profile("ci", derandomize=True)
if os.environ.get("CI") == "true":
    settings.load_profile("ci")

# program name -> Debian package that provides it
PEER_PACKAGES = {
    "mosquitto": "mosquitto",
    "mosquitto_sub": "mosquitto-clients",
    "mosquitto_pub": "mosquitto-clients",
    "sipp": "sip-tester",
    "promtool": "prometheus",
    "prometheus": "prometheus",
    "amtool": "prometheus-alertmanager",
    "alertmanager": "prometheus-alertmanager",
    "chromium": "chromium",
}

_missing: set[str] = set()


def _find(program: str) -> str | None:
    # mosquitto lives in /usr/sbin, which a non-root PATH may lack
    return shutil.which(program) or shutil.which(program, path="/usr/sbin:/usr/bin:/sbin:/bin")


def peer_path(program: str) -> str:
    """Absolute path of a peer program (the test must carry the peers marker)."""
    found = _find(program)
    if found is None:
        raise LookupError(program)
    return found


def pytest_runtest_setup(item: pytest.Item) -> None:
    for marker in item.iter_markers(name="peers"):
        missing = [p for p in marker.args if _find(p) is None]
        if not missing:
            continue
        _missing.update(missing)
        what = ", ".join(f"{p} (apt-get install {PEER_PACKAGES.get(p, p)})" for p in missing)
        if os.environ.get("ECPM_REQUIRE_PEERS") == "1":
            pytest.fail(f"peer missing and ECPM_REQUIRE_PEERS=1: {what}", pytrace=False)
        pytest.skip(f"peer missing: {what}")


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if _missing:
        packages = sorted({PEER_PACKAGES.get(p, p) for p in _missing})
        terminalreporter.write_sep(
            "!",
            f"PEER TESTS DID NOT RUN: install {' '.join(packages)} "
            "(make test does this as root) — CI sets ECPM_REQUIRE_PEERS=1 and fails instead",
            red=True,
            bold=True,
        )
