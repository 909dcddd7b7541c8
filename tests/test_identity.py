"""Caller number and location delivered (stage ``identity``), against the real responder:
directly and through a real Kamailio as registrar and proxy (the registered-call path,
digest auth on the REGISTER and the INVITE). Every peer is on 127.0.0.1."""

from __future__ import annotations

import pytest

from probes.checks import invite_check
from probes.config import EmergencyShape, Location, Target
from probes.outcome import CheckOutcome
from probes.register import register_check
from probes.sip import SipEngine
from tests.support.kamailio import PASSWORD, USER, Kamailio
from tests.support.sip import ResponderProcess, account_target, make_target, with_engine

NUMBER = "+441632960000"
LONDON = Location(latitude=51.5034, longitude=-0.1276, radius_m=50, civic={"country": "GB", "A1": "London"})
SHAPE = EmergencyShape(callback_number=NUMBER, location=LONDON)


def registered(kamailio: Kamailio) -> Target:
    """The account registered at Kamailio, its calls emergency-shaped and checking DTMF."""
    t = account_target(kamailio.registrar, kamailio.service_uri, username=USER, password=PASSWORD)
    invite = t.checks.invite
    assert invite is not None
    checks = t.checks.model_copy(update={"invite": invite.model_copy(update={"dtmf": "1234#"})})
    return t.model_copy(update={"emergency": SHAPE, "checks": checks})


def test_number_and_location_reach_the_responder(clean_responder: ResponderProcess) -> None:
    out = with_engine(lambda e: invite_check(e, make_target(clean_responder.uri, emergency=SHAPE)))
    assert out.outcome == "pass", out
    assert list(out.timings) == ["transport", "trying", "ringing", "answer", "identity", "media", "teardown"]
    assert out.detail["identity.cli"] == f"<tel:{NUMBER}>"
    assert out.detail["nena.location"] == "geo:51.5034,-0.1276;u=50"


def test_a_wrong_callback_number_is_a_mismatch(clean_responder: ResponderProcess) -> None:
    """The probe asserts one number, the target expects another: what a number rewritten
    on the way looks like."""
    shape = SHAPE.model_copy(update={"p_asserted_identity": "tel:+441632960999"})
    out = with_engine(lambda e: invite_check(e, make_target(clean_responder.uri, emergency=shape)))
    assert (out.outcome, out.stage, out.reason) == ("fail", "identity", "cli_mismatch"), out
    assert "identity" not in out.timings and "media" in out.timings  # media still judged


@pytest.mark.peers("kamailio")
def test_a_registered_call_through_kamailio_delivers_number_and_location(kamailio: Kamailio) -> None:
    """The done-when of issue 15: registered with digest auth, the call goes through
    Kamailio to the responder and every stage passes: register, answer, media, identity
    (number and location delivered) and DTMF."""
    t = registered(kamailio)

    async def body(engine: SipEngine) -> tuple[CheckOutcome, CheckOutcome]:
        return await register_check(engine, t), await invite_check(engine, t)

    reg, call = with_engine(body)
    assert reg.outcome == "pass" and reg.sip_status == 200, reg
    assert call.outcome == "pass", call
    assert list(call.timings) == [
        "transport", "trying", "ringing", "answer", "identity", "media", "dtmf", "teardown",
    ]  # fmt: skip
    assert call.detail["identity.cli"] == f"<tel:{NUMBER}>"
    assert call.detail["dtmf.received"] == "1234#"
    log = kamailio.text()
    assert "ecpm: challenged INVITE" in log and "ecpm: relayed INVITE to the responder" in log


@pytest.mark.peers("kamailio")
@pytest.mark.parametrize(
    ("fault", "stage", "reason"),
    [
        ("strip_identity", "identity", "cli_missing"),
        ("strip_location", "identity", "location_missing"),
        ("dtmf_lost", "dtmf", "dtmf_missing"),
    ],
)
def test_each_fault_through_kamailio_fails_at_its_own_stage(
    kamailio: Kamailio, clean_responder: ResponderProcess, fault: str, stage: str, reason: str
) -> None:
    """The registered path: the responder's faults fail the call at their own stage with
    their own reason (the registration ones: tests/test_sip_register.py)."""
    clean_responder.set_fault(fault)
    out = with_engine(lambda e: invite_check(e, registered(kamailio)))
    assert (out.outcome, out.stage, out.reason, out.sip_status) == ("fail", stage, reason, 200), out
    assert out.media is not None and out.media.tone_heard  # the call itself worked


@pytest.mark.peers("kamailio")
def test_srtp_refused_through_kamailio(kamailio: Kamailio, clean_responder: ResponderProcess) -> None:
    clean_responder.set_fault("plain_rtp")
    t = registered(kamailio).model_copy(update={"srtp": "mandatory"})
    out = with_engine(lambda e: invite_check(e, t))
    assert (out.outcome, out.stage, out.reason, out.sip_status) == ("fail", "answer", "srtp_refused", 488), (
        out
    )
