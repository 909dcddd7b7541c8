"""The wire schema of a result, version 1 (``ecpm.result/1``).

This is the one module ``monitor/`` imports from ``probes/``: it imports only the
standard library (and ``probes.outcome``, which is plain dataclasses), never pjsua2
or aiomqtt. The JSON Schema is published at ``docs/schema/result-v1.json``;
``tests/test_result.py`` checks that every result produced here validates against it.

Canonical form and signature
    ``canonical()`` is the UTF-8 encoding of ``json.dumps`` over every field except
    ``sig``, with ``sort_keys=True``, ``separators=(",", ":")``, ``ensure_ascii=False``
    and ``allow_nan=False``. Numbers are written as Python writes them (``repr`` of a
    float), so a verifier re-serialises the *parsed* values, which reproduces the bytes
    exactly for anything this module produced. ``sig`` is the lower-case hex
    HMAC-SHA256 of the canonical bytes with the probe's key.

Times are UTC, RFC 3339 with exactly three fractional digits and ``Z``
(``2024-05-01T12:00:00.123Z``); ``from_outcome`` truncates to milliseconds so that
a round trip is exact. ``id`` is a UUIDv7 (RFC 9562): unique and ordered by time.

Errors: ``parse_result`` raises ``ResultError`` whose ``reason`` is one of
``REJECT_REASONS`` (bounded, used as a metric label by the monitor); ``verify``
returns a bool (a bad signature is an expected value, not an exception).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import os
import re
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any, Final, Literal, get_args

from ecpm import __version__
from probes.outcome import CheckOutcome, MediaStats, Outcome

SCHEMA: Final = "ecpm.result/1"
MAX_RESULT_BYTES: Final = 64 * 1024  # a result is ~1 KiB; anything this big is hostile

# Bounded reasons for ``ResultError`` (the monitor's ecpm_results_rejected_total{reason}).
RejectReason = Literal["too_large", "encoding", "json", "schema", "fields", "signature"]
REJECT_REASONS: Final[tuple[str, ...]] = get_args(RejectReason)

# Patterns shared with docs/schema/result-v1.json (tests keep the two in step).
NAME_RE: Final = r"^[a-z0-9][a-z0-9_.-]{0,62}$"  # probe and target ids (probes.config.Name)
CODE_RE: Final = r"^[a-z][a-z0-9_]{0,63}$"  # check kind, stage, reason, timing keys
REQUEST_ID_RE: Final = r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$"
DETAIL_KEY_RE: Final = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
TIME_RE: Final = r"^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}\.[0-9]{3}Z$"
UUID_RE: Final = r"^[0-9a-f]{8}-[0-9a-f]{4}-7[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$"
SIG_RE: Final = r"^[0-9a-f]{64}$"
MAX_SIP_REASON: Final = 256
MAX_DETAIL_ITEMS: Final = 32
MAX_DETAIL_VALUE: Final = 1024
MAX_VERSION: Final = 64
MAX_TIMINGS: Final = 32

_NAME = re.compile(NAME_RE)
_CODE = re.compile(CODE_RE)
_REQUEST_ID = re.compile(REQUEST_ID_RE)
_DETAIL_KEY = re.compile(DETAIL_KEY_RE)
_TIME = re.compile(TIME_RE)
_UUID = re.compile(UUID_RE)
_SIG = re.compile(SIG_RE)
_SURROGATE = re.compile("[\ud800-\udfff]")
_OUTCOMES: Final = frozenset(get_args(Outcome))

FIELDS: Final = frozenset(
    {
        "schema",
        "id",
        "probe",
        "seq",
        "target",
        "check",
        "started_at",
        "finished_at",
        "outcome",
        "stage",
        "reason",
        "sip_status",
        "sip_reason",
        "timings",
        "media",
        "detail",
        "confirm",
        "request_id",
        "version",
        "sig",
    }
)
MEDIA_FIELDS: Final = frozenset(
    {"rx_packets", "tx_packets", "loss", "jitter_ms", "rtt_ms", "mos", "tone_heard", "echo_heard"}
)


class ResultError(ValueError):
    """A payload is not a valid ``ecpm.result/1``; ``reason`` is a bounded code."""

    def __init__(self, reason: RejectReason, detail: str) -> None:
        self.reason: RejectReason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}")


# ---------------------------------------------------------------- small helpers


def new_id(now_ms: int | None = None) -> str:
    """A UUIDv7 (RFC 9562): 48-bit Unix milliseconds, then 74 random bits."""
    ms = time.time_ns() // 1_000_000 if now_ms is None else now_ms
    rand = int.from_bytes(os.urandom(10), "big")  # 80 bits; 74 used
    value = (ms & (2**48 - 1)) << 80
    value |= 0x7 << 76  # version
    value |= ((rand >> 62) & 0xFFF) << 64  # rand_a, 12 bits
    value |= 0b10 << 62  # variant
    value |= rand & (2**62 - 1)  # rand_b, 62 bits
    return str(uuid.UUID(int=value))


def format_time(moment: datetime) -> str:
    """UTC, RFC 3339, milliseconds, ``Z``. A naive datetime is taken to be UTC."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    t = moment.astimezone(UTC)
    return (
        f"{t.year:04d}-{t.month:02d}-{t.day:02d}T{t.hour:02d}:{t.minute:02d}:{t.second:02d}"
        f".{t.microsecond // 1000:03d}Z"
    )


