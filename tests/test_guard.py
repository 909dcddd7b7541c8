"""The live-number guard, tested harder than anything else in ecpm.

Every region's emergency numbers are enumerated from libphonenumber's own patterns
(a small expander, tests/support/numbers.py) and pushed through every dial form the guard claims to
understand, exhaustively for the plain forms and with hypothesis for random
combinations. The other direction matters too: test endpoints and Ofcom drama
numbers must pass, or the guard would be switched off in anger.
"""

from __future__ import annotations

import logging
import pickle
import re
import threading
from collections.abc import Callable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from phonenumbers import PhoneMetadata
from phonenumbers.shortnumberinfo import connects_to_emergency_number

from ecpm.errors import EcpmError
from probes import guard as guard_module
from probes.guard import (
    DEFAULT_DIAL_PREFIXES,
    REASONS,
    UNIVERSAL_EMERGENCY_NUMBERS,
    CarrierTestService,
    Guard,
    GuardRefusal,
    check_dial_target,
)
from tests.support.numbers import (
    ALL_PAIRS,
    ALL_REGIONS,
    EMERGENCY_REGIONS,
    NUMBERS,
    SHORT_REGIONS,
    country_code,
    emergency_patterns,
)

PROPERTY = settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# ------------------------------------------------------------------ the data


def plain(value: str | None) -> str | None:
    return value if value and re.fullmatch(r"[0-9]+", value) else None


def trunk_prefix(region: str) -> str | None:
    metadata = PhoneMetadata.metadata_for_region(region, None)
    return plain(metadata.national_prefix) if metadata is not None else None


def international_prefix(region: str) -> str | None:
    metadata = PhoneMetadata.metadata_for_region(region, None)
    return plain(metadata.international_prefix) if metadata is not None else None


def refusal(uri: str, *, home: str, declared: bool = True, **kwargs: object) -> GuardRefusal:
    with pytest.raises(GuardRefusal) as caught:
        check_dial_target(uri, declared_test_endpoint=declared, home_region=home, **kwargs)  # type: ignore[arg-type]
    return caught.value


def allowed(uri: str, *, home: str = "GB", **kwargs: object) -> None:
    check_dial_target(uri, declared_test_endpoint=True, home_region=home, **kwargs)  # type: ignore[arg-type]


def test_the_expander_is_faithful() -> None:
    for region in EMERGENCY_REGIONS:
        compiled = [re.compile(p) for p in emergency_patterns(region)]
        for number in NUMBERS[region]:
            assert any(c.fullmatch(number) for c in compiled), (region, number)
        metadata = PhoneMetadata.short_metadata_for_region(region)
        assert metadata is not None and metadata.emergency is not None
        example = metadata.emergency.example_number
        if example:
            assert example in NUMBERS[region], (region, example)


def test_every_region_with_emergency_data_is_covered() -> None:
    without = {r for r in SHORT_REGIONS if not emergency_patterns(r)}
    # GN is the one region libphonenumber has no emergency numbers for; the universal
    # core still protects it (see test_universal_core_is_refused_from_every_region).
    assert without <= {"GN"}, without
    assert len(EMERGENCY_REGIONS) >= 240
    assert len(ALL_PAIRS) > 500


# ------------------------------------------- every region, every plain form


def plain_forms(region: str, number: str) -> list[tuple[str, str]]:
    """(uri, home) pairs that must all be refused."""
    cc = country_code(region)
    other = "US" if region != "US" else "GB"
    encoded = "".join(f"%{ord(c):02X}" for c in number)
    forms = [
        (number, region),
        (f"sip:{number}@h", region),
        (f"SIPS:{number}@h.example:5061;transport=tls", region),
        (f"sip:{number}@127.0.0.1;user=phone", region),
        (f"sip:{encoded}@h", region),
        (f"tel:{number}", region),
        (f"9{number}", region),
        (f"*67{number}", region),
        (f"#31#{number}", region),
        (f"141{number}", region),
        (f"sip:{number}xyz@h", region),  # a name whose leading digits are an emergency number
        (f"+{cc}{number}", other),
        (f"sip:+{cc}{number}@h;user=phone", other),
        (f"tel:+{cc}-{number}", other),
        (f"00{cc}{number}", other),
        (f"tel:{number};phone-context=+{cc}", other),
        (f"sip:{number};phone-context=+{cc}@h;user=phone", other),
        (f"{number}0123", region),
    ]
    trunk = trunk_prefix(region)
    if trunk:
        forms.append((f"{trunk}{number}", region))
        forms.append((f"sip:{trunk}{number}@h", region))
        forms.append((f"+{cc}({trunk}){number}", other))
    home_intl = international_prefix(other)
    if home_intl:
        forms.append((f"{home_intl}{cc}{number}", other))
    return forms


