"""``ecpm demo`` (what ``make run`` starts), as a newcomer runs it: the path breaks, an
incident opens and a page arrives, the path comes back and both resolve; Ctrl-C exits 0."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.support.net import free_port
from tests.support.paths import REPO


def test_demo_shows_an_incident_open_and_resolve_then_stops_cleanly(tmp_path: Path) -> None:
    listen = f"127.0.0.1:{free_port()}"
    out = tmp_path / "demo.out"
    with out.open("wb") as sink:
        proc = subprocess.Popen(
            [sys.executable, "-m", "ecpm", "demo", "--listen", listen, "--interval", "3s",
             "--break-after", "8s", "--break-for", "10s", "--workdir", str(tmp_path / "work")],
            cwd=REPO, stdout=sink, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 60
            while "PAGE  RESOLVE" not in out.read_text() and time.monotonic() < deadline:
                assert proc.poll() is None, out.read_text()
                time.sleep(0.5)
        finally:
            proc.send_signal(signal.SIGINT)
            code = proc.wait(timeout=30)
    text = out.read_text()
    assert code == 0, text
    lines = [line.split("  ", 1)[1] for line in text.splitlines() if line[:2].isdigit() and "  " in line]
    events = [line.split()[0] for line in lines if line.split()[0] in ("STATE", "BREAK", "PAGE", "RESTORE")]
    assert f"status page  http://{listen}/" in lines
    # up, broken, down with exactly one page, restored, resolved with exactly one page, up
    assert "BREAK" in events and "RESTORE" in events
    assert [line for line in lines if line.startswith("PAGE")] == [
        next(line for line in lines if line.startswith("PAGE  TRIGGER")),
        next(line for line in lines if line.startswith("PAGE  RESOLVE")),
    ]
    assert any(line.startswith("STATE demo-path is DOWN") for line in lines)
    assert lines[-1] == "stopped; 2 page(s) received"
    assert "Traceback" not in text
