"""Safety: a far end can never make ecpm send a request to a live emergency number by
naming one as the dialog's remote target.

pjsip makes the Contact of a 18x/2xx (and of an incoming INVITE, re-INVITE or UPDATE)
the Request-URI of every later request in the dialog: ACK, BYE, re-INVITE. These tests
run the real probe (``ecpm call``) and the real responder, each in its own process (a
crash must show), against SIPp naming ``sip:999@127.0.0.1:TRAP`` (and other spellings
of live numbers) as its Contact, where TRAP is a UDP sink that must stay silent. The
call must end as a failure with reason ``guard_refused``; with a harmless Contact on
the same trap the call goes on and its ACK and BYE do arrive there (the trap works).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.support.net import HOST, UdpSink
from tests.support.paths import REPO, SIPP_DIR
from tests.support.sip import ResponderProcess, Sipp

pytestmark = pytest.mark.peers("sipp")

EMERGENCY_CONTACTS = [
    "<sip:999@127.0.0.1:TRAP>",
    "<sip:%39%39%39@127.0.0.1:TRAP>",
    "<sip:112;phone-context=+44@127.0.0.1:TRAP>",
    "<tel:999>",  # unroutable: pjsip aborted the process on the ACK before
    '"Help, now" <sip:999@127.0.0.1:TRAP>;expires=60',
    "sip:999@127.0.0.1:TRAP;expires=60",  # addr-spec: the parameters are the header's
    "<sip:911@127.0.0.1:TRAP;user=phone>",
    "<urn:service:sos>",
    "<sip:ecpm-test@127.0.0.1:TRAP>, <sip:999@127.0.0.1:TRAP>",  # the second of two
]
SAFE_CONTACT = "<sip:ecpm-test@127.0.0.1:TRAP>"
START_LINE = re.compile(r"^(SIP/2\.0 \d{3} |[A-Z]+ \S+ SIP/2\.0$)")


def _probe(uri: str, *extra: str) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    done = subprocess.run(
        [sys.executable, "-m", "ecpm", "call", uri, "--media-time", "2s", "--no-tone", "--json", *extra],
        cwd=REPO, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode in (0, 1), f"the probe died ({done.returncode}): {done.stderr[-3000:]}"
    return done, json.loads(done.stdout)


def _wire(sipp: Sipp) -> list[str]:
    """Start lines of every message SIPp sent or received, in order."""
    return [line for line in sipp.log().splitlines() if START_LINE.match(line)]


def _received(sipp: Sipp) -> list[str]:
    """Start lines of the messages SIPp received."""
    out, incoming = [], False
    for line in sipp.log().splitlines():
        if line.startswith(("UDP message received", "TCP message received")):
            incoming = True
        elif line.startswith(("UDP message sent", "TCP message sent")):
            incoming = False
        elif incoming and START_LINE.match(line):
            out.append(line)
            incoming = False
    return out


def _refused(result: dict[str, Any], stage: str, where: str) -> None:
    assert result["outcome"] == "fail", result
    assert result["reason"] == "guard_refused", result
    assert result["stage"] == stage, result
    assert result["detail"]["guard.where"] == where, result
    assert result["detail"]["guard.reason"] in ("emergency_number", "sos_service"), result


# --------------------------------------------------------------------- the probe


@pytest.mark.parametrize("contact", EMERGENCY_CONTACTS)
def test_emergency_contact_in_200_ends_the_call_and_nothing_reaches_it(tmp_path: Path, contact: str) -> None:
    trap = UdpSink()
    value = contact.replace("TRAP", str(trap.port))
    sipp = Sipp(tmp_path, "uas_contact_200.xml", keys={"contact": value, "header": "X-ECPM-Test: plain"},
                rtp_echo=True, timeout=20)  # fmt: skip
    try:
        done, result = _probe(sipp.uri)
        assert trap.received(1.0) == [], "a request went to the far end's emergency Contact"
        sipp.wait(10)
        # the 200 was retransmitted and still never acknowledged: nothing after the INVITE
        assert _received(sipp) == [f"INVITE {sipp.uri} SIP/2.0"], _wire(sipp)
        assert _wire(sipp).count("SIP/2.0 200 OK") >= 2  # the retransmissions were dropped too
        _refused(result, "answer", "Contact of 200 to INVITE")
        assert done.returncode == 1
        assert "was ended without sending anything to it" in done.stderr
    finally:
        sipp.stop()
        trap.close()


@pytest.mark.parametrize("contact", ["<sip:999@127.0.0.1:TRAP>", "<tel:999>"])
def test_emergency_contact_in_180_is_cancelled_at_the_request_uri(tmp_path: Path, contact: str) -> None:
    trap = UdpSink()
    sipp = Sipp(tmp_path, "uas_contact_180.xml", keys={"contact": contact.replace("TRAP", str(trap.port))},
                rtp_echo=True, timeout=20)  # fmt: skip
    try:
        _, result = _probe(sipp.uri)
        assert trap.received(1.0) == []
        sipp.wait(10)
        # the CANCEL (and the ACK of the 487, unless the probe had exited first) went to
        # the INVITE's own Request-URI, and here
        received = _received(sipp)
        assert received[:2] == [f"INVITE {sipp.uri} SIP/2.0", f"CANCEL {sipp.uri} SIP/2.0"], _wire(sipp)
        assert received[2:] in ([], [f"ACK {sipp.uri} SIP/2.0"]), _wire(sipp)
        _refused(result, "answer", "Contact of 180 to INVITE")
    finally:
        sipp.stop()
        trap.close()


@pytest.mark.parametrize("contact", ["<tel:+441632960000>", "<urn:service:test.sos>"])
def test_non_sip_contact_the_guard_allows_is_still_refused(tmp_path: Path, contact: str) -> None:
    """Not an emergency number, but pjsip cannot route an ACK to it and would abort:
    anything but sip:/sips: is refused as a remote target."""
    sipp = Sipp(tmp_path, "uas_contact_200.xml", keys={"contact": contact, "header": "X-ECPM-Test: plain"},
                rtp_echo=True, timeout=20)  # fmt: skip
    try:
        done, result = _probe(sipp.uri)
        assert done.returncode == 1, done.stderr[-3000:]
        sipp.wait(10)
        assert _received(sipp) == [f"INVITE {sipp.uri} SIP/2.0"], _wire(sipp)
        assert result["reason"] == "guard_refused", result
        assert result["detail"]["guard.where"] == "Contact of 200 to INVITE", result
        assert result["detail"]["guard.reason"] == "unsupported_uri", result
    finally:
        sipp.stop()


def test_safe_contact_on_the_trap_is_used_normally(tmp_path: Path) -> None:
    """The control: the same scenario and trap with a harmless Contact. The call goes on,
    and its ACK and BYE reach the trap — so the silence above is the guard's doing."""
    trap = UdpSink()
    value = SAFE_CONTACT.replace("TRAP", str(trap.port))
    sipp = Sipp(tmp_path, "uas_contact_200.xml", keys={"contact": value, "header": "X-ECPM-Test: plain"},
                rtp_echo=True, timeout=20)  # fmt: skip
    try:
        done, result = _probe(sipp.uri)
        lines = [p.split(b"\r\n", 1)[0].decode() for p in trap.received(1.0)]
        target = f"sip:ecpm-test@{HOST}:{trap.port}"
        assert f"ACK {target} SIP/2.0" in lines, lines
        assert f"BYE {target} SIP/2.0" in lines, lines
        assert result["reason"] != "guard_refused", result
        assert result["outcome"] == "pass", result
        assert done.returncode == 0
    finally:
        sipp.stop()
        trap.close()


