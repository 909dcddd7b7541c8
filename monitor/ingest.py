"""Result ingest: the one validation a result passes, complete before anything is stored.

``ResultValidator.check(topic, payload, now)`` judges one MQTT message on a results
topic and returns ``Accepted`` (with every decision the store needs: duplicate or
not, the gap to record, the new last ``seq``) or ``Rejected`` with a bounded reason.
It reads the store (seq rules) and never writes it, so a rejected message leaves no
trace but its counter and log line. Checks, in order; the first failure rejects:

1. ``too_large`` — bigger than ``ingest.max_payload_bytes``.
2. ``probes.result.parse_result``: ``encoding``, ``json``, ``schema``, ``fields``,
   ``unknown_check``, ``out_of_range``, ``time_order`` (everything the payload alone
   can show: shape, types, patterns, the check kind, every number within its bound,
   ``finished_at >= started_at``, at most ``MAX_SECONDS`` apart).
3. ``unknown_probe`` — the probe is not configured.
4. ``topic_mismatch`` — the topic's probe/target differ from the payload's.
5. ``signature`` — the HMAC does not verify with that probe's key (checked over the
   received bytes when they are the result's wire form, ``probes.wire.unsigned``: what a
   probe publishes; otherwise over the canonical bytes encoded again).
6. ``unknown_target`` — the target is not configured.
7. ``too_old`` / ``in_future`` — ``finished_at`` more than ``ingest.max_result_age``
   before the monitor's receive time, or ``started_at``/``finished_at`` more than
   ``ingest.max_clock_ahead`` after it.
8. the same ``id`` already stored: accepted as a duplicate (QoS 1 redelivery; stored once).
9. ``seq_reused`` — the probe's ``seq`` is already stored under another id, or is at
   or below the last one stored for the probe without filling a recorded gap (a probe
   hands each number out once; a late result that fills a gap is accepted). A jump
   forward records a gap.

So only configured probes and targets and the known check kinds ever reach a metric
label, and every stored row is one that every later step (metrics, state, report,
ledger) can read.

These checks decide what is accepted. When an accepted result counts as having finished
is decided after them, by the monitor (``monitor.skew``: its judged time, stored with
the row), never by the probe's stamp alone.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Final, Literal, Protocol, TypeVar, get_args

from monitor.config import MonitorConfig
from monitor.model import ResultSummary
from monitor.store import SeqReads, summarize
from probes.result import Result, format_time, parse_result
from probes.wire import WireError

# ingest rejections beyond the result parser's own (probes.result.REJECT_REASONS)
MonitorReason = Literal[
    "unknown_probe", "topic_mismatch", "unknown_target", "too_old", "in_future", "seq_reused"
]
MONITOR_REASONS: Final[tuple[str, ...]] = get_args(MonitorReason)


@dataclass(frozen=True, slots=True)
class Accepted:
    result: Result
    summary: ResultSummary
    duplicate: bool  # its id is already stored: count it, store nothing
    gap: tuple[int, int] | None  # (last stored seq, this seq) when results are missing between
    new_last_seq: int | None  # the probe's new highest seq, when this one raises it
    first: bool = False  # the first result of its probe in the store (no last seq yet)
    wire: bytes | None = None  # the payload, when it is the result's wire form (stored as it came)


@dataclass(frozen=True, slots=True)
class Rejected:
    reason: str  # one of REJECT_REASONS or MONITOR_REASONS: bounded
    detail: str


class SignedMessage(Protocol):
    """A result or a status: signed by its probe with the probe's key."""

    @property
    def probe(self) -> str: ...
    def wire_of(self, payload: bytes) -> bytes | None: ...
    def signature_ok(self, key: bytes | str, *, wire: bytes | None = None) -> bool: ...


M = TypeVar("M", bound=SignedMessage)


def open_signed(
    payload: bytes,
    topic: str,
    *,
    max_bytes: int,
    parse: Callable[[bytes], M],
    keys: Mapping[str, bytes],
    topic_of: Callable[[M], str],
    what: str,
) -> tuple[M, bytes | None] | Rejected:
    """The checks every signed message passes before anything reads what it says, in this
    order: its size before it is parsed, its shape, a configured probe, the topic it came
    on (a probe's key signs only its own topics), its signature. Returns the message and
    ``payload`` when that is the message's wire form (``Signed.wire_of``), else None."""
    if len(payload) > max_bytes:
        return Rejected("too_large", f"{what} of {len(payload)} bytes > {max_bytes}")
    try:
        message = parse(payload)
    except WireError as exc:
        return Rejected(exc.reason, f"{what}: {exc.detail}")
    key = keys.get(message.probe)
    if key is None:
        return Rejected("unknown_probe", f"{what} of unconfigured probe {message.probe}")
    if topic != topic_of(message):
        return Rejected("topic_mismatch", f"{what} of {message.probe} came on another probe's topic")
    wire = message.wire_of(payload)
    if not message.signature_ok(key, wire=wire):
        return Rejected("signature", f"bad signature on a {what} of {message.probe}")
    return message, wire


class ResultValidator:
    def __init__(self, config: MonitorConfig, store: SeqReads) -> None:
        self._prefix = f"{config.mqtt.topic_prefix}/results/"
        self._keys = {p.id: p.secret.get_secret_value().encode() for p in config.probes}
        self._targets = frozenset(t.id for t in config.targets)
        self._max_bytes = config.ingest.max_payload_bytes
        self._max_age = timedelta(seconds=config.ingest.max_result_age)
        self._ahead = timedelta(seconds=config.ingest.max_clock_ahead)
        self._store = store

    def check(self, topic: str, payload: bytes, now: datetime) -> Accepted | Rejected:
        opened = open_signed(
            payload,
            topic,
            max_bytes=self._max_bytes,
            parse=parse_result,
            keys=self._keys,
            topic_of=lambda r: f"{self._prefix}{r.probe}/{r.target}",
            what="result",
        )
        if isinstance(opened, Rejected):
            return opened
        result, wire = opened
        if result.target not in self._targets:
            return Rejected("unknown_target", f"target {result.target} is not configured")
        if result.finished_at < now - self._max_age:
            return Rejected(
                "too_old", f"finished {format_time(result.finished_at)}, received {format_time(now)}"
            )
        if result.finished_at > now + self._ahead:
            return Rejected(
                "in_future", f"finished {format_time(result.finished_at)}, received {format_time(now)}"
            )
        summary = summarize(result)
        store = self._store
        if store.has_result(result.id):
            return Accepted(result, summary, duplicate=True, gap=None, new_last_seq=None)
        probe, seq = result.probe, result.seq
        if store.seq_stored(probe, seq):
            return Rejected("seq_reused", f"{probe} seq {seq} is already stored with another id")
        last = store.last_seq(probe)
        if last is not None and seq <= last and not store.in_gap(probe, seq):
            return Rejected(
                "seq_reused", f"{probe} seq {seq} is at or below its last ({last}) and fills no gap"
            )
        gap = (last, seq) if last is not None and seq > last + 1 else None
        new_last = seq if last is None or seq > last else None
        return Accepted(
            result, summary, duplicate=False, gap=gap, new_last_seq=new_last, first=last is None, wire=wire
        )
