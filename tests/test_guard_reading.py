"""Deny on doubt: the guard reads a user part the way the most permissive switch could.

Generated, not listed: separators are every Unicode character of the punctuation,
symbol, space, control and format categories; digits are every character with a digit
value, in every script; each case is percent-encoded at 0-2 levels and mixed with
parameters, headers and empty-number forms, for every region's emergency numbers
(libphonenumber's and the supplementary table's). Each must be refused as an emergency
number at config load (file, key, reason) and at the SIP send, where a UDP listener on
loopback behind the target's host:port must see nothing. What cannot be read as a
plain dial string is refused as ``unreadable``.
"""

from __future__ import annotations

import asyncio
import random
import subprocess
import sys
import unicodedata
from collections.abc import Iterator
from pathlib import Path

import pytest

from probes.config import SipSettings
from probes.emergency_numbers import SUPPLEMENTARY_EMERGENCY_NUMBERS
from probes.guard import REASONS, Guard, GuardRefusal, check_dial_target
from probes.sip import CallOptions, Dial, SipEngine
from tests.support.net import HOST, UdpSink
from tests.support.numbers import ALL_PAIRS, country_code
from tests.support.paths import REPO

SEED = 20261201  # fixed: a failure here is reproducible; breadth comes from exhaustion


def _code_points() -> Iterator[str]:
    for cp in range(sys.maxunicode + 1):
        if 0xD800 <= cp <= 0xDFFF:
            continue
        yield chr(cp)


def _has_digit_value(ch: str) -> bool:
    numeric = unicodedata.numeric(ch, None)
    return unicodedata.digit(ch, None) is not None or (numeric is not None and numeric in range(10))


def _separators() -> list[str]:
    """Every character of the P*, S*, Z*, Cc and Cf categories that is not itself a
    digit and dials nothing (``*``, ``#`` and ``+`` are dial characters)."""
    found = []
    for ch in _code_points():
        category = unicodedata.category(ch)
        if category[0] in "PSZ" or category in ("Cc", "Cf"):
            if ch in "*#+" or _has_digit_value(ch):
                continue
            if any(_has_digit_value(c) for c in unicodedata.normalize("NFKC", ch)):
                continue  # U+2F00 KANGXI RADICAL ONE is NFKC '一' (1): a digit in disguise
            if any(c in "*#+" for c in unicodedata.normalize("NFKC", ch)):
                continue  # U+FF0B FULLWIDTH PLUS SIGN and its cousins are '+'
            found.append(ch)
    return found


def _digit_scripts() -> dict[str, list[str]]:
    """For each script, its ten digits 0-9 (decimal scripts) and every other character
    with a digit value, keyed by value: ``{"0": [...], ..., "9": [...]}``."""
    by_value: dict[str, list[str]] = {str(d): [] for d in range(10)}
    for ch in _code_points():
        value = unicodedata.digit(ch, None)
        if value is None:
            numeric = unicodedata.numeric(ch, None)
            if numeric is None or numeric not in range(10):
                continue
            value = int(numeric)
        by_value[str(value)].append(ch)
    return by_value


SEPARATORS = _separators()
DIGITS = _digit_scripts()
DECIMAL_BLOCKS = sorted(
    {ord(ch) - unicodedata.decimal(ch) for ch in _code_points() if unicodedata.decimal(ch, None) is not None}
)
PAIRS = sorted({*ALL_PAIRS, *((row.region, row.number) for row in SUPPLEMENTARY_EMERGENCY_NUMBERS)})
HOST_PORT = f"{HOST}:5999"
MINUS = "\u2212"


def percent(text: str, levels: int) -> str:
    """``text`` with every non-ASCII or reserved character percent-encoded ``levels`` deep."""
    for _ in range(levels):
        out = []
        for ch in text:
            if ch.isascii() and (ch.isalnum() or ch in "-.+*#"):
                out.append(ch)
            else:
                out.append("".join(f"%{b:02X}" for b in ch.encode("utf-8", "surrogatepass")))
        text = "".join(out)
    return text


def write(number: str, script: int | str, rng: random.Random) -> str:
    """``number`` in a decimal script (the code point of its zero), in characters of any
    script with a digit value (``"any"``), or in ASCII (``""``)."""
    if script == "any":
        return "".join(rng.choice(DIGITS[d]) for d in number)
    if isinstance(script, int):
        return "".join(chr(script + int(d)) for d in number)
    return number


def spellings(number: str, sep: str) -> list[str]:
    """``number`` with ``sep`` between its digits, before them and after them."""
    joined = sep.join(number)
    return [joined, sep + joined, joined + sep]


