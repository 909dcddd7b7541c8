"""End-to-end delivery between a probe's outbox and the monitor's store.

A PUBACK proves only that the broker has a result. So delivery is at-least-once from
outbox to store, with two signed messages from the monitor and a health report in the
probe's status (``probes.status``):

``ecpm.ack/1`` on ``<prefix>/acks/<probe>``, retained, QoS 1
    ``seq``: every result of that probe up to ``seq`` is committed in the monitor's
    store (the highest *contiguous* seq: a seq gap stops it until the gap is repaired or
    known to be unrecoverable). The probe deletes those results from its outbox; it keeps
    every result above, published or not, within ``outbox.keep_unconfirmed`` /
    ``outbox.keep_for`` (probes.outbox).

``ecpm.replay/1`` on ``<prefix>/commands/<probe>``, QoS 1, not retained
    ``first``..``last``: the monitor is missing these seq numbers. The probe publishes
    again, unchanged (same id and signature: the monitor's dedup by id holds), every one
    it still keeps, and answers in its next status which of them it no longer has
    (``OutboxHealth.gone``): those are unrecoverable (never stored: a failing disk; or
    evicted over the bound before the monitor confirmed them).

Both are signed with the probe's own key (HMAC-SHA256 of the canonical JSON, as results):
a forged ack would make a probe delete what the monitor never stored. Standard library
only, like ``probes.result``: ``monitor/`` imports it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final, Literal

from probes.result import CODE_RE, MAX_SEQ, NAME_RE, SIG_RE, format_time, parse_time
from probes.wire import Signed, WireError, load_object

ACK_SCHEMA: Final = "ecpm.ack/1"
REPLAY_SCHEMA: Final = "ecpm.replay/1"
MAX_MESSAGE_BYTES: Final = 1024
MAX_REPLAY: Final = 100_000  # seq numbers one replay request may name
MAX_GONE_RANGES: Final = 32  # ranges one status may report gone (the rest: in a later answer)
_NAME = re.compile(NAME_RE)
_CODE = re.compile(CODE_RE)
_SIG = re.compile(SIG_RE)


class DeliveryError(WireError):
    """Not a valid ack or replay request; ``reason`` is a bounded code."""

    reason: Literal["too_large", "encoding", "json", "schema", "fields"]


def _seq(value: object, name: str, *, low: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= MAX_SEQ:
        raise ValueError(f"{name} must be an integer within {low}..{MAX_SEQ}")
    return value


@dataclass(frozen=True, slots=True)
class Ack(Signed):
    probe: str
    seq: int  # every result up to this seq is stored
    at: datetime
    sig: str = ""

    def to_dict(self, *, with_sig: bool = True) -> dict[str, Any]:
        data: dict[str, Any] = {"schema": ACK_SCHEMA, "probe": self.probe, "seq": self.seq}
        data["at"] = format_time(self.at)
        if with_sig:
            data["sig"] = self.sig
        return data


@dataclass(frozen=True, slots=True)
class Replay(Signed):
    probe: str
    first: int
    last: int
    at: datetime
    sig: str = ""

    def to_dict(self, *, with_sig: bool = True) -> dict[str, Any]:
        data: dict[str, Any] = {"schema": REPLAY_SCHEMA, "probe": self.probe}
        data.update(first=self.first, last=self.last, at=format_time(self.at))
        if with_sig:
            data["sig"] = self.sig
        return data


Message = Ack | Replay


def make_ack(probe: str, seq: int, at: datetime, key: bytes | str) -> bytes:
    return Ack(probe, _seq(seq, "seq"), at).signed(key).to_json()


def make_replay(probe: str, first: int, last: int, at: datetime, key: bytes | str) -> bytes:
    if not 1 <= first <= last or last - first >= MAX_REPLAY:
        raise ValueError(f"a replay names 1..{MAX_REPLAY} seq numbers: {first}..{last}")
    return Replay(probe, _seq(first, "first", low=1), _seq(last, "last", low=1), at).signed(key).to_json()


def parse_message(payload: bytes, *, schema: str, probe: str, key: bytes | str) -> Message:
    """An ack or replay request for ``probe``, checked and verified, or ``DeliveryError``."""
    data = load_object(payload, max_bytes=MAX_MESSAGE_BYTES, schema=schema, error=DeliveryError)
    try:
        message: Message
        if schema == ACK_SCHEMA:
            if set(data) != {"schema", "probe", "seq", "at", "sig"}:
                raise ValueError(f"fields are {sorted(data)[:8]}")
            message = Ack(str(data["probe"]), _seq(data["seq"], "seq"), parse_time(data["at"]), data["sig"])
        else:
            if set(data) != {"schema", "probe", "first", "last", "at", "sig"}:
                raise ValueError(f"fields are {sorted(data)[:8]}")
            first, last = _seq(data["first"], "first", low=1), _seq(data["last"], "last", low=1)
            if first > last or last - first >= MAX_REPLAY:
                raise ValueError(f"a replay names 1..{MAX_REPLAY} seq numbers")
            message = Replay(str(data["probe"]), first, last, parse_time(data["at"]), data["sig"])
        if not isinstance(message.sig, str) or not _SIG.match(message.sig):
            raise ValueError("sig is not valid")
    except (ValueError, TypeError, KeyError) as exc:
        raise DeliveryError("fields", str(exc)[:200]) from None
    if message.probe != probe:
        raise DeliveryError("fields", f"for probe {message.probe[:64]!r}, not {probe!r}")
    if not message.signature_ok(key):
        raise DeliveryError("fields", "bad signature")
    return message


@dataclass(frozen=True, slots=True)
class OutboxHealth:
    """A probe's outbox as its status reports it (all counts since the probe started,
    except the depths and seq numbers, which are the outbox's own)."""

    unpublished: int  # not yet acknowledged by the broker
    unconfirmed: int  # published, not yet confirmed stored by the monitor (ack)
    last_seq: int  # the last seq number handed out (a result may be lost under it)
    confirmed_seq: int  # the monitor's last ack
    lost: int  # results that could not be stored (a failing disk): unrecoverable
    evicted: int  # results dropped over keep_unconfirmed/keep_for before any ack
    overflow: int  # results stored over outbox.max_results (nothing dropped)
    oldest_age: float | None  # seconds the oldest unpublished result has waited
    error: str | None  # a code while storing fails (e.g. "disk_full"), else None
    gone: tuple[tuple[int, int], ...] = field(default=())  # answer to the last replay

    def to_dict(self) -> dict[str, Any]:
        return {
            "unpublished": self.unpublished,
            "unconfirmed": self.unconfirmed,
            "last_seq": self.last_seq,
            "confirmed_seq": self.confirmed_seq,
            "lost": self.lost,
            "evicted": self.evicted,
            "overflow": self.overflow,
            "oldest_age": self.oldest_age,
            "error": self.error,
            "gone": [list(r) for r in self.gone],
        }

    @classmethod
    def from_dict(cls, data: object) -> OutboxHealth:
        if not isinstance(data, dict) or set(data) != HEALTH_FIELDS:
            raise ValueError("outbox must be an object with the fields of OutboxHealth")
        age = data["oldest_age"]
        if age is not None and (
            isinstance(age, bool) or not isinstance(age, int | float) or not 0 <= age <= 1e10
        ):
            raise ValueError("outbox.oldest_age must be a number of seconds or null")
        error = data["error"]
        if error is not None and (not isinstance(error, str) or not _CODE.match(error)):
            raise ValueError("outbox.error must be a code or null")
        gone = data["gone"]
        if not isinstance(gone, list) or len(gone) > MAX_GONE_RANGES:
            raise ValueError(f"outbox.gone must be a list of at most {MAX_GONE_RANGES} ranges")
        ranges = []
        for item in gone:
            if not isinstance(item, list) or len(item) != 2:
                raise ValueError("outbox.gone holds [first, last] pairs")
            first, last = _seq(item[0], "gone", low=1), _seq(item[1], "gone", low=1)
            if first > last:
                raise ValueError("outbox.gone: first > last")
            ranges.append((first, last))
        counts = {k: _seq(data[k], f"outbox.{k}") for k in HEALTH_FIELDS - {"oldest_age", "error", "gone"}}
        return cls(
            **counts,
            oldest_age=None if age is None else float(age),
            error=error,
            gone=tuple(ranges),
        )


HEALTH_FIELDS: Final = frozenset(
    {
        "unpublished", "unconfirmed", "last_seq", "confirmed_seq", "lost", "evicted", "overflow",
        "oldest_age", "error", "gone",
    }
)  # fmt: skip
