"""The real peer programs tests talk to (mosquitto, sipp, promtool, ...): where they are
and which Debian package provides each (tests/conftest.py skips or fails on a missing one)."""

from __future__ import annotations

import shutil

# program name -> Debian package that provides it
PEER_PACKAGES = {
    "mosquitto": "mosquitto",
    "mosquitto_sub": "mosquitto-clients",
    "mosquitto_pub": "mosquitto-clients",
    "sipp": "sip-tester",
    "promtool": "prometheus",
    "prometheus": "prometheus",
    "amtool": "prometheus-alertmanager",
    "alertmanager": "prometheus-alertmanager",
    "chromium": "chromium",
    "kamailio": "kamailio",
}


def find(program: str) -> str | None:
    # mosquitto lives in /usr/sbin, which a non-root PATH may lack
    return shutil.which(program) or shutil.which(program, path="/usr/sbin:/usr/bin:/sbin:/bin")


def peer_path(program: str) -> str:
    """Absolute path of a peer program (the test must carry the peers marker)."""
    found = find(program)
    if found is None:
        raise LookupError(program)
    return found
