"""The live-number guard: no code path may dial a live emergency number.

One function, :func:`check_dial_target`, decides whether a dial target may be
called. It is pure, deny-by-default and raises :class:`GuardRefusal` with a bounded
reason code; :class:`Guard` wraps it for a probe (home region, extra dial prefixes),
logs every refusal and counts it by reason. It runs twice for every call: when the
config is loaded and inside the one function that hands a URI to pjsua2.

What it refuses (``docs/safety.md`` says why):

- ``emergency_number``: any way of writing the target dials, or starts with, an
  emergency number. The data is libphonenumber's short-number metadata for every
  region (the ``phonenumbers`` package, never a hand-typed list) plus a universal
  core (:data:`UNIVERSAL_EMERGENCY_NUMBERS`) refused everywhere. Prefix matching
  applies in every region (stricter than libphonenumber, which demands exact
  matches in BR, CL and NI and ignores numbers that start with ``+``).
- ``sos_service``: ``urn:service:sos`` and its sub-services, anywhere in the
  target, and ``sos``/``emergency``-like user names. ``urn:service:test.sos`` and
  its sub-services are the RFC 6881 test service and are allowed.
- ``unsupported_uri``: empty, unparseable, unknown schemes, other URNs, name-addr
  forms, nested encodings or targets too long or too convoluted to judge.
- ``undeclared``: the target was not declared a test endpoint.

How a target is judged: the dial part (a ``sip:``/``sips:`` user part, a ``tel:``
number, a bare dial string, or a SIP host when there is no user) is decoded at
every percent-encoding level and Unicode-normalised; visual separators, pauses and
control characters are dropped. From the resulting dial string a bounded
breadth-first search derives every candidate digit string a switch might act on:
stripping PBX access and CLI prefixes (:data:`DEFAULT_DIAL_PREFIXES` and any
``*``/``#`` service code), carrier selection codes, international prefixes
(``+``, ``00`` and the regions' own) followed by a country code, national trunk
prefixes, everything up to a ``+``, ``*``, ``#`` or DTMF ``A``-``D``, and all
non-digits. Each candidate is judged against
the regions it belongs to (the home region, or every region of the country code
it was dialled under) and against the universal core. Any hit refuses the target.
"""

from __future__ import annotations

import functools
import ipaddress
import logging
import re
import threading
import unicodedata
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Final, NoReturn
from urllib.parse import unquote

import phonenumbers
from phonenumbers import PhoneMetadata

from ecpm.errors import EcpmError

__all__ = [
    "DEFAULT_DIAL_PREFIXES",
    "PHONENUMBERS_VERSION",
    "REASONS",
    "UNIVERSAL_EMERGENCY_NUMBERS",
    "CarrierTestService",
    "Guard",
    "GuardRefusal",
    "check_dial_target",
]

logger = logging.getLogger(__name__)

PHONENUMBERS_VERSION: Final[str] = str(phonenumbers.__version__)

# Refused in every region, exactly or as a prefix, on top of the metadata.
UNIVERSAL_EMERGENCY_NUMBERS: tuple[str, ...] = ("000", "110", "112", "119", "911", "999")

# PBX access codes and calling-line-identity prefixes a switch may strip before
# routing; stripped repeatedly and in any order. Any other leading ``*``/``#``
# service code (``*82``, ``*31*``, ``##002#``) is stripped as well. A probe's own
# prefixes extend this list; they never replace it.
DEFAULT_DIAL_PREFIXES: tuple[str, ...] = (
    "9",  # PBX outside line (GB, US, ...)
    "0",  # PBX outside line (DE, ...) and trunk prefix in many regions
    "8",  # outside line / trunk prefix (RU, BY, ...)
    "141",  # GB: withhold CLI
    "142",  # IE: withhold CLI
    "1470",  # GB: release CLI
    "1471",  # GB: last-caller service, dialled by mistake as a prefix
    "1831",  # AU: withhold CLI
    "1832",  # AU: release CLI
    "3651",  # FR: withhold CLI
    "0197",  # NZ: withhold CLI
    "1167",  # US: withhold CLI (rotary form of *67)
    "*67",  # NANP: withhold CLI
    "*82",  # NANP: release CLI
    "#31#",  # GSM: withhold CLI for this call
    "*31#",  # GSM: release CLI for this call
    "*31*",
    "#31*",
)

