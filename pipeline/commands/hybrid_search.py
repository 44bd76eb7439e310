"""`search --hybrid`: reciprocal-rank fusion of each stored representation's ranking.

A folder storing two or more representations (a BGE-M3 folder: dense, sparse, multivector;
docs/multi-representation.md) ranks the rows once per representation, each by its own exact
or indexed score: dense through the folder's FAISS index (exact dot product over the stored
vectors where it keeps none), sparse by the exact dot product through the inverted index
(sparse_search.py), multivector by exact MaxSim (index/maxsim.py). The queries are encoded
once, every head from one forward. Each ranking's first `depth` rows (max(k, RRF_DEPTH)) take
1 / (rrf_k + rank), rank from 1; a row's fused score is the sum over the rankings it is in;
the k best fused rows are the hits (ties: the lower row)."""
from __future__ import annotations

import numpy as np
import pyarrow as pa

from ..config import ConfigError
from ..index.files import INFOS_FILE
from ..index.maxsim import maxsim_scores, top_rows
from ..io.ledger import Ledger
from ..io.manifest import MANIFEST, read_manifest
from ..io.multivectors import stored_tokens
from ..io.output import open_output
from ..io.storage import Store
from ..io.vectors import VectorParts
from .query import EmbeddingRecord, TextEmbedder
from .search import Searcher
from .sparse_search import sparse_top

RRF_K = 60  # Cormack et al.'s constant, the common default
RRF_DEPTH = 100  # rows of each ranking fused, at least (k when larger)


class M3Queries(TextEmbedder):
    """Queries through a BGE-M3 folder's heads, as its rows were made: M3Rows, one forward."""

    def embed(self, texts: list[str], pairs: list[str] | None = None):
        from ..encode.m3_heads import M3Encoder, encode_m3_texts
        from ..encode.tokenizer import tokenizer_for

        if self._loaded is None:
            self._loaded = (tokenizer_for(self.source, self.runtime, self.job, self.prompt),
                            M3Encoder(self.source, self.runtime,
                                      self.job.output.representations or ("dense",)))
        enc = self.job.encode
        tokenizer, encoder = self._loaded
        return encode_m3_texts(tokenizer, encoder, list(texts),
                               enc.token_budget(encoder.device.type), enc.max_batch_size)


def rrf_fuse(rankings: list[np.ndarray], k: int, rrf_k: int = RRF_K
             ) -> tuple[np.ndarray, np.ndarray]:
    """(fused scores, rows) of the k best rows over rankings (each a 1-d array of row positions,
    best first, -1 ignored): sum of 1 / (rrf_k + rank); ties to the lower row."""
    scores: dict[int, float] = {}
    for ranking in rankings:
        for rank, row in enumerate(ranking.tolist(), start=1):
            if row >= 0:
                scores[row] = scores.get(row, 0.0) + 1.0 / (rrf_k + rank)
    rows = np.fromiter(scores, np.int64, count=len(scores))
    values = np.fromiter(scores.values(), np.float64, count=len(scores))
    order = np.lexsort((rows, -values))[:k]
    return values[order], rows[order]


