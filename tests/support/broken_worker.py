"""A SIP worker that breaks the protocol (for tests/test_sip_workers.py): it answers
``ready``, then answers the first check with a frame header claiming 2 GiB."""

from __future__ import annotations

import struct
import sys

from probes.worker_wire import Reply, reply_frame


def read_frame() -> bytes:
    head = sys.stdin.buffer.read(4)
    if len(head) < 4:
        sys.exit(0)
    return sys.stdin.buffer.read(struct.unpack(">I", head)[0])


def main() -> None:
    read_frame()  # Start
    sys.stdout.buffer.write(reply_frame(Reply(kind="ready", local={"udp": "127.0.0.1:1"})))
    sys.stdout.buffer.flush()
    read_frame()  # Run
    sys.stdout.buffer.write(struct.pack(">I", 1 << 31) + b"garbage")
    sys.stdout.buffer.flush()
    while read_frame():
        pass


if __name__ == "__main__":
    main()