# Bounded reason codes (the ``reason`` label of the refusal counter).
REASONS: tuple[str, ...] = ("undeclared", "emergency_number", "sos_service", "unsupported_uri")

_MAX_URI_CHARS: Final = 2048
_MAX_DIAL_CHARS: Final = 64
_MAX_DECODINGS: Final = 3
_MAX_STATES: Final = 5000
_MAX_INTL_PREFIX: Final = 10

_SCHEME_RE: Final = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*:")
_NAME_ADDR_RE: Final = re.compile(r'(?:"(?:[^"\\]|\\.)*"|[^<"]*)\s*<(?P<uri>[^<>]*)>\s*', re.DOTALL)
_TEST_SOS_RE: Final = re.compile(r"(?:urn:service:)?test\.sos(?:\.[a-z0-9][a-z0-9\-]*)*")
_WORD_RE: Final = re.compile(r"[a-z]+")
_NON_DIGITS_RE: Final = re.compile(r"\D", re.ASCII)
_SERVICE_CODE_RE: Final = re.compile(r"[*#]{1,2}[0-9]{0,4}[*#]{0,2}")
_PASSWORD_RE: Final = re.compile(r"^(\s*sips?:[^:@;?]*):[^@]*@", re.IGNORECASE)
_PLAIN_DIGITS_RE: Final = re.compile(r"[0-9]+")

# DTMF A-D are dial characters too (RFC 3966 phonedigit-hex); '+' starts a global number.
_DIAL_CHARS: Final = frozenset("0123456789*#+ABCD")
_DTMF_LETTERS: Final = {"a": "A", "b": "B", "c": "C", "d": "D"}
# Carrier selection / dial-around codes dialled before a number: NANP 101XXXX,
# DE call-by-call 010XX and 0100XX, and the 10XX(X) codes of AT, CH, ES, IT and others.
_CARRIER_SELECTION_RE: Final = re.compile(r"101[0-9]{4}|0100?[0-9]{2}|10[0-9]{2,3}")
# RFC 3966 visual separators, libphonenumber's punctuation, pauses, and characters a
# gateway may drop silently. They never end a dial string.
_IGNORED_CHARS: Final = frozenset("-.()[]/~ \t,pPwW\ufffd\u30fc\uff0f\u2053\u223c\uff5e")
_IGNORED_CATEGORIES: Final = frozenset({"Cc", "Cf", "Zs", "Zl", "Zp", "Pd", "Ps", "Pe"})


class GuardRefusal(EcpmError):
    """A dial target was refused: it is, or may reach, a live emergency service.

    ``reason`` is one of :data:`REASONS`; ``detail`` is one human sentence.
    """

    def __init__(self, uri: str, reason: str, detail: str) -> None:
        self.uri = uri
        self.reason = reason
        self.detail = detail
        super().__init__(detail)

    def __reduce__(self) -> tuple[type[GuardRefusal], tuple[str, str, str]]:
        return (type(self), (self.uri, self.reason, self.detail))


# --------------------------------------------------------------------------- data


@functools.cache
def _known_regions() -> frozenset[str]:
    return frozenset(phonenumbers.SUPPORTED_REGIONS) | frozenset(phonenumbers.SUPPORTED_SHORT_REGIONS)


def _validate_region(region: object, what: str) -> str:
    if not isinstance(region, str) or region not in _known_regions():
        hint = ""
        if isinstance(region, str) and region.upper() in _known_regions():
            hint = f" (write {region.upper()!r}: region codes are uppercase)"
        raise ValueError(
            f"{what} {region!r} is not a known region code{hint}; "
            "use an uppercase ISO 3166 code known to libphonenumber, such as 'GB' or 'US'"
        )
    return region


