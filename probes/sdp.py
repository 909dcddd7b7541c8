"""What an SDP answer says about a call's audio, pure (no pjsua2): its security, and
whether it takes RFC 4733 telephone-events.

pjsua2 does not tell a caller whether its media is encrypted (``CallInfo`` and
``StreamInfo`` carry no SRTP state in this wheel), but the answer that set the media up
does: SDES-SRTP (RFC 4568) is on when the audio section the far end answered carries an
``a=crypto`` line (the answerer accepted one of our keys and sent its own), whatever its
profile (``RTP/SAVP`` for a mandatory offer, ``RTP/AVP`` with keys for an optional one,
RFC 4568 section 6.1 / pjmedia's "optional" mode).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from probes.nena import message_parts, parse_sip_message

SDP: Final = "application/sdp"


@dataclass(frozen=True, slots=True)
class AudioSecurity:
    profile: str  # the audio m-line's transport profile, e.g. "RTP/AVP", "RTP/SAVP"
    crypto: str | None  # the first a=crypto suite answered (e.g. AES_CM_128_HMAC_SHA1_80)

    @property
    def encrypted(self) -> bool:
        return self.crypto is not None


def audio_security(message: str | None) -> AudioSecurity | None:
    """The audio section of the SDP in a SIP message (body or multipart part), or None when
    it has no SDP with an audio m-line."""
    body = _sdp(message)
    return None if body is None else _audio(body)


def offers_telephone_event(message: str | None) -> bool:
    """The first audio section of the SDP in a SIP message has a ``telephone-event``
    rtpmap (RFC 4733); False when it has none, or there is no SDP."""
    body = _sdp(message)
    audio = None if body is None else _first_audio(body)
    if audio is None:
        return False
    for line in audio[1]:
        fields = line.split()
        if (
            line.startswith("a=rtpmap:")
            and len(fields) >= 2
            and fields[1].lower().startswith("telephone-event/")
        ):
            return True
    return False


def _sdp(message: str | None) -> str | None:
    """The SDP body (or multipart part) of a SIP message."""
    if not message:
        return None
    for part in message_parts(parse_sip_message(message)):
        if part.content_type == SDP:
            return part.body
    return None


def _first_audio(sdp: str) -> tuple[str, list[str]] | None:
    """The profile and the lines after the m-line of the first active audio section."""
    profile: str | None = None
    lines: list[str] = []
    for line in sdp.replace("\r\n", "\n").split("\n"):
        if line.startswith("m="):
            if profile is not None:  # the first audio section only
                break
            fields = line[2:].split()
            if len(fields) >= 3 and fields[0] == "audio" and fields[1] != "0":
                profile = fields[2]
        elif profile is not None:
            lines.append(line)
    return None if profile is None else (profile, lines)


def _audio(sdp: str) -> AudioSecurity | None:
    audio = _first_audio(sdp)
    if audio is None:
        return None
    profile, lines = audio
    crypto = next(
        ((line.split()[1:2] or ["unknown"])[0] for line in lines if line.startswith("a=crypto:")), None
    )
    return AudioSecurity(profile, crypto)
