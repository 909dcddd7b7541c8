"""Emergency-shaped requests and NENA i3 test-call answers, pure.

- :func:`build_pidf_lo` writes the PIDF-LO (RFC 4119, RFC 5491 shapes, RFC 5139
  civic elements) that an emergency-shaped INVITE carries as a second body part,
  referenced from ``Geolocation: <cid:...>`` (RFC 6442).
- :func:`parse_sip_message`, :func:`body_parts` and :func:`location_in_request`
  read a raw SIP message (the responder's view of the INVITE, the probe's view of
  the 200 OK).
- :func:`format_test_answer` / :func:`parse_test_answer`: the ``text/plain`` body of
  a NENA i3 (NENA-STA-010, RFC 6881 test service) test-call answer: the answering
  point's name, the service URN called and the location received.
- :func:`score_answer` turns the final response of an emergency-shaped call into a
  verdict: 200 passes; 486 (over the test-call limit) is ``inconclusive``, never a
  pass; 404 fails as ``unsupported_service``.
- :func:`score_identity` judges what the 200 OK reports it received (stage
  ``identity``): the callback number (``cli_missing``, ``cli_mismatch``) and the
  location (``location_missing``, ``location_mismatch``).

Untrusted XML: bodies with a DOCTYPE or entity declaration are refused before
parsing, and bodies over :data:`MAX_BODY` are ignored.
"""

from __future__ import annotations

import math
import re
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Final, Literal
from urllib.parse import unquote
from xml.sax.saxutils import escape

from probes.config import EmergencyShape, Location

MAX_BODY: Final = 64 * 1024

NS: Final[dict[str, str]] = {
    "pidf": "urn:ietf:params:xml:ns:pidf",
    "dm": "urn:ietf:params:xml:ns:pidf:data-model",
    "gp": "urn:ietf:params:xml:ns:pidf:geopriv10",
    "gml": "http://www.opengis.net/gml",
    "gs": "http://www.opengis.net/pidflo/1.0",
    "ca": "urn:ietf:params:xml:ns:pidf:geopriv10:civicAddr",
}
# RFC 5139 civic address elements, in schema order.
CIVIC_ELEMENTS: Final = (
    "country", "A1", "A2", "A3", "A4", "A5", "A6", "PRM", "PRD", "RD", "STS", "POD", "POM",
    "RDSEC", "RDBR", "RDSUBBR", "HNO", "HNS", "LMK", "LOC", "FLR", "NAM", "PC", "BLD",
    "UNIT", "ROOM", "SEAT", "PLC", "PCN", "POBOX", "ADDCODE",
)  # fmt: skip

_COMPACT: Final[Mapping[str, str]] = {
    "c": "content-type",
    "l": "content-length",
    "t": "to",
    "f": "from",
    "i": "call-id",
    "m": "contact",
    "v": "via",
}


# ----------------------------------------------------------------- SIP messages


@dataclass(frozen=True, slots=True)
class SipMessage:
    """A raw SIP message split into start line, headers (lower-case names) and body."""

    start_line: str
    headers: tuple[tuple[str, str], ...]
    body: str

    def header(self, name: str) -> str | None:
        name = name.lower()
        return next((v for k, v in self.headers if k == name), None)

    def header_all(self, name: str) -> list[str]:
        name = name.lower()
        return [v for k, v in self.headers if k == name]

    @property
    def request_uri(self) -> str | None:
        parts = self.start_line.split()
        if len(parts) == 3 and parts[2].upper().startswith("SIP/"):
            return parts[1]
        return None

    @property
    def status(self) -> int | None:
        parts = self.start_line.split(maxsplit=2)
        if len(parts) >= 2 and parts[0].upper().startswith("SIP/") and parts[1].isdigit():
            return int(parts[1])
        return None


