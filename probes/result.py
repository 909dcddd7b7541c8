"""The wire schema of a result, version 1 (``ecpm.result/1``).

This is the one module ``monitor/`` imports from ``probes/``: it imports only the
standard library (and ``probes.outcome``, which is plain dataclasses), never pjsua2
or aiomqtt. The JSON Schema is published at ``docs/schema/result-v1.json``;
``tests/test_result.py`` checks that every result produced here validates against it.

Canonical form and signature
    ``canonical()`` is the UTF-8 encoding of ``json.dumps`` over every field except
    ``sig``, with ``sort_keys=True``, ``separators=(",", ":")``, ``ensure_ascii=False``
    and ``allow_nan=False``. Numbers are written as Python writes them (``repr`` of a
    float), so a receiver checking a signature re-serialises the *parsed* values,
    which reproduces the bytes exactly for anything this module produced. ``sig`` is the lower-case hex
    HMAC-SHA256 of the canonical bytes with the probe's key.

Times are UTC, RFC 3339 with exactly three fractional digits and ``Z``
(``2024-05-01T12:00:00.123Z``); ``from_outcome`` truncates to milliseconds so that
a round trip is exact. ``id`` is a UUIDv7 (RFC 9562): unique and ordered by time.

Errors: ``parse_result`` raises ``ResultError`` whose ``reason`` is one of
``REJECT_REASONS`` (bounded, used as a metric label by the monitor);
``verify_signature`` returns a bool (a bad signature is an expected value, not an
exception).
"""

from __future__ import annotations

import json
import math
import os
import re
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from types import MappingProxyType
from typing import Any, Final, Literal, get_args

from ecpm import __version__
from probes import outcome as _vocabulary
from probes.outcome import CheckOutcome, MediaStats, Outcome
from probes.wire import Signed, WireError, load_object

SCHEMA: Final = "ecpm.result/1"
MAX_RESULT_BYTES: Final = 64 * 1024  # a result is ~1 KiB; anything this big is hostile

# Bounded reasons for ``ResultError`` (the monitor's ecpm_results_rejected_total{reason}).
RejectReason = Literal[
    "too_large", "encoding", "json", "schema", "fields", "unknown_check", "out_of_range", "time_order",
    "signature",
]  # fmt: skip
REJECT_REASONS: Final[tuple[str, ...]] = get_args(RejectReason)

# The wire vocabulary of check kinds, from probes.outcome, for the monitor (which imports
# only this module of probes/): the check kinds a probe runs (probes.check_kinds.REGISTRY;
# tests keep the two in step; only these ever reach the monitor's metric labels), those
# whose results decide reachability, and every stage a check may report (stage labels).
CHECK_KINDS: Final = _vocabulary.CHECK_KINDS
CALL_KINDS: Final = _vocabulary.CALL_KINDS
STAGES: Final = _vocabulary.STAGES

# Value bounds (docs/monitor.md "Bounds", docs/schema/result-v1.json). A value outside
# them is not a measurement but nonsense (or an attack): ``out_of_range``.
MAX_SEQ: Final = 2**53  # the largest integer every JSON reader holds exactly
MAX_SECONDS: Final = 3600.0  # a stage timing, and a whole check (finished_at - started_at)
MAX_PACKETS: Final = 10_000_000  # RTP packets in one call (an hour at 50/s is 180,000)
MAX_MEDIA_MS: Final = 60_000.0  # jitter and round-trip time, milliseconds
SIP_STATUS_RANGE: Final = (100, 699)
MOS_RANGE: Final = (1.0, 5.0)

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
# all of ``detail`` as written (keys, values, JSON escapes): what a probe signs stays well
# inside MAX_RESULT_BYTES whatever a far end put in the strings it copied
MAX_DETAIL_BYTES: Final = 16 * 1024
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


class ResultError(WireError):
    """A payload is not a valid ``ecpm.result/1``; ``reason`` is a bounded code."""

    reason: RejectReason


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


def _encoded_len(text: str) -> int:
    """Bytes ``text`` takes in the canonical JSON, quotes and separators included."""
    return len(json.dumps(text, ensure_ascii=False).encode("utf-8")) + 2


