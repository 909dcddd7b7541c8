"""SRTP (SDES, RFC 4568) per target: off, optional, mandatory; the result records whether
media was encrypted, and a mandatory-SRTP target answered with plain RTP fails with
``srtp_refused``. Against the real responder (which takes SRTP when offered, and its
``plain_rtp`` fault) and SIPp (a plain ``RTP/AVP`` answer). Every peer is on 127.0.0.1."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from probes import sdp
from probes.checks import invite_check
from probes.config import Srtp
from probes.outcome import CheckOutcome
from tests.support.sip import ResponderProcess, Sipp, make_target, with_engine


def call(uri: str, srtp: Srtp, **invite: Any) -> CheckOutcome:
    target = make_target(uri, **invite).model_copy(update={"srtp": srtp})
    return with_engine(lambda e: invite_check(e, target))


@pytest.mark.parametrize(("srtp", "profile"), [("optional", "RTP/AVP"), ("mandatory", "RTP/SAVP")])
def test_srtp_to_the_responder_is_encrypted(
    clean_responder: ResponderProcess, srtp: Srtp, profile: str
) -> None:
    out = call(clean_responder.uri, srtp)
    assert out.outcome == "pass", out
    assert out.detail["media.encrypted"] == "yes" and out.detail["media.profile"] == profile
    assert out.detail["media.srtp"].startswith("AES_")
    assert out.media is not None and out.media.tone_heard and out.media.echo_heard  # decrypted both ways


def test_srtp_off_is_plain(clean_responder: ResponderProcess) -> None:
    out = call(clean_responder.uri, "off")
    assert out.outcome == "pass", out
    assert (out.detail["media.encrypted"], out.detail["media.profile"]) == ("no", "RTP/AVP")
    assert "media.srtp" not in out.detail


def test_optional_srtp_answered_plain_passes_and_says_so(clean_responder: ResponderProcess) -> None:
    clean_responder.set_fault("plain_rtp")
    out = call(clean_responder.uri, "optional")
    assert out.outcome == "pass", out
    assert out.detail["media.encrypted"] == "no"


def test_mandatory_srtp_refused_by_the_responder(clean_responder: ResponderProcess) -> None:
    """The responder's plain account cannot answer RTP/SAVP: 488, reported as SRTP refused."""
    clean_responder.set_fault("plain_rtp")
    out = call(clean_responder.uri, "mandatory")
    assert (out.outcome, out.stage, out.reason, out.sip_status) == ("fail", "answer", "srtp_refused", 488), (
        out
    )
    assert "RTP/SAVP" in out.detail["srtp"]


def test_mandatory_srtp_answered_with_plain_rtp_by_sipp(sipp_factory: Callable[..., Sipp]) -> None:
    """SIPp answers ``RTP/AVP`` without keys to our ``RTP/SAVP`` offer."""
    peer = sipp_factory("uas_echo.xml", rtp_echo=True)
    out = call(peer.uri, "mandatory", expect_tone=False)
    assert (out.outcome, out.stage, out.reason, out.sip_status) == ("fail", "media", "srtp_refused", 200), out
    assert out.detail["media.encrypted"] == "no" and "plain RTP" in out.detail["srtp"]
    assert "RTP/SAVP" in peer.log()  # what we offered


SDP_ANSWER = (
    "SIP/2.0 200 OK\r\nContent-Type: application/sdp\r\n\r\n"
    "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
    "m=audio 4000 {profile} 0\r\n{crypto}a=sendrecv\r\n"
)


@pytest.mark.parametrize(
    ("profile", "crypto", "expected"),
    [
        (
            "RTP/SAVP",
            "a=crypto:1 AES_CM_128_HMAC_SHA1_80 inline:abcd\r\n",
            ("RTP/SAVP", "AES_CM_128_HMAC_SHA1_80"),
        ),
        (
            "RTP/AVP",
            "a=crypto:1 AES_256_CM_HMAC_SHA1_80 inline:abcd\r\n",
            ("RTP/AVP", "AES_256_CM_HMAC_SHA1_80"),
        ),
        ("RTP/AVP", "", ("RTP/AVP", None)),
    ],
)
def test_audio_security_of_an_answer(profile: str, crypto: str, expected: tuple[str, str | None]) -> None:
    found = sdp.audio_security(SDP_ANSWER.format(profile=profile, crypto=crypto))
    assert found is not None and (found.profile, found.crypto) == expected
    assert found.encrypted == (expected[1] is not None)


def test_audio_security_without_audio() -> None:
    assert sdp.audio_security(None) is None
    assert sdp.audio_security("SIP/2.0 200 OK\r\nContent-Type: text/plain\r\n\r\nhello") is None
    rejected = SDP_ANSWER.format(profile="RTP/SAVP", crypto="").replace("m=audio 4000", "m=audio 0")
    assert sdp.audio_security(rejected) is None  # a refused audio stream (port 0)
