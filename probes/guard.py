"""The live-number guard: no code path may dial a live emergency number.

One function, :func:`check_dial_target`, decides whether a dial target may be
called. It is pure, deny-by-default and raises :class:`GuardRefusal` with a bounded
reason code; :class:`Guard` wraps it for a probe (home region, extra dial prefixes),
logs every refusal and counts it by reason. It runs twice for every call: when the
config is loaded and inside the one function that hands a URI to pjsua2.

What it refuses (``docs/safety.md`` says why):

- ``emergency_number``: any reading of the target dials, or starts with, an
  emergency number. The data is libphonenumber's short-number metadata for every
  region (the ``phonenumbers`` package) plus a supplementary table with a source per
  row (:mod:`probes.emergency_numbers`) and a universal core
  (:data:`UNIVERSAL_EMERGENCY_NUMBERS`) refused everywhere. Prefix matching applies in
  every region (stricter than libphonenumber, which demands exact matches in BR, CL
  and NI and ignores numbers that start with ``+``).
- ``sos_service``: ``urn:service:sos`` and its sub-services, anywhere in the
  target, and ``sos``/``emergency``-like user names. ``urn:service:test.sos`` and
  its sub-services are the RFC 6881 test service and are allowed.
- ``unreadable``: deny on doubt — a number (a user part without name letters, a
  ``tel:`` body, an ``ext``) that is not a plain dial string, because some switch
  may read it as another number.
- ``unsupported_uri``: empty, unparseable, unknown schemes, other URNs, name-addr
  forms, nested encodings or targets too long or too convoluted to judge.
- ``undeclared``: the target was not declared a test endpoint.

How a target is read (deny on doubt: the most permissive switch decides): at every
percent-decoding level, a character with a digit value in any script is that digit
(with and without NFKC), ``*``, ``#``, ``+`` and DTMF ``A``-``D`` are dial
characters, and every other character is a separator, whatever its Unicode
category. Only ASCII letters other than DTMF ``A``-``D`` and the pauses ``p``,
``w``, ``x`` make a user part a name; a name's digits are read run by run. The whole
user part, its number, every ``;``-parameter, URI header, password and empty-number
form are each read. From every reading a bounded breadth-first search derives every
candidate digit string a switch might act on: stripping PBX access and CLI prefixes
(:data:`DEFAULT_DIAL_PREFIXES` and any ``*``/``#`` service code), carrier selection
codes, international prefixes (``+``, ``00`` and the regions' own) followed by a
country code, national trunk prefixes, everything up to a ``+``, ``*``, ``#`` or
DTMF letter, the DTMF letters, and all non-digits. Each candidate is judged against
the regions it belongs to (the home region, or every region of the country code it
was dialled under) and against the universal core. Any hit refuses the target.
"""

from __future__ import annotations

import contextlib
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
from probes.emergency_numbers import supplementary_numbers

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
REASONS: tuple[str, ...] = ("undeclared", "emergency_number", "sos_service", "unreadable", "unsupported_uri")

_MAX_URI_CHARS: Final = 2048
_MAX_DIAL_CHARS: Final = 64
_MAX_DECODINGS: Final = 3
_MAX_STATES: Final = 5000  # per reading
_MAX_TARGET_STATES: Final = 4000  # per target, all readings together
_MAX_INTL_PREFIX: Final = 10

_SCHEME_RE: Final = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*:")
_NAME_ADDR_RE: Final = re.compile(r'(?:"(?:[^"\\]|\\.)*"|[^<"]*)\s*<(?P<uri>[^<>]*)>\s*', re.DOTALL)
_TEST_SOS_RE: Final = re.compile(r"(?:urn:service:)?test\.sos(?:\.[a-z0-9][a-z0-9\-]*)*")
_WORD_RE: Final = re.compile(r"[a-z]+")
_NON_DIGITS_RE: Final = re.compile(r"\D", re.ASCII)
_DTMF_RE: Final = re.compile(r"[ABCD]")
_PERCENT_U_RE: Final = re.compile(r"%[uU]([0-9A-Fa-f]{4})")
_PAUSE_RE: Final = re.compile(r"[pPwWxX,]")
_SERVICE_CODE_RE: Final = re.compile(r"[*#]{1,2}[0-9]{0,4}[*#]{0,2}")
_PASSWORD_RE: Final = re.compile(r"^(\s*sips?:[^:@;?]*):[^@]*@", re.IGNORECASE)
_PLAIN_DIGITS_RE: Final = re.compile(r"[0-9]+")

