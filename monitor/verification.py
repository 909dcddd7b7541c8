"""Post-change verification, the monitor's side of ``ecpm verify``.

``start`` asks every probe covering a target (online and announcing it), or the
probes named, for an immediate test call: one command per probe on
``<prefix>/commands/<probe>`` carrying a fresh ``request_id``. The verification is
stored (with the change reference) so the evidence report links changes to tests.
``status`` judges it from the stored results that carry the request id, once every
probe asked has answered or the deadline has passed: it passes when at least
``required`` probes passed. The verdict is stored once.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from monitor.core import MonitorCore
from monitor.model import ResultSummary
from monitor.store import Verification, VerificationBook
from monitor.views import result_json
from monitor.web import ActionError
from probes.result import format_time

Publish = Callable[[str, bytes], Awaitable[None]]  # (topic, payload) QoS 1
CHANGE_REF = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/#-]{0,127}$")
MAX_TIMEOUT = 600.0


class PostChangeVerifier:
    """Starts and judges post-change verifications (the ``verify`` and ``verify_status`` actions)."""

    def __init__(
        self,
        *,
        core: MonitorCore,
        store: VerificationBook,
        publish: Publish,
        topic_prefix: str,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._core = core
        self._store = store
        self._publish = publish
        self._prefix = topic_prefix
        self._clock = clock

    async def start(self, body: dict[str, Any]) -> dict[str, Any]:
        target = body.get("target")
        if not isinstance(target, str) or target not in self._core.trackers:
            raise ActionError(f"unknown target {target!r}", status=404)
        snapshot = self._core.snapshot()
        covering = sorted(p.id for p in snapshot.probes.values() if p.online and target in p.targets)
        wanted = body.get("probes") or covering
        if not isinstance(wanted, list) or not all(isinstance(p, str) for p in wanted):
            raise ActionError("probes must be a list of probe ids")
        unknown = sorted(set(wanted) - set(snapshot.probes))
        if unknown:
            raise ActionError(f"unknown probe(s): {', '.join(unknown)}", status=404)
        if not wanted:
            raise ActionError(f"no online probe covers {target}", status=409)
        required = body.get("required", len(wanted))
        if not isinstance(required, int) or isinstance(required, bool) or not 1 <= required <= len(wanted):
            raise ActionError(f"required must be between 1 and {len(wanted)}")
        change_ref = body.get("change_ref")
        if change_ref is not None and (not isinstance(change_ref, str) or not CHANGE_REF.match(change_ref)):
            raise ActionError("change_ref must be a short reference such as CHG-1234")
        timeout = body.get("timeout", 60.0)
        if (
            not isinstance(timeout, int | float)
            or isinstance(timeout, bool)
            or not 1 <= timeout <= MAX_TIMEOUT
        ):
            raise ActionError(f"timeout must be between 1 and {MAX_TIMEOUT:g} seconds")
        now = self._clock()
        request_id = f"verify-{uuid.uuid4().hex[:16]}"
        verification = Verification(
            request_id=request_id, target=target, probes=tuple(sorted(wanted)), required=required,
            change_ref=change_ref, requested_at=now, deadline=now + timedelta(seconds=float(timeout)),
            finished_at=None, outcome="pending", detail={},
        )  # fmt: skip
        command = json.dumps({"target": target, "check": "invite", "request_id": request_id}).encode()
        try:
            for probe in verification.probes:
                await self._publish(f"{self._prefix}/commands/{probe}", command)
        except Exception as exc:  # MQTT down: nothing was asked, nothing is stored
            raise ActionError(f"cannot reach the MQTT broker: {exc}", status=503) from None
        with self._store.transaction():
            self._store.add_verification(verification)
        return self._view(verification, {})

    async def status(self, body: dict[str, Any]) -> dict[str, Any]:
        request_id = body.get("request_id")
        verification = None if not isinstance(request_id, str) else self._store.verification(request_id)
        if verification is None:
            raise ActionError(f"no verification {request_id!r}", status=404)
        first: dict[str, ResultSummary] = {}
        for r in self._store.result_by_request(verification.request_id):
            if r.probe in verification.probes and r.target == verification.target and not r.confirm:
                first.setdefault(r.probe, r)
        answers = {p: result_json(r) for p, r in first.items()}
        now = self._clock()
        # judged once every probe asked has answered (the table shows them all), or at the deadline
        if verification.outcome == "pending" and (
            len(first) == len(verification.probes) or now >= verification.deadline
        ):
            passed = sum(1 for r in first.values() if r.outcome == "pass")
            outcome: Literal["pass", "fail"] = "pass" if passed >= verification.required else "fail"
            with self._store.transaction():
                self._store.finish_verification(
                    verification.request_id, outcome=outcome, at=now, detail=answers
                )
            verification = self._store.verification(verification.request_id) or verification
        return self._view(verification, answers)

    def _view(self, v: Verification, answers: dict[str, Any]) -> dict[str, Any]:
        return {
            "request_id": v.request_id,
            "target": v.target,
            "change_ref": v.change_ref,
            "probes": {p: answers.get(p) for p in v.probes},
            "required": v.required,
            "requested_at": format_time(v.requested_at),
            "deadline": format_time(v.deadline),
            "state": v.outcome,
            "finished_at": None if v.finished_at is None else format_time(v.finished_at),
        }
