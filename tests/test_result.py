"""Result schema v1: JSON Schema conformance, exact round trip, signatures, rejections."""

from __future__ import annotations

import hashlib
import hmac
import json
import subprocess
import sys
import uuid
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from probes import result as r
from probes.check_kinds import REGISTRY as CHECKS
from probes.outcome import STAGES, CheckOutcome, MediaStats
from probes.result import Result, ResultError, parse_result
from probes.result import verify_signature as verify

ROOT = Path(__file__).resolve().parent.parent
SCHEMA = json.loads((ROOT / "docs/schema/result-v1.json").read_text(encoding="utf-8"))
VALIDATOR = jsonschema.Draft202012Validator(SCHEMA)
KEY = b"probe-key-for-tests"

codes = st.from_regex(r"\A[a-z][a-z0-9_]{0,20}\Z")
names = st.from_regex(r"\A[a-z0-9][a-z0-9_.-]{0,30}\Z")
moments = st.datetimes(
    min_value=datetime(2000, 1, 1), max_value=datetime(2099, 12, 31), timezones=st.just(UTC)
)
any_float = st.floats(allow_nan=True, allow_infinity=True)
media = st.builds(
    MediaStats,
    rx_packets=st.integers(-5, 10**6),
    tx_packets=st.integers(0, 10**6),
    loss=any_float,
    jitter_ms=any_float,
    rtt_ms=st.none() | any_float,
    mos=st.none() | any_float,
    tone_heard=st.booleans(),
    echo_heard=st.none() | st.booleans(),
)
outcomes = st.builds(
    CheckOutcome,
    check=st.sampled_from(r.CHECK_KINDS),
    outcome=st.sampled_from(["pass", "fail", "inconclusive"]),
    started_at=moments,
    finished_at=moments,
    stage=st.none() | st.sampled_from(STAGES) | codes,
    reason=st.none() | codes,
    sip_status=st.none() | st.integers(0, 1000),
    sip_reason=st.none() | st.text(max_size=400),
    timings=st.dictionaries(st.sampled_from(STAGES) | st.text(max_size=5), any_float, max_size=8),
    media=st.none() | media,
    detail=st.dictionaries(st.text(max_size=70), st.text(max_size=1100), max_size=40),
)
request_ids = st.none() | st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9._:-]{0,40}\Z")


def make(outcome: CheckOutcome | None = None, **kw: Any) -> Result:
    if outcome is None:
        t0 = datetime(2024, 5, 1, 12, 0, 0, 123456, tzinfo=UTC)
        outcome = CheckOutcome(
            check="invite",
            outcome="fail",
            started_at=t0,
            finished_at=t0 + timedelta(seconds=2.5),
            stage="media",
            reason="no_rtp",
            sip_status=200,
            sip_reason="OK",
            timings={"transport": 0.001, "trying": 0.01, "ringing": 0.2, "answer": 0.3},
            media=MediaStats(0, 100, 1.0, 0.0, None, None, False, False),
            detail={"answering_point": "Test PSAP — Zürich"},
        )
    args: dict[str, Any] = {"probe": "p1", "seq": 1, "target": "t1", "key": KEY}
    args.update(kw)
    return Result.from_outcome(outcome, **args)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(
    outcome=outcomes,
    probe=names,
    target=names,
    seq=st.integers(1, 2**53),
    confirm=st.booleans(),
    request_id=request_ids,
)
def test_every_result_validates_round_trips_and_verifies(
    *,
    outcome: CheckOutcome,
    probe: str,
    target: str,
    seq: int,
    confirm: bool,
    request_id: str | None,
) -> None:
    res = Result.from_outcome(
        outcome,
        probe=probe,
        seq=seq,
        target=target,
        key=KEY,
        confirm=confirm,
        request_id=request_id,
    )
    payload = res.to_json()
    VALIDATOR.validate(json.loads(payload))
    back = parse_result(payload)
    assert back == res
    assert back.to_json() == payload
    assert verify(back, KEY)
    assert not verify(back, KEY + b"x")
    assert json.loads(res.canonical()) == {k: v for k, v in json.loads(payload).items() if k != "sig"}


def _alter(value: Any) -> Any:
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return value + 0.5
    if isinstance(value, str):
        return value + "0" if not value.endswith("Z") else value[:-5] + "999Z"
    if value is None:
        return 0
    if isinstance(value, dict):
        return {**value, "extra": 1.0} if value else {"k": "v"}
    raise AssertionError(value)


