"""The nightly corpus: real English sentences from four pinned sources, texts of two or three of
them, the base corpus and each night's changes, written as Parquet layouts."""

from __future__ import annotations

import io
import os
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.tools.artifacts import Unavailable, fetch_pinned, pinned_deb
from pipeline.tools.datasets import DatasetError, movie_rows, wiki_extracts

# Debian's wordnet-base 3.0-37 (apt-get download wordnet-base): the glosses of data.{noun,...}
WORDNET = pinned_deb("wordnet-base", "1:3.0-37",
                     "61060d960f9ada8fa120872312eccd3ecebfbab8c4579e4f5a74e1cf67620752")
DUPLICATE_SHARE = 0.005
CHANGED_SHARE, ADDED_SHARE, REMOVED_SHARE = 0.01, 0.005, 0.005


def _deb_member(deb: Path, suffix: str) -> bytes:
    """The bytes of the data.tar.* member of a .deb (an `ar` archive)."""
    data = deb.read_bytes()
    if not data.startswith(b"!<arch>\n"):
        raise DatasetError(f"{deb} is not a Debian package")
    pos = 8
    while pos + 60 <= len(data):
        name = data[pos:pos + 16].decode().strip().rstrip("/")
        size = int(data[pos + 48:pos + 58].decode().strip())
        body = data[pos + 60:pos + 60 + size]
        if name.startswith(suffix):
            return body
        pos += 60 + size + (size % 2)
    raise DatasetError(f"{deb} has no {suffix}* member")


def fetch_wordnet(cache_dir: Path | None = None) -> Path | None:
    """The cached, sha256-verified wordnet-base .deb, or None where apt-get cannot fetch it (the
    corpus is then made without WordNet glosses). Other bytes than the pinned ones still fail."""
    try:
        return fetch_pinned(WORDNET, cache_dir)
    except Unavailable:
        return None


def wordnet_glosses(deb: Path) -> list[str]:
    """The definition part of every WordNet 3.0 gloss (examples in quotes dropped)."""
    data = _deb_member(deb, "data.tar")
    out = []
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        for member in sorted(tar.getmembers(), key=lambda m: m.name):
            if not re.search(r"/wordnet/data\.(noun|verb|adj|adv)$", member.name):
                continue
            for line in tar.extractfile(member).read().decode("latin-1").splitlines():
                if line.startswith(" ") or "|" not in line:
                    continue  # the licence header
                gloss = line.split("|", 1)[1].split('; "')[0].strip().rstrip(";").strip()
                if len(gloss.split()) >= 3:
                    out.append(gloss[0].upper() + gloss[1:] + ".")
    return out


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'(])")


def sentence_pool(cache_dir: Path | None = None) -> tuple[list[str], dict[str, int]]:
    """Unique real English sentences, sorted (deterministic), and how many each source gave."""
    from bench.tagging_data import brown_sentences, fetch_brown, plain_word

    sources: dict[str, list[str]] = {}
    brown = [" ".join(plain_word(w) for w, _ in pairs)
             for _, pairs in brown_sentences(fetch_brown(cache_dir))]
    sources["brown"] = [s for s in brown if 4 <= len(s.split()) <= 40]
    sources["movie_reviews"] = movie_rows(cache_dir)[1]
    sources["wikipedia"] = [s for _, extract in wiki_extracts(cache_dir)
                            for s in _SENTENCE_END.split(extract.replace("\n", " "))
                            if 4 <= len(s.split()) <= 40]
    deb = fetch_wordnet(cache_dir)
    sources["wordnet"] = wordnet_glosses(deb) if deb else []
    counts = {k: len(set(v)) for k, v in sources.items()}
    pool = sorted({s.strip() for v in sources.values() for s in v if s.strip()})
    return pool, counts


# --------------------------------------------------------------------------- corpus


