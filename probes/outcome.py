"""What one check produced, before the agent numbers, stamps and signs it.

A failure is a value, not an exception (blackbox_exporter's habit): every check
returns a ``CheckOutcome``; an exception escaping a check is a bug in ecpm.
The wire schema (``probes/result.py``) wraps this with id, seq, probe and signature.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Final, Literal

Outcome = Literal["pass", "fail", "inconclusive"]

# The wire vocabulary of check kinds: what a result's ``check`` may be, what the monitor
# labels its series with and what a command may ask for. Standard library only, so the
# result schema and the monitor read it without pjsua2. What each kind *is* (settings,
# runner, stages, reasons) is its entry in the registry, ``probes.check_kinds.REGISTRY``;
# tests/test_check_kinds.py keeps the registry and these names in step.
CHECK_KINDS: Final[tuple[str, ...]] = ("invite", "options", "register")
# The kinds that are test calls: their results decide reachability (the monitor judges a
# target by its calls once it has seen one); the others are pings, which only degrade it.
CALL_KINDS: Final[frozenset[str]] = frozenset({"invite"})

# Every stage a check may time or fail at, in call order (each kind uses a subset, its
# registry entry's ``stages``); the monitor creates its stage series from this.
STAGES: Final[tuple[str, ...]] = (
    "transport", "trying", "ringing", "answer", "identity", "media", "dtmf", "teardown",
)  # fmt: skip

# The identity stage's reasons: the caller's number or location lost or changed on the way
# (probes.nena.score_identity); the evidence report counts calls failed with each
IDENTITY_REASONS: Final[tuple[str, ...]] = (
    "cli_missing", "cli_mismatch", "location_missing", "location_mismatch",
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class MediaStats:
    rx_packets: int
    tx_packets: int
    loss: float  # fraction of expected packets lost, 0..1
    jitter_ms: float
    rtt_ms: float | None  # from RTCP when it gave one
    mos: float | None  # E-model (ITU-T G.107) estimate
    tone_heard: bool  # the responder's tone was detected in what we received
    echo_heard: bool | None  # our own tone came back; None when echo was not expected


@dataclass(frozen=True, slots=True)
class CheckOutcome:
    check: str  # one of CHECK_KINDS
    outcome: Outcome
    started_at: datetime  # UTC, aware
    finished_at: datetime
    stage: str | None = None  # failing (or inconclusive) stage; None on pass
    reason: str | None = None  # bounded code, e.g. "timeout", "no_rtp", "unsupported_service"
    sip_status: int | None = None
    sip_reason: str | None = None
    timings: Mapping[str, float] = field(default_factory=dict)  # seconds per stage
    media: MediaStats | None = None
    detail: Mapping[str, str] = field(default_factory=dict)  # e.g. NENA answer fields
