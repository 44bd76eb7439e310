"""Python-docs HTML and rendered man pages as text blocks (one paragraph, list item, code block,
heading or table row each)."""

from __future__ import annotations

import re
import textwrap
from collections.abc import Iterable
from dataclasses import dataclass
from html.parser import HTMLParser


@dataclass(frozen=True)
class Block:
    """One paragraph of a page: ``kind`` is prose (a <p>), code (<pre>), heading, item
    (list item / definition text outside a <p>) or table (a row)."""

    kind: str
    text: str


_VOID = frozenset("area base br col embed hr img input link meta param source track wbr".split())
_SKIP_TAGS = frozenset("script style nav head form svg button noscript iframe template".split())
_SKIP_CLASSES = frozenset({"sphinxsidebar", "sphinxsidebarwrapper", "sidebar", "related", "footer",
                           "headerlink", "mobile-nav", "menu-wrapper", "inline-search",
                           "clearer", "version_switcher_placeholder",
                           "language_switcher_placeholder", "linenos", "copybutton"})
_BLOCK_TAGS = frozenset("p pre li dt dd h1 h2 h3 h4 h5 h6 tr blockquote div section table "
                        "ul ol dl caption figcaption figure article main body aside".split())
_HEADINGS = frozenset("h1 h2 h3 h4 h5 h6".split())


