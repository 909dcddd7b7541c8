"""The SIP engine's errors (see probes.sip for the tree)."""

from __future__ import annotations

from ecpm.errors import EcpmError


class SipError(EcpmError):
    """The SIP engine could not do what was asked."""


class EngineClosed(SipError):
    """The engine is not running (not started, or closed)."""


class CallSetupError(SipError):
    """pjsua2 refused to start a request: bad URI, transport not enabled, ...

    ``status``: the ``pj_status_t`` of pjsua2's error, when it gave one."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        self.status = status
        super().__init__(message)


class NoCallSlot(SipError):
    """No call slot became free within the wait limit (all in use or held)."""
