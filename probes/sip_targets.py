"""Remote targets: every URI a far end names for us to send to is judged before pjsip uses it.

pjsip takes the dialog's *remote target* from the far end: the Contact of a 18x or 2xx
to our INVITE, of an incoming INVITE (the caller), and of every target refresh (a
re-INVITE, UPDATE, SUBSCRIBE, REFER or NOTIFY). Every later request of the dialog —
ACK, BYE, PRACK, re-INVITE — goes to it. A far end answering with
``Contact: <sip:999@...>`` would make the probe send its ACK and BYE to a live
emergency number; ``Contact: <tel:999>`` made pjsip abort the whole process (its ACK
cannot be routed, and ``inv_send_ack`` asserts). The Record-Route of the same messages
is the dialog's *route set*: with ``;lr`` its first entry is where those requests are
sent, whatever the Contact, so it is judged exactly the same way.

:class:`Screen` is a pjsip module registered through ``ctypes`` at priority 15: it sees
every message *received* before the transaction layer (16) and the dialogs (32) do,
and every request *sent* just before the transport prints it (8).

On receipt
    The Contact and Record-Route headers of a request or 101-299 response of the
    methods above are printed by pjsip itself (the same parsed headers the dialog would
    use) and each URI of each entry is handed to the owner's judge, which also refuses
    any that is not ``sip:``/``sips:`` (pjsip cannot route to it). A refused
    **response** is dropped: no transaction, dialog or session ever sees it, so the
    remote target and route set never change and pjsip never sends the ACK. A refused
    **request** is answered statelessly with 403 (to the address in its Via, as every
    response is) and dropped. The owner then ends the call locally.

On sending
    Every request leaving the process (INVITE, ACK, BYE, CANCEL, OPTIONS, re-INVITE,
    UPDATE, PRACK, ...), each retransmission and each destination address included,
    is printed by pjsip and its Request-URI and every Route URI judged. A refusal
    makes the transport report an error (``PJSIP_EINVALIDREQURI``) instead of sending:
    the belt and braces behind the receive side (it also catches a strict-routing
    Record-Route rewriting the Request-URI).

Any error in here fails closed: the message is dropped or the request not sent.

Struct layouts (pjproject 2.15.1, x86-64, the wheel's build): the module struct is
ours; of pjsip's own structures only two pointers are read — ``rdata->msg_info.msg``
and ``tdata->msg`` — and both offsets are checked at start on objects pjsip itself
makes (a message parsed into a zeroed ``pjsip_rx_data``; a request created and never
sent), and again on every message against the ``info`` string pjsip keeps next to
them. Everything else goes through exported functions (``pjsip_msg_find_hdr``,
``pjsip_hdr_print_on``, ``pjsip_msg_print``, ``pjsip_rx_data_get_info``,
``pjsip_tx_data_get_info``, ``pjsip_endpt_respond_stateless``). A layout that does not
check out refuses to start the engine.
"""

from __future__ import annotations

import ctypes
import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from ecpm.errors import EcpmError

logger = logging.getLogger(__name__)

# Methods whose Contact pjsip (or RFC 3261/3311/3515/6665) uses as the remote target.
REQUEST_METHODS: Final = frozenset({"INVITE", "UPDATE", "SUBSCRIBE", "REFER", "NOTIFY"})
RESPONSE_METHODS: Final = frozenset({"INVITE", "UPDATE", "SUBSCRIBE", "REFER"})
REJECT_STATUS: Final = 403  # the stateless answer to a request whose Contact is refused
PRIORITY: Final = 15  # PJSIP_MOD_PRIORITY_TSX_LAYER - 1
REFUSED_STATUS: Final = 171042  # PJSIP_EINVALIDREQURI: what the transport reports for a refused send

# pjproject 2.15.1 (x86-64): checked at start by Layout.check
RDATA_MSG: Final = 4440  # offsetof(pjsip_rx_data, msg_info.msg); msg_info.info follows
TDATA_INFO: Final = 56  # offsetof(pjsip_tx_data, info)
TDATA_MSG: Final = 392  # offsetof(pjsip_tx_data, msg)
HDR_NEXT: Final = 8  # offsetof(pjsip_hdr, next)
H_CALL_ID, H_CONTACT, H_RECORD_ROUTE, H_TO = 7, 9, 29, 38  # pjsip_hdr_e
_PRINT_MAX: Final = 65536