# How a permissive switch reads a dial string (docs/safety.md, "Reading a dial string"):
# any character with a digit value is that digit; '*', '#', '+' and DTMF A-D are dial
# characters; every other character is a separator, whatever its Unicode category. Only
# ASCII letters other than DTMF A-D and the pause/extension letters p, w, x make a user
# part a name (an identifier such as "ecpm-test") instead of a dial string.
_DIAL_SYMBOLS: Final = frozenset("*#+")
_DTMF_LETTERS: Final = frozenset("ABCD")
_PAUSE_LETTERS: Final = frozenset("PWX")
# What a plain dial string is written with: ASCII digits, dial symbols, DTMF and pause
# letters, RFC 3966 visual separators, a space and a comma (a pause). Anything else in a
# user part without a name is "unreadable": refused, because some switch reads it otherwise.
_PLAIN_CHARS: Final = frozenset("0123456789*#+ABCDabcdPWXpwx-.() ,")
# Carrier selection / dial-around codes dialled before a number: NANP 101XXXX,
# DE call-by-call 010XX and 0100XX, and the 10XX(X) codes of AT, CH, ES, IT and others.
_CARRIER_SELECTION_RE: Final = re.compile(r"101[0-9]{4}|0100?[0-9]{2}|10[0-9]{2,3}")
# Carrier selection written after the trunk prefix, judged in these regions only: BR
# '0' or '90' and a two-digit carrier code (0 21 190... dials 190), CO '0' and its codes.
_CARRIER_CODES: Final = {"BR": r"(?:0|90)[0-9]{2}", "CO": r"0(?:[3579]|4(?:[14]4|56))"}
# ITU-T E.161 keypad letters: a switch (or the phone before it) may dial letters as digits.
_KEYPAD: Final = str.maketrans(
    {
        ch: str(digit)
        for digit, letters in enumerate(("", "", "abc", "def", "ghi", "jkl", "mno", "pqrs", "tuv", "wxyz"))
        for ch in letters + letters.upper()
    }
)
# No URI holds these raw (RFC 3986): a control, format or line-separator character is
# refused wherever it is, after every reading was judged.
_INVISIBLE_CATEGORIES: Final = frozenset({"Cc", "Cf", "Zl", "Zp"})
# Structural delimiters of a user part, its parameters and URI headers.
_DELIMITERS_RE: Final = re.compile(r"[;?&=:@]")


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
    """The region's emergency-number patterns: the short-number metadata, then the
    supplementary table (:mod:`probes.emergency_numbers`) for what it leaves out."""
    patterns = []
    metadata = PhoneMetadata.short_metadata_for_region(region, None)
    for attr in ("emergency", "expanded_emergency"):
        desc = getattr(metadata, attr, None) if metadata is not None else None
        pattern = getattr(desc, "national_number_pattern", None) if desc is not None else None
        if pattern:
            patterns.append(str(pattern))
    patterns.extend(re.escape(number) for number in supplementary_numbers(region))
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
    # national_prefix_for_parsing with its transform rule (BR keeps what follows a carrier code)
    transforms: tuple[tuple[re.Pattern[str], str], ...]
    carrier_codes: re.Pattern[str] | None  # carrier selection after the trunk prefix (BR 0XX)


@functools.cache
def _context(regions: frozenset[str]) -> _Context:
    emergency: list[str] = [re.escape(n) for n in UNIVERSAL_EMERGENCY_NUMBERS]
    trunk_prefixes: set[str] = set()
    trunk_patterns: set[str] = set()
    transforms: set[tuple[str, str]] = set()
    carrier_codes = [_CARRIER_CODES[r] for r in sorted(regions) if r in _CARRIER_CODES]
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
            if metadata.national_prefix_transform_rule:
                transforms.add(
                    (str(metadata.national_prefix_for_parsing), str(metadata.national_prefix_transform_rule))
                )
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
        transforms=tuple((re.compile(p, re.ASCII), rule) for p, rule in sorted(transforms)),
        carrier_codes=_compile_alternatives(carrier_codes),
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


