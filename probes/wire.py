"""The signed JSON both wire schemas share (``probes.result``, ``probes.status``).

``canonical`` is the UTF-8 of ``json.dumps`` with ``sort_keys=True``,
``separators=(",", ":")``, ``ensure_ascii=False`` and ``allow_nan=False``; a signature
is the lower-case hex HMAC-SHA256 of those bytes with the probe's key.
A receiver holding the bytes a message was parsed from checks the signature over them
(``signature_ok(key, wire=...)``) when they are exactly its wire form (``to_json()``, the
canonical JSON *with* ``sig``): the signed bytes are then that form with its one ``sig``
member cut out (``unsigned``), the same bytes ``canonical()`` would encode again, because
a canonical object is its sorted members joined by commas. Same scheme, one encoding less.
``load_object`` is the strict decoding every payload passes before its fields are
judged: size, UTF-8, JSON without duplicate keys or NaN/Infinity, an object, the schema
name. Standard library only: ``monitor/`` imports it through those two modules.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Mapping
from dataclasses import replace
from typing import Any, Self

from ecpm.errors import EcpmError


class WireError(EcpmError, ValueError):
    """A payload is not valid; ``reason`` is a bounded code (a metric label)."""

    def __init__(self, reason: Any, detail: str) -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}")


def canonical(data: Mapping[str, Any]) -> bytes:
    return json.dumps(
        data, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")


def sign(key: bytes | str, data: bytes) -> str:
    raw = key.encode("utf-8") if isinstance(key, str) else key
    return hmac.new(raw, data, hashlib.sha256).hexdigest()


def signature_matches(key: bytes | str, data: bytes, sig: str) -> bool:
    """Constant time; a ``sig`` that is no hex string simply does not match."""
    return hmac.compare_digest(sign(key, data).encode("ascii"), sig.encode("utf-8", "replace"))


class Signed:
    """For a frozen dataclass with a ``sig`` field and ``to_dict(with_sig=...)``: its
    signed bytes, its wire form, and a copy signed with a key."""

    __slots__ = ()
    sig: str

    def to_dict(self, *, with_sig: bool = True) -> dict[str, Any]:
        raise NotImplementedError

    def canonical(self) -> bytes:
        """The signed bytes: every field except ``sig``, canonical JSON, UTF-8."""
        return canonical(self.to_dict(with_sig=False))

    def to_json(self) -> bytes:
        """The payload as published (canonical JSON including ``sig``)."""
        return canonical(self.to_dict())

    def signed(self, key: bytes | str) -> Self:
        return replace(self, sig=sign(key, self.canonical()))  # type: ignore[type-var]

    def wire_of(self, payload: bytes) -> bytes | None:
        """``payload`` if it is exactly this message's wire form (``to_json()``), else None:
        the form a store keeps, so it need not be encoded again."""
        wire = self.to_json()
        return wire if wire == payload else None

    def signature_ok(self, key: bytes | str, *, wire: bytes | None = None) -> bool:
        """``wire``: this message's own wire form (``wire_of``), checked without encoding it again."""
        signed = None if wire is None else unsigned(wire, self.sig)
        return signature_matches(key, self.canonical() if signed is None else signed, self.sig)


def unsigned(wire: bytes, sig: str) -> bytes | None:
    """The canonical bytes without ``sig``, cut from ``wire`` (canonical JSON of an object
    whose ``sig`` member is ``sig``); None when the member is not found exactly once."""
    quoted = f'"{sig}"' if sig.isascii() and sig.isalnum() else json.dumps(sig, ensure_ascii=False)
    member = b'"sig":' + quoted.encode("utf-8")
    if wire.count(member) != 1:
        return None
    inner = b"," + member
    if inner in wire:
        return wire.replace(inner, b"", 1)
    first = b"{" + member
    if wire.startswith(first + b","):  # the first member of the object
        return b"{" + wire[len(first) + 1 :]
    if wire == first + b"}":  # the only one
        return b"{}"
    return None


def load_object(payload: bytes, *, max_bytes: int, schema: str, error: type[WireError]) -> dict[str, Any]:
    """The payload as a JSON object naming ``schema``, or ``error`` with reason
    ``too_large``, ``encoding``, ``json`` or ``schema``."""
    if len(payload) > max_bytes:
        raise error("too_large", f"{len(payload)} bytes > {max_bytes}")
    try:
        text = bytes(payload).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise error("encoding", f"not UTF-8 at byte {exc.start}") from None

    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in pairs:
            if k in out:
                raise error("json", f"duplicate key {k[:40]!r}")
            out[k] = v
        return out

    def no_constant(name: str) -> Any:
        raise error("json", f"{name} is not a JSON number")

    try:
        data = json.loads(text, object_pairs_hook=no_duplicates, parse_constant=no_constant)
    except WireError:
        raise
    except json.JSONDecodeError as exc:
        raise error("json", f"line {exc.lineno} column {exc.colno}: {exc.msg}") from None
    except (RecursionError, ValueError) as exc:  # nesting 10,000 deep; a 5,000-digit integer
        raise error("json", f"unreadable JSON: {type(exc).__name__}: {str(exc)[:80]}") from None
    if not isinstance(data, dict):
        raise error("json", "the payload is not a JSON object")
    if data.get("schema") != schema:
        raise error("schema", f"schema is {str(data.get('schema'))[:40]!r}, not {schema!r}")
    return data
