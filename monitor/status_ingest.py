"""Status ingest: a probe's signed status (``probes.status``), checked before it counts.

``StatusValidator.check(topic, payload, now)`` judges one message on
``<prefix>/status/<probe>`` and returns ``StatusAccepted`` or ``Rejected`` with
a bounded reason; it writes nothing. ``record(status)`` then remembers the status's
order for that probe (in the store's transaction, committed with the batch before the
message is acknowledged). Checks, in order; the first failure rejects (1-5 are every
signed message's, ``monitor.ingest.open_signed``, as for results):

1. ``too_large`` — bigger than ``probes.status.MAX_STATUS_BYTES`` (48 KiB).
2. ``probes.status.parse_status``: ``encoding``, ``json``, ``schema``, ``fields``.
3. ``unknown_probe`` — the probe is not configured.
4. ``topic_mismatch`` — the topic's probe differs from the payload's.
5. ``signature`` — the HMAC does not verify with that probe's key (an unsigned status
   fails here or at ``schema``/``fields``).
6. ``in_future`` — signed (``at``) more than ``ingest.max_clock_ahead`` after the
   monitor's clock.
7. ``stale`` — not newer (by ``Status.order``) than the last status accepted from that
   probe: an old status replayed. The same status again (the retained copy the broker
   sends on every subscribe) is accepted as a ``duplicate`` and changes nothing.

Only an accepted status changes a probe's state or its coverage of a target.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Final, Literal, get_args

from monitor.config import MonitorConfig
from monitor.ingest import Rejected, open_signed
from monitor.store import Marks
from probes.status import (
    MAX_STATUS_BYTES,
    Order,
    Status,
    order_text,
    parse_order,
    parse_status,
)

logger = logging.getLogger(__name__)

# reasons beyond probes.status.REJECT_REASONS (all bounded: ecpm_results_rejected_total{reason})
StatusMonitorReason = Literal["unknown_probe", "topic_mismatch", "signature", "in_future", "stale"]
STATUS_MONITOR_REASONS: Final[tuple[str, ...]] = get_args(StatusMonitorReason)


@dataclass(frozen=True, slots=True)
class StatusAccepted:
    status: Status
    duplicate: bool  # the status already accepted, again: change nothing


class OrderMarks:
    """The last accepted status order per probe, kept in the store (``status_order/<probe>``)
    so that a restart still refuses an old status replayed."""

    def __init__(self, store: Marks) -> None:
        self._store = store
        self._memory: dict[str, Order] = {}

    def get(self, probe: str) -> Order | None:
        if probe in self._memory:
            return self._memory[probe]
        text = self._store.mark(f"status_order/{probe}")
        if text is None:
            return None
        try:
            order = parse_order(text)
        except ValueError:
            logger.error("unreadable status order for probe %s in the store: ignored", probe)
            return None
        self._memory[probe] = order
        return order

    def set(self, probe: str, order: Order) -> None:
        self._memory[probe] = order
        self._store.set_mark(f"status_order/{probe}", order_text(order))


class StatusValidator:
    def __init__(self, config: MonitorConfig, marks: OrderMarks) -> None:
        self._prefix = f"{config.mqtt.topic_prefix}/status/"
        self._keys = {p.id: p.secret.get_secret_value().encode() for p in config.probes}
        self._ahead = timedelta(seconds=config.ingest.max_clock_ahead)
        self._marks = marks

    def check(self, topic: str, payload: bytes, now: datetime) -> StatusAccepted | Rejected:
        opened = open_signed(
            payload,
            topic,
            max_bytes=MAX_STATUS_BYTES,
            parse=parse_status,
            keys=self._keys,
            topic_of=lambda st: f"{self._prefix}{st.probe}",
            what="status",
        )
        if isinstance(opened, Rejected):
            return opened
        status = opened[0]
        if status.at > now + self._ahead:
            return Rejected("in_future", f"status of {status.probe} signed at {status.at.isoformat()}")
        mark = self._marks.get(status.probe)
        if mark is not None and status.order < mark:
            return Rejected(
                "stale",
                f"status of {status.probe} ({order_text(status.order)}) older than {order_text(mark)}",
            )
        return StatusAccepted(status, duplicate=mark is not None and status.order == mark)

    def record(self, status: Status) -> None:
        self._marks.set(status.probe, status.order)
