"""``ecpm report``: the evidence report for a period, as HTML, JSON and CSV.

    ecpm report --from 2026-11-01 --to 2026-12-01 --format html,json,csv --out evidence/ -c monitor.yaml

Times are RFC 3339 (``2026-11-02T10:00:00Z``, ``...+01:00``) or a UTC date (midnight
at the start of that day); the period is ``[from, to)``. Exit 0 when the report was
written and the ledger verified, 1 when it was written but the ledger is BROKEN,
2 for a usage or config error (one line, no traceback).
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from pathlib import Path

from ecpm.configfile import load_config
from ecpm.errors import UsageError
from monitor.config import Ingest, MonitorConfig, Reachability, Service
from monitor.db_command import add_where, where_of
from monitor.report import Report, TargetInfo, build_report, known_targets
from monitor.report_render import FORMATS, write
from monitor.store import ReportSource, open_store, shown

_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
_RFC3339 = re.compile(r"^\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d{1,9})?([Zz]|[+-]\d{2}:\d{2})$")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--from", dest="start", required=True, metavar="TIME", help="start (RFC 3339, or YYYY-MM-DD in UTC)"
    )
    parser.add_argument(
        "--to",
        dest="end",
        required=True,
        metavar="TIME",
        help="end, exclusive (RFC 3339, or YYYY-MM-DD in UTC)",
    )
    parser.add_argument(
        "--target",
        action="append",
        default=[],
        metavar="ID",
        help="report on this target only (repeatable; default: every target)",
    )
    parser.add_argument(
        "--format",
        default=",".join(FORMATS),
        metavar="LIST",
        help=f"comma-separated formats out of {', '.join(FORMATS)} (default: all)",
    )
    parser.add_argument("--out", required=True, metavar="DIR", help="directory to write the report into")
    parser.add_argument(
        "--progress",
        action="store_true",
        help="show progress on stderr (default: only when it is a terminal)",
    )
    add_where(parser, "monitor config (its store and targets are used)")


def parse_moment(text: str, option: str) -> datetime:
    """``YYYY-MM-DD`` (00:00 UTC) or an RFC 3339 time with an offset; UTC."""
    value = text.strip()
    try:
        if _DATE.match(value):
            return datetime.combine(date.fromisoformat(value), datetime.min.time(), UTC)
        if _RFC3339.match(value):
            normal = value.upper().replace(" ", "T").replace("Z", "+00:00")
            return datetime.fromisoformat(normal).astimezone(UTC)
    except ValueError as exc:
        raise UsageError(f"{option} {text!r}: {exc}") from None
    raise UsageError(
        f"{option} {text!r} is not a time: use RFC 3339 with an offset (2026-11-02T10:00:00Z)"
        " or a date (2026-11-02)"
    )


def parse_formats(text: str) -> list[str]:
    chosen = [f.strip().lower() for f in text.split(",") if f.strip()]
    unknown = [f for f in chosen if f not in FORMATS]
    if unknown or not chosen:
        raise UsageError(f"--format {text!r}: choose from {', '.join(FORMATS)}")
    return chosen


class _Progress:
    """One updating line on stderr."""

    def __init__(self) -> None:
        self.started = time.monotonic()

    def __call__(self, message: str) -> None:
        elapsed = time.monotonic() - self.started
        sys.stderr.write(f"\r\x1b[Kecpm report [{elapsed:5.1f}s] {message}")
        sys.stderr.flush()

    def done(self) -> None:
        sys.stderr.write("\r\x1b[K")
        sys.stderr.flush()


@dataclass(frozen=True, slots=True)
class _Settings:
    """The store the report reads, and the monitor's rules it applies (its config's, or the
    defaults with ``--db``)."""

    path: str
    configured: tuple[TargetInfo, ...] = ()
    rules: Reachability = field(default_factory=Reachability)
    ingest: Ingest = field(default_factory=Ingest)
    services: tuple[Service, ...] = ()  # the config's: its redundancy-lost periods are reported


def run(args: argparse.Namespace) -> int:
    start, end, now = _period(args)
    formats = parse_formats(args.format)
    settings = _settings(args)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {args.out} exists and is not a directory")

    store = open_store(settings.path, read_only=True)
    try:
        targets = _targets(store, settings, args.target)
        progress = _Progress() if args.progress or sys.stderr.isatty() else None
        report = build_report(
            store,
            start=start,
            end=end,
            targets=targets,
            generated_at=now,
            store_name=shown(settings.path),
            pdd_threshold=settings.rules.degraded_post_dial_delay,
            max_clock_skew=settings.ingest.max_clock_skew,
            progress=progress,
            services=settings.services,
        )
        written = _write(report, out, formats, progress, shown_as=args.out)
    finally:
        store.close()
    return _outcome(report, written)


def _period(args: argparse.Namespace) -> tuple[datetime, datetime, datetime]:
    """``[--from, --to)`` and now; a period starting in the future is refused."""
    start = parse_moment(args.start, "--from")
    end = parse_moment(args.end, "--to")
    if end <= start:
        raise UsageError(f"--from {args.start} must be before --to {args.end}")
    now = datetime.now(UTC)
    if start >= now:
        raise UsageError(f"--from {args.start} is in the future: nothing to report yet")
    return start, end, now


def _settings(args: argparse.Namespace) -> _Settings:
    if args.config:
        config = load_config(args.config, MonitorConfig)
        settings = _Settings(
            where_of(args, config),
            tuple(
                TargetInfo(t.id, t.description, config.reachability.stale_after * t.interval)
                for t in config.targets
            ),
            config.reachability,
            config.ingest,
            tuple(config.services),
        )
    else:
        settings = _Settings(where_of(args, None))
    return settings


def _targets(store: ReportSource, settings: _Settings, wanted: list[str]) -> list[TargetInfo]:
    """The targets reported on: every known one, or those ``--target`` names (in that order)."""
    targets = known_targets(store, settings.configured)
    if wanted:
        by_id = {t.id: t for t in targets}
        unknown = [t for t in wanted if t not in by_id]
        if unknown:
            known = ", ".join(sorted(by_id)) or "none"
            raise UsageError(f"unknown target {', '.join(unknown)} (known: {known})")
        targets = [by_id[t] for t in dict.fromkeys(wanted)]
    if not targets:
        raise UsageError(f"no targets: {shown(settings.path)} has no state history and no config names any")
    return targets


def _write(
    report: Report, out: Path, formats: list[str], progress: _Progress | None, *, shown_as: str
) -> list[Path]:
    if progress is not None:
        progress("writing " + ", ".join(formats))
    try:
        written = write(report, out, formats)
    except OSError as exc:
        raise UsageError(f"cannot write the report into {shown_as}: {exc.strerror or exc}") from None
    if progress is not None:
        progress.done()
    return written


def _outcome(report: Report, written: list[Path]) -> int:
    """Name what was written; say what the report could not read; exit 1 when the ledger is broken."""
    for item in written:
        print(item)
    if report.unreadable:
        print(
            f"ecpm report: {len(report.unreadable)} stored result(s) cannot be read (quarantined);"
            " the report names them and counts none of them",
            file=sys.stderr,
        )
    if not report.ledger.ok:
        print(f"ecpm report: ledger {report.ledger.status}", file=sys.stderr)
        return 1
    return 0
