"""Safety: the far end can never make ecpm dial anything the guard did not see.

pjsua2 by default accepts an in-dialog REFER and dials its Refer-To URI itself, and
answers an INVITE carrying Replaces — both past the single hand-over where the
live-number guard runs. These tests run the real probe (``ecpm call``, its own
process: a crash must show) against SIPp asking for exactly that, with a live
emergency number as the transfer target on a UDP trap that must stay silent.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.net import HOST, UdpSink
from tests.support.paths import REPO
from tests.support.sip import Sipp

pytestmark = pytest.mark.peers("sipp")


@pytest.mark.parametrize("trap_user", ["999", "ecpm-test"])
def test_refer_is_declined_and_nothing_is_dialled(tmp_path: Path, trap_user: str) -> None:
    trap = UdpSink()
    sipp = Sipp(tmp_path, "uas_refer.xml", keys={"trap": f"sip:{trap_user}@{HOST}:{trap.port}"}, timeout=20)
    try:
        done = subprocess.run(
            [sys.executable, "-m", "ecpm", "call", sipp.uri, "--media-time", "2s", "--no-tone"],
            cwd=REPO, capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert done.returncode in (0, 1), f"the probe died ({done.returncode}): {done.stderr[-2000:]}"
        assert trap.received(1.0) == [], "ecpm dialled the Refer-To target"
        assert sipp.wait(15) == 0, sipp.log()[-3000:]
        assert "SIP/2.0 603" in sipp.log()  # declined, not 202 Accepted
    finally:
        sipp.stop()
        trap.close()