class _PageParser(HTMLParser):
    """Collect the text blocks of one Sphinx page (see :func:`html_to_blocks`)."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        # Each open element: (tag, skips, is_main). Void elements are never pushed.
        self.stack: list[tuple[str, bool, bool]] = []
        self.skip = 0
        self.main = 0
        self.saw_main = False
        self.pre = 0
        self.buf: list[str] = []
        self.kind_hint: list[str] = []
        self.blocks: list[tuple[bool, Block]] = []  # (inside main, block)
        self.title = ""
        self._in_title = False
        self._title_buf: list[str] = []

    # -- helpers
    def _kind(self) -> str:
        tags = [t for t, _, _ in self.stack]
        if self.pre:
            return "code"
        for t in reversed(tags):
            if t in _HEADINGS:
                return "heading"
            if t == "p":
                return "prose"
            if t in ("td", "th", "tr", "table"):
                return "table"
            if t in ("li", "dt", "dd"):
                return "item"
        return "item"

    def _flush(self) -> None:
        raw = "".join(self.buf)
        self.buf = []
        kind = self.kind_hint[-1] if self.kind_hint else "item"
        self.kind_hint = []
        if kind == "code":
            lines = [ln.rstrip() for ln in raw.split("\n")]
            while lines and not lines[0].strip():
                lines.pop(0)
            text = "\n".join(lines).rstrip()
        else:
            text = " ".join(raw.split())
        if text:
            self.blocks.append((self.main > 0, Block(kind, text)))

    # -- parser callbacks
    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        classes = set((a.get("class") or "").split())
        if tag == "h1" and not self.title:
            self._in_title = True
        if tag in _VOID:
            if tag == "br" and not self.skip:
                self.buf.append("\n" if self.pre else " ")
            return
        skips = tag in _SKIP_TAGS or bool(classes & _SKIP_CLASSES)
        is_main = a.get("role") == "main" or (tag == "div" and "body" in classes)
        if not self.skip and (tag in _BLOCK_TAGS):
            self._flush()
        if not self.skip and tag in ("td", "th") and self.buf and "".join(self.buf).strip():
            self.buf.append(" | ")
        self.stack.append((tag, skips, is_main))
        self.skip += skips
        self.main += is_main
        self.saw_main |= is_main
        self.pre += tag == "pre"

    def handle_endtag(self, tag: str) -> None:
        if tag in _VOID or not any(t == tag for t, _, _ in self.stack):
            return  # stray end tag
        while self.stack:
            t, skips, is_main = self.stack[-1]
            if not self.skip and (t in _BLOCK_TAGS):
                self._flush()
            self.stack.pop()
            self.skip -= skips
            self.main -= is_main
            self.pre -= t == "pre"
            if t == "h1" and self._in_title:
                self._in_title = False
                self.title = " ".join("".join(self._title_buf).split())
            if t == tag:
                break

    def handle_data(self, data: str) -> None:
        if self._in_title and not self.skip:
            self._title_buf.append(data)
        if self.skip:
            return
        if data.strip() and (not self.kind_hint or self.kind_hint[-1] == "item"):
            self.kind_hint.append(self._kind())
        self.buf.append(data)

    def close(self) -> None:
        super().close()
        self._flush()


def html_to_blocks(html: str) -> tuple[str, list[Block]]:
    """``(title, blocks)`` of a Sphinx HTML page.

    Only the main body (``role="main"`` / ``div.body``) is kept when the page has one;
    navigation, sidebars, footers, scripts, styles and the "¶" header links are dropped.
    Text outside ``<pre>`` has its whitespace collapsed; code keeps its lines. The title is
    the first ``<h1>``'s text.
    """
    parser = _PageParser()
    parser.feed(html)
    parser.close()
    blocks = [b for in_main, b in parser.blocks if in_main or not parser.saw_main]
    return parser.title, blocks


def blocks_to_text(blocks: Iterable[Block]) -> str:
    """Blocks as plain text, separated by blank lines."""
    return "\n\n".join(b.text for b in blocks if b.text)


def html_to_text(html: str) -> str:
    return blocks_to_text(html_to_blocks(html)[1])


# --------------------------------------------------------------------------- man page -> text

_OVERSTRIKE = re.compile(r".\x08")
_SGR = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_MAN_HEADER = re.compile(r"^\S+\([^)]*\)\s{2,}.*$|^.*\s{2,}\S+\([^)]*\)$")

# a plain word, maybe quoted or punctuated
WORDY = re.compile(r"^[(\"'“‘]?[A-Za-z][a-z]*(?:['’-][a-z]+)*[)\"'”’]?[,.;:!?]?[)\"'”’]?$")


def _proseish(line: str) -> bool:
    words = line.split()
    return len(words) >= 6 and sum(bool(WORDY.match(w)) for w in words) >= 0.7 * len(words)


def man_to_blocks(rendered: str) -> tuple[str, list[Block]]:
    """``(title, blocks)`` of a man page rendered by groff with one line per paragraph.

    Expects ``groff -t -Tutf8 -man -rLL=2000n -rHY=0 -P-cbou`` output (no hyphenation, no
    wrapping, no overstrike): the running header and footer lines are dropped; a line indented
    by at most 3 columns is a heading (NAME, DESCRIPTION, a subsection); a long line of mostly
    plain words is a prose paragraph; runs of other lines (code, synopsis, tagged-paragraph
    tags, tables) are kept as one block with their relative indentation. The title is the
    NAME section's line ("open, openat, creat - open and possibly create a file").
    """
    text = _SGR.sub("", _OVERSTRIKE.sub("", rendered)).replace("\u2010", "-")
    lines = [ln.rstrip() for ln in text.split("\n")]
    filled = [i for i, ln in enumerate(lines) if ln.strip()]
    for i in (filled[:1] + filled[-1:]):
        if _MAN_HEADER.match(lines[i].strip()):
            lines[i] = ""
    blocks: list[Block] = []
    pending: list[str] = []

    def flush() -> None:
        if pending:
            code = textwrap.dedent("\n".join(pending)).strip("\n")
            blocks.append(Block("code" if len(pending) > 1 else "item", code))
            pending.clear()

    for line in lines + [""]:
        if not line.strip():
            flush()
            continue
        indent = len(line) - len(line.lstrip())
        if indent <= 3:
            flush()
            blocks.append(Block("heading", " ".join(line.split())))
        elif _proseish(line):
            flush()
            blocks.append(Block("prose", " ".join(line.split())))
        else:
            pending.append(line)
    title = ""
    for a, b in zip(blocks, blocks[1:]):
        if a.kind == "heading" and a.text == "NAME":
            title = " ".join(b.text.split())
            break
    return title, blocks
