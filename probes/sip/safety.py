"""The live-number guard wherever a URI reaches pjsip, and the pjsua defaults that would
dial without it.

:meth:`Gate.hand_over` is the one function that gives a URI (request URI and outbound
proxy) to pjsua2, for INVITE and OPTIONS alike; it runs the guard first. A refusal is
logged and counted by the guard, counted here, raised as
:class:`~probes.guard.GuardRefusal`, and nothing is sent.

The far end chooses the rest: the Contact of its 18x/2xx (or of its INVITE, for an
incoming call, and of every re-INVITE, UPDATE or other target refresh) becomes the
Request-URI of every later request in the dialog. :mod:`probes.sip_targets` (a pjsip
module) hands each such Contact to :meth:`Gate.judge_inbound`, which runs
:meth:`~probes.guard.Guard.check_remote_target`; a refused one never reaches the dialog
(a response is dropped, a request answered 403 statelessly), and the call is queued in
:attr:`Gate.to_end` for the engine to end locally. The same module judges the
Request-URI of every request leaving the process (:meth:`Gate.judge_outbound`) and
refuses to send one that fails.
"""

from __future__ import annotations

import contextlib
import logging
from collections import deque
from collections.abc import Callable
from typing import Any, TypeVar

import pjsua2 as pj

from probes.guard import CarrierTestService, Guard, GuardRefusal
from probes.sip.errors import CallSetupError
from probes.sip.values import Dial, RemoteRefusal
from probes.sip_targets import Inbound, Outbound, is_sip_uri

logger = logging.getLogger(__name__)

A = TypeVar("A")
T = TypeVar("T")


class NoTransfers:
    """The hooks of a pjsua2 ``Call`` that would place a call on pjsua's own.

    By default pjsua accepts an in-dialog REFER and dials the Refer-To URI itself,
    answers an INVITE with Replaces, and may follow a 3xx — each a request the
    live-number guard never saw. These decline, first thing and deliberately not
    wrapped in ``native.callback``: an exception there would be swallowed and pjsua's
    accepting default would stand (fail open)."""

    def onCallTransferRequest(self, prm: Any) -> None:
        prm.statusCode = 603  # Decline: we never transfer
        with contextlib.suppress(Exception):
            logger.warning("declined a transfer (REFER) to %s: ecpm dials only guarded targets", prm.dstUri)

    def onCallReplaceRequest(self, prm: Any) -> None:
        prm.statusCode = 603
        with contextlib.suppress(Exception):
            logger.warning("declined an INVITE with Replaces: ecpm calls are never replaced")

    def onCallRedirected(self, prm: Any) -> int:
        with contextlib.suppress(Exception):
            logger.warning("not following a redirect to %s: ecpm dials only guarded targets", prm.targetUri)
        return int(pj.PJSIP_REDIRECT_STOP)