_RX_INFO_RE: Final = re.compile(r"(Request|Response) msg (?:(\d{3})/)?([^/\s]+)/cseq=")
_TAG_RE: Final = re.compile(r";\s*tag\s*=", re.IGNORECASE)
_SIP_RE: Final = re.compile(r"sips?:", re.IGNORECASE)


class LayoutError(EcpmError):
    """pjsip's structures are not laid out as this module expects (another build)."""


# ------------------------------------------------------------------- Contact values


def split_contacts(value: str) -> list[str]:
    """One Contact header value split at its top-level commas (not inside quotes or <>)."""
    parts: list[str] = []
    start = 0
    quoted = angle = False
    i = 0
    while i < len(value):
        ch = value[i]
        if quoted:
            if ch == "\\":
                i += 1
            elif ch == '"':
                quoted = False
        elif ch == '"':
            quoted = True
        elif ch == "<":
            angle = True
        elif ch == ">":
            angle = False
        elif ch == "," and not angle:
            parts.append(value[start:i])
            start = i + 1
        i += 1
    parts.append(value[start:])
    return [p.strip() for p in parts if p.strip()]


def contact_uri(value: str) -> str | None:
    """The bare URI of one contact-param: ``"Name" <sip:u@h>;expires=60`` and
    ``<sip:u@h>;q=1`` give ``sip:u@h``; an addr-spec ``sip:u@h;expires=60`` gives
    ``sip:u@h`` (RFC 3261 20.10: without angle brackets, parameters after the URI are
    header parameters). ``*`` and an empty value give None."""
    text = value.strip()
    if not text or text == "*":
        return None
    i = 0
    quoted = False
    while i < len(text):  # find the '<' of a name-addr, skipping a quoted display name
        ch = text[i]
        if quoted:
            if ch == "\\":
                i += 1
            elif ch == '"':
                quoted = False
        elif ch == '"':
            quoted = True
        elif ch == "<":
            end = text.find(">", i + 1)
            inner = text[i + 1 : end] if end >= 0 else text[i + 1 :]
            return inner.strip()
        i += 1
    if quoted:  # an unterminated display name: judge the whole text
        return text
    return text.split(";", 1)[0].strip()


def header_value(printed: str) -> str:
    """``"Contact: <sip:x>"`` -> ``"<sip:x>"`` (pjsip prints ``Name: value``)."""
    return printed.partition(":")[2].strip()


def header_uris(printed: list[str]) -> tuple[str, ...]:
    """Every bare URI of every entry of these printed Contact, Route or Record-Route
    headers (``Record-Route: <sip:a;lr>, <sip:b;lr>`` gives both)."""
    return tuple(uri for p in printed for c in split_contacts(header_value(p)) if (uri := contact_uri(c)))


def is_sip_uri(uri: str) -> bool:
    """Whether pjsip can route to this URI at all: only ``sip:`` and ``sips:``. A dialog
    whose remote target or route set holds anything else (``tel:``, ``urn:``) makes pjsip
    fail to send its ACK, and ``inv_send_ack`` asserts (the process aborts)."""
    return _SIP_RE.match(uri.strip()) is not None


# -------------------------------------------------------------------- what is judged


@dataclass(frozen=True, slots=True)
class Inbound:
    """A received message that would set a dialog's remote target."""

    request: bool
    method: str  # the request's method, or the CSeq method of a response
    status: int | None  # a response's status
    call_id: str
    in_dialog: bool  # a request with a To tag (a target refresh)
    contacts: tuple[str, ...]  # every Contact URI, bare
    record_routes: tuple[str, ...] = ()  # every URI of every Record-Route entry, bare

    @property
    def where(self) -> str:
        return self.where_in("Contact")

    def where_in(self, header: str) -> str:
        """``Contact of 200 to INVITE``, ``Record-Route of re-INVITE``, ..."""
        if self.request:
            return f"{header} of {'re-' if self.in_dialog and self.method == 'INVITE' else ''}{self.method}"
        return f"{header} of {self.status} to {self.method}"

    def targets(self) -> tuple[tuple[str, str], ...]:
        """``(where, uri)`` of every URI pjsip would send to: each Contact (the remote
        target) and each Record-Route entry (the route set; the first is where every
        later request of the dialog goes, whatever the Contact)."""
        return tuple((self.where_in("Contact"), uri) for uri in self.contacts) + tuple(
            (self.where_in("Record-Route"), uri) for uri in self.record_routes
        )


