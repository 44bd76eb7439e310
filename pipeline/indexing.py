"""Build a FAISS index over the stored vectors, streamed part by part, with its id map and infos.

Index choice (a factory string from the config, or `auto` from the count and a memory budget) is
kept apart from building; IVF kinds train on an even sample, then add part by part, so the whole
vector set is never in memory at once. The search-time knobs (efSearch, nprobe) are written into
index_infos.json and applied by `load_index`, so a search runs the index as it was measured.

Layouts (IVF kinds): `single` adds every part to one in-memory index. `shards` trains once, then
adds each group of consecutive parts to its own copy of the trained index (ids = global row
positions), written as index/shard-<build>-NNNNN.faiss and searched together, memory-mapped.
`ondisk` merges those shards with FAISS's OnDiskInvertedLists into index/merged-<build>.ivfdata,
which index.faiss references and search memory-maps (local disks only). With the same trained
index and nprobe the three return the same ids and distances. index_infos.json, written last,
names the layout's files; files of earlier builds are removed after it.
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
import sys
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .config import ConfigError, IndexConfig
from .storage import TMP_MARK, Store

log = logging.getLogger(__name__)

INDEX_DIR = "index"
INDEX_FILE = f"{INDEX_DIR}/index.faiss"
IDS_FILE = f"{INDEX_DIR}/ids.parquet"
INFOS_FILE = f"{INDEX_DIR}/index_infos.json"
METRICS = {"ip": faiss.METRIC_INNER_PRODUCT, "l2": faiss.METRIC_L2}
TRAIN_PER_CENTROID = 39  # FAISS warns below 39 training points per centroid
MIN_TRAIN = 10_000  # IVF kinds train on at least this many vectors when there are that many
RECALL_QUERIES = 1_000  # stored vectors used as queries for recall@10
NPROBE_TARGET = 0.95  # an unset nprobe is the smallest that reaches this recall@10
FLAT_MAX = 200_000  # auto: flat (exact) up to this many vectors, if it fits the budget
HNSW_MAX = 10_000_000  # auto: HNSW up to this many, if it fits; IVF-PQ beyond
READ_ROWS = 65_536  # rows per streamed block of a vector part
IVF_LAYOUTS = ("shards", "ondisk")


def parse_memory(text: str) -> int:
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)i?B?\s*", text.upper())
    if not match:
        raise ConfigError(f"index.max_memory: {text!r} is not a size like 512MB or 4GB")
    return int(float(match[1]) * 1024 ** " KMGT".index(match[2] or " "))


def default_nlist(n: int) -> int:
    """About 4 sqrt(n) lists, but never more than the data can train (39 points per list)."""
    return max(1, min(int(4 * math.sqrt(n)), n // TRAIN_PER_CENTROID))


def default_pq_m(dim: int) -> int:
    """Sub-quantizers of 4 dimensions each (8-bit codes): dim/4 bytes per vector."""
    return largest_divisor(dim, max(1, dim // 4))


def largest_divisor(dim: int, at_most: int) -> int:
    return next(m for m in range(max(1, at_most), 0, -1) if dim % m == 0)


def pq_nbits(n: int) -> int:
    """8-bit codes (256 centroids per sub-quantizer) once there are 39 x 256 vectors to train on."""
    if n < 2 * TRAIN_PER_CENTROID:
        return 1
    return max(1, min(8, int(math.log2(n / TRAIN_PER_CENTROID))))


def hnsw_bytes(n: int, dim: int, m: int) -> int:
    """Vectors plus about 2M level-0 links of 4 bytes each (upper levels add ~1/M more)."""
    return int(n * (dim * 4 + m * 2 * 4 * 1.1))


def choose_kind(cfg: IndexConfig, n: int, dim: int) -> str:
    """`auto`, autofaiss-style: exact while small and in budget, then HNSW, then IVF-PQ."""
    if cfg.type != "auto":
        return cfg.type
    budget = parse_memory(cfg.max_memory)
    if n <= FLAT_MAX and n * dim * 4 <= budget:
        return "flat"
    if n <= HNSW_MAX and hnsw_bytes(n, dim, cfg.hnsw_m) <= budget:
        return "hnsw"
    return "ivf-pq"


def auto_pq_m(cfg: IndexConfig, n: int, dim: int, nlist: int) -> int:
    """The largest code (at most dim/4 bytes) whose codes, ids and centroids fit the budget."""
    budget = parse_memory(cfg.max_memory)
    room = budget - nlist * dim * 4
    for m in sorted({m for m in range(1, dim // 4 + 1) if dim % m == 0}, reverse=True):
        if n * (m + 8) <= room:
            return m
    raise ConfigError(f"index.max_memory = {cfg.max_memory!r} is too small for {n:,} vectors even "
                      f"as IVF-PQ with 1-byte codes; raise it")


def factory_string(cfg: IndexConfig, n: int, dim: int) -> str:
    kind = choose_kind(cfg, n, dim)
    if kind == "flat":
        return "Flat"
    if kind == "hnsw":
        return f"HNSW{cfg.hnsw_m},Flat"
    nlist = cfg.nlist or default_nlist(n)
    if kind == "ivf-flat":
        return f"IVF{nlist},Flat"
    if kind == "ivf-pq":
        m = cfg.pq_m or (auto_pq_m(cfg, n, dim, nlist) if cfg.type == "auto" else default_pq_m(dim))
        if dim % m:
            raise ConfigError(f"index.pq_m = {m} must divide the vector dimension {dim}")
        nbits = pq_nbits(n)
        # "np": no polysemous training, which costs minutes and serves only Hamming filtering
        return f"IVF{nlist},PQ{m}" + ("" if nbits == 8 else f"x{nbits}") + "np"
    return cfg.factory


@dataclass(frozen=True)
class VectorParts:
    """The committed vector parts of an output folder, in row order (= FAISS ids)."""
    store: Store
    files: list[str]

    def metadata(self, name: str) -> pq.FileMetaData:
        with self.store.fs.open(self.store.path(name), "rb") as handle:
            return pq.ParquetFile(handle).metadata

    def rows(self) -> list[int]:
        return [self.metadata(f).num_rows for f in self.files]

    def count(self) -> int:
        return sum(self.rows())

    def dimension(self) -> int:
        for name in self.files:
            vector = self.metadata(name).schema.to_arrow_schema().field("vector").type
            return vector.list_size
        return 0

    def read(self, columns: list[str], batch_rows: int = READ_ROWS) -> Iterator[pa.Table]:
        """The columns, part after part, at most batch_rows rows at a time."""
        for name in self.files:
            with self.store.fs.open(self.store.path(name), "rb") as handle:
                for batch in pq.ParquetFile(handle).iter_batches(batch_size=batch_rows,
                                                                 columns=columns):
                    yield pa.Table.from_batches([batch])

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


def even_positions(n: int, k: int, shift: float = 0.0) -> np.ndarray:
    """k row positions spread evenly over n rows (all rows when k >= n); shift in steps (0..1)."""
    if k >= n:
        return np.arange(n)
    step = n / k
    return np.unique(np.minimum((np.arange(k) * step + shift * step).astype(np.int64), n - 1))


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


def recall(index: faiss.Index, queries: np.ndarray, truth: np.ndarray) -> float:
    """Share of the exact top-k found in the index's top-k."""
    if len(queries) == 0:
        return float("nan")
    _, found = index.search(queries, truth.shape[1])
    hits = sum(len(set(t) & set(f)) for t, f in zip(truth.tolist(), found.tolist()))
    return hits / truth.size