@pytest.mark.parametrize("method", ["INVITE", "UPDATE"])
def test_emergency_contact_in_a_target_refresh_ends_the_call_locally(tmp_path: Path, method: str) -> None:
    trap = UdpSink()
    scenario = (SIPP_DIR / "uas_contact_refresh.xml").read_text()
    for old in ("INVITE [next_url]", "CSeq: 2 INVITE"):  # the refresh; SIPp wants its method literal
        scenario = scenario.replace(old, old.replace("INVITE", method))
    path = tmp_path / f"uas_contact_refresh_{method}.xml"
    path.write_text(scenario)
    sipp = Sipp(tmp_path, path, keys={"contact": f"<sip:999@{HOST}:{trap.port}>"}, rtp_echo=True, timeout=20)
    try:
        _, result = _probe(sipp.uri)
        assert trap.received(1.0) == []
        assert sipp.wait(10) == 0, sipp.log()[-3000:]  # 403 to the refresh, then no BYE
        received = _received(sipp)
        assert received[-1] == "SIP/2.0 403 Forbidden", received
        assert not any(line.startswith("BYE ") for line in received), received
        _refused(result, "media", "Contact of re-INVITE" if method == "INVITE" else "Contact of UPDATE")
    finally:
        sipp.stop()
        trap.close()


