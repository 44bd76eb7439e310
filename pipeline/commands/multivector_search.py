"""Search over a multi-vector (ColBERT) folder: rows ranked by MaxSim (index/maxsim.py).

Every stored token vector is read from the multivectors/ parts when the folder is opened (one
float32 [tokens, dim] matrix and the row offsets). Up to EXACT_TOKENS stored tokens, every row
is scored exactly (brute force: one matrix product and a segmented max a block of rows). Past
it, candidates come from a FAISS token index built at open over every token vector (IVF-Flat,
inner product, nlist ~ sqrt(tokens); PLAID-style: each query token's K_TOKEN nearest tokens name their rows), and
the candidate rows are rescored exactly. `--maxsim exact | candidates` forces either path.
The token index is not stored: the parts stay the one copy (nothing to keep in step or verify).
Queries are encoded by the folder's query side (encode_query: query prompt, expansion).
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa

from ..config import ConfigError
from ..index.maxsim import TokenIndex, search_rows
from ..io.ledger import Ledger
from ..io.manifest import MANIFEST, read_manifest
from ..io.multivectors import MULTIVECTORS_DIR, stored_tokens
from ..io.storage import Store
from ..io.vectors import VectorParts
from .query import EmbeddingRecord, TextEmbedder
from .search import Searcher

EXACT_TOKENS = 1_000_000  # stored token vectors up to which search scores every row (auto)
K_TOKEN = 64  # nearest stored tokens a query token takes from the token index
MAXSIM_MODES = ("auto", "exact", "candidates")


def is_multivector_folder(out: str) -> bool:
    """Whether OUT's units keep their token vectors in multivectors/ parts."""
    store = Store(out)
    return store.exists(MANIFEST) and any(
        r.multivector_files for r in Ledger(store).complete_units())


class MultiVectorQueries(TextEmbedder):
    """Queries as the folder's encode_query makes them: one [tokens, dim] array each."""

    def _load(self):
        if self._loaded is None:
            from ..encode.multivector import QueryEncoder
            self._loaded = QueryEncoder(self.source, self.runtime, self.source.st.multivector,
                                        self.prompt or "")
        return self._loaded

    def embed(self, texts: list[str], pairs: list[str] | None = None) -> list[np.ndarray]:
        return self._load().encode(list(texts))


class MultiVectorSearcher(Searcher):
    """A multi-vector folder opened for search: its token vectors in memory."""

    def __init__(self, out: str, device: str | None = None, mode: str = "auto",
                 index_kind: str = "ivf"):
        if mode not in MAXSIM_MODES:
            raise ConfigError(f"--maxsim {mode!r}: one of {', '.join(MAXSIM_MODES)}")
        self.store = Store(out)
        manifest = read_manifest(self.store)
        self.record = EmbeddingRecord.from_manifest(manifest, f"{out}/{MANIFEST}")
        self.embedder = MultiVectorQueries(self.record, device, purpose="query")
        ledger = Ledger(self.store)
        files = ledger.vector_files()
        parts = VectorParts(self.store, files)
        self.tokens, self.offsets = stored_tokens(self.store, ledger.multivector_files())
        ids = [t.column("id") for t in parts.read(["id"])]
        self.ids = pa.chunked_array([c for col in ids for c in col.chunks]) if ids else \
            pa.chunked_array([], pa.string())
        if len(self.ids) != len(self.offsets) - 1:
            raise ConfigError(f"{out}: {len(self.ids)} rows but {len(self.offsets) - 1} in "
                              f"{MULTIVECTORS_DIR}/; run `embedpipe verify {out}`")
        self.chunks, self.collapse, self.rescore = None, False, None
        self.keep_columns = manifest.keep_columns
        self.part_files = files
        self.part_starts = np.cumsum([0] + parts.rows()).tolist()
        use_index = mode == "candidates" or (mode == "auto" and len(self.tokens) > EXACT_TOKENS)
        self.token_index = TokenIndex.build(self.tokens, self.offsets, index_kind) \
            if use_index and len(self.tokens) else None

    @property
    def metric(self) -> str:
        return "maxsim"

    def search_vectors(self, queries: list[np.ndarray], k: int
                       ) -> tuple[np.ndarray, np.ndarray]:
        """(scores, row positions) [queries, k] by MaxSim; -1: fewer rows."""
        k = max(1, k)
        scores = np.full((len(queries), k), np.nan, np.float32)
        positions = np.full((len(queries), k), -1, np.int64)
        for q, query in enumerate(queries):
            if query.shape[1] != self.tokens.shape[1] and len(self.tokens):
                raise ConfigError(f"the query's token vectors have {query.shape[1]} dimensions, "
                                  f"the folder's {self.tokens.shape[1]}: not the folder's model")
            rows, found = search_rows(query, self.tokens, self.offsets, k, self.token_index,
                                      K_TOKEN)
            scores[q, :len(rows)], positions[q, :len(rows)] = found, rows
        return scores, positions