def forms(user: str, host: str = HOST_PORT) -> list[str]:
    """A user part in every place a switch might read it."""
    return [
        f"sip:{user}@{host}",
        f"sip:{user};user=phone@{host}",
        f"sip:;{user}@{host}",
        f"sip:ecpm-test;{user}@{host}",
        f"sip:ecpm-test@{host};x={user}",
        f"sip:ecpm-test@{host}?Subject={user}",
        f"tel:{user}",
        f"tel:;{user}",
        f"tel:+441632960000;ext={user}",
    ]


def cases(rng: random.Random, count: int, *, home: str | None = None) -> list[tuple[str, str]]:
    """(uri, home) for random emergency numbers, separators, scripts, encodings, forms.
    With ``home``, every number is written in international form and judged from there."""
    out = []
    for _ in range(count):
        region, number = rng.choice(PAIRS)
        sep = rng.choice(SEPARATORS) if rng.random() < 0.9 else ""
        script: int | str = rng.choice(["", "", "any", *rng.sample(DECIMAL_BLOCKS, 3)])
        user = rng.choice(spellings(write(number, script, rng), sep))
        judged_in = region
        if home is not None or rng.random() < 0.3:
            user = "+" + sep.join(write(country_code(region), script, rng)) + sep + user
            judged_in = home or rng.choice(["GB", "US", "DE"])
        out.append((rng.choice(forms(percent(user, rng.choice([0, 0, 1, 2])))), judged_in))
    return out


def reason(uri: str, home: str) -> str:
    try:
        check_dial_target(uri, declared_test_endpoint=True, home_region=home)
    except GuardRefusal as refusal:
        return refusal.reason
    return "allowed"


# ------------------------------------------------------------------- the issue's own


ISSUE_CASES = [
    "sip:9_9_9@{h}",
    "sip:9'9'9@{h}",
    "sip:9%E2%88%929%E2%88%929@{h}",
    "sip:+44%E2%88%92999@{h}",
    "sip:1%C2%B71%C2%B72@{h}",
    "sip:;999@{h}",
    "sip:%3B999@{h}",
    "sip:9−9−9@{h}",
    "sip:9•9•9@{h}",
    "sip:9・9・9@{h}",
    "sip:❾❾❾@{h}",
    "sip:፱፱፱@{h}",
    "tel:;999",
    "sip:9;9;9@{h}",
    "sip:9x9x9@{h}",
    "sip:九九九@{h}",
    "sip:ⅨⅨⅨ@{h}",
    "sip:9\u200b9\u200b9@{h}",
    "sip:ecpm:999@{h}",
    "sip:ecpm@999@{h}",
    "sip:ecpm@{h};maddr=999",
    "sip:ecpm@{h}?X=9-9-9",
    "sip:test999@{h}",
]


@pytest.mark.parametrize("uri", ISSUE_CASES)
def test_the_issues_dial_strings_are_refused(uri: str) -> None:
    assert reason(uri.format(h=HOST_PORT), "GB") == "emergency_number"


@pytest.mark.parametrize(
    ("uri", "home"),
    [("sip:x11@{h}", "US"), ("sip:www@{h}", "GB"), ("sip:11c@{h}", "GB"), ("sip:yyy@{h}", "GB"),
     ("sip:W-W-W@{h}", "GB"), ("tel:1-800-9-X11", "US"), ("sip:wx112@{h}", "DE")],
)  # fmt: skip
def test_keypad_letters_are_dialled_as_digits(uri: str, home: str) -> None:
    """E.161: a phone or switch may dial letters (1-800-FLOWERS); 'x11' is 911."""
    assert reason(uri.format(h=HOST_PORT), home) == "emergency_number"


@pytest.mark.parametrize(
    "uri", ["sip:ecpm-test@127.0.0.1\x00", "sip:ecpm-test@127.0.0.1\u200b:5060", "sip:ecpm\u2028test@h"]
)
def test_invisible_characters_anywhere_are_refused(uri: str) -> None:
    assert reason(uri, "GB") == "unsupported_uri"