class TextMaker:
    """Distinct texts of two or three sentences from the pool, drawn with a seeded RNG."""

    def __init__(self, pool: list[str], seed: int, unique: bool = True):
        self.pool = pool
        self.rng = np.random.default_rng(seed)
        self.unique = unique
        self.seen: set[str] = set()

    def make(self, n: int) -> list[str]:
        out: list[str] = []
        while len(out) < n:
            m = n - len(out)
            k = self.rng.choice([2, 3], m)
            picks = self.rng.integers(0, len(self.pool), (m, 3))
            for row, kk in zip(picks, k):
                text = " ".join(self.pool[i] for i in row[:kk])
                if self.unique:
                    if text in self.seen:
                        continue
                    self.seen.add(text)
                out.append(text)
        return out


@dataclass
class Corpus:
    """The input as one table in row order (ids int64, texts), written in a file layout."""
    ids: np.ndarray
    texts: list[str]

    @property
    def rows(self) -> int:
        return len(self.ids)

    def table(self) -> pa.Table:
        return pa.table({"id": pa.array(self.ids, pa.int64()),
                         "text": pa.array(self.texts, pa.string())})


def base_corpus(maker: TextMaker, rows: int, duplicate_share: float = DUPLICATE_SHARE) -> Corpus:
    """rows distinct texts, then a duplicate_share of them replaced by copies of other rows'
    texts (exact duplicates, under other ids)."""
    texts = maker.make(rows)
    n_dup = int(round(rows * duplicate_share))
    if n_dup:
        where = maker.rng.choice(rows, 2 * n_dup, replace=False)
        for dst, src in zip(where[:n_dup], where[n_dup:]):
            texts[dst] = texts[src]
    return Corpus(np.arange(rows, dtype=np.int64), texts)


def write_layout(corpus: Corpus, dest: Path, files: int, name: str = "part-{i:05d}.parquet",
                 only: set[int] | None = None) -> list[Path]:
    """The corpus as `files` contiguous Parquet files named by `name` under dest (subfolders
    allowed). only: rewrite just these file numbers (the others are left as they are)."""
    table = corpus.table()
    bounds = [i * corpus.rows // files for i in range(files + 1)]
    paths = []
    for i in range(files):
        path = dest / name.format(i=i, n=files)
        paths.append(path)
        if only is not None and i not in only:
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        pq.write_table(table.slice(bounds[i], bounds[i + 1] - bounds[i]), tmp)
        os.replace(tmp, path)
    return paths


def change_rows(corpus: Corpus, maker: TextMaker, share: float) -> np.ndarray:
    """Give share of the rows a new text, in place; returns their positions (sorted)."""
    n = int(round(corpus.rows * share))
    where = np.sort(maker.rng.choice(corpus.rows, n, replace=False))
    for pos, text in zip(where, maker.make(n)):
        corpus.texts[pos] = text
    return where


def night_b_corpus(corpus: Corpus, maker: TextMaker) -> tuple[Corpus, dict[str, int]]:
    """Remove, change and add rows (shares of the rows before the night); new ids above all."""
    n = corpus.rows
    n_removed, n_added = int(round(n * REMOVED_SHARE)), int(round(n * ADDED_SHARE))
    keep = np.sort(np.setdiff1d(np.arange(n), maker.rng.choice(n, n_removed, replace=False)))
    kept = Corpus(corpus.ids[keep], [corpus.texts[i] for i in keep])
    changed = change_rows(kept, maker, CHANGED_SHARE * n / kept.rows)
    top = int(corpus.ids.max()) + 1
    new_ids = np.arange(top, top + n_added, dtype=np.int64)
    slots = np.sort(maker.rng.integers(0, kept.rows + 1, n_added))
    ids = np.insert(kept.ids, slots, new_ids)
    texts = list(kept.texts)
    for offset, (slot, text) in enumerate(zip(slots, maker.make(n_added))):
        texts.insert(int(slot) + offset, text)
    return Corpus(ids, texts), {"changed": len(changed), "added": n_added, "removed": n_removed}
