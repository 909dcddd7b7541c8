"""Notification duties: the clocks an outage starts, their acknowledgements, their escalation.

An incident, when it opens, takes the duties its target carries (``MonitorConfig.duties_for``:
the global ``duties`` and the target's own), each due ``deadline`` after detection
(``duties_at``); they are stored with it and never recomputed, so a config change later does
not move a clock that is already running. ``ecpm incident ack`` (the token-protected
``incident_ack`` action, ``Acknowledgements``) records who did a duty, when, and a
reference; a duty acknowledged by its due time is **met**, later or never **missed**
(``IncidentDuty.status``). A duty still unacknowledged ``escalate_before`` its due time
pages its route once (``MonitorCore`` asks ``DutyBook.escalations_due``; only the
evaluating monitor escalates, ``mark_escalated`` lets one caller through, and the page
goes through the notifications queue and its fleet-wide claim like every page).
Acknowledging the incident itself (no duty named) stops its escalation pages; it stays
open and shown, and its duties stay pending until each is acknowledged.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any, Final

from monitor.config import Duty
from monitor.model import Ack, IncidentDuty
from monitor.store import DutyBook
from monitor.views import incident_json
from monitor.web import ActionError

MAX_REF: Final = 200
MAX_BY: Final = 100
_PRINTABLE = re.compile(r"^[^\x00-\x1f\x7f]+$")


def duties_at(duties: list[Duty], detected_at: datetime) -> tuple[IncidentDuty, ...]:
    """The duties of an incident detected at ``detected_at``, due from then."""
    out = []
    for d in duties:
        due = detected_at + timedelta(seconds=d.deadline)
        out.append(
            IncidentDuty(
                name=d.name,
                text=d.text,
                due_at=due,
                escalate_at=due - timedelta(seconds=d.escalate_before),
                route=tuple(d.route),
            )
        )
    return tuple(out)


def _text(body: dict[str, Any], key: str, limit: int, *, required: bool) -> str | None:
    value = body.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, str) or not value.strip():
        raise ActionError(f"{key} must be a non-empty string")
    value = value.strip()
    if len(value) > limit or not _PRINTABLE.match(value):
        raise ActionError(f"{key} must be at most {limit} printable characters")
    return value


class Acknowledgements:
    """The ``incident_ack`` action: ``{"incident": ID, "duty": NAME|null, "ref": TEXT,
    "by": WHO}`` → the incident as the API shows it, with its duties and acks."""

    def __init__(
        self,
        *,
        store: DutyBook,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._store = store
        self._clock = clock  # the snapshot shows an ack from the next evaluation (within a second)

    async def ack(self, body: dict[str, Any]) -> dict[str, Any]:
        incident_id = body.get("incident")
        if not isinstance(incident_id, int) or isinstance(incident_id, bool) or incident_id < 1:
            raise ActionError("incident must be an incident id (a positive integer)")
        duty = _text(body, "duty", MAX_REF, required=False)
        ref = _text(body, "ref", MAX_REF, required=True)
        by = _text(body, "by", MAX_BY, required=True)
        assert ref is not None and by is not None
        with self._store.transaction():
            refused = self._store.acknowledge(incident_id, duty, Ack(self._clock(), by, ref))
        if refused is not None:
            raise ActionError(refused, status=404)
        incident = self._store.incident(incident_id)
        assert incident is not None  # acknowledge found it
        return {"incident": incident_json(incident, self._clock())}