LONG = "2" * 64
COUSINS = [
    # a pause or DTMF letter does not end a name's digit run
    ("sip:test9p99@{h}", "GB"), ("sip:lab9w9w9@{h}", "GB"), ("sip:9a9a9-test@{h}", "GB"),
    ("sip:site1a12@{h}", "GB"), ("sip:lab1b1d2@{h}", "GB"),
    # digits after a pause are a dial string of their own (an extension, a second stage)
    ("sip:+442079460000x999@{h}", "GB"), ("tel:+442079460000x999", "GB"), ("sip:1234w999@{h}", "GB"),
    ("sip:1234p999@{h}", "GB"), ("sip:1234,999@{h}", "GB"),
    # a reading is never cut at 64 characters
    ("sip:ecpm@{h};x=" + LONG + "*999", "GB"), ("sip:ecpm@{h}?Subject=" + LONG + "+999", "GB"),
    ("tel:+442079460000;ext=" + LONG + "#999", "GB"), ("sip:ecpm:" + LONG + "*999@{h}", "GB"),
    # a host without a user part is read like one; only exact IP literals are exempt
    ("sip:lab999", "GB"), ("sip:test-999", "GB"), ("sip:h-9-9-9", "GB"), ("sip:::999", "GB"),
    ("sip:[::1]999", "GB"), ("sip:[::1]-9-9-9", "GB"), ("sip:[fe80::1%25999]", "GB"),
    # BR carrier selection after the trunk prefix: 0 21 190... dials 190
    ("tel:0211901234567", "BR"), ("tel:0 21 190 1234 5678", "BR"), ("tel:021190", "BR"),
    ("tel:015190", "BR"), ("tel:+550211901234567", "GB"), ("tel:+55021190", "GB"), ("01155021190", "US"),
    # phone-context after the host, Latin-1 and %u escapes, NFKC DTMF letters
    ("sip:091@{h};user=phone;phone-context=+34", "GB"), ("sip:ecpm%B9%B92@{h}", "GB"),
    ("sip:ecpm-test@{h};x=%B9%B90", "GB"), ("sip:%u0039%u0039%u0039@{h}", "GB"),
    ("sip:ecpm@{h};x=1234Ａ999", "GB"),
]  # fmt: skip


@pytest.mark.parametrize(("uri", "home"), COUSINS)
def test_cousins_found_in_review_are_refused(uri: str, home: str) -> None:
    assert reason(uri.format(h=HOST_PORT), home) != "allowed"


@pytest.mark.parametrize("uri", ["sip:ecpm@h\r\n", "sip:ecpm@h\u2028", "sip:ecpm@h\x85", "\x1csip:ecpm@h"])
def test_control_characters_at_either_end_are_refused(uri: str) -> None:
    assert reason(uri, "GB") == "unsupported_uri"


@pytest.mark.parametrize("value", [None, 123, b"sip:ecpm@h"])
def test_a_target_that_is_not_a_string_is_refused(value: object) -> None:
    assert reason(value, "GB") == "unsupported_uri"  # type: ignore[arg-type]


def test_spains_police_and_guardia_civil_are_refused() -> None:
    for number in ("091", "092", "062"):
        assert reason(f"tel:+34{number}", "GB") == "emergency_number"
        assert reason(f"sip:{number}@{HOST_PORT}", "ES") == "emergency_number"


# --------------------------------------------------------------- exhaustive sweeps


def test_every_separator_between_the_digits_of_999_and_112_is_refused() -> None:
    failures = []
    for sep in SEPARATORS:
        for number, home in (("999", "GB"), ("112", "DE")):
            joined, leading, trailing = spellings(number, sep)
            uris = [f"sip:{percent(joined, level)}@{HOST_PORT}" for level in (0, 1, 2)]
            uris += [f"sip:{percent(leading, 1)}@{HOST_PORT}", f"sip:{percent(trailing, 2)}@{HOST_PORT}"]
            uris += [f"tel:{percent(joined, 1)}", f"sip:ecpm-test;{percent(joined, 1)}@{HOST_PORT}"]
            for uri in uris:
                got = reason(uri, home)
                if got != "emergency_number":
                    failures.append((f"U+{ord(sep):04X}", uri, got))
    assert len(SEPARATORS) > 8000  # the sweep really covers the categories
    assert not failures, failures[:20]


# An emergency number holding each digit value, and a region where it is one.
WITH_DIGIT = {
    "0": ("000", "AU"), "1": ("112", "GB"), "2": ("112", "GB"), "3": ("113", "IT"), "4": ("144", "AT"),
    "5": ("115", "IT"), "6": ("166", "GR"), "7": ("117", "CH"), "8": ("118", "IT"), "9": ("999", "GB"),
}  # fmt: skip


