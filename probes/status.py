"""The wire schema of a probe's status, version 1 (``ecpm.status/1``), signed like a result.

Published retained (QoS 1) on ``<prefix>/status/<probe>``: ``online`` after every
connect and whenever the probe's targets change, ``offline`` as the session's Last Will
and on a clean stop. The JSON Schema is ``docs/schema/status-v1.json``. Like
``probes.result`` this module imports only the standard library and ``probes.result``
(for the shared patterns and time format): ``monitor/`` may import it.

Canonical form and signature
    Exactly as for results (``probes.result``): ``canonical()`` is the UTF-8 of
    ``json.dumps`` over every field except ``sig`` with ``sort_keys=True``,
    ``separators=(",", ":")``, ``ensure_ascii=False``, ``allow_nan=False``; ``sig`` is
    the lower-case hex HMAC-SHA256 of those bytes with the probe's own key.

Order and replay
    A Last Will is fixed (and so signed) when the session connects, before that
    session's ``online`` statuses, but means "this session ended". So a status is
    ordered by ``order`` = (``connected_at``, offline after online, ``at``):
    ``connected_at`` is when the session's CONNECT (and its Last Will) was made, ``at``
    when this status was signed (the Last Will's ``at`` is its ``connected_at``). A
    probe keeps both strictly increasing for as long as it runs. A receiver accepts a
    status only if its ``order`` is above the last one it accepted from that probe
    (equal: the same status again, e.g. the retained copy on every resubscribe), so an
    old signed ``online`` replayed after the probe went offline, or an old Last Will
    replayed while it is online, is refused as ``stale``.

Errors: ``parse_status`` raises ``StatusError`` whose ``reason`` is one of
``REJECT_REASONS`` (bounded: a metric label); ``verify_status_signature`` returns a bool.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final, Literal, get_args

from probes.delivery import OutboxHealth
from probes.result import CODE_RE, MAX_VERSION, NAME_RE, SIG_RE, format_time, parse_time
from probes.wire import Signed, WireError, load_object

SCHEMA: Final = "ecpm.status/1"
MAX_STATUS_TARGETS: Final = 500  # probes.config.ProbeConfig.targets allows as many
MAX_STATUS_BYTES: Final = 48 * 1024  # 500 targets of 63 characters take about 33 KiB

StatusRejectReason = Literal["too_large", "encoding", "json", "schema", "fields"]
REJECT_REASONS: Final[tuple[str, ...]] = get_args(StatusRejectReason)

FIELDS: Final = frozenset(
    {
        "schema", "probe", "online", "reason", "version", "started_at", "connected_at", "at",
        "targets", "outbox", "sig",
    }
)  # fmt: skip
_NAME = re.compile(NAME_RE)
_CODE = re.compile(CODE_RE)
_SIG = re.compile(SIG_RE)


class StatusError(WireError):
    """A payload is not a valid ``ecpm.status/1``; ``reason`` is a bounded code."""

    reason: StatusRejectReason


Order = tuple[datetime, int, datetime]


@dataclass(frozen=True, slots=True)
class Status(Signed):
    """One signed status, exactly as it travels. Build with ``Status.make``."""

    probe: str
    online: bool
    reason: str | None  # why offline ("connection_lost": the Last Will, "shutdown"); None online
    version: str
    started_at: datetime  # when the probe's publisher started
    connected_at: datetime  # when this MQTT session's CONNECT (and Last Will) was made
    at: datetime  # when this status was signed
    targets: tuple[str, ...]
    outbox: OutboxHealth | None = None  # the probe's outbox (probes.delivery); None: not known
    sig: str = ""
    schema: str = SCHEMA

    @classmethod
    def make(
        cls,
        *,
        probe: str,
        online: bool,
        reason: str | None,
        version: str,
        started_at: datetime,
        connected_at: datetime,
        at: datetime,
        targets: Sequence[str],
        key: bytes | str,
        outbox: OutboxHealth | None = None,
    ) -> Status:
        """Sign a status. Everything here comes from ecpm itself: a bad value is a bug
        and raises ``ValueError`` (so a probe never publishes what a monitor refuses)."""
        status = cls(
            probe=probe,
            online=online,
            reason=reason,
            version=version[:MAX_VERSION],
            started_at=started_at,
            connected_at=connected_at,
            at=at,
            targets=tuple(targets),
            outbox=outbox,
        )
        _check(status)
        return status.signed(key)

    @property
    def order(self) -> Order:
        """Later sessions first; in a session, offline (its end) after every online."""
        return (self.connected_at, 0 if self.online else 1, self.at)

    def to_dict(self, *, with_sig: bool = True) -> dict[str, Any]:
        data: dict[str, Any] = {
            "schema": self.schema,
            "probe": self.probe,
            "online": self.online,
            "reason": self.reason,
            "version": self.version,
            "started_at": format_time(self.started_at),
            "connected_at": format_time(self.connected_at),
            "at": format_time(self.at),
            "targets": list(self.targets),
            "outbox": None if self.outbox is None else self.outbox.to_dict(),
        }
        if with_sig:
            data["sig"] = self.sig
        return data


def order_text(order: Order) -> str:
    """``order`` as text that sorts the same way (fixed-width times): for storage."""
    return f"{format_time(order[0])}/{order[1]}/{format_time(order[2])}"


def parse_order(text: str) -> Order:
    first, kind, last = text.split("/")
    return (parse_time(first), int(kind), parse_time(last))


def verify_status_signature(status: Status, key: bytes | str) -> bool:
    """True when ``sig`` is the HMAC-SHA256 of the canonical payload (constant time)."""
    return status.signature_ok(key)


def parse_status(payload: bytes) -> Status:
    """Decode and strictly check one payload; does not check the signature (``verify_status_signature``)."""
    data = load_object(payload, max_bytes=MAX_STATUS_BYTES, schema=SCHEMA, error=StatusError)
    try:
        status = _from_dict(data)
        _check(status)
    except (ValueError, TypeError, OverflowError) as exc:
        raise StatusError("fields", str(exc)[:200]) from None
    return status


# ---------------------------------------------------------------- internals


def _from_dict(data: Mapping[str, Any]) -> Status:
    keys = set(data)
    if keys != FIELDS:
        missing, extra = sorted(FIELDS - keys), sorted(keys - FIELDS)
        raise ValueError(f"missing {missing} unknown {[k[:40] for k in extra][:5]}")
    targets = data["targets"]
    if not isinstance(targets, list):
        raise ValueError("targets must be a list")
    for name in ("probe", "version", "sig", "started_at", "connected_at", "at"):
        if not isinstance(data[name], str):
            raise ValueError(f"{name} must be a string")
    if not isinstance(data["online"], bool):
        raise ValueError("online must be a boolean")
    if not isinstance(data["reason"], str | None):
        raise ValueError("reason must be a string or null")
    if not _SIG.match(data["sig"]):
        raise ValueError("sig is not valid")
    return Status(
        probe=data["probe"],
        online=data["online"],
        reason=data["reason"],
        version=data["version"],
        started_at=parse_time(data["started_at"]),
        connected_at=parse_time(data["connected_at"]),
        at=parse_time(data["at"]),
        targets=tuple(targets),
        outbox=None if data["outbox"] is None else OutboxHealth.from_dict(data["outbox"]),
        sig=data["sig"],
    )


def _check(status: Status) -> None:
    """The rules both ``make`` and ``parse_status`` enforce (ValueError naming the field)."""
    if not isinstance(status.probe, str) or not _NAME.match(status.probe):
        raise ValueError("probe is not a probe id")
    if status.online and status.reason is not None:
        raise ValueError("an online status has no reason")
    if not status.online and (not isinstance(status.reason, str) or not _CODE.match(status.reason)):
        raise ValueError("an offline status needs a reason code")
    if len(status.version) > MAX_VERSION:
        raise ValueError("version too long")
    if len(status.targets) > MAX_STATUS_TARGETS:
        raise ValueError(f"more than {MAX_STATUS_TARGETS} targets")
    for target in status.targets:
        if not isinstance(target, str) or not _NAME.match(target):
            raise ValueError("a target is not a target id")
    if len(set(status.targets)) != len(status.targets):
        raise ValueError("a target appears twice")
    if not status.started_at <= status.connected_at <= status.at:
        raise ValueError("started_at <= connected_at <= at does not hold")
