"""Long real documents, with one "needle" query each, for evaluating long-text handling (#15).

The corpus is the Python 3.11 documentation as Debian ships it (``python3.11-doc``): about
530 Sphinx HTML pages, of which ~400 run past 1,500 words, i.e. far beyond the model's
256-token window. The .deb is fetched with ``apt-get download`` (the machines reach the Debian
mirror, not the internet), pinned by sha256 and cached next to the PyPI artifacts of
:mod:`pipeline.tools.datasets`; it is unpacked with ``dpkg -x`` into a temporary folder and
only the HTML is read. Tags are stripped with the stdlib ``html.parser``: only the page's
main body is kept (navigation, sidebars, scripts, styles, footers and the pilcrow header
links are dropped; footnotes and topic boxes stay), one block (paragraph, list item, code block, heading, table row) per
paragraph, blocks separated by blank lines.

For every kept document one query is taken from its last third: a real prose sentence of
8-40 words (not code, not a heading, unique across the corpus), chosen with a seeded RNG,
and *removed* from the indexed text. A retriever that only sees a document's first 256
tokens can then find it only by topic; one that embeds every window can match the passage
around the missing sentence. :func:`evaluate` runs the real CLI for truncate / chunk+pool /
chunk+rows and reports recall@1/@10 against the document ids, windows per document and cost.

    python -m bench.long_docs fetch data/long_docs data/long_docs_queries
    python -m bench.long_docs eval data/long_docs data/long_docs_queries \
        --work out/long-docs-eval --limit 40
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from bench import REPO_ROOT
from pipeline.tools.artifacts import FetchError, fetch_pinned, pinned_deb, sha256_of
from pipeline.tools.datasets import TAG_KEY, DatasetError, atomic_path, dataset_tag, write_shards

__all__ = [
    "Block",
    "PickedQuery",
    "html_to_blocks",
    "html_to_text",
    "man_to_blocks",
    "token_counts",
    "markdown_table",
    "ranked_ids",
    "blocks_to_text",
    "pick_query",
    "split_sentences",
    "is_prose_sentence",
    "collapse_ids",
    "recall_at",
    "fetch_long_docs",
    "evaluate",
    "main",
]

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------- the .deb


# Either build is accepted (same documentation, 3.11.2): bookworm-security carries +deb12u9,
# bookworm main +deb12u8. Whichever the mirror still serves is used; a point release that
# replaces both needs a new pin here (apt-cache show python3.11-doc | grep -E 'Vers|SHA256').
PYDOC_DEBS = (
    pinned_deb("python3.11-doc", "3.11.2-6+deb12u9",
               "5b3594189d6ef9a6963ce0347fd307a1cc67620ad697e144db366070e2e146be"),
    pinned_deb("python3.11-doc", "3.11.2-6+deb12u8",
               "50eb63e7f636c4281e9ce1b8f10386f1def42159eddce34fc1f41c46261df71b"),
)
# The Linux man pages (bookworm main), the second source: ~125 pages of 1,500+ words.
MANPAGES_DEBS = (pinned_deb("manpages", "6.03-2",
                             "efa1ba4cd19ad7baeae959c9209a7eb74be2ebb858bcabb412597bfc9f588c91"),)
MANPAGES_DEV_DEBS = (pinned_deb("manpages-dev", "6.03-2",
                                 "96f55cb5e26231d5567c89b692bced63825a14a2d5bd18fdf16ea2ed44eb9838"),)
_HTML_ROOT = "usr/share/doc/python3.11/html"
_MAN_ROOT = "usr/share/man"


# --------------------------------------------------------------------------- HTML -> text


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


def _proseish(line: str) -> bool:
    words = line.split()
    return len(words) >= 6 and sum(bool(_WORDY.match(w)) for w in words) >= 0.7 * len(words)


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


# --------------------------------------------------------------------------- query sentences

_SENT_SPLIT = re.compile(r"(?<=[.!?])[\"')\]]?\s+(?=[\"'(]?[A-Z])")
_WORDY = re.compile(r"^[(\"'“‘]?[A-Za-z][a-z]*(?:['’-][a-z]+)*[)\"'”’]?[,.;:!?]?[)\"'”’]?$")
_CODE_CHARS = re.compile(r">>>|[{}=<>;\\$#|@~`_]|\(\)|\.\.\.|::|/")
_ABBREV_END = re.compile(r"\b(?:e\.g|i\.e|etc|vs|cf|Mr|Dr|No|approx)\.$")


@dataclass(frozen=True)
class PickedQuery:
    """A sentence taken out of a document: where it was, and the text without it."""

    sentence: str
    start: int          # character offset of the sentence in the original text
    original_len: int   # length of the original text
    text: str           # the document text with the sentence removed

    @property
    def position(self) -> float:
        return self.start / max(self.original_len, 1)


def split_sentences(paragraph: str) -> list[str]:
    """Split one prose paragraph into sentences (on ., ! or ? followed by a capital)."""
    parts = _SENT_SPLIT.split(paragraph.strip())
    out: list[str] = []
    for part in parts:
        part = part.strip()
        if out and _ABBREV_END.search(out[-1]):
            out[-1] = f"{out[-1]} {part}"  # "e.g. Foo" is not a sentence break
        elif part:
            out.append(part)
    return out


def is_prose_sentence(sentence: str, min_words: int = 8, max_words: int = 40) -> bool:
    """A natural-language sentence: 8-40 words, capitalised, ending in . ! or ?, without
    code punctuation, and at least 80% plain words (no dotted names, numbers, identifiers)."""
    words = sentence.split()
    if not min_words <= len(words) <= max_words:
        return False
    if not sentence[0].isupper() or sentence[-1] not in ".!?":
        return False
    if _CODE_CHARS.search(sentence) or "\n" in sentence:
        return False
    wordy = sum(bool(_WORDY.match(w)) for w in words)
    return wordy >= 0.8 * len(words)


def pick_query(blocks: Sequence[Block], rng: random.Random, *, tail: float = 1 / 3,
               avoid: frozenset[str] | set[str] = frozenset(),
               min_words: int = 8, max_words: int = 40) -> PickedQuery | None:
    """Pick one prose sentence from the last ``tail`` of the text and remove it.

    Candidates are the sentences of ``prose`` blocks that start at or after
    ``(1 - tail) * len(text)``, pass :func:`is_prose_sentence`, occur once in the text and are
    not in ``avoid`` (sentences seen in other documents). One is drawn with ``rng``; the
    returned text is ``blocks`` joined as by :func:`blocks_to_text`, without that sentence (a
    block left empty is dropped). None when no sentence qualifies.
    """
    texts = [b.text for b in blocks if b.text]
    kinds = [b.kind for b in blocks if b.text]
    full = "\n\n".join(texts)
    cut = (1 - tail) * len(full)
    offset = 0
    candidates: list[tuple[int, int, str]] = []  # (block index, start in full, sentence)
    for i, (kind, text) in enumerate(zip(kinds, texts, strict=True)):
        if kind == "prose" and offset + len(text) > cut:
            for sentence in split_sentences(text):
                local = text.find(sentence)
                start = offset + local
                if (local >= 0 and start >= cut and sentence not in avoid
                        and is_prose_sentence(sentence, min_words, max_words)
                        and full.count(sentence) == 1):
                    candidates.append((i, start, sentence))
        offset += len(text) + 2
    rng.shuffle(candidates)
    for i, start, sentence in candidates:
        block = texts[i]
        local = block.find(sentence)
        rest = " ".join((block[:local] + " " + block[local + len(sentence):]).split())
        new_texts = texts[:i] + ([rest] if rest else []) + texts[i + 1:]
        new_full = "\n\n".join(new_texts)
        if sentence not in new_full:
            return PickedQuery(sentence, start, len(full), new_full)
    return None


# --------------------------------------------------------------------------- the corpus

_EXCLUDE = re.compile(r"^(genindex.*|py-modindex|search|contents|whatsnew/changelog)\.html$")
_DOCS_SCHEMA = pa.schema([("id", pa.int64()), ("text", pa.string()), ("title", pa.string()),
                          ("source", pa.string()), ("section", pa.string()), ("path", pa.string()),
                          ("tokens", pa.int64())])
_QUERIES_SCHEMA = pa.schema([("query_id", pa.int64()), ("text", pa.string()),
                             ("doc_id", pa.int64()), ("position", pa.float64())])
_ALGO_VERSION = 1  # bump when the stripping or picking changes, so cached output is rewritten


@dataclass(frozen=True)
class _Page:
    source: str    # "python-doc" or "man-pages"
    path: str      # inside the package, e.g. library/json.html or man7/epoll.7
    section: str   # library, reference, howto, ... or man2, man7, ...
    title: str
    blocks: list[Block]


def _unpack(deb: Path, tmp: str) -> None:
    if shutil.which("dpkg") is None:
        raise DatasetError("dpkg is not available: cannot unpack " + deb.name)
    proc = subprocess.run(["dpkg", "-x", str(deb), tmp], capture_output=True, text=True)
    if proc.returncode != 0:
        raise DatasetError(f"dpkg -x {deb.name} failed: {proc.stderr.strip()}")


def _python_doc_pages(deb: Path) -> list[_Page]:
    """Every HTML page of the Python docs (minus indexes, search and the changelog), by path."""
    pages = []
    with tempfile.TemporaryDirectory(prefix="embedpipe-pydoc-") as tmp:
        _unpack(deb, tmp)
        root = Path(tmp) / _HTML_ROOT
        if not root.is_dir():
            raise DatasetError(f"{deb.name} has no {_HTML_ROOT}")
        for path in sorted(root.rglob("*.html")):
            rel = path.relative_to(root).as_posix()
            if rel.startswith("_") or _EXCLUDE.match(rel) or path.is_symlink():
                continue
            title, blocks = html_to_blocks(path.read_text(encoding="utf-8", errors="replace"))
            section = rel.split("/")[0] if "/" in rel else "top"
            pages.append(_Page("python-doc", rel, section, title or rel, blocks))
    return pages


def _man_pages(debs: Sequence[Path], min_source_words: int) -> list[_Page]:
    """The man pages of ``debs`` rendered with groff, skipping ``.so`` stubs, links and pages
    whose roff source has fewer than ``min_source_words`` words (they render shorter)."""
    import gzip

    if shutil.which("groff") is None:
        raise DatasetError("groff is not available (apt-get install groff-base): cannot render "
                           "the man pages")
    env = {**os.environ, "LC_ALL": "C.UTF-8", "GROFF_NO_SGR": "1"}
    pages = []
    with tempfile.TemporaryDirectory(prefix="embedpipe-man-") as tmp:
        for deb in debs:
            _unpack(deb, tmp)
        root = Path(tmp) / _MAN_ROOT
        for path in sorted(root.glob("man*/*.gz")):
            if path.is_symlink():
                continue
            src = gzip.decompress(path.read_bytes()).decode("utf-8", errors="replace")
            if src.lstrip().startswith(".so") or len(src.split()) < min_source_words:
                continue
            proc = subprocess.run(["groff", "-t", "-Tutf8", "-man", "-rLL=2000n", "-rHY=0",
                                   "-P-cbou"], input=src, capture_output=True, text=True,
                                  env=env, timeout=120)
            if proc.returncode != 0:
                log.warning("groff failed on %s; skipped", path.name)
                continue
            rel = path.relative_to(root).as_posix().removesuffix(".gz")
            title, blocks = man_to_blocks(proc.stdout)
            pages.append(_Page("man-pages", rel, rel.split("/")[0], title or rel, blocks))
    return pages


def _tokenizer(model: str):
    from transformers import AutoTokenizer

    from pipeline.encode.model_files import resolve_model

    tok = AutoTokenizer.from_pretrained(str(resolve_model(model).path))
    tok.model_max_length = 1 << 30  # count only; silences the "longer than maximum" warning
    return tok


def token_counts(texts: Sequence[str], model: str = "all-MiniLM-L6-v2") -> list[int]:
    """Tokens per text with the model's tokenizer, special tokens included, untruncated."""
    tok = _tokenizer(model)
    return [len(ids) for ids in tok(list(texts), add_special_tokens=True)["input_ids"]]


