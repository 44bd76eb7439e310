"""The long-document corpus: the pinned .debs (Python docs, man pages) fetched, unpacked and read,
one query picked per document, written as Parquet shards."""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import statistics
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.tools.artifacts import fetch_pinned, pinned_deb, sha256_of
from pipeline.tools.datasets import TAG_KEY, DatasetError, atomic_path, dataset_tag, write_shards

from .pages import Block, blocks_to_text, html_to_blocks, man_to_blocks
from .queries import pick_query, split_sentences

log = logging.getLogger(__name__)


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

    from pipeline.models.model_files import resolve_model

    tok = AutoTokenizer.from_pretrained(str(resolve_model(model).path))
    tok.model_max_length = 1 << 30  # count only; silences the "longer than maximum" warning
    return tok


def token_counts(texts: Sequence[str], model: str = "all-MiniLM-L6-v2") -> list[int]:
    """Tokens per text with the model's tokenizer, special tokens included, untruncated."""
    tok = _tokenizer(model)
    return [len(ids) for ids in tok(list(texts), add_special_tokens=True)["input_ids"]]


def quantile_summary(values: Sequence[int | float]) -> dict:
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
        "words": quantile_summary([len(t.split()) for t in docs["text"]]),
        "tokens": quantile_summary(tokens),
        "over_256_tokens": sum(t > 256 for t in tokens),
        "windows_256_no_overlap": quantile_summary(windows),
        "query_words": quantile_summary([len(q.split()) for q in queries["text"]]),
        "query_position": quantile_summary(queries["position"]),
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
