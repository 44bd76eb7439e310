"""Measuring an index against exact search: recall@10 on stored vectors as queries, nprobe tuned
on a disjoint sample, and the search-time knobs (efSearch, nprobe) stored and applied."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import faiss
import numpy as np

from ..config import IndexConfig
from ..io.vectors import VectorParts
from .choose import METRICS
from ..io.precision import Precision
from .family import exact_knn, hnsw_of, is_binary, ivf_of, set_ranges

RECALL_QUERIES = 1_000  # stored vectors used as queries for recall@10
NPROBE_TARGET = 0.95  # an unset nprobe is the smallest that reaches this recall@10
RECALL_BATCH = 100  # queries a search


def even_positions(n: int, k: int, shift: float = 0.0) -> np.ndarray:
    """k row positions spread evenly over n rows (all rows when k >= n); shift in steps (0..1)."""
    if k >= n:
        return np.arange(n)
    step = n / k
    return np.unique(np.minimum((np.arange(k) * step + shift * step).astype(np.int64), n - 1))

class TopK:
    """The exact k nearest stored rows of `queries`, over rows seen block by block: their
    positions (counted from `first`, in the order seen), distances and, where given, labels.
    Ties go to the earlier position, so any cut of the rows into blocks, or shards merged in
    row order (`merge`), gives one answer."""

    def __init__(self, queries: np.ndarray, k: int, metric: str, first: int = 0):
        self.queries, self.k, self.kind = queries, k, METRICS.get(metric, 0)
        self.nearest_first = metric == "ip" and queries.dtype != np.uint8  # Hamming: ascending
        self.distances = np.zeros((len(queries), 0), np.float32)
        self.positions = np.zeros((len(queries), 0), np.int64)
        self.labels = np.zeros((len(queries), 0), np.int64)
        self.next = first

    def add(self, block: np.ndarray, labels: np.ndarray | None = None) -> None:
        """The next rows; `labels`: theirs, carried with the nearest ones."""
        if len(block):
            d, i = exact_knn(self.queries, block, min(self.k, len(block)), self.kind)
            self.merge(d, i + self.next, labels[i] if labels is not None else None)
        self.next += len(block)

    def merge(self, distances: np.ndarray, positions: np.ndarray,
              labels: np.ndarray | None = None) -> None:
        d = np.hstack([self.distances, distances])
        p = np.hstack([self.positions, positions])
        lab = np.hstack([self.labels, labels if labels is not None else np.zeros_like(positions)])
        order = np.lexsort((p, -d if self.nearest_first else d), axis=-1)[:, :self.k]
        self.distances = np.take_along_axis(d, order, 1)
        self.positions = np.take_along_axis(p, order, 1)
        self.labels = np.take_along_axis(lab, order, 1)


def exact_top_k(parts: VectorParts, queries: np.ndarray, k: int,
                metric: str) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force neighbours over every stored vector, streamed part by part: (positions,
    distances), [queries, k]."""
    top = TopK(queries, k, metric)
    for block in parts.vectors():
        top.add(block)
    return top.positions, top.distances


@dataclass(frozen=True)
class Truth:
    """The recall queries (stored vectors at `query_sample`'s positions) and their exact
    neighbours' labels and distances, where workers computed them (index/shard_build.py)."""
    queries: np.ndarray
    labels: np.ndarray
    distances: np.ndarray


