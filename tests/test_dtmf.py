"""DTMF as a media check (``checks.invite.dtmf``, stage ``dtmf``): the probe sends RFC 4733
telephone-events and the far end must return them. Against the real responder (which
echoes every digit; its ``dtmf_lost`` fault does not) and SIPp (``-rtp_echo`` returns our
telephone-event packets as it returns our audio). Every peer is on 127.0.0.1."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from probes.checks import invite_check
from probes.config import InviteCheck
from probes.outcome import CheckOutcome
from tests.support.paths import SIPP_DIR
from tests.support.sip import ResponderProcess, Sipp, make_target, with_engine

DIGITS = "1234#*"
PLAIN_SDP = "m=audio [media_port] RTP/AVP 0\n      a=rtpmap:0 PCMU/8000\n"
EVENT_SDP = (
    "m=audio [media_port] RTP/AVP 0 120\n      a=rtpmap:0 PCMU/8000\n"
    "      a=rtpmap:120 telephone-event/8000\n      a=fmtp:120 0-15\n"
)


def call(uri: str, digits: str = DIGITS, **invite: Any) -> CheckOutcome:
    target = make_target(uri, dtmf=digits, max_duration="15s", **invite)
    return with_engine(lambda e: invite_check(e, target))


def with_telephone_event(tmp_path: Path, *, extra: tuple[str, str] | None = None) -> Path:
    """SIPp's echo scenario, its answer offering telephone-event (RFC 4733) too."""
    text = (SIPP_DIR / "uas_echo.xml").read_text()
    assert PLAIN_SDP in text
    text = text.replace(PLAIN_SDP, EVENT_SDP)
    if extra is not None:
        assert extra[0] in text
        text = text.replace(extra[0], extra[1])
    path = tmp_path / "uas_echo_dtmf.xml"
    path.write_text(text)
    return path


def test_the_responder_echoes_the_digits(clean_responder: ResponderProcess) -> None:
    out = call(clean_responder.uri)
    assert out.outcome == "pass", out
    assert list(out.timings) == ["transport", "trying", "ringing", "answer", "media", "dtmf", "teardown"]
    assert out.detail["dtmf.sent"] == out.detail["dtmf.received"] == DIGITS
    assert out.detail["dtmf.method"] == "rfc4733"  # auto: the responder offers telephone-event
    assert 0 < out.timings["dtmf"] < 3


def test_digits_lost_fail_dtmf_missing(clean_responder: ResponderProcess) -> None:
    clean_responder.set_fault("dtmf_lost")
    out = call(clean_responder.uri)
    assert (out.outcome, out.stage, out.reason, out.sip_status) == ("fail", "dtmf", "dtmf_missing", 200), out
    assert out.detail["dtmf.received"] == "none" and "dtmf" not in out.timings
    assert "teardown" in out.timings  # the call itself was released as usual


def test_no_dtmf_check_by_default(clean_responder: ResponderProcess) -> None:
    target = make_target(clean_responder.uri)
    out = with_engine(lambda e: invite_check(e, target))
    assert out.outcome == "pass" and "dtmf" not in out.timings and "dtmf.sent" not in out.detail


def test_sipp_echoes_our_telephone_events(sipp_factory: Callable[..., Sipp], tmp_path: Path) -> None:
    peer = sipp_factory(with_telephone_event(tmp_path), rtp_echo=True)
    out = call(peer.uri, expect_tone=False)
    assert out.outcome == "pass", out
    assert out.detail["dtmf.received"] == DIGITS
    assert peer.wait() == 0


def test_sipp_without_telephone_event_fails_dtmf_unsupported(sipp_factory: Callable[..., Sipp]) -> None:
    peer = sipp_factory("uas_echo.xml", rtp_echo=True)
    out = call(peer.uri, expect_tone=False, dtmf_method="rfc4733")
    assert (out.outcome, out.stage, out.reason) == ("fail", "dtmf", "dtmf_unsupported"), out