def ivf_indexes(index: faiss.Index) -> list:
    """The IVF indexes whose nprobe governs a search: one, one per shard, or none."""
    if isinstance(index, faiss.IndexShards):
        return [faiss.extract_index_ivf(index.at(i)) for i in range(index.count())]
    ivf = faiss.try_extract_index_ivf(index)
    return [] if ivf is None else [ivf]


def set_nprobe(index: faiss.Index, nprobe: int) -> None:
    for ivf in ivf_indexes(index):
        ivf.nprobe = nprobe


def search_params(index: faiss.Index) -> dict:
    """The search-time knobs an index carries, as stored in index_infos.json."""
    params = {}
    inner = faiss.downcast_index(index)
    if isinstance(inner, faiss.IndexHNSW):
        params["efSearch"] = int(inner.hnsw.efSearch)
    ivfs = ivf_indexes(index)
    if ivfs:
        params["nprobe"] = int(ivfs[0].nprobe)
    return params


def apply_search_params(index: faiss.Index, params: dict) -> None:
    inner = faiss.downcast_index(index)
    if "efSearch" in params and isinstance(inner, faiss.IndexHNSW):
        inner.hnsw.efSearch = int(params["efSearch"])
    if "nprobe" in params:
        set_nprobe(index, int(params["nprobe"]))