def query_sample(n: int, index: faiss.Index) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The positions of the recall queries: (all, the reported ones, the nprobe-tuning ones).
    Two even samples of stored vectors (disjoint when n >= 2000); one where nothing is tuned."""
    report = even_positions(n, RECALL_QUERIES)
    tune = even_positions(n, RECALL_QUERIES, shift=0.5) if ivf_indexes(index) else report
    positions = np.union1d(report, tune)
    return positions, np.isin(positions, report), np.isin(positions, tune)


Search = Callable[[np.ndarray, int, "int | None"], tuple[np.ndarray, np.ndarray]]
"""(queries, k, nprobe or None for the index's own) -> (distances, labels), [queries, k]."""


def index_search(index: faiss.Index) -> Search:
    """A Search over an index held here, in batches: a search holds (queries x nprobe) list
    numbers and distances per shard, 1 GB at 1,000 queries and nprobe 4,000 over 20 shards."""
    def search(queries: np.ndarray, k: int, nprobe: int | None = None):
        if nprobe is not None:
            set_nprobe(index, nprobe)
        answers = [index.search(queries[at:at + RECALL_BATCH], k)
                   for at in range(0, len(queries), RECALL_BATCH)]
        return np.vstack([d for d, _ in answers]), np.vstack([f for _, f in answers])
    return search


def recall(search: Search, queries: np.ndarray, truth: np.ndarray,
           kth: np.ndarray | None = None, nprobe: int | None = None) -> float:
    """Share of the exact top-k found in the index's top-k. `kth`: each query's exact k-th
    distance, for binary codes, whose Hamming distances tie by the dozen (which of the tied rows
    makes the top k is arbitrary): a hit counts when its distance, exact in a binary index, is
    no farther than that."""
    if len(queries) == 0:
        return float("nan")
    distances, found = search(queries, truth.shape[1], nprobe)
    if kth is not None:
        return float(((distances <= kth[:, None]) & (found >= 0)).sum() / truth.size)
    hits = sum(len(set(t) & set(f)) for t, f in zip(truth.tolist(), found.tolist()))
    return hits / truth.size

def ivf_indexes(index: faiss.Index) -> list:
    """The IVF indexes whose nprobe governs a search: one, one per shard, or none."""
    if isinstance(index, faiss.IndexShards):
        return [faiss.extract_index_ivf(index.at(i)) for i in range(index.count())]
    ivf = ivf_of(index)
    return [] if ivf is None else [ivf]

def set_nprobe(index: faiss.Index, nprobe: int) -> None:
    for ivf in ivf_indexes(index):
        ivf.nprobe = nprobe

def training_error(index: faiss.Index, vectors: np.ndarray) -> float | None:
    """Mean squared L2 distance of the vectors to their nearest IVF centroid: how well the
    trained quantizer fits them (index/maintain.py compares added vectors with the training
    sample). None for an index without a coarse quantizer, or one behind a pre-transform."""
    ivf = ivf_of(index)
    if ivf is not None and is_binary(index) and len(vectors):  # mean Hamming distance
        distances, _ = ivf.quantizer.search(vectors, 1)
        return float(distances.mean())
    if ivf is None or len(vectors) == 0 or not isinstance(
            faiss.downcast_index(index), faiss.IndexIVF):
        return None
    _, nearest = ivf.quantizer.search(vectors, 1)
    centroids = ivf.quantizer.reconstruct_batch(nearest.ravel())
    return float(((vectors - centroids) ** 2).sum(1).mean())

def train_quantizer(index: faiss.Index, training: np.ndarray,
                    precision: Precision) -> float | None:
    """Train the index on the sample; returns training_error. An IVF-SQ8 index takes the
    folder's ranges, not its own (family.set_ranges)."""
    index.train(training)
    set_ranges(index, precision)
    return training_error(index, training)


def search_params(index: faiss.Index) -> dict:
    """The search-time knobs an index carries, as stored in index_infos.json."""
    params = {}
    hnsw = hnsw_of(index) if not isinstance(index, faiss.IndexShards) else None
    if hnsw is not None:
        params["efSearch"] = int(hnsw.efSearch)
    ivfs = ivf_indexes(index)
    if ivfs:
        params["nprobe"] = int(ivfs[0].nprobe)
    return params

def apply_search_params(index: faiss.Index, params: dict) -> None:
    hnsw = hnsw_of(index) if not isinstance(index, faiss.IndexShards) else None
    if "efSearch" in params and hnsw is not None:
        hnsw.efSearch = int(params["efSearch"])
    if "nprobe" in params:
        set_nprobe(index, int(params["nprobe"]))

def tune_nprobe(search: Search, nlist: int, queries: np.ndarray, truth: np.ndarray,
                kth: np.ndarray | None = None) -> int:
    """The smallest nprobe (1, 2, 4, ... nlist) reaching NPROBE_TARGET recall, else the best."""
    ladder = sorted({min(2 ** i, nlist) for i in range(nlist.bit_length() + 1)})
    best, best_recall = ladder[-1], -1.0
    for nprobe in ladder:
        got = recall(search, queries, truth, kth, nprobe)
        if got >= NPROBE_TARGET:
            return nprobe
        if got > best_recall + 0.005:  # stop paying for probes that buy no recall
            best, best_recall = nprobe, got
    return best

def measure(index: faiss.Index, parts: VectorParts, n: int, cfg: IndexConfig,
            truth: Truth | None = None, search: Search | None = None) -> tuple[float, dict, bool]:
    """recall@10 against exact search, the search parameters it was measured with (set on
    `index`), and whether the sampled vectors have unit length.

    Exact neighbours are computed once for two even samples of stored vectors (here, streaming
    every part, unless `truth` brings them): an unset nprobe is tuned on one, and the recall
    reported is measured on the other (disjoint when n >= 2000). `search`: how the index is
    searched where it is not held here (a sharded build's shards, searched where they lie;
    `index` is then their trained, empty index), else `index` itself.
    """
    k = min(10, n)
    search = search or index_search(index)
    positions, report, tune = query_sample(n, index)
    if truth is None:
        queries = parts.sample(positions)
        nearest, distances = exact_top_k(parts, queries, k, cfg.metric)
        truth = Truth(queries, parts.row_labels()[nearest], distances)
    queries, labels = truth.queries, truth.labels
    kth = truth.distances[:, -1] if is_binary(index) else None
    pick = (lambda rows: None) if kth is None else (lambda rows: kth[rows])
    ivfs = ivf_indexes(index)
    nprobe = None
    if ivfs:
        nlist = ivfs[0].nlist
        nprobe = min(nlist, cfg.nprobe or tune_nprobe(search, nlist, queries[tune],
                                                      labels[tune], pick(tune)))
        set_nprobe(index, nprobe)
    unit = bool(np.allclose(np.linalg.norm(queries, axis=1), 1.0, atol=1e-3))
    return (recall(search, queries[report], labels[report], pick(report), nprobe),
            search_params(index), unit)
