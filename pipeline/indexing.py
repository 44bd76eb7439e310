"""Build a FAISS index over the stored vectors, streamed part by part, with its id map and infos.

Index choice (a factory string from the config, or `auto` from the count and a memory budget) is
kept apart from building; IVF kinds train on an even sample, then add part by part, so the whole
vector set is never in memory at once.
"""
from __future__ import annotations

import json
import logging
import math
import re
import time
from dataclasses import dataclass
from typing import Iterator

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .config import IndexConfig
from .storage import Store

log = logging.getLogger(__name__)

INDEX_DIR = "index"
INDEX_FILE = f"{INDEX_DIR}/index.faiss"
IDS_FILE = f"{INDEX_DIR}/ids.parquet"
INFOS_FILE = f"{INDEX_DIR}/index_infos.json"
METRICS = {"ip": faiss.METRIC_INNER_PRODUCT, "l2": faiss.METRIC_L2}
TRAIN_PER_CENTROID = 39  # FAISS warns below 39 training points per centroid


def parse_memory(text: str) -> int:
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)i?B?\s*", text.upper())
    if not match:
        raise ValueError(f"index.max_memory: {text!r} is not a size like 512MB or 4GB")
    return int(float(match[1]) * 1024 ** " KMGT".index(match[2] or " "))


