"""The register check and calls from a registered account, against a real Kamailio
(tests/kamailio/kamailio.cfg: digest auth, usrloc, record-route, the test service routed
to the responder; UDP and TCP), and a SIPp registrar that refuses every expiry. Every
peer is on 127.0.0.1. (Debian's kamailio has no tls module, so TLS is not run here.)"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from probes.checks import invite_check
from probes.config import Target
from probes.outcome import CheckOutcome
from probes.register import register_check
from probes.sip import SipEngine
from tests.support.kamailio import PASSWORD, USER, Kamailio
from tests.support.monitor import Clock, ProbeSim, make_core
from tests.support.net import HOST, free_port
from tests.support.sip import ResponderProcess, Sipp, account_target, with_engine

pytestmark = pytest.mark.peers("kamailio")


def target(registrar: str, uri: str, **account: Any) -> Target:
    return account_target(registrar, uri, **{"username": USER, "password": PASSWORD, **account})


def test_register_passes_through_the_digest_challenge(kamailio: Kamailio) -> None:
    out = with_engine(lambda e: register_check(e, target(kamailio.registrar, kamailio.service_uri)))
    assert out.outcome == "pass", out
    assert out.sip_status == 200 and out.detail["registration"] == "new"
    assert set(out.timings) == {"transport", "trying", "answer"}
    assert out.timings["trying"] <= out.timings["answer"]  # the 401, then the 200 to the retry
    assert 10 <= int(out.detail["expires"]) <= 60 and out.detail["expires_asked"] == "60"
    assert out.detail["refreshes"] == "0"
    assert "ecpm: challenged REGISTER" in kamailio.text()


def test_a_wrong_password_fails_auth_failed(kamailio: Kamailio) -> None:
    t = target(kamailio.registrar, kamailio.service_uri, password="not-the-password")
    out = with_engine(lambda e: register_check(e, t))
    assert (out.outcome, out.stage, out.reason) == ("fail", "answer", "auth_failed"), out
    assert out.sip_status == 401


def test_an_auth_user_the_registrar_does_not_know_fails_forbidden(kamailio: Kamailio) -> None:
    t = target(kamailio.registrar, kamailio.service_uri, auth_username="mallory")
    out = with_engine(lambda e: register_check(e, t))
    assert (out.outcome, out.stage, out.reason) == ("fail", "answer", "forbidden"), out
    assert out.sip_status == 403


@pytest.fixture
def strict_registrar(tmp_path: Path, responder: ResponderProcess) -> Iterator[Kamailio]:
    """Kamailio granting 20 to 30 s, answering a shorter Expires with 423 and Min-Expires."""
    k = Kamailio(tmp_path, responder=responder.uri, min_expires=20, max_expires=30, too_brief=True)
    with k.start() as running:
        yield running


@pytest.mark.parametrize(
    ("asked", "granted", "refused"),
    [("10", "20", True), ("300", "30", False)],
    ids=["423-retried-with-min-expires", "granted-less-than-asked"],
)
def test_the_granted_expiry_is_recorded(
    strict_registrar: Kamailio, asked: str, granted: str, refused: bool
) -> None:
    """Below the minimum: a 423, pjsip asks again for Min-Expires and passes with it;
    above the maximum: Kamailio grants its maximum."""
    t = target(strict_registrar.registrar, strict_registrar.service_uri, expiry=f"{asked}s")
    out = with_engine(lambda e: register_check(e, t))
    assert out.outcome == "pass", out
    assert (out.detail["expires_asked"], out.detail["expires"]) == (asked, granted), out.detail
    assert ("ecpm: refused REGISTER: Expires 10" in strict_registrar.text()) is refused  # the 423


@pytest.mark.peers("sipp")
def test_a_registrar_refusing_the_min_expires_too_fails_expires_rejected(tmp_path: Path) -> None:
    """tests/sipp/uas_register_423.xml: 423 Min-Expires 7200, and 423 again to the
    REGISTER asking for 7200 (pjsip's retry): the registrar refuses any expiry."""
    sipp = Sipp(tmp_path, "uas_register_423.xml")
    try:
        t = target(f"sip:{HOST}:{sipp.port}", f"sip:ecpm-test@{HOST}:{sipp.port}")
        out = with_engine(lambda e: register_check(e, t))
        assert sipp.wait(10) == 0, sipp.log()[-3000:]  # both REGISTERs, the second asking 7200
    finally:
        sipp.stop()
    assert (out.outcome, out.stage, out.reason) == ("fail", "answer", "expires_rejected"), out
    assert out.sip_status == 423 and out.detail["expires_asked"] == "60"


def test_a_registrar_that_is_down_fails_at_transport_fast() -> None:
    t = target(f"sip:{HOST}:{free_port()}", f"sip:ecpm-test@{HOST}:5060")  # nothing listens
    began = time.monotonic()
    out = with_engine(lambda e: register_check(e, t))
    assert (out.outcome, out.stage) == ("fail", "transport"), out
    assert out.reason in ("no_response", "transport_error")
    assert time.monotonic() - began < 8


def test_a_call_from_the_account_answers_the_407_and_verifies_media(kamailio: Kamailio) -> None:
    t = target(kamailio.registrar, kamailio.service_uri)
    out = with_engine(lambda e: invite_check(e, t))
    assert out.outcome == "pass", out
    assert out.media is not None and out.media.tone_heard and out.media.echo_heard
    log = kamailio.text()  # the config logs each challenge and relay
    assert "ecpm: challenged INVITE" in log and "ecpm: relayed INVITE to the responder" in log


def test_register_and_a_registered_call_over_tcp(kamailio: Kamailio) -> None:
    """The account's ``transport: tcp`` carries the REGISTERs and the call's INVITE (Kamailio
    relays it to the responder over UDP: a double Record-Route); media verified."""
    t = target(kamailio.registrar, kamailio.service_uri, transport="tcp")

    async def body(engine: SipEngine) -> tuple[CheckOutcome, CheckOutcome]:
        return await register_check(engine, t), await invite_check(engine, t)

    reg, call = with_engine(body)
    assert reg.outcome == "pass" and reg.sip_status == 200, reg
    assert call.outcome == "pass", call
    assert call.media is not None and call.media.tone_heard and call.media.echo_heard
    log = kamailio.text()
    assert "ecpm: challenged REGISTER over tcp" in log and "ecpm: challenged INVITE over tcp" in log
    assert "ecpm: relayed INVITE to the responder (came over tcp)" in log
    assert " over udp" not in log


def test_pjsuas_own_refresh_of_a_short_registration_shows_in_the_next_result(
    kamailio: Kamailio,
) -> None:
    """10 s granted (the least the account may ask and Kamailio grants): pjsua refreshes
    the binding 5 s before it expires, by itself; the next register check counts it."""
    t = target(kamailio.registrar, kamailio.service_uri, expiry="10s")

    async def body(engine: SipEngine) -> tuple[CheckOutcome, CheckOutcome, CheckOutcome]:
        first = await register_check(engine, t)
        await asyncio.sleep(7)  # one refresh at about 5 s, the next not before 10 s
        second = await register_check(engine, t)
        third = await register_check(engine, t)  # at once: nothing refreshed in between
        return first, second, third

    first, second, third = with_engine(body)
    assert first.outcome == "pass" and first.detail["expires"] == "10", first
    assert (first.detail["registration"], first.detail["refreshes"]) == ("new", "0")
    assert second.outcome == "pass", second
    assert (second.detail["registration"], second.detail["refreshes"]) == ("refresh", "1"), second
    assert third.detail["refreshes"] == "0", third
    # Kamailio bound four times: three checks and pjsua's own refresh between two of them
    assert kamailio.text().count(f"ecpm: saved REGISTER of {USER}: Expires 10") == 4


def registration_up(tmp_path: Path, outcomes: list[CheckOutcome]) -> list[float | None]:
    """ecpm_registration_up after each of these register outcomes reaches a monitor."""
    clock = Clock()
    core, registry, _ = make_core(tmp_path, clock, probes=("p1",), targets=("desk",))
    sim, seen = ProbeSim("p1"), []
    for out in outcomes:
        result = sim.result("desk", out.outcome, clock.advance(1), check="register", stage=out.stage)
        assert core.handle(sim.topic("desk"), result.to_json()) is None
        core.store.commit()
        core.evaluate(clock())
        seen.append(registry.get_sample_value("ecpm_registration_up", {"target": "desk", "probe": "p1"}))
    return seen


def test_kamailio_restarted_shows_the_loss_and_the_re_registration(
    kamailio: Kamailio, tmp_path: Path
) -> None:
    t = target(kamailio.registrar, kamailio.service_uri)

    async def body(engine: SipEngine) -> list[CheckOutcome]:
        outs = [await register_check(engine, t)]
        kamailio.stop()
        outs.append(await register_check(engine, t))  # lost: the registrar is gone
        outs.append(await invite_check(engine, t))  # a call that needs it fails at once
        kamailio.restart()
        outs.append(await register_check(engine, t))
        outs.append(await invite_check(engine, t))
        return outs

    first, lost, call_lost, back, call_back = with_engine(body)
    assert first.outcome == "pass" and first.detail["registration"] == "new"
    assert (lost.outcome, lost.stage) == ("fail", "transport"), lost
    assert (call_lost.outcome, call_lost.stage, call_lost.reason) == ("fail", "transport", "not_registered")
    assert "answer" not in call_lost.timings
    assert back.outcome == "pass" and back.detail["registration"] == "re-registered", back
    assert back.detail["lost"]
    assert call_back.outcome == "pass", call_back
    assert registration_up(tmp_path, [first, lost, back]) == [1.0, 0.0, 1.0]


def test_a_call_from_the_registered_account_to_a_live_number_is_refused(kamailio: Kamailio) -> None:
    """Registered for real, the account changes where the INVITE goes (through the
    registrar's proxy), never whether the guard judges it: no INVITE reaches Kamailio."""
    live = kamailio.service_uri.replace("ecpm-test@", "999@")
    t = target(kamailio.registrar, live)
    out = with_engine(lambda e: invite_check(e, t))
    assert (out.outcome, out.reason) == ("fail", "guard_refused"), out
    assert out.detail["guard.reason"] == "emergency_number"
    assert "challenged INVITE" not in kamailio.text() and "relayed INVITE" not in kamailio.text()
