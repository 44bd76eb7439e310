"""Search over a sparse (SPLADE) folder: the exact sparse dot product through an inverted index.

The inverted index is scipy's CSC matrix of the stored rows (a column a vocabulary entry: its
postings, the rows holding it), built when the folder is opened for search, from the parts: the
parts stay the one copy (nothing else to keep in step, verify or repair), and building it reads
each stored value once. A query's score for every row is the postings of its own dimensions
weighted by its values; the k best rows are exact (ties: the lower row first). Queries are
encoded by the folder's query side (encode_query: an inference-free folder's
SparseStaticEmbedding, else the MLM with the query prompt), under the recorded settings.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import scipy.sparse as sp

from ..config import ConfigError
from ..io.ledger import Ledger
from ..io.manifest import MANIFEST, read_manifest
from ..io.sparse_rows import read_sparse
from ..io.storage import Store
from ..io.vectors import VectorParts
from .query import EmbeddingRecord, TextEmbedder
from .search import Searcher


def is_sparse_folder(out: str) -> bool:
    """Whether OUT's parts hold sparse rows (sparse_indices) and no dense vectors."""
    store = Store(out)
    files = Ledger(store).vector_files() if store.exists(MANIFEST) else []
    names = VectorParts(store, files[:1]).metadata(files[0]).schema.to_arrow_schema().names \
        if files else []
    return "sparse_indices" in names and "vector" not in names


class SparseQueries(TextEmbedder):
    """Queries as the folder's encode_query makes them: CSR [queries, vocabulary]."""

    def _load(self):
        if self._loaded is None:
            st = self.source.st
            if st.sparse.query_static is not None:
                from ..encode.sparse import StaticQueries
                self._loaded = StaticQueries(st.sparse.query_static, self.prompt or "",
                                             self.job.encode.max_active_dims)
            else:
                from ..encode.sparse import SparseEncoder, SparseSettings
                from ..encode.tokenizer import tokenizer_for
                self._loaded = (tokenizer_for(self.source, self.runtime, self.job, self.prompt),
                                SparseEncoder(self.source, self.runtime,
                                              SparseSettings.for_job(self.job)))
        return self._loaded

    def embed(self, texts: list[str], pairs: list[str] | None = None) -> sp.csr_matrix:
        from ..encode.sparse import encode_sparse_texts

        loaded = self._load()
        if not isinstance(loaded, tuple):
            return loaded.encode(list(texts))
        enc = self.job.encode
        return encode_sparse_texts(loaded[0], loaded[1], list(texts),
                                   enc.token_budget(loaded[1].device.type), enc.max_batch_size)


class SparseSearcher(Searcher):
    """A sparse folder opened for search: the inverted index built from its parts."""

    def __init__(self, out: str, device: str | None = None):
        self.store = Store(out)
        manifest = read_manifest(self.store)
        self.record = EmbeddingRecord.from_manifest(manifest, f"{out}/{MANIFEST}")
        self.embedder = SparseQueries(self.record, device, purpose="query")
        ledger = Ledger(self.store)
        files = ledger.vector_files()
        parts = VectorParts(self.store, files)
        self.rows = read_sparse(parts)
        self.postings = self.rows.tocsc()  # the inverted index: a column's rows and values
        ids = [t.column("id") for t in parts.read(["id"])]
        self.ids = pa.chunked_array([c for col in ids for c in col.chunks]) if ids else \
            pa.chunked_array([], pa.string())
        self.chunks, self.collapse, self.rescore = None, False, None
        self.keep_columns = manifest.keep_columns
        self.part_files = files
        self.part_starts = np.cumsum([0] + parts.rows()).tolist()

    @property
    def metric(self) -> str:
        return "dot"

    def search_vectors(self, queries: sp.csr_matrix, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores, row positions) [queries, k] by the exact dot product; -1: fewer rows."""
        return sparse_top(self.postings, queries, k)


def sparse_top(postings: sp.csc_matrix, queries: sp.csr_matrix,
               k: int) -> tuple[np.ndarray, np.ndarray]:
    """(scores, row positions) [queries, k] of the rows' exact dot products with each query
    through the inverted index (postings: the rows as CSC); -1: fewer rows. Ties: lower row."""
    if queries.shape[1] != postings.shape[1]:
        raise ConfigError(f"the queries have {queries.shape[1]} dimensions, the folder's "
                          f"rows {postings.shape[1]}: not the folder's model")
    n = postings.shape[0]
    k = max(1, k)
    scores = np.full((queries.shape[0], k), np.nan, np.float32)
    positions = np.full((queries.shape[0], k), -1, np.int64)
    for q in range(queries.shape[0]):
        start, end = queries.indptr[q], queries.indptr[q + 1]
        terms, weights = queries.indices[start:end], queries.data[start:end]
        # the postings of the query's terms only, weighted: every row's exact dot product
        row_scores = np.asarray(postings[:, terms] @ weights.astype(np.float64)
                                ).ravel() if n else np.zeros(0)
        take = min(k, n)
        cand = np.arange(n)
        if take < n:  # every row scoring at least the k-th best (ties included), then sorted
            kth = np.partition(-row_scores, take - 1)[take - 1]
            cand = np.flatnonzero(-row_scores <= kth)
        order = cand[np.lexsort((cand, -row_scores[cand]))][:take]
        scores[q, :take], positions[q, :take] = row_scores[order], order
    return scores, positions