@dataclass(frozen=True, slots=True)
class _Char:
    dial: str  # what it contributes to the dial string ("" for a separator)
    plain: bool  # part of the plain dial alphabet
    name: bool  # an ASCII letter that makes the text a name
    strict: str = ""  # what it dials to a switch that does not apply NFKC ('⼀' dials nothing)


def _digit_value(ch: str) -> int | None:
    """The digit ``ch`` stands for in any script: ``9``, ``٩``, ``❾``, ``፱``, ``九``."""
    value = unicodedata.digit(ch, None)
    if value is not None:
        return value
    numeric = unicodedata.numeric(ch, None)
    if numeric is not None and numeric in range(10):
        return int(numeric)
    return None


@functools.lru_cache(maxsize=8192)
def _char(ch: str) -> _Char:
    plain = ch in _PLAIN_CHARS
    value = _digit_value(ch)
    if value is not None:
        return _Char(str(value), plain, False, str(value))
    if ch.isascii():
        upper = ch.upper()
        if ch in _DIAL_SYMBOLS or upper in _DTMF_LETTERS:
            return _Char(upper, True, False, upper)
        return _Char("", plain, ch.isalpha() and upper not in _PAUSE_LETTERS)
    # Anything else is a separator and never a letter of a name ('℡' is not "TEL"), but
    # the digits, dial symbols and DTMF letters of its compatibility form count in the
    # NFKC reading ('⒐' 9, '＋' '+', 'Ａ' A); the strict reading drops them.
    dial = []
    for c in unicodedata.normalize("NFKC", ch):
        value = _digit_value(c)
        if value is not None:
            dial.append(str(value))
        elif c in _DIAL_SYMBOLS or (c.isascii() and c.upper() in _DTMF_LETTERS):
            dial.append(c.upper())
    return _Char("".join(dial), False, False)


@dataclass(frozen=True, slots=True)
class _Reading:
    dial: str  # digits, '*', '#', '+', 'A'-'D'
    plain: bool  # every character is in the plain dial alphabet
    named: bool  # has letters that make it a name
    strict: str  # the dial string without compatibility forms ('9⼀9⼀9' is 999, not 91919)


@functools.lru_cache(maxsize=4096)
def _read(text: str) -> _Reading:
    """``text`` read as a dial string by a switch that ignores what it cannot dial."""
    chars = [_char(ch) for ch in text]
    return _Reading(
        "".join(c.dial for c in chars),
        all(c.plain for c in chars),
        any(c.name for c in chars),
        "".join(c.strict for c in chars),
    )


@functools.lru_cache(maxsize=4096)
def _runs(text: str) -> tuple[str, ...]:
    """The pieces of ``text`` between letters if it is a name; all of it if not.

    A name's digits are judged run by run (``test999`` dials 999, and so does
    ``test9p99``: a pause or DTMF letter does not end a run), never run together
    (``site11-lab2`` does not dial 112).
    """
    if not _read(text).named:
        return (text,) if text else ()
    runs: list[str] = []
    current: list[str] = []
    for ch in text:
        if _char(ch).name:
            runs.append("".join(current))
            current = []
        else:
            current.append(ch)
    runs.append("".join(current))
    return tuple(run for run in runs if run)


@functools.lru_cache(maxsize=4096)
def _segments(text: str) -> tuple[str, ...]:
    """Every reading of a user part or tel: body a switch might dial: the whole, the
    number before the first ';', and each parameter or header, its name and its value."""
    pieces = [text, *re.split(r"[;?&]", text)]
    for piece in list(pieces):
        pieces.extend(_DELIMITERS_RE.split(piece))
    return tuple(dict.fromkeys(piece for piece in pieces if piece))