def test_auto_falls_back_to_inband_against_sipp_without_telephone_event(
    sipp_factory: Callable[..., Sipp],
) -> None:
    peer = sipp_factory("uas_echo.xml", rtp_echo=True)
    out = call(peer.uri, expect_tone=False)
    assert out.outcome == "pass", out
    assert out.detail["dtmf.method"] == "inband" and out.detail["dtmf.received"] == DIGITS


def test_the_responder_echoes_inband_digits(clean_responder: ResponderProcess) -> None:
    out = call(clean_responder.uri, dtmf_method="inband")
    assert out.outcome == "pass", out
    assert out.detail["dtmf.method"] == "inband" and out.detail["dtmf.received"] == DIGITS


def test_inband_digits_not_echoed_fail_dtmf_missing(clean_responder: ResponderProcess) -> None:
    clean_responder.set_fault("one_way_media")  # plays its tone, returns no audio
    out = call(clean_responder.uri, dtmf_method="inband", expect_echo=False)
    assert (out.outcome, out.stage, out.reason) == ("fail", "dtmf", "dtmf_missing"), out


def with_payload_type(pcap: Path, out: Path, pt: int) -> Path:
    """A copy of a libpcap capture of RTP over UDP/IPv4/Ethernet with every packet's payload
    type set to ``pt`` (the marker bit kept): pjmedia takes telephone-events only with the
    payload type it offered."""
    data = bytearray(pcap.read_bytes())
    assert data[:4] == bytes.fromhex("d4c3b2a1"), "a little-endian libpcap file"
    at = 24
    while at < len(data):
        length = int.from_bytes(data[at + 8 : at + 12], "little")
        packet = at + 16
        rtp = packet + 14 + (data[packet + 14] & 0x0F) * 4 + 8
        data[rtp + 1] = (data[rtp + 1] & 0x80) | pt
        at = packet + length
    out.write_bytes(bytes(data))
    return out


def test_sipp_playing_other_digits_fails_dtmf_mismatch(
    sipp_factory: Callable[..., Sipp], tmp_path: Path
) -> None:
    """SIPp plays a recorded RFC 2833 '1' (sip-tester's dtmf_2833_1.pcap) into the call as it
    is answered, besides echoing ours: the digits that came back are not the ones sent."""
    shipped = Path("/usr/share/sip-tester/dtmf_2833_1.pcap")
    if not shipped.exists():
        pytest.skip("sip-tester's dtmf_2833_1.pcap is not installed")
    pcap = with_payload_type(shipped, tmp_path / "dtmf_1.pcap", 120)
    play = (
        f'<recv request="ACK" crlf="true"/>\n  <pause milliseconds="300"/>\n'
        f'  <nop><action><exec play_pcap_audio="{pcap}"/></action></nop>'
    )
    peer = sipp_factory(
        with_telephone_event(tmp_path, extra=('<recv request="ACK" crlf="true"/>', play)), rtp_echo=True
    )
    out = call(peer.uri, "2345", expect_tone=False)  # no '1': pjmedia merges a repeat of it
    assert (out.outcome, out.stage, out.reason) == ("fail", "dtmf", "dtmf_mismatch"), out
    assert out.detail["dtmf.received"] == "1234"  # SIPp's '1', then ours until four came back


@pytest.mark.parametrize("digits", ["", "12x", "1" * 17])
def test_bad_digits_are_refused(digits: str) -> None:
    with pytest.raises(ValueError, match="DTMF digits are 1 to 16 of 0-9"):
        InviteCheck.model_validate({"dtmf": digits})


def test_max_duration_covers_the_digits() -> None:
    with pytest.raises(ValueError, match="the DTMF digits and dtmf_timeout"):
        InviteCheck.model_validate({"dtmf": "1" * 16, "max_duration": "10s", "dtmf_timeout": "3s"})