@settings(max_examples=200)
@given(outcome=outcomes, data=st.data())
def test_any_modification_breaks_the_signature(outcome: CheckOutcome, data: st.DataObject) -> None:
    res = make(outcome, seq=7, request_id="req-1")
    wire = json.loads(res.to_json())
    name = data.draw(st.sampled_from(sorted(set(wire) - {"sig", "schema"})))
    if name == "media" and wire["media"] is not None:
        inner = data.draw(st.sampled_from(sorted(wire["media"])))
        wire["media"][inner] = _alter(wire["media"][inner])
    else:
        wire[name] = _alter(wire[name])
    payload = json.dumps(wire, ensure_ascii=False).encode()
    try:
        changed = parse_result(payload)
    except ResultError:
        return  # no longer even a valid result: rejected before the signature
    assert changed != res
    assert not verify(changed, KEY)


@settings(max_examples=200)
@given(data=st.data())
def test_a_flipped_byte_never_verifies(data: st.DataObject) -> None:
    payload = bytearray(make().to_json())
    i = data.draw(st.integers(0, len(payload) - 1))
    payload[i] ^= data.draw(st.integers(1, 255))
    try:
        changed = parse_result(bytes(payload))
    except ResultError:
        return
    assert not verify(changed, KEY)


def test_wire_form_is_canonical_and_exact() -> None:
    res = make(seq=42, confirm=True, request_id="verify-2024-05-01:abc")
    payload = res.to_json()
    wire = json.loads(payload)
    assert payload == json.dumps(wire, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode(
        "utf-8"
    )
    assert "Zürich" in payload.decode("utf-8")  # not \\u-escaped
    assert wire["schema"] == "ecpm.result/1"
    assert wire["started_at"] == "2024-05-01T12:00:00.123Z"
    assert wire["finished_at"] == "2024-05-01T12:00:02.623Z"
    assert wire["confirm"] is True and wire["request_id"] == "verify-2024-05-01:abc"
    assert wire["seq"] == 42 and wire["media"]["echo_heard"] is False
    assert b'"sig"' not in res.canonical()
    assert wire["sig"] == hmac.new(KEY, res.canonical(), hashlib.sha256).hexdigest()
    assert verify(res, KEY.decode())  # str keys are UTF-8 encoded


def test_ids_are_uuidv7_unique_and_time_ordered() -> None:
    ids = [r.new_id(now_ms=1_700_000_000_000 + i) for i in range(200)]
    assert ids == sorted(ids) and len(set(ids)) == 200
    live = [r.new_id() for _ in range(1000)]
    assert len(set(live)) == 1000
    for text in ids[:5] + live[:5]:
        u = uuid.UUID(text)
        assert u.version == 7 and u.variant == uuid.RFC_4122
    assert int(ids[0].replace("-", "")[:12], 16) == 1_700_000_000_000


def test_measurements_are_normalised_not_refused() -> None:
    t0 = datetime(2024, 1, 1, tzinfo=UTC)
    nan = float("nan")
    outcome = CheckOutcome(
        check="invite",
        outcome="pass",
        started_at=t0,
        finished_at=t0,
        sip_status=999,
        sip_reason="bad \udc80 surrogate",
        timings={"answer": -1.0, "media": float("inf"), "ringing": 0.25},
        media=MediaStats(-1, 5, nan, float("inf"), nan, 9.0, True, None),
    )
    res = make(outcome)
    VALIDATOR.validate(json.loads(res.to_json()))
    assert res.sip_status is None
    assert res.sip_reason == "bad \ufffd surrogate"
    assert dict(res.timings) == {"ringing": 0.25}
    assert res.detail["dropped_timings"] == "answer,media"
    assert res.media == r.Media(0, 5, None, None, None, 5.0, True, None)


@pytest.mark.parametrize(
    ("kw", "outcome_change"),
    [
        ({"probe": "Bad/Probe"}, {}),
        ({"target": "a b"}, {}),
        ({"seq": 0}, {}),
        ({"request_id": "has space"}, {}),
        ({}, {"stage": "Not A Code"}),
        ({}, {"reason": "x" * 100}),
        ({}, {"outcome": "maybe"}),
        ({}, {"check": "subscribe"}),
        ({"seq": r.MAX_SEQ + 1}, {}),
    ],
)
def test_invalid_identifiers_are_bugs(kw: dict[str, Any], outcome_change: dict[str, Any]) -> None:
    base = make()
    outcome = CheckOutcome(
        check="options", outcome="pass", started_at=base.started_at, finished_at=base.finished_at
    )
    with pytest.raises(ValueError):
        make(replace(outcome, **outcome_change), **kw)


def _wire(**changes: Any) -> bytes:
    data = json.loads(make().to_json())
    for k, v in changes.items():
        if v is _DELETE:
            del data[k]
        else:
            data[k] = v
    return json.dumps(data).encode()


_DELETE = object()


def _media(**changes: Any) -> dict[str, Any]:
    return {
        **{"rx_packets": 0, "tx_packets": 100, "loss": 1.0, "jitter_ms": 0.0, "rtt_ms": None},
        **{"mos": None, "tone_heard": False, "echo_heard": False},
        **changes,
    }


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"x" * (r.MAX_RESULT_BYTES + 1), "too_large"),
        (b"\xff\xfe{}", "encoding"),
        (b"{not json", "json"),
        (b"[1, 2]", "json"),
        (b'{"schema": "ecpm.result/1", "schema": "ecpm.result/1"}', "json"),
        (b'{"schema": "ecpm.result/1", "seq": NaN}', "json"),
        (b'{"schema": "ecpm.result/2"}', "schema"),
        (b"{}", "schema"),
        (_wire(seq=0), "out_of_range"),
        (_wire(seq=r.MAX_SEQ + 1), "out_of_range"),
        (_wire(seq=10**400), "out_of_range"),
        (_wire(seq=True), "fields"),
        (_wire(seq="1"), "fields"),
        (_wire(confirm=1), "fields"),
        (_wire(outcome="unknown"), "fields"),
        (_wire(started_at="2024-05-01T12:00:00Z"), "fields"),
        (_wire(started_at="2024-02-30T12:00:00.000Z"), "fields"),
        (_wire(extra=1), "fields"),
        (_wire(sig=_DELETE), "fields"),
        (_wire(sig="XYZ"), "fields"),
        (_wire(id="not-a-uuid"), "fields"),
        (_wire(media={"rx_packets": 1}), "fields"),
        (_wire(timings={"answer": -1}), "out_of_range"),
        (_wire(timings={"ringing": 10**400}), "out_of_range"),
        (_wire(timings={"ringing": 3600.001}), "out_of_range"),
        (_wire(timings={"ringing": "1"}), "fields"),
        (_wire(check="subscribe"), "unknown_check"),
        (_wire(check="INVITE"), "fields"),
        (_wire(finished_at="2024-05-01T11:59:59.999Z"), "time_order"),
        (_wire(started_at="2024-05-01T10:59:00.000Z"), "out_of_range"),
        (_wire(media=_media(rx_packets=10**30)), "out_of_range"),
        (_wire(media=_media(tx_packets=-1)), "out_of_range"),
        (_wire(media=_media(rx_packets=1.5)), "fields"),
        (_wire(media=_media(loss=1.01)), "out_of_range"),
        (_wire(media=_media(mos=0.5)), "out_of_range"),
        (_wire(media=_media(jitter_ms=60_000.5)), "out_of_range"),
        (_wire(media=_media(rtt_ms=-0.1)), "out_of_range"),
        (_wire(sip_status=99), "out_of_range"),
        (_wire(timings={"answer": True}), "fields"),
        (_wire(detail={"k": 1}), "fields"),
        (_wire(target="../etc"), "fields"),
        (_wire(sip_status=700), "out_of_range"),
    ],
)
def test_rejections_have_bounded_reasons(payload: bytes, reason: str) -> None:
    with pytest.raises(ResultError) as caught:
        parse_result(payload)
    assert caught.value.reason == reason
    assert reason in r.REJECT_REASONS
    # what the parser refuses for a field or range reason, the published schema refuses
    # too (except an impossible calendar date, which a pattern cannot see, and the order
    # and span of the two times, which a schema cannot compare)
    if (
        reason in ("fields", "out_of_range", "unknown_check")
        and b"02-30" not in payload
        and b"T10:59" not in payload
    ):
        data = json.loads(payload)
        assert not VALIDATOR.is_valid(data)