def _decodings(text: str) -> list[str] | None:
    """``text`` at every percent-decoding level (the last is fully decoded); None if
    nested too deep. Escapes decoded as Latin-1 (``%B9`` is '¹') and IIS-style
    ``%uXXXX`` are further readings, placed before the last level."""
    levels = [text]
    for _ in range(_MAX_DECODINGS):
        decoded = unquote(levels[-1])
        if decoded == levels[-1]:
            break
        levels.append(decoded)
    else:
        if unquote(levels[-1]) != levels[-1]:
            return None
    others = []
    for level in levels:
        if "%" in level:
            for other in (unquote(level, encoding="latin-1"), _PERCENT_U_RE.sub(_percent_u, level)):
                if other not in levels and other not in others:
                    others.append(other)
    return [*levels[:-1], *others, levels[-1]]


def _percent_u(match: re.Match[str]) -> str:
    return chr(int(match[1], 16))


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


def _display(uri: object) -> str:
    """The URI for a log line: password hidden, control characters escaped, bounded."""
    if not isinstance(uri, str):
        return repr(uri)[:200]
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
    for pattern, rule in ctx.transforms:
        match = pattern.match(state)
        if match is not None and match.end() > 0:
            with contextlib.suppress(re.error, IndexError):
                yield match.expand(rule) + state[match.end() :], regions
    if ctx.carrier_codes is not None:
        for end in range(2, min(len(state), 4) + 1):
            if ctx.carrier_codes.fullmatch(state, 0, end):
                yield state[end:], regions
    # DTMF letters ignored, and the digits alone.
    without_dtmf = _DTMF_RE.sub("", state)
    if without_dtmf != state:
        yield without_dtmf, regions
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
    budget: list[int] | None = None,
) -> _Hit | None:
    """Breadth-first over every derivable candidate; the first emergency hit.
    ``budget``: states left for the whole target (shared by all its readings)."""
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
                if budget is not None:
                    budget[0] -= 1
                    if budget[0] < 0:
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
        digits = _read(self.number).dial
        if not digits or set(self.number) - set("0123456789*#-. ()"):
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
        return _read(self.number).dial


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
        self.judged: set[tuple[str, tuple[str, ...]]] = set()  # readings already judged
        self.budget = [_MAX_TARGET_STATES]
        # Reasons to refuse found while reading, given only if no reading is an emergency
        # number (the most telling reason wins).
        self.doubts: dict[str, str] = {}

    def refuse(self, reason: str, detail: str) -> NoReturn:
        raise GuardRefusal(self.uri, reason, f"{_display(self.uri)} {detail}")

    # -- entry

    def run(self) -> None:
        if not isinstance(self.uri, str):
            self.refuse("unsupported_uri", "is not a string")
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
        for doubt in self.doubts.values():
            self.refuse("unsupported_uri", doubt)
        for ch in self.uri:  # before .strip(): what reaches pjsua2 is the raw target
            if unicodedata.category(ch) in _INVISIBLE_CATEGORIES:
                self.refuse("unsupported_uri", f"has the invisible or control character U+{ord(ch):04X}")

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
        """``text`` at every percent-decoding level, each read literally too: a switch
        that does not decode reads ``11%20`` as 1120."""
        levels = _decodings(text)
        if levels is None:
            self.refuse("unsupported_uri", "is percent-encoded more deeply than a switch would")
        return levels

    def _bare(self, text: str) -> None:
        levels = self._levels(text)
        for level in levels:
            self._check_sos(level)
            self._subscriber(level)
        number = levels[-1].split(";", 1)[0]
        reading = _read(number)
        if reading.named or not any(ch.isdigit() for ch in reading.dial):
            self.refuse("unsupported_uri", "is neither a sip:, sips:, tel: or urn: URI nor a dial string")
        self._plain(levels[-1], names=False)

    def _sip(self, rest: str) -> None:
        first, last = rest.find("@"), rest.rfind("@")
        if first < 0:
            hostport, params = _split_host(rest)
            if not hostport.strip():
                self.refuse("unsupported_uri", "has no user part and no host")
            self._uri_params(params)
            if _is_ip_hostport(hostport):
                return
            levels = self._levels(hostport)
            for level in levels:  # no user part: a switch may dial the host (sip:999, sip:lab999)
                self._check_sos(level)
                self._subscriber(level)
            if hostport.lstrip().startswith("["):
                self.refuse("unsupported_uri", f"has the host {hostport!r}, which is not an IP literal")
            self._plain(levels[-1], names=True)
            return
        # A parser may split at the first '@' or the last: judge both user parts.
        splits = [rest[:at] for at in dict.fromkeys((first, last))]
        at_of = {rest[:at]: at for at in (first, last)}
        for userinfo in splits:
            for level in self._levels(userinfo):
                # 'urn:service:sos' as a user part is split by its ':' into user and password.
                squeezed = "".join(unicodedata.normalize("NFKC", level).casefold().split())
                if "urn:service:sos" in squeezed:
                    self.refuse("sos_service", "asks for the emergency service 'urn:service:sos'")
                self._readings(level, ())  # 'user:password' as one dial string too
            user, _, password = userinfo.partition(":")
            for level in self._levels(user):
                self._subscriber(level, _phone_contexts(rest[at_of[userinfo] + 1 :]))
            for level in self._levels(password) if password else ():
                self._readings(level, ())
        hostport, params = _split_host(rest[first + 1 :])
        self._uri_params(params)
        for userinfo in splits:
            user = userinfo.partition(":")[0]
            if not user.strip():
                self.refuse("unsupported_uri", "has an empty user part")
            self._plain(self._levels(user)[-1], names=True)
        if not hostport.strip():
            self.refuse("unsupported_uri", "has no host")

    def _tel(self, rest: str) -> None:
        if not rest.strip():
            self.refuse("unsupported_uri", "has an empty tel: number")
        levels = self._levels(rest)
        for level in levels:
            self._subscriber(level)
        self._plain(levels[-1], names=False)

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

    def _subscriber(self, text: str, host_contexts: Sequence[str] = ()) -> None:
        """Every reading of a SIP user part, tel: body or bare dial string
        (``number;param=value;...``) is judged for sos words and emergency numbers.
        ``host_contexts``: phone-context values among the URI parameters after the host."""
        number, *params = text.split(";")
        self._check_sos(number)
        contexts: list[str] = list(host_contexts)
        for param in params:
            self._check_sos(param)
            name, _, value = param.partition("=")
            if name.strip().lower() == "phone-context":
                contexts.append(value)
        self._readings(text, contexts)

    def _uri_params(self, text: str) -> None:
        """URI parameters and headers after the host: read as dial strings too."""
        if text:
            for level in self._levels(text):
                self._check_sos(level)
                self._readings(level, ())

    def _readings(self, text: str, contexts: Sequence[str]) -> None:
        if "complex" in self.doubts:
            return  # out of budget: refused as too convoluted once dispatch ends
        for segment in _segments(text):
            for run in _runs(segment):
                self._judge(run, contexts)
            vanity = segment.translate(_KEYPAD)
            if vanity != segment:  # letters dialled on a keypad: 'x11' is 911, 'www' 999
                self._judge(vanity, contexts)
            after_pause = _PAUSE_RE.split(segment)
            for part in after_pause[1:]:  # dialled after a pause: '1234w999', '+44...x999'
                for run in _runs(part):
                    self._judge(run, ())

    def _check_sos(self, text: str) -> None:
        word = _sos_word(text)
        if word is not None:
            self.refuse("sos_service", f"asks for the emergency service {word!r}")

    def _names(self, text: str) -> None:
        for level in _decodings(text) or [text]:
            self._check_sos(level)

    def _plain(self, text: str, *, names: bool) -> None:
        """Deny on doubt: what is not a name must be a plain dial string.

        Runs after every reading was judged, so an emergency number is always the reason
        given when there is one. ``names``: a name (``ecpm-test``) may stand for the number.
        """
        number, *params = text.split(";")
        reading = _read(number)
        if reading.named and not names:
            self.refuse("unreadable", f"has letters in its number {number!r}; a number is digits")
        if not reading.named and not (reading.plain and any(ch.isdigit() for ch in reading.dial)):
            self.refuse(
                "unreadable",
                f"has the number {number!r}, which is not a plain dial string (digits, '*', '#', "
                "'+', '-', '.', '(', ')'): a switch could read it as another number",
            )
        if len(reading.dial) > _MAX_DIAL_CHARS:
            self.refuse("unsupported_uri", f"has a dial string longer than {_MAX_DIAL_CHARS}")
        for param in params:
            name, _, value = param.partition("=")
            key = name.strip().lower()
            if key == "phone-context":
                context = _read(value)
                if value.lstrip().startswith("+") and not (
                    context.plain and context.dial[1:].isdigit() and context.dial.startswith("+")
                ):
                    self.refuse("unsupported_uri", f"has an unparseable phone-context {value!r}")
            elif key in ("ext", "postd"):
                extra = _read(value)
                if not extra.named and not (extra.plain and extra.dial):
                    self.refuse("unreadable", f"has the {key} {value!r}, which is not a plain dial string")

    def _judge(self, text: str, contexts: Sequence[str]) -> None:
        """Judge one reading (both ways of reading its characters): refuse if any
        candidate a switch may derive from it is, or starts with, an emergency number."""
        reading = _read(text)
        for digits in (reading.dial, reading.strict):
            key = (digits[:_MAX_DIAL_CHARS], tuple(contexts))
            if digits and key not in self.judged:
                self.judged.add(key)
                self._judge_digits(key[0], contexts)
            if len(digits) > _MAX_DIAL_CHARS:  # judged as far as it goes, never cut silently
                self.doubts.setdefault("long", f"has a dial string longer than {_MAX_DIAL_CHARS}")

    def _judge_digits(self, digits: str, contexts: Sequence[str]) -> None:
        starts: list[tuple[str, frozenset[str]]] = []
        foreign_context = False
        for context in contexts:
            context_digits = _read(context).dial
            national = context_digits[1:]
            if not context_digits.startswith("+") or not national.isdigit():
                continue  # a domain (judged in the home region) or unparseable (refused later)
            foreign_context = True
            starts.append(("+" + national + digits.lstrip("+"), self.home_ctx))
            codes = _country_codes()
            for width in (1, 2, 3):
                if national[:width] in codes:
                    starts.append((digits, codes[national[:width]]))
        starts.append((digits, self.home_ctx))  # deny on doubt: a switch may ignore the context
        if (
            self.opt_in is not None
            and not foreign_context
            and self.opt_in.region == self.home
            and digits == self.opt_in.digits
        ):
            self._opt_in_still_safe()
            return
        if "complex" in self.doubts:
            return  # out of budget: refused once every other reading had its say
        try:
            hit = _search(starts, self.home, self.prefixes, budget=self.budget)
        except _TooComplex:
            self.doubts["complex"] = "is too convoluted to judge"
            return
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


