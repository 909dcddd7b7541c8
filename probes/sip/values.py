"""Plain values the SIP engine hands across threads: frozen, slotted, no pjsua2 objects."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal

from ecpm.settings import Transport
from probes.config import Auth, SipAccount, Srtp
from probes.guard import CarrierTestService

MAX_MESSAGE: Final = 64 * 1024  # SIP message text handed to asyncio is cut here


@dataclass(frozen=True, slots=True)
class Dial:
    """Where a request goes, and everything the guard judges about it."""

    uri: str
    target: str  # target id, for logs and counters
    declared_test_endpoint: bool
    proxy: str | None = None  # outbound proxy (loose route), e.g. "sip:10.0.0.1:5060;lr"
    transport: Transport = "udp"
    auth: Auth | None = None
    carrier_test_service: CarrierTestService | None = None
    account: SipAccount | None = None  # the registered account it goes from (REGISTER: uri = registrar)
    srtp: Srtp = "off"  # SDES-SRTP for its media: off, optional (offered), mandatory (RTP/SAVP only)


@dataclass(frozen=True, slots=True)
class Part:
    """An extra MIME part sent next to the SDP (multipart/mixed)."""

    content_type: str  # "application/pidf+xml"
    body: str
    headers: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class CallOptions:
    headers: tuple[tuple[str, str], ...] = ()
    parts: tuple[Part, ...] = ()
    tone_hz: float | None = None  # play this tone into the call while media is up
    record: Path | None = None  # record what we receive (WAV, 8 kHz mono 16-bit)
    first_response_timeout: float = 5.0  # pjsip timer B for this INVITE
    max_duration: float = 60.0  # the engine hangs up after this, whatever the caller does


CallEventKind = Literal["sent", "response", "media", "confirmed", "disconnected", "dtmf"]
DisconnectCause = Literal[
    "local",  # we hung up (BYE, CANCEL or a rejection we sent)
    "rejected",  # a final non-2xx response came from the network
    "remote_bye",  # the far end ended an established call
    "cancelled",  # the caller cancelled before we answered (UAS)
    "timeout",  # no final response: pjsip's own timeout (408, timer B)
    "transport",  # the transport failed (connect refused, TLS, ICMP)
    "max_duration",  # the engine's hard limit
    "engine_closed",
    "guard_refused",  # the far end named a remote target the guard refused: ended locally
]


@dataclass(frozen=True, slots=True)
class RemoteRefusal:
    """A URI the far end gave us to send to, refused by the guard (the call was ended)."""

    uri: str
    reason: str  # the guard's reason (probes.guard.REASONS)
    detail: str  # the guard's sentence
    where: str  # "Contact of 200 to INVITE", "Record-Route of 200 to INVITE", "Route of ACK", ...
    status: int | None = None  # the response that carried it


@dataclass(frozen=True, slots=True)
class CallEvent:
    kind: CallEventKind
    at: float  # time.monotonic() in the pjsua2 thread
    status: int | None = None
    reason: str | None = None
    message: str | None = None  # "response": the whole SIP response as received
    media_active: bool | None = None  # "media": audio is flowing (per SDP)
    cause: DisconnectCause | None = None  # "disconnected"
    refusal: RemoteRefusal | None = None  # "disconnected" with cause "guard_refused"
    digit: str | None = None  # "dtmf": one digit received (RFC 4733 telephone-event or SIP INFO)


@dataclass(frozen=True, slots=True)
class RtpStats:
    rx_packets: int
    rx_lost: int
    jitter_ms: float  # mean RFC 3550 interarrival jitter of what we received
    tx_packets: int
    rtt_ms: float | None  # mean RTCP round trip, None until an RTCP report came back
    codec: str


@dataclass(frozen=True, slots=True)
class TlsState:
    """A TLS connection as pjsip reported it (``Endpoint.onTransportState``): the protocol
    version and cipher negotiated and the peer certificate's verification."""

    remote: str  # "ip:port" of the peer
    established: bool  # the handshake completed
    protocol: str  # "TLSv1.2", "TLSv1.1", ...; "unknown" when pjsip did not say
    cipher: str
    verified: bool  # the peer's certificate verified (pjsip's verify status 0)
    verify: str  # "ok", or pjsip's verification messages
    peer: str  # the peer certificate's subject CN ("" when none was seen)


@dataclass(frozen=True, slots=True)
class OptionsReply:
    status: int
    reason: str
    from_network: bool  # False: pjsip made it up (timeout 408, transport error 503)
    sent_at: float
    finished_at: float
    message: str | None


Renewal = Literal["new", "refresh", "re-registered"]


@dataclass(frozen=True, slots=True)
class Registration:
    """The end of one registration attempt of an account (ours, or pjsua's own refresh)."""

    status: int
    reason: str
    from_network: bool  # False: pjsip made it up (timeout 408, transport error 503)
    registered: bool  # a 2xx that kept a binding (expires > 0)
    expires: int  # what the registrar granted
    renewal: Renewal  # the account's first, a refresh, or the first after a lost one
    lost: str | None  # why the registration before this one was lost ("408 Request Timeout")
    refreshes: int  # pjsua's own refreshes that kept the binding since the last attempt of ours
    started_at: float  # the attempt began in the pjsua2 thread
    sent_at: float | None  # its first REGISTER on the wire
    credentials_at: float | None  # the REGISTER with credentials sent, after a 401/407
    finished_at: float


@dataclass(frozen=True, slots=True)
class IncomingRequest:
    message: str  # the whole INVITE as received
    source: str  # "ip:port" it came from
    received_at: float


@dataclass(frozen=True, slots=True)
class EngineStats:
    calls_active: int  # calls with a live wrapper
    slots_in_use: int  # pjsua's own count, held slots included
    calls_waiting: int  # waiting for a slot or the rate limit
    calls_placed_total: int
    calls_incoming_total: int
    refused_total: int  # refused by the guard here (the guard counts by reason)
    options_total: int