def test_every_emergency_number_of_every_region_is_refused_in_plain_forms() -> None:
    failures = []
    for region, number in ALL_PAIRS:
        for uri, home in plain_forms(region, number):
            try:
                allowed(uri, home=home)
            except GuardRefusal as refused:
                if refused.reason != "emergency_number":
                    failures.append((uri, home, refused.reason))
            else:
                failures.append((uri, home, "allowed"))
    assert not failures, failures[:20]


def test_universal_core_is_refused_from_every_region() -> None:
    failures = []
    for home in ALL_REGIONS:
        for number in UNIVERSAL_EMERGENCY_NUMBERS:
            for uri in (number, f"sip:{number}@h", f"tel:{number}5", f"sip:+44{number}@h"):
                try:
                    allowed(uri, home=home)
                except GuardRefusal as refused:
                    if refused.reason != "emergency_number":
                        failures.append((uri, home, refused.reason))
                else:
                    failures.append((uri, home, "allowed"))
    assert not failures, failures[:20]


def test_core_applies_after_every_derivation() -> None:
    # +44 911: not a GB number, but 911 is refused everywhere.
    assert refusal("sip:+44911@h", home="GB").reason == "emergency_number"
    # The national part of an international number, behind a trunk prefix.
    assert refusal("+44 (0) 911", home="JP").reason == "emergency_number"
    # Raw digits once the non-digits are gone.
    assert refusal("9*1*1", home="GB").reason == "emergency_number"
    # A country code that does not exist still leaves the digits.
    assert refusal("+999", home="GB").reason == "emergency_number"


def test_stricter_than_libphonenumber_in_exact_match_regions() -> None:
    # libphonenumber demands exact matches in BR, CL and NI; a trailing digit slips by.
    assert not connects_to_emergency_number("1900", "BR")
    for region, number in (("BR", "190"), ("CL", "133"), ("NI", "118")):
        assert refusal(f"{number}0", home=region).reason == "emergency_number"
        assert refusal(f"sip:{number}99@h", home=region).reason == "emergency_number"
    # libphonenumber ignores numbers starting with '+'.
    assert not connects_to_emergency_number("+1911", "US")
    assert refusal("+1911", home="US").reason == "emergency_number"


# --------------------------------------------- random combinations of forms

SEPARATORS = ["", "", "", "", "-", ".", " ", "(", ")", "\u00a0", "\u2010"]
HOSTS = ["h", "127.0.0.1", "[::1]:5061", "gw.example.net:5060", "192.0.2.7"]


def percent_encode(text: str, mask: list[bool], upper: bool) -> str:
    out = []
    for ch, encode in zip(text, mask, strict=False):
        if encode:
            out.append("".join(f"%{b:02X}" if upper else f"%{b:02x}" for b in ch.encode()))
        else:
            out.append(ch)
    return "".join(out) + text[len(mask) :]


def random_case(draw: st.DrawFn, word: str) -> str:
    flags = draw(st.lists(st.booleans(), min_size=len(word), max_size=len(word)))
    return "".join(c.upper() if f else c for c, f in zip(word, flags, strict=True))


