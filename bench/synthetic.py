"""Synthetic rows for memory-flatness runs at ~1M rows (`bench/rss_flatness.py`): spans of real
English words from the bench corpus, their lengths drawn from its own length distribution."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.tools.datasets import (TAG_KEY, VADER, WIKI, atomic_path, bench_table, dataset_tag,
                                     prepare_dest, shard_paths, shards_complete)

log = logging.getLogger(__name__)

SCHEMA = pa.schema([("id", pa.int64()), ("text", pa.string())])


def generate_rows(dest: str | Path, n_rows: int, rows_per_file: int = 100_000, seed: int = 0,
                  cache_dir: Path | None = None, batch_rows: int = 10_000) -> list[Path]:
    """Stream ``n_rows`` synthetic rows (``id`` int64, ``text``) to Parquet files in ``dest``.

    Meant for memory-flatness tests at ~1M rows. Each text is a span of real words
    from the bench corpus, its length drawn from the bench corpus' own length
    distribution. Rows are produced and written ``batch_rows`` at a time (one row
    group each), so memory stays bounded by a batch plus the ~300k-word pool.
    """
    if n_rows < 1 or rows_per_file < 1 or batch_rows < 1:
        raise ValueError("n_rows, rows_per_file and batch_rows must be positive")
    dest = Path(dest)
    counts = [min(rows_per_file, n_rows - start) for start in range(0, n_rows, rows_per_file)]
    paths = shard_paths(dest, len(counts))
    tag = dataset_tag(name="synthetic", n_rows=n_rows, rows_per_file=rows_per_file, seed=seed,
               sha256=[VADER.sha256, WIKI.sha256])
    if shards_complete(paths, counts, tag):
        log.info("%s is up to date (%d rows)", dest, n_rows)
        return paths

    corpus = bench_table(4000, 0, cache_dir).column("text").to_pylist()
    words = np.array(" ".join(corpus).split(), dtype=object)
    lengths = np.array([len(t.split()) for t in corpus])
    del corpus
    rng = np.random.default_rng(seed)
    schema = SCHEMA.with_metadata({TAG_KEY: tag.encode()})

    prepare_dest(dest, paths)
    next_id = 0
    for path, count in zip(paths, counts, strict=True):
        with atomic_path(path) as tmp, pq.ParquetWriter(tmp, schema) as writer:
            for done in range(0, count, batch_rows):
                m = min(batch_rows, count - done)
                spans = rng.choice(lengths, m)
                starts = rng.integers(0, len(words) - spans + 1)
                batch = {"id": np.arange(next_id, next_id + m, dtype=np.int64),
                         "text": [" ".join(words[s:s + n]) for s, n in zip(starts, spans, strict=True)]}
                writer.write_table(pa.table(batch, schema=schema))
                next_id += m
    log.info("wrote %d synthetic rows to %d files in %s", n_rows, len(paths), dest)
    return paths