def _split_head(text: str) -> tuple[list[str], str]:
    text = text.replace("\r\n", "\n")
    head, sep, body = text.partition("\n\n")
    lines: list[str] = []
    for line in head.split("\n"):
        if line[:1] in (" ", "\t") and lines:  # folded header line
            lines[-1] += " " + line.strip()
        elif line.strip():
            lines.append(line.rstrip())
    return lines, body if sep else ""


def parse_sip_message(text: str) -> SipMessage:
    """Split a raw SIP message; never raises (garbage gives empty fields)."""
    lines, body = _split_head(text)
    start = lines[0] if lines else ""
    headers: list[tuple[str, str]] = []
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep:
            continue
        key = name.strip().lower()
        headers.append((_COMPACT.get(key, key), value.strip()))
    return SipMessage(start, tuple(headers), body)


@dataclass(frozen=True, slots=True)
class BodyPart:
    content_type: str  # lower-case type/subtype, no parameters
    headers: tuple[tuple[str, str], ...]
    body: str

    def header(self, name: str) -> str | None:
        name = name.lower()
        return next((v for k, v in self.headers if k == name), None)


def _media_type(value: str | None) -> tuple[str, dict[str, str]]:
    if not value:
        return "", {}
    main, *params = value.split(";")
    out: dict[str, str] = {}
    for p in params:
        k, sep, v = p.partition("=")
        if sep:
            out[k.strip().lower()] = v.strip().strip('"')
    return main.strip().lower(), out


def body_parts(content_type: str | None, body: str, *, depth: int = 0) -> list[BodyPart]:
    """The leaf parts of a body (multipart/* split recursively, at most 3 levels)."""
    kind, params = _media_type(content_type)
    if not body or len(body) > MAX_BODY:
        return []
    boundary = params.get("boundary")
    if not kind.startswith("multipart/") or not boundary or depth >= 3:
        return [BodyPart(kind, (), body)]
    out: list[BodyPart] = []
    delimiter = "--" + boundary
    text = body.replace("\r\n", "\n")
    chunks = text.split(delimiter)
    for raw in chunks[1:]:
        if raw.startswith("--"):
            break
        chunk = raw.partition("\n")[2]  # the rest of the delimiter line
        lines: list[str]
        if chunk.startswith("\n"):  # no part headers: defaults apply (RFC 2046)
            lines, part_body = [], chunk[1:]
        else:
            lines, part_body = _split_head(chunk)
        headers = tuple(
            (_COMPACT.get(k.strip().lower(), k.strip().lower()), v.strip())
            for k, sep, v in (line.partition(":") for line in lines)
            if sep
        )
        part_type = next((v for k, v in headers if k == "content-type"), "text/plain")
        part_body = part_body.removesuffix("\n")
        for sub in body_parts(part_type, part_body, depth=depth + 1):
            out.append(sub if sub.headers else BodyPart(sub.content_type, headers, sub.body))
    return out


def message_parts(message: SipMessage) -> list[BodyPart]:
    return body_parts(message.header("content-type"), message.body)


# ------------------------------------------------------------------- PIDF-LO


def _fmt(value: float) -> str:
    return f"{value:.6f}".rstrip("0").rstrip(".") if math.isfinite(value) else "0"


