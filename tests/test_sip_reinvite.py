# ruff: noqa: E501  (SIP messages are written out whole, as they go on the wire)
"""Requests the far end sends into a probe's call.

- A re-INVITE that moves the far end's RTP (an SBC re-anchoring media) must not silence
  the call: pjsua restarts the stream on a new conference slot, dropping every bridge
  connection, and the engine has to reconnect the tone, echo, recorder and player.
- An INVITE with Replaces (safety): pjsua would answer it itself and tear our call
  down (then the probe crashed); the engine declines it with 603 and the call goes on.

The far end here is a minimal UAS written for this one exchange (SIPp cannot re-INVITE
with a new media port and count what arrives there), on 127.0.0.1 only.
"""

from __future__ import annotations

import asyncio
import re
import socket

from probes.config import SipSettings
from probes.guard import Guard
from probes.sip import CallOptions, Dial, SipEngine

HOST = "127.0.0.1"


def _hdr(msg: str, name: str) -> str:
    m = re.search(rf"^{name}:\s*(.*)$", msg, re.M | re.I)
    return m.group(1).strip() if m else ""


def _sdp(port: int, version: int) -> str:
    return (
        f"v=0\r\no=- 1 {version} IN IP4 {HOST}\r\ns=-\r\nc=IN IP4 {HOST}\r\nt=0 0\r\n"
        f"m=audio {port} RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\na=sendrecv\r\n"
    )


def _udp() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((HOST, 0))
    sock.setblocking(False)
    return sock