@dataclass(frozen=True, slots=True)
class Outbound:
    """A request about to leave the process."""

    method: str
    uri: str  # its Request-URI as it goes on the wire
    call_id: str
    routes: tuple[str, ...] = ()  # every URI of every Route header (a loose route is sent to)
    cseq: int = 0  # its CSeq number: a retransmission keeps it, a new request (after a 401) does not

    @property
    def where(self) -> str:
        return f"Request-URI of {self.method}"

    def targets(self) -> tuple[tuple[str, str], ...]:
        """``(where, uri)``: the Request-URI, then each Route URI (``Route of ACK``)."""
        return ((self.where, self.uri), *((f"Route of {self.method}", uri) for uri in self.routes))


# ---------------------------------------------------------------- the pjsip module

_RX = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p)
_TX = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p)


class _PjStr(ctypes.Structure):
    _fields_ = [("ptr", ctypes.c_char_p), ("slen", ctypes.c_ssize_t)]


class _Module(ctypes.Structure):
    """struct pjsip_module (pjsip/sip_module.h), 112 bytes on x86-64."""

    _fields_ = [
        ("prev", ctypes.c_void_p),
        ("next", ctypes.c_void_p),
        ("name", _PjStr),
        ("id", ctypes.c_int),
        ("priority", ctypes.c_int),
        ("load", ctypes.c_void_p),
        ("start", ctypes.c_void_p),
        ("stop", ctypes.c_void_p),
        ("unload", ctypes.c_void_p),
        ("on_rx_request", _RX),
        ("on_rx_response", _RX),
        ("on_tx_request", _TX),
        ("on_tx_response", ctypes.c_void_p),
        ("on_tsx_state", ctypes.c_void_p),
    ]


def _ptr(address: int) -> int:
    return ctypes.c_void_p.from_address(address).value or 0


_libc = ctypes.CDLL(None, use_errno=True)
_libc.write.restype = ctypes.c_ssize_t
_libc.write.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t]


def _readable(address: int, size: int) -> bool:
    """Whether ``size`` bytes at ``address`` can be read, without touching them from here:
    the kernel copies them into a pipe, or fails with EFAULT instead of a SIGSEGV. Used
    only by the layout check, before anything read at a guessed offset is dereferenced."""
    if address <= 0 or size <= 0 or size > 4096:
        return False
    r, w = os.pipe()
    try:
        return int(_libc.write(w, address, size)) == size
    finally:
        os.close(r)
        os.close(w)


