"""``ecpm call URI``: place one test call (or OPTIONS) now and print the staged result.

Exit codes: 0 pass; 1 fail or inconclusive (also when interrupted, and when the far
end names a remote target the guard refuses: the call is ended, ``guard.where`` in the
detail); 2 usage or config error, and a target the live-number guard refuses (nothing
is sent).

The URI on the command line counts as a declared test endpoint, but it still
passes the guard inside the SIP engine like every other dial. ``-c probe.yaml
--target ID`` takes that target's transport, proxy, auth, emergency shape and
check settings (and the probe's region, SIP settings and dial prefixes); flags
given on the command line override them.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import sys
from typing import Any

from pydantic import ValidationError

from ecpm.configfile import load_config
from ecpm.errors import UsageError
from probes.check_kinds import REGISTRY
from probes.config import (
    Checks,
    InviteCheck,
    OptionsCheck,
    ProbeConfig,
    SipSettings,
    Target,
)
from probes.guard import DEFAULT_DIAL_PREFIXES, Guard
from probes.outcome import CheckOutcome
from probes.result import Media, format_time
from probes.sip import SipEngine

EXIT_PASS, EXIT_FAIL, EXIT_USAGE = 0, 1, 2
_INVITE_DURATIONS = (
    "interval", "first_response_timeout", "answer_timeout", "media_time", "max_duration", "dtmf_timeout",
)  # fmt: skip


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("uri", nargs="?", help="the test endpoint, e.g. sip:ecpm-test@127.0.0.1:5090")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.add_argument("-c", "--config", metavar="PROBE_YAML", help="probe config to take a target from")
    parser.add_argument("--target", metavar="ID", help="target id in --config")
    parser.add_argument("--region", help="home region for the live-number guard (default GB)")
    parser.add_argument("--bind", help="local address for SIP and RTP (default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="local SIP port (default: any)")
    parser.add_argument("--transport", choices=["udp", "tcp", "tls"], help="default udp")
    parser.add_argument("--proxy", metavar="URI", help="outbound proxy, e.g. sip:192.0.2.1:5060;lr")
    parser.add_argument("--options", action="store_true", help="send OPTIONS instead of a test call")
    group = parser.add_argument_group("invite timers and media")
    group.add_argument("--first-response-timeout", metavar="DUR", help="no response at all (default 3s)")
    group.add_argument("--answer-timeout", metavar="DUR", help="ringing without answer (default 4s)")
    group.add_argument("--media-time", metavar="DUR", help="listen this long after answer (default 2s)")
    group.add_argument("--max-duration", metavar="DUR", help="hard cap for the call (default 30s)")
    group.add_argument("--tone-hz", type=float, help="tone we send (default 1000)")
    group.add_argument("--expect-tone-hz", type=float, help="tone the responder plays (default 1400)")
    group.add_argument("--no-tone", action="store_true", help="do not require the responder's tone")
    group.add_argument("--no-echo", action="store_true", help="do not require our tone to come back")
    group.add_argument("--options-timeout", metavar="DUR", help="OPTIONS timeout (default 5s)")
    group.add_argument("--dtmf", metavar="DIGITS", help="send these DTMF digits; they must come back")
    group.add_argument(
        "--dtmf-method",
        choices=["rfc4733", "inband", "auto"],
        help="telephone-events, tones in the audio, or auto: rfc4733 when the answer offers it (default)",
    )
    group.add_argument("--srtp", choices=["off", "optional", "mandatory"], help="SDES-SRTP (default off)")
    parser.add_argument("--sip-log-level", type=int, choices=range(7), help="pjsip's own log level")


def _dur(seconds: float) -> str:
    return f"{seconds:.6f}s"


def _invite(base: InviteCheck | None, args: argparse.Namespace) -> InviteCheck:
    data: dict[str, Any] = {}
    if base is not None:
        data = base.model_dump()
        for key in _INVITE_DURATIONS:
            data[key] = _dur(data[key])
    for flag in ("first_response_timeout", "answer_timeout", "media_time", "max_duration", "tone_hz",
                 "expect_tone_hz"):  # fmt: skip
        value = getattr(args, flag)
        if value is not None:
            data[flag] = value
    if args.no_tone:
        data["expect_tone"] = False
    if args.no_echo:
        data["expect_echo"] = False
    if args.dtmf is not None:
        data["dtmf"] = args.dtmf
    if args.dtmf_method is not None:
        data["dtmf_method"] = args.dtmf_method
    return InviteCheck.model_validate(data)


def _options(base: OptionsCheck | None, args: argparse.Namespace) -> OptionsCheck:
    data: dict[str, Any] = {}
    if base is not None:
        data = base.model_dump()
        data["interval"] = _dur(data["interval"])
        data["timeout"] = _dur(data["timeout"])
    if args.options_timeout is not None:
        data["timeout"] = args.options_timeout
    return OptionsCheck.model_validate(data)


def _explain(exc: ValidationError) -> str:
    parts = []
    for error in exc.errors():
        loc = ".".join(str(p) for p in error["loc"]) or "(value)"
        parts.append(f"{loc}: {str(error['msg']).removeprefix('Value error, ')}")
    return "; ".join(parts)


def build(args: argparse.Namespace) -> tuple[Target, SipSettings, Guard]:
    """The target, SIP settings and guard this call uses. Raises UsageError/ConfigError."""
    probe, base = _configured(args)
    if base is None and not args.uri:
        raise UsageError("give a URI, or --config FILE --target ID")
    try:
        target = _target(base, args)
        if target.outbound_proxy is None and not target.uri.lower().startswith(("sip:", "sips:")):
            raise UsageError(f"{target.uri}: a urn: or tel: target needs an outbound proxy (--proxy)")
        sip = _sip_settings(probe.sip if probe is not None else SipSettings(), target, args)
    except ValidationError as exc:
        raise UsageError(_explain(exc)) from None
    return target, sip, _guard(probe, args)


def _configured(args: argparse.Namespace) -> tuple[ProbeConfig | None, Target | None]:
    """The probe config and its target named by ``--config``/``--target`` (None: not given)."""
    if not args.config:
        if args.target:
            raise UsageError("--target needs --config")
        return None, None
    probe = load_config(args.config, ProbeConfig)
    if not args.target:
        raise UsageError("--config needs --target ID")
    base = next((t for t in probe.targets if t.id == args.target), None)
    if base is None:
        known = ", ".join(t.id for t in probe.targets)
        raise UsageError(f"no target {args.target!r} in {args.config} (targets: {known})")
    return probe, base


def _target(base: Target | None, args: argparse.Namespace) -> Target:
    """The configured target (or the URI given) with the flags' checks, transport and proxy."""
    invite = _invite(base.checks.invite if base else None, args)
    options = _options(base.checks.options if base else None, args)
    if base is None:
        return Target(
            id="cli",
            uri=args.uri,
            test_endpoint=True,  # the operator named it: a declared test endpoint
            transport=args.transport or "udp",
            outbound_proxy=args.proxy,
            srtp=args.srtp or "off",
            checks=Checks(invite=invite, options=options),
        )
    update: dict[str, Any] = {"checks": Checks(invite=invite, options=options), "test_endpoint": True}
    if args.uri:
        update["uri"] = args.uri
    if args.transport:
        update["transport"] = args.transport
    if args.proxy:
        update["outbound_proxy"] = args.proxy
    if args.srtp:
        update["srtp"] = args.srtp
    return base.model_copy(update=update)