@functools.cache
def _emergency_patterns(region: str) -> tuple[str, ...]:
    """The region's emergency-number patterns from the short-number metadata."""
    metadata = PhoneMetadata.short_metadata_for_region(region, None)
    if metadata is None:
        return ()
    patterns = []
    for attr in ("emergency", "expanded_emergency"):
        desc = getattr(metadata, attr, None)
        pattern = getattr(desc, "national_number_pattern", None) if desc is not None else None
        if pattern:
            patterns.append(str(pattern))
    return tuple(patterns)


@functools.cache
def _country_codes() -> dict[str, frozenset[str]]:
    return {
        str(code): frozenset(regions) for code, regions in phonenumbers.COUNTRY_CODE_TO_REGION_CODE.items()
    }


def _compile_alternatives(patterns: Iterable[str]) -> re.Pattern[str] | None:
    unique = sorted(set(patterns))
    if not unique:
        return None
    return re.compile("|".join(f"(?:{p})" for p in unique), re.ASCII)


@dataclass(frozen=True, slots=True)
class _Context:
    """Everything the search needs about a set of regions, compiled once."""

    regions: frozenset[str]
    emergency: re.Pattern[str]  # the regions' patterns and the universal core
    trunk_prefixes: tuple[str, ...]
    trunk_patterns: tuple[re.Pattern[str], ...]
    intl: re.Pattern[str]  # '00' and the regions' international prefixes


@functools.cache
def _context(regions: frozenset[str]) -> _Context:
    emergency: list[str] = [re.escape(n) for n in UNIVERSAL_EMERGENCY_NUMBERS]
    trunk_prefixes: set[str] = set()
    trunk_patterns: set[str] = set()
    intl: list[str] = ["00"]
    for region in sorted(regions):
        emergency.extend(_emergency_patterns(region))
        metadata = PhoneMetadata.metadata_for_region(region, None)
        if metadata is None:
            continue
        prefix = metadata.national_prefix
        if prefix and _PLAIN_DIGITS_RE.fullmatch(prefix):
            trunk_prefixes.add(str(prefix))
        if metadata.national_prefix_for_parsing:
            trunk_patterns.add(str(metadata.national_prefix_for_parsing))
        for attr in ("international_prefix", "preferred_international_prefix"):
            value = getattr(metadata, attr, None)
            if value and re.fullmatch(r"[0-9()|?:\[\]\-\\d]+", value):
                intl.append(str(value))
    emergency_re = _compile_alternatives(emergency)
    intl_re = _compile_alternatives(intl)
    assert emergency_re is not None and intl_re is not None  # both lists are non-empty
    return _Context(
        regions=regions,
        emergency=emergency_re,
        trunk_prefixes=tuple(sorted(trunk_prefixes)),
        trunk_patterns=tuple(re.compile(p, re.ASCII) for p in sorted(trunk_patterns)),
        intl=intl_re,
    )


@functools.cache
def _region_pattern(region: str) -> re.Pattern[str] | None:
    return _compile_alternatives(_emergency_patterns(region))


@functools.cache
def _core_pattern() -> re.Pattern[str]:
    pattern = _compile_alternatives(re.escape(n) for n in UNIVERSAL_EMERGENCY_NUMBERS)
    assert pattern is not None
    return pattern


@functools.cache
def _effective_prefixes(extra: tuple[str, ...]) -> tuple[str, ...]:
    prefixes = list(DEFAULT_DIAL_PREFIXES)
    for prefix in extra:
        if not isinstance(prefix, str) or not prefix or set(prefix) - set("0123456789*#"):
            raise ValueError(f"dial prefix {prefix!r} must be a non-empty string of digits, '*' and '#'")
        if prefix not in prefixes:
            prefixes.append(prefix)
    return tuple(prefixes)