@st.composite
def emergency_targets(draw: st.DrawFn) -> tuple[str, str]:
    """A random spelling of a random region's emergency number, and the home region."""
    region = draw(st.sampled_from(EMERGENCY_REGIONS))
    number = draw(st.sampled_from(NUMBERS[region]))
    cc = country_code(region)
    trunk = trunk_prefix(region)
    use_trunk = trunk is not None and draw(st.booleans())
    kind = draw(st.sampled_from(["national", "international", "context"]))
    if kind == "international":
        home = draw(st.sampled_from(ALL_REGIONS))
        choices = ["+", "00"]
        home_intl = international_prefix(home)
        if home_intl:
            choices.append(home_intl)
        tokens = [draw(st.sampled_from(choices)), cc]
    elif kind == "context":
        home = draw(st.sampled_from(ALL_REGIONS))
        tokens = []
    else:
        home = region
        tokens = []
    if use_trunk:
        assert trunk is not None
        tokens.append(trunk)
    tokens.append(number)
    tokens.append(draw(st.text(alphabet="0123456789", max_size=4)))  # extra digits
    pbx = draw(st.lists(st.sampled_from(DEFAULT_DIAL_PREFIXES), max_size=3))
    dial_chars = "".join(pbx + tokens)
    seps = draw(st.lists(st.sampled_from(SEPARATORS), min_size=len(dial_chars), max_size=len(dial_chars)))
    dial = "".join(s + c for s, c in zip(seps, dial_chars, strict=True))
    mask = draw(st.lists(st.booleans(), max_size=len(dial)))
    upper = draw(st.booleans())
    host = draw(st.sampled_from(HOSTS))
    context = f";phone-context=+{cc}" if kind == "context" else ""
    forms = ["sip", "sip_phone", "sip_password", "sip_params", "tel"]
    if kind != "context":
        forms.append("bare")
    form = draw(st.sampled_from(forms))
    if form == "bare":
        return dial, home
    user = percent_encode(dial, mask, upper) + context
    if form == "tel":
        return f"{random_case(draw, 'tel')}:{user}", home
    scheme = random_case(draw, draw(st.sampled_from(["sip", "sips"])))
    if form == "sip_phone":
        return f"{scheme}:{user}@{host};user=phone", home
    if form == "sip_password":
        return f"{scheme}:{user}:s3cret@{host}", home
    if form == "sip_params":
        return f"{scheme}:{user}@{host};transport=tcp;lr?Subject=test&Priority=normal", home
    return f"{scheme}:{user}@{host}", home


@PROPERTY
@given(emergency_targets())
def test_any_spelling_of_any_emergency_number_is_refused(target: tuple[str, str]) -> None:
    uri, home = target
    assert refusal(uri, home=home).reason == "emergency_number"


@PROPERTY
@given(emergency_targets(), st.booleans())
def test_undeclared_emergency_numbers_are_refused_as_emergency(
    target: tuple[str, str], declared: bool
) -> None:
    uri, home = target
    assert refusal(uri, home=home, declared=declared).reason == "emergency_number"


@settings(max_examples=500, deadline=None)
@given(
    st.sampled_from(ALL_REGIONS),
    st.text(alphabet="0123456789+*#- ()", min_size=1, max_size=8),
)
def test_never_weaker_than_libphonenumber(home: str, number: str) -> None:
    if connects_to_emergency_number(number, home):
        assert refusal(number, home=home).reason == "emergency_number"
        assert refusal(f"sip:{number.replace(' ', '')}@h", home=home).reason == ("emergency_number")


@settings(max_examples=200, deadline=None)
@given(
    st.sampled_from(EMERGENCY_REGIONS).flatmap(lambda r: st.tuples(st.just(r), st.sampled_from(NUMBERS[r]))),
    st.lists(st.sampled_from(DEFAULT_DIAL_PREFIXES), min_size=1, max_size=4),
)
def test_prefix_stacks_in_any_order(pair: tuple[str, str], stack: list[str]) -> None:
    region, number = pair
    dial = "".join(stack) + number
    assert refusal(dial, home=region).reason == "emergency_number"
    assert refusal(f"sip:{dial}@h", home=region).reason == "emergency_number"


# ----------------------------------------------------------- specific forms


