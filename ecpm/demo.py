"""``ecpm demo``: the whole system on this machine, on 127.0.0.1 only.

An embedded MQTT broker (amqtt, pure Python: no root, no system service), the test
responder, one probe calling it every few seconds, the monitor, and a local webhook
receiver standing in for a pager. Keys and config files are generated in a work
directory. The demo prints the status page and /metrics URLs, then every state
change and every page as they happen. ``--break-after`` makes the responder answer
503 for ``--break-for`` seconds, so a newcomer sees an incident open, a page
arrive, and both resolve within a minute. Ctrl-C stops everything cleanly.

The responder and the probe each run in their own process: pjsua2 allows one
endpoint per process.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import yaml
from amqtt.broker import Broker
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from ecpm import http
from ecpm.configfile import parse_duration
from ecpm.errors import UsageError
from ecpm.settings import Listen
from ecpm.signals import run_until_signalled

logger = logging.getLogger(__name__)
HOST = "127.0.0.1"


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def _ecpm_command() -> str:
    """How this ecpm was started, so printed commands work without an activated venv."""
    arg0 = Path(sys.argv[0])
    return str(arg0) if arg0.name == "ecpm" else f"{sys.executable} -m ecpm"


def _say(text: str) -> None:
    print(f"{time.strftime('%H:%M:%S')}  {text}", flush=True)


class Demo:
    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.workdir = workdir
        self.mqtt_port = args.mqtt_port or free_port()
        self.sip_port = free_port(socket.SOCK_DGRAM)
        self.control_port = free_port()
        self.webhook_port = free_port()
        self.listen = args.listen
        self.pages: list[dict[str, Any]] = []
        self.token_file = workdir / "monitor.token"  # for ecpm verify and other state-changing calls
        self.children: list[tuple[str, subprocess.Popen[bytes]]] = []

    # ------------------------------------------------------------ configs

    def write_configs(self) -> dict[str, Path]:
        key = secrets.token_hex(32)
        self.token_file.write_text(secrets.token_urlsafe(24), encoding="utf-8")
        interval = self.args.interval
        probe = {
            "kind": "probe",
            "probe": {"id": "demo-probe", "region": "GB", "key": key},
            "mqtt": {"host": HOST, "port": self.mqtt_port, "protocol": "3.1.1"},  # amqtt speaks 3.1.1
            "outbox": {"path": str(self.workdir / "outbox.db")},
            "targets": [
                {
                    "id": "demo-path",
                    "uri": f"sip:ecpm-test@{HOST}:{self.sip_port}",
                    "test_endpoint": True,
                    "min_spacing": "1s",
                    "checks": {
                        "invite": {
                            "interval": interval,
                            "answer_timeout": "5s",
                            "media_time": "1s",
                            "max_duration": "10s",
                        }
                    },
                }
            ],
        }
        responder = {
            "kind": "responder",
            "sip": {"bind": HOST, "port": self.sip_port, "transports": ["udp"]},
            "control": {"listen": f"{HOST}:{self.control_port}"},
        }
        monitor = {
            "kind": "monitor",
            "id": "demo",
            "mqtt": {"host": HOST, "port": self.mqtt_port, "protocol": "3.1.1"},
            "ingest": {"shared_group": None},  # amqtt has no shared subscriptions
            "store": {"path": str(self.workdir / "monitor.db")},
            "http": {"listen": self.listen, "token_file": str(self.token_file)},
            "reachability": {"gap_incident_after": "1m", "resolve_after": "5s"},
            "probes": [{"id": "demo-probe", "key": key}],
            "targets": [
                {"id": "demo-path", "interval": interval, "description": "demo responder on loopback"}
            ],
            "notifiers": [
                {"type": "webhook", "name": "demo-pager", "url": f"http://{HOST}:{self.webhook_port}/page"}
            ],
        }
        paths = {}
        for name, data in (("probe", probe), ("responder", responder), ("monitor", monitor)):
            path = self.workdir / f"{name}.yaml"
            path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
            paths[name] = path
        return paths

    # ------------------------------------------------------------ pieces

    async def start_broker(self) -> Broker:
        for noisy in ("transitions", "amqtt", "monitor.web"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
        broker = Broker(
            {
                "listeners": {"default": {"type": "tcp", "bind": f"{HOST}:{self.mqtt_port}"}},
                "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
            }
        )
        await broker.start()
        return broker

    def spawn(self, name: str, config: Path) -> None:
        log = (self.workdir / f"{name}.log").open("wb")
        proc = subprocess.Popen(
            [sys.executable, "-m", "ecpm", name, "-c", str(config)],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=self.workdir,
        )
        self.children.append((name, proc))

    def webhook_app(self) -> Starlette:
        async def page(request: Request) -> PlainTextResponse:
            body = await request.json()
            self.pages.append(body)
            inc = body.get("incident", {})
            event = str(body.get("event", "?")).upper()
            _say(f"PAGE  {event:8} incident {inc.get('id')} {inc.get('target')}: {inc.get('summary')}")
            return PlainTextResponse("ok")

        return Starlette(routes=[Route("/page", page, methods=["POST"])])

    async def set_fault(self, fault: str) -> None:
        async with httpx.AsyncClient(timeout=5) as client:
            response = await client.put(f"http://{HOST}:{self.control_port}/fault", content=fault)
            response.raise_for_status()

    async def watch(self, stop: asyncio.Event) -> None:
        """Print every state change the monitor reports, and break/restore on schedule."""
        url = f"http://{self.listen}/api/v1/targets"
        last: dict[str, str] = {}
        started = time.monotonic()
        broken = restored = False
        async with httpx.AsyncClient(timeout=2) as client:
            while not stop.is_set():
                with contextlib.suppress(httpx.HTTPError, ValueError):
                    for target in (await client.get(url)).json()["targets"]:
                        if last.get(target["id"]) != target["state"]:
                            last[target["id"]] = target["state"]
                            _say(f"STATE {target['id']} is {target['state'].upper()}: {target['why']}")
                elapsed = time.monotonic() - started
                if self.args.break_after is not None and not broken and elapsed >= self.args.break_after:
                    broken = True
                    _say("BREAK the responder now answers 503 Service Unavailable")
                    await self.set_fault("answer_503")
                if broken and not restored and elapsed >= self.args.break_after + self.args.break_for:
                    restored = True
                    _say("RESTORE the responder answers again")
                    await self.set_fault("none")
                for name, proc in self.children:
                    if proc.poll() is not None:
                        raise UsageError(
                            f"{name} exited with {proc.returncode}; see {self.workdir / (name + '.log')}"
                        )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout=1.0)

    async def run(self, stop: asyncio.Event) -> None:
        configs = self.write_configs()
        broker = await self.start_broker()
        webhook = asyncio.create_task(http.serve(self.webhook_app(), Listen(HOST, self.webhook_port)))
        try:
            self.spawn("responder", configs["responder"])
            self.spawn("monitor", configs["monitor"])
            self.spawn("probe", configs["probe"])
            _say(f"ecpm demo running in {self.workdir}")
            _say(f"status page  http://{self.listen}/")
            _say(f"metrics      http://{self.listen}/metrics")
            _say(f"break it     curl -X PUT --data answer_503 http://{HOST}:{self.control_port}/fault")
            _say(f"restore      curl -X PUT --data none http://{HOST}:{self.control_port}/fault")
            _say(
                f"verify       {_ecpm_command()} verify --monitor http://{self.listen}"
                f" --token-file {self.token_file} --target demo-path --change-ref CHG-DEMO"
            )
            _say("Ctrl-C stops everything")
            await self.watch(stop)
        finally:
            await self.stop_children()
            webhook.cancel()
            await asyncio.gather(webhook, return_exceptions=True)
            await broker.shutdown()
            _say(f"stopped; {len(self.pages)} page(s) received")

    async def stop_children(self) -> None:
        for _, proc in reversed(self.children):
            if proc.poll() is None:
                proc.terminate()
        for name, proc in self.children:
            try:
                await asyncio.to_thread(proc.wait, 15)
            except subprocess.TimeoutExpired:
                logger.warning("%s did not stop in time; killing it", name)
                proc.kill()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--listen", default=f"{HOST}:9470", help="monitor HTTP address (default %(default)s)")
    parser.add_argument("--mqtt-port", type=int, default=0, help="embedded broker port (default: a free one)")
    parser.add_argument("--interval", default="5s", help="probe call interval (default %(default)s)")
    parser.add_argument(
        "--break-after",
        type=parse_duration,
        default=None,
        metavar="DURATION",
        help="make the responder answer 503 after this long (e.g. 20s)",
    )
    parser.add_argument(
        "--break-for",
        type=parse_duration,
        default=30.0,
        metavar="DURATION",
        help="how long the path stays broken (default 30s)",
    )
    parser.add_argument("--workdir", help="keep configs, logs and databases here (default: a temporary dir)")


def run(args: argparse.Namespace) -> int:
    try:
        host = Listen.parse(args.listen).host
    except ValueError as exc:
        raise UsageError(f"--listen: {exc}") from None
    if host != HOST:
        raise UsageError(f"--listen must be on {HOST}: the demo stays on loopback")
    if args.workdir:
        workdir = Path(args.workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        asyncio.run(run_until_signalled(Demo(args, workdir).run))
        return 0
    workdir = Path(tempfile.mkdtemp(prefix="ecpm-demo-"))
    try:
        asyncio.run(run_until_signalled(Demo(args, workdir).run))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0
