"""Every region's emergency numbers, enumerated from libphonenumber's own patterns by a
small expander (tests/test_guard.py checks the expander; the guard tests dial them all)."""

from __future__ import annotations

import phonenumbers
from phonenumbers import PhoneMetadata


def expand(pattern: str) -> set[str]:
    """Every string a libphonenumber emergency pattern matches.

    The patterns use literals, ``[...]`` classes with ranges, ``\\d``, ``(?:...)``
    groups, ``|`` and ``?`` only (asserted), so their languages are finite and small.
    """
    pos = 0

    def peek() -> str:
        return pattern[pos] if pos < len(pattern) else ""

    def take(expected: str | None = None) -> str:
        nonlocal pos
        ch = pattern[pos]
        assert expected is None or ch == expected, (pattern, pos, expected)
        pos += 1
        return ch

    def alternation() -> set[str]:
        options = sequence()
        while peek() == "|":
            take("|")
            options |= sequence()
        return options

    def sequence() -> set[str]:
        strings = {""}
        while peek() not in ("", "|", ")"):
            atom_strings = atom()
            if peek() == "?":
                take("?")
                atom_strings = atom_strings | {""}
            assert peek() not in ("*", "+", "{"), f"unbounded pattern {pattern!r}"
            strings = {s + a for s in strings for a in atom_strings}
        return strings

    def atom() -> set[str]:
        ch = take()
        if ch == "(":
            if pattern.startswith("?:", pos):
                take("?")
                take(":")
            inner = alternation()
            take(")")
            return inner
        if ch == "[":
            chars: set[str] = set()
            while peek() != "]":
                first = take()
                if first == "\\":
                    assert take("d") == "d"
                    chars |= set("0123456789")
                elif peek() == "-":
                    take("-")
                    last = take()
                    chars |= {chr(c) for c in range(ord(first), ord(last) + 1)}
                else:
                    chars.add(first)
            take("]")
            return chars
        if ch == "\\":
            assert take("d") == "d"
            return set("0123456789")
        assert ch.isdigit(), (pattern, ch)
        return {ch}

    result = alternation()
    assert pos == len(pattern), pattern
    return result


def emergency_patterns(region: str) -> list[str]:
    metadata = PhoneMetadata.short_metadata_for_region(region, None)
    found = []
    for attr in ("emergency", "expanded_emergency"):
        desc = getattr(metadata, attr, None)
        if desc is not None and desc.national_number_pattern:
            found.append(desc.national_number_pattern)
    return found


SHORT_REGIONS = sorted(phonenumbers.SUPPORTED_SHORT_REGIONS)
ALL_REGIONS = sorted(set(phonenumbers.SUPPORTED_REGIONS) | set(SHORT_REGIONS))
NUMBERS: dict[str, list[str]] = {
    region: sorted(set().union(*(expand(p) for p in emergency_patterns(region))))
    for region in SHORT_REGIONS
    if emergency_patterns(region)
}
EMERGENCY_REGIONS = sorted(NUMBERS)
ALL_PAIRS = [(region, number) for region in EMERGENCY_REGIONS for number in NUMBERS[region]]


def country_code(region: str) -> str:
    return str(phonenumbers.country_code_for_region(region))
