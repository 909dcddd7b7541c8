"""What the agent and its SIP worker processes say to each other (probes.workers, probes.worker).

Each side writes frames on a pipe: a 4-byte big-endian length, then the body.

agent → worker (the worker's stdin)
    pickles of :class:`Start` (first), :class:`Run` and :class:`Cancel`. Pickle, because a
    ``Target`` carries its secrets and validated values (a ``password_file`` already
    read) that a JSON round trip would lose or re-validate; the agent is the trusted side.
worker → agent (a pipe of its own: the worker's fd 1, while its stdout goes to stderr)
    JSON of :class:`Reply`, validated by pydantic. The worker is the process that
    parses hostile SIP input, so what it says is checked like any input: a frame that is
    too big or does not validate ends that worker (the agent kills and restarts it).

A reply's ``outcome`` is exactly the engine's ``CheckOutcome``. ``refusals`` is the
worker's live-number guard count by reason since it started (the agent adds them up).
"""

from __future__ import annotations

import asyncio
import pickle
import struct
from dataclasses import dataclass
from typing import Final, Literal

from pydantic import BaseModel, ConfigDict, Field

from ecpm.errors import EcpmError
from probes.config import SipSettings, Target
from probes.outcome import CheckOutcome

MAX_REPLY_BYTES: Final = 1 << 20  # a reply is about 1 KiB; anything this big is a broken worker
_LENGTH: Final = struct.Struct(">I")


class WorkerProtocolError(EcpmError):
    """A frame that is cut short, too big or not what the protocol says."""


@dataclass(frozen=True, slots=True)
class Start:
    """The worker's engine: its SIP settings (its own port), guard and poll interval."""

    name: str  # "worker-2": its log lines and its errors say which
    settings: SipSettings
    home_region: str
    dial_prefixes: tuple[str, ...]
    log_level: int
    poll_interval: float = 0.01


@dataclass(frozen=True, slots=True)
class Run:
    """Run one check (``check_kinds.run_check``) and reply with its outcome."""

    id: int
    target: Target
    kind: str


@dataclass(frozen=True, slots=True)
class Cancel:
    """The agent gave up on check ``id`` (hard timeout, shutdown): hang it up, reply ``cancelled``."""

    id: int


Request = Start | Run | Cancel


class Reply(BaseModel):
    """One frame from a worker. ``ready`` (first: engine up, ``local`` its addresses) or
    ``failed`` (first: the engine did not start, ``error`` says why; the worker exits);
    then per check ``verdict`` (early, optional), ``outcome`` or ``cancelled``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["ready", "failed", "verdict", "outcome", "cancelled"]
    id: int | None = None
    outcome: CheckOutcome | None = None
    refusals: dict[str, int] = Field(default_factory=dict, max_length=64)
    local: dict[str, str] = Field(default_factory=dict, max_length=8)
    error: str | None = Field(default=None, max_length=4096)


def frame(body: bytes) -> bytes:
    return _LENGTH.pack(len(body)) + body


def request_frame(request: Request) -> bytes:
    return frame(pickle.dumps(request, protocol=pickle.HIGHEST_PROTOCOL))


def reply_frame(reply: Reply) -> bytes:
    return frame(reply.model_dump_json(exclude_defaults=True).encode())


async def read_frame(reader: asyncio.StreamReader, *, limit: int) -> bytes | None:
    """The next frame's body; None at a clean end of the stream (EOF between frames)."""
    try:
        head = await reader.readexactly(_LENGTH.size)
    except asyncio.IncompleteReadError as exc:
        if exc.partial:
            raise WorkerProtocolError("the stream ended inside a frame header") from None
        return None
    (size,) = _LENGTH.unpack(head)
    if size > limit:
        raise WorkerProtocolError(f"a frame of {size} bytes is over the {limit} byte limit")
    try:
        return await reader.readexactly(size)
    except asyncio.IncompleteReadError:
        raise WorkerProtocolError(f"the stream ended inside a frame of {size} bytes") from None


def parse_reply(body: bytes) -> Reply:
    try:
        return Reply.model_validate_json(body)
    except ValueError as exc:
        raise WorkerProtocolError(f"not a worker reply: {str(exc)[:300]}") from None


def parse_request(body: bytes) -> Request:
    found = pickle.loads(body)  # from the agent, our parent, on a private pipe
    if not isinstance(found, Start | Run | Cancel):
        raise WorkerProtocolError(f"not a worker request: {type(found).__name__}")
    return found
