"""The multi-vector LanceDB sink's load and search next to embedpipe's exact MaxSim, as
docs/multivector.md reports it.

    .venv/bin/python -m bench.multivector_sink --rows 10000 [--tokens 32] [--dim 128]

Rows of random unit token vectors go through LanceMultiSink's load (the call a sync makes,
Arrow blocks of 8,192 rows) into an empty table; a 32-token query is then searched through the
sink (LanceDB's flat multi-vector search) and by index/maxsim.py's exact MaxSim over the same
tokens in memory (best of 3 each), and the two top-10s compared.
"""
from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np
import pyarrow as pa

from pipeline.config import SinkConfig
from pipeline.index.maxsim import maxsim_scores, top_rows
from pipeline.io.multivectors import multivector_array
from pipeline.sinks.base import LOAD_ROWS, Marker
from pipeline.sinks.make import make_sink
from pipeline.sinks.multivector import MULTIVECTOR


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=10000)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--dim", type=int, default=128)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    tokens = rng.normal(size=(args.rows * args.tokens, args.dim)).astype(np.float32)
    tokens /= np.linalg.norm(tokens, axis=1, keepdims=True)
    offsets = np.arange(args.rows + 1, dtype=np.int64) * args.tokens
    rows = np.split(tokens, offsets[1:-1])
    blocks = [pa.table({"id": pa.array(np.arange(a, min(a + LOAD_ROWS, args.rows)), pa.int64()),
                        "vector": multivector_array(rows[a:a + LOAD_ROWS], args.dim)})
              for a in range(0, args.rows, LOAD_ROWS)]
    sink = make_sink(SinkConfig(kind="lancedb", table="bench", name="bench",
                                uri=tempfile.mkdtemp()), precision=MULTIVECTOR)
    sink.open()
    tick = time.perf_counter()
    sink.load(blocks[0].schema, iter(blocks), None, Marker("bench", args.dim, "int64",
                                                          MULTIVECTOR))
    load = time.perf_counter() - tick
    query = rng.normal(size=(32, args.dim)).astype(np.float32)
    query /= np.linalg.norm(query, axis=1, keepdims=True)
    lance, exact = [], []
    for _ in range(3):
        tick = time.perf_counter()
        hits = sink.search([query], 10, [])[0]
        lance.append(time.perf_counter() - tick)
        tick = time.perf_counter()
        top = top_rows(maxsim_scores(query, tokens, offsets), 10)
        exact.append(time.perf_counter() - tick)
    print(f"{args.rows:,} rows x {args.tokens} tokens x {args.dim} dims: load {load:.2f} s "
          f"({args.rows / load:,.0f} rows/s); a 32-token query: LanceDB {min(lance):.3f} s, "
          f"embedpipe's exact MaxSim {min(exact):.3f} s; the same top-10: "
          f"{hits.column('id').to_pylist() == top.tolist()}")


if __name__ == "__main__":
    main()