def tune_nprobe(index: faiss.Index, queries: np.ndarray, truth: np.ndarray) -> int:
    """The smallest nprobe (1, 2, 4, ... nlist) reaching NPROBE_TARGET recall, else the best."""
    nlist = ivf_indexes(index)[0].nlist
    ladder = sorted({min(2 ** i, nlist) for i in range(nlist.bit_length() + 1)})
    best, best_recall = ladder[-1], -1.0
    for nprobe in ladder:
        set_nprobe(index, nprobe)
        got = recall(index, queries, truth)
        if got >= NPROBE_TARGET:
            return nprobe
        if got > best_recall + 0.005:  # stop paying for probes that buy no recall
            best, best_recall = nprobe, got
    return best


def measure(index: faiss.Index, parts: VectorParts, n: int,
            cfg: IndexConfig) -> tuple[float, dict, bool]:
    """recall@10 against exact search, the search parameters it was measured with, and whether
    the sampled vectors have unit length.

    Exact neighbours are computed once for two even samples of stored vectors: an unset nprobe
    is tuned on one, and the recall reported is measured on the other (disjoint when n >= 2000).
    """
    k = min(10, n)
    report_pos = even_positions(n, RECALL_QUERIES)
    ivfs = ivf_indexes(index)
    tune_pos = even_positions(n, RECALL_QUERIES, shift=0.5) if ivfs else report_pos
    positions = np.union1d(report_pos, tune_pos)
    queries = parts.sample(positions)
    truth = exact_top_k(parts, queries, k, cfg.metric)
    if ivfs:
        tune = np.isin(positions, tune_pos)
        set_nprobe(index, min(ivfs[0].nlist,
                              cfg.nprobe or tune_nprobe(index, queries[tune], truth[tune])))
    report = np.isin(positions, report_pos)
    unit = bool(np.allclose(np.linalg.norm(queries, axis=1), 1.0, atol=1e-3))
    return recall(index, queries[report], truth[report]), search_params(index), unit


def _training_size(index: faiss.Index, n: int) -> int:
    ivf = faiss.try_extract_index_ivf(index)
    centroids = ivf.nlist if ivf is not None else 1
    pq_index = faiss.downcast_index(ivf if ivf is not None else index)
    if hasattr(pq_index, "pq"):
        centroids = max(centroids, pq_index.pq.ksub)
    elif ivf is None:
        centroids = 256
    return min(n, max(TRAIN_PER_CENTROID * centroids, MIN_TRAIN))


def new_index(cfg: IndexConfig, n: int, dim: int) -> tuple[faiss.Index, str, str]:
    """(empty index, kind, factory string) for n vectors of dim, from the config."""
    kind = choose_kind(cfg, n, dim)
    factory = factory_string(cfg, n, dim)
    try:
        index = faiss.index_factory(dim, factory, METRICS[cfg.metric])
    except RuntimeError as exc:
        raise ConfigError(f"index.factory: FAISS cannot build {factory!r}: {exc}") from None
    if isinstance(faiss.downcast_index(index), faiss.IndexHNSW):
        hnsw = faiss.downcast_index(index).hnsw
        hnsw.efConstruction = cfg.ef_construction
        hnsw.efSearch = cfg.ef_search
    return index, kind, factory


