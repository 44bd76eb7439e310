"""Which FAISS index to build: the kind (given, or `auto` from the count and a memory budget),
its factory string and sizes (lists, code bytes), and the empty index itself. The folder's
precision decides the codes (index/family.py): float vectors, SQ8 codes (int8 / uint8 folders)
or binary codes (binary / ubinary folders)."""
from __future__ import annotations

import math
import re

import faiss

from ..config import ConfigError, IndexConfig, parse_memory
from ..io.precision import Precision
from .family import BINARY, FLOAT, SQ8, codes_of, hnsw_of, ivf_of, set_ranges, unwrapped

METRICS = {"ip": faiss.METRIC_INNER_PRODUCT, "l2": faiss.METRIC_L2}
TRAIN_PER_CENTROID = 39  # FAISS warns below 39 training points per centroid
MIN_TRAIN = 10_000  # IVF kinds train on at least this many vectors when there are that many
FLAT_MAX = 200_000  # auto: flat (exact) up to this many vectors, if it fits the budget
HNSW_MAX = 10_000_000  # auto: HNSW up to this many, if it fits; IVF-PQ beyond
BINARY_LAYOUT = ("index.layout = {layout!r}: binary indexes (output.precision binary / ubinary) "
                 "are built as one index, 1/32 of float32's size: set layout = 'single'")


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