async def _scenario(action: str = "reinvite") -> tuple[dict[int, list[int]], list[str]]:
    loop = asyncio.get_running_loop()
    uas, first_rtp, second_rtp = _udp(), _udp(), _udp()
    uas_port = uas.getsockname()[1]
    ports = [s.getsockname()[1] for s in (first_rtp, second_rtp)]
    heard: dict[int, list[int]] = {p: [0, 0] for p in ports}  # port -> [packets, with tone]
    state: dict[str, object] = {}
    replies: list[str] = []  # responses to our own requests

    async def rtp(sock: socket.socket, port: int) -> None:
        while True:
            data = await loop.sock_recv(sock, 2048)
            heard[port][0] += 1
            if len(set(data[12:])) > 2:  # PCMU silence is one repeated byte
                heard[port][1] += 1

    async def sip() -> None:
        while True:
            data, addr = await loop.sock_recvfrom(uas, 65535)
            msg = data.decode(errors="replace")
            first = msg.split("\r\n")[0]
            vias = "".join(line + "\r\n" for line in msg.split("\r\n") if line.lower().startswith("via:"))
            if first.startswith("INVITE"):
                state.update(addr=addr, invite=msg)
                body = _sdp(ports[0], 1)
                await loop.sock_sendto(uas, (
                    f"SIP/2.0 200 OK\r\n{vias}From: {_hdr(msg, 'From')}\r\nTo: {_hdr(msg, 'To')};tag=u1\r\n"
                    f"Call-ID: {_hdr(msg, 'Call-ID')}\r\nCSeq: {_hdr(msg, 'CSeq')}\r\n"
                    f"Contact: <sip:u@{HOST}:{uas_port}>\r\nContent-Type: application/sdp\r\n"
                    f"Content-Length: {len(body)}\r\n\r\n{body}").encode(), addr)  # fmt: skip
            elif first.startswith("SIP/2.0") and _hdr(msg, "Call-ID") == "replaces-1@test":
                replies.append(first)
            elif first.startswith("SIP/2.0 200") and "INVITE" in _hdr(msg, "CSeq"):
                contact = re.search(r"<([^>]*)>", _hdr(msg, "Contact"))
                assert contact is not None
                await loop.sock_sendto(uas, (
                    f"ACK {contact.group(1)} SIP/2.0\r\nVia: SIP/2.0/UDP {HOST}:{uas_port};branch=z9hG4bKack2\r\n"
                    f"From: {_hdr(msg, 'From')}\r\nTo: {_hdr(msg, 'To')}\r\nCall-ID: {_hdr(msg, 'Call-ID')}\r\n"
                    f"CSeq: 2 ACK\r\nMax-Forwards: 70\r\nContent-Length: 0\r\n\r\n").encode(), addr)  # fmt: skip
            elif first.startswith("BYE"):
                await loop.sock_sendto(uas, (
                    f"SIP/2.0 200 OK\r\n{vias}From: {_hdr(msg, 'From')}\r\nTo: {_hdr(msg, 'To')}\r\n"
                    f"Call-ID: {_hdr(msg, 'Call-ID')}\r\nCSeq: {_hdr(msg, 'CSeq')}\r\n"
                    f"Content-Length: 0\r\n\r\n").encode(), addr)  # fmt: skip

    async def reinvite() -> None:
        invite = str(state["invite"])
        contact = re.search(r"<([^>]*)>", _hdr(invite, "Contact"))
        assert contact is not None
        body = _sdp(ports[1], 2)  # the same call, media moved to another port
        await loop.sock_sendto(uas, (
            f"INVITE {contact.group(1)} SIP/2.0\r\nVia: SIP/2.0/UDP {HOST}:{uas_port};branch=z9hG4bKreinv1\r\n"
            f"From: {_hdr(invite, 'To')};tag=u1\r\nTo: {_hdr(invite, 'From')}\r\n"
            f"Call-ID: {_hdr(invite, 'Call-ID')}\r\nCSeq: 2 INVITE\r\nMax-Forwards: 70\r\n"
            f"Contact: <sip:u@{HOST}:{uas_port}>\r\nContent-Type: application/sdp\r\n"
            f"Content-Length: {len(body)}\r\n\r\n{body}").encode(), state["addr"])  # type: ignore[arg-type]  # fmt: skip

    async def replaces() -> None:
        invite = str(state["invite"])
        contact = re.search(r"<([^>]*)>", _hdr(invite, "Contact"))
        from_tag = re.search(r"tag=([^;>\s]+)", _hdr(invite, "From"))
        assert contact is not None and from_tag is not None
        body = _sdp(ports[1], 1)
        await loop.sock_sendto(uas, (
            f"INVITE {contact.group(1)} SIP/2.0\r\nVia: SIP/2.0/UDP {HOST}:{uas_port};branch=z9hG4bKrepl1;rport\r\n"
            f"From: <sip:intruder@{HOST}:{uas_port}>;tag=x1\r\nTo: <{contact.group(1)}>\r\n"
            f"Call-ID: replaces-1@test\r\nCSeq: 1 INVITE\r\nMax-Forwards: 70\r\n"
            f"Replaces: {_hdr(invite, 'Call-ID')};to-tag={from_tag.group(1)};from-tag=u1\r\n"
            f"Contact: <sip:intruder@{HOST}:{uas_port}>\r\nContent-Type: application/sdp\r\n"
            f"Content-Length: {len(body)}\r\n\r\n{body}").encode(), state["addr"])  # type: ignore[arg-type]  # fmt: skip

    tasks = [asyncio.create_task(rtp(first_rtp, ports[0])), asyncio.create_task(rtp(second_rtp, ports[1]))]
    tasks.append(asyncio.create_task(sip()))
    try:
        async with SipEngine(SipSettings(transports=["udp"]), Guard(home_region="GB")) as engine:
            dial = Dial(f"sip:ecpm-test@{HOST}:{uas_port}", "t", declared_test_endpoint=True)
            call = await engine.call(dial, CallOptions(tone_hz=1000.0, max_duration=10))
            await asyncio.sleep(1.0)
            await (reinvite() if action == "reinvite" else replaces())
            await asyncio.sleep(1.5)
            assert not call.ended, "the far end's request ended our call"
            await call.hangup()
            await asyncio.sleep(0.3)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for sock in (uas, first_rtp, second_rtp):
            sock.close()
    return heard, replies


def test_tone_keeps_flowing_after_a_reinvite_moves_media() -> None:
    heard, _ = asyncio.run(_scenario())
    before, after = heard.values()
    assert before[1] > 20, f"the tone never reached the first media port: {heard}"
    assert after[0] > 20 and after[1] > 0.9 * after[0], f"the tone stopped after the re-INVITE: {heard}"


def test_an_invite_with_replaces_is_declined_and_the_call_goes_on() -> None:
    heard, replies = asyncio.run(_scenario("replaces"))
    assert "SIP/2.0 603 Decline" in replies, replies
    first, second = heard.values()
    assert second[0] == 0, "media was set up towards the intruder"
    assert first[0] > 80 and first[1] > 0.9 * first[0], f"our call's audio stopped: {heard}"
