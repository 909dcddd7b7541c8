"""One SIP worker process of the probe agent: ``python -m probes.worker`` (started by
probes.workers, never by hand).

It runs one ``SipEngine`` (one pjsua2 endpoint, up to ``sip.max_calls`` calls) and the
check kinds on it, exactly as the agent did in-process: each :class:`~probes.worker_wire.Run`
becomes ``check_kinds.run_check(engine, target, kind)`` in a task of its own, and its
``CheckOutcome`` goes back as a reply (probes.worker_wire). The agent keeps the schedule,
the outbox, ``seq`` and the signing key; a worker never sees the key.

Safety: the engine's gate (probes.sip.safety) runs this process's own live-number guard,
built from the probe's region and dial prefixes, before any INVITE, OPTIONS or REGISTER
leaves; a target the agent should never have sent is refused here too (``guard_refused``,
nothing sent).

The reply pipe is the process's fd 1 as it started; fd 1 is then pointed at stderr, so
that nothing else (pjsua2 writing to stdout) can corrupt a frame. End of stdin (the agent
closed it or died) or SIGTERM stops the worker: calls are hung up and the library
destroyed. It runs in a session of its own, so a terminal's Ctrl-C reaches only the agent.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Callable

from probes import check_kinds
from probes.guard import Guard
from probes.outcome import CheckOutcome
from probes.scheduler import relay_verdicts
from probes.sip import SipEngine, SipError
from probes.worker_wire import (
    Cancel,
    Reply,
    Run,
    Start,
    WorkerProtocolError,
    parse_request,
    read_frame,
    reply_frame,
)

logger = logging.getLogger(__name__)

MAX_REQUEST_BYTES = 16 << 20  # a Run frame is a pickled Target: a few KiB


class Worker:
    """The worker's event loop side: requests in, replies out, one task per check."""

    def __init__(self, engine: SipEngine, out: asyncio.WriteTransport) -> None:
        self.engine = engine
        self._out = out
        self._checks: dict[int, asyncio.Task[None]] = {}

    def send(self, reply: Reply) -> None:
        self._out.write(reply_frame(reply))

    def _refusals(self) -> dict[str, int]:
        return {k: n for k, n in self.engine.guard.refusals.items() if n}

    async def serve(self, reader: asyncio.StreamReader) -> None:
        """Until end of input: start checks, cancel the ones the agent gave up on."""
        while (body := await read_frame(reader, limit=MAX_REQUEST_BYTES)) is not None:
            request = parse_request(body)
            if isinstance(request, Run):
                task = asyncio.create_task(self._check(request), name=f"check-{request.id}")
                self._checks[request.id] = task
                task.add_done_callback(self._forget(request.id))
            elif isinstance(request, Cancel):
                found = self._checks.get(request.id)
                if found is not None:
                    found.cancel()
            else:
                raise WorkerProtocolError("a second start frame")

    def _forget(self, key: int) -> Callable[[asyncio.Task[None]], None]:
        def forget(_task: asyncio.Task[None]) -> None:
            self._checks.pop(key, None)

        return forget

    async def _check(self, run: Run) -> None:
        relay_verdicts(lambda outcome: self.send(Reply(kind="verdict", id=run.id, outcome=outcome)))
        try:
            outcome: CheckOutcome = await check_kinds.run_check(self.engine, run.target, run.kind)
        except asyncio.CancelledError:
            self.send(Reply(kind="cancelled", id=run.id, refusals=self._refusals()))
            raise
        except Exception as exc:  # a bug in ecpm: the agent reports it as internal_error
            logger.exception("%s check of %s raised (a bug in ecpm)", run.kind, run.target.id)
            self.send(Reply(kind="failed", id=run.id, error=f"{type(exc).__name__}: {exc}"[:4096]))
            return
        self.send(Reply(kind="outcome", id=run.id, outcome=outcome, refusals=self._refusals()))

    async def stop(self) -> None:
        for task in list(self._checks.values()):
            task.cancel()
        await asyncio.gather(*self._checks.values(), return_exceptions=True)


async def main() -> int:
    loop = asyncio.get_running_loop()
    reply_fd = os.dup(1)
    os.dup2(2, 1)  # stray output (pjsua2's console) goes to stderr, never into a frame
    out, _ = await loop.connect_write_pipe(asyncio.Protocol, os.fdopen(reply_fd, "wb", buffering=0))
    reader = asyncio.StreamReader(limit=MAX_REQUEST_BYTES)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin.buffer)
    body = await read_frame(reader, limit=MAX_REQUEST_BYTES)
    start = parse_request(body) if body is not None else None
    if not isinstance(start, Start):
        return 2
    logging.basicConfig(
        level=start.log_level,
        format=f"%(asctime)s %(levelname)s {start.name} %(name)s: %(message)s",
        stream=sys.stderr,
    )
    guard = Guard(home_region=start.home_region, dial_prefixes=start.dial_prefixes)
    engine = SipEngine(start.settings, guard, poll_interval=start.poll_interval)
    try:
        await engine.start()
    except SipError as exc:
        out.write(reply_frame(Reply(kind="failed", error=str(exc)[:4096])))
        await _drain(out)
        return 2
    worker = Worker(engine, out)
    worker.send(Reply(kind="ready", local=engine.local_addresses))
    serving = asyncio.create_task(worker.serve(reader))
    loop.add_signal_handler(signal.SIGTERM, serving.cancel)  # stop as at the end of input
    try:
        await serving
    except asyncio.CancelledError:
        logger.info("%s: SIGTERM, stopping", start.name)
    except WorkerProtocolError as exc:
        logger.error("%s: bad request from the agent, stopping: %s", start.name, exc)
    finally:
        await worker.stop()
        await engine.aclose()
        await _drain(out)
    return 0


async def _drain(out: asyncio.WriteTransport) -> None:
    """Let the last replies leave before the process exits."""
    for _ in range(100):
        if out.get_write_buffer_size() == 0:
            break
        await asyncio.sleep(0.01)
    with contextlib.suppress(OSError):
        out.close()


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
