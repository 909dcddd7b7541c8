"""What one check produced, before the agent numbers, stamps and signs it.

A failure is a value, not an exception (blackbox_exporter's habit): every check
returns a ``CheckOutcome``; an exception escaping a check is a bug in ecpm.
The wire schema (``probes/result.py``) wraps this with id, seq, probe and signature.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal

Outcome = Literal["pass", "fail", "inconclusive"]

# Stages of the invite check, in order; options uses "transport", "trying"/"answer".
STAGES = ("transport", "trying", "ringing", "answer", "media", "teardown")


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
    check: str  # "invite", "options"
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