# With the receive side blinded to Record-Route (in the probe's own process), only the
# check of every request leaving the process stands between the route set and the wire.
_SEND_SIDE_ONLY = (
    "import sys; from probes import sip_targets as t; from ecpm.cli import main; "
    "t.Inbound.targets = lambda self: tuple((self.where, u) for u in self.contacts); "
    "sys.argv[0] = 'ecpm'; raise SystemExit(main())"
)


@pytest.mark.parametrize(
    ("route", "where"),
    [
        ("<sip:999@127.0.0.1:TRAP>", "Request-URI of ACK"),  # strict: the route becomes the Request-URI
        ("<sip:999@127.0.0.1:TRAP;lr>", "Route of ACK"),  # loose: sent to the Route
    ],
)
def test_route_to_an_emergency_number_is_not_sent(tmp_path: Path, route: str, where: str) -> None:
    """The Record-Route is refused on receipt (below); this is the second line behind it."""
    trap = UdpSink()
    keys = {
        "contact": SAFE_CONTACT.replace("TRAP", str(trap.port)),
        "header": f"Record-Route: {route.replace('TRAP', str(trap.port))}",
    }
    sipp = Sipp(tmp_path, "uas_contact_200.xml", keys=keys, rtp_echo=True, timeout=20)
    try:
        done = subprocess.run(
            [sys.executable, "-c", _SEND_SIDE_ONLY, "call", sipp.uri, "--media-time", "2s", "--json"],
            cwd=REPO, capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert done.returncode == 1, done.stderr[-3000:]
        result = json.loads(done.stdout)
        assert trap.received(1.0) == []
        assert result["reason"] == "guard_refused", result
        assert result["detail"]["guard.where"] == where, result
    finally:
        sipp.stop()
        trap.close()


def test_strict_record_route_to_an_emergency_number_is_refused_on_receipt(tmp_path: Path) -> None:
    trap = UdpSink()
    keys = {
        "contact": SAFE_CONTACT.replace("TRAP", str(trap.port)),
        "header": f"Record-Route: <sip:999@{HOST}:{trap.port}>",
    }
    sipp = Sipp(tmp_path, "uas_contact_200.xml", keys=keys, rtp_echo=True, timeout=20)
    try:
        _, result = _probe(sipp.uri)
        assert trap.received(1.0) == []
        _refused(result, "answer", "Record-Route of 200 to INVITE")
    finally:
        sipp.stop()
        trap.close()


# ------------------------------------------------------------------ Record-Route

# Every entry of every Record-Route joins the dialog's route set; with ;lr the first is
# where every later request (ACK, PRACK, BYE) goes, whatever the Contact says.
EMERGENCY_RECORD_ROUTES = [
    ["Record-Route: <sip:999@127.0.0.1:TRAP;lr>"],
    ["Record-Route: <sip:999@192.0.2.1:TRAP;maddr=127.0.0.1;lr>"],
    ["Record-Route: <sip:127.0.0.1:SAFE;lr>, <sip:999@127.0.0.1:TRAP;lr>"],  # second entry
    ["Record-Route: <sip:127.0.0.1:SAFE;lr>", "Record-Route: <sip:999@127.0.0.1:TRAP;lr>"],  # second header
]


def _scenario_200(tmp_path: Path, headers: list[str]) -> Path:
    """uas_contact_200.xml with these header lines in place of [header]."""
    text = (SIPP_DIR / "uas_contact_200.xml").read_text()
    path = tmp_path / "uas_contact_200_routes.xml"
    path.write_text(text.replace("[header]", "\n      ".join(headers)))
    return path


@pytest.mark.parametrize(
    "headers", EMERGENCY_RECORD_ROUTES, ids=["single", "maddr", "second-entry", "second-header"]
)
def test_emergency_record_route_in_200_ends_the_call_and_nothing_reaches_it(
    tmp_path: Path, headers: list[str]
) -> None:
    trap, proxy = UdpSink(), UdpSink()
    lines = [h.replace("TRAP", str(trap.port)).replace("SAFE", str(proxy.port)) for h in headers]
    keys = {"contact": SAFE_CONTACT.replace("TRAP", str(trap.port))}
    sipp = Sipp(tmp_path, _scenario_200(tmp_path, lines), keys=keys, rtp_echo=True, timeout=20)
    try:
        done, result = _probe(sipp.uri)
        assert trap.received(1.0) == [], "a request went to the far end's emergency Record-Route"
        assert proxy.received(0.1) == [], "a request went to the route set the 200 would have made"
        sipp.wait(10)
        assert _received(sipp) == [f"INVITE {sipp.uri} SIP/2.0"], _wire(sipp)
        assert _wire(sipp).count("SIP/2.0 200 OK") >= 2  # the retransmissions were dropped too
        _refused(result, "answer", "Record-Route of 200 to INVITE")
        assert done.returncode == 1
    finally:
        sipp.stop()
        trap.close()
        proxy.close()


def test_emergency_record_route_in_a_reliable_183_sends_no_prack_to_it(tmp_path: Path) -> None:
    trap = UdpSink()
    sipp = Sipp(tmp_path, "uas_route_183.xml", keys={"route": f"<sip:999@{HOST}:{trap.port};lr>"},
                rtp_echo=True, timeout=20)  # fmt: skip
    try:
        done, result = _probe(sipp.uri)
        assert trap.received(1.0) == [], "a PRACK (or more) went to the far end's emergency Record-Route"
        sipp.wait(10)
        received = _received(sipp)
        assert received[0] == f"INVITE {sipp.uri} SIP/2.0", _wire(sipp)
        assert not any(line.startswith(("PRACK ", "BYE ")) for line in received), received
        assert all(line.split(" ")[1] == sipp.uri for line in received if not line.startswith("SIP/")), (
            received
        )
        _refused(result, "answer", "Record-Route of 183 to INVITE")
        assert done.returncode == 1
    finally:
        sipp.stop()
        trap.close()


@pytest.mark.parametrize(
    ("route", "reason"),
    [
        ("<tel:999;lr>", "emergency_number"),
        ("<urn:service:sos>", "sos_service"),
        ("<tel:+441632960000;lr>", "unsupported_uri"),  # harmless, but pjsip cannot route to it
    ],
)
def test_unroutable_record_route_is_refused_and_does_not_kill_the_probe(
    tmp_path: Path, route: str, reason: str
) -> None:
    """pjsip aborted the process on these (``inv_send_ack``: "Unable to send ACK!"):
    now the 200 never reaches the dialog."""
    trap = UdpSink()
    keys = {"contact": SAFE_CONTACT.replace("TRAP", str(trap.port))}
    sipp = Sipp(
        tmp_path, _scenario_200(tmp_path, [f"Record-Route: {route}"]), keys=keys, rtp_echo=True, timeout=20
    )
    try:
        done, result = _probe(sipp.uri)  # asserts exit 0 or 1: no signal
        assert done.returncode == 1, done.stderr[-3000:]
        assert "Assertion" not in done.stderr, done.stderr[-3000:]
        assert trap.received(1.0) == []
        sipp.wait(10)
        assert _received(sipp) == [f"INVITE {sipp.uri} SIP/2.0"], _wire(sipp)
        assert result["outcome"] == "fail", result
        assert result["reason"] == "guard_refused", result
        assert result["detail"]["guard.where"] == "Record-Route of 200 to INVITE", result
        assert result["detail"]["guard.reason"] == reason, result
    finally:
        sipp.stop()
        trap.close()


def test_safe_record_route_is_followed(tmp_path: Path) -> None:
    """The control: a Record-Route naming a harmless proxy (a second UDP sink). The
    call goes on, and its ACK and BYE reach the proxy with the Contact as Request-URI
    and the route in a Route header — the route set is judged, not ignored."""
    contact, proxy = UdpSink(), UdpSink()
    route = f"<sip:{HOST}:{proxy.port};lr>"
    keys = {"contact": f"<sip:ecpm-test@{HOST}:{contact.port}>", "header": f"Record-Route: {route}"}
    sipp = Sipp(tmp_path, "uas_contact_200.xml", keys=keys, rtp_echo=True, timeout=20)
    try:
        done, result = _probe(sipp.uri)
        packets = [p.decode(errors="replace") for p in proxy.received(1.0)]
        lines = [p.split("\r\n", 1)[0] for p in packets]
        target = f"sip:ecpm-test@{HOST}:{contact.port}"
        assert f"ACK {target} SIP/2.0" in lines, lines
        assert f"BYE {target} SIP/2.0" in lines, lines
        assert all(f"Route: {route}" in p for p in packets), packets
        assert contact.received(0.1) == []  # loose routing: sent to the route, not the Contact
        assert result["outcome"] == "pass", result
        assert done.returncode == 0
    finally:
        sipp.stop()
        contact.close()
        proxy.close()


# ------------------------------------------------------------------ the responder


def test_responder_refuses_a_caller_with_an_emergency_contact(tmp_path: Path) -> None:
    trap = UdpSink()
    responder = ResponderProcess()
    try:
        sipp = Sipp(tmp_path, "uac_contact.xml", keys={"contact": f"<sip:999@{HOST}:{trap.port}>"},
                    remote=f"{HOST}:{responder.port}", timeout=20)  # fmt: skip
        try:
            assert sipp.wait(15) == 0, sipp.log()[-3000:]  # 403 to the INVITE (its Via)
            assert "SIP/2.0 403 Forbidden" in _received(sipp)
            assert trap.received(1.0) == []
        finally:
            sipp.stop()
        assert responder.http("GET", "/health") == (200, "ok\n")
        done = subprocess.run(
            [sys.executable, "-m", "ecpm", "call", responder.uri, "--media-time", "1s"],
            cwd=REPO, capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert done.returncode == 0, done.stdout + done.stderr  # and it still serves callers
    finally:
        assert responder.stop() == 0, responder.stderr_text[-3000:]
        trap.close()
    assert "guard refused" in responder.stderr_text


def test_responder_ends_a_call_whose_caller_refreshes_to_an_emergency_contact(tmp_path: Path) -> None:
    trap = UdpSink()
    responder = ResponderProcess()
    try:
        sipp = Sipp(tmp_path, "uac_contact_refresh.xml", keys={"contact": f"<sip:999@{HOST}:{trap.port}>"},
                    remote=f"{HOST}:{responder.port}", timeout=20)  # fmt: skip
        try:
            # 403 to the re-INVITE, no BYE from the responder during the pause (it would
            # fail the scenario), and SIPp's own BYE finds no dialog left: 481
            assert sipp.wait(15) == 0, sipp.log()[-3000:]
            assert trap.received(1.0) == []
            received = _received(sipp)
            assert "SIP/2.0 403 Forbidden" in received
            assert received[-1].startswith("SIP/2.0 481"), received
        finally:
            sipp.stop()
        assert responder.http("GET", "/health") == (200, "ok\n")
    finally:
        assert responder.stop() == 0, responder.stderr_text[-3000:]
        trap.close()
    assert "Contact of re-INVITE was refused" in responder.stderr_text