def parse_time(text: str) -> datetime:
    """Inverse of ``format_time``; raises ValueError for anything else."""
    if not isinstance(text, str) or not _TIME.match(text):
        raise ValueError(f"not an RFC 3339 UTC time with milliseconds: {text!r}")
    return datetime(
        int(text[0:4]),
        int(text[5:7]),
        int(text[8:10]),
        int(text[11:13]),
        int(text[14:16]),
        int(text[17:19]),
        int(text[20:23]) * 1000,
        tzinfo=UTC,
    )


def _ms(moment: datetime) -> datetime:
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    utc = moment.astimezone(UTC)
    return utc.replace(microsecond=utc.microsecond // 1000 * 1000)


def _text(value: str, limit: int) -> str:
    """Bounded, valid UTF-8 (lone surrogates from a peer become U+FFFD)."""
    return _SURROGATE.sub("\ufffd", value)[:limit]


def _finite(value: float | None) -> float | None:
    if value is None or not math.isfinite(value):
        return None
    return float(value)


def _key_bytes(key: bytes | str) -> bytes:
    return key.encode("utf-8") if isinstance(key, str) else key


def _dumps(data: Mapping[str, Any]) -> bytes:
    return json.dumps(
        data, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")


# ---------------------------------------------------------------- the result


@dataclass(frozen=True, slots=True)
class Media:
    """Media figures as they go over the wire (floats may be null when unmeasurable)."""

    rx_packets: int
    tx_packets: int
    loss: float | None  # fraction 0..1
    jitter_ms: float | None
    rtt_ms: float | None
    mos: float | None
    tone_heard: bool
    echo_heard: bool | None

    @classmethod
    def from_stats(cls, stats: MediaStats) -> Media:
        loss = _finite(stats.loss)
        mos = _finite(stats.mos)
        return cls(
            rx_packets=max(0, int(stats.rx_packets)),
            tx_packets=max(0, int(stats.tx_packets)),
            loss=None if loss is None else min(1.0, max(0.0, loss)),
            jitter_ms=_nonneg(_finite(stats.jitter_ms)),
            rtt_ms=_nonneg(_finite(stats.rtt_ms)),
            mos=None if mos is None else min(5.0, max(1.0, mos)),
            tone_heard=bool(stats.tone_heard),
            echo_heard=None if stats.echo_heard is None else bool(stats.echo_heard),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "rx_packets": self.rx_packets,
            "tx_packets": self.tx_packets,
            "loss": self.loss,
            "jitter_ms": self.jitter_ms,
            "rtt_ms": self.rtt_ms,
            "mos": self.mos,
            "tone_heard": self.tone_heard,
            "echo_heard": self.echo_heard,
        }


def _nonneg(value: float | None) -> float | None:
    return None if value is None else max(0.0, value)


@dataclass(frozen=True, slots=True)
class Result:
    """One signed result, exactly as it travels. Build with ``Result.from_outcome``."""

    id: str
    probe: str
    seq: int
    target: str
    check: str
    started_at: datetime
    finished_at: datetime
    outcome: Outcome
    stage: str | None
    reason: str | None
    sip_status: int | None
    sip_reason: str | None
    timings: Mapping[str, float]
    media: Media | None
    detail: Mapping[str, str]
    confirm: bool
    request_id: str | None
    version: str
    sig: str = ""
    schema: str = field(default=SCHEMA)

    @classmethod
    def from_outcome(
        cls,
        outcome: CheckOutcome,
        *,
        probe: str,
        seq: int,
        target: str,
        key: bytes | str,
        confirm: bool = False,
        request_id: str | None = None,
        version: str | None = None,
        result_id: str | None = None,
    ) -> Result:
        """Number, stamp and sign what a check produced.

        Measurements are normalised, never refused: non-finite floats become null,
        negative or non-finite timings are dropped (and named in ``detail``), free text
        is cut to its bound. Identifiers that come from ecpm itself (probe, target,
        check, stage, reason, request_id) must already be valid: a bad one is a bug
        and raises ``ValueError``.
        """
        if version is None:
            version = __version__
        _require(_NAME, probe, "probe")
        _require(_NAME, target, "target")
        _require(_CODE, outcome.check, "check")
        if outcome.outcome not in _OUTCOMES:
            raise ValueError(f"outcome must be one of {sorted(_OUTCOMES)}: {outcome.outcome!r}")
        for name, code in (("stage", outcome.stage), ("reason", outcome.reason)):
            if code is not None:
                _require(_CODE, code, name)
        if request_id is not None:
            _require(_REQUEST_ID, request_id, "request_id")
        if isinstance(seq, bool) or not isinstance(seq, int) or seq < 1:
            raise ValueError(f"seq must be an integer >= 1: {seq!r}")
        status = outcome.sip_status
        if status is not None and not 100 <= status <= 699:
            status = None

        timings: dict[str, float] = {}
        dropped: list[str] = []
        for stage, seconds in outcome.timings.items():
            value = _finite(seconds)
            if value is None or value < 0 or not _CODE.match(stage) or len(timings) >= MAX_TIMINGS:
                dropped.append(_text(str(stage), 64))
            else:
                timings[stage] = value
        detail: dict[str, str] = {}
        for k, v in outcome.detail.items():
            if len(detail) >= MAX_DETAIL_ITEMS - 1 or not _DETAIL_KEY.match(k):
                continue
            detail[k] = _text(str(v), MAX_DETAIL_VALUE)
        if dropped:
            detail["dropped_timings"] = _text(",".join(dropped), MAX_DETAIL_VALUE)

        unsigned = cls(
            id=new_id() if result_id is None else result_id,
            probe=probe,
            seq=seq,
            target=target,
            check=outcome.check,
            started_at=_ms(outcome.started_at),
            finished_at=_ms(outcome.finished_at),
            outcome=outcome.outcome,
            stage=outcome.stage,
            reason=outcome.reason,
            sip_status=status,
            sip_reason=None if outcome.sip_reason is None else _text(outcome.sip_reason, MAX_SIP_REASON),
            timings=MappingProxyType(timings),
            media=None if outcome.media is None else Media.from_stats(outcome.media),
            detail=MappingProxyType(detail),
            confirm=bool(confirm),
            request_id=request_id,
            version=_text(version, MAX_VERSION),
        )
        return unsigned.signed(key)

    # -------------------------------------------------------------- wire form

    def to_dict(self, *, with_sig: bool = True) -> dict[str, Any]:
        data: dict[str, Any] = {
            "schema": self.schema,
            "id": self.id,
            "probe": self.probe,
            "seq": self.seq,
            "target": self.target,
            "check": self.check,
            "started_at": format_time(self.started_at),
            "finished_at": format_time(self.finished_at),
            "outcome": self.outcome,
            "stage": self.stage,
            "reason": self.reason,
            "sip_status": self.sip_status,
            "sip_reason": self.sip_reason,
            "timings": dict(self.timings),
            "media": None if self.media is None else self.media.to_dict(),
            "detail": dict(self.detail),
            "confirm": self.confirm,
            "request_id": self.request_id,
            "version": self.version,
        }
        if with_sig:
            data["sig"] = self.sig
        return data

    def canonical(self) -> bytes:
        """The signed bytes: every field except ``sig``, canonical JSON, UTF-8."""
        return _dumps(self.to_dict(with_sig=False))

    def to_json(self) -> bytes:
        """The payload published over MQTT (canonical JSON including ``sig``)."""
        return _dumps(self.to_dict())

    def signed(self, key: bytes | str) -> Result:
        sig = hmac.new(_key_bytes(key), self.canonical(), hashlib.sha256).hexdigest()
        return replace(self, sig=sig)


def _require(pattern: re.Pattern[str], value: object, name: str) -> None:
    if not isinstance(value, str) or not pattern.match(value):
        raise ValueError(f"{name} must match {pattern.pattern}: {value!r}")


def verify(result: Result, key: bytes | str) -> bool:
    """True when ``sig`` is the HMAC-SHA256 of the canonical payload (constant time)."""
    expected = hmac.new(_key_bytes(key), result.canonical(), hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected.encode("ascii"), result.sig.encode("utf-8", "replace"))


# ---------------------------------------------------------------- parsing


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ResultError("json", f"duplicate key {k!r}")
        out[k] = v
    return out


def _reject_constant(name: str) -> Any:
    raise ResultError("json", f"{name} is not a JSON number")


def parse_result(payload: bytes) -> Result:
    """Decode and strictly check one payload; does not check the signature (``verify``)."""
    if len(payload) > MAX_RESULT_BYTES:
        raise ResultError("too_large", f"{len(payload)} bytes > {MAX_RESULT_BYTES}")
    try:
        text = bytes(payload).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ResultError("encoding", f"not UTF-8 at byte {exc.start}") from None
    try:
        data = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_reject_constant)
    except json.JSONDecodeError as exc:
        raise ResultError("json", f"line {exc.lineno} column {exc.colno}: {exc.msg}") from None
    except RecursionError:
        raise ResultError("json", "nested too deeply") from None
    if not isinstance(data, dict):
        raise ResultError("json", "the payload is not a JSON object")
    if data.get("schema") != SCHEMA:
        raise ResultError("schema", f"schema is {str(data.get('schema'))[:40]!r}, not {SCHEMA!r}")
    try:
        return _from_dict(data)
    except (ValueError, TypeError) as exc:
        raise ResultError("fields", str(exc)[:200]) from None


def _get(data: Mapping[str, Any], name: str, kind: type | tuple[type, ...]) -> Any:
    value = data[name]
    if isinstance(value, bool) and kind in (int, float, (int, float)):
        raise ValueError(f"{name} must be a number, not a boolean")
    if not isinstance(value, kind):
        raise ValueError(f"{name} has the wrong type ({type(value).__name__})")
    return value


def _opt(data: Mapping[str, Any], name: str, kind: type | tuple[type, ...]) -> Any:
    return None if data[name] is None else _get(data, name, kind)


def _match(pattern: re.Pattern[str], value: Any, name: str) -> str:
    if not isinstance(value, str) or not pattern.match(value):
        raise ValueError(f"{name} is not valid")
    return value


def _number(value: Any, name: str, *, nullable: bool = False) -> float | None:
    if value is None and nullable:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name} must be a number")
    return value


