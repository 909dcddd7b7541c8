"""Drive Debian's headless Chromium from page tests: DOM dump and screenshot.

Tests that use it carry ``@pytest.mark.peers("chromium")``. Each call starts a fresh
Chromium with its own throw-away profile, loads one URL, lets the page's scripts run
for ``budget_ms`` of virtual time, and exits. The result of ``dump_dom`` can be
queried with :func:`parse`::

    dom = parse(dump_dom(url))
    [card.attrs["data-state"] for card in dom.find_all("article", **{"data-target": "uk-999"})]
"""

from __future__ import annotations

import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path

from tests.support.peers import peer_path

FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
)


class BrowserError(AssertionError):
    """Chromium failed; the message carries its exit code and the end of its stderr."""


def chromium(*args: str, budget_ms: int = 3000, timeout: float = 60) -> str:
    """Run one headless Chromium with ``args`` (e.g. ``--dump-dom URL``); its stdout."""
    with tempfile.TemporaryDirectory(prefix="ecpm-chromium-") as profile:
        cmd = [
            peer_path("chromium"),
            *FLAGS,
            f"--user-data-dir={profile}",
            f"--virtual-time-budget={budget_ms}",
            *args,
        ]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    if done.returncode != 0:
        raise BrowserError(f"chromium exited {done.returncode}: {done.stderr[-2000:]}")
    return done.stdout


def dump_dom(url: str, *, budget_ms: int = 3000) -> str:
    """The page's DOM, serialised after its scripts ran."""
    dom = chromium("--dump-dom", url, budget_ms=budget_ms)
    if "<html" not in dom:
        raise BrowserError(f"no DOM from {url}: {dom[:500]!r}")
    return dom


def screenshot(url: str, path: Path, *, width: int = 1280, height: int = 1000, budget_ms: int = 3000) -> Path:
    """A PNG of the first ``width`` x ``height`` pixels of the page."""
    path.unlink(missing_ok=True)
    chromium(f"--screenshot={path}", f"--window-size={width},{height}", url, budget_ms=budget_ms)
    if not path.is_file() or path.read_bytes()[:8] != b"\x89PNG\r\n\x1a\n":
        raise BrowserError(f"no screenshot of {url} at {path}")
    return path


# ------------------------------------------------------------------ querying a DOM dump


@dataclass(eq=False)
class Element:
    tag: str
    attrs: dict[str, str]
    children: list[Element | str] = field(default_factory=list)

    @property
    def text(self) -> str:
        """All text inside, whitespace collapsed."""
        parts: list[str] = []
        stack: list[Element | str] = [self]
        while stack:
            node = stack.pop()
            if isinstance(node, str):
                parts.append(node)
            else:
                stack.extend(reversed(node.children))
        return " ".join("".join(parts).split())

    def iter(self) -> Iterator[Element]:
        for child in self.children:
            if isinstance(child, Element):
                yield child
                yield from child.iter()

    def find_all(self, tag: str | None = None, /, **attrs: str | bool) -> list[Element]:
        """Descendants by tag and attributes (``True``: present; ``class_`` matches one class)."""
        found = []
        for e in self.iter():
            if tag is not None and e.tag != tag:
                continue
            if all(_matches(e, name, want) for name, want in attrs.items()):
                found.append(e)
        return found

    def find(self, tag: str | None = None, /, **attrs: str | bool) -> Element:
        found = self.find_all(tag, **attrs)
        if len(found) != 1:
            raise AssertionError(f"expected one <{tag or '*'} {attrs}>, found {len(found)}")
        return found[0]


def _matches(e: Element, name: str, want: str | bool) -> bool:
    if name == "class_":
        return str(want) in e.attrs.get("class", "").split()
    value = e.attrs.get(name.replace("_", "-"))
    return value is not None if want is True else value == want


_VOID = frozenset(
    {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}
)


class _Parser(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.root = Element("#document", {})
        self.stack = [self.root]

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        e = Element(tag, {k: v or "" for k, v in attrs})
        self.stack[-1].children.append(e)
        if tag not in _VOID:
            self.stack.append(e)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.stack[-1].children.append(Element(tag, {k: v or "" for k, v in attrs}))

    def handle_endtag(self, tag: str) -> None:
        for i in range(len(self.stack) - 1, 0, -1):
            if self.stack[i].tag == tag:
                del self.stack[i:]
                return

    def handle_data(self, data: str) -> None:
        self.stack[-1].children.append(data)


def parse(markup: str) -> Element:
    """A light tree of ``markup``, good enough to find elements and read their text."""
    parser = _Parser()
    parser.feed(markup)
    parser.close()
    return parser.root
