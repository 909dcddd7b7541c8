"""Emergency numbers that libphonenumber's short-number data does not list.

The live-number guard (:mod:`probes.guard`) takes every region's ``emergency``
pattern from libphonenumber. That data lists what a *handset* must treat as an
emergency call, and for some regions it leaves out emergency services that a
switch still connects: Spain's is ``112``, ``080`` and ``085`` only, without the
national police (091), the local police (092) or the Guardia Civil (062).

Each row here names its region, the number, the service and where it is
published, and is refused exactly like libphonenumber's data (as a number and as
a prefix, nationally and under the region's country code). Rows are only ever
added: a row may duplicate libphonenumber's data, never relax it. docs/safety.md
renders the same table; tests/test_guard.py checks every row.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["SUPPLEMENTARY_EMERGENCY_NUMBERS", "SupplementaryNumber", "supplementary_numbers"]


@dataclass(frozen=True, slots=True)
class SupplementaryNumber:
    region: str  # ISO 3166 code, as libphonenumber spells it
    number: str  # national short number, digits only
    service: str
    source: str


def _rows(region: str, source: str, *entries: tuple[str, str]) -> tuple[SupplementaryNumber, ...]:
    return tuple(SupplementaryNumber(region, number, service, source) for number, service in entries)


SUPPLEMENTARY_EMERGENCY_NUMBERS: tuple[SupplementaryNumber, ...] = (
    *_rows(
        "ES",
        "Spain, Plan Nacional de Numeración Telefónica: short numbers 0XY attributed to "
        "emergency services (CNMC numbering register)",
        ("061", "health emergencies (urgencias sanitarias)"),
        ("062", "Guardia Civil"),
        ("088", "regional police (Mossos d'Esquadra, Ertzaintza, ...)"),
        ("091", "Policía Nacional"),
        ("092", "Policía Local"),
    ),
    *_rows(
        "IT",
        "Italy, Ministero delle Imprese e del Made in Italy / AGCOM numbering plan: numeri di emergenza",
        ("117", "Guardia di Finanza"),
        ("1515", "Carabinieri forestali (forest fires)"),
        ("1530", "Guardia Costiera (sea rescue)"),
    ),
    *_rows(
        "FR",
        "France, ARCEP national numbering plan: numéros d'urgence",
        ("114", "emergency number for deaf and hard-of-hearing callers"),
        ("115", "SAMU social (emergency shelter)"),
        ("191", "aeronautical rescue"),
        ("196", "maritime rescue (CROSS)"),
        ("197", "terror and abduction alert"),
    ),
    *_rows(
        "DE",
        "Germany, Bundesnetzagentur numbering: 19222 answered by rescue dispatch centres "
        "(Rettungsleitstelle) where still routed",
        ("19222", "ambulance and patient transport (legacy)"),
    ),
    *_rows(
        "US",
        "United States, FCC 20-100 (2020): 988 designated for the Suicide & Crisis Lifeline",
        ("988", "Suicide & Crisis Lifeline"),
    ),
    *_rows(
        "CA",
        "Canada, CRTC Telecom Decision 2022-234: 988 for suicide crisis help",
        ("988", "Suicide Crisis Helpline"),
    ),
    *_rows(
        "CN",
        "China, MIIT telecommunications numbering plan: special service numbers",
        ("122", "traffic police (road accidents)"),
        ("12395", "maritime search and rescue"),
    ),
    *_rows(
        "JP",
        "Japan Coast Guard: 118 emergency number for incidents at sea",
        ("118", "Japan Coast Guard"),
    ),
    *_rows(
        "KR",
        "Korea Coast Guard: 122 emergency number for incidents at sea",
        ("122", "Korea Coast Guard"),
    ),
    *_rows(
        "RU",
        "Russia, numbering plan (Minsvyaz order on emergency operational services): 01-04 and 101-104",
        ("04", "gas emergency service"),
        ("104", "gas emergency service"),
    ),
    *_rows(
        "BR",
        "Brazil, Anatel numbering regulation: serviços públicos de emergência",
        ("153", "Guarda Municipal"),
        ("185", "maritime rescue"),
        ("191", "Polícia Rodoviária Federal"),
        ("194", "Polícia Federal"),
        ("197", "Polícia Civil"),
        ("198", "Polícia Rodoviária Estadual"),
        ("199", "Defesa Civil"),
    ),
    *_rows(
        "TR",
        "Turkey, BTK numbering plan: emergency numbers routed to 112 centres",
        ("156", "Jandarma"),
        ("158", "Coast Guard"),
        ("177", "forest fires"),
    ),
    *_rows(
        "CH",
        "Switzerland, OFCOM (BAKOM) list of emergency and short numbers",
        ("143", "Die Dargebotene Hand (crisis line)"),
        ("145", "Tox Info Suisse (poisoning)"),
        ("147", "Pro Juventute (help for children and young people)"),
        ("1414", "Rega (air rescue)"),
        ("1415", "Air-Glaciers (air rescue, Valais)"),
    ),
    *_rows(
        "AT",
        "Austria, RTR list of emergency numbers (Notrufnummern)",
        ("128", "gas emergency"),
        ("140", "mountain rescue"),
        ("141", "doctors' emergency service"),
        ("142", "Telefonseelsorge (crisis line)"),
        ("147", "Rat auf Draht (help for children and young people)"),
    ),
    *_rows(
        "PL",
        "Poland, UKE: numery alarmowe",
        ("984", "water rescue"),
        ("985", "sea and mountain rescue"),
        ("986", "municipal guard (straż miejska)"),
        ("987", "crisis management centre"),
    ),
    *_rows(
        "GR",
        "Greece, EETT numbering plan: emergency numbers",
        ("108", "Coast Guard"),
    ),
    *_rows(
        "PT",
        "Portugal, ANACOM numbering plan: emergency numbers",
        ("117", "forest fires (SOS Floresta)"),
    ),
)


def supplementary_numbers(region: str) -> tuple[str, ...]:
    """The supplementary emergency numbers of ``region`` (empty if none)."""
    return tuple(row.number for row in SUPPLEMENTARY_EMERGENCY_NUMBERS if row.region == region)