def build_pidf_lo(
    location: Location,
    *,
    entity: str = "pres:ecpm-probe@ecpm.invalid",
    timestamp: datetime | None = None,
    method: str = "Manual",
) -> str:
    """A PIDF-LO document: a ``gs:Circle`` (WGS 84) and, when given, a civic address."""
    stamp = (timestamp or datetime.now(UTC)).astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    civic = ""
    if location.civic:
        known = {k.lower(): k for k in CIVIC_ELEMENTS}
        items = sorted(
            ((known.get(k.lower(), k), v) for k, v in location.civic.items()),
            key=lambda kv: CIVIC_ELEMENTS.index(kv[0]) if kv[0] in CIVIC_ELEMENTS else 999,
        )
        inner = "".join(
            f"<ca:{k}>{escape(v)}</ca:{k}>" for k, v in items if re.fullmatch(r"[A-Za-z][A-Za-z0-9]*", k)
        )
        civic = f"\n        <ca:civicAddress>{inner}</ca:civicAddress>"
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f'<presence xmlns="{NS["pidf"]}" xmlns:dm="{NS["dm"]}" xmlns:gp="{NS["gp"]}"'
        f' xmlns:gml="{NS["gml"]}" xmlns:gs="{NS["gs"]}" xmlns:ca="{NS["ca"]}"'
        f' entity="{escape(entity, {chr(34): "&quot;"})}">\n'
        '  <dm:device id="ecpm-probe">\n'
        "    <gp:geopriv>\n"
        "      <gp:location-info>\n"
        '        <gs:Circle srsName="urn:ogc:def:crs:EPSG::4326">\n'
        f"          <gml:pos>{_fmt(location.latitude)} {_fmt(location.longitude)}</gml:pos>\n"
        '          <gs:radius uom="urn:ogc:def:uom:EPSG::9001">'
        f"{_fmt(location.radius_m)}</gs:radius>\n"
        f"        </gs:Circle>{civic}\n"
        "      </gp:location-info>\n"
        "      <gp:usage-rules/>\n"
        f"      <gp:method>{escape(method)}</gp:method>\n"
        "    </gp:geopriv>\n"
        f"    <dm:timestamp>{stamp}</dm:timestamp>\n"
        "  </dm:device>\n"
        "</presence>\n"
    )


@dataclass(frozen=True, slots=True)
class ReceivedLocation:
    latitude: float
    longitude: float
    radius_m: float | None = None
    civic: Mapping[str, str] = field(default_factory=dict)

    def geo_uri(self) -> str:
        """RFC 5870 form, as the NENA-style answer body echoes it."""
        u = "" if self.radius_m is None else f";u={_fmt(self.radius_m)}"
        return f"geo:{_fmt(self.latitude)},{_fmt(self.longitude)}{u}"


_UNSAFE_XML = re.compile(r"<!\s*(DOCTYPE|ENTITY)", re.IGNORECASE)


def parse_pidf_lo(xml: str) -> ReceivedLocation | None:
    """The first point/circle (and civic address) in a PIDF-LO; None if there is none.

    Refuses DTDs and entity declarations (no entity expansion from untrusted input).
    """
    if len(xml) > MAX_BODY or _UNSAFE_XML.search(xml):
        return None
    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        return None
    pos = root.find(".//gml:pos", NS)
    if pos is None or not pos.text:
        return None
    numbers = pos.text.split()
    if len(numbers) < 2:
        return None
    try:
        lat, lon = float(numbers[0]), float(numbers[1])
    except ValueError:
        return None
    if not (math.isfinite(lat) and math.isfinite(lon) and -90 <= lat <= 90 and -180 <= lon <= 180):
        return None
    radius: float | None = None
    rad = root.find(".//gs:radius", NS)
    if rad is not None and rad.text:
        try:
            radius = float(rad.text)
        except ValueError:
            radius = None
    civic: dict[str, str] = {}
    address = root.find(".//ca:civicAddress", NS)
    if address is not None:
        for child in address:
            tag = child.tag.rpartition("}")[2]
            if child.text and child.text.strip():
                civic[tag] = child.text.strip()
    return ReceivedLocation(lat, lon, radius, civic)


def _uri_of(value: str | None) -> str | None:
    """The URI in a To/From/Geolocation header value (inside <> or up to ';')."""
    if not value:
        return None
    m = re.search(r"<([^>]*)>", value)
    return (m.group(1) if m else value.split(";", 1)[0]).strip() or None


