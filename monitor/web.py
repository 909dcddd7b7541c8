"""The monitor's HTTP face: HTTP in, snapshot out. No business logic lives here.

Endpoints::

    GET  /                   status page (HTML, ``monitor.status_page``; refreshes itself every
                             5 s): ?state=&q=&limit=&page= as ``monitor.selection`` reads them
    GET  /metrics            Prometheus text exposition of the registry given to create_app
    GET  /healthz            200 "ok" while the process serves HTTP
    GET  /api/v1/targets     {"at": TIME, "targets": [Target, ...]}      in configuration order;
                             ?state= and ?q= filter, ?limit=N (1..1000) &page=N page (without
                             limit: every target); X-Total-Count the targets matched, and when
                             paged an RFC 8288 Link to the first, prev, next and last pages
    GET  /api/v1/probes      {"at": TIME, "probes": [Probe, ...]}
    GET  /api/v1/services    {"at": TIME, "services": [Service, ...]}    in configuration order
    GET  /api/v1/incidents   {"at": TIME, "incidents": [Incident, ...]}  newest first, open and
                             resolved; ?limit=N (1..1000, default 100)
    POST /api/v1/{action}    one of the ``actions`` given to create_app (e.g. ``verify``):
                             a JSON object in, a JSON object out

JSON field names are stable (add fields, never rename). Times are RFC 3339 UTC with
milliseconds (``"2025-06-25T14:03:11.250Z"``); durations are seconds in fields named
``*_seconds``; ``null`` means not known. ``at`` is the time of the snapshot served.

- Target: ``id, description, interval_seconds, state`` (up|degraded|down|unknown)``, since,
  why, last_success_at, covering_probes`` [str]``, open_incident`` (incident id or null)``,
  latest`` [Result], the latest result per (probe, check), newest first.
- Result: ``id, probe, target, check, seq, started_at, finished_at, outcome``
  (pass|fail|inconclusive)``, stage, reason, sip_status, sip_reason,
  post_dial_delay_seconds, mos, confirm, request_id, version, judged_at,
  clock_skew_seconds``. ``started_at``/``finished_at`` are the probe's own stamps;
  ``judged_at`` is when the monitor judges it finished (``monitor.skew``), the time every
  freshness decision and ``last_success_at`` use; ``clock_skew_seconds`` the probe's
  estimated skew it was judged with (null: not known).
- Probe: ``id, status`` (online|stale|offline|unknown: online but not reporting on time is
  stale; never heard of is unknown)``, online`` (bool or null)``, up, status_at,
  last_result_at`` (judged time)``, version, targets`` [str]``, clock_skew_seconds``
  (estimated, probe minus monitor; null until known)``, clock_skewed`` (beyond
  ``ingest.max_clock_skew``)``.
- Incident: ``id, target, kind`` (down|gap)``, state`` (open|resolved)``, opened_at``
  (= detected)``, resolved_at, last_good_id, last_good_at, first_failed_id,
  first_failed_at, detection_latency_seconds, summary, notifications`` [Notification]``,
  ack`` (Ack or null: the incident itself acknowledged, no more escalation pages)``,
  duties`` [Duty].
- Duty (``monitor.duties``): ``name, text, due_at, escalate_at, route`` [notifier]``,
  status`` (pending|met|missed, at ``at``)``, remaining_seconds`` (to ``due_at`` from
  ``at``; negative: overdue)``, escalated_at, ack`` (Ack or null).
- Ack: ``at, by, ref``.
- Service (``monitor.redundancy``): ``id, description, state`` (up|degraded|down|unknown)``,
  redundancy_lost, paths`` [{target, role (primary|backup), state, lost}].
- Notification: ``notifier, event`` (trigger|resolve|escalate:<duty>)``, state``
  (pending|sent|failed)``, attempts, created_at, sent_at, last_error``.
- Errors: ``{"error": "what is wrong"}`` with a 4xx status (a bad query: 400, naming it).

State-changing endpoints (every POST) need ``Authorization: Bearer <token>``: a missing
or wrong token is 401 (with ``WWW-Authenticate``); with no token configured they are
disabled (403). Unknown action 404, body not a JSON object 400, body over 64 KiB 413.
An action reports a refusal by raising :class:`ActionError`; any other exception is a
bug and becomes a 500.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, Final, TypeAlias

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp

from ecpm import http
from ecpm.errors import EcpmError
from ecpm.http import ListenError
from ecpm.settings import Listen
from monitor.metrics import exposition
from monitor.model import Incident, Snapshot
from monitor.selection import QueryError, Selection, TargetQuery
from monitor.status_page import MAX_PAGE_TARGETS, PAGE_TARGETS, RESOLVED_ON_PAGE, Template, render_page, title
from monitor.views import incident_json, probe_json, service_json, target_json, time_json

__all__ = ["Action", "ActionError", "ListenError", "create_app", "serve"]

logger = logging.getLogger(__name__)

Action: TypeAlias = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]

MAX_BODY: Final = 64 * 1024
DEFAULT_INCIDENTS: Final = 100
MAX_INCIDENTS: Final = 1000
MAX_API_TARGETS: Final = 1000  # a page of /api/v1/targets; without ?limit, every target


class ActionError(EcpmError):
    """An action refuses a request; the client gets ``{"error": message}`` with ``status``."""

    def __init__(self, message: str, *, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


# ---------------------------------------------------------------- app


def create_app(
    *,
    snapshot: Callable[[], Snapshot],
    registry: CollectorRegistry,
    incidents: Callable[[int], Sequence[Incident]],
    token: str | None,
    actions: Mapping[str, Action] | None = None,
) -> Starlette:
    """The monitor's ASGI app. ``snapshot`` returns the current Snapshot (cheap, no I/O);
    ``incidents(n)`` the latest ``n`` incidents, open and resolved, newest first (called on
    the event loop: keep it quick); ``token`` guards the state-changing ``actions``."""
    registered: Mapping[str, Action] = actions if actions is not None else {}  # read per request
    expected = token or None
    template = Template.load()

    async def status_page(request: Request) -> Response:
        return await _status_page(request, template, snapshot(), incidents)

    async def metrics(request: Request) -> Response:
        # in a thread: a scrape of 1,000 targets must not hold up ingest and paging
        zipped = "gzip" in request.headers.get("accept-encoding", "")
        body = await asyncio.to_thread(exposition, registry, compress=zipped)
        headers = {"Content-Encoding": "gzip"} if zipped else None
        return Response(body, media_type=CONTENT_TYPE_LATEST, headers=headers)

    async def healthz(request: Request) -> Response:
        return PlainTextResponse("ok")

    async def api_targets(request: Request) -> Response:
        return await _api_targets(request, snapshot())

    async def api_probes(request: Request) -> Response:
        snap = snapshot()
        return _json({"at": time_json(snap.at), "probes": [probe_json(p) for p in snap.probes.values()]})

    async def api_services(request: Request) -> Response:
        snap = snapshot()
        return _json(
            {"at": time_json(snap.at), "services": [service_json(s) for s in snap.services.values()]}
        )

    async def api_incidents(request: Request) -> Response:
        limit = _limit(request)
        if isinstance(limit, Response):
            return limit
        snap = snapshot()
        return _json(
            {"at": time_json(snap.at), "incidents": [incident_json(i, snap.at) for i in incidents(limit)]}
        )

    async def run_action(request: Request) -> Response:
        return await _run_action(request, registered, expected)

    return Starlette(
        routes=[
            Route("/", status_page, methods=["GET"]),
            Route("/metrics", metrics, methods=["GET"]),
            Route("/healthz", healthz, methods=["GET"]),
            Route("/api/v1/targets", api_targets, methods=["GET"]),
            Route("/api/v1/probes", api_probes, methods=["GET"]),
            Route("/api/v1/services", api_services, methods=["GET"]),
            Route("/api/v1/incidents", api_incidents, methods=["GET"]),
            Route("/api/v1/{action}", run_action, methods=["POST"]),
        ]
    )


async def _status_page(
    request: Request, template: Template, snap: Snapshot, incidents: Callable[[int], Sequence[Incident]]
) -> Response:
    query = _target_query(request, default_limit=PAGE_TARGETS, max_limit=MAX_PAGE_TARGETS)
    if isinstance(query, QueryError):
        return PlainTextResponse(str(query), status_code=400)
    recent = incidents(RESOLVED_ON_PAGE * 2)
    zipped = "gzip" in request.headers.get("accept-encoding", "")

    def body() -> bytes:
        page = render_page(snap, recent, now=datetime.now(UTC), query=query)
        text = template.render(title=title(snap), page=page).encode()
        return gzip.compress(text, compresslevel=1) if zipped else text  # a tenth of the bytes, each refresh

    headers = {**template.headers, "Vary": "Accept-Encoding"}
    if zipped:
        headers["Content-Encoding"] = "gzip"
    # in a thread, as /metrics: the snapshot is immutable, and 1,000 targets must not hold up ingest
    return HTMLResponse(await asyncio.to_thread(body), headers=headers)


async def _api_targets(request: Request, snap: Snapshot) -> Response:
    query = _target_query(request, default_limit=None, max_limit=MAX_API_TARGETS)
    if isinstance(query, QueryError):
        return _error(400, str(query))
    chosen = query.select(snap.targets.values(), worst_first=False)

    def body() -> bytes:
        # one dumps a target, not one for all: the GIL changes hands between them, so the loop
        # is never held for the whole list (1.7 MB at 1,000 targets)
        items = b",".join(_dumps(target_json(t)) for t in chosen.shown)
        return b'{"at":%s,"targets":[%s]}' % (_dumps(time_json(snap.at)), items)

    headers = {"Cache-Control": "no-store", **_paging(request.url.path, chosen)}
    return Response(await asyncio.to_thread(body), media_type="application/json", headers=headers)


def _target_query(request: Request, *, default_limit: int | None, max_limit: int) -> TargetQuery | QueryError:
    params = {name: request.query_params.getlist(name) for name in request.query_params}
    try:
        return TargetQuery.parse(params, default_limit=default_limit, max_limit=max_limit)
    except QueryError as exc:
        return exc


def _paging(path: str, chosen: Selection) -> dict[str, str]:
    """``X-Total-Count`` (targets that match) and, when paged, an RFC 8288 ``Link`` to the
    first, previous, next and last pages: the body keeps its one shape."""
    headers = {"X-Total-Count": str(len(chosen.matched))}
    q, last = chosen.query, chosen.pages
    if q.limit is not None:
        rels = {"first": 1, "prev": min(q.page - 1, last), "next": q.page + 1, "last": last}
        links = [f'<{path}{q.href(page=n)}>; rel="{rel}"' for rel, n in rels.items() if 1 <= n <= last]
        headers["Link"] = ", ".join(links)
    return headers


def _limit(request: Request) -> int | Response:
    """``?limit=N`` of the incidents endpoint, or the 400 for a bad one."""
    raw = request.query_params.get("limit", str(DEFAULT_INCIDENTS))
    if not (raw.isascii() and raw.isdigit()) or not 1 <= int(raw) <= MAX_INCIDENTS:
        return _error(400, f"limit must be a whole number from 1 to {MAX_INCIDENTS}")
    return int(raw)


async def _run_action(request: Request, registered: Mapping[str, Action], expected: str | None) -> Response:
    """``POST /api/v1/{action}``: authorised, a known action, a JSON object body."""
    refused = _authorise(request, expected)
    if refused is not None:
        return refused
    name = request.path_params["action"]
    action = registered.get(name)
    if action is None:
        return _error(404, f"no such action: {name}")
    body = await _read_body(request)
    if isinstance(body, Response):
        return body
    try:
        result = await action(body)
    except ActionError as exc:
        return _error(exc.status, str(exc))
    return _json(result)


def _authorise(request: Request, expected: str | None) -> Response | None:
    if expected is None:
        return _error(403, "state-changing endpoints are disabled: no http.token is configured")
    refused = http.token_refusal(request, expected)
    if refused is not None:
        return _error(401, refused.message, headers=refused.headers)
    return None


async def _read_body(request: Request) -> dict[str, Any] | Response:
    raw = bytearray()
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > MAX_BODY:
            return _error(413, f"request body over {MAX_BODY} bytes")
    if not raw.strip():
        return {}
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        return _error(400, f"body is not JSON: {exc}")
    if not isinstance(body, dict):
        return _error(400, "body must be a JSON object")
    return body


def _dumps(content: Any) -> bytes:
    return json.dumps(
        content, ensure_ascii=False, allow_nan=False, separators=(",", ":"), default=_json_default
    ).encode()


class _JSON(JSONResponse):
    def render(self, content: Any) -> bytes:
        return _dumps(content)


def _json_default(value: object) -> object:
    if isinstance(value, datetime):
        return time_json(value)
    if isinstance(value, frozenset | set):
        return list(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def _json(content: Mapping[str, Any], status: int = 200) -> Response:
    return _JSON(content, status_code=status, headers={"Cache-Control": "no-store"})


def _error(status: int, message: str, *, headers: Mapping[str, str] | None = None) -> Response:
    return _JSON({"error": message}, status_code=status, headers=headers)


# ---------------------------------------------------------------- serving


async def serve(app: ASGIApp, listen: Listen | str, *, ready: Callable[[str], None] | None = None) -> None:
    """Serve ``app`` on ``http.listen`` until cancelled (``ecpm.http.serve``: ``ready(url)``,
    graceful stop, :class:`ListenError`); port 0 picks a free one."""
    await http.serve(app, listen, key="http.listen", ready=ready)
