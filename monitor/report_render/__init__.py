"""Write a ``monitor.report.Report`` as JSON, CSV and self-contained HTML, one module a
format: ``json`` (``report.json``, ``docs/schema/report-v1.json``), ``csv`` (one file a
table, ``CSV_FILES``) and ``html`` (``report.html``).

Each format opens with the ledger verdict; a broken chain reads
``BROKEN at row N (result ID): problem`` first thing in every format.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Final

from monitor.report import Report
from monitor.report_render.csv import CSV_FILES, formula_like, write_csv
from monitor.report_render.html import pct, render_html, write_html
from monitor.report_render.json import report_json, write_json

__all__ = [
    "CSV_FILES",
    "FORMATS",
    "formula_like",
    "pct",
    "render_html",
    "report_json",
    "write",
    "write_csv",
    "write_html",
    "write_json",
]

FORMATS: Final = ("html", "json", "csv")


def write(report: Report, directory: Path, formats: Iterable[str]) -> list[Path]:
    """Write the chosen formats into ``directory`` (created if needed); the paths written."""
    directory.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    chosen = set(formats)
    if "json" in chosen:
        written.append(write_json(report, directory / "report.json"))
    if "csv" in chosen:
        written += write_csv(report, directory)
    if "html" in chosen:
        written.append(write_html(report, directory / "report.html"))
    return written