class Gate:
    """The guard's verdicts for one engine (pjsua2 thread only)."""

    def __init__(self, guard: Guard) -> None:
        self.guard = guard
        self.refused = 0  # refused here (the guard counts by reason)
        # the dial each Call-ID belongs to (for the guard's target name and carrier
        # opt-in), the dial being handed over right now, verdicts already reached, and
        # calls to end (Call-ID, verdict, whether only a provisional response came)
        self.contexts: dict[str, Dial] = {}
        self.sending: Dial | None = None
        self.passed: dict[tuple[str, str, CarrierTestService | None], None] = {}
        self.verdicts: dict[tuple[str, str], RemoteRefusal] = {}
        self.to_end: deque[tuple[str, RemoteRefusal, bool]] = deque()
        self.registers: Callable[[Outbound], None] | None = None  # told of every REGISTER sent

    def hand_over(self, dial: Dial, account_for: Callable[[Dial], A], send: Callable[[A], T]) -> T:
        """The one function that gives a URI to pjsua2. The guard judges the request URI
        and the outbound proxy first; a refusal is raised and nothing is sent."""
        try:
            for uri in (dial.uri, dial.proxy):
                if uri is not None:
                    self.guard.check(
                        uri,
                        target=dial.target,
                        declared_test_endpoint=dial.declared_test_endpoint,
                        carrier_test_service=dial.carrier_test_service,
                    )
        except GuardRefusal:
            self.refused += 1
            raise
        if dial.proxy is None and not dial.uri.lower().startswith(("sip:", "sips:")):
            raise CallSetupError(f"{dial.uri}: a non-SIP Request-URI (urn:, tel:) needs an outbound proxy")
        account = account_for(dial)
        self.sending = dial  # requests leaving now belong to this dial (judge_outbound)
        try:
            return send(account)
        finally:
            self.sending = None

    # remote targets (called by probes.sip_targets, inside pjsip) --------------------------

    def _context(self, call_id: str) -> tuple[str, CarrierTestService | None]:
        dial = self.contexts.get(call_id)
        if dial is None and self.sending is not None and call_id:
            dial = self.sending
            if len(self.contexts) >= 256:  # OPTIONS leave no trace to drop them by
                self.contexts.pop(next(iter(self.contexts)))
            self.contexts[call_id] = dial
        if dial is None:
            return "remote", None
        return dial.target, dial.carrier_test_service

    def _judge(
        self, uri: str, call_id: str, where: str, status: int | None, *, sip_only: bool = True
    ) -> RemoteRefusal | None:
        """The guard's verdict on one URI; with ``sip_only`` (a Contact, Record-Route or
        Route: what pjsip routes by) anything but a sip:/sips: URI is refused as well,
        even where the guard allows it — pjsip cannot send to it and asserts."""
        target, carrier = self._context(call_id)
        if (uri, target, carrier) in self.passed and (not sip_only or is_sip_uri(uri)):
            return None
        known = self.verdicts.get((call_id, uri))
        if known is not None:  # a retransmission: judged, logged and counted once
            return known
        try:
            self.guard.check_remote_target(uri, target=target, carrier_test_service=carrier)
            if sip_only and not is_sip_uri(uri):
                logger.warning("refused %s in the %s: not a sip: or sips: URI", uri[:200], where)
                raise GuardRefusal(uri, "unsupported_uri", f"the {where} is not a sip: or sips: URI")
        except GuardRefusal as refusal:
            self.refused += 1
            verdict = RemoteRefusal(refusal.uri, refusal.reason, refusal.detail, where, status)
            if len(self.verdicts) >= 1024:
                self.verdicts.clear()
            self.verdicts[(call_id, uri)] = verdict
            return verdict
        if len(self.passed) >= 1024:
            self.passed.clear()
        self.passed[(uri, target, carrier)] = None
        return None

    def judge_inbound(self, msg: Inbound) -> bool:
        """A Contact that would become a remote target, or a Record-Route entry that would
        join the route set: True refuses the message (the screen drops it, or answers a
        request 403) and the call is ended."""
        for where, uri in msg.targets():
            verdict = self._judge(uri, msg.call_id, where, msg.status)
            if verdict is not None:
                provisional = not msg.request and msg.method == "INVITE" and (msg.status or 0) < 200
                self._queue_end(msg.call_id, verdict, provisional=provisional)
                return True
        return False

    def judge_outbound(self, msg: Outbound) -> bool:
        """Every request about to be sent (its Request-URI and each Route URI): True
        refuses to send it."""
        if msg.method == "REGISTER" and self.registers is not None:
            self.registers(msg)  # its stages are timed by what leaves, retransmissions included
        verdict = None
        for where, uri in msg.targets():
            verdict = self._judge(uri, msg.call_id, where, None, sip_only=where != msg.where)
            if verdict is not None:
                break
        if verdict is None:
            return False
        logger.error(
            "not sending %s (Call-ID %s): its %s was refused by the guard",
            msg.method,
            msg.call_id,
            verdict.where.partition(" of ")[0],
            extra={"guard_reason": verdict.reason},
        )
        self._queue_end(msg.call_id, verdict, provisional=False)
        return True

    def _queue_end(self, call_id: str, verdict: RemoteRefusal, *, provisional: bool) -> None:
        if call_id and not any(c == call_id for c, _, _ in self.to_end):
            self.to_end.append((call_id, verdict, provisional))