def _from_dict(data: dict[str, Any]) -> Result:
    keys = set(data)
    if keys != FIELDS:
        missing, extra = sorted(FIELDS - keys), sorted(keys - FIELDS)
        raise ValueError(f"missing {missing} unknown {[k[:40] for k in extra][:5]}")
    seq = _get(data, "seq", int)
    if seq < 1:
        raise ValueError("seq must be >= 1")
    outcome = data["outcome"]
    if outcome not in _OUTCOMES:
        raise ValueError("outcome is not pass, fail or inconclusive")
    status = _opt(data, "sip_status", int)
    if status is not None and not 100 <= status <= 699:
        raise ValueError("sip_status out of range")
    sip_reason = _opt(data, "sip_reason", str)
    if sip_reason is not None and len(sip_reason) > MAX_SIP_REASON:
        raise ValueError("sip_reason too long")
    timings_raw = _get(data, "timings", dict)
    if len(timings_raw) > MAX_TIMINGS:
        raise ValueError("too many timings")
    timings: dict[str, float] = {}
    for k, v in timings_raw.items():
        _match(_CODE, k, "a timing key")
        number = _number(v, f"timings.{k}")
        if number is None or number < 0:
            raise ValueError(f"timings.{k} must be >= 0")
        timings[k] = number
    detail_raw = _get(data, "detail", dict)
    if len(detail_raw) > MAX_DETAIL_ITEMS:
        raise ValueError("too many detail items")
    for k, v in detail_raw.items():
        _match(_DETAIL_KEY, k, "a detail key")
        if not isinstance(v, str) or len(v) > MAX_DETAIL_VALUE:
            raise ValueError(f"detail.{k} must be a string of at most {MAX_DETAIL_VALUE}")
    version = _get(data, "version", str)
    if len(version) > MAX_VERSION:
        raise ValueError("version too long")
    return Result(
        schema=data["schema"],
        id=_match(_UUID, data["id"], "id"),
        probe=_match(_NAME, data["probe"], "probe"),
        seq=seq,
        target=_match(_NAME, data["target"], "target"),
        check=_match(_CODE, data["check"], "check"),
        started_at=parse_time(data["started_at"]),
        finished_at=parse_time(data["finished_at"]),
        outcome=outcome,
        stage=None if data["stage"] is None else _match(_CODE, data["stage"], "stage"),
        reason=None if data["reason"] is None else _match(_CODE, data["reason"], "reason"),
        sip_status=status,
        sip_reason=sip_reason,
        timings=MappingProxyType(timings),
        media=_media(data["media"]),
        detail=MappingProxyType(dict(detail_raw)),
        confirm=_get(data, "confirm", bool),
        request_id=None
        if data["request_id"] is None
        else _match(_REQUEST_ID, data["request_id"], "request_id"),
        version=version,
        sig=_match(_SIG, data["sig"], "sig"),
    )