def test_every_character_with_a_digit_value_is_that_digit() -> None:
    failures = []
    for value, characters in DIGITS.items():
        number, home = WITH_DIGIT[value]
        for ch in characters:
            written = number.replace(value, ch)
            for uri in (f"sip:{written}@{HOST_PORT}", f"sip:{percent(written, 1)}@{HOST_PORT}"):
                got = reason(uri, home)
                if got != "emergency_number":
                    failures.append((f"U+{ord(ch):04X}", uri, got))
    assert sum(len(v) for v in DIGITS.values()) > 600
    assert not failures, failures[:20]


def test_every_regions_numbers_in_every_decimal_script_are_refused() -> None:
    failures = []
    for block in DECIMAL_BLOCKS:
        for region, number in PAIRS:
            written = "".join(chr(block + int(d)) for d in number)
            for uri in (f"sip:{written}@{HOST_PORT}", f"tel:;{percent(written, 1)}"):
                got = reason(uri, region)
                if got != "emergency_number":
                    failures.append((region, number, f"U+{block:04X}", got))
    assert len(DECIMAL_BLOCKS) > 60
    assert not failures, failures[:20]


def test_random_mixtures_for_every_region_are_refused() -> None:
    rng = random.Random(SEED)
    failures = [
        (uri, home, got)
        for uri, home in cases(rng, 20000)
        if (got := reason(uri, home)) != "emergency_number"
    ]
    assert not failures, failures[:20]


def test_supplementary_numbers_are_refused_row_by_row() -> None:
    for row in SUPPLEMENTARY_EMERGENCY_NUMBERS:
        cc = country_code(row.region)
        other = "GB" if row.region != "GB" else "US"
        for uri, home in (
            (f"sip:{row.number}@{HOST_PORT}", row.region),
            (f"tel:{row.number}", row.region),
            (f"sip:{row.number}1234@{HOST_PORT}", row.region),  # prefix semantics
            (f"tel:+{cc}{row.number}", other),
            (f"sip:+{cc}-{row.number}@{HOST_PORT};user=phone", other),
            (f"tel:{row.number};phone-context=+{cc}", other),
        ):
            assert reason(uri, home) == "emergency_number", (row, uri, home)
        assert row.source and row.service


# ------------------------------------------------------------------- unreadable


def test_what_cannot_be_read_plainly_is_unreadable() -> None:
    """A drama number (harmless) written with a separator outside the plain alphabet."""
    plain = set("-.() ,")
    # These split the user part (each part is judged and may be an emergency number:
    # '0000' is one) or start an escape.
    structural = set(";?:@%&=")
    failures = []
    for sep in SEPARATORS:
        if sep in plain or sep in structural:
            continue
        written = f"+44{sep}20{sep}7946{sep}0000"
        got = reason(f"sip:{written}@{HOST_PORT}", "GB")
        # '℀' is NFKC 'a/c': read as DTMF A and C, '+44A20...' may well dial (after C) 000.
        dtmf = any(c.isascii() and c.isalpha() for c in unicodedata.normalize("NFKC", sep))
        if got not in ("unreadable", "unsupported_uri") and not (dtmf and got == "emergency_number"):
            failures.append((f"U+{ord(sep):04X}", written, got))
        # Escaped, it is refused too; read literally an escape may even dial ('%0A' is 0A).
        escaped = f"sip:{percent(written, 1)}@{HOST_PORT}"
        if reason(escaped, "GB") == "allowed":
            failures.append((f"U+{ord(sep):04X}", escaped, "allowed"))
    assert not failures, failures[:20]


@pytest.mark.parametrize(
    "uri",
    [
        "sip:1_2_3@h",
        "sip:٤٤٢٠٧٩٤٦٠٠٠٠@h",  # digits, but not ASCII ones
        "sip:+44−20−7946−0000@h",  # U+2212 MINUS SIGN
        "sip:;1234@h",  # an empty number
        "tel:;1234",
        "sip:*@h",
        "sip:dad@h",  # DTMF letters only: a dial string without digits
        "tel:ecpm",
        "tel:+441632960000;ext=1_2",
    ],
)
def test_unreadable_targets_have_their_own_reason(uri: str) -> None:
    assert reason(uri, "GB") == "unreadable"
    assert "unreadable" in REASONS


@pytest.mark.parametrize(
    "uri",
    [
        "sip:ecpm-test@127.0.0.1:5090",
        "sip:echo@127.0.0.1",
        "sip:site11-lab2@h",
        "sip:+44 20 7946 0000@h",
        "sip:+44(0)20-7946.0000@h",
        "tel:+441632960000;ext=12",
        "sip:ecpm-test@127.0.0.1;transport=tcp;lr",
        "sip:127.0.0.1:5060;lr",
    ],
)
def test_names_and_plain_numbers_pass(uri: str) -> None:
    assert reason(uri, "GB") == "allowed"


