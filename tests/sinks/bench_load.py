"""Load throughput of the sinks, as docs/sinks.md reports it.

    python tests/sinks/bench_load.py --rows 100000 --dim 384 [--precision binary]

Rows of id, a random unit vector, n_tokens and truncated go through each sink's load (the same
call a sync makes, Arrow blocks of 8,192 rows): into an empty table, again unchanged (upsert
finds nothing to rewrite), again with every vector changed, then 10% of the ids deleted. The
PostgreSQL server is a throwaway one (tests/sinks/pg_server.py) unless EMBEDPIPE_PG_DSN is set.
With --precision binary / ubinary / float16 the vectors are stored as a folder of that precision
stores them, and each sink takes its column for it (bit(dim) / packed uint8 / halfvec).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from pipeline.config import SinkConfig  # noqa: E402
from pipeline.sinks.base import LOAD_ROWS, Marker  # noqa: E402
from pipeline.io.precision import Precision  # noqa: E402
from pipeline.sinks.make import make_sink  # noqa: E402

PRECISION = Precision("float32")


def blocks(rows: int, dim: int, seed: int) -> list[pa.Table]:
    """Made before the clock starts: the figures are the load's alone."""
    return list(_blocks(rows, dim, seed))


def _blocks(rows: int, dim: int, seed: int):
    rng = np.random.default_rng(seed)
    for start in range(0, rows, LOAD_ROWS):
        n = min(LOAD_ROWS, rows - start)
        v = rng.standard_normal((n, dim)).astype(np.float32)
        v /= np.linalg.norm(v, axis=1, keepdims=True)
        stored = PRECISION.store(v)
        yield pa.table({"id": pa.array(np.arange(start, start + n), pa.int64()),
                        "vector": pa.FixedSizeListArray.from_arrays(pa.array(stored.ravel()),
                                                                    stored.shape[1]),
                        "n_tokens": pa.array(rng.integers(5, 200, n), pa.int32()),
                        "truncated": pa.array(np.zeros(n, bool))})


def measure(sink, rows: int, dim: int) -> list[tuple[str, float]]:
    marker = Marker("bench", dim, "int64", sink.vector_type)
    schema = blocks(1, dim, 0)[0].schema
    out = []
    for label, seed, keep in (("insert into an empty table", 0, None),
                              ("upsert, nothing changed", 0, None),
                              ("upsert, every vector changed", 1, None)):
        data = blocks(rows, dim, seed)
        tick = time.perf_counter()
        upserted, _ = sink.load(schema, iter(data), keep, marker)
        out.append((label, upserted / (time.perf_counter() - tick)))
    keep = pa.table({"id": pa.array(np.arange(rows // 10, rows), pa.int64())})
    tick = time.perf_counter()
    _, deleted = sink.load(schema, iter(()), keep, marker)
    out.append((f"delete {deleted:,} ids absent from the folder", deleted / (time.perf_counter() - tick)))
    assert sink.count() == rows - rows // 10
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--precision", default="float32",
                        choices=("float32", "float16", "binary", "ubinary"))
    args = parser.parse_args()
    global PRECISION
    PRECISION = Precision(args.precision)
    server = None
    if not os.environ.get("EMBEDPIPE_PG_DSN"):
        from pg_server import PostgresServer
        server = PostgresServer()
        os.environ["EMBEDPIPE_PG_DSN"] = server.dsn
    try:
        with tempfile.TemporaryDirectory() as tmp:
            table = f"bench_{os.getpid()}"
            configs = [SinkConfig(kind="lancedb", table=table, name="lancedb", uri=f"{tmp}/db"),
                       SinkConfig(kind="pgvector", table=table, name="pgvector"),
                       SinkConfig(kind="pgvector", table=table + "_h", name="pgvector-halfvec",
                                  vector_type="halfvec")][:3 if args.precision == "float32" else 2]
            for cfg in configs:
                sink = make_sink(cfg, precision=args.precision)
                sink.open()
                for label, rate in measure(sink, args.rows, args.dim):
                    print(f"{cfg.name:17s} {args.rows:,} x {args.dim}  {label:40s} "
                          f"{rate:10,.0f} rows/s", flush=True)
                if cfg.kind == "pgvector":
                    sink._execute(f"DROP TABLE {cfg.table}")
                sink.close()
    finally:
        if server is not None:
            server.stop()


if __name__ == "__main__":
    main()
