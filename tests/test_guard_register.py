"""The live-number guard on the registered-account path (issue 15): a registrar, and the
calls placed from an account, are dial targets like any other. Nothing reaches the wire
(a UDP sink on loopback stands where the registrar would be). No Kamailio needed: the
guard refuses before any peer could answer."""

from __future__ import annotations

from typing import Any

import pytest

from probes.checks import invite_check
from probes.config import Checks, InviteCheck, RegisterCheck, SipAccount, Target
from probes.outcome import CheckOutcome
from probes.register import register_check
from probes.sip import SipEngine
from tests.support.net import UdpSink
from tests.support.sip import with_engine

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


def target(registrar: str, uri: str, **account: Any) -> Target:
    fields = {"registrar": registrar, "username": "desk", "password": "secret", **account}
    return Target(
        id="desk",
        uri=uri,
        test_endpoint=True,  # Target alone does not run the guard: the engine must
        account=SipAccount.model_validate(fields),
        checks=Checks(
            register=RegisterCheck.model_validate({"timeout": "1s"}),
            invite=InviteCheck.model_validate(
                {
                    "first_response_timeout": "1s",
                    "answer_timeout": "2s",
                    "media_time": "1s",
                    "max_duration": "10s",
                }
            ),
        ),
    )


@pytest.mark.parametrize("registrar", LIVE_REGISTRARS)
def test_a_live_number_registrar_is_never_sent_a_register(sink: UdpSink, registrar: str) -> None:
    t = target(registrar.format(port=sink.port), f"sip:ecpm-test@127.0.0.1:{sink.port}")

    async def body(engine: SipEngine) -> CheckOutcome:
        return await register_check(engine, t)

    out = with_engine(body)
    assert (out.outcome, out.reason) == ("fail", "guard_refused"), out
    assert sink.received(0.5) == []


@pytest.mark.parametrize("registrar", LIVE_REGISTRARS[:3])
def test_no_call_is_placed_from_an_account_whose_registrar_is_refused(sink: UdpSink, registrar: str) -> None:
    t = target(registrar.format(port=sink.port), f"sip:ecpm-test@127.0.0.1:{sink.port}")

    async def body(engine: SipEngine) -> CheckOutcome:
        return await invite_check(engine, t)

    out = with_engine(body)
    assert (out.outcome, out.reason) == ("fail", "guard_refused"), out
    assert sink.received(0.5) == []