def location_in_request(message: SipMessage) -> ReceivedLocation | None:
    """The location an INVITE carries by value: the part its ``Geolocation: <cid:...>``
    points at (RFC 6442), or else the first PIDF-LO part."""
    parts = [p for p in message_parts(message) if p.content_type == "application/pidf+xml"]
    if not parts:
        return None
    wanted: set[str] = set()
    for value in message.header_all("geolocation"):
        for ref in re.findall(r"<\s*cid:([^>]+)>", value, re.IGNORECASE):
            wanted.add(ref.strip().lower())
    chosen = parts[0]
    if wanted:
        for part in parts:
            cid = _uri_of(part.header("content-id")) or ""
            if cid.lower() in wanted:
                chosen = part
                break
    return parse_pidf_lo(chosen.body)


def service_in_request(message: SipMessage) -> str:
    """The service a call asked for: a ``urn:`` Request-URI, else a ``urn:`` To URI
    (after an ESRP rewrote the Request-URI, RFC 6881), else the Request-URI."""
    ruri = message.request_uri or ""
    if ruri.lower().startswith("urn:"):
        return ruri
    to = _uri_of(message.header("to"))
    if to and to.lower().startswith("urn:"):
        return to
    return ruri


# ------------------------------------------------------------- test answers


@dataclass(frozen=True, slots=True)
class ReceivedIdentity:
    """Who the INVITE said was calling, as the answering end received it: its ``From`` and
    ``P-Asserted-Identity`` (RFC 3325) and its ``Geolocation`` header (RFC 6442)."""

    from_: str | None = None
    p_asserted_identity: str | None = None
    geolocation: str | None = None

    @classmethod
    def of(cls, message: SipMessage) -> ReceivedIdentity:
        pai = message.header_all("p-asserted-identity")
        geo = message.header_all("geolocation")
        return cls(message.header("from"), ", ".join(pai) or None, ", ".join(geo) or None)


def format_test_answer(
    answering_point: str,
    service_urn: str,
    location: ReceivedLocation | None,
    identity: ReceivedIdentity | None = None,
) -> str:
    """The ``text/plain`` body of a NENA-style test-call 200 OK: what the call asked for and
    what arrived with it (location and, when given, the caller's identity headers)."""
    lines = [
        f"Answering-Point: {answering_point}",
        f"Service-URN: {service_urn}",
        f"Location: {location.geo_uri() if location else 'none'}",
    ]
    if location and location.civic:
        lines.append("Civic: " + "; ".join(f"{k}={v}" for k, v in location.civic.items()))
    if identity is not None:
        for key, value in (
            ("From", identity.from_),
            ("P-Asserted-Identity", identity.p_asserted_identity),
            ("Geolocation", identity.geolocation),
        ):
            lines.append(f"{key}: {_one_line(value) if value else 'none'}")
    return "\r\n".join(lines) + "\r\n"


def _one_line(value: str) -> str:
    return " ".join(value.split())[:512]


@dataclass(frozen=True, slots=True)
class TestAnswer:
    answering_point: str | None
    service_urn: str | None
    location_text: str | None
    position: tuple[float, float] | None  # (latitude, longitude) when the echo has one
    civic: Mapping[str, str] = field(default_factory=dict)  # the civic address echoed
    from_: str | None = None  # the caller's From as received ("none" reads as None)
    p_asserted_identity: str | None = None
    geolocation: str | None = None


_KEYS: Final[Mapping[str, str]] = {
    "answering-point": "answering_point",
    "answering point": "answering_point",
    "psap": "answering_point",
    "psap-name": "answering_point",
    "service-urn": "service_urn",
    "service urn": "service_urn",
    "service": "service_urn",
    "location": "location",
    "location-received": "location",
    "location received": "location",
    "civic": "civic",
    "from": "from",
    "p-asserted-identity": "pai",
    "geolocation": "geolocation",
}
_NUMBER = r"[-+]?\d{1,3}(?:\.\d+)?"
_POSITION = re.compile(rf"({_NUMBER})\s*[, ]\s*({_NUMBER})")


