"""probes.nena: PIDF-LO, SIP message and multipart parsing, NENA test-call answers."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from probes import nena
from probes.check_kinds import REASONS
from probes.checks import reason_for_status
from probes.config import EmergencyShape, Location

LOC = Location(
    latitude=51.5034, longitude=-0.1276, radius_m=25, civic={"country": "GB", "A1": "London", "HNO": "10"}
)


def invite_with(pidf: str, *, cid: str = "loc1@probe", geolocation: str | None = None) -> str:
    geo = geolocation if geolocation is not None else f"<cid:{cid}>"
    return (
        "INVITE urn:service:test.sos SIP/2.0\r\n"
        "Via: SIP/2.0/UDP 127.0.0.1:5060;branch=z9hG4bK1\r\n"
        "To: <urn:service:test.sos>\r\n"
        f"Geolocation: {geo}\r\n"
        "Content-Type: multipart/mixed;boundary=b0undary\r\n"
        "\r\n"
        "--b0undary\r\n"
        "Content-Type: application/sdp\r\n"
        "\r\n"
        "v=0\r\n"
        "--b0undary\r\n"
        "Content-Type: application/pidf+xml\r\n"
        f"Content-ID: <{cid}>\r\n"
        "\r\n"
        f"{pidf}\r\n"
        "--b0undary--\r\n"
    )


def test_pidf_lo_round_trip() -> None:
    doc = nena.build_pidf_lo(LOC, timestamp=datetime(2024, 5, 1, 12, 0, tzinfo=UTC))
    assert "<gml:pos>51.5034 -0.1276</gml:pos>" in doc
    assert "<dm:timestamp>2024-05-01T12:00:00Z</dm:timestamp>" in doc
    assert doc.index("<ca:country>") < doc.index("<ca:A1>") < doc.index("<ca:HNO>")  # RFC 5139 order
    got = nena.parse_pidf_lo(doc)
    assert got is not None
    assert (got.latitude, got.longitude, got.radius_m) == (51.5034, -0.1276, 25.0)
    assert dict(got.civic) == {"country": "GB", "A1": "London", "HNO": "10"}
    assert got.geo_uri() == "geo:51.5034,-0.1276;u=25"


def test_pidf_lo_escapes_civic_text() -> None:
    loc = Location(latitude=1, longitude=2, civic={"NAM": "Smith & <Sons>"})
    got = nena.parse_pidf_lo(nena.build_pidf_lo(loc))
    assert got is not None and got.civic["NAM"] == "Smith & <Sons>"


@pytest.mark.parametrize(
    "xml",
    [
        '<?xml version="1.0"?><!DOCTYPE x [<!ENTITY a "aaaa">]><presence>&a;</presence>',
        "<presence><gml:pos>1 2</gml:pos>",  # unbound prefix, truncated
        "not xml at all",
        '<presence xmlns="urn:ietf:params:xml:ns:pidf"/>',  # no position
        '<p xmlns:gml="http://www.opengis.net/gml"><gml:pos>95 2</gml:pos></p>',  # latitude out of range
        '<p xmlns:gml="http://www.opengis.net/gml"><gml:pos>north</gml:pos></p>',
        "<p>" + "x" * (nena.MAX_BODY + 1) + "</p>",
    ],
)
def test_bad_or_hostile_pidf_gives_no_location(xml: str) -> None:
    assert nena.parse_pidf_lo(xml) is None


def test_location_from_invite_follows_the_cid() -> None:
    msg = nena.parse_sip_message(invite_with(nena.build_pidf_lo(LOC)))
    assert msg.request_uri == "urn:service:test.sos" and msg.status is None
    parts = nena.message_parts(msg)
    assert [p.content_type for p in parts] == ["application/sdp", "application/pidf+xml"]
    got = nena.location_in_request(msg)
    assert got is not None and (got.latitude, got.longitude) == (51.5034, -0.1276)
    assert nena.service_in_request(msg) == "urn:service:test.sos"


def test_location_picks_the_referenced_part() -> None:
    other = nena.build_pidf_lo(Location(latitude=10, longitude=10))
    text = invite_with(nena.build_pidf_lo(LOC), cid="wanted@probe").replace(
        "--b0undary--",
        "--b0undary\r\nContent-Type: application/pidf+xml\r\nContent-ID: <other@probe>\r\n\r\n"
        f"{other}\r\n--b0undary--",
    )
    got = nena.location_in_request(nena.parse_sip_message(text))
    assert got is not None and got.latitude == 51.5034
    text = text.replace("Geolocation: <cid:wanted@probe>", "Geolocation: <cid:other@probe>")
    got = nena.location_in_request(nena.parse_sip_message(text))
    assert got is not None and got.latitude == 10


def test_service_from_to_header_after_an_esrp_rewrote_the_request_uri() -> None:
    text = invite_with("").replace("INVITE urn:service:test.sos", "INVITE sip:psap@10.0.0.1")
    assert nena.service_in_request(nena.parse_sip_message(text)) == "urn:service:test.sos"
    plain = "INVITE sip:ecpm-test@127.0.0.1 SIP/2.0\r\nTo: <sip:ecpm-test@127.0.0.1>\r\n\r\n"
    assert nena.service_in_request(nena.parse_sip_message(plain)) == "sip:ecpm-test@127.0.0.1"


def test_compact_headers_and_garbage() -> None:
    msg = nena.parse_sip_message("SIP/2.0 200 OK\r\nc: text/plain\r\nl: 5\r\n\r\nhello")
    assert msg.status == 200 and msg.header("content-type") == "text/plain"
    assert [p.body for p in nena.message_parts(msg)] == ["hello"]
    empty = nena.parse_sip_message("")
    assert (empty.start_line, empty.headers, empty.body, empty.status) == ("", (), "", None)
    assert nena.body_parts("multipart/mixed", "no boundary parameter") == [
        nena.BodyPart("multipart/mixed", (), "no boundary parameter")
    ]


def test_test_answer_round_trip() -> None:
    loc = nena.ReceivedLocation(51.5034, -0.1276, 25.0, {"country": "GB"})
    body = nena.format_test_answer("Test PSAP", "urn:service:test.sos", loc)
    got = nena.parse_test_answer(body)
    assert got.answering_point == "Test PSAP"
    assert got.service_urn == "urn:service:test.sos"
    assert got.position == (51.5034, -0.1276)
    none = nena.parse_test_answer(nena.format_test_answer("X", "urn:service:test.sos", None))
    assert none.location_text == "none" and none.position is None


@pytest.mark.parametrize(
    ("text", "position"),
    [
        ("PSAP: Somewhere\nService: urn:service:test.sos\nLocation: 51.5034 -0.1276\n", (51.5034, -0.1276)),
        ("answering point: X\nlocation received: 51.5034,-0.1276\n", (51.5034, -0.1276)),
        ("Location: geo:-33.86,151.21;u=10", (-33.86, 151.21)),
        ("Location: somewhere nice", None),
        ("Location: 95.0, 10.0", None),
        ("nothing useful", None),
    ],
)
def test_parse_test_answer_variants(text: str, position: tuple[float, float] | None) -> None:
    assert nena.parse_test_answer(text).position == position


def _answer(location: str) -> str:
    return (
        "SIP/2.0 200 OK\r\nContent-Type: multipart/mixed;boundary=zz\r\n\r\n"
        "--zz\r\nContent-Type: application/sdp\r\n\r\nv=0\r\n"
        "--zz\r\nContent-Type: text/plain\r\n\r\n"
        f"Answering-Point: P\r\nService-URN: urn:service:test.sos\r\nLocation: {location}\r\n"
        "--zz--\r\n"
    )


def test_score_answers() -> None:
    shape = EmergencyShape(location=LOC)
    ok = nena.score_answer(200, _answer("geo:51.5034,-0.1276"), shape)
    assert (ok.outcome, ok.reason) == ("pass", None)
    assert ok.detail["nena.answering_point"] == "P"
    # what arrived with the call is the identity stage's: the answer stage passes a 200
    assert nena.score_answer(200, _answer("geo:51.5134,-0.1276"), shape).outcome == "pass"
    verdicts = {
        486: ("inconclusive", "test_call_limit"),
        404: ("fail", "unsupported_service"),
        503: ("fail", None),
    }
    for status, verdict in verdicts.items():
        score = nena.score_answer(status, None, shape)
        assert (score.outcome, score.reason) == verdict
    no_location = EmergencyShape(resource_priority="esnet.1")
    assert nena.score_answer(200, None, no_location).outcome == "pass"


def test_score_identity_location() -> None:
    shape = EmergencyShape(location=LOC)
    assert nena.expects_identity(shape)
    ok = nena.score_identity(_answer("geo:51.5034,-0.1276"), shape)
    assert (ok.outcome, ok.reason) == ("pass", None)
    near = nena.score_identity(_answer("geo:51.50341,-0.12761"), shape)  # ~1.3 m: inside 25 m
    assert near.outcome == "pass"
    far = nena.score_identity(_answer("geo:51.5134,-0.1276"), shape)  # ~1.1 km
    assert (far.outcome, far.reason) == ("fail", "location_mismatch")
    assert 1000 < float(far.detail["nena.location_error_m"]) < 1200
    sdp_only = "SIP/2.0 200 OK\r\nContent-Type: application/sdp\r\n\r\nv=0\r\n"
    for message in (sdp_only, _answer("none"), None):
        missing = nena.score_identity(message, shape)
        assert (missing.outcome, missing.reason) == ("fail", "location_missing")
    no_echo_wanted = EmergencyShape(location=LOC, expect_location_echo=False)
    assert not nena.expects_identity(no_echo_wanted)
    assert nena.score_identity(None, no_echo_wanted).outcome == "pass"


def test_score_identity_civic_address() -> None:
    civic = Location(
        latitude=51.5034, longitude=-0.1276, radius_m=25, civic={"country": "GB", "RD": "Example St"}
    )
    shape = EmergencyShape(location=civic)
    same = _answer("geo:51.5034,-0.1276\r\nCivic: country=gb; RD=Example  St")
    assert nena.score_identity(same, shape).outcome == "pass"  # case and spacing aside
    changed = nena.score_identity(_answer("geo:51.5034,-0.1276\r\nCivic: country=GB; RD=Other St"), shape)
    assert (changed.outcome, changed.reason) == ("fail", "location_mismatch")
    assert changed.detail["identity.civic_changed"] == "RD"
    # a service that echoes only the position (as NENA test services do) is not failed for it
    assert nena.score_identity(_answer("geo:51.5034,-0.1276"), shape).outcome == "pass"


def _identity_answer(**reported: str) -> str:
    lines = "".join(f"{k}: {v}\r\n" for k, v in reported.items())
    return _answer("geo:51.5034,-0.1276\r\n" + lines.removesuffix("\r\n"))


@pytest.mark.parametrize(
    ("reported", "verdict"),
    [
        ({"P-Asserted-Identity": "<tel:+441632960000>", "From": "<sip:desk@x>"}, ("pass", None)),
        ({"P-Asserted-Identity": "<sip:+44-1632-960000@p.example;user=phone>"}, ("pass", None)),
        ({"P-Asserted-Identity": "<sip:%2B441632960000@p.example>"}, ("pass", None)),
        ({"P-Asserted-Identity": '"A" <sip:a@x>, <tel:+441632960000>'}, ("pass", None)),
        ({"P-Asserted-Identity": "none", "From": "<sip:+441632960000@x>"}, ("pass", None)),
        ({"P-Asserted-Identity": "none", "From": '"Anonymous" <sip:anonymous@anonymous.invalid>'},
         ("fail", "cli_missing")),
        ({}, ("fail", "cli_missing")),
        ({"P-Asserted-Identity": "<tel:+441632960999>"}, ("fail", "cli_mismatch")),
        ({"P-Asserted-Identity": "<sip:01632960000@x>"}, ("fail", "cli_mismatch")),
    ],
)  # fmt: skip
def test_score_identity_callback_number(reported: dict[str, str], verdict: tuple[str, str | None]) -> None:
    shape = EmergencyShape(callback_number="+441632960000", location=LOC)
    score = nena.score_identity(_identity_answer(**reported), shape)
    assert (score.outcome, score.reason) == verdict, score
    assert score.detail["identity.cli"]


def test_identity_reported_by_the_responder_round_trips() -> None:
    """What the responder writes (From, PAI, Geolocation) the probe reads back."""
    request = nena.parse_sip_message(
        "INVITE sip:x@h SIP/2.0\r\nFrom: <sip:desk@h>;tag=1\r\n"
        "P-Asserted-Identity: <tel:+441632960000>\r\nGeolocation: <cid:c1@x>\r\n\r\n"
    )
    identity = nena.ReceivedIdentity.of(request)
    body = nena.format_test_answer("P", "sip:x@h", None, identity)
    answer = nena.parse_test_answer(body)
    assert answer.from_ == "<sip:desk@h>;tag=1"
    assert answer.p_asserted_identity == "<tel:+441632960000>"
    assert answer.geolocation == "<cid:c1@x>"
    bare = nena.parse_test_answer(nena.format_test_answer("P", "sip:x@h", None, nena.ReceivedIdentity()))
    assert (bare.from_, bare.p_asserted_identity, bare.geolocation) == (None, None, None)


def test_emergency_headers() -> None:
    shape = EmergencyShape(
        p_asserted_identity="sip:+441632960000@probe.example;user=phone", resource_priority="esnet.1"
    )
    assert nena.emergency_headers(shape, "c1@x") == [
        ("P-Asserted-Identity", "<sip:+441632960000@probe.example;user=phone>"),
        ("Resource-Priority", "esnet.1"),
        ("Geolocation", "<cid:c1@x>"),
        ("Geolocation-Routing", "yes"),
    ]
    assert nena.emergency_headers(EmergencyShape(), None) == []
    # a callback number alone is asserted as a tel: URI (RFC 3325)
    number = EmergencyShape(callback_number="+441632960000")
    assert nena.emergency_headers(number, None) == [("P-Asserted-Identity", "<tel:+441632960000>")]


@settings(max_examples=80, deadline=None)
@given(
    lat=st.floats(min_value=-90, max_value=90, allow_nan=False),
    lon=st.floats(min_value=-180, max_value=180, allow_nan=False),
    radius=st.floats(min_value=1, max_value=5000),
)
def test_location_echo_property(lat: float, lon: float, radius: float) -> None:
    """Whatever we send survives PIDF-LO -> responder -> answer body -> score."""
    loc = Location(latitude=lat, longitude=lon, radius_m=radius)
    received = nena.parse_pidf_lo(nena.build_pidf_lo(loc))
    assert received is not None
    body = nena.format_test_answer("P", "urn:service:test.sos", received)
    answer = nena.parse_test_answer(body)
    assert answer.position is not None
    assert nena.location_matches(loc, answer.position)


def test_every_status_maps_to_a_documented_bounded_reason() -> None:
    assert {reason_for_status(status) for status in range(300, 700)} <= set(REASONS)
    docs = (Path(__file__).resolve().parent.parent / "docs" / "checks.md").read_text()
    assert [r for r in REASONS if f"`{r}`" not in docs] == []