def _prefixes(dial_prefixes: Sequence[str]) -> tuple[str, ...]:
    if isinstance(dial_prefixes, str):
        raise ValueError("dial_prefixes must be a sequence of prefixes, not one string")
    return _effective_prefixes(tuple(dial_prefixes))


# ------------------------------------------------------------------ normalising


def _dial_chars(text: str) -> tuple[str, bool]:
    """The leading dial string of ``text`` and whether it is all of ``text``.

    Unicode is NFKC-normalised and any decimal digit becomes ASCII; separators,
    pauses, whitespace and control characters are dropped.
    """
    out: list[str] = []
    for ch in unicodedata.normalize("NFKC", text):
        if ch in _DIAL_CHARS:
            out.append(ch)
            continue
        if ch in _DTMF_LETTERS:
            out.append(_DTMF_LETTERS[ch])
            continue
        digit = unicodedata.decimal(ch, None)
        if digit is not None:
            out.append(str(digit))
        elif ch in _IGNORED_CHARS or unicodedata.category(ch) in _IGNORED_CATEGORIES:
            continue
        else:
            return "".join(out), False
    return "".join(out), True


def _decodings(text: str) -> list[str] | None:
    """``text`` at every percent-decoding level; None if nested too deep."""
    levels = [text]
    for _ in range(_MAX_DECODINGS):
        decoded = unquote(levels[-1])
        if decoded == levels[-1]:
            return levels
        levels.append(decoded)
    return levels if unquote(levels[-1]) == levels[-1] else None


def _sos_word(text: str) -> str | None:
    """The sos/emergency word in ``text``, if it asks for an emergency service."""
    folded = unicodedata.normalize("NFKC", text).casefold()
    squeezed = "".join(ch for ch in folded if ch.isalnum() or ch in ":.")
    if "urn:service:sos" in squeezed:
        return "urn:service:sos"
    if _TEST_SOS_RE.fullmatch(folded.strip()):
        return None
    joined = "".join(ch for ch in folded if ch.isalnum())
    words: list[str] = [*_WORD_RE.findall(folded), *_WORD_RE.findall(joined)]
    for word in words:
        if word == "sos" or word.startswith("emergenc"):
            return word
    return None


def _display(uri: str) -> str:
    """The URI for a log line: password hidden, control characters escaped, bounded."""
    shown = _PASSWORD_RE.sub(r"\1:***@", uri)
    if len(shown) > 200:
        shown = shown[:200] + "..."
    return repr(shown)


# ------------------------------------------------------------------ the search


class _TooComplex(Exception):
    pass


@dataclass(frozen=True, slots=True)
class _Hit:
    candidate: str
    matched: str
    where: str  # a region code, or "" for the universal core


def _successors(
    state: str, regions: frozenset[str], home_intl: re.Pattern[str], prefixes: tuple[str, ...]
) -> Iterator[tuple[str, frozenset[str]]]:
    ctx = _context(regions)
    # Everything after a '+': the international form, judged in the country code's regions.
    codes = _country_codes()
    for i, ch in enumerate(state):
        if ch == "+":
            rest = state[i + 1 :]
            yield rest, regions
            for width in (1, 2, 3):
                code = rest[:width]
                if len(code) == width and code.isdigit() and code in codes:
                    yield rest[width:], codes[code]
        elif ch in "*#ABCD":
            yield state[i + 1 :], regions
    # A leading '*'/'#' service code of any shape.
    if state[:1] in ("*", "#"):
        for end in range(1, min(len(state), 9) + 1):
            if _SERVICE_CODE_RE.fullmatch(state, 0, end):
                yield state[end:], regions
    # PBX access and CLI prefixes, carrier selection codes.
    for prefix in prefixes:
        if state.startswith(prefix):
            yield state[len(prefix) :], regions
    for end in range(4, min(len(state), 7) + 1):
        if _CARRIER_SELECTION_RE.fullmatch(state, 0, end):
            yield state[end:], regions
    # International prefixes ('00', the home region's and the context's own).
    for intl in (ctx.intl, home_intl) if ctx.intl is not home_intl else (ctx.intl,):
        for end in range(1, min(len(state), _MAX_INTL_PREFIX) + 1):
            if intl.fullmatch(state, 0, end):
                yield "+" + state[end:], regions
    # National trunk prefixes.
    for trunk in ctx.trunk_prefixes:
        if state.startswith(trunk):
            yield state[len(trunk) :], regions
    for pattern in ctx.trunk_patterns:
        match = pattern.match(state)
        if match is not None and match.end() > 0:
            yield state[match.end() :], regions
    # The digits alone.
    digits = _NON_DIGITS_RE.sub("", state)
    if digits != state:
        yield digits, regions


