"""A small DOM of an HTML document (stdlib html.parser: the test environment has no lxml), enough to
read the figures a page shows by id and class, and a strict nesting check of a server-rendered page."""

from __future__ import annotations

from dataclasses import dataclass, field
from html.parser import HTMLParser

VOID = frozenset(
    {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}
)
# SVG children written self-closing (<polyline .../>) are void too, as far as nesting goes.
SELF_CLOSING_SVG = frozenset({"polyline", "circle", "line", "rect", "path"})


@dataclass
class Element:
    tag: str
    attrs: dict[str, str]
    children: list[Element | str] = field(default_factory=list)

    def text(self) -> str:
        return "".join(c if isinstance(c, str) else c.text() for c in self.children)

    def iter(self) -> list[Element]:
        found = [self]
        for child in self.children:
            if isinstance(child, Element):
                found += child.iter()
        return found

    def by_id(self, ident: str) -> Element:
        matches = [e for e in self.iter() if e.attrs.get("id") == ident]
        assert len(matches) == 1, f"{len(matches)} elements with id {ident!r}"
        return matches[0]

    def all(self, tag: str, cls: str | None = None) -> list[Element]:
        return [
            e
            for e in self.iter()
            if e.tag == tag and (cls is None or cls in e.attrs.get("class", "").split())
        ]


class _Builder(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.root = Element("#document", {})
        self.stack = [self.root]
        self.problems: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        element = Element(tag, {k: v or "" for k, v in attrs})
        self.stack[-1].children.append(element)
        if tag not in VOID:
            self.stack.append(element)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.stack[-1].children.append(Element(tag, {k: v or "" for k, v in attrs}))

    def handle_endtag(self, tag: str) -> None:
        if tag in VOID:
            return
        if self.stack[-1].tag == tag:
            self.stack.pop()
            return
        self.problems.append(f"</{tag}> closes <{self.stack[-1].tag}>")
        # Recover as a browser would: close up to the matching open element, if any.
        for depth in range(len(self.stack) - 1, 0, -1):
            if self.stack[depth].tag == tag:
                del self.stack[depth:]
                return

    def handle_data(self, data: str) -> None:
        self.stack[-1].children.append(data)


def parse(document: str) -> Element:
    builder = _Builder()
    builder.feed(document)
    builder.close()
    return builder.root


def nesting_problems(document: str) -> list[str]:
    """Mismatched or unclosed elements of a page we render (every non-void element closed, in order)."""
    builder = _Builder()
    builder.feed(document)
    builder.close()
    unclosed = [f"<{e.tag}> never closed" for e in builder.stack[1:]]
    return builder.problems + unclosed
