"""pjsua2 and pjsip glue that holds no engine state: the C functions pjsua2 does not
wrap (through ctypes), the callback wrapper, pjsip's log, and request headers and parts.
Everything here runs in the pjsua2 thread."""

from __future__ import annotations

import ctypes
import functools
import ipaddress
import logging
from collections.abc import Callable
from typing import Any, Final, TypeVar, cast

import pjsua2 as pj
from pjsua2 import pjsua2 as _swig  # the SWIG module; its _pjsua2 is the C extension

from probes.sip.values import Part

logger = logging.getLogger(__name__)
pjsip_logger = logging.getLogger("probes.sip.pjsip")

REQUEST_TAG: Final = "X-ECPM-Request"  # matches an OPTIONS completion to its request
_T1, _T2, _T4 = 500, 4000, 5000  # RFC 3261 timers in ms, left at their defaults

_clib_cache: list[ctypes.CDLL] = []


def clib() -> ctypes.CDLL:
    """The extension module itself, for the few C functions pjsua2 does not wrap."""
    if not _clib_cache:
        _clib_cache.append(ctypes.CDLL(_swig._pjsua2.__file__))
    return _clib_cache[0]


def set_tsx_timeout(seconds: float) -> None:
    """pjsip's TD: timer B (no response to INVITE), F (non-INVITE), D and H."""
    td = max(100, round(seconds * 1000))
    clib().pjsip_tsx_set_timers(_T1, _T2, _T4, td)


def disable_tcp_switch(td_seconds: float) -> None:
    """Keep a request on the transport the target asked for (RFC 3261 18.1.1 would move
    a >1300-byte UDP request, e.g. an INVITE with a PIDF-LO, to TCP)."""
    cfg = (ctypes.c_uint * 18).in_dll(clib(), "pjsip_sip_cfg_var")
    # layout of pjsip_cfg_t in 2.15: 13 endpt flags, then tsx {max_count, t1, t2, t4, td};
    # check it against the timers we have just set before writing anything
    expected = [_T1, _T2, _T4, max(100, round(td_seconds * 1000))]
    if list(cfg[14:18]) != expected or cfg[4] not in (0, 1):
        logger.warning("pjsip_cfg_t layout not as expected; TCP switch left on")
        return
    cfg[4] = 1  # endpt.disable_tcp_switch


def pj_error(exc: Exception) -> str:
    reason = getattr(exc, "reason", None) or str(exc)
    status = getattr(exc, "status", None)
    return f"{reason} (pj status {status})" if status else str(reason)


def host_literal(address: str) -> str:
    return f"[{address}]" if ipaddress.ip_address(address).version == 6 else address


def uri_host(uri: str) -> str | None:
    scheme, sep, rest = uri.partition(":")
    if not sep or scheme.lower() not in ("sip", "sips"):
        return None
    rest = rest.split(";", 1)[0].split("?", 1)[0]
    host = rest.rpartition("@")[2]
    if host.startswith("["):
        return host[: host.find("]") + 1] if "]" in host else None
    return host.split(":", 1)[0] or None


def request_tag(text: str) -> int | None:
    marker = REQUEST_TAG.lower() + ":"
    for line in text.split("\r\n"):
        if line.lower().startswith(marker):
            value = line.split(":", 1)[1].strip()
            return int(value) if value.isdigit() else None
    return None


def add_headers(tx: Any, headers: tuple[tuple[str, str], ...]) -> None:
    for name, value in headers:
        h = pj.SipHeader()
        h.hName = name
        h.hValue = value
        tx.headers.append(h)


def add_parts(tx: Any, parts: tuple[Part, ...]) -> None:
    if not parts:
        return
    tx.multipartContentType.type = "multipart"
    tx.multipartContentType.subType = "mixed"
    for part in parts:
        p = pj.SipMultipartPart()
        main, _, sub = part.content_type.partition("/")
        p.contentType.type = main
        p.contentType.subType = sub
        p.body = part.body
        add_headers(p, part.headers)
        tx.multipartParts.append(p)


F = TypeVar("F", bound=Callable[..., None])


def callback(fn: F) -> F:
    """A pjsua2 callback: an exception must never unwind into C; log it as the bug it is."""

    @functools.wraps(fn)
    def wrapper(*args: Any) -> None:
        try:
            fn(*args)
        except Exception:
            logger.exception("error in pjsua2 callback %s (a bug in ecpm)", fn.__name__)

    return cast(F, wrapper)


class LogWriter(pj.LogWriter):  # type: ignore[misc]
    """pjsip's log into Python logging (pjsip 1 -> WARNING, 2 -> INFO, 3+ -> DEBUG)."""

    def write(self, entry: Any) -> None:
        level = logging.WARNING if entry.level <= 1 else logging.INFO if entry.level == 2 else logging.DEBUG
        if pjsip_logger.isEnabledFor(level):
            pjsip_logger.log(level, "%s", str(entry.msg).rstrip())