def test_schema_patterns_match_the_module() -> None:
    props, defs = SCHEMA["properties"], SCHEMA["$defs"]
    assert defs["name"]["pattern"] == r.NAME_RE
    assert defs["code"]["pattern"] == r.CODE_RE
    assert defs["time"]["pattern"] == r.TIME_RE
    assert props["id"]["pattern"] == r.UUID_RE
    assert props["sig"]["pattern"] == r.SIG_RE
    assert props["request_id"]["oneOf"][1]["pattern"] == r.REQUEST_ID_RE
    assert props["detail"]["propertyNames"]["pattern"] == r.DETAIL_KEY_RE
    assert set(SCHEMA["required"]) == r.FIELDS == set(props)
    media = props["media"]["oneOf"][1]
    assert set(media["required"]) == r.MEDIA_FIELDS == set(media["properties"])
    # the bounds, in step with the module
    assert props["check"]["enum"] == list(r.CHECK_KINDS)
    assert props["seq"]["maximum"] == r.MAX_SEQ
    assert props["timings"]["additionalProperties"]["maximum"] == r.MAX_SECONDS
    assert media["properties"]["rx_packets"]["maximum"] == r.MAX_PACKETS
    assert media["properties"]["tx_packets"]["maximum"] == r.MAX_PACKETS
    for name in ("jitter_ms", "rtt_ms"):
        assert media["properties"][name]["oneOf"][1]["maximum"] == r.MAX_MEDIA_MS
    mos = media["properties"]["mos"]["oneOf"][1]
    assert (mos["minimum"], mos["maximum"]) == r.MOS_RANGE
    status = props["sip_status"]["oneOf"][1]
    assert (status["minimum"], status["maximum"]) == r.SIP_STATUS_RANGE


