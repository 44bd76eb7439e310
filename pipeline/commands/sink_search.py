"""`embedpipe search OUT QUERY --sink NAME`: the query embedded as OUT's run did, searched in
one of OUT's sinks (LanceDB, PostgreSQL/pgvector) instead of its FAISS index. Exact where the
sink has no ANN index (LanceDB; pgvector with index = "none"): then the ids are the FAISS flat
index's. A multi-vector folder's queries are its encode_query's token vectors, ranked by
LanceDB's multi-vector search (MaxSim: sinks/lancedb_multivector.py)."""
from __future__ import annotations

import logging

import numpy as np
import pyarrow as pa

from ..config import ConfigError
from ..io.ledger import Ledger
from ..io.manifest import MANIFEST, read_manifest
from ..io.storage import Store
from ..sinks.base import Marker, pending
from ..sinks.make import sinks_of
from ..sinks.multivector import MULTIVECTOR
from .query import EmbeddingRecord, TextEmbedder
from .search import Searcher
from .multivector_search import MultiVectorQueries
from .sparse_search import SparseQueries

log = logging.getLogger(__name__)


class SinkSearcher(Searcher):
    def __init__(self, out: str, sink: str, device: str | None = None, per_chunk: bool = False):
        self.store = Store(out)
        self.rescore = None  # the store ranks; rescoring re-ranks the FAISS index's candidates
        manifest = read_manifest(self.store)
        if (manifest.vector_settings or {}).get("output.chunks") == "rows" and not per_chunk:
            raise ConfigError(f"{out} holds one row a token window: a sink returns windows, not "
                              f"documents; give --per-chunk (or search the FAISS index, which "
                              f"collapses windows to documents)")
        self.record = EmbeddingRecord.from_manifest(manifest, f"{out}/{MANIFEST}")
        config = manifest.config or {}
        names = [s.get("name") for s in config.get("sink") or []]
        if sink not in names:
            raise ConfigError(f"{out} has no sink named {sink!r}; "
                              + (f"it has: {', '.join(names)}" if names else
                                 "its job names no [[sink]]"))
        self.sink = sinks_of(config, [sink])[0]
        sparse = self.sink.vector_type == "sparsevec"  # a SPLADE folder: its encode_query
        multi = self.sink.vector_type == MULTIVECTOR  # a ColBERT folder: its encode_query
        self.embedder = (SparseQueries if sparse else MultiVectorQueries if multi  # refuses
                         else TextEmbedder)(self.record, device, purpose="query")  # other settings
        self.sink.open()
        if self.sink.count() is None:
            raise ConfigError(f'sink "{sink}": {self.sink.describe()} does not exist; '
                              f"`embedpipe sync {out}` makes it")
        ledger = Ledger(self.store)
        Marker.of_folder(ledger, self.sink.vector_type).refuse_other(self.sink, self.sink.marker())
        for why in pending(ledger, self.sink):
            log.warning("%s; `embedpipe sync %s` brings it in step", why, out)
        self.infos = {"metric": "hamming" if self.sink.vector_type == "bit" else
                      "dot" if sparse else "maxsim" if multi else self.sink.metric}
        self.keep_columns = list(config.get("output", {}).get("keep_columns", []))

    def search(self, texts: list[str], k: int = 10, pairs: list[str] | None = None) -> pa.Table:
        vectors = self.embedder.embed(list(texts), pairs)
        tables = []
        for i, hits in enumerate(self.sink.search(vectors, k, self.keep_columns)):
            n = hits.num_rows
            tables.append(pa.table({"query": pa.array(np.full(n, i), pa.int64()),
                                    "rank": pa.array(np.arange(1, n + 1), pa.int32()),
                                    **{c: hits.column(c) for c in hits.column_names}}))
        return pa.concat_tables(tables, promote_options="default") if tables else pa.table({})

    def close(self) -> None:
        self.sink.close()
