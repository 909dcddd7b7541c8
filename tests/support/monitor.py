"""Build monitor configs and signed results for tests (real schema, real signatures), and a
monitor core on them with a virtual clock and its pages recorded."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry

from monitor.config import MonitorConfig
from monitor.core import MonitorCore
from monitor.model import Incident, IncidentDuty
from monitor.store import is_url, open_store
from probes.outcome import CheckOutcome, MediaStats
from probes.result import Result
from probes.status import Status

T0 = datetime(2026, 11, 1, 12, 0, 0, tzinfo=UTC)


def key_for(probe: str) -> str:
    return f"key-of-{probe}"


def store_section(where: Path | str) -> dict[str, str]:
    """``store:`` for a test's directory (its ``monitor.db``), or for ``store_where``'s
    file or PostgreSQL URL (``tests/support/postgres.py``)."""
    if isinstance(where, Path):
        return {"path": str(where / "monitor.db")}
    return {"backend": "postgres", "url": where} if is_url(where) else {"path": where}


def monitor_config(
    tmp_path: Path | str,
    *,
    probes: Sequence[str] = ("p1",),
    targets: Sequence[str] = ("t1",),
    interval: str = "10s",
    notifiers: Sequence[dict[str, Any]] = (),
    **sections: Any,
) -> MonitorConfig:
    # tests see a resolve as soon as the path recovers unless they ask for a cooldown
    sections.setdefault("reachability", {})
    sections["reachability"].setdefault("resolve_after", "0s")
    data: dict[str, Any] = {
        "kind": "monitor",
        "store": store_section(tmp_path),
        "probes": [{"id": p, "key": key_for(p)} for p in probes],
        "targets": [{"id": t, "interval": interval} for t in targets],
        "notifiers": list(notifiers),
        **sections,
    }
    return MonitorConfig.model_validate(data)


class Clock:
    """A clock the test moves; the monitor under test reads it."""

    def __init__(self, start: datetime = T0) -> None:
        self.now = start

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> datetime:
        self.now += timedelta(seconds=seconds)
        return self.now


class ProbeSim:
    """Produces a probe's signed results in sequence, as the real agent would."""

    def __init__(self, probe: str = "p1", *, key: str | None = None) -> None:
        self.probe = probe
        self.key = key or key_for(probe)
        self.seq = 0

    def result(
        self,
        target: str,
        outcome: str,
        at: datetime,
        *,
        check: str = "invite",
        stage: str | None = None,
        sip_status: int | None = None,
        confirm: bool = False,
        pdd: float = 0.05,
        mos: float = 4.3,
        request_id: str | None = None,
    ) -> Result:
        self.seq += 1
        failed = outcome != "pass"
        out = CheckOutcome(
            check=check,
            outcome=outcome,  # type: ignore[arg-type]
            started_at=at - timedelta(seconds=2),
            finished_at=at,
            stage=stage or ("answer" if failed else None),
            reason="sip_error" if failed else None,
            sip_status=sip_status if sip_status is not None else (503 if failed else 200),
            sip_reason="Service Unavailable" if failed else "OK",
            timings={"transport": 0.001, "trying": 0.002, "ringing": pdd, "answer": 0.06},
            media=None
            if failed
            else MediaStats(
                rx_packets=100,
                tx_packets=100,
                loss=0.0,
                jitter_ms=0.3,
                rtt_ms=1.0,
                mos=mos,
                tone_heard=True,
                echo_heard=True,
            ),
        )
        return Result.from_outcome(
            out,
            probe=self.probe,
            seq=self.seq,
            target=target,
            key=self.key,
            confirm=confirm,
            request_id=request_id,
        )

    def topic(self, target: str, prefix: str = "ecpm/v1") -> str:
        return f"{prefix}/results/{self.probe}/{target}"


class StatusSim:
    """A probe's signed statuses as its publisher makes them (``probes.mqtt``): a session
    starts at the first ``online`` after an ``offline`` (or ever), its Last Will is stamped
    at that session's connect, later announcements of the session are stamped when made."""

    def __init__(self, probe: str = "p1", *, key: str | None = None, version: str = "0.1.0") -> None:
        self.probe = probe
        self.key = key or key_for(probe)
        self.version = version
        self.started_at: datetime | None = None
        self.connected_at: datetime | None = None  # of the open session, if any

    def online(self, at: datetime, targets: Sequence[str] = ("t1",)) -> bytes:
        if self.connected_at is None:
            self.connected_at = at
        return self._make(True, None, at, targets)

    def offline(self, at: datetime, *, will: bool = True, targets: Sequence[str] = ("t1",)) -> bytes:
        """The Last Will (stamped at the session's connect), or a clean stop's ``shutdown``."""
        if self.connected_at is None:
            self.connected_at = at
        connected = self.connected_at
        payload = self._make(
            False, "connection_lost" if will else "shutdown", connected if will else at, targets
        )
        self.connected_at = None
        return payload

    def _make(self, online: bool, reason: str | None, at: datetime, targets: Sequence[str]) -> bytes:
        assert self.connected_at is not None
        self.started_at = self.started_at or self.connected_at
        return Status.make(
            probe=self.probe,
            online=online,
            reason=reason,
            version=self.version,
            started_at=min(self.started_at, self.connected_at),
            connected_at=self.connected_at,
            at=at,
            targets=targets,
            key=self.key,
        ).to_json()

    def topic(self, prefix: str = "ecpm/v1") -> str:
        return f"{prefix}/status/{self.probe}"


class Pages(list[tuple[int, str, str]]):
    """The pager of a core under test: (incident id, kind, event) of every page, a duty's
    escalation as ``escalate:<duty>``."""

    def __call__(self, incident: Incident, event: str) -> None:
        self.append((incident.id, incident.kind, event))

    def escalate(self, incident: Incident, duty: IncidentDuty) -> None:
        self.append((incident.id, incident.kind, f"escalate:{duty.name}"))


def make_core(where: Path | str, clock: Clock, **kw: object) -> tuple[MonitorCore, CollectorRegistry, Pages]:
    """A core on the store ``where`` names: a test directory, or ``store_where``'s value."""
    config = monitor_config(where, **kw)  # type: ignore[arg-type]
    registry = CollectorRegistry()
    pages = Pages()
    core = MonitorCore(
        config, open_store(config.store.where), registry, pager=pages, escalator=pages.escalate, clock=clock
    )
    return core, registry, pages


def state(core: MonitorCore, clock: Clock, target: str = "t1") -> str:
    return core.evaluate(clock()).targets[target].state
