"""The checks against SIPp, an independent SIP implementation, on loopback.

What "pass" means against a plain echo UAS (SIPp ``-rtp_echo``): SIPp returns our
own RTP and plays nothing of its own, so a target pointed at it sets
``expect_tone: false``: the verdict rests on our 1000 Hz tone coming back (two-way
audio proven by the echo) and no responder tone is required.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest
from pydantic import SecretStr

from probes.checks import ANNOUNCEMENT, invite_check, options_check
from probes.config import Auth, EmergencyShape, Location, OptionsCheck
from probes.outcome import CheckOutcome
from probes.sip import SipEngine
from tests.support.net import free_port
from tests.support.paths import SIPP_DIR
from tests.support.sip import Sipp, make_target, with_engine

pytestmark = pytest.mark.peers("sipp")

SipFactory = Callable[..., Sipp]
LONDON = Location(latitude=51.5034, longitude=-0.1276, radius_m=25)


def variant(tmp_path: Path, name: str, old: str, new: str) -> Path:
    """A copy of a shipped scenario with one line changed (SIPp wants literal status codes)."""
    text = (SIPP_DIR / name).read_text()
    assert old in text
    path = tmp_path / f"variant-{len(list(tmp_path.glob('variant-*')))}-{name}"
    path.write_text(text.replace(old, new))
    return path


def reject(tmp_path: Path, status_line: str) -> Path:
    return variant(tmp_path, "uas_reject.xml", "SIP/2.0 503 Service Unavailable", f"SIP/2.0 {status_line}")


def check(target_uri: str, *, announcement: Path | None = None, **kwargs: object) -> CheckOutcome:
    target = make_target(target_uri, **kwargs)  # type: ignore[arg-type]

    async def body(engine: SipEngine) -> CheckOutcome:
        return await invite_check(engine, target, announcement=announcement)

    return with_engine(body)


def test_echo_uas_passes_on_the_echo(sipp_factory: SipFactory) -> None:
    peer = sipp_factory("uas_echo.xml", rtp_echo=True)
    out = check(peer.uri, expect_tone=False)
    assert out.outcome == "pass", out
    assert out.media is not None
    assert out.media.echo_heard is True and out.media.tone_heard is False
    assert out.media.rx_packets >= 40 and out.media.loss == 0.0
    assert out.timings["trying"] <= out.timings["ringing"] <= out.timings["answer"]
    assert peer.wait() == 0  # SIPp saw ACK and BYE, in order
    assert "BYE sip:" in peer.log()


def test_echo_uas_without_responder_tone_fails_no_tone(sipp_factory: SipFactory) -> None:
    """Expecting a responder tone from a plain echo UAS: two-way audio works, but the
    far end is not a test responder (fail no_tone, and the announcement plays)."""
    peer = sipp_factory("uas_echo.xml", rtp_echo=True)
    out = check(peer.uri, announcement=ANNOUNCEMENT)
    assert (out.outcome, out.stage, out.reason) == ("fail", "media", "no_tone"), out
    assert out.media is not None and out.media.echo_heard is True
    assert out.detail["announcement"] == "played"
    assert peer.wait() == 0


def test_503_fails_at_answer(sipp_factory: SipFactory) -> None:
    peer = sipp_factory("uas_reject.xml")
    out = check(peer.uri, expect_tone=False)
    assert (out.outcome, out.stage, out.reason) == ("fail", "answer", "service_unavailable")
    assert (out.sip_status, out.sip_reason) == (503, "Service Unavailable")
    assert "answer" not in out.timings and out.timings["trying"] < 0.5
    assert out.media is None
    assert peer.wait() == 0  # our ACK arrived


def test_no_rtp_fails_at_media(sipp_factory: SipFactory) -> None:
    peer = sipp_factory("uas_no_rtp.xml")
    out = check(peer.uri, expect_tone=False)
    assert (out.outcome, out.stage, out.reason, out.sip_status) == ("fail", "media", "no_rtp", 200), out
    assert out.media is not None and out.media.rx_packets == 0 and out.media.tx_packets > 0
    assert out.media.echo_heard is False
    assert peer.wait() == 0  # the call was torn down with BYE


def test_ring_forever_fails_at_answer_with_cancel(sipp_factory: SipFactory) -> None:
    peer = sipp_factory("uas_ring_forever.xml")
    started = time.monotonic()
    out = check(peer.uri, expect_tone=False, answer_timeout="1500ms")
    took = time.monotonic() - started
    assert (out.outcome, out.stage, out.reason, out.sip_status) == ("fail", "answer", "answer_timeout", 180)
    assert 1.5 <= took < 8.0  # the 1.5 s answer timer, not the call's max duration
    assert peer.wait() == 0  # SIPp's scenario completes only after CANCEL, 487 and ACK
    log = peer.log()
    assert "CANCEL sip:" in log and "487 Request Terminated" in log


def test_closed_port_fails_within_first_response_timeout(tmp_path: Path) -> None:
    port = free_port()  # nothing listens here
    started = time.monotonic()
    out = check(f"sip:ecpm-test@127.0.0.1:{port}", expect_tone=False, first_response_timeout="800ms")
    took = time.monotonic() - started
    assert (out.outcome, out.stage, out.reason) == ("fail", "transport", "no_response"), out
    assert out.sip_status is None
    assert 0.8 <= took < 4.0  # the 800 ms timer, not Timer B (32 s)


def test_closed_tcp_port_fails_at_transport_at_once() -> None:
    port = free_port()
    started = time.monotonic()
    out = check(
        f"sip:ecpm-test@127.0.0.1:{port}", transport="tcp", expect_tone=False, first_response_timeout="10s"
    )
    took = time.monotonic() - started
    assert (out.outcome, out.stage, out.reason) == ("fail", "transport", "transport_error"), out
    assert took < 5.0  # connection refused: no need to wait for the 10 s timer


def test_options_against_sipp(sipp_factory: SipFactory) -> None:
    peer = sipp_factory("uas_options.xml")
    target = make_target(peer.uri)

    async def body(engine: SipEngine) -> CheckOutcome:
        return await options_check(engine, target)

    out = with_engine(body)
    assert (out.outcome, out.sip_status) == ("pass", 200), out
    assert peer.wait() == 0
    assert "OPTIONS sip:ecpm-test@" in peer.log()


@pytest.mark.parametrize(("accept", "outcome"), [([], "fail"), ([404], "pass")])
def test_options_accept_codes(
    sipp_factory: SipFactory, tmp_path: Path, accept: list[int], outcome: str
) -> None:
    peer = sipp_factory(variant(tmp_path, "uas_options.xml", "SIP/2.0 200 OK", "SIP/2.0 404 Not Found"))
    target = make_target(peer.uri)

    async def body(engine: SipEngine) -> CheckOutcome:
        return await options_check(
            engine, target, OptionsCheck.model_validate({"timeout": "1s", "accept": accept})
        )

    out = with_engine(body)
    assert (out.outcome, out.sip_status) == (outcome, 404), out
    if outcome == "fail":
        assert (out.stage, out.reason) == ("answer", "not_found")


# ------------------------------------------------------------------ NENA i3 answers


def _nena_target(peer: Sipp, location: Location = LONDON) -> dict[str, object]:
    return {
        "expect_tone": False,
        "proxy": f"sip:127.0.0.1:{peer.port};lr",
        "emergency": EmergencyShape(
            p_asserted_identity="sip:+441632960000@probe.example;user=phone",
            resource_priority="esnet.1",
            location=location,
        ),
    }


def test_nena_200_echoes_the_location(sipp_factory: SipFactory) -> None:
    peer = sipp_factory("uas_nena.xml", rtp_echo=True)
    out = check("urn:service:test.sos", **_nena_target(peer))
    assert out.outcome == "pass", out
    assert out.detail["nena.answering_point"] == "SIPp test PSAP"
    assert out.detail["nena.service_urn"] == "urn:service:test.sos"
    assert out.detail["nena.location"] == "geo:51.5034,-0.1276"
    assert peer.wait() == 0
    invite = peer.log()
    # the emergency shape went out as specified (RFC 6881 / RFC 6442)
    assert "INVITE urn:service:test.sos SIP/2.0" in invite
    assert "P-Asserted-Identity: <sip:+441632960000@probe.example;user=phone>" in invite
    assert "Resource-Priority: esnet.1" in invite
    assert "Geolocation: <cid:ecpm-loc-" in invite
    assert "Content-Type: application/pidf+xml" in invite and "multipart/mixed" in invite


def test_nena_200_with_wrong_location_fails(sipp_factory: SipFactory, tmp_path: Path) -> None:
    wrong = variant(tmp_path, "uas_nena.xml", "Location: geo:[$lat],[$lon]", "Location: geo:-[$lat],[$lon]")
    peer = sipp_factory(wrong, rtp_echo=True)
    out = check("urn:service:test.sos", **_nena_target(peer))
    assert (out.outcome, out.stage, out.reason) == ("fail", "identity", "location_mismatch"), out
    assert float(out.detail["nena.location_error_m"]) > 10_000_000  # the other hemisphere


def test_nena_200_without_answer_body_fails(sipp_factory: SipFactory) -> None:
    peer = sipp_factory("uas_echo.xml", rtp_echo=True)
    out = check("urn:service:test.sos", **_nena_target(peer))
    assert (out.outcome, out.stage, out.reason) == ("fail", "identity", "location_missing"), out


def test_nena_486_is_inconclusive(sipp_factory: SipFactory, tmp_path: Path) -> None:
    peer = sipp_factory(reject(tmp_path, "486 Busy Here"))
    out = check("urn:service:test.sos", **_nena_target(peer))
    assert (out.outcome, out.stage, out.reason, out.sip_status) == (
        "inconclusive", "answer", "test_call_limit", 486,
    )  # fmt: skip


def test_nena_404_is_unsupported_service(sipp_factory: SipFactory, tmp_path: Path) -> None:
    peer = sipp_factory(reject(tmp_path, "404 Not Found"))
    out = check("urn:service:test.sos.fire", **_nena_target(peer))
    assert (out.outcome, out.stage, out.reason, out.sip_status) == (
        "fail",
        "answer",
        "unsupported_service",
        404,
    )


# ------------------------------------------------------------------ digest auth


@pytest.mark.parametrize(("password", "outcome", "status"), [("s3cret", "pass", 200), ("wrong", "fail", 403)])
def test_digest_auth_per_target(sipp_factory: SipFactory, password: str, outcome: str, status: int) -> None:
    peer = sipp_factory("uas_auth.xml", rtp_echo=True)
    base = make_target(peer.uri, expect_tone=False)
    target = base.model_copy(
        update={"auth": Auth(username="probe1", password=SecretStr(password), realm="ecpm.test")}
    )

    async def body(engine: SipEngine) -> CheckOutcome:
        return await invite_check(engine, target, announcement=None)

    out = with_engine(body)
    assert (out.outcome, out.sip_status) == (outcome, status), out
    if outcome == "fail":
        assert (out.stage, out.reason) == ("answer", "forbidden")
    assert peer.wait() == 0
    log = peer.log()
    assert "401 Unauthorized" in log and 'Authorization: Digest username="probe1"' in log
