"""Kamailio as the registrar and proxy of the register tests: started on 127.0.0.1 with a
free port (UDP and TCP) and a private run directory, with the project's config (tests/kamailio/kamailio.cfg:
one user, digest auth, usrloc in memory, record-route, the test service routed to a responder)."""

from __future__ import annotations

from pathlib import Path
from typing import Self

from tests.support.net import HOST, free_port, tcp_listening, udp_port_in_use
from tests.support.paths import REPO
from tests.support.peers import peer_path
from tests.support.processes import Proc, wait_for

CONFIG = REPO / "tests" / "kamailio" / "kamailio.cfg"
USER, PASSWORD = "alice", "alice-secret"
SERVICE = "ecpm-test"  # the Request-URI user routed to the responder (not an emergency number)


class Kamailio(Proc):
    """``kamailio -DD -E`` (foreground, log on stderr) on a free port, UDP and TCP alike;
    ``restart`` keeps the port, so a registered client's next REGISTER reaches the new
    instance (usrloc empty). The registrar grants an Expires between ``min_expires`` and
    ``max_expires``; below the minimum it answers 423 Interval Too Brief with Min-Expires
    when ``too_brief`` (else it raises the Expires to the minimum itself)."""

    def __init__(
        self,
        workdir: Path,
        *,
        responder: str,
        port: int | None = None,
        min_expires: int = 10,
        max_expires: int = 3600,
        too_brief: bool = False,
    ) -> None:
        self.port = port or free_port()
        run = workdir / "kamailio-run"
        run.mkdir(exist_ok=True)
        argv = [
            peer_path("kamailio"), "-f", CONFIG, "-DD", "-E",
            "-l", f"udp:{HOST}:{self.port}", "-l", f"tcp:{HOST}:{self.port}",
            "-Y", run, "-P", run / "kamailio.pid", "-m", "32", "-M", "4",
            "-A", f'ECPM_USER="{USER}"', "-A", f'ECPM_PASSWORD="{PASSWORD}"',
            "-A", f'ECPM_RESPONDER="{responder}"', "-A", f'ECPM_SERVICE="{SERVICE}"',
            "-A", f"ECPM_MIN_EXPIRES={min_expires}", "-A", f"ECPM_MAX_EXPIRES={max_expires}",
            "-A", f"ECPM_MIN_EXPIRES_MODE={int(too_brief)}",
        ]  # fmt: skip
        super().__init__("kamailio", argv, workdir)

    @property
    def registrar(self) -> str:
        return f"sip:{HOST}:{self.port}"

    @property
    def service_uri(self) -> str:
        return f"sip:{SERVICE}@{HOST}:{self.port}"

    def start(self, env: object = None) -> Self:
        super().start()
        wait_for(lambda: udp_port_in_use(self.port), 15, "kamailio's UDP port", [self], every=0.05)
        wait_for(lambda: tcp_listening(self.port), 15, "kamailio's TCP port", [self], every=0.05)
        return self

    def restart(self) -> Self:
        self.stop()
        wait_for(lambda: not udp_port_in_use(self.port), 15, "kamailio's port to be free", every=0.05)
        return self.start()