def _setup(clib: ctypes.CDLL) -> None:
    vp = ctypes.c_void_p
    clib.pjsua_get_pjsip_endpt.restype = vp
    clib.pjsip_msg_find_hdr.restype = vp
    clib.pjsip_msg_find_hdr.argtypes = [vp, ctypes.c_int, vp]
    clib.pjsip_hdr_print_on.restype = ctypes.c_int
    clib.pjsip_hdr_print_on.argtypes = [vp, ctypes.c_char_p, ctypes.c_size_t]
    clib.pjsip_msg_print.restype = ctypes.c_ssize_t
    clib.pjsip_msg_print.argtypes = [vp, ctypes.c_char_p, ctypes.c_size_t]
    clib.pjsip_rx_data_get_info.restype = vp
    clib.pjsip_rx_data_get_info.argtypes = [vp]
    clib.pjsip_tx_data_get_info.restype = vp
    clib.pjsip_tx_data_get_info.argtypes = [vp]
    clib.pjsip_endpt_respond_stateless.restype = ctypes.c_int
    clib.pjsip_endpt_respond_stateless.argtypes = [vp, vp, ctypes.c_int, vp, vp, vp]
    clib.pjsip_endpt_register_module.restype = ctypes.c_int
    clib.pjsip_endpt_register_module.argtypes = [vp, vp]
    clib.pjsip_endpt_create_pool.restype = vp
    clib.pjsip_endpt_create_pool.argtypes = [vp, ctypes.c_char_p, ctypes.c_size_t, ctypes.c_size_t]
    clib.pjsip_endpt_release_pool.restype = None
    clib.pjsip_endpt_release_pool.argtypes = [vp, vp]
    clib.pjsip_parse_rdata.restype = vp
    clib.pjsip_parse_rdata.argtypes = [ctypes.c_char_p, ctypes.c_size_t, vp]
    clib.pjsip_get_options_method.restype = vp
    clib.pjsip_endpt_create_request.restype = ctypes.c_int
    clib.pjsip_endpt_create_request.argtypes = [vp, vp, vp, vp, vp, vp, vp, ctypes.c_int, vp, vp]
    clib.pjsip_tx_data_dec_ref.restype = ctypes.c_int
    clib.pjsip_tx_data_dec_ref.argtypes = [vp]
    # ending a call locally (probes.sip): pjsua's own acquire_call (exported, in
    # pjsua_internal.h), the dialog's invite session, and pjsip_inv_terminate
    clib.acquire_call.restype = ctypes.c_int
    clib.acquire_call.argtypes = [ctypes.c_char_p, ctypes.c_int, vp, vp]
    clib.pjsip_dlg_get_inv_session.restype = vp
    clib.pjsip_dlg_get_inv_session.argtypes = [vp]
    clib.pjsip_inv_terminate.restype = ctypes.c_int
    clib.pjsip_inv_terminate.argtypes = [vp, ctypes.c_int, ctypes.c_int]
    clib.pjsip_dlg_dec_lock.restype = None
    clib.pjsip_dlg_dec_lock.argtypes = [vp]


def _plausible_request(msg: int, method: bytes, method_id: int) -> bool:
    """Whether ``msg`` looks like pjsip's ``pjsip_msg`` of this request, read field by
    field (type, method id and name, Request-URI pointer, the header list's back link),
    never dereferencing a pointer that :func:`_readable` has not vouched for."""
    if not _readable(msg, 56):
        return False
    if ctypes.c_int.from_address(msg).value != 0 or ctypes.c_int.from_address(msg + 8).value != method_id:
        return False  # type PJSIP_REQUEST_MSG, line.req.method.id
    name, length = _ptr(msg + 16), ctypes.c_ssize_t.from_address(msg + 24).value
    if length != len(method) or not _readable(name, length) or ctypes.string_at(name, length) != method:
        return False
    first = _ptr(msg + 48)  # hdr.next; its prev must point back at &msg->hdr
    return _readable(_ptr(msg + 32), 8) and _readable(first, 8) and _ptr(first) == msg + 40


class _Printer:
    """pjsip's own printing of its parsed objects, into one reusable buffer."""

    def __init__(self, clib: ctypes.CDLL) -> None:
        self.clib = clib
        self.buf = ctypes.create_string_buffer(_PRINT_MAX)

    def header(self, hdr: int) -> str:
        n = self.clib.pjsip_hdr_print_on(hdr, self.buf, _PRINT_MAX)
        if n < 0:
            raise LayoutError("pjsip could not print a header")
        return self.buf.raw[:n].decode("utf-8", "replace")

    def headers(self, msg: int, kind: int) -> list[str]:
        out: list[str] = []
        hdr = self.clib.pjsip_msg_find_hdr(msg, kind, None)
        while hdr and len(out) < 64:
            out.append(self.header(hdr))
            hdr = self.clib.pjsip_msg_find_hdr(msg, kind, _ptr(hdr + HDR_NEXT) or None)
        return out

    def message(self, msg: int) -> str:
        n = self.clib.pjsip_msg_print(msg, self.buf, _PRINT_MAX)
        if n < 0:
            raise LayoutError("pjsip could not print a message")
        return self.buf.raw[:n].decode("utf-8", "replace")


