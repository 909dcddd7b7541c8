"""The agent's SIP workers: N processes (``python -m probes.worker``), each one pjsua2
engine with ``sip.max_calls`` call slots, supervised from the agent's event loop.

    Scheduler ──run(target, kind)──▶ WorkerPool.run: guard, pick a worker with a free slot
        ──Run frame──▶ worker: check_kinds.run_check(engine, …) ──outcome frame──▶ CheckOutcome

Why processes: the wheel allows 4 calls per process (docs/checks.md), and pjsua2 has
crashed on hostile input before. A worker that dies (EOF on its pipe, then its exit
status) loses only its own calls: each check in flight on it completes as ``fail`` with
reason ``internal_error`` and ``detail["worker"]`` naming the worker and its exit code or
signal. The worker is started again after a backoff (1 s, doubling to 30 s; back to 1 s
once a worker has stayed up for a minute). The agent never dies with it.

Dispatch: a check goes to the running worker with the most free slots; when every slot is
taken it waits (the scheduler's hard timeout bounds the wait).

Registered accounts: a registration lives in one worker. Every check of a target with a
SIP account (its ``register`` check and the calls placed from it) goes to the worker that
owns that account: the first time an account is seen it is given to the worker owning the
fewest, and it stays there. When that worker dies its accounts stay with the replacement,
which registers afresh on the next check (``registration: first``). So the registrar
sees one binding per account, as from one phone.

Safety: the live-number guard runs here, in the agent, on every URI of the target (the
Request-URI, the outbound proxy, the account's registrar) before a check is dispatched, and
again inside the worker's engine before anything is sent (probes.worker).

Shutdown (:meth:`WorkerPool.aclose`): end of input to each worker; it hangs up, destroys
its library and exits; one that has not exited within ``stop_timeout`` is killed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import probes
from probes.checks import Findings
from probes.config import ProbeConfig, SipAccount, Target
from probes.guard import Guard, GuardRefusal
from probes.outcome import CheckOutcome
from probes.scheduler import verdict_ready
from probes.sip import SipError
from probes.worker_wire import (
    MAX_REPLY_BYTES,
    Cancel,
    Reply,
    Run,
    Start,
    WorkerProtocolError,
    parse_reply,
    read_frame,
    request_frame,
)

logger = logging.getLogger(__name__)

BACKOFF_FIRST: Final = 1.0
BACKOFF_MAX: Final = 30.0
STABLE_AFTER: Final = 60.0  # a worker up this long resets the backoff
START_TIMEOUT: Final = 30.0
STOP_TIMEOUT: Final = 15.0  # hang up, libDestroy (about 1 s), exit
WORKER_COMMAND: Final = (sys.executable, "-m", "probes.worker")


@dataclass(frozen=True, slots=True)
class WorkerPoolStats:
    workers: int  # configured
    up: int  # running and taking checks
    slots: int  # call slots of the running workers
    busy: int  # checks in flight on workers
    restarts_total: int  # workers started again after one died
    lost_checks_total: int  # checks that died with their worker (internal_error)


@dataclass(slots=True)
class _Check:
    run: Run
    started_at: datetime  # UTC, when it was handed to its worker
    verdict: asyncio.Future[CheckOutcome]
    done: asyncio.Future[CheckOutcome | None]  # None: the worker confirmed it cancelled


@dataclass(slots=True)
class _Slot:
    """One worker slot: the process running in it now (if any) and what it does."""

    index: int
    proc: asyncio.subprocess.Process | None = None
    up: bool = False
    started_at: float = 0.0
    checks: dict[int, _Check] = field(default_factory=dict)
    refusals_past: dict[str, int] = field(default_factory=dict)
    refusals_live: dict[str, int] = field(default_factory=dict)
    accounts: int = 0

    @property
    def name(self) -> str:
        return f"worker-{self.index}"

    def refusals(self) -> dict[str, int]:
        out = dict(self.refusals_past)
        for reason, n in self.refusals_live.items():
            out[reason] = out.get(reason, 0) + n
        return out


def _account_key(account: SipAccount) -> tuple[str, str, str]:
    return (account.registrar, account.username, account.auth_user)


def _worker_env() -> dict[str, str]:
    """The agent's environment, with the agent's own ``probes`` first on the path."""
    root = str(Path(probes.__file__).resolve().parent.parent)
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": root if not path else f"{root}{os.pathsep}{path}"}


def exit_text(code: int | None) -> str:
    if code is None:
        return "its pipe closed"
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-code).name}"
        return f"killed by signal {-code}"
    return f"exit code {code}"


class WorkerPool:
    """``async with WorkerPool(config, guard) as pool:``; ``pool.run`` is the scheduler's runner.

    ``workers`` overrides ``config.sip_workers()``; ``command`` starts one worker (tests
    give it a worker that breaks the protocol)."""

    def __init__(
        self,
        config: ProbeConfig,
        guard: Guard,
        *,
        workers: int | None = None,
        poll_interval: float = 0.01,
        stop_timeout: float = STOP_TIMEOUT,
        command: Sequence[str] = WORKER_COMMAND,
    ) -> None:
        self._config = config
        self._command = tuple(command)
        self.guard = guard
        self._poll = poll_interval
        self._stop_timeout = stop_timeout
        count = workers if workers is not None else config.sip_workers()
        self.capacity = config.sip.max_calls  # call slots per worker
        self._slots = [_Slot(i) for i in range(count)]
        self.size = count  # worker processes
        self._owners: dict[tuple[str, str, str], _Slot] = {}
        self._ids = 0
        self._changed: asyncio.Condition | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._closing = False
        self._lock = threading.Lock()  # stats() is read from the health endpoint's thread
        self._restarts = 0
        self._lost = 0

    # ------------------------------------------------------------ lifecycle

    @property
    def closing(self) -> bool:
        return self._closing

    async def __aenter__(self) -> WorkerPool:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def start(self) -> None:
        """Start every worker; SipError naming the worker if one cannot start."""
        self._changed = asyncio.Condition()
        results = await asyncio.gather(*(self._spawn(s) for s in self._slots), return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            await self.aclose()
            raise errors[0]
        for slot in self._slots:
            self._watch(slot)
        logger.info("%d SIP worker(s) up, %d call slots each", len(self._slots), self.capacity)

    async def aclose(self) -> None:
        """Stop every worker cleanly (end of input), killing any that does not exit in time."""
        self._closing = True
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await asyncio.gather(*(self._stop(s) for s in self._slots))
        for slot in self._slots:
            self._lose(slot, "the agent stopped")

    async def _stop(self, slot: _Slot) -> None:
        proc, slot.up = slot.proc, False
        if proc is None or proc.returncode is not None:
            return
        if proc.stdin is not None:
            with contextlib.suppress(OSError):
                proc.stdin.close()
        try:
            await asyncio.wait_for(proc.wait(), self._stop_timeout)
        except TimeoutError:
            logger.error("%s did not stop within %.0f s: killed", slot.name, self._stop_timeout)
            proc.kill()
            await proc.wait()

    def _settings_for(self, slot: _Slot) -> Start:
        sip = self._config.sip
        port = sip.port + slot.index if sip.port else 0  # a fixed port: worker i on port + i
        return Start(
            name=slot.name,
            settings=sip.model_copy(update={"port": port}),
            home_region=self.guard.home_region,
            dial_prefixes=self.guard.dial_prefixes,
            log_level=logging.getLogger().getEffectiveLevel(),
            poll_interval=self._poll,
        )

    async def _spawn(self, slot: _Slot) -> None:
        """Start the slot's process and wait for its engine: ``ready``, or SipError."""
        proc = await asyncio.create_subprocess_exec(
            *self._command,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            env=_worker_env(), start_new_session=True,  # Ctrl-C reaches the agent, which stops it
        )  # fmt: skip
        slot.proc = proc
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(request_frame(self._settings_for(slot)))
        try:
            body = await asyncio.wait_for(read_frame(proc.stdout, limit=MAX_REPLY_BYTES), START_TIMEOUT)
            reply = parse_reply(body) if body is not None else None
        except (TimeoutError, WorkerProtocolError) as exc:
            reply, problem = None, str(exc) or "no answer in time"
        else:
            problem = "" if reply is None else (reply.error or "")
        if reply is None or reply.kind != "ready":
            if proc.returncode is None:
                proc.kill()
            code = await proc.wait()
            why = problem or exit_text(code)
            raise SipError(f"SIP {slot.name} did not start: {why}")
        slot.up, slot.started_at = True, time.monotonic()
        slot.refusals_live = {}
        logger.info(
            "SIP %s (pid %d) listening on %s",
            slot.name,
            proc.pid,
            ", ".join(f"{k} {v}" for k, v in reply.local.items()),
        )
        await self._notify()

    def _watch(self, slot: _Slot) -> None:
        task = asyncio.create_task(self._supervise(slot), name=f"ecpm-{slot.name}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _supervise(self, slot: _Slot) -> None:
        """Read the worker's replies; when it dies, fail its checks and start it again."""
        backoff = BACKOFF_FIRST
        while not self._closing:
            why = await self._read_replies(slot)
            slot.up = False
            proc, code = slot.proc, None
            if proc is not None:
                if proc.returncode is None and why:  # it broke the protocol: not trusted any more
                    proc.kill()
                try:
                    code = await asyncio.wait_for(proc.wait(), self._stop_timeout)
                except TimeoutError:  # its pipe closed, the process hangs: it is of no use
                    proc.kill()
                    code = await proc.wait()
            if self.closing:
                return
            detail = f"SIP {slot.name} died ({why or exit_text(code)})"
            logger.error("%s: %d check(s) in flight on it are lost", detail, len(slot.checks))
            self._lose(slot, detail)
            slot.refusals_past = slot.refusals()
            slot.refusals_live = {}
            await self._notify()
            if time.monotonic() - slot.started_at >= STABLE_AFTER:
                backoff = BACKOFF_FIRST
            while not self._closing:
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, BACKOFF_MAX)
                try:
                    await self._spawn(slot)
                except (SipError, OSError) as exc:
                    logger.error("%s; trying again in %.0f s", exc, backoff)
                    continue
                with self._lock:
                    self._restarts += 1
                break

    async def _read_replies(self, slot: _Slot) -> str:
        """Until the worker's pipe ends: "" at a clean end, else what was wrong."""
        proc = slot.proc
        assert proc is not None and proc.stdout is not None
        try:
            while (body := await read_frame(proc.stdout, limit=MAX_REPLY_BYTES)) is not None:
                self._deliver(slot, parse_reply(body))
        except WorkerProtocolError as exc:
            logger.error("SIP %s broke the protocol: %s", slot.name, exc)
            return f"protocol error: {exc}"
        return ""

    def _deliver(self, slot: _Slot, reply: Reply) -> None:
        check = slot.checks.get(reply.id) if reply.id is not None else None
        if reply.refusals:
            slot.refusals_live = dict(reply.refusals)
        if check is None:
            return
        if reply.kind == "verdict" and reply.outcome is not None:
            if not check.verdict.done():
                check.verdict.set_result(reply.outcome)
            return
        if check.done.done():
            return
        if reply.kind == "outcome" and reply.outcome is not None:
            check.done.set_result(reply.outcome)
        elif reply.kind == "cancelled":
            check.done.set_result(None)
        else:
            check.done.set_result(
                self._internal_error(check, f"SIP {slot.name}: the check raised: {reply.error}")
            )

    def _lose(self, slot: _Slot, detail: str) -> None:
        """Every check in flight on the slot's (dead) process ends as internal_error."""
        lost = 0
        for check in list(slot.checks.values()):
            if not check.done.done():
                check.done.set_result(self._internal_error(check, detail))
                lost += 1
        with self._lock:
            self._lost += lost

    @staticmethod
    def _internal_error(check: _Check, detail: str) -> CheckOutcome:
        return CheckOutcome(
            check=check.run.kind,
            outcome="fail",
            started_at=check.started_at,
            finished_at=datetime.now(UTC),
            reason="internal_error",
            detail={"worker": detail[:1024]},
        )

    async def _notify(self) -> None:
        if self._changed is not None:
            async with self._changed:
                self._changed.notify_all()

    # ------------------------------------------------------------ dispatch

    def _pick(self, target: Target) -> _Slot | None:
        """The worker for this check now, or None if it must wait for a free slot."""
        if target.account is not None:
            key = _account_key(target.account)
            owner = self._owners.get(key)
            if owner is None:
                owner = min(self._slots, key=lambda s: (s.accounts, s.index))
                owner.accounts += 1
                self._owners[key] = owner
            return owner if owner.up and len(owner.checks) < self.capacity else None
        free = [s for s in self._slots if s.up and len(s.checks) < self.capacity]
        return max(free, key=lambda s: (self.capacity - len(s.checks), -s.index), default=None)

    def _refused(self, target: Target, kind: str) -> CheckOutcome | None:
        """The agent's own guard on every URI of the target, before any worker sees it."""
        account = target.account
        uris = (target.uri, target.outbound_proxy, None if account is None else account.registrar)
        try:
            for uri in uris:
                if uri is not None:
                    self.guard.check(
                        uri,
                        target=target.id,
                        declared_test_endpoint=target.test_endpoint,
                        carrier_test_service=target.carrier(),
                    )
        except GuardRefusal as refusal:
            return Findings(kind, datetime.now(UTC)).refused(refusal)
        return None

    async def run(self, target: Target, kind: str) -> CheckOutcome:
        """Run one check on a worker (the scheduler's runner). Never raises for a failed
        path; cancelled, it asks the worker to hang up and waits for it to say so."""
        refused = self._refused(target, kind)
        if refused is not None:
            return refused
        changed = self._changed
        if changed is None or self._closing:
            return Findings(kind, datetime.now(UTC)).not_sent(SipError("the SIP workers are not running"))
        loop = asyncio.get_running_loop()
        async with changed:
            while (slot := self._pick(target)) is None:
                await changed.wait()
            self._ids += 1
            check = _Check(
                Run(self._ids, target, kind), datetime.now(UTC), loop.create_future(), loop.create_future()
            )
            slot.checks[check.run.id] = check  # the slot is taken before anyone else picks
        try:
            proc = slot.proc
            assert proc is not None and proc.stdin is not None  # a slot is up only with its process
            proc.stdin.write(request_frame(check.run))
            return await self._await_outcome(slot, check)
        finally:
            slot.checks.pop(check.run.id, None)
            await self._notify()

    async def _await_outcome(self, slot: _Slot, check: _Check) -> CheckOutcome:
        try:
            either: set[asyncio.Future[Any]] = {check.verdict, check.done}
            await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
            if check.verdict.done() and not check.done.done():
                verdict_ready(check.verdict.result())  # in the scheduler's runner task
            found = await asyncio.shield(check.done)
        except asyncio.CancelledError:
            proc = slot.proc
            if not check.done.done() and proc is not None and proc.stdin is not None:
                with contextlib.suppress(OSError, RuntimeError):
                    proc.stdin.write(request_frame(Cancel(check.run.id)))
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.shield(check.done)  # the slot stays taken until it hung up
            raise
        if found is None:  # cancelled in the worker although the agent did not ask
            return self._internal_error(check, f"SIP {slot.name} cancelled the check")
        return found

    # ------------------------------------------------------------ stats

    def stats(self) -> WorkerPoolStats:
        with self._lock:
            restarts, lost = self._restarts, self._lost
        up = [s for s in self._slots if s.up]
        return WorkerPoolStats(
            workers=len(self._slots),
            up=len(up),
            slots=len(up) * self.capacity,
            busy=sum(len(s.checks) for s in self._slots),
            restarts_total=restarts,
            lost_checks_total=lost,
        )

    def guard_refusals(self) -> dict[str, int]:
        """The workers' own guard refusals by reason (the agent's guard counts its own)."""
        out: dict[str, int] = {}
        for slot in self._slots:
            for reason, n in slot.refusals().items():
                out[reason] = out.get(reason, 0) + n
        return out

    def pids(self) -> list[int | None]:
        """Each worker's process id now (None while it is down): for tests and benches."""
        return [s.proc.pid if s.up and s.proc is not None else None for s in self._slots]