def _fit(text: str, budget: int) -> str | None:
    """``text`` cut so that it takes at most ``budget`` bytes written; None when nothing fits."""
    if budget <= 2:
        return None
    while text and _encoded_len(text) > budget:
        text = text[: max(0, min(len(text) - 1, len(text) * budget // _encoded_len(text)))]
    return text


def _finite(value: float | None) -> float | None:
    if value is None or not math.isfinite(value):
        return None
    return float(value)


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
            rx_packets=min(MAX_PACKETS, max(0, int(stats.rx_packets))),
            tx_packets=min(MAX_PACKETS, max(0, int(stats.tx_packets))),
            loss=None if loss is None else min(1.0, max(0.0, loss)),
            jitter_ms=_milliseconds(_finite(stats.jitter_ms)),
            rtt_ms=_milliseconds(_finite(stats.rtt_ms)),
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


def _milliseconds(value: float | None) -> float | None:
    """Non-negative; beyond ``MAX_MEDIA_MS`` it is no measurement (null)."""
    if value is None or value > MAX_MEDIA_MS:
        return None
    return max(0.0, value)


@dataclass(frozen=True, slots=True)
class Result(Signed):
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

        Measurements are normalised, never refused, so that what a probe signs always
        passes ``parse_result``: non-finite floats become null, negative, non-finite or
        over-long (> ``MAX_SECONDS``) timings are dropped (and named in ``detail``),
        media figures beyond their bounds are clamped (packet counts) or null (jitter,
        RTT), a finish before the start (a clock stepped back) becomes the start, a check
        longer than ``MAX_SECONDS`` is cut to its last ``MAX_SECONDS``, and free text is
        cut to its bound. Identifiers that come from ecpm itself (probe, target, check
        kind, stage, reason, request_id, seq) must already be valid: a bad one is a bug
        and raises ``ValueError``.
        """
        if version is None:
            version = __version__
        _require(_NAME, probe, "probe")
        _require(_NAME, target, "target")
        if outcome.check not in CHECK_KINDS:
            raise ValueError(f"check must be one of {list(CHECK_KINDS)}: {outcome.check!r}")
        if outcome.outcome not in _OUTCOMES:
            raise ValueError(f"outcome must be one of {sorted(_OUTCOMES)}: {outcome.outcome!r}")
        for name, code in (("stage", outcome.stage), ("reason", outcome.reason)):
            if code is not None:
                _require(_CODE, code, name)
        if request_id is not None:
            _require(_REQUEST_ID, request_id, "request_id")
        if isinstance(seq, bool) or not isinstance(seq, int) or not 1 <= seq <= MAX_SEQ:
            raise ValueError(f"seq must be an integer within 1..{MAX_SEQ}: {seq!r}")
        status = outcome.sip_status
        if status is not None and not 100 <= status <= 699:
            status = None

        timings: dict[str, float] = {}
        dropped: list[str] = []
        for stage, seconds in outcome.timings.items():
            value = _finite(seconds)
            if (
                value is None
                or not 0 <= value <= MAX_SECONDS
                or not _CODE.match(stage)
                or len(timings) >= MAX_TIMINGS
            ):
                dropped.append(_text(str(stage), 64))
            else:
                timings[stage] = value
        detail: dict[str, str] = {}
        budget = MAX_DETAIL_BYTES
        items = [(k, str(v)) for k, v in outcome.detail.items() if _DETAIL_KEY.match(k)]
        items = items[: MAX_DETAIL_ITEMS - 1]
        if dropped:
            items.insert(0, ("dropped_timings", ",".join(dropped)))
        for k, v in items:
            cut = _fit(_text(v, MAX_DETAIL_VALUE), budget - _encoded_len(k))
            if cut is None:
                break
            detail[k] = cut
            budget -= _encoded_len(k) + _encoded_len(cut)

        started, finished = _ms(outcome.started_at), _ms(outcome.finished_at)
        finished = max(finished, started)  # a clock stepped back during the check
        if finished - started > timedelta(seconds=MAX_SECONDS):
            started = finished - timedelta(seconds=MAX_SECONDS)

        unsigned = cls(
            id=new_id() if result_id is None else result_id,
            probe=probe,
            seq=seq,
            target=target,
            check=outcome.check,
            started_at=started,
            finished_at=finished,
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


def _require(pattern: re.Pattern[str], value: object, name: str) -> None:
    if not isinstance(value, str) or not pattern.match(value):
        raise ValueError(f"{name} must match {pattern.pattern}: {value!r}")


def verify_signature(result: Result, key: bytes | str) -> bool:
    """True when ``sig`` is the HMAC-SHA256 of the canonical payload (constant time)."""
    return result.signature_ok(key)


# ---------------------------------------------------------------- parsing


def parse_result(payload: bytes) -> Result:
    """Decode and strictly check one payload; does not check the signature (``verify_signature``).

    Everything that can be judged from the payload alone: JSON, schema, every field's
    type and pattern, the check kind, every number within its bound (``out_of_range``:
    finite, ``MAX_*`` and the ranges above), ``finished_at >= started_at``
    (``time_order``). What needs context (known probe and target, signature, times
    around the receive time, seq rules) is the monitor's (``monitor.ingest``). A
    payload this accepts can be stored, re-read and fed to every later step: no
    number in it overflows a float, and every time is a real UTC instant.
    """
    data = load_object(payload, max_bytes=MAX_RESULT_BYTES, schema=SCHEMA, error=ResultError)
    try:
        return _from_dict(data)
    except ResultError:
        raise
    except (ValueError, TypeError, OverflowError, RecursionError) as exc:
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


def _number(
    value: Any, name: str, lo: float, hi: float, *, nullable: bool = False, integer: bool = False
) -> Any:
    """A JSON number within ``[lo, hi]``: a wrong type is ``fields``; NaN, infinity
    (``1e400`` parses as one), a huge integer or any value outside is ``out_of_range``.
    The value is returned as parsed (int or float), so the canonical bytes still match."""
    if value is None and nullable:
        return None
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or (integer and isinstance(value, float))
    ):
        raise ValueError(f"{name} must be {'an integer' if integer else 'a number'}")
    number: int | float = value
    if isinstance(number, float) and not math.isfinite(number):
        raise ResultError("out_of_range", f"{name} is not finite")
    if not lo <= number <= hi:  # exact for big integers too (no float conversion)
        shown = f"{number:.6g}" if isinstance(number, float) else _int_text(number)
        raise ResultError("out_of_range", f"{name} = {shown} is outside {lo:g}..{hi:g}")
    return number


def _int_text(value: int) -> str:
    if abs(value) < 10**20:
        return str(value)
    return f"an integer of about {int(abs(value)).bit_length() * 0.30103:.0f} digits"


def _from_dict(data: dict[str, Any]) -> Result:
    keys = set(data)
    if keys != FIELDS:
        missing, extra = sorted(FIELDS - keys), sorted(keys - FIELDS)
        raise ValueError(f"missing {missing} unknown {[k[:40] for k in extra][:5]}")
    seq = _number(data["seq"], "seq", 1, MAX_SEQ, integer=True)
    check = _match(_CODE, data["check"], "check")
    if check not in CHECK_KINDS:
        raise ResultError("unknown_check", f"check {check[:64]!r} is not one of {', '.join(CHECK_KINDS)}")
    outcome = data["outcome"]
    if outcome not in _OUTCOMES:
        raise ValueError("outcome is not pass, fail or inconclusive")
    status = _opt(data, "sip_status", int)
    if status is not None:
        _number(status, "sip_status", *SIP_STATUS_RANGE, integer=True)
    sip_reason = _opt(data, "sip_reason", str)
    if sip_reason is not None and len(sip_reason) > MAX_SIP_REASON:
        raise ValueError("sip_reason too long")
    timings_raw = _get(data, "timings", dict)
    if len(timings_raw) > MAX_TIMINGS:
        raise ValueError("too many timings")
    timings: dict[str, float] = {}
    for k, v in timings_raw.items():
        _match(_CODE, k, "a timing key")
        timings[k] = _number(v, f"timings.{k}", 0, MAX_SECONDS)
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
    for name, text in (("sip_reason", sip_reason or ""), ("version", version), *detail_raw.items()):
        if _SURROGATE.search(text):  # a lone \ud800 escape: not text, and not encodable
            raise ValueError(f"{name[:64]} holds a lone surrogate")
    result = Result(
        schema=data["schema"],
        id=_match(_UUID, data["id"], "id"),
        probe=_match(_NAME, data["probe"], "probe"),
        seq=seq,
        target=_match(_NAME, data["target"], "target"),
        check=check,
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
    took = result.finished_at - result.started_at
    if took < timedelta(0):
        raise ResultError(
            "time_order", f"finished_at {data['finished_at']} is before started_at {data['started_at']}"
        )
    if took > timedelta(seconds=MAX_SECONDS):
        raise ResultError("out_of_range", f"the check lasted {took}, more than {MAX_SECONDS:g} s")
    return result


def _media(raw: Any) -> Media | None:
    if raw is None:
        return None
    if not isinstance(raw, dict) or set(raw) != MEDIA_FIELDS:
        raise ValueError("media must be null or an object with exactly the media fields")
    counts = []
    for name in ("rx_packets", "tx_packets"):
        counts.append(_number(raw[name], f"media.{name}", 0, MAX_PACKETS, integer=True))
    loss = _number(raw["loss"], "media.loss", 0, 1, nullable=True)
    mos = _number(raw["mos"], "media.mos", *MOS_RANGE, nullable=True)
    jitter = _number(raw["jitter_ms"], "media.jitter_ms", 0, MAX_MEDIA_MS, nullable=True)
    rtt = _number(raw["rtt_ms"], "media.rtt_ms", 0, MAX_MEDIA_MS, nullable=True)
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