@pytest.mark.parametrize(
    ("uri", "home"),
    [
        ("sip:0999@h", "GB"),
        ("sip:%39%39%39@h", "GB"),
        ("sip:%2539%2539%2539@h", "GB"),  # encoded twice
        ("sip:9-9-9@h", "GB"),
        ("sip:(999)@h", "GB"),
        ("sip:9 9 9@h", "GB"),
        ("sip:999;user=phone@h", "GB"),
        ("sip:999@h;user=phone", "GB"),
        ("sip:999:pw@h", "GB"),
        ("sip:999@h?Subject=x", "GB"),
        ("SIP:999@h", "GB"),
        ("Sips:999@h", "GB"),
        ("tel:999", "GB"),
        ("TEL:+44-999", "US"),
        ("tel:999;phone-context=+44", "US"),
        ("tel:999;phone-context=+44-20", "US"),
        ("tel:999;phone-context=example.com", "GB"),
        ("tel:911;phone-context=example.com", "US"),
        ("tel:+441632960000;ext=999", "GB"),
        ("9141999", "GB"),
        ("*67 9 0999", "GB"),
        ("*67 9 1 911", "US"),
        ("1470 999", "GB"),
        ("*31#112", "DE"),
        ("#31#112", "DE"),
        ("*31*112", "DE"),
        ("*82 911", "US"),
        ("*99*112", "FR"),  # any * service code
        ("1010288 911", "US"),  # NANP dial-around carrier code
        ("01013 112", "DE"),  # call-by-call
        ("sip:A911@h", "US"),  # DTMF A-D
        ("sip:d-112@h", "DE"),
        ("9p999", "GB"),  # a pause
        ("9,999", "GB"),
        ("9w999", "GB"),
        ("0044 999", "US"),
        ("011 44 999", "US"),
        ("9 011 44 999", "US"),
        ("+44 (0) 999", "FR"),
        ("sip:+44-(0)-999@h;user=phone", "FR"),
        ("sip:１１２@h", "GB"),  # fullwidth digits
        ("sip:٩٩٩@h", "GB"),  # Arabic-Indic digits
        ("sip:9\u200b99@h", "GB"),  # zero-width space
        ("sip:%EF%BC%99%EF%BC%99%EF%BC%99@h", "GB"),  # fullwidth, percent-encoded
        ("sip:999test@h", "GB"),
        ("sip:999-ecpm@h", "GB"),
        ("sip:+1911abc@h", "GB"),
        ("sip:999", "GB"),  # no user: the host is the dial target
        ("sip:999.example.com", "GB"),
        ("<sip:999@h>", "GB"),
        ('"Test" <sip:112@h>', "GB"),
        ("  sip:999@h  ", "GB"),
        ("sip:44+999@h", "GB"),
        ("sip://999@h", "GB"),
        ("sip:999%40evil@h", "GB"),
        ("sip:%2B44999@h", "US"),
        ("sip:999%3Bphone-context=+44@h", "US"),
    ],
)
def test_specific_emergency_forms_are_refused(uri: str, home: str) -> None:
    refused = refusal(uri, home=home)
    assert refused.reason == "emergency_number", refused.detail


def test_refusal_detail_names_the_number_and_region() -> None:
    refused = refusal("sip:0999@h", home="GB")
    assert refused.detail == "'sip:0999@h' dials 999, an emergency number in GB"
    assert refused.uri == "sip:0999@h"
    assert str(refused) == refused.detail
    assert isinstance(refused, EcpmError)
    prefix = refusal("sip:9991234@h", home="GB")
    assert "starts with 999, an emergency number in GB" in prefix.detail
    core = refusal("sip:+44911@h", home="GB")
    assert "911" in core.detail and "universal" in core.detail
    assert "in US" in refusal("+1 911", home="GB").detail


@pytest.mark.parametrize(
    "uri",
    [
        "urn:service:sos",
        "URN:SERVICE:SOS",
        "urn:service:sos.police",
        "urn:service:sos.fire",
        "urn:service:sos.ambulance",
        "urn:service:Sos.Marine",
        "urn:service:sos.animal-control",
        "urn:service:%73os",
        "urn:service:sos%2Epolice",
        "urn:nena:service:sos",
        "sip:urn:service:sos@h",
        "sip:urn:service:sos.police@h",
        "sip:urn%3Aservice%3Asos@h",
        "sip:URN%3aSERVICE%3aSOS.FIRE@h",
        "sip:sos@host",
        "sip:SOS@host",
        "sip:SOS.fire@host",
        "sip:sos;x@host",
        "sip:sos-police@host",
        "sip:%73%6F%73@host",
        "sip:emergency@host",
        "sips:Emergency.Services@host",
        "sip:ecpm-emergency@host",
        "sip:s.o.s@host",
        "tel:sos",
        "sos",
        "sip:sos",
        "sip:ｓｏｓ@host",  # fullwidth
        "<urn:service:sos>",
        "im:sos@host",
    ],
)
def test_sos_services_are_refused(uri: str) -> None:
    refused = refusal(uri, home="GB")
    assert refused.reason == "sos_service", refused.detail


@pytest.mark.parametrize(
    "uri",
    [
        "urn:service:test.sos",
        "urn:service:test.sos.police",
        "urn:service:test.sos.fire",
        "urn:service:test.sos.fire.something",
        "URN:Service:Test.SOS.Ambulance",
        "urn:service:test.sos.animal-control",
        "sip:urn:service:test.sos@127.0.0.1",
        "sip:test.sos.police@127.0.0.1",
    ],
)
def test_test_sos_service_is_allowed(uri: str) -> None:
    allowed(uri)


@PROPERTY
@given(st.lists(st.from_regex(r"[a-z0-9][a-z0-9\-]{0,10}", fullmatch=True), max_size=3))
def test_any_test_sos_sub_service_is_allowed(subs: list[str]) -> None:
    uri = "urn:service:test.sos" + "".join("." + s for s in subs)
    allowed(uri)


