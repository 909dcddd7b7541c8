"""How a command asks the monitor's token-protected API (``ecpm verify``, ``ecpm incident``):
where the monitor is and its token (a monitor config, or a URL and a token file or
``ECPM_MONITOR_TOKEN``), and one POST whose refusal becomes a usage error (exit 2)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

import httpx

from ecpm.configfile import load_config, secret_text
from ecpm.errors import UsageError
from monitor.config import MonitorConfig


def add_monitor_arguments(parser: argparse.ArgumentParser) -> None:
    where = parser.add_argument_group("monitor (config, or URL and token)")
    where.add_argument("-c", "--config", help="monitor config: its http.listen and http.token")
    where.add_argument("--monitor", help="monitor base URL, e.g. http://127.0.0.1:9470")
    where.add_argument(
        "--token-file", help="file holding the monitor's API token (or set ECPM_MONITOR_TOKEN)"
    )


def endpoint(args: argparse.Namespace) -> tuple[str, str]:
    """(base URL, token) from the arguments ``add_monitor_arguments`` added."""
    url, token = args.monitor, os.environ.get("ECPM_MONITOR_TOKEN")
    if args.config:
        config = load_config(args.config, MonitorConfig)
        url = url or f"http://{config.http.listen}"
        token = token or secret_text(config.http, "token")
    if args.token_file:
        try:
            token = Path(args.token_file).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise UsageError(f"cannot read token file {args.token_file}: {exc.strerror}") from None
    if not url:
        raise UsageError("say which monitor: -c monitor.yaml or --monitor URL")
    if not token:
        raise UsageError("the monitor's API token is needed: --token-file, ECPM_MONITOR_TOKEN or http.token")
    return url.rstrip("/"), token


def client(token: str) -> httpx.Client:
    return httpx.Client(headers={"Authorization": f"Bearer {token}"}, timeout=10)


def post(client: httpx.Client, url: str, body: dict[str, Any]) -> dict[str, Any]:
    """The JSON object an action answers; anything else is a ``UsageError`` naming why."""
    try:
        response = client.post(url, json=body)
    except httpx.HTTPError as exc:
        raise UsageError(f"cannot reach the monitor at {url}: {exc}") from None
    try:
        data = response.json()
    except ValueError:
        data = {}
    if response.status_code != 200:
        raise UsageError(
            f"monitor refused ({response.status_code}): {data.get('error', response.text[:200])}"
        )
    return dict(data)