def _sip_settings(sip: SipSettings, target: Target, args: argparse.Namespace) -> SipSettings:
    """``sip`` with the flags' bind, port and log level, and the target's transport enabled."""
    overrides: dict[str, Any] = {}
    if args.bind:
        overrides["bind"] = args.bind
    if args.port is not None:
        overrides["port"] = args.port
    if args.sip_log_level is not None:
        overrides["log_level"] = args.sip_log_level
    if target.transport not in sip.transports:
        overrides["transports"] = [*sip.transports, target.transport]
    if overrides:
        sip = SipSettings.model_validate({**sip.model_dump(), **overrides})
    return sip


def _guard(probe: ProbeConfig | None, args: argparse.Namespace) -> Guard:
    region = args.region or (probe.probe.region if probe is not None else "GB")
    prefixes = probe.guard.dial_prefixes if probe is not None else list(DEFAULT_DIAL_PREFIXES)
    try:
        return Guard(home_region=region.upper(), dial_prefixes=prefixes)
    except ValueError as exc:
        raise UsageError(f"--region: {exc}") from None


# ------------------------------------------------------------------- output


def to_json(target: Target, outcome: CheckOutcome) -> dict[str, Any]:
    return {
        "target": target.id,
        "uri": target.uri,
        "check": outcome.check,
        "outcome": outcome.outcome,
        "started_at": format_time(outcome.started_at),
        "finished_at": format_time(outcome.finished_at),
        "stage": outcome.stage,
        "reason": outcome.reason,
        "sip_status": outcome.sip_status,
        "sip_reason": outcome.sip_reason,
        "timings": dict(outcome.timings),
        "media": None if outcome.media is None else Media.from_stats(outcome.media).to_dict(),
        "detail": dict(outcome.detail),
    }


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:9.1f} ms"