@PROPERTY
@given(st.lists(st.from_regex(r"[a-z0-9][a-z0-9\-]{0,10}", fullmatch=True), max_size=3))
def test_any_sos_sub_service_is_refused(subs: list[str]) -> None:
    uri = "urn:service:sos" + "".join("." + s for s in subs)
    assert refusal(uri, home="GB").reason == "sos_service"
    assert refusal(f"sip:{uri}@h", home="GB").reason == "sos_service"


@pytest.mark.parametrize(
    "uri",
    [
        "",
        "   ",
        "sip:",
        "sip:@h",
        "sip:ecpm-test@",
        "tel:",
        "urn:",
        "urn:service:test.sosx",
        "urn:service:counselling",
        "urn:nena:callid:x",
        "urn:service:test.sos;x=1",
        "http://example.com/999x",
        "mailto:ops@example.com",
        "h323:ecpm@h",
        "ecpm-test@127.0.0.1",
        "localhost:5060",
        '"Test" <sip:ecpm-test@h>',
        "sip:%2525252539%2525252539%2525252539@h",  # nested beyond any switch
        "sip:" + "1" * 300 + "@h",
        "sip:ecpm-test@h;" + "x" * 3000,
    ],
)
def test_unsupported_and_unparseable_targets_are_refused(uri: str) -> None:
    refused = refusal(uri, home="GB")
    assert refused.reason == "unsupported_uri", refused.detail


# ------------------------------------------------------- what must pass

# Ofcom's numbers reserved for drama: national significant number prefix + 3 digits.
DRAMA_PREFIXES = [
    "2079460",  # London 020 7946 0xxx
    "1214960",  # Birmingham
    "1134960",  # Leeds
    "1144960",  # Sheffield
    "1154960",  # Nottingham
    "1164960",  # Leicester
    "1174960",  # Bristol
    "1184960",  # Reading
    "1314960",  # Edinburgh
    "1414960",  # Glasgow
    "1514960",  # Liverpool
    "1614960",  # Manchester
    "1914980",  # Tyneside
    "2896496",  # Northern Ireland 028 9649 6xxx
    "2920180",  # Cardiff
    "1632960",  # no area
    "7700900",  # mobile
    "8081570",  # freephone
    "9098790",  # premium rate
    "3069990",  # UK-wide
]


@st.composite
def drama_numbers(draw: st.DrawFn) -> str:
    """The national significant number of an Ofcom drama number."""
    return draw(st.sampled_from(DRAMA_PREFIXES)) + draw(
        st.text(alphabet="0123456789", min_size=3, max_size=3)
    )


def spaced(number: str, cuts: list[int], sep: str) -> str:
    out = ""
    for i, ch in enumerate(number):
        out += (sep if i in cuts else "") + ch
    return out


@PROPERTY
@given(
    drama_numbers(),
    st.lists(st.integers(1, 9), max_size=3),
    st.sampled_from(SEPARATORS[:8]),
    st.sampled_from(ALL_REGIONS),
)
def test_drama_numbers_pass_in_every_form(number: str, cuts: list[int], sep: str, home: str) -> None:
    written = spaced(number, cuts, sep)
    international = f"+44{sep}{written}"
    national = f"0{written}"
    allowed(f"sip:+44{number}@127.0.0.1;user=phone", home=home)
    allowed(f"sips:+44{number}@[::1]:5061;transport=tls", home=home)
    allowed(f"sip:{international.replace(' ', '%20')}@h;user=phone", home=home)
    allowed(f"tel:{international}", home=home)
    allowed(international, home=home)
    if international_prefix(home) == "00":
        # Not from every home: in SG (prefix 0[0-3]\d) 004 41 144... dials CH's 144.
        allowed(f"00{sep}44{sep}{written}", home=home)
    allowed(f"tel:{national};phone-context=+44", home="GB")
    # Escaped digits (read decoded, and literally: '%30' is '3','0' to a switch that
    # does not decode; a literal '%20' between digits could be, so spaces are dropped).
    escaped = "".join(f"%3{c}" if c.isdigit() else c for c in national.replace(" ", ""))
    allowed(f"sip:{escaped}@127.0.0.1", home="GB")
    allowed(national, home="GB")