def choose_layout(cfg: IndexConfig, index: faiss.Index, factory: str, store: Store) -> str:
    """The layout to build: shards and ondisk need an IVF index, ondisk a local disk."""
    if cfg.layout == "single":
        return "single"
    if faiss.try_extract_index_ivf(index) is None:
        if cfg.type == "auto":  # auto chose flat or HNSW for this count: nothing to shard
            log.warning("index.layout = %r: auto chose %s, not IVF; building one index",
                        cfg.layout, factory)
            return "single"
        raise ConfigError(f"index.layout = {cfg.layout!r} needs an IVF index; {factory!r} is not")
    if cfg.layout == "ondisk" and not store.local:
        raise ConfigError(f"index.layout = 'ondisk' memory-maps a local file; {store.url} is not "
                          f"on a local disk (use layout 'shards' or 'single' there)")
    return cfg.layout


@contextmanager
def faiss_stdout_to_stderr() -> Iterator[None]:
    """FAISS's C++ notices (ondisk resizing, path updates) print to stdout, which carries the
    command's output (e.g. `search --json`); send them to stderr meanwhile."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def shard_groups(rows: list[int], shard_rows: int) -> list[list[int]]:
    """Consecutive part indices grouped up to shard_rows rows a group (a larger part alone)."""
    groups: list[list[int]] = []
    filled = 0
    for i, r in enumerate(rows):
        if not groups or filled + r > shard_rows:
            groups.append([])
            filled = 0
        groups[-1].append(i)
        filled += r
    return groups


def write_shard(store: Store, trained: np.ndarray, parts: VectorParts, first_row: int,
                rel: str) -> int:
    """Add the parts' vectors, with ids = their global row positions from first_row, to a copy
    of the serialized trained index and write it to rel. The unit of work of a shard worker;
    it holds only these parts' codes. Returns the rows added."""
    index = faiss.deserialize_index(trained)
    row = first_row
    for block in parts.vectors():
        index.add_with_ids(block, np.arange(row, row + len(block), dtype=np.int64))
        row += len(block)
    store.write_bytes(rel, faiss.serialize_index(index).tobytes())
    return row - first_row


def read_stored_index(store: Store, rel: str, flags: int = 0) -> faiss.Index:
    """A stored index: read (memory-mapped with IO_FLAG_MMAP) from a local disk, else fetched."""
    if store.local:
        return faiss.read_index(store.path(rel), flags)
    return faiss.deserialize_index(np.frombuffer(store.read_bytes(rel), np.uint8))


def open_shards(store: Store, names: list[str]) -> faiss.IndexShards:
    """The shard files as one index; their ids are global row positions, kept as they are.
    On a local disk the inverted lists stay memory-mapped (IO_FLAG_MMAP)."""
    shards = None
    for name in names:
        shard = read_stored_index(store, name, faiss.IO_FLAG_MMAP)
        if shards is None:
            shards = faiss.IndexShards(shard.d, False, False)  # not threaded, ids as stored
        shards.add_shard(shard)  # the wrapper keeps a reference to shard
    return shards


def build_shards(store: Store, parts: VectorParts, rows: list[int], trained: np.ndarray,
                 build: str, shard_rows: int) -> list[dict]:
    """One shard per group of consecutive parts; [{file, rows, first_row}] in row order."""
    shards, first_row = [], 0
    for number, group in enumerate(shard_groups(rows, shard_rows)):
        rel = f"{INDEX_DIR}/shard-{build}-{number:05d}.faiss"
        count = write_shard(store, trained, VectorParts(store, [parts.files[i] for i in group]),
                            first_row, rel)
        shards.append({"file": rel, "rows": count, "first_row": first_row})
        first_row += count
    return shards


def merge_shards_ondisk(store: Store, trained: np.ndarray, shards: list[dict],
                        build: str) -> tuple[faiss.Index, str]:
    """faiss.contrib.ondisk.merge_ondisk of the shards into index/merged-<build>.ivfdata (under a
    temporary name until complete); returns the merged index, whose lists are memory-mapped."""
    from faiss.contrib.ondisk import merge_ondisk

    rel = f"{INDEX_DIR}/merged-{build}.ivfdata"
    final = store.path(rel)
    tmp = store.path(f"{INDEX_DIR}/.merged-{build}.ivfdata{TMP_MARK}{os.getpid()}")
    index = faiss.deserialize_index(trained)
    try:
        with faiss_stdout_to_stderr():
            merge_ondisk(index, [store.path(s["file"]) for s in shards], tmp)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, final)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    invlists = faiss.downcast_InvertedLists(faiss.extract_index_ivf(index).invlists)
    invlists.filename = final  # index.faiss names the final file (search resolves it by basename)
    return index, rel