def _request_line(text: str) -> tuple[str, str]:
    line = text.split("\r\n", 1)[0]
    parts = line.split(" ")
    if len(parts) != 3 or not parts[2].startswith("SIP/"):
        raise LayoutError(f"not a request line: {line[:200]!r}")
    return parts[0], parts[1]


def _routes(text: str) -> tuple[str, ...]:
    """Every URI of every ``Route`` header of a printed request, as it goes on the wire
    (the text, not pjsip's typed headers: a Route added as a generic header counts too)."""
    values = []
    for line in text.split("\r\n")[1:]:
        if not line:
            break
        name, sep, value = line.partition(":")
        if sep and name.strip().lower() == "route":
            values.append(f"Route: {value.strip()}")
    return header_uris(values)


def _header(text: str, *names: str) -> str:
    """The first header of a printed message named one of ``names`` (lower case), or ""."""
    for line in text.split("\r\n")[1:]:
        if not line:
            break
        name, _, value = line.partition(":")
        if name.strip().lower() in names:
            return value.strip()
    return ""


def _call_id(text: str) -> str:
    return _header(text, "call-id", "i")


def _cseq(text: str) -> int:
    number = _header(text, "cseq").partition(" ")[0]
    return int(number) if number.isdigit() else 0


class Screen:
    """The module. ``inbound`` and ``outbound`` return True to refuse a message; they run
    in the pjsua2 thread, inside pjsip, and must not call back into pjsua2."""

    def __init__(
        self,
        clib: ctypes.CDLL,
        *,
        inbound: Callable[[Inbound], bool],
        outbound: Callable[[Outbound], bool],
    ) -> None:
        _setup(clib)
        self.clib = clib
        self.inbound = inbound
        self.outbound = outbound
        self.endpt = int(clib.pjsua_get_pjsip_endpt() or 0)
        if not self.endpt:
            raise LayoutError("no pjsip endpoint (pjsua is not initialised)")
        self.printer = _Printer(clib)
        self.refused_inbound = 0
        self.refused_outbound = 0
        self.errors = 0

    # -- start

    def check_layout(self) -> None:
        """Check the two offsets on objects pjsip makes itself; LayoutError if they differ."""
        self._check_rdata()
        self._check_tdata()

    def _check_rdata(self) -> None:
        clib = self.clib
        pool = clib.pjsip_endpt_create_pool(self.endpt, b"ecpm-layout", 4000, 4000)
        if not pool:
            raise LayoutError("no pool")
        try:
            rdata = ctypes.create_string_buffer(65536)  # far larger than pjsip_rx_data
            address = ctypes.addressof(rdata)
            ctypes.c_void_p.from_address(address).value = pool  # tp_info.pool: the first member
            text = (
                b"SIP/2.0 200 OK\r\nVia: SIP/2.0/UDP 127.0.0.1:5060;branch=z9hG4bKecpm\r\n"
                b"From: <sip:a@127.0.0.1>;tag=1\r\nTo: <sip:b@127.0.0.1>;tag=2\r\n"
                b"Call-ID: ecpm-layout@127.0.0.1\r\nCSeq: 7 INVITE\r\n"
                b'Contact: "x, y" <sip:ecpm-layout@127.0.0.1:5>;expires=1, <tel:+441>\r\n'
                b"Record-Route: <sip:rr1@127.0.0.1:6;lr>, <sip:rr2@127.0.0.1:7;lr>\r\n"
                b"Content-Length: 0\r\n\r\n"
            )
            packet = ctypes.create_string_buffer(text)  # NUL-terminated, as pjsip's scanner wants
            msg = clib.pjsip_parse_rdata(packet, len(text), address)
            if not msg or _ptr(address + RDATA_MSG) != msg:
                raise LayoutError("pjsip_rx_data.msg_info.msg is not where pjsip 2.15.1 has it")
            info = clib.pjsip_rx_data_get_info(address)
            if not info or _ptr(address + RDATA_MSG + 8) != info:
                raise LayoutError("pjsip_rx_data.msg_info.info is not where pjsip 2.15.1 has it")
            described = ctypes.string_at(info).decode(errors="replace")
            contacts = self.printer.headers(msg, H_CONTACT)
            call_id = self.printer.headers(msg, H_CALL_ID)
            record_routes = self.printer.headers(msg, H_RECORD_ROUTE)
            expect = ['Contact: "x, y" <sip:ecpm-layout@127.0.0.1:5>;expires=1', "Contact: <tel:+441>"]
            if not described.startswith("Response msg 200/INVITE/cseq=7") or contacts != expect:
                raise LayoutError(f"parsed message reads back wrong: {described!r} {contacts[:3]!r}")
            if call_id != ["Call-ID: ecpm-layout@127.0.0.1"]:
                raise LayoutError(f"Call-ID reads back wrong: {call_id!r}")
            if header_uris(record_routes) != ("sip:rr1@127.0.0.1:6;lr", "sip:rr2@127.0.0.1:7;lr"):
                raise LayoutError(f"Record-Route reads back wrong: {record_routes[:3]!r}")
        finally:
            clib.pjsip_endpt_release_pool(self.endpt, pool)

    def _check_tdata(self) -> None:
        clib = self.clib
        strs = [
            b"sip:ecpm-layout@127.0.0.1",  # target
            b"<sip:ecpm@127.0.0.1>",  # from
            b"<sip:ecpm-layout@127.0.0.1>",  # to
            b"<sip:ecpm@127.0.0.1>",  # contact
            b"ecpm-layout-tx@127.0.0.1",  # call id
        ]
        held = [_PjStr(s, len(s)) for s in strs]
        tdata = ctypes.c_void_p()
        status = clib.pjsip_endpt_create_request(
            self.endpt,
            clib.pjsip_get_options_method(),
            *[ctypes.addressof(s) for s in held],
            1,
            None,
            ctypes.addressof(tdata),
        )
        if status != 0 or not tdata.value:
            raise LayoutError(f"cannot create a request to check the layout (pj status {status})")
        t = int(tdata.value)
        try:
            name = ctypes.string_at(t + 24, 32).split(b"\0", 1)[0].decode(errors="replace")
            if name != f"tdta{t:#x}":  # obj_name, "tdta%p"
                raise LayoutError(f"pjsip_tx_data.obj_name reads {name!r}")
            info = clib.pjsip_tx_data_get_info(t)
            if not info or _ptr(t + TDATA_INFO) != info:
                raise LayoutError("pjsip_tx_data.info is not where pjsip 2.15.1 has it")
            msg = _ptr(t + TDATA_MSG)
            if not _plausible_request(msg, b"OPTIONS", 5):
                raise LayoutError("pjsip_tx_data.msg is not where pjsip 2.15.1 has it")
            method, uri = _request_line(self.printer.message(msg))
            if (method, uri) != ("OPTIONS", "sip:ecpm-layout@127.0.0.1"):
                raise LayoutError(f"request reads back as {method} {uri}")
        finally:
            clib.pjsip_tx_data_dec_ref(t)

    def register(self) -> None:
        if _MODULE.id != -1:
            raise LayoutError("the ecpm pjsip module is already registered")
        status = self.clib.pjsip_endpt_register_module(self.endpt, ctypes.addressof(_MODULE))
        if status != 0 or _MODULE.id < 0:
            raise LayoutError(f"cannot register the ecpm pjsip module (pj status {status})")
        _OWNER[0] = self

    def release(self) -> None:
        """After libDestroy (which unregisters every module)."""
        if _OWNER[0] is self:
            _OWNER[0] = None

    # -- receive

    def rx(self, rdata: int, request: bool) -> int:
        relevant = True  # until we know better: an error drops the message
        try:
            info_ptr = self.clib.pjsip_rx_data_get_info(rdata)
            info = ctypes.string_at(info_ptr).decode(errors="replace") if info_ptr else ""
            m = _RX_INFO_RE.match(info)
            if m is None:
                raise LayoutError(f"unexpected rx info {info!r}")
            status = int(m[2]) if m[2] else None
            method = m[3]
            if request:
                relevant = status is None and method in REQUEST_METHODS
            else:
                relevant = status is not None and 100 < status < 300 and method in RESPONSE_METHODS
            if not relevant:
                return 0
            if _ptr(rdata + RDATA_MSG + 8) != info_ptr:
                raise LayoutError("pjsip_rx_data does not match its info")
            msg = _ptr(rdata + RDATA_MSG)
            uris = header_uris(self.printer.headers(msg, H_CONTACT))
            routes = header_uris(self.printer.headers(msg, H_RECORD_ROUTE))
            if not uris and not routes:
                return 0
            call_ids = self.printer.headers(msg, H_CALL_ID)
            to = self.printer.headers(msg, H_TO)
            to_params = to[0].rpartition(">")[2] if to else ""
            inbound = Inbound(
                request=request,
                method=method,
                status=status,
                call_id=header_value(call_ids[0]) if call_ids else "",
                in_dialog=bool(_TAG_RE.search(to_params)),
                contacts=uris,
                record_routes=routes,
            )
            if not self.inbound(inbound):
                return 0
            self.refused_inbound += 1
            if request:
                self.clib.pjsip_endpt_respond_stateless(self.endpt, rdata, REJECT_STATUS, None, None, None)
            return 1  # consumed: nothing above the transport sees it
        except Exception:
            self.errors += 1
            if not relevant:
                return 0
            logger.exception("cannot judge a received Contact or Record-Route: dropping it (fail closed)")
            return 1

    # -- send

    def tx(self, tdata: int) -> int:
        try:
            info_ptr = self.clib.pjsip_tx_data_get_info(tdata)
            if not info_ptr or _ptr(tdata + TDATA_INFO) != info_ptr:
                raise LayoutError("pjsip_tx_data does not match its info")
            msg = _ptr(tdata + TDATA_MSG)
            if not msg:
                raise LayoutError("a request without a message")
            text = self.printer.message(msg)
            method, uri = _request_line(text)
            info = ctypes.string_at(info_ptr).decode(errors="replace")
            if not info.startswith(f"Request msg {method}/"):
                raise LayoutError(f"request line {method} does not match {info!r}")
            if self.outbound(Outbound(method, uri, _call_id(text), _routes(text), _cseq(text))):
                self.refused_outbound += 1
                return REFUSED_STATUS
            return 0
        except Exception:
            self.errors += 1
            logger.exception("cannot judge a request's Request-URI or Route: not sending it (fail closed)")
            return REFUSED_STATUS