@pytest.mark.parametrize(
    ("uri", "home"),
    [
        ("sip:ecpm-test@127.0.0.1:5090", "GB"),
        ("sips:ecpm-test@[::1]:5061;transport=tls", "GB"),
        ("sip:+441632960000@127.0.0.1;user=phone", "GB"),
        ("sip:+44-20-7946-0000@127.0.0.1;user=phone", "US"),
        ("tel:+441632960123", "GB"),
        ("tel:+44-113-496-0999", "DE"),
        ("urn:service:test.sos.police", "GB"),
        ("sip:responder@responder.example.net", "GB"),
        ("sip:127.0.0.1:5090", "GB"),
        ("sip:[::1]:5090;transport=tcp", "GB"),
        ("sip:112.0.0.1:5060", "GB"),  # an IP address, not a number
        ("sip:ecpm-test:p4ss@127.0.0.1", "GB"),
        ("sip:ecpm-test@127.0.0.1?Subject=hello", "GB"),
        ("sip:site11-lab2@h", "GB"),  # a name's digit runs are judged one by one, not joined
        ("SIP:Ecpm-Test@H", "GB"),
        ("+12025550123", "GB"),
        ("sip:933@h", "US"),
        ("tel:+61-491-570-006", "AU"),  # ACMA fictitious mobile range
        ("sip:ecpm-test@sos.example.com", "GB"),  # the domain is not dialled
    ],
)
def test_ordinary_test_endpoints_pass(uri: str, home: str) -> None:
    allowed(uri, home=home)


# ------------------------------------------------------------- declaration


def test_undeclared_targets_are_refused() -> None:
    refused = refusal("sip:ecpm-test@127.0.0.1:5090", home="GB", declared=False)
    assert refused.reason == "undeclared"
    assert "not declared as a test endpoint" in refused.detail
    assert refusal("urn:service:test.sos", home="GB", declared=False).reason == "undeclared"


@settings(max_examples=100, deadline=None)
@given(drama_numbers())
def test_undeclared_drama_numbers_are_refused(number: str) -> None:
    uri = f"sip:+44{number}@h"
    assert refusal(uri, home="GB", declared=False).reason == "undeclared"


def test_truthy_non_bool_is_not_a_declaration() -> None:
    refused = refusal("sip:ecpm-test@h", home="GB", declared="yes")  # type: ignore[arg-type]
    assert refused.reason == "undeclared"


# ---------------------------------------------------------------- opt-in


def test_carrier_test_service_lets_exactly_its_number_through() -> None:
    opt_in = CarrierTestService("933", "US")
    allowed("sip:933@h", home="US", carrier_test_service=opt_in)
    allowed("tel:933", home="US", carrier_test_service=opt_in)
    # A number the guard refuses on its own, named by an opt-in.
    prefixed = CarrierTestService("01120", "US")
    assert refusal("sip:01120@h", home="US").reason == "emergency_number"
    allowed("sip:01120@h", home="US", carrier_test_service=prefixed)
    allowed("sip:0-1120@h", home="US", carrier_test_service=prefixed)
    allowed("sip:%30%31%31%32%30@h", home="US", carrier_test_service=prefixed)


def test_carrier_test_service_is_bound_to_its_region() -> None:
    prefixed = CarrierTestService("01120", "US")
    for home in ("GB", "CA", "DE"):
        refused = refusal("sip:01120@h", home=home, carrier_test_service=prefixed)
        assert refused.reason == "emergency_number"
    # Judged in another region's context through phone-context or '+'.
    for uri in ("tel:01120;phone-context=+44", "tel:01120;phone-context=+1", "sip:+101120@h"):
        refused = refusal(uri, home="US", carrier_test_service=prefixed)
        assert refused.reason == "emergency_number"


def test_carrier_test_service_allows_nothing_else() -> None:
    opt_in = CarrierTestService("933", "US")
    for uri in ("sip:911@h", "sip:9911@h", "sip:+1911@h", "tel:112", "911"):
        refused = refusal(uri, home="US", carrier_test_service=opt_in)
        assert refused.reason == "emergency_number", uri
    refused = refusal("sip:sos@h", home="US", carrier_test_service=opt_in)
    assert refused.reason == "sos_service"
    refused = refusal("sip:933@h", home="US", declared=False, carrier_test_service=opt_in)
    assert refused.reason == "undeclared"
    refused = refusal("tel:933;ext=911", home="US", carrier_test_service=opt_in)
    assert refused.reason == "emergency_number"