def _summary(values: Sequence[int | float]) -> dict:
    s = sorted(values)
    if not s:
        return {}
    q = statistics.quantiles(s, n=10) if len(s) > 1 else [s[0]] * 9
    return {"n": len(s), "min": s[0], "p10": q[0], "median": statistics.median(s), "p90": q[8],
            "max": s[-1], "mean": round(statistics.fmean(s), 1)}


def fetch_long_docs(dest: str | Path, queries_dest: str | Path, *, min_words: int = 1500,
                    max_words: int = 20_000, max_docs: int = 600, seed: int = 0,
                    sources: tuple[str, ...] = ("python-doc", "manpages"),
                    model: str = "all-MiniLM-L6-v2", shards: int = 2,
                    cache_dir: Path | None = None) -> dict:
    """Write the long-document corpus to ``dest`` and one query per document to ``queries_dest``.

    Sources: ``python-doc`` (the Python 3.11 HTML documentation, ~225 pages of 1,500+ words)
    and ``manpages`` (the Linux man pages of ``manpages`` and ``manpages-dev``, ~125 such
    pages). Pages of ``min_words``..``max_words`` words are kept (the changelog, the indexes
    and short pages are left out); above ``max_docs`` a seeded sample is kept.

    Documents (``shards`` Parquet shards in ``dest``): ``id`` (int64, 0.. in source then path
    order), ``text`` (plain text, blank-line separated paragraphs, the query sentence
    removed), ``title`` (the page's h1 / the man page's NAME line), ``source``
    (python-doc / man-pages), ``section`` (library, reference, howto, ... / man2, man7, ...),
    ``path`` (the page inside its package) and ``tokens`` (of the indexed text with
    ``model``'s tokenizer, special tokens included, untruncated). Queries (one shard in
    ``queries_dest``): ``query_id`` (= ``doc_id``), ``text`` (the removed sentence),
    ``doc_id``, ``position`` (where the sentence started, as a fraction of the original text).

    Returns corpus statistics, also written beside ``dest`` as ``<dest>.stats.json``. Idempotent: a
    rerun with the same parameters and packages returns the stored statistics.
    """
    dest, queries_dest = Path(dest), Path(queries_dest)
    debs = {name: fetch_pinned(arts, cache_dir) for name, arts in
            (("python-doc", PYDOC_DEBS), ("manpages", MANPAGES_DEBS),
             ("manpages-dev", MANPAGES_DEV_DEBS)) if name.startswith(sources)}
    shas = {name: sha256_of(path) for name, path in debs.items()}
    params = dict(name="long_docs", sha256=shas, min_words=min_words, max_words=max_words,
                  max_docs=max_docs, seed=seed, model=model, shards=shards, algo=_ALGO_VERSION)
    stats_path = dest.with_name(dest.name + ".stats.json")  # beside: readers glob the folder
    done = _up_to_date(stats_path, params)
    if done is not None:
        log.info("%s is up to date (%d documents)", dest, done["documents"])
        return done

    pages: list[_Page] = []
    if "python-doc" in debs:
        pages += _python_doc_pages(debs["python-doc"])
    man_debs = [debs[n] for n in ("manpages", "manpages-dev") if n in debs]
    if man_debs:
        pages += _man_pages(man_debs, int(0.7 * min_words))
    log.info("%d pages from %s", len(pages), ", ".join(d.name for d in debs.values()))

    long_pages = [p for p in pages
                  if min_words <= len(blocks_to_text(p.blocks).split()) <= max_words]
    if len(long_pages) > max_docs:
        keep = set(random.Random(f"sample:{seed}").sample(range(len(long_pages)), max_docs))
        long_pages = [p for i, p in enumerate(long_pages) if i in keep]

    # Sentences that occur in more than one kept page are never queries (the right answer
    # would be ambiguous): collect every prose sentence once per page.
    seen: dict[str, int] = {}
    for page in long_pages:
        for s in {s for b in page.blocks if b.kind == "prose" for s in split_sentences(b.text)}:
            seen[s] = seen.get(s, 0) + 1
    shared = {s for s, n in seen.items() if n > 1}

    docs: dict[str, list] = {k: [] for k in ("id", "text", "title", "source", "section", "path")}
    queries: dict[str, list] = {k: [] for k in ("query_id", "text", "doc_id", "position")}
    skipped = []
    for page in long_pages:
        picked = pick_query(page.blocks, random.Random(f"{seed}:{page.source}:{page.path}"),
                            avoid=shared)
        if picked is None:
            skipped.append(f"{page.source}:{page.path}")
            continue
        doc_id = len(docs["id"])
        docs["id"].append(doc_id)
        docs["text"].append(picked.text)
        docs["title"].append(page.title)
        docs["source"].append(page.source)
        docs["section"].append(page.section)
        docs["path"].append(page.path)
        queries["query_id"].append(doc_id)
        queries["text"].append(picked.sentence)
        queries["doc_id"].append(doc_id)
        queries["position"].append(round(picked.position, 4))
    if not docs["id"]:
        raise DatasetError(f"no page of {min_words}..{max_words} words has a query")
    tokens = token_counts(docs["text"], model)
    docs["tokens"] = tokens

    doc_paths = write_shards(pa.table(docs, schema=_DOCS_SCHEMA), dest,
                              min(shards, len(docs["id"])), dataset_tag(**params))
    q_paths = write_shards(pa.table(queries, schema=_QUERIES_SCHEMA), queries_dest, 1,
                            dataset_tag(part="queries", **params))

    sections: dict[str, int] = {}
    for src, sec in zip(docs["source"], docs["section"], strict=True):
        sections[f"{src}/{sec}"] = sections.get(f"{src}/{sec}", 0) + 1
    windows = [max(1, -(-(t - 2) // 254)) for t in tokens]  # 256-token windows, no overlap
    stats = {
        "debs": {name: deb.name for name, deb in debs.items()}, "sha256": shas,
        "pages": len(pages), "long_pages": len(long_pages),
        "documents": len(docs["id"]), "queries": len(queries["query_id"]),
        "skipped_without_query": skipped, "sections": dict(sorted(sections.items())),
        "words": _summary([len(t.split()) for t in docs["text"]]),
        "tokens": _summary(tokens),
        "over_256_tokens": sum(t > 256 for t in tokens),
        "windows_256_no_overlap": _summary(windows),
        "query_words": _summary([len(q.split()) for q in queries["text"]]),
        "query_position": _summary(queries["position"]),
        "documents_paths": [str(p) for p in doc_paths], "queries_paths": [str(p) for p in q_paths],
        "params": params,
    }
    with atomic_path(stats_path) as tmp:
        tmp.write_text(json.dumps(stats, indent=2) + "\n")
    return stats


def _up_to_date(stats_path: Path, params: dict) -> dict | None:
    """The stored statistics if they were made with ``params`` and every shard they list is
    still there with its tag; else None."""
    try:
        stats = json.loads(stats_path.read_text())
        if stats.get("params") != json.loads(json.dumps(params)):
            return None
        for path in stats["documents_paths"] + stats["queries_paths"]:
            meta = pq.read_metadata(path)
            if not (meta.metadata or {}).get(TAG_KEY):
                return None
        return stats
    except (OSError, ValueError, KeyError, TypeError, pa.ArrowInvalid):
        return None


# --------------------------------------------------------------------------- evaluation


def collapse_ids(ids: Iterable[object]) -> list[object]:
    """Distinct ids in first-seen (rank) order: several window hits of one document count once."""
    seen: set[object] = set()
    out = []
    for i in ids:
        if i not in seen:
            seen.add(i)
            out.append(i)
    return out


def recall_at(ranked: Mapping[object, Sequence[object]], truth: Mapping[object, object],
              k: int) -> float:
    """Share of queries in ``truth`` whose document is among the first ``k`` distinct ids of
    ``ranked[query]`` (ids in rank order; a query without hits is a miss)."""
    if not truth:
        return float("nan")
    hits = sum(truth[q] in collapse_ids(ranked.get(q, ()))[:k] for q in truth)
    return hits / len(truth)


def ranked_ids(hits: pa.Table, id_column: str | None = None) -> dict[object, list[object]]:
    """``query_id -> [document id, ...]`` in rank order from a search ``--out`` file.

    The document id is ``doc_id`` when the hits carry one (window rows resolved to their
    document), else ``id``.
    """
    col = id_column or ("doc_id" if "doc_id" in hits.column_names else "id")
    d = hits.select(["query_id", "rank", col]).to_pydict()
    rows = sorted(zip(d["query_id"], d["rank"], d[col], strict=True), key=lambda r: (r[0], r[1]))
    out: dict[object, list[object]] = {}
    for q, _, doc in rows:
        out.setdefault(q, []).append(doc)
    return out


@dataclass(frozen=True)
class Setting:
    name: str
    overrides: tuple[str, ...]


SETTINGS = {
    "truncate": Setting("truncate", ()),
    "chunk-pool": Setting("chunk-pool", ("encode.long_text=chunk", "output.chunks=pool")),
    "chunk-rows": Setting("chunk-rows", ("encode.long_text=chunk", "output.chunks=rows")),
}


def _job_toml(name: str, input_path: Path, output_path: Path, max_length: int) -> str:
    return "\n".join([
        f"# written by bench.long_docs eval ({name})",
        f'name = "long-docs-{name}"',
        "", "[input]", f"path = {json.dumps(str(input_path))}",
        'text_column = "text"', 'id_column = "id"',
        "", "[model]", 'name = "all-MiniLM-L6-v2"', f"max_length = {max_length}",
        "", "[encode]", 'pooling = "mean"', "normalize = true",
        "", "[output]", f"path = {json.dumps(str(output_path))}",
        "", "[index]", "enabled = true", 'type = "flat"', 'metric = "ip"', "",
    ])


def _manifest_counts(out: Path) -> dict:
    """Rows in/out, windows (if recorded) and truncated rows, from the manifest's units."""
    manifest = json.loads((out / "manifest.json").read_text())
    units = list(manifest.get("units", {}).values())
    total = {"rows_in": 0, "vectors_out": 0, "truncated": 0, "windows": None}
    windows = [u.get("windows") for u in units]
    for u in units:
        total["rows_in"] += u.get("rows_in") or 0
        total["vectors_out"] += u.get("vectors_out") or 0
        total["truncated"] += u.get("truncated") or 0
    if units and all(isinstance(w, int) for w in windows):
        total["windows"] = sum(windows)
    return total


def _run_summary(output: str) -> dict:
    """The JSON summary `embedpipe run --json` printed (its last top-level JSON object), or {}."""
    for m in re.finditer(r"(?m)^\{", output):
        try:
            value, _ = json.JSONDecoder().raw_decode(output[m.start():])
        except ValueError:
            continue
        if isinstance(value, dict) and "seconds" in value:
            return value
    return {}


def _run(cmd: Sequence[str], env: Mapping[str, str], log_path: Path,
         cwd: str | None = None) -> tuple[int, str, float]:
    t0 = time.perf_counter()
    proc = subprocess.run(list(cmd), capture_output=True, text=True, env=dict(env), cwd=cwd)
    seconds = time.perf_counter() - t0
    log_path.write_text(f"$ {shlex.join(cmd)}\n# exit {proc.returncode}, {seconds:.1f}s\n"
                        f"--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}")
    return proc.returncode, proc.stdout + proc.stderr, seconds


def evaluate(docs: str | Path, queries: str | Path, work: str | Path, *,
             settings: Sequence[str] = tuple(SETTINGS), limit: int | None = None,
             k: int = 10, search_k: int | None = None, max_length: int = 256,
             python: str = sys.executable, pythonpath: str | None = None,
             extra_sets: Sequence[str] = ()) -> dict:
    """Embed ``docs`` with the real CLI once per setting, search ``queries`` and score them.

    ``limit`` documents spread evenly over the ids (all when None) and their queries are copied to
    ``work``; for each setting a job file is written to ``work/jobs/``, run with
    ``python -m pipeline.cli run JOB --mode overwrite`` (plus the setting's ``--set``
    overrides) and searched with ``search OUT --queries ... -k search_k``. recall@1 and
    recall@k count a query as found when its ``doc_id`` is among the first 1 / k distinct
    document ids in rank order. Returns the results, also written to
    ``work/results.json``; ``work/results.md`` holds the table.
    """
    work = Path(work).resolve()  # job files hold absolute paths
    (work / "jobs").mkdir(parents=True, exist_ok=True)
    (work / "logs").mkdir(parents=True, exist_ok=True)
    doc_table = pq.read_table(docs).sort_by("id")
    if limit is not None and limit < doc_table.num_rows:  # evenly spread over both sources
        spread = np.unique(np.linspace(0, doc_table.num_rows - 1, limit).round().astype(np.int64))
        doc_table = doc_table.take(pa.array(spread))
    if "tokens" not in doc_table.column_names:
        doc_table = doc_table.append_column(
            "tokens", pa.array(token_counts(doc_table.column("text").to_pylist()), pa.int64()))
    if "title" not in doc_table.column_names:
        doc_table = doc_table.append_column("title", pa.nulls(doc_table.num_rows, pa.string()))
    ids = set(doc_table.column("id").to_pylist())
    q_table = pq.read_table(queries, columns=["query_id", "text", "doc_id"])
    q_table = q_table.filter(pc.is_in(q_table.column("doc_id"),
                                              value_set=pa.array(sorted(ids), pa.int64())))
    input_dir = work / "input"
    input_dir.mkdir(exist_ok=True)
    for stale in input_dir.glob("*.parquet"):
        stale.unlink()
    pq.write_table(doc_table.select(["id", "text", "title"]), input_dir / "docs.parquet")
    q_path = work / "queries.parquet"
    pq.write_table(q_table, q_path)
    truth = dict(zip(q_table.column("query_id").to_pylist(),
                     q_table.column("doc_id").to_pylist(), strict=True))
    tokens = doc_table.column("tokens").to_pylist()
    n_docs = doc_table.num_rows

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    # The CLI runs in ``root`` (``-m`` puts the working folder first on sys.path), so the
    # pipeline it imports is that checkout's, whatever the venv's editable install points at.
    root = str(Path(pythonpath).resolve()) if pythonpath else str(REPO_ROOT)
    env["PYTHONPATH"] = os.pathsep.join([root, env["PYTHONPATH"]]) if env.get("PYTHONPATH") else root
    cli = [python, "-m", "pipeline.cli"]
    search_k = search_k or k

    results: dict = {
        "documents": n_docs, "queries": len(truth), "k": k, "search_k": search_k,
        "max_length": max_length,
        "tokens_per_document": _summary(tokens),
        "documents_over_max_length": sum(t > max_length for t in tokens),
        "settings": {},
    }
    for name in settings:
        setting = SETTINGS[name]
        out = work / "out" / name
        job = work / "jobs" / f"{name}.toml"
        job.write_text(_job_toml(name, input_dir, out, max_length))
        sets = [a for s in (*setting.overrides, *extra_sets) for a in ("--set", s)]
        cmd = [*cli, "run", str(job), "--mode", "overwrite", "--no-progress", "--json", *sets]
        rc, output, seconds = _run(cmd, env, work / "logs" / f"{name}-run.log", root)
        entry: dict = {"overrides": list(setting.overrides), "job": str(job),
                       "command": shlex.join(cmd)}
        results["settings"][name] = entry
        if rc != 0:
            entry["status"] = "failed"
            entry["message"] = f"embedpipe run exited {rc}: " + " | ".join(
                output.strip().splitlines()[-3:])
            log.warning("%s: %s", name, entry["message"])
            continue
        counts = _manifest_counts(out)
        summary = _run_summary(output)
        stage = summary.get("seconds") or {}
        hits_path = work / f"hits-{name}.parquet"
        cmd = [*cli, "search", str(out), "--queries", str(q_path), "--out", str(hits_path),
               "-k", str(search_k), "--text-column", "text", "--id-column", "query_id"]
        rc, output, search_seconds = _run(cmd, env, work / "logs" / f"{name}-search.log",
                                          root)
        if rc != 0:
            entry["status"] = "failed"
            entry["message"] = f"embedpipe search exited {rc}: " + " | ".join(
                output.strip().splitlines()[-3:])
            log.warning("%s: %s", name, entry["message"])
            continue
        hits = pq.read_table(hits_path)
        ranked = ranked_ids(hits)
        if name == "truncate":  # the manifest records windows only for chunked texts (0 here)
            windows, windows_from = counts["vectors_out"], "one per document"
        elif counts["windows"]:
            windows, windows_from = counts["windows"], "manifest"
        elif name == "chunk-rows":
            windows, windows_from = counts["vectors_out"], "vector rows"
        else:
            windows, windows_from = None, "not recorded"
        short = sum(len(collapse_ids(ranked.get(q, ()))) < k for q in truth)
        entry.update({
            "status": "ok",
            "recall@1": recall_at(ranked, truth, 1),
            f"recall@{k}": recall_at(ranked, truth, k),
            "queries_with_fewer_than_k_documents": short,
            "rows_in": counts["rows_in"], "vectors_out": counts["vectors_out"],
            "truncated": counts["truncated"],
            "windows": windows, "windows_from": windows_from,
            "windows_per_document": None if windows is None else windows / max(n_docs, 1),
            "run_seconds": round(seconds, 2),
            "seconds_per_document": seconds / max(n_docs, 1),
            "job_seconds": stage.get("total"),
            "encode_seconds": stage.get("encode"),
            "encode_seconds_per_document": (None if stage.get("encode") is None
                                            else stage["encode"] / max(n_docs, 1)),
            "real_tokens": summary.get("real_tokens"),
            "padded_tokens": summary.get("padded_tokens"),
            "tokens_per_document": (None if summary.get("real_tokens") is None
                                    else summary["real_tokens"] / max(n_docs, 1)),
            "search_seconds": round(search_seconds, 2),
        })
    base = results["settings"].get("truncate", {})
    for entry in results["settings"].values():
        if entry.get("status") == "ok" and base.get("status") == "ok":
            entry["seconds_ratio_to_truncate"] = (entry["seconds_per_document"]
                                                  / base["seconds_per_document"])
            entry["encode_ratio_to_truncate"] = (
                entry["encode_seconds_per_document"] / base["encode_seconds_per_document"]
                if entry["encode_seconds_per_document"] is not None
                and base["encode_seconds_per_document"] else None)
    table = markdown_table(results)
    (work / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (work / "results.md").write_text(table + "\n")
    results["table"] = table
    return results


def _fmt(v: object, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def markdown_table(results: Mapping) -> str:
    """The results of :func:`evaluate` as a Markdown table, one row per setting."""
    k = results["k"]
    t = results["tokens_per_document"]
    lines = [
        f"{results['documents']} documents ({results['documents_over_max_length']} over "
        f"{results['max_length']} tokens; tokens per document min {t['min']}, median "
        f"{t['median']:.0f}, max {t['max']}), {results['queries']} queries, k={k}",
        "",
        f"| setting | recall@1 | recall@{k} | windows/doc | tokens/doc | s/doc (run) "
        "| x truncate | encode s/doc | x truncate | status |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for name, e in results["settings"].items():
        if e.get("status") != "ok":
            lines.append(f"| {name} | - | - | - | - | - | - | - | - | {e.get('status')}: "
                         f"{e.get('message', '')} |")
            continue
        lines.append(
            f"| {name} | {e['recall@1']:.3f} | {e[f'recall@{k}']:.3f} "
            f"| {_fmt(e['windows_per_document'], '.2f')} | {_fmt(e.get('tokens_per_document'), '.0f')} "
            f"| {e['seconds_per_document']:.3f} "
            f"| {_fmt(e.get('seconds_ratio_to_truncate'), '.2f')} "
            f"| {_fmt(e['encode_seconds_per_document'], '.3f')} "
            f"| {_fmt(e.get('encode_ratio_to_truncate'), '.2f')} | ok |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- command line


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.long_docs",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    f = sub.add_parser("fetch", help="build the long-document corpus and its queries")
    f.add_argument("dest", help="folder for the document shards (e.g. data/long_docs)")
    f.add_argument("queries", help="folder for the query shard (e.g. data/long_docs_queries)")
    f.add_argument("--min-words", type=int, default=1500)
    f.add_argument("--max-words", type=int, default=20_000)
    f.add_argument("--max-docs", type=int, default=600)
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--sources", default="python-doc,manpages",
                   help="comma-separated: python-doc, manpages (default: both)")

    e = sub.add_parser("eval", help="run truncate / chunk+pool / chunk+rows and score recall")
    e.add_argument("docs", help="document shards written by `fetch`")
    e.add_argument("queries", help="query shards written by `fetch`")
    e.add_argument("--work", default="out/long-docs-eval",
                   help="folder for the sample, job files, outputs, hits and results")
    e.add_argument("--settings", default=",".join(SETTINGS),
                   help=f"comma-separated subset of {', '.join(SETTINGS)}")
    e.add_argument("--limit", type=int, default=None, help="only the first N documents")
    e.add_argument("-k", type=int, default=10)
    e.add_argument("--search-k", type=int, default=None,
                   help="neighbours asked of `embedpipe search` (default: k)")
    e.add_argument("--max-length", type=int, default=256)
    e.add_argument("--python", default=sys.executable,
                   help="interpreter that runs `-m pipeline.cli` (default: this one)")
    e.add_argument("--pythonpath", default=None, metavar="DIR",
                   help="checkout whose pipeline/ the CLI runs (default: this one)")
    e.add_argument("--set", dest="extra_sets", action="append", default=[],
                   metavar="SECTION.KEY=VALUE", help="extra --set for every run")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "fetch":
            stats = fetch_long_docs(args.dest, args.queries, min_words=args.min_words,
                                    max_words=args.max_words, max_docs=args.max_docs,
                                    seed=args.seed, sources=tuple(args.sources.split(",")))
            brief = {k: stats[k] for k in ("documents", "queries", "sections", "words", "tokens",
                                           "over_256_tokens", "windows_256_no_overlap",
                                           "query_position")}
            print(json.dumps(brief, indent=2))
            return 0
        unknown = set(args.settings.split(",")) - set(SETTINGS)
        if unknown:
            parser.error(f"unknown setting(s) {', '.join(sorted(unknown))}")
        results = evaluate(args.docs, args.queries, args.work,
                           settings=args.settings.split(","), limit=args.limit, k=args.k,
                           search_k=args.search_k, max_length=args.max_length,
                           python=args.python, pythonpath=args.pythonpath,
                           extra_sets=args.extra_sets)
    except FetchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(results["table"])
    print(f"\nwritten: {Path(args.work) / 'results.json'}, {Path(args.work) / 'results.md'}")
    statuses = [e.get("status") for e in results["settings"].values()]
    if "failed" in statuses:
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
