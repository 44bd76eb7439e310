"""Which FAISS index to build: the kind (given, or `auto` from the count and a memory budget),
its factory string and sizes (lists, code bytes), and the empty index itself."""
from __future__ import annotations

import math
import re

import faiss

from ..config import ConfigError, IndexConfig, parse_memory

METRICS = {"ip": faiss.METRIC_INNER_PRODUCT, "l2": faiss.METRIC_L2}
TRAIN_PER_CENTROID = 39  # FAISS warns below 39 training points per centroid
MIN_TRAIN = 10_000  # IVF kinds train on at least this many vectors when there are that many
FLAT_MAX = 200_000  # auto: flat (exact) up to this many vectors, if it fits the budget
HNSW_MAX = 10_000_000  # auto: HNSW up to this many, if it fits; IVF-PQ beyond


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

def training_size(index: faiss.Index, n: int) -> int:
    ivf = faiss.try_extract_index_ivf(index)
    centroids = ivf.nlist if ivf is not None else 1
    pq_index = faiss.downcast_index(ivf if ivf is not None else index)
    if hasattr(pq_index, "pq"):
        centroids = max(centroids, pq_index.pq.ksub)
    elif ivf is None:
        centroids = 256
    return min(n, max(TRAIN_PER_CENTROID * centroids, MIN_TRAIN))


def check_config(cfg: IndexConfig, dim: int) -> None:
    """What can be refused before embedding, knowing the vectors' width but not their count: a
    factory string FAISS cannot parse for this width, or a pq_m that does not divide it."""
    if cfg.pq_m and dim % cfg.pq_m:
        raise ConfigError(f"index.pq_m = {cfg.pq_m} must divide the vector dimension {dim}")
    if cfg.type == "factory":
        try:
            faiss.index_factory(dim, cfg.factory, METRICS[cfg.metric])
        except RuntimeError as exc:
            raise ConfigError(f"index.factory = {cfg.factory!r}: FAISS cannot build it for "
                              f"{dim}-d vectors ({faiss_reason(exc)})") from None


def faiss_reason(exc: Exception) -> str:
    """FAISS's message without its C++ location prefix ("Error in ... at file.cpp:64: ")."""
    text = " ".join(str(exc).split())
    return re.sub(r"^Error in .*? at \S+:\d+: (Error: )?", "", text) or type(exc).__name__