def remove_earlier_builds(store: Store, keep: set[str]) -> None:
    """Shard and ivfdata files of earlier builds, once index_infos.json names the new ones."""
    for name in store.listdir(INDEX_DIR):
        rel = f"{INDEX_DIR}/{name}"
        if re.fullmatch(r"(shard-.+\.faiss|merged-.+\.ivfdata)", name) and rel not in keep:
            store.remove(rel)


def build_index(store: Store, files: list[str], cfg: IndexConfig, normalized: bool) -> dict:
    """Build, write atomically, and describe the index for the given parts. Returns the infos.

    `normalized` is what the job asked for; the ip warning goes by the vectors themselves (a
    sample's norms), so a model that normalises on its own draws no warning."""
    started = time.perf_counter()
    parts = VectorParts(store, files)
    rows = parts.rows()
    n = sum(rows)
    dim = parts.dimension()
    if n == 0:
        store.remove(INDEX_FILE)
        store.remove(IDS_FILE)
        infos = {"type": cfg.type, "count": 0}
        store.write_json(INFOS_FILE, infos)
        remove_earlier_builds(store, set())
        return infos
    index, kind, factory = new_index(cfg, n, dim)
    layout = choose_layout(cfg, index, factory, store)
    trained_on = 0
    if not index.is_trained:
        trained_on = _training_size(index, n)
        index.train(parts.sample(even_positions(n, trained_on)))
    layout_infos: dict = {"layout": layout}
    if layout == "single":
        for block in parts.vectors():
            index.add(block)
        index_bytes = faiss.serialize_index(index)
    else:
        build = f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:6]}"
        trained = faiss.serialize_index(index)
        shards = build_shards(store, parts, rows, trained, build, cfg.shard_rows)
        layout_infos["shard_rows"] = cfg.shard_rows
        if layout == "shards":
            index = open_shards(store, [s["file"] for s in shards])
            index_bytes = trained  # index.faiss: the trained (empty) index the shards share
            layout_infos["shards"] = shards
            layout_infos["shards_bytes"] = sum(store.size(s["file"]) for s in shards)
        else:
            index, ivfdata = merge_shards_ondisk(store, trained, shards, build)
            index_bytes = faiss.serialize_index(index)
            for shard in shards:
                store.remove(shard["file"])
            layout_infos["ivfdata"] = ivfdata
            layout_infos["ivfdata_bytes"] = store.size(ivfdata)
            layout_infos["merged_shards"] = len(shards)

    build_seconds = time.perf_counter() - started
    measured, params, unit = measure(index, parts, n, cfg)
    if cfg.metric == "ip" and not unit:
        log.warning("index.metric = 'ip' on vectors that are not normalised is not cosine "
                    "similarity; set encode.normalize = true for cosine")
    store.write_bytes(INDEX_FILE, index_bytes.tobytes())

    ids = pa.chunked_array([c for t in parts.read(["id"]) for c in t.column("id").chunks])
    id_map = pa.table({"faiss_id": pa.array(np.arange(n, dtype=np.int64)), "id": ids})
    with store.open_atomic(IDS_FILE) as handle:
        pq.write_table(id_map, handle)
    size = store.size(INDEX_FILE) + layout_infos.get("shards_bytes", 0) + layout_infos.get(
        "ivfdata_bytes", 0)
    infos = {
        "type": cfg.type, "kind": kind, "factory": factory, "count": n, "dimension": dim,
        "metric": cfg.metric, "normalized": unit, "size_bytes": size,
        "build_seconds": round(build_seconds, 3), "recall_at_10": round(measured, 4),
        "recall_queries": min(n, RECALL_QUERIES), "search_params": params,
        "trained_on": trained_on, "max_memory": cfg.max_memory if cfg.type == "auto" else None,
        **layout_infos,
        "parts": [{"file": f, "rows": r} for f, r in zip(files, rows)],
    }
    store.write_json(INFOS_FILE, infos)
    remove_earlier_builds(store, {s["file"] for s in layout_infos.get("shards", [])}
                          | {layout_infos.get("ivfdata")})
    log.info("index: %s", json.dumps({k: v for k, v in infos.items()
                                      if k not in ("parts", "shards")}))
    return infos