def code_bytes(dim: int, codes: str = FLOAT) -> int:
    """One vector's code: 4 bytes a float dimension, 1 an SQ8 one, 1 bit a binary one."""
    return {FLOAT: dim * 4, SQ8: dim, BINARY: dim // 8}[codes]

def hnsw_bytes(n: int, dim: int, m: int, codes: str = FLOAT) -> int:
    """Codes plus about 2M level-0 links of 4 bytes each (upper levels add ~1/M more)."""
    return int(n * (code_bytes(dim, codes) + m * 2 * 4 * 1.1))

def choose_kind(cfg: IndexConfig, n: int, dim: int, codes: str = FLOAT) -> str:
    """`auto`, autofaiss-style: exact while small and in budget, then HNSW, then IVF-PQ
    (binary codes: IVF over the codes, FAISS has no PQ for them)."""
    if cfg.type != "auto":
        return cfg.type
    budget = parse_memory(cfg.max_memory)
    if n <= FLAT_MAX and n * code_bytes(dim, codes) <= budget:
        return "flat"
    if n <= HNSW_MAX and hnsw_bytes(n, dim, cfg.hnsw_m, codes) <= budget:
        return "hnsw"
    return "ivf-flat" if codes == BINARY else "ivf-pq"

def auto_pq_m(cfg: IndexConfig, n: int, dim: int, nlist: int) -> int:
    """The largest code (at most dim/4 bytes) whose codes, ids and centroids fit the budget."""
    budget = parse_memory(cfg.max_memory)
    room = budget - nlist * dim * 4
    for m in sorted({m for m in range(1, dim // 4 + 1) if dim % m == 0}, reverse=True):
        if n * (m + 8) <= room:
            return m
    raise ConfigError(f"index.max_memory = {cfg.max_memory!r} is too small for {n:,} vectors even "
                      f"as IVF-PQ with 1-byte codes; raise it")

def factory_string(cfg: IndexConfig, n: int, dim: int, codes: str = FLOAT) -> str:
    """The FAISS factory string (binary codes: index_binary_factory's)."""
    kind = choose_kind(cfg, n, dim, codes)
    storage = {FLOAT: "Flat", SQ8: "SQ8", BINARY: ""}[codes]
    if kind == "flat":
        return "BFlat" if codes == BINARY else storage
    if kind == "hnsw":
        return f"BHNSW{cfg.hnsw_m}" if codes == BINARY else f"HNSW{cfg.hnsw_m},{storage}"
    nlist = cfg.nlist or default_nlist(n)
    if kind == "ivf-flat":
        return f"BIVF{nlist}" if codes == BINARY else f"IVF{nlist},{storage}"
    if kind == "ivf-pq" and codes == BINARY:
        raise ConfigError("index.type = 'ivf-pq': FAISS has no product quantizer for binary "
                          "codes (output.precision binary / ubinary); choose flat, hnsw, "
                          "ivf-flat or auto")
    if kind == "ivf-pq":
        m = cfg.pq_m or (auto_pq_m(cfg, n, dim, nlist) if cfg.type == "auto" else default_pq_m(dim))
        if dim % m:
            raise ConfigError(f"index.pq_m = {m} must divide the vector dimension {dim}")
        nbits = pq_nbits(n)
        # "np": no polysemous training, which costs minutes and serves only Hamming filtering
        return f"IVF{nlist},PQ{m}" + ("" if nbits == 8 else f"x{nbits}") + "np"
    return cfg.factory

def new_index(cfg: IndexConfig, n: int, dim: int,
              precision: Precision = Precision()) -> tuple[faiss.Index, str, str]:
    """(empty index, kind, factory string) for n vectors of dim (binary codes: dim bits), from
    the config; an SQ8 index holds the folder's ranges already (family.set_ranges)."""
    codes = codes_of(precision)
    kind = choose_kind(cfg, n, dim, codes)
    factory = factory_string(cfg, n, dim, codes)
    index = _factory(cfg, factory, dim, codes, "index.factory")
    hnsw = hnsw_of(index)
    if hnsw is not None:
        hnsw.efConstruction = cfg.ef_construction
        hnsw.efSearch = cfg.ef_search
    set_ranges(index, precision)
    return index, kind, factory

def _factory(cfg: IndexConfig, factory: str, dim: int, codes: str, key: str):
    try:
        if codes == BINARY:
            return faiss.index_binary_factory(dim, factory)
        return faiss.index_factory(dim, factory, METRICS[cfg.metric])
    except RuntimeError as exc:
        kind = "a binary index (output.precision binary / ubinary: e.g. \"BIVF256\", " \
               "\"BHNSW32\")" if codes == BINARY else "it"
        raise ConfigError(f"{key} = {factory!r}: FAISS cannot build {kind} for {dim}-d "
                          f"vectors ({faiss_reason(exc)})") from None

def training_size(index: faiss.Index, n: int) -> int:
    ivf = ivf_of(index)
    centroids = ivf.nlist if ivf is not None else 1
    pq_index = unwrapped(ivf if ivf is not None else index)
    if hasattr(pq_index, "pq"):
        centroids = max(centroids, pq_index.pq.ksub)
    elif ivf is None:
        centroids = 256
    return min(n, max(TRAIN_PER_CENTROID * centroids, MIN_TRAIN))


def check_config(cfg: IndexConfig, dim: int, precision: Precision = Precision()) -> None:
    """What can be refused before embedding, knowing the vectors' width but not their count: a
    factory string FAISS cannot parse for this width, a pq_m that does not divide it, or a
    kind the folder's codes do not take."""
    codes = codes_of(precision)
    if codes == BINARY:
        dim = precision.width(dim) * 8
        if cfg.type == "ivf-pq":
            factory_string(cfg, 1, dim, codes)  # refused, with the reason
        if cfg.layout != "single":
            raise ConfigError(BINARY_LAYOUT.format(layout=cfg.layout))
    elif cfg.pq_m and dim % cfg.pq_m:
        raise ConfigError(f"index.pq_m = {cfg.pq_m} must divide the vector dimension {dim}")
    if cfg.type == "factory":
        _factory(cfg, cfg.factory, dim, codes, "index.factory")


def faiss_reason(exc: Exception) -> str:
    """FAISS's message without its C++ location prefix ("Error in ... at file.cpp:64: ")."""
    text = " ".join(str(exc).split())
    return re.sub(r"^Error in .*? at \S+:\d+: (Error: )?", "", text) or type(exc).__name__
