"""The monitor's status page and target API at 1,000 targets × 3 probes, vs serving the same bytes.

    .venv/bin/python bench/status_page.py [--targets 1000] [--probes 3] [--repeats 7]

ecpm: a ``MonitorCore`` filled as bench/metrics_scrape.py fills it (three calls from every
probe to every target, one target in 20 failing and so down with an open incident, an
OPTIONS check on one in 10), then GETs of the real app (``monitor.web.create_app``,
through httpx's ASGI transport, in this process): the status page as a browser first asks
for it (``/``), a filtered later page (``/?state=up&page=3``), and the target API whole
and one page of it. While a request runs, a ticker on the same event loop records the
loop's longest stall (ingest and paging would wait that long). Peer: Starlette's
``FileResponse`` serving the bytes of ``/`` from a file through the same transport, the
floor for sending a page of that size. Uncompressed unless the label says gzip (as a
browser asks). Median (min–max) of the repeats.
"""

from __future__ import annotations

import asyncio
import logging
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
from starlette.applications import Starlette  # noqa: E402
from starlette.requests import Request  # noqa: E402
from starlette.responses import FileResponse, Response  # noqa: E402
from starlette.routing import Route  # noqa: E402

from bench.emit import emit  # noqa: E402
from bench.metrics_scrape import arguments, fill, fmt, timed  # noqa: E402
from monitor.web import create_app  # noqa: E402

ASKED = {  # label: (path, Accept-Encoding)
    "ecpm GET /": ("/", "identity"),
    "ecpm GET /, gzip": ("/", "gzip"),
    "ecpm GET /?state=up&page=3": ("/?state=up&page=3", "identity"),
    "ecpm GET /api/v1/targets": ("/api/v1/targets", "identity"),
    "ecpm GET /api/v1/targets?limit=50": ("/api/v1/targets?limit=50", "identity"),
}


def static(path: Path) -> Starlette:
    async def page(request: Request) -> Response:
        return FileResponse(path, media_type="text/html")

    return Starlette(routes=[Route("/", page)])


async def get(app: Starlette, path: str, encoding: str = "identity") -> tuple[float, float, int]:
    """(seconds, longest loop stall, bytes on the wire) of one GET."""
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://monitor") as client:
        seconds, stall, got = await timed(lambda: client.get(path, headers={"Accept-Encoding": encoding}))
    assert isinstance(got, httpx.Response) and got.status_code == 200, got
    return seconds, stall, got.num_bytes_downloaded


async def main(targets: int, probes: int, repeats: int) -> None:
    logging.disable(logging.ERROR)  # the 50 incidents the fill opens (logged as errors)
    with tempfile.TemporaryDirectory(prefix="ecpm-bench-") as tmp:
        core, registry = fill(Path(tmp), targets, probes)
        app = create_app(
            snapshot=core.snapshot, registry=registry, incidents=core.store.incidents, token=None
        )
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://m") as client:
            first = (await client.get("/", headers={"Accept-Encoding": "identity"})).content
        (Path(tmp) / "page.html").write_bytes(first)
        peer = static(Path(tmp) / "page.html")
        rows: dict[str, list[tuple[float, float, int]]] = {label: [] for label in [*ASKED, "peer"]}
        for _ in range(repeats):
            for label, (path, encoding) in ASKED.items():
                rows[label].append(await get(app, path, encoding))
            rows["peer"].append(await get(peer, "/"))
    snap = core.snapshot()
    down = sum(1 for t in snap.targets.values() if t.state != "up")
    print(
        f"status page: {targets} targets ({down} not up, {len(snap.open_incidents)} open incidents)"
        f" × {probes} probes; {repeats} repeats, median (min–max)"
    )
    print(f"{'':44} {'ms per request':>16} {'loop stall ms':>16} {'bytes':>12}")
    for label in [*ASKED, "peer"]:
        got = rows[label]
        times, stalls, size = [r[0] for r in got], [r[1] for r in got], got[0][2]
        name = "peer: FileResponse, the bytes of /" if label == "peer" else label
        print(f"{name:44} {fmt(times):>16} {fmt(stalls):>16} {size:>12,}")
    ratio = statistics.median(r[0] for r in rows["ecpm GET /"]) / statistics.median(
        r[0] for r in rows["peer"]
    )
    print(f"ratio ecpm GET / vs peer (time): {ratio:.2f}x")
    page, peer_page = rows["ecpm GET /"], rows["peer"]
    emit(
        "status_page",
        ms_page=statistics.median(r[0] for r in page) * 1000,
        peer_ms_page=statistics.median(r[0] for r in peer_page) * 1000,
        ms_loop_stall=statistics.median(r[1] for r in page) * 1000,
        kb_page=page[0][2] / 1000,
        peer_kb_page=peer_page[0][2] / 1000,
        kb_page_gzip=rows["ecpm GET /, gzip"][0][2] / 1000,
    )


if __name__ == "__main__":
    args = arguments(__doc__)
    asyncio.run(main(args.targets, args.probes, args.repeats))