def _region_order(regions: frozenset[str], home: str) -> list[str]:
    """The home region first, then the country code's main region, then the rest."""

    def key(region: str) -> tuple[bool, bool, str]:
        code = phonenumbers.country_code_for_region(region)
        return (region != home, region != phonenumbers.region_code_for_country_code(code), region)

    return sorted(regions, key=key)


def _explain(candidate: str, regions: frozenset[str], home: str, *, exact: bool) -> _Hit:
    for region in _region_order(regions, home):
        pattern = _region_pattern(region)
        if pattern is None:
            continue
        match = pattern.fullmatch(candidate) if exact else pattern.match(candidate)
        if match is not None:
            return _Hit(candidate, match.group(0), region)
    core = _core_pattern()
    match = core.fullmatch(candidate) if exact else core.match(candidate)
    assert match is not None  # the context pattern matched, so one of its parts does
    return _Hit(candidate, match.group(0), "")


def _search(
    starts: Iterable[tuple[str, frozenset[str]]],
    home: str,
    prefixes: tuple[str, ...],
    *,
    exact: bool = False,
) -> _Hit | None:
    """Breadth-first over every derivable candidate; the first emergency hit."""
    home_intl = _context(frozenset((home,))).intl
    queue = deque(starts)
    seen: set[tuple[str, frozenset[str]]] = set(queue)
    while queue:
        state, regions = queue.popleft()
        if state:
            pattern = _context(regions).emergency
            found = pattern.fullmatch(state) if exact else pattern.match(state)
            if found is not None:
                return _explain(state, regions, home, exact=exact)
        for successor in _successors(state, regions, home_intl, prefixes):
            if successor not in seen:
                if len(seen) >= _MAX_STATES:
                    raise _TooComplex
                seen.add(successor)
                queue.append(successor)
    return None


# --------------------------------------------------------------------- opt-in


@dataclass(frozen=True, slots=True)
class CarrierTestService:
    """A carrier's named emergency *test* service (e.g. ``CarrierTestService("933", "US")``).

    Lets exactly this digit string through when it is dialled as a bare national
    number by a probe whose home region is ``region``. It may never name a number
    that dials, exactly, an emergency number of that region or the universal core
    (after any stripping of prefixes), nor one that starts with such a number as
    written; construction raises ValueError.
    """

    number: str
    region: str

    def __post_init__(self) -> None:
        _validate_region(self.region, "CarrierTestService region")
        if not isinstance(self.number, str):
            raise ValueError(f"CarrierTestService number {self.number!r} must be a string")
        digits, complete = _dial_chars(self.number)
        if not complete or not digits or set(digits) - set("0123456789*#"):
            raise ValueError(
                f"CarrierTestService number {self.number!r} must be a national dial string "
                "(digits, '*', '#'; no '+' and no letters)"
            )
        try:
            hit = _search(
                [(digits, frozenset((self.region,)))],
                self.region,
                DEFAULT_DIAL_PREFIXES,
                exact=True,
            )
        except _TooComplex:
            raise ValueError(
                f"CarrierTestService number {self.number!r} is too convoluted to judge"
            ) from None
        if hit is not None:
            raise ValueError(
                f"CarrierTestService({self.number!r}, {self.region!r}) dials {hit.candidate}, "
                f"an emergency number {_where(hit)}; an opt-in may only name a carrier's "
                "test service, never a live emergency number"
            )
        # A switch routes as soon as the digits it has collected are an emergency
        # number, so the number as dialled may not even start with one.
        start = _context(frozenset((self.region,))).emergency.match(digits)
        if start is not None:
            raise ValueError(
                f"CarrierTestService({self.number!r}, {self.region!r}) starts with "
                f"{start.group(0)}, an emergency number in {self.region} or the universal "
                "core; a switch would connect it to the emergency service"
            )

    @property
    def digits(self) -> str:
        """The number as a bare dial string (separators removed)."""
        return _dial_chars(self.number)[0]