def parse_test_answer(text: str) -> TestAnswer:
    """Read a test-call answer body: ``Key: value`` lines, case-insensitive keys
    (``Answering-Point``/``PSAP``, ``Service-URN``, ``Location``); the location may be
    a geo URI (``geo:51.5,-0.12;u=50``) or ``lat lon`` / ``lat,lon``."""
    found: dict[str, str] = {}
    for line in text[:MAX_BODY].replace("\r\n", "\n").split("\n"):
        key, sep, value = line.partition(":")
        if not sep:
            continue
        name = _KEYS.get(key.strip().lower())
        if name and name not in found:
            found[name] = value.strip()
    location = found.get("location")
    position: tuple[float, float] | None = None
    if location:
        m = _POSITION.search(location.removeprefix("geo:"))
        if m:
            lat, lon = float(m.group(1)), float(m.group(2))
            if -90 <= lat <= 90 and -180 <= lon <= 180:
                position = (lat, lon)
    civic: dict[str, str] = {}
    for item in found.get("civic", "").split(";"):
        key, sep, value = item.partition("=")
        if sep and key.strip():
            civic[key.strip()] = value.strip()

    def named(key: str) -> str | None:
        value = found.get(key)
        return None if not value or value.lower() == "none" else value

    return TestAnswer(
        found.get("answering_point"), found.get("service_urn"), location, position, civic,
        named("from"), named("pai"), named("geolocation"),
    )  # fmt: skip


def distance_m(a: tuple[float, float], b: tuple[float, float]) -> float:
    """Great-circle distance (haversine, mean Earth radius)."""
    lat1, lon1, lat2, lon2 = map(math.radians, (*a, *b))
    h = math.sin((lat2 - lat1) / 2) ** 2 + math.cos(lat1) * math.cos(lat2) * math.sin((lon2 - lon1) / 2) ** 2
    return 2 * 6_371_008.8 * math.asin(min(1.0, math.sqrt(h)))


def location_matches(sent: Location, echoed: tuple[float, float]) -> bool:
    """The echo is within the uncertainty radius we sent (at least 1 m, for rounding)."""
    return distance_m((sent.latitude, sent.longitude), echoed) <= max(1.0, sent.radius_m)


def test_answer_of(message: SipMessage) -> TestAnswer | None:
    """The NENA-style answer in a response: its first text/plain part, if any."""
    for part in message_parts(message):
        if part.content_type == "text/plain":
            return parse_test_answer(part.body)
    return None


# ----------------------------------------------------------------- scoring


@dataclass(frozen=True, slots=True)
class Score:
    outcome: Literal["pass", "fail", "inconclusive"]
    reason: str | None
    detail: Mapping[str, str]


def score_answer(status: int, message: str | None, shape: EmergencyShape) -> Score:
    """Verdict on the final response to an emergency-shaped INVITE (stage ``answer``).

    200: pass (what arrived with the call is the ``identity`` stage's, :func:`score_identity`).
    486: ``inconclusive``/``test_call_limit``. 404: ``fail``/``unsupported_service``.
    Anything else is not scored here (None reason, outcome ``fail``) and the caller maps
    the status.
    """
    if status == 486:
        return Score("inconclusive", "test_call_limit", {})
    if status == 404:
        return Score("fail", "unsupported_service", {})
    if not 200 <= status < 300:
        return Score("fail", None, {})
    answer = test_answer_of(parse_sip_message(message)) if message else None
    detail: dict[str, str] = {}
    if answer is not None:
        for key, value in (
            ("nena.answering_point", answer.answering_point),
            ("nena.service_urn", answer.service_urn),
            ("nena.location", answer.location_text),
        ):
            if value:
                detail[key] = value[:256]
    return Score("pass", None, detail)


def expects_identity(shape: EmergencyShape) -> bool:
    """The answer must report what arrived: a callback number, or a location to echo."""
    return shape.callback_number is not None or (shape.location is not None and shape.expect_location_echo)