def test_check_kinds_are_the_probes_checks() -> None:
    assert set(r.CHECK_KINDS) == set(CHECKS)


def test_out_of_bound_measurements_and_times_are_normalised_at_the_probe() -> None:
    t0 = datetime(2024, 1, 1, 12, tzinfo=UTC)
    outcome = CheckOutcome(
        check="invite",
        outcome="pass",
        started_at=t0,
        finished_at=t0 - timedelta(seconds=3),  # the clock stepped back during the check
        timings={"ringing": 0.5, "answer": 3600.5},
        media=MediaStats(10**30, 5, 0.0, 90_000.0, 61_000.0, 4.0, True, None),
    )
    res = make(outcome)
    assert res.finished_at == res.started_at == t0
    assert dict(res.timings) == {"ringing": 0.5} and res.detail["dropped_timings"] == "answer"
    assert res.media == r.Media(r.MAX_PACKETS, 5, 0.0, None, None, 4.0, True, None)
    assert parse_result(res.to_json()) == res
    long = make(replace(outcome, finished_at=t0 + timedelta(hours=3)))
    assert long.finished_at - long.started_at == timedelta(seconds=r.MAX_SECONDS)
    assert parse_result(long.to_json()) == long


@pytest.mark.parametrize("char", ["\x01", "\u0080", "\U0001f4de", '"', "a"])
def test_what_a_probe_signs_always_fits_the_parse_limit(char: str) -> None:
    """The worst strings a far end can make a probe copy (each character written as a
    six-byte escape, or four UTF-8 bytes) in every free-text field at its bound."""
    t0 = datetime(2024, 1, 1, 12, tzinfo=UTC)
    outcome = CheckOutcome(
        check="invite",
        outcome="fail",
        started_at=t0,
        finished_at=t0,
        sip_reason=char * 10_000,
        timings={f"s{i}{'x' * 60}": 1.0 for i in range(100)},  # too many: named in dropped_timings
        detail={f"k{i:02d}": char * 10_000 for i in range(100)},
    )
    res = make(outcome)
    payload = res.to_json()
    assert len(payload) <= r.MAX_RESULT_BYTES
    assert parse_result(payload) == res and verify(res, KEY)
    assert len(res.detail) <= r.MAX_DETAIL_ITEMS and "dropped_timings" in res.detail
    assert all(len(v) <= r.MAX_DETAIL_VALUE for v in res.detail.values())


def test_importing_result_stays_light() -> None:
    code = (
        "import sys, probes.result\n"
        "heavy = {'pjsua2', 'aiomqtt', 'paho', 'pydantic', 'prometheus_client', 'sqlite3'}\n"
        "print(sorted(heavy & {m.split('.')[0] for m in sys.modules}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