_OWNER: list[Screen | None] = [None]


def _on_rx_request(rdata: int | None) -> int:
    owner = _OWNER[0]
    return 0 if owner is None or not rdata else owner.rx(rdata, True)


def _on_rx_response(rdata: int | None) -> int:
    owner = _OWNER[0]
    return 0 if owner is None or not rdata else owner.rx(rdata, False)


def _on_tx_request(tdata: int | None) -> int:
    owner = _OWNER[0]
    if owner is None or not tdata:
        return REFUSED_STATUS if tdata else 0
    return owner.tx(tdata)


# One module per process, registered with each engine's pjsip endpoint (libDestroy
# unregisters it and sets its id back to -1); it and its callbacks live forever.
_NAME: Final = b"mod-ecpm-remote-target"
_CALLBACKS: Final = (_RX(_on_rx_request), _RX(_on_rx_response), _TX(_on_tx_request))
_MODULE: Final = _Module()
_MODULE.name = _PjStr(_NAME, len(_NAME))
_MODULE.id = -1
_MODULE.priority = PRIORITY
_MODULE.on_rx_request, _MODULE.on_rx_response, _MODULE.on_tx_request = _CALLBACKS
if ctypes.sizeof(_Module) != 112:  # pragma: no cover - another ABI
    raise ImportError("struct pjsip_module is not 112 bytes on this platform")


__all__ = [
    "REJECT_STATUS",
    "Inbound",
    "LayoutError",
    "Outbound",
    "Screen",
    "contact_uri",
    "header_uris",
    "is_sip_uri",
    "split_contacts",
]