def _where(hit: _Hit) -> str:
    if hit.where:
        return f"in {hit.where}"
    return "in every region (universal core)"


# ------------------------------------------------------------------ the judge


class _Judge:
    """One evaluation of one target. Raises GuardRefusal on the first problem."""

    def __init__(
        self,
        uri: str,
        home: str,
        prefixes: tuple[str, ...],
        carrier_test_service: CarrierTestService | None,
    ) -> None:
        self.uri = uri
        self.home = home
        self.home_ctx = frozenset((home,))
        self.prefixes = prefixes
        self.opt_in = carrier_test_service

    def refuse(self, reason: str, detail: str) -> NoReturn:
        raise GuardRefusal(self.uri, reason, f"{_display(self.uri)} {detail}")

    # -- entry

    def run(self) -> None:
        text = self.uri.strip()
        if not text:
            self.refuse("unsupported_uri", "is empty")
        if len(self.uri) > _MAX_URI_CHARS:
            self.refuse("unsupported_uri", f"is longer than {_MAX_URI_CHARS} characters")
        name_addr = _NAME_ADDR_RE.fullmatch(text)
        if name_addr is not None:
            # Judge what is inside for the most telling reason, then refuse the form.
            self._dispatch(name_addr["uri"].strip())
            self.refuse("unsupported_uri", "is a name-addr; give the bare URI")
        self._dispatch(text)

    def _dispatch(self, text: str) -> None:
        scheme_match = _SCHEME_RE.match(text)
        if scheme_match is None:
            self._bare(text)
            return
        scheme = scheme_match.group(0)[:-1].lower()
        rest = text[scheme_match.end() :]
        if scheme in ("sip", "sips"):
            self._sip(rest)
        elif scheme == "tel":
            self._tel(rest)
        elif scheme == "urn":
            self._urn(text)
        else:
            self._names(text)
            self.refuse("unsupported_uri", f"has the unsupported scheme {scheme!r}")

    # -- forms

    def _levels(self, text: str) -> list[str]:
        levels = _decodings(text)
        if levels is None:
            self.refuse("unsupported_uri", "is percent-encoded more deeply than a switch would")
        return levels

    def _bare(self, text: str) -> None:
        for level in self._levels(text):
            self._check_sos(level)
            self._dial(level, ())
            digits, complete = _dial_chars(level)
            if not (complete and any(ch.isdigit() for ch in digits)):
                self.refuse("unsupported_uri", "is neither a sip:, sips:, tel: or urn: URI nor a dial string")

    def _sip(self, rest: str) -> None:
        at = rest.find("@")
        if at < 0:
            hostport = re.split(r"[;?]", rest, maxsplit=1)[0]
            if not hostport.strip():
                self.refuse("unsupported_uri", "has no user part and no host")
            if _is_ip_hostport(hostport):
                return
            for level in self._levels(hostport):
                self._check_sos(level)
                self._dial(level, ())
            return
        userinfo, host = rest[:at], rest[at + 1 :]
        for level in self._levels(userinfo):
            # 'urn:service:sos' as a user part is split by its ':' into user and password.
            squeezed = "".join(unicodedata.normalize("NFKC", level).casefold().split())
            if "urn:service:sos" in squeezed:
                self.refuse("sos_service", "asks for the emergency service 'urn:service:sos'")
        user = userinfo.split(":", 1)[0]
        if not user.strip():
            self.refuse("unsupported_uri", "has an empty user part")
        for level in self._levels(user):
            self._subscriber(level)
        if not re.split(r"[;?]", host, maxsplit=1)[0].strip():
            self.refuse("unsupported_uri", "has no host")

    def _tel(self, rest: str) -> None:
        if not rest.strip():
            self.refuse("unsupported_uri", "has an empty tel: number")
        for level in self._levels(rest):
            self._subscriber(level)

    def _urn(self, text: str) -> None:
        levels = [
            "".join(unicodedata.normalize("NFKC", level).casefold().split()) for level in self._levels(text)
        ]
        for level in levels:
            if level.startswith("urn:service:test."):
                continue  # the test service, or unsupported below; never a live one
            if level.startswith("urn:service:sos") or _sos_word(level) is not None:
                self.refuse("sos_service", f"asks for the emergency service {level!r}")
        for level in levels:
            if not (level.startswith("urn:service:") and _TEST_SOS_RE.fullmatch(level)):
                self.refuse(
                    "unsupported_uri",
                    "is a URN other than urn:service:test.sos and its sub-services",
                )

    # -- parts

    def _subscriber(self, text: str) -> None:
        """A SIP user part or tel: body: ``number;param=value;...``."""
        number, *params = text.split(";")
        self._check_sos(number)
        contexts: list[str] = []
        extras: list[str] = []
        for param in params:
            name, _, value = param.partition("=")
            self._check_sos(param)
            key = name.strip().lower()
            if key == "phone-context":
                contexts.append(value)
            elif key in ("ext", "isub", "postd"):
                extras.append(value)
        self._dial(number, contexts)
        for extra in extras:
            self._dial(extra, contexts)

    def _check_sos(self, text: str) -> None:
        word = _sos_word(text)
        if word is not None:
            self.refuse("sos_service", f"asks for the emergency service {word!r}")

    def _names(self, text: str) -> None:
        for level in _decodings(text) or [text]:
            self._check_sos(level)

    def _dial(self, text: str, contexts: Sequence[str]) -> None:
        """Judge the dial string at the start of ``text`` (all of it, if it is one)."""
        digits, complete = _dial_chars(text)
        if not digits:
            return
        if len(digits) > _MAX_DIAL_CHARS:
            self._dial(digits[:_MAX_DIAL_CHARS], contexts)  # the most telling reason first
            self.refuse("unsupported_uri", f"has a dial string longer than {_MAX_DIAL_CHARS}")
        starts: list[tuple[str, frozenset[str]]] = []
        foreign_context = False
        for context in contexts:
            context_digits, context_complete = _dial_chars(context)
            if not context_digits.startswith("+"):
                continue  # a domain: the number is judged in the home region
            foreign_context = True
            national = context_digits[1:]
            if not context_complete or not national.isdigit():
                self.refuse("unsupported_uri", f"has an unparseable phone-context {context!r}")
            starts.append(("+" + national + digits.lstrip("+"), self.home_ctx))
            codes = _country_codes()
            for width in (1, 2, 3):
                if national[:width] in codes:
                    starts.append((digits, codes[national[:width]]))
        starts.append((digits, self.home_ctx))  # deny on doubt: a switch may ignore the context
        if (
            self.opt_in is not None
            and complete
            and not foreign_context
            and self.opt_in.region == self.home
            and digits == self.opt_in.digits
        ):
            self._opt_in_still_safe()
            return
        try:
            hit = _search(starts, self.home, self.prefixes)
        except _TooComplex:
            self.refuse("unsupported_uri", "is too convoluted to judge")
        if hit is not None:
            dials = f"dials {hit.candidate}"
            if hit.matched != hit.candidate:
                dials += f", which starts with {hit.matched}"
            self.refuse("emergency_number", f"{dials}, an emergency number {_where(hit)}")

    def _opt_in_still_safe(self) -> None:
        """Re-check the opt-in against this guard's prefixes (they may extend the defaults)."""
        assert self.opt_in is not None
        try:
            hit = _search([(self.opt_in.digits, self.home_ctx)], self.home, self.prefixes, exact=True)
        except _TooComplex:
            self.refuse("unsupported_uri", "is too convoluted to judge")
        if hit is not None:
            self.refuse(
                "emergency_number",
                f"dials {hit.candidate}, an emergency number {_where(hit)}, "
                "which no carrier test service opt-in may allow",
            )