class HybridSearcher(Searcher):
    """A BGE-M3 folder opened for search over its stored representations: fused (RRF) when
    `fuse`, else ranked by its one stored representation's own score."""

    def __init__(self, out: str, device: str | None = None, rrf_k: int = RRF_K,
                 fuse: bool = True):
        self.store = Store(out)
        folder = open_output(out)
        self.representations = folder.representations
        if fuse and len(self.representations) < 2:
            raise ConfigError(f"--hybrid fuses two or more representations; {out} stores "
                              f"{self.representations[0] if self.representations else 'none'} "
                              f"only: search it without --hybrid")
        manifest = read_manifest(self.store)
        self.record = EmbeddingRecord.from_manifest(manifest, f"{out}/{MANIFEST}")
        self.embedder = M3Queries(self.record, device, purpose="query")
        self.rrf_k, self.fuse = rrf_k, fuse
        ledger = Ledger(self.store)
        files = ledger.vector_files()
        parts = VectorParts(self.store, files)
        self.part_files, self.part_starts = files, np.cumsum([0] + parts.rows()).tolist()
        ids = [c for t in parts.read(["id"]) for c in t.column("id").chunks]
        self.ids = pa.chunked_array(ids) if ids else pa.chunked_array([], pa.string())
        self.chunks, self.collapse, self.rescore = None, False, None
        self.keep_columns = manifest.keep_columns
        self.dense_index = self.dense_rows = self.postings = self.tokens = None
        if "dense" in self.representations:
            if self.store.exists(INFOS_FILE):
                self.dense_index = Searcher(out, device)  # the folder's FAISS index
            else:
                self.dense_rows = folder.vectors()  # exact, where no index was built
        if "sparse" in self.representations:
            self.postings = folder.sparse().tocsc()
        if "multivector" in self.representations:
            self.tokens = stored_tokens(self.store, ledger.multivector_files())

    @property
    def metric(self) -> str:
        if self.fuse:
            return "rrf"
        return {"dense": "ip", "sparse": "dot", "multivector": "maxsim"}[self.representations[0]]

    def rankings(self, queries, depth: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """Each stored representation's (scores, row positions) [queries, depth], best first,
        in the order dense, sparse, multivector (-1: fewer rows)."""
        n = self.part_starts[-1]
        depth = max(1, min(depth, n))
        out = []
        if self.dense_index is not None:
            out.append(self.dense_index.search_vectors(queries.dense, depth))
        elif self.dense_rows is not None:
            out.append(_exact([queries.dense @ self.dense_rows.T], depth))
        if self.postings is not None:
            out.append(sparse_top(self.postings, queries.sparse, depth))
        if self.tokens is not None:
            tokens, offsets = self.tokens
            out.append(_exact([maxsim_scores(q, tokens, offsets) for q in queries.multivectors],
                              depth))
        return out

    def search_vectors(self, queries, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores, row positions) [queries, k]; -1: fewer rows. Fused: the RRF scores."""
        if not self.fuse:
            return self.rankings(queries, k)[0]
        rankings = [positions for _, positions in self.rankings(queries, max(k, RRF_DEPTH))]
        count = len(rankings[0]) if rankings else 0
        scores = np.full((count, k), np.nan, np.float32)
        positions = np.full((count, k), -1, np.int64)
        for q in range(count):
            fused, rows = rrf_fuse([r[q] for r in rankings], k, self.rrf_k)
            scores[q, :len(rows)], positions[q, :len(rows)] = fused, rows
        return scores, positions


def _exact(scores: list[np.ndarray], depth: int) -> tuple[np.ndarray, np.ndarray]:
    """Every row's scores a query -> (scores, rows) [queries, depth], ties to the lower row."""
    rows = np.stack([top_rows(s, depth) for s in scores]) if scores else \
        np.zeros((0, depth), np.int64)
    return np.stack([s[r] for s, r in zip(scores, rows)]).astype(np.float32) if scores else \
        np.zeros((0, depth), np.float32), rows


def m3_representations(out: str) -> tuple[str, ...] | None:
    """A BGE-M3 folder's recorded output.representations (beyond dense alone), else None."""
    store = Store(out)
    if not store.exists(MANIFEST):
        return None
    recorded = (read_manifest(store).vector_settings or {}).get("output.representations")
    return tuple(recorded) if recorded else None


def without_dense(out: str, other_options: bool) -> HybridSearcher:
    """A BGE-M3 folder without dense vectors searched without --hybrid: its one stored
    representation's own ranking; two or more need --hybrid."""
    if other_options:
        raise ConfigError(f"{out} stores no dense vectors: --sink, --rescore and --per-chunk "
                          f"do not apply")
    searcher = HybridSearcher(out, fuse=False)
    if len(searcher.representations) > 1:
        raise ConfigError(f"{out} stores {', '.join(searcher.representations)} and no dense "
                          f"vectors: search it with --hybrid")
    return searcher