def report(target: Target, outcome: CheckOutcome) -> str:
    """The staged, human-readable result."""
    lines = [f"ecpm call {target.uri} ({outcome.check}, {target.transport})"]
    stages = REGISTRY[outcome.check].stages
    notes = {
        "ringing": "post-dial delay",
        "answer": f"{outcome.sip_status} {outcome.sip_reason}" if outcome.sip_status else "",
    }
    for stage in stages:
        if stage in outcome.timings:
            mark = "FAIL" if stage == outcome.stage else "ok"
            lines.append(
                f"  {stage:<10}{_ms(outcome.timings[stage])}  {mark:<4} {notes.get(stage, '')}".rstrip()
            )
        elif stage == outcome.stage:
            lines.append(f"  {stage:<10}{'-':>12}  FAIL")
    m = outcome.media
    if m is not None:
        echo = "not expected" if m.echo_heard is None else ("heard" if m.echo_heard else "NOT heard")
        mos = "-" if m.mos is None else f"{m.mos:.2f}"
        rtt = "-" if m.rtt_ms is None else f"{m.rtt_ms:.1f} ms"
        lines.append(
            f"  media: responder tone {'heard' if m.tone_heard else 'NOT heard'}, echo {echo}; "
            f"rx {m.rx_packets} tx {m.tx_packets} pkts, loss {m.loss * 100:.1f}%, "
            f"jitter {m.jitter_ms:.1f} ms, rtt {rtt}, MOS {mos}"
        )
    for key, value in outcome.detail.items():
        lines.append(f"  {key}: {value}")
    total = (outcome.finished_at - outcome.started_at).total_seconds()
    if outcome.outcome == "pass":
        lines.append(f"PASS in {total:.2f} s")
    else:
        status = f"SIP {outcome.sip_status} {outcome.sip_reason}" if outcome.sip_status else "no SIP status"
        where = outcome.stage or "-"
        lines.append(f"{outcome.outcome.upper()} at {where}: {outcome.reason} ({status}) in {total:.2f} s")
    return "\n".join(lines)


# ---------------------------------------------------------------------- run


async def _call(target: Target, sip: SipSettings, guard: Guard, options: bool) -> CheckOutcome:
    kind = REGISTRY["options" if options else "invite"]  # the CLI's two: a call, or --options
    async with SipEngine(sip, guard) as engine:
        return await kind.run(engine, target, kind.settings_of(target))


async def _main(target: Target, sip: SipSettings, guard: Guard, options: bool) -> CheckOutcome | None:
    loop = asyncio.get_running_loop()
    task = asyncio.ensure_future(_call(target, sip, guard, options))
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, task.cancel)
    try:
        return await task
    except asyncio.CancelledError:
        return None
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(ValueError, RuntimeError):
                loop.remove_signal_handler(sig)


def run(args: argparse.Namespace) -> int:
    target, sip, guard = build(args)
    outcome = asyncio.run(_main(target, sip, guard, bool(args.options)))
    if outcome is None:
        print("ecpm call: interrupted; the call was hung up", file=sys.stderr)
        return EXIT_FAIL
    if outcome.reason == "guard_refused" and "guard.where" not in outcome.detail:
        detail = outcome.detail.get("guard.detail", "refused")
        print(f"ecpm call: refused by the live-number guard, nothing was sent: {detail}", file=sys.stderr)
        return EXIT_USAGE
    if outcome.reason == "guard_refused":  # the far end's remote target: the path failed
        print(
            f"ecpm call: the far end's {outcome.detail['guard.where']} was refused by the live-number "
            f"guard; the call was ended without sending anything to it: {outcome.detail.get('guard.detail')}",
            file=sys.stderr,
        )
    if args.json:
        print(json.dumps(to_json(target, outcome), indent=2, sort_keys=True))
    else:
        print(report(target, outcome))
    return EXIT_PASS if outcome.outcome == "pass" else EXIT_FAIL


__all__ = ["add_arguments", "build", "report", "run", "to_json"]