def default_nlist(n: int) -> int:
    """About 4 sqrt(n) lists, but never more than the data can train (39 points per list)."""
    return max(1, min(int(4 * math.sqrt(n)), n // TRAIN_PER_CENTROID))


def default_pq_m(dim: int) -> int:
    """Sub-quantizers of 4 dimensions each (8-bit codes): dim/4 bytes per vector."""
    for m in range(max(1, dim // 4), 0, -1):
        if dim % m == 0:
            return m
    return 1


def factory_string(cfg: IndexConfig, n: int, dim: int) -> str:
    kind = cfg.type
    if kind == "auto":
        budget = parse_memory(cfg.max_memory)
        flat_bytes = n * dim * 4
        hnsw_bytes = n * (dim * 4 + cfg.hnsw_m * 2 * 4)
        kind = ("flat" if n <= 200_000 and flat_bytes <= budget else
                "hnsw" if hnsw_bytes <= budget else "ivf-pq")
    if kind == "flat":
        return "Flat"
    if kind == "hnsw":
        return f"HNSW{cfg.hnsw_m},Flat"
    nlist = cfg.nlist or default_nlist(n)
    if kind == "ivf-flat":
        return f"IVF{nlist},Flat"
    if kind == "ivf-pq":
        return f"IVF{nlist},PQ{cfg.pq_m or default_pq_m(dim)}"
    return cfg.factory


@dataclass(frozen=True)
class VectorParts:
    """The committed vector parts of an output folder, in row order."""
    store: Store
    files: list[str]

    def count(self) -> int:
        return sum(pq.ParquetFile(self.store.fs.open(self.store.path(f), "rb")).metadata.num_rows
                   for f in self.files)

    def read(self, columns: list[str]) -> Iterator[pa.Table]:
        for name in self.files:
            with self.store.fs.open(self.store.path(name), "rb") as handle:
                yield pq.read_table(handle, columns=columns)

    def vectors(self) -> Iterator[np.ndarray]:
        for table in self.read(["vector"]):
            yield to_matrix(table.column("vector"))

    def sample(self, positions: np.ndarray) -> np.ndarray:
        """The vectors at the given global row positions (sorted), streaming part by part."""
        out, start = [], 0
        for block in self.vectors():
            inside = positions[(positions >= start) & (positions < start + len(block))]
            out.append(block[inside - start])
            start += len(block)
        return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def to_matrix(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    dim = array.type.list_size
    flat = array.flatten().to_numpy(zero_copy_only=False)
    return np.ascontiguousarray(flat.reshape(-1, dim), dtype=np.float32)


def even_positions(n: int, k: int) -> np.ndarray:
    """k row positions spread evenly over n rows (all rows when k >= n)."""
    if k >= n:
        return np.arange(n)
    return np.unique(np.linspace(0, n - 1, k).astype(np.int64))


def exact_top_k(parts: VectorParts, queries: np.ndarray, k: int, metric: str) -> np.ndarray:
    """Brute-force neighbours over every stored vector, streamed part by part."""
    best_d = np.full((len(queries), 0), 0, np.float32)
    best_i = np.full((len(queries), 0), 0, np.int64)
    start = 0
    for block in parts.vectors():
        d, i = faiss.knn(queries, block, min(k, len(block)), metric=METRICS[metric])
        best_d = np.hstack([best_d, d])
        best_i = np.hstack([best_i, i + start])
        order = np.argsort(best_d, axis=1, kind="stable")
        if metric == "ip":
            order = order[:, ::-1]
        order = order[:, :k]
        best_d = np.take_along_axis(best_d, order, 1)
        best_i = np.take_along_axis(best_i, order, 1)
        start += len(block)
    return best_i


def recall_at_k(index: faiss.Index, parts: VectorParts, n: int, metric: str, k: int = 10,
                n_queries: int = 1000) -> float:
    queries = parts.sample(even_positions(n, n_queries))
    if len(queries) == 0:
        return float("nan")
    k = min(k, n)
    truth = exact_top_k(parts, queries, k, metric)
    _, found = index.search(queries, k)
    hits = sum(len(set(t) & set(f)) for t, f in zip(truth.tolist(), found.tolist()))
    return hits / (len(queries) * k)


def set_search_params(index: faiss.Index, cfg: IndexConfig) -> None:
    inner = faiss.downcast_index(index)
    if isinstance(inner, faiss.IndexHNSW):
        inner.hnsw.efSearch = cfg.ef_search
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        ivf.nprobe = cfg.nprobe or max(1, min(ivf.nlist, int(round(math.sqrt(ivf.nlist)))))


def build_index(store: Store, files: list[str], cfg: IndexConfig, normalized: bool) -> dict:
    """Build, write atomically, and describe the index for the given parts. Returns the infos."""
    started = time.perf_counter()
    parts = VectorParts(store, files)
    n = parts.count()
    dim = next((b.shape[1] for b in parts.vectors()), 0) if n else 0
    if cfg.metric == "ip" and not normalized:
        log.warning("index.metric = 'ip' on vectors that are not normalised is not cosine "
                    "similarity; set encode.normalize = true for cosine")
    if n == 0:
        store.remove(INDEX_FILE)
        store.remove(IDS_FILE)
        infos = {"type": cfg.type, "count": 0}
        store.write_json(INFOS_FILE, infos)
        return infos
    factory = factory_string(cfg, n, dim)
    index = faiss.index_factory(dim, factory, METRICS[cfg.metric])
    if isinstance(faiss.downcast_index(index), faiss.IndexHNSW):
        faiss.downcast_index(index).hnsw.efConstruction = cfg.ef_construction
    if not index.is_trained:
        ivf = faiss.try_extract_index_ivf(index)
        needed = TRAIN_PER_CENTROID * (ivf.nlist if ivf is not None else 256)
        index.train(parts.sample(even_positions(n, max(needed, 10_000))))
    for block in parts.vectors():
        index.add(block)
    set_search_params(index, cfg)
    store.write_bytes(INDEX_FILE, faiss.serialize_index(index).tobytes())
    id_tables = [t.column("id") for t in parts.read(["id"])]
    ids = pa.chunked_array([c for t in id_tables for c in t.chunks])
    id_map = pa.table({"faiss_id": pa.array(np.arange(n, dtype=np.int64)), "id": ids})
    with store.open_atomic(IDS_FILE) as handle:
        pq.write_table(id_map, handle)
    seconds = time.perf_counter() - started
    infos = {
        "type": cfg.type, "factory": factory, "count": n, "dimension": dim, "metric": cfg.metric,
        "size_bytes": store.size(INDEX_FILE), "build_seconds": round(seconds, 3),
        "recall_at_10": round(recall_at_k(index, parts, n, cfg.metric), 4),
    }
    store.write_json(INFOS_FILE, infos)
    log.info("index: %s", json.dumps(infos))
    return infos
