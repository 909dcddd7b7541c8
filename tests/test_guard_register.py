"""The live-number guard on the registered-account path (issue 15): a registrar, and the
calls placed from an account, are dial targets like any other. Nothing reaches the wire
(a UDP sink on loopback stands where the registrar would be). No Kamailio needed: the
guard refuses before any peer could answer."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import pytest

from probes.checks import invite_check
from probes.config import Target
from probes.outcome import CheckOutcome
from probes.register import register_check
from probes.sip import SipEngine
from tests.support.net import UdpSink
from tests.support.sip import account_target, with_engine

# live emergency numbers in the forms a registrar URI can carry them (the guard's own
# grammar is proven in test_guard.py; these prove the register path goes through it)
LIVE_REGISTRARS = (
    "sip:999@127.0.0.1:{port}",
    "sip:112@127.0.0.1:{port};user=phone",
    "sip:%39%39%39@127.0.0.1:{port}",
    "sip:+44999@127.0.0.1:{port}",
    "sip:sos@127.0.0.1:{port}",
    "sip:911@127.0.0.1:{port}",
)


@pytest.mark.parametrize("check", [register_check, invite_check], ids=["register", "invite"])
@pytest.mark.parametrize("registrar", LIVE_REGISTRARS)
def test_a_live_number_registrar_is_never_sent_anything(
    sink: UdpSink, registrar: str, check: Callable[[SipEngine, Target], Awaitable[CheckOutcome]]
) -> None:
    """Neither its register check nor a call from the account sends a byte."""
    t = account_target(registrar.format(port=sink.port), f"sip:ecpm-test@127.0.0.1:{sink.port}")
    out = with_engine(lambda engine: check(engine, t))
    assert (out.outcome, out.reason) == ("fail", "guard_refused"), out
    assert sink.received(0.5) == []
