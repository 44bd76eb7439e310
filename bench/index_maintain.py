"""Time `update_index` for 1% of the parts added and 1% removed against a full `build_index`,
on random vectors in parts of 1,000 rows (one unit a part), for flat and IVF-Flat.

    python -m bench.index_maintain [--n 200000] [--dim 384]
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.config import IndexConfig
from pipeline.index.build import build_index
from pipeline.index.maintain import update_index
from pipeline.io.checks import check_file
from pipeline.io.content_hash import HASH_BYTES, HASH_TYPE
from pipeline.io.storage import Store
from pipeline.io.vectors import VectorParts
from pipeline.io.writer import vector_array, vectors_schema

PART = 1_000


def write_part(store: Store, unit: int, rng: np.random.Generator, dim: int) -> str:
    name = f"vectors/part-{unit:05d}-0000.parquet"
    vectors = rng.standard_normal((PART, dim), dtype=np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    ids = np.arange(PART) + unit * PART
    hashes = [int(i).to_bytes(HASH_BYTES, "little") for i in ids]  # distinct, like real text hashes
    table = pa.table([pa.array(ids), vector_array(vectors, "float32"),
                      pa.array(np.ones(PART, np.int32)), pa.array(np.zeros(PART, bool)),
                      pa.array(hashes, HASH_TYPE), pa.array((unit << 32) + np.arange(PART))],
                     schema=vectors_schema(pa.int64(), dim, "float32"))
    with store.open_atomic(name) as handle:
        pq.write_table(table, handle)
    return name


def parts_of(store: Store, units: dict[int, str]) -> VectorParts:
    ids = sorted(units)
    checks = [check_file(store, units[u]) for u in ids]
    return VectorParts(store, [units[u] for u in ids], tuple(c.rows for c in checks),
                       tuple(u << 32 for u in ids), tuple(c.footer for c in checks))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=200_000)
    parser.add_argument("--dim", type=int, default=384)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    root = Path(tempfile.mkdtemp(prefix="maintain-bench-"))
    try:
        store = Store(str(root))
        count = args.n // PART
        units = {u: write_part(store, u, rng, args.dim) for u in range(count)}
        for kind, cfg in (("flat", IndexConfig(type="flat")),
                          ("ivf-flat", IndexConfig(type="ivf-flat", nprobe=16))):
            tick = time.perf_counter()
            build_index(store, parts_of(store, units), cfg)
            built = time.perf_counter() - tick
            step = max(1, count // 100)  # 1% of the parts
            for u in list(units)[:step]:
                store.remove(units.pop(u))
            for u in range(max(units) + 1, max(units) + 1 + step):
                units[u] = write_part(store, u, rng, args.dim)
            tick = time.perf_counter()
            infos = update_index(store, parts_of(store, units), cfg)
            updated = time.perf_counter() - tick
            assert "rebuilt" not in infos, infos["rebuilt"]
            print(f"{kind}: {args.n:,} x {args.dim}: build_index {built:.2f} s, update_index "
                  f"(+{infos['maintained']['added']:,} / -{infos['maintained']['removed']:,}) "
                  f"{updated:.2f} s")
    finally:
        shutil.rmtree(root)


if __name__ == "__main__":
    main()