def _phone_contexts(host: str) -> list[str]:
    """``phone-context`` values among the URI parameters after the host, decoded."""
    params = _split_host(host)[1].split("?", 1)[0]
    found = []
    for param in params.split(";"):
        name, _, value = unquote(param).partition("=")
        if name.strip().lower() == "phone-context":
            found.append(value)
    return found


def _split_host(text: str) -> tuple[str, str]:
    """``host:port`` and what follows it (``;params?headers``)."""
    match = re.search(r"[;?]", text)
    return (text, "") if match is None else (text[: match.start()], text[match.start() :])


_IP_HOSTPORT_RE: Final = re.compile(r"(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<v4>[0-9.]+))(?::[0-9]{1,5})?")


def _is_ip_hostport(hostport: str) -> bool:
    """An IPv4 address or a bracketed IPv6 address (no zone), with an optional port,
    and nothing else: ``sip:[::1]999`` and ``sip:::999`` are not."""
    match = _IP_HOSTPORT_RE.fullmatch(hostport)
    if match is None:
        return False
    try:
        address = ipaddress.ip_address(match["v6"] or match["v4"])
    except ValueError:
        return False
    return address.version == (6 if match["v6"] else 4)


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

    def check_remote_target(
        self,
        uri: str,
        *,
        target: str,
        carrier_test_service: CarrierTestService | None = None,
    ) -> None:
        """Judge a URI a far end told us to send to (a dialog's remote target: the
        Contact of a 18x/2xx, re-INVITE or UPDATE). Same rules as a dial target, but no
        declaration applies: the far end chose it. Logged and counted like :meth:`check`."""
        self.check(uri, target=target, declared_test_endpoint=True, carrier_test_service=carrier_test_service)

    @property
    def refusals(self) -> dict[str, int]:
        """Refusals so far by reason; every reason is present (zero until it happens)."""
        with self._lock:
            return dict(self._refusals)