def _is_ip_hostport(hostport: str) -> bool:
    host = hostport.strip()
    if host.startswith("["):
        host = host[1 : host.find("]")] if "]" in host else host
    elif host.count(":") == 1:
        host = host.split(":", 1)[0]
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


# --------------------------------------------------------------------- public


def check_dial_target(
    uri: str,
    *,
    declared_test_endpoint: bool,
    home_region: str,
    dial_prefixes: Sequence[str] = DEFAULT_DIAL_PREFIXES,
    carrier_test_service: CarrierTestService | None = None,
) -> None:
    """Return if ``uri`` may be dialled; raise :class:`GuardRefusal` if not.

    ``home_region`` is the probe's region (uppercase, e.g. ``"GB"``): national
    numbers are judged there. ``dial_prefixes`` extend :data:`DEFAULT_DIAL_PREFIXES`
    (they never replace it). ``carrier_test_service`` lets exactly one named carrier
    test number through in its own region. What the target is matters more than
    whether it was declared: an undeclared emergency number is refused as
    ``emergency_number``. Raises ValueError for an invalid region or prefix.
    """
    home = _validate_region(home_region, "home region")
    prefixes = _prefixes(dial_prefixes)
    _Judge(uri, home, prefixes, carrier_test_service).run()
    if declared_test_endpoint is not True:
        raise GuardRefusal(uri, "undeclared", f"{_display(uri)} is not declared as a test endpoint")


