"""Shared test plumbing: real peers, and the fixtures every module may ask for by name.

Tests that talk to a real peer (mosquitto, sipp, promtool, ...) carry
``@pytest.mark.peers("mosquitto", ...)``. When a peer's program is missing the test
fails if ``ECPM_REQUIRE_PEERS=1`` (as in CI), and is otherwise skipped with a loud
line at the end of the run saying what to install.

The helpers behind the fixtures are in tests/support/.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import settings

from tests.support.brokers import Broker
from tests.support.kamailio import Kamailio
from tests.support.net import UdpSink
from tests.support.peers import PEER_PACKAGES, find
from tests.support.sip import ResponderProcess, Sipp

pytest_plugins = ["tests.support.postgres"]  # the PostgreSQL peer and the per-backend store fixture

# CI (CI=true) runs the property tests with a fixed seed, so a landing is reproducible;
# developers' runs stay random and keep finding new cases (a failure prints its example).
settings.register_profile("ci", derandomize=True)
if os.environ.get("CI") == "true":
    settings.load_profile("ci")

_missing: set[str] = set()


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "broker(**options): options of the `broker` fixture's Broker (e.g. persistence=True)"
    )


def pytest_runtest_setup(item: pytest.Item) -> None:
    for marker in item.iter_markers(name="peers"):
        missing = [p for p in marker.args if find(p) is None]
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


@pytest.fixture
def broker(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Broker]:
    """A running mosquitto for the test; ``@pytest.mark.broker(persistence=True)`` shapes it."""
    marker = request.node.get_closest_marker("broker")
    with Broker(tmp_path, **(marker.kwargs if marker else {})) as running:
        yield running


@pytest.fixture
def sink() -> Iterator[UdpSink]:
    s = UdpSink()
    yield s
    s.close()


@pytest.fixture
def sipp_factory(tmp_path: Path) -> Iterator[Callable[..., Sipp]]:
    """Start SIPp peers (``Sipp``'s arguments after ``tmp``); all stopped after the test."""
    started: list[Sipp] = []

    def start(scenario: str | Path, **kwargs: Any) -> Sipp:
        peer = Sipp(tmp_path, scenario, **kwargs)
        started.append(peer)
        return peer

    yield start
    for peer in started:
        peer.stop()


@pytest.fixture(scope="module")
def responder() -> Iterator[ResponderProcess]:
    """One responder shared by a module's tests."""
    peer = ResponderProcess()
    yield peer
    peer.stop()


@pytest.fixture
def clean_responder(responder: ResponderProcess) -> Iterator[ResponderProcess]:
    """The shared responder with its fault reset before and after the test."""
    responder.set_fault("none")
    yield responder
    responder.set_fault("none")


@pytest.fixture
def kamailio(tmp_path: Path, responder: ResponderProcess) -> Iterator[Kamailio]:
    """Kamailio on a free loopback port, routing its test service to the module's responder."""
    with Kamailio(tmp_path, responder=responder.uri).start() as running:
        yield running