# ------------------------------------------------------ config load and SIP send


def sample_from_gb() -> list[tuple[str, str]]:
    """Cases a probe at home in GB must refuse: the issue's, every region's numbers in
    international form (a sample of them), and random mixtures."""
    rng = random.Random(SEED + 1)
    issue = [(uri.format(h=HOST_PORT), "GB") for uri in ISSUE_CASES]
    per_region = [
        ("sip:" + percent(f"+{country_code(region)}{MINUS}{number}", 1) + f"@{HOST_PORT}", "GB")
        for region, number in PAIRS[::8]
    ]
    return issue + per_region + cases(rng, 150, home="GB")


def yaml_string(text: str) -> str:
    """A YAML double-quoted scalar: printable characters as they are, the rest escaped."""
    out = []
    for ch in text:
        cp = ord(ch)
        printable = ch in "\t" or 0x20 <= cp <= 0x7E or 0xA0 <= cp <= 0xD7FF or 0xE000 <= cp <= 0xFFFD
        if ch in '"\\\u2028\u2029\ufeff' or not (printable or cp >= 0x10000):
            out.append(f"\\x{cp:02X}" if cp <= 0xFF else f"\\u{cp:04X}" if cp <= 0xFFFF else f"\\U{cp:08X}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def test_refused_at_config_load_with_file_key_and_reason(tmp_path: Path) -> None:
    by_home: dict[str, list[str]] = {}
    for uri, home in sample_from_gb() + cases(random.Random(SEED + 2), 100):
        by_home.setdefault(home, []).append(uri)
    chunks = [
        (f"{home}-{start}", home, uris[start : start + 25])
        for home, uris in sorted(by_home.items(), key=lambda item: -len(item[1]))[:6]
        for start in range(0, len(uris), 25)
    ]  # check-config shows a bounded number of problems per file
    for name, home, uris in chunks:
        path = tmp_path / f"probe-{name}.yaml"
        lines = ["kind: probe", f"probe: {{id: p1, region: {home}, key: {'k' * 32}}}", "targets:"]
        for i, uri in enumerate(uris):
            lines.append(f"  - {{id: t{i}, uri: {yaml_string(uri)}, test_endpoint: true}}")
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        done = subprocess.run(
            [sys.executable, "-m", "ecpm", "check-config", str(path)],
            cwd=REPO, capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
        assert done.returncode == 2, done.stdout + done.stderr
        assert "Traceback" not in done.stderr
        for i in range(len(uris)):
            line = 4 + i
            expected = (
                f"{path}:{line}: targets[{i}].uri: refused by the live-number guard (emergency_number): "
            )
            assert expected in done.stderr, (uris[i], done.stderr[-2000:])


def test_refused_at_the_sip_send_and_nothing_reaches_the_listener() -> None:
    """Past config validation (as ``ecpm call`` or a command could be): the engine's own
    guard refuses every case, INVITE and OPTIONS, and the listener hears nothing."""
    sink = UdpSink()
    guard = Guard(home_region="GB")
    targets = [uri.replace(":5999", f":{sink.port}") for uri, _ in sample_from_gb()]

    async def main() -> list[str]:
        unexpected = []
        async with SipEngine(SipSettings(max_call_rate=40.0), guard) as engine:
            for uri in targets:
                dial = Dial(uri, "t", declared_test_endpoint=True)
                for send in (
                    lambda dial=dial: engine.call(dial, CallOptions(first_response_timeout=0.5)),
                    lambda dial=dial: engine.options(dial, timeout=0.5),
                ):
                    try:
                        await send()
                    except GuardRefusal as refusal:
                        if refusal.reason != "emergency_number":
                            unexpected.append(f"{uri}: {refusal.reason}")
                    else:
                        unexpected.append(f"{uri}: sent")
            assert engine.stats().calls_placed_total == 0
        return unexpected

    try:
        assert asyncio.run(main()) == []
        assert guard.refusals["emergency_number"] == 2 * len(targets)
        assert sink.received(0.5) == []
    finally:
        sink.close()


def test_safety_doc_lists_every_supplementary_row() -> None:
    text = (REPO / "docs" / "safety.md").read_text(encoding="utf-8")
    for row in SUPPLEMENTARY_EMERGENCY_NUMBERS:
        assert f"| {row.region} | `{row.number}` | {row.service} | {row.source} |" in text, row