class Guard:
    """A probe's guard: its home region and prefixes; logs and counts refusals.

    ``dial_prefixes`` extend :data:`DEFAULT_DIAL_PREFIXES`. Thread-safe: the config
    loader and the pjsua2 thread may both call :meth:`check`. Each refusal is logged
    at WARNING (the record carries ``guard_reason`` and ``guard_target``) and counted
    in :attr:`refusals` by reason.
    """

    def __init__(self, *, home_region: str, dial_prefixes: Sequence[str] = DEFAULT_DIAL_PREFIXES) -> None:
        self._home = _validate_region(home_region, "home region")
        self._prefixes = _prefixes(dial_prefixes)
        self._lock = threading.Lock()
        self._refusals = dict.fromkeys(REASONS, 0)

    @property
    def home_region(self) -> str:
        return self._home

    @property
    def dial_prefixes(self) -> tuple[str, ...]:
        """The prefixes in force: the defaults and this probe's own."""
        return self._prefixes

    def check(
        self,
        uri: str,
        *,
        target: str,
        declared_test_endpoint: bool,
        carrier_test_service: CarrierTestService | None = None,
    ) -> None:
        """Like :func:`check_dial_target`; a refusal is logged and counted, then re-raised."""
        try:
            check_dial_target(
                uri,
                declared_test_endpoint=declared_test_endpoint,
                home_region=self._home,
                dial_prefixes=self._prefixes,
                carrier_test_service=carrier_test_service,
            )
        except GuardRefusal as refusal:
            with self._lock:
                self._refusals[refusal.reason] = self._refusals.get(refusal.reason, 0) + 1
            logger.warning(
                "guard refused %s (target %s): %s",
                _display(uri),
                target,
                refusal.detail,
                extra={"guard_reason": refusal.reason, "guard_target": target},
            )
            raise

    @property
    def refusals(self) -> dict[str, int]:
        """Refusals so far by reason; every reason is present (zero until it happens)."""
        with self._lock:
            return dict(self._refusals)
