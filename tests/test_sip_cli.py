"""``ecpm call`` as a user runs it (a subprocess), against the responder on loopback."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.support.net import UdpSink, free_port
from tests.support.paths import REPO
from tests.support.processes import run_ecpm
from tests.support.sip import ResponderProcess

QUICK = [
    "--first-response-timeout",
    "1s",
    "--answer-timeout",
    "2s",
    "--media-time",
    "1s",
    "--max-duration",
    "10s",
]


def ecpm(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return run_ecpm(*args, timeout=timeout)


def test_call_passes_with_a_staged_report(clean_responder: ResponderProcess) -> None:
    run = ecpm("call", clean_responder.uri, *QUICK)
    assert run.returncode == 0, run.stdout + run.stderr
    lines = run.stdout.splitlines()
    assert lines[0] == f"ecpm call {clean_responder.uri} (invite, udp)"
    for stage in ("transport", "trying", "ringing", "answer", "media", "teardown"):
        assert any(line.split()[:1] == [stage] and " ok" in line for line in lines), (stage, run.stdout)
    assert "responder tone heard, echo heard" in run.stdout
    assert lines[-1].startswith("PASS in ")
    assert run.stderr == ""  # pjsip's log stays out of the way


def test_call_json(clean_responder: ResponderProcess) -> None:
    run = ecpm("call", clean_responder.uri, "--json", *QUICK)
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout)
    assert result["outcome"] == "pass" and result["check"] == "invite"
    assert result["stage"] is None and result["sip_status"] == 200
    assert set(result["timings"]) == {"transport", "trying", "ringing", "answer", "media", "teardown"}
    assert result["media"]["tone_heard"] is True and result["media"]["echo_heard"] is True
    assert result["started_at"].endswith("Z")


def test_call_failure_exits_1(clean_responder: ResponderProcess) -> None:
    clean_responder.set_fault("answer_503")
    run = ecpm("call", clean_responder.uri, "--json", *QUICK)
    assert run.returncode == 1
    result = json.loads(run.stdout)
    assert (result["stage"], result["reason"], result["sip_status"]) == ("answer", "service_unavailable", 503)
    text = ecpm("call", clean_responder.uri, *QUICK)
    assert text.returncode == 1
    assert text.stdout.splitlines()[-1].startswith(
        "FAIL at answer: service_unavailable (SIP 503 Service Unavailable)"
    )


def test_call_with_dtmf_and_srtp(clean_responder: ResponderProcess) -> None:
    run = ecpm("call", clean_responder.uri, "--json", "--dtmf", "159#", "--srtp", "mandatory", *QUICK)
    assert run.returncode == 0, run.stdout + run.stderr
    result = json.loads(run.stdout)
    assert "dtmf" in result["timings"] and result["detail"]["dtmf.received"] == "159#"
    assert result["detail"]["media.encrypted"] == "yes"
    bad = ecpm("call", clean_responder.uri, "--dtmf", "12x")
    assert bad.returncode == 2 and "dtmf: '12x': DTMF digits are 1 to 16" in bad.stderr


def test_options(clean_responder: ResponderProcess) -> None:
    run = ecpm("call", clean_responder.uri, "--options", "--json")
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["check"] == "options"


def test_closed_port_fails_within_the_timeout() -> None:
    port = free_port()
    started = time.monotonic()
    run = ecpm("call", f"sip:ecpm-test@127.0.0.1:{port}", "--json", "--first-response-timeout", "500ms")
    took = time.monotonic() - started
    assert run.returncode == 1
    result = json.loads(run.stdout)
    assert (result["stage"], result["reason"]) == ("transport", "no_response")
    assert result["finished_at"] > result["started_at"]
    assert took < 4.5  # interpreter start + 0.5 s + engine shutdown: not the 5 s default timer


def test_guard_refusal_exits_2_and_sends_nothing(sink: UdpSink) -> None:
    for uri in (f"sip:999@127.0.0.1:{sink.port}", f"sip:9%2C112@127.0.0.1:{sink.port}", "tel:+44-999"):
        run = ecpm("call", uri, "--proxy", f"sip:127.0.0.1:{sink.port};lr")
        assert run.returncode == 2, (uri, run.stdout, run.stderr)
        assert "refused by the live-number guard, nothing was sent" in run.stderr
        assert run.stdout == ""
    assert sink.received(0.3) == []


def test_usage_errors_exit_2() -> None:
    assert ecpm("call").returncode == 2
    no_proxy = ecpm("call", "urn:service:test.sos")
    assert no_proxy.returncode == 2 and "outbound proxy" in no_proxy.stderr
    bad = ecpm("call", "sip:ecpm-test@127.0.0.1:5999", "--media-time", "2")
    assert bad.returncode == 2 and "media_time" in bad.stderr
    region = ecpm("call", "sip:ecpm-test@127.0.0.1:5999", "--region", "XX")
    assert region.returncode == 2
    for run in (no_proxy, bad, region):
        assert "Traceback" not in run.stderr


def test_target_from_probe_config(tmp_path: Path, clean_responder: ResponderProcess) -> None:
    config = tmp_path / "probe.yaml"
    config.write_text(
        f"""kind: probe
probe:
  id: p1
  region: GB
  key: not-a-real-key
targets:
  - id: lab
    uri: {clean_responder.uri}
    test_endpoint: true
    transport: tcp
    checks:
      invite:
        first_response_timeout: 1s
        answer_timeout: 2s
        media_time: 1s
        max_duration: 10s
"""
    )
    run = ecpm("call", "-c", str(config), "--target", "lab", "--json")
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["target"] == "lab"
    missing = ecpm("call", "-c", str(config), "--target", "nope")
    assert missing.returncode == 2 and "lab" in missing.stderr


def test_sigterm_during_a_call_hangs_up_and_exits_1(clean_responder: ResponderProcess) -> None:
    """Interrupted: the ringing call is cancelled, pjsua2 is destroyed, no assertion."""
    clean_responder.set_fault("never_answer")
    proc = subprocess.Popen(
        [sys.executable, "-m", "ecpm", "call", clean_responder.uri, "--answer-timeout", "20s"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 10
    while '"active_calls": 1' not in clean_responder.http("GET", "/status")[1]:
        assert time.monotonic() < deadline, "the call never reached the responder"
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=15)
    assert proc.returncode == 1
    assert "interrupted" in err and "Traceback" not in err and "Assertion" not in err
    deadline = time.monotonic() + 5
    while '"active_calls": 0' not in clean_responder.http("GET", "/status")[1]:
        assert time.monotonic() < deadline, "the responder still has the call: no CANCEL?"
        time.sleep(0.05)