def load_index(store: Store) -> tuple[faiss.Index, dict]:
    """The folder's index with the search parameters it was measured with, and its infos.

    shards: the shard files as one faiss.IndexShards (memory-mapped on a local disk, fetched
    into memory from an object store); ondisk: index.faiss with its lists memory-mapped from the
    .ivfdata file next to it."""
    if not store.exists(INDEX_FILE) or not store.exists(INFOS_FILE):
        raise ConfigError(f"{store.url} has no index; build one with `embedpipe index {store.url}`")
    infos = store.read_json(INFOS_FILE)
    layout = infos.get("layout", "single")
    if layout == "shards":
        index = open_shards(store, [s["file"] for s in infos["shards"]])
    elif layout == "ondisk":
        if not store.local:
            raise ConfigError(f"{store.url}: an ondisk index is memory-mapped and needs a local "
                              f"disk; copy the folder locally or rebuild with --layout shards")
        with faiss_stdout_to_stderr():  # FAISS prints the .ivfdata path it resolves
            index = faiss.read_index(store.path(INDEX_FILE),
                                     faiss.IO_FLAG_ONDISK_SAME_DIR | faiss.IO_FLAG_READ_ONLY)
    else:
        index = read_stored_index(store, INDEX_FILE)
    apply_search_params(index, infos.get("search_params", {}))
    return index, infos


def rebuild_index(url: str, overrides: dict) -> dict:
    """`embedpipe index`: rebuild OUT's index from its stored vectors (no encoding), streaming
    them from Parquet, with the manifest's [index] settings updated by `overrides`."""
    from .config import config_from_dict
    from .ledger import MANIFEST, Ledger, acquire_lock, release_lock

    store = Store(url)
    if not store.exists(MANIFEST):
        raise ConfigError(f"{url}: no {MANIFEST}; is this an embedpipe output folder?")
    acquire_lock(store)
    try:
        ledger = Ledger(store)
        recorded = ledger.data.get("config", {}).get("index", {})
        merged = {**recorded, **{k: v for k, v in overrides.items() if v is not None}}
        if overrides.get("type") and overrides["type"] != "factory" and not overrides.get("factory"):
            merged["factory"] = None
        if overrides.get("type") in ("flat", "hnsw") and not overrides.get("layout"):
            merged["layout"] = "single"  # a recorded shards/ondisk layout has nothing to shard
        cfg = config_from_dict({"index": merged}).index
        normalized = bool(ledger.data.get("vector_settings", {}).get("encode.normalize"))
        infos = build_index(store, ledger.files("vectors"), cfg, normalized=normalized)
        ledger.update(index=infos)
    finally:
        release_lock(store)
    return infos


def render_infos(infos: dict) -> str:
    if not infos.get("count"):
        return "index: empty (no vectors)"
    params = ", ".join(f"{k} {v}" for k, v in infos.get("search_params", {}).items())
    return (f"index: {infos['factory']} ({infos['kind']}) over {infos['count']:,} x "
            f"{infos['dimension']} vectors, metric {infos['metric']}"
            + (f", {params}" if params else "") + "\n"
            f"  recall@10 {infos['recall_at_10']} on {infos['recall_queries']} stored vectors "
            f"as queries; {infos['size_bytes'] / 2**20:.1f} MiB; built in "
            f"{infos['build_seconds']:.1f} s" + render_layout(infos))


def render_layout(infos: dict) -> str:
    if infos.get("layout") == "shards":
        return (f"\n  layout shards: {len(infos['shards'])} shard files searched together "
                f"(memory-mapped), {infos['shards_bytes'] / 2**20:.1f} MiB")
    if infos.get("layout") == "ondisk":
        return (f"\n  layout ondisk: {infos['merged_shards']} shards merged into "
                f"{infos['ivfdata']} ({infos['ivfdata_bytes'] / 2**20:.1f} MiB, memory-mapped)")
    return ""