def numbers_in(value: str | None) -> list[str]:
    """The telephone numbers (digits, no ``+``) in a From / P-Asserted-Identity value: the
    user part of each ``sip:``/``sips:`` URI, or a ``tel:`` URI's number."""
    if not value:
        return []
    uris = re.findall(r"<([^>]*)>", value) or [v.split(";", 1)[0] for v in value.split(",")]
    found: list[str] = []
    for uri in uris:
        scheme, _, rest = uri.strip().partition(":")
        if scheme.lower() == "tel":
            user = rest.split(";", 1)[0]
        elif scheme.lower() in ("sip", "sips") and "@" in rest:
            user = rest.split("@", 1)[0].split(";", 1)[0]
        else:
            continue
        digits = re.sub(r"[-.() ]", "", unquote(user)).removeprefix("+")
        if re.fullmatch(r"[0-9]{3,20}", digits):
            found.append(digits)
    return found


def _civic_mismatch(sent: Mapping[str, str], echoed: Mapping[str, str]) -> list[str]:
    """The civic elements sent that came back different (compared without case and spacing)."""
    norm = {k.lower(): " ".join(v.split()).lower() for k, v in echoed.items()}
    return [k for k, v in sent.items() if norm.get(k.lower()) != " ".join(v.split()).lower()]


def score_identity(message: str | None, shape: EmergencyShape) -> Score:
    """Verdict on what the answering end reports it received (stage ``identity``).

    The callback number must be in the reported P-Asserted-Identity (else From):
    ``cli_missing`` when neither carries a number, ``cli_mismatch`` when it is another.
    The location: ``location_missing`` without a reported position, ``location_mismatch``
    when it is farther than our uncertainty radius (at least 1 m) or a reported civic
    address differs from the one sent.
    """
    answer = test_answer_of(parse_sip_message(message)) if message else None
    detail: dict[str, str] = {}
    if shape.callback_number is not None:
        reported = (answer.p_asserted_identity or answer.from_) if answer is not None else None
        detail["identity.cli"] = _one_line(reported) if reported else "none"
        numbers = numbers_in(reported)
        if not numbers:
            return Score("fail", "cli_missing", detail)
        if shape.callback_number.removeprefix("+") not in numbers:
            return Score("fail", "cli_mismatch", detail)
    if shape.location is None or not shape.expect_location_echo:
        return Score("pass", None, detail)
    if answer is None or answer.position is None:
        return Score("fail", "location_missing", detail)
    sent = shape.location
    if not location_matches(sent, answer.position):
        error = distance_m((sent.latitude, sent.longitude), answer.position)
        detail["nena.location_error_m"] = f"{error:.1f}"
        return Score("fail", "location_mismatch", detail)
    if sent.civic and answer.civic and (changed := _civic_mismatch(sent.civic, answer.civic)):
        detail["identity.civic_changed"] = ",".join(changed)[:256]
        return Score("fail", "location_mismatch", detail)
    return Score("pass", None, detail)


def emergency_headers(shape: EmergencyShape, content_id: str | None) -> list[tuple[str, str]]:
    """Extra INVITE headers of an emergency-shaped request."""
    headers: list[tuple[str, str]] = []
    if shape.p_asserted_identity:
        pai = shape.p_asserted_identity.strip()
        headers.append(("P-Asserted-Identity", pai if pai.startswith("<") or " " in pai else f"<{pai}>"))
    elif shape.callback_number:
        headers.append(("P-Asserted-Identity", f"<tel:{shape.callback_number}>"))
    if shape.resource_priority:
        headers.append(("Resource-Priority", shape.resource_priority))
    if content_id is not None:
        headers.append(("Geolocation", f"<cid:{content_id}>"))
        headers.append(("Geolocation-Routing", "yes"))
    return headers
