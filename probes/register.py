"""The ``register`` check: the probe registers its SIP account as a phone does.

Stages (each timing in seconds goes into ``timings``; the names are the invite's)::

    transport  start -> the first REGISTER on the wire   (no response at all: fail here)
    trying     REGISTER -> its 401/407 challenge (the REGISTER with credentials sent), or
               its final response when the registrar asked for none
    answer     the first REGISTER -> the final response (200 with the binding kept)

pjsua answers the challenge with the account's credentials and refreshes the registration
before it expires; ``detail["registration"]`` says whether this attempt was the account's
first, a refresh, or the first after a lost one (``re-registered``, with ``detail["lost"]``),
and ``detail["refreshes"]`` how many times since the account's previous attempt of ours
pjsua refreshed the binding by itself (5 s before it expired). A call from the account
(``checks.invite_check``) fails at once while it is not registered.

Expiry: ``detail["expires_asked"]`` is the account's ``expiry``; a pass records what the
registrar granted in ``detail["expires"]`` (a registrar may grant less). A 423 Interval Too
Brief with a larger Min-Expires is not a failure: pjsip sends the REGISTER again asking for
Min-Expires (without it, for 3601 s) and the check passes with what that one was granted.
``expires_rejected`` is a registrar that refuses even that (423 again), or a 2xx that kept
no binding.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Final

from probes.checks import Findings, reason_for_status, registrar_dial
from probes.config import RegisterCheck, Target
from probes.guard import GuardRefusal
from probes.outcome import CheckOutcome
from probes.sip import CallSetupError, EngineClosed, SipEngine, SipError

INTERVAL_TOO_BRIEF: Final = 423
# The register check's own reason (with the shared setup and status reasons)
REGISTER_REASONS: Final = ("expires_rejected",)


async def register_check(
    engine: SipEngine, target: Target, check: RegisterCheck | None = None
) -> CheckOutcome:
    """One registration of the target's account. Never raises for a failed path."""
    cfg = check or target.checks.register or RegisterCheck()
    result = Findings("register", datetime.now(UTC))
    try:
        reg = await asyncio.wait_for(
            engine.register(registrar_dial(target), timeout=cfg.timeout), cfg.time_limit + 1.0
        )
    except GuardRefusal as refusal:
        return result.refused(refusal)
    except TimeoutError:  # the REGISTER with credentials went unanswered
        result.fail("answer", "timeout")
        return result.done()
    except (EngineClosed, CallSetupError, SipError) as exc:
        return result.not_sent(exc)
    result.detail["registration"] = reg.renewal
    result.detail["refreshes"] = str(reg.refreshes)
    if target.account is not None:
        result.detail["expires_asked"] = str(int(target.account.expiry))
    if reg.lost is not None:
        result.detail["lost"] = reg.lost
    sent = reg.sent_at if reg.sent_at is not None else reg.started_at
    result.time("transport", sent - reg.started_at)
    if not reg.from_network:
        result.fail("transport", "no_response" if reg.status == 408 else "transport_error")
        result.detail["local"] = f"{reg.status} {reg.reason}"
        return result.done()
    result.time("trying", (reg.credentials_at or reg.finished_at) - sent)
    result.time("answer", reg.finished_at - sent)
    if reg.status == INTERVAL_TOO_BRIEF or (200 <= reg.status < 300 and not reg.registered):
        result.fail("answer", "expires_rejected", status=reg.status, sip_reason=reg.reason)
    elif reg.status >= 300:
        result.fail("answer", reason_for_status(reg.status), status=reg.status, sip_reason=reg.reason)
    else:
        result.sip_status, result.sip_reason = reg.status, reg.reason
        result.detail["expires"] = str(reg.expires)
    return result.done()
