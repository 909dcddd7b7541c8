"""Handing values and errors from the pjsua2 thread to asyncio.

An error crosses as a fresh copy, never the exception pjsua2's thread caught: the
original's traceback holds frames with pjsua2 objects, and a ``Call`` or ``Account``
kept alive that way past ``libDestroy`` aborts the process at exit."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

import pjsua2 as pj

from probes.guard import GuardRefusal
from probes.sip.errors import CallSetupError, SipError
from probes.sip.native import pj_error

logger = logging.getLogger(__name__)


def post(loop: asyncio.AbstractEventLoop, fn: Callable[..., object], *args: object) -> None:
    with contextlib.suppress(RuntimeError):  # a closed loop: nobody is waiting any more
        loop.call_soon_threadsafe(fn, *args)


def resolve(fut: asyncio.Future[Any], value: object) -> None:
    if not fut.done():
        fut.set_result(value)


def reject(fut: asyncio.Future[Any], exc: BaseException) -> None:
    if not fut.done():
        fut.set_exception(exc)


def detached(exc: Exception, *, pj_as: type[SipError] = SipError) -> Exception:
    """The error to give asyncio for ``exc``: the guard's refusal and the engine's own
    errors as themselves (``CallSetupError.status`` kept), a pjsua2 error as ``pj_as``,
    anything else as the bug it is (logged here: call this inside the ``except``)."""
    if isinstance(exc, GuardRefusal):
        return GuardRefusal(exc.uri, exc.reason, exc.detail)
    if isinstance(exc, CallSetupError):
        return type(exc)(str(exc), status=exc.status)
    if isinstance(exc, SipError):
        return type(exc)(str(exc))
    if isinstance(exc, pj.Error):
        if issubclass(pj_as, CallSetupError):
            return pj_as(pj_error(exc), status=getattr(exc, "status", None))
        return pj_as(pj_error(exc))
    logger.exception("error in the pjsua2 thread (a bug in ecpm)")
    return SipError(f"internal error: {exc!r}")


def fail(
    loop: asyncio.AbstractEventLoop,
    fut: asyncio.Future[Any],
    exc: Exception,
    *,
    pj_as: type[SipError] = SipError,
) -> None:
    """Fail ``fut`` (from the pjsua2 thread) with :func:`detached` ``exc``."""
    post(loop, reject, fut, detached(exc, pj_as=pj_as))