@pytest.mark.parametrize(
    ("number", "region", "message"),
    [
        ("911", "US", "dials 911, an emergency number in US"),
        ("112", "US", "dials 112"),
        ("112", "GB", "dials 112"),
        ("999", "GB", "dials 999"),
        ("0999", "GB", "dials 999"),  # the trunk prefix is stripped
        ("9911", "US", "dials 911"),  # so is an access code
        ("1-911", "US", "dials 911"),
        ("000", "DE", "dials 000, an emergency number in every region"),
        ("119", "GB", "dials 119"),
        ("15", "FR", "dials 15, an emergency number in FR"),
        ("1122", "US", "starts with 112"),
        ("9119", "US", "dials 119"),
        ("911", "us", "region codes are uppercase"),
        ("933", "ZZ", "not a known region code"),
        ("933", "", "not a known region code"),
        ("", "US", "must be a national dial string"),
        ("+1933", "US", "no '+'"),
        ("93x", "US", "no letters"),
    ],
)
def test_carrier_test_service_validation(number: str, region: str, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        CarrierTestService(number, region)


@settings(max_examples=200, deadline=None)
@given(
    st.sampled_from(EMERGENCY_REGIONS).flatmap(lambda r: st.tuples(st.just(r), st.sampled_from(NUMBERS[r])))
)
def test_no_opt_in_names_an_emergency_number(pair: tuple[str, str]) -> None:
    region, number = pair
    with pytest.raises(ValueError):
        CarrierTestService(number, region)
    trunk = trunk_prefix(region)
    if trunk:
        with pytest.raises(ValueError):
            CarrierTestService(trunk + number, region)
    for core in UNIVERSAL_EMERGENCY_NUMBERS:
        with pytest.raises(ValueError):
            CarrierTestService(core, region)


def test_opt_in_is_rechecked_against_extra_prefixes() -> None:
    # Valid under the defaults; with a probe prefix '7', '7112' dials 112.
    opt_in = CarrierTestService("7112", "US")
    allowed("sip:7112@h", home="US", carrier_test_service=opt_in)
    refused = refusal("sip:7112@h", home="US", dial_prefixes=("7",), carrier_test_service=opt_in)
    assert refused.reason == "emergency_number"


# ------------------------------------------------------------ validation


@pytest.mark.parametrize("home", ["gb", "ZZ", "", "UK", "001", "G B"])
def test_home_region_is_validated(home: str) -> None:
    with pytest.raises(ValueError, match="region"):
        check_dial_target("sip:ecpm-test@h", declared_test_endpoint=True, home_region=home)
    with pytest.raises(ValueError, match="region"):
        Guard(home_region=home)


@pytest.mark.parametrize("prefixes", [("",), ("9a",), ("+44",), "9"])
def test_dial_prefixes_are_validated(prefixes: tuple[str, ...] | str) -> None:
    with pytest.raises(ValueError, match="prefix"):
        Guard(home_region="GB", dial_prefixes=prefixes)


def test_extra_dial_prefixes_extend_the_defaults() -> None:
    guard = Guard(home_region="GB", dial_prefixes=["7"])
    assert set(DEFAULT_DIAL_PREFIXES) < set(guard.dial_prefixes)
    assert "7" in guard.dial_prefixes
    assert refusal("7999", home="GB", dial_prefixes=["7"]).reason == "emergency_number"
    assert refusal("9999", home="GB", dial_prefixes=[]).reason == "emergency_number"


def test_expanded_emergency_metadata_is_used_when_present(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    class Desc:
        def __init__(self, pattern: str) -> None:
            self.national_number_pattern = pattern

    class Meta:
        emergency = Desc("112")
        expanded_emergency = Desc("1(?:12|23)")

    monkeypatch.setattr(PhoneMetadata, "short_metadata_for_region", lambda region, default: Meta())
    uncached: Callable[[str], tuple[str, ...]] = guard_module._emergency_patterns.__wrapped__
    assert uncached("XX") == ("112", "1(?:12|23)")


# ----------------------------------------------------------------- Guard


def test_guard_logs_and_counts_refusals(caplog: pytest.LogCaptureFixture) -> None:
    guard = Guard(home_region="GB")
    assert guard.refusals == dict.fromkeys(REASONS, 0)
    caplog.set_level(logging.WARNING, logger="probes.guard")
    guard.check("sip:ecpm-test@127.0.0.1:5090", target="lab", declared_test_endpoint=True)
    assert caplog.records == []
    attempts = [
        ("sip:0999@h", True, "emergency_number"),
        ("tel:+44999", True, "emergency_number"),
        ("urn:service:sos", True, "sos_service"),
        ("http://x", True, "unsupported_uri"),
        ("sip:ecpm-test@h", False, "undeclared"),
    ]
    for uri, declared, reason in attempts:
        with pytest.raises(GuardRefusal) as caught:
            guard.check(uri, target="t1", declared_test_endpoint=declared)
        assert caught.value.reason == reason
    assert guard.refusals == {
        "undeclared": 1,
        "emergency_number": 2,
        "sos_service": 1,
        "unreadable": 0,
        "unsupported_uri": 1,
    }
    assert len(caplog.records) == 5
    first = caplog.records[0]
    assert first.levelno == logging.WARNING
    assert getattr(first, "guard_reason", None) == "emergency_number"
    assert getattr(first, "guard_target", None) == "t1"
    assert [getattr(r, "guard_reason", None) for r in caplog.records] == [a[2] for a in attempts]
    assert first.getMessage() == (
        "guard refused 'sip:0999@h' (target t1): 'sip:0999@h' dials 999, an emergency number in GB"
    )
    snapshot = guard.refusals
    snapshot["undeclared"] = 99
    assert guard.refusals["undeclared"] == 1


def test_guard_hides_passwords_in_logs(caplog: pytest.LogCaptureFixture) -> None:
    guard = Guard(home_region="GB")
    caplog.set_level(logging.WARNING, logger="probes.guard")
    with pytest.raises(GuardRefusal) as caught:
        guard.check("sip:999:hunter2@h", target="t", declared_test_endpoint=True)
    assert "hunter2" not in caplog.text
    assert "hunter2" not in caught.value.detail
    assert caught.value.uri == "sip:999:hunter2@h"


def test_guard_uses_its_home_region_and_opt_in() -> None:
    guard = Guard(home_region="US")
    opt_in = CarrierTestService("01120", "US")
    guard.check("sip:01120@h", target="t", declared_test_endpoint=True, carrier_test_service=opt_in)
    with pytest.raises(GuardRefusal):
        guard.check("sip:01120@h", target="t", declared_test_endpoint=True)
    assert guard.refusals["emergency_number"] == 1
    assert guard.home_region == "US"


def test_guard_counts_are_thread_safe() -> None:
    guard = Guard(home_region="GB")
    rounds = 200

    def hammer() -> None:
        for _ in range(rounds):
            with pytest.raises(GuardRefusal):
                guard.check("sip:999@h", target="t", declared_test_endpoint=True)

    threads = [threading.Thread(target=hammer) for _ in range(4)]
    logging.getLogger("probes.guard").disabled = True
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        logging.getLogger("probes.guard").disabled = False
    assert guard.refusals["emergency_number"] == 4 * rounds


def test_refusal_pickles() -> None:
    refused = refusal("sip:999@h", home="GB")
    again = pickle.loads(pickle.dumps(refused))
    assert (again.uri, again.reason, again.detail) == (refused.uri, refused.reason, refused.detail)


# ------------------------------------------------------------ robustness


@settings(max_examples=1000, deadline=None)
@given(
    st.one_of(
        st.text(max_size=40),
        st.text(alphabet="sipteluwrn:;@%+*#0123456789-.() ?=&/<>\"'", max_size=40),
        st.builds(
            lambda scheme, body: scheme + body,
            st.sampled_from(["sip:", "sips:", "tel:", "urn:service:", "SIP:", ""]),
            st.text(alphabet="0123456789%+*#;=@:.-abcdefsoSO", max_size=30),
        ),
    ),
    st.sampled_from(["GB", "US", "FR", "BR", "AU", "IO", "GN"]),
)
def test_any_input_is_judged_without_crashing(uri: str, home: str) -> None:
    try:
        check_dial_target(uri, declared_test_endpoint=True, home_region=home)
    except GuardRefusal as refused:
        assert refused.reason in REASONS
        assert refused.detail


@settings(max_examples=500, deadline=None)
@given(
    st.sampled_from(ALL_REGIONS),
    st.text(alphabet="0123456789", min_size=1, max_size=8),
    st.sampled_from(["sip:{}@h", "tel:{}", "sip:{}@h;user=phone", "{}", "sip:%2B{}@h"]),
)
def test_anything_libphonenumber_calls_emergency_is_refused_in_every_form(
    home: str, number: str, form: str
) -> None:
    if connects_to_emergency_number(number, home):
        assert refusal(form.format(number), home=home).reason == "emergency_number"


def test_too_long_emergency_dial_string_is_refused_as_emergency() -> None:
    assert refusal("0" * 128, home="GB").reason == "emergency_number"
    assert refusal("1" * 128, home="GB").reason == "unsupported_uri"