def _media(raw: Any) -> Media | None:
    if raw is None:
        return None
    if not isinstance(raw, dict) or set(raw) != MEDIA_FIELDS:
        raise ValueError("media must be null or an object with exactly the media fields")
    counts = []
    for name in ("rx_packets", "tx_packets"):
        value = raw[name]
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"media.{name} must be an integer >= 0")
        counts.append(value)
    loss = _number(raw["loss"], "media.loss", nullable=True)
    if loss is not None and not 0 <= loss <= 1:
        raise ValueError("media.loss must be within 0..1")
    mos = _number(raw["mos"], "media.mos", nullable=True)
    if mos is not None and not 1 <= mos <= 5:
        raise ValueError("media.mos must be within 1..5")
    jitter = _number(raw["jitter_ms"], "media.jitter_ms", nullable=True)
    rtt = _number(raw["rtt_ms"], "media.rtt_ms", nullable=True)
    for name, value in (("jitter_ms", jitter), ("rtt_ms", rtt)):
        if value is not None and value < 0:
            raise ValueError(f"media.{name} must be >= 0")
    tone, echo = raw["tone_heard"], raw["echo_heard"]
    if not isinstance(tone, bool) or not (echo is None or isinstance(echo, bool)):
        raise ValueError("media.tone_heard / echo_heard must be booleans")
    return Media(
        rx_packets=counts[0],
        tx_packets=counts[1],
        loss=loss,
        jitter_ms=jitter,
        rtt_ms=rtt,
        mos=mos,
        tone_heard=tone,
        echo_heard=echo,
    )
