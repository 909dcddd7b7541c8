"""probes.sip_targets without a far end: reading Contact values, and the layout check
that keeps the engine from starting on a pjsua2 build whose structures differ (it must
refuse with words, never crash). The calls themselves: tests/test_sip_remote_target.py.
"""

from __future__ import annotations

import asyncio
import ctypes
import subprocess
import sys
import textwrap

import pytest

from probes import sip_targets
from probes.config import SipSettings
from probes.guard import Guard
from probes.sip import SipEngine, SipError
from probes.sip_targets import Inbound, Outbound, contact_uri, split_contacts
from tests.support.paths import REPO


@pytest.mark.parametrize(
    ("value", "uri"),
    [
        ("<sip:999@127.0.0.1:5060>", "sip:999@127.0.0.1:5060"),
        ("<sip:999@127.0.0.1:5060>;expires=60;q=0.5", "sip:999@127.0.0.1:5060"),
        ('"Emergency" <sip:999@h>', "sip:999@h"),
        ('"a <b> \\" c" <sip:112@h;user=phone>;x=y', "sip:112@h;user=phone"),
        ("Display Name <tel:999>", "tel:999"),
        ("sip:999@h;expires=60", "sip:999@h"),  # addr-spec: ';' starts the header params
        ("  <sip:%39%39%39@h>  ", "sip:%39%39%39@h"),
        ("<sip:112;phone-context=+44@h>", "sip:112;phone-context=+44@h"),
        ("<urn:service:sos>", "urn:service:sos"),
        ("*", None),
        ("", None),
        ('"never closed <sip:999@h>', '"never closed <sip:999@h>'),  # judged whole
    ],
)
def test_contact_uri(value: str, uri: str | None) -> None:
    assert contact_uri(value) == uri


def test_split_contacts_at_top_level_commas_only() -> None:
    value = '"Smith, J" <sip:a@h;x=1,2>;q=1, sip:999@h , <tel:112>'
    assert split_contacts(value) == ['"Smith, J" <sip:a@h;x=1,2>;q=1', "sip:999@h", "<tel:112>"]
    assert [contact_uri(v) for v in split_contacts(value)] == ["sip:a@h;x=1,2", "sip:999@h", "tel:112"]


def test_where_names_the_header_and_message() -> None:
    def inbound(request: bool, method: str, status: int | None, in_dialog: bool) -> str:
        return Inbound(request, method, status, "c", in_dialog, ("sip:x@h",)).where

    assert inbound(False, "INVITE", 200, False) == "Contact of 200 to INVITE"
    assert inbound(False, "INVITE", 183, False) == "Contact of 183 to INVITE"
    assert inbound(True, "INVITE", None, False) == "Contact of INVITE"
    assert inbound(True, "INVITE", None, True) == "Contact of re-INVITE"
    assert inbound(True, "UPDATE", None, True) == "Contact of UPDATE"
    assert Outbound("BYE", "sip:999@h", "c").where == "Request-URI of BYE"


def test_record_route_and_route_are_judged_with_their_own_where() -> None:
    msg = Inbound(False, "INVITE", 200, "c", False, ("sip:a@h",), ("sip:p@h;lr", "sip:999@h;lr"))
    assert msg.targets() == (
        ("Contact of 200 to INVITE", "sip:a@h"),
        ("Record-Route of 200 to INVITE", "sip:p@h;lr"),
        ("Record-Route of 200 to INVITE", "sip:999@h;lr"),
    )
    assert Inbound(True, "INVITE", None, "c", True, (), ("sip:p;lr",)).targets() == (
        ("Record-Route of re-INVITE", "sip:p;lr"),
    )
    out = Outbound("ACK", "sip:a@h", "c", ("sip:999@h;lr",))
    assert out.targets() == (("Request-URI of ACK", "sip:a@h"), ("Route of ACK", "sip:999@h;lr"))


def test_routes_of_a_printed_request_every_entry_of_every_header() -> None:
    text = (
        "BYE sip:a@h SIP/2.0\r\nVia: SIP/2.0/UDP h;branch=z9hG4bKx\r\n"
        'Route: <sip:p1@h;lr>, "x, y" <sip:999@h;lr>\r\nroute: <tel:112;lr>\r\n'
        "Record-Route: <sip:not-a-route@h>\r\nContent-Length: 0\r\n\r\nRoute: <sip:body@h>"
    )
    assert sip_targets._routes(text) == ("sip:p1@h;lr", "sip:999@h;lr", "tel:112;lr")


@pytest.mark.parametrize(
    ("uri", "sip"),
    [("sip:a@h", True), ("SIPS:a@h", True), (" sip:h;lr", True), ("tel:+441632960000", False),
     ("urn:service:sos", False), ("sipx:a@h", False), ("", False), ('"x" <sip:a@h>', False)],
)  # fmt: skip
def test_is_sip_uri(uri: str, sip: bool) -> None:
    assert sip_targets.is_sip_uri(uri) is sip


def test_readable_never_touches_bad_memory() -> None:
    buf = ctypes.create_string_buffer(b"abcdefgh")
    assert sip_targets._readable(ctypes.addressof(buf), 8)
    assert not sip_targets._readable(0, 8)
    assert not sip_targets._readable(8, 8)
    assert not sip_targets._readable(0x7FFF_0000_0000_0000 - 4096, 8)


def test_the_layout_check_passes_on_this_wheel_and_registers_once() -> None:
    async def main() -> None:
        for _ in range(2):  # libDestroy unregisters the module: a second engine registers it again
            async with SipEngine(SipSettings(), Guard(home_region="GB")):
                assert sip_targets._MODULE.id >= 0
                assert sip_targets._OWNER[0] is not None
            assert sip_targets._MODULE.id == -1
            assert sip_targets._OWNER[0] is None

    asyncio.run(main())


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("RDATA_MSG", 4432),
        ("RDATA_MSG", 4456),
        ("TDATA_INFO", 64),
        ("TDATA_MSG", 384),  # tdata->lock: readable memory, not a message
        ("TDATA_MSG", 400),
        ("TDATA_MSG", 80),
    ],
)
def test_a_different_layout_refuses_to_start_and_does_not_crash(name: str, value: int) -> None:
    """In a child process: the refusal must be a SipError with words, and the process
    must then exit cleanly (no C assertion, no SIGSEGV)."""
    code = textwrap.dedent(f"""
        import asyncio
        from probes import sip_targets
        from probes.config import SipSettings
        from probes.guard import Guard
        from probes.sip import SipEngine, SipError
        sip_targets.{name} = {value}
        async def main():
            try:
                async with SipEngine(SipSettings(), Guard(home_region="GB")):
                    print("started")
            except SipError as exc:
                print("refused:", exc)
        asyncio.run(main())
    """)
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "refused: cannot start the SIP engine: cannot judge remote targets" in done.stdout, done.stdout
    assert "is not where pjsip 2.15.1 has it" in done.stdout


def test_engine_refusal_is_a_sip_error_in_process(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sip_targets, "TDATA_MSG", 400)

    async def main() -> None:
        with pytest.raises(SipError, match="cannot judge remote targets"):
            async with SipEngine(SipSettings(), Guard(home_region="GB")):
                pass

    asyncio.run(main())
    monkeypatch.undo()
    asyncio.run(_starts())


async def _starts() -> None:
    async with SipEngine(SipSettings(), Guard(home_region="GB")) as engine:
        assert engine.running
