"""Semantic search over an output folder: encode queries as the run did, search its FAISS index.

Loading reads the manifest, the index and its id map, never the stored vectors; kept columns
(e.g. the text) are read afterwards for the hits only, row group by row group.

Rescoring (`rescore`, `search --rescore N`): the compact index (binary, SQ8, IVF-PQ ...) gives
N x k candidates a query; their kept vectors (the parts' rescore_vector column, output.
rescore_precision, else the stored vectors) are read for those rows only, dequantized, and
scored against the float query with the job's metric; the best k are the hits.
"""
from __future__ import annotations

import bisect

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..config import ConfigError
from ..index.build import load_index
from ..index.family import query_values
from ..index.files import ids_file, read_tombstones
from ..index.live import LiveIndex
from ..io.checks import PAGE_CHECKSUMS, DamagedFile, reading
from ..io.ledger import Ledger
from ..io.manifest import MANIFEST, read_manifest
from ..io.precision import Precision, rescore_precision, stored_precision
from ..io.storage import Store
from ..io.vectors import VectorParts, to_matrix
from ..io.writer import ResultFile
from .query import EmbeddingRecord, TextEmbedder, read_text_batches

QUERY_BATCH = 1024  # queries embedded and searched together from a queries file
RESCORE_QUERIES = 64  # queries whose candidates' vectors are held at once while rescoring


class Searcher:
    """An output folder opened for search. The embedding settings are checked at open."""

    def __init__(self, out: str, device: str | None = None, per_chunk: bool = False,
                 rescore: int | None = None):
        """per_chunk: in a folder of one row a token window, every matching window is a hit
        (else the best window of each document). rescore: re-rank rescore x k candidates by
        the kept vectors (see above)."""
        self.store = Store(out)
        manifest = read_manifest(self.store)
        self.precision = stored_precision(manifest)
        self.rescore = rescore
        # the vectors candidates are rescored with: the rescore column, else the stored ones
        kept = rescore_precision(manifest)
        self.rescore_column = "vector" if kept is None else "rescore_vector"
        self.rescore_with: Precision = kept or self.precision
        self.record = EmbeddingRecord.from_manifest(manifest, f"{out}/{MANIFEST}")
        self.embedder = TextEmbedder(self.record, device, purpose="query")  # refuses other settings
        repair = f"`embedpipe index {out}` (or the job's next run) rebuilds the index"
        try:
            self.index, self.infos = load_index(self.store)
        except RuntimeError as exc:  # FAISS's reader on a truncated or overwritten file
            raise DamagedFile(f"{out}: its index file cannot be loaded "
                              f"({' '.join(str(exc).split())[:200]}); {repair}") from None
        rel = ids_file(self.infos)
        with reading(rel, repair), self.store.open_input(rel) as handle:
            id_map = pq.read_table(handle, **PAGE_CHECKSUMS)
        self.ids = id_map.column("id")
        # a folder of one row a window: the id map names each FAISS id's (id, chunk)
        self.chunks = id_map.column("chunk") if "chunk" in id_map.column_names else None
        self.collapse = self.chunks is not None and not per_chunk
        self._documents: np.ndarray | None = None  # a number per document, for collapsing
        tombstones = read_tombstones(self.store, self.infos)
        if len(self.ids) != self.index.ntotal - len(tombstones):
            raise ConfigError(f"{out}: the index holds {self.index.ntotal - len(tombstones)} "
                              f"vectors but its id map {len(self.ids)}; rebuild it with "
                              f"`embedpipe index {out}`")
        # hits come back as labels; the live index maps them to row positions
        self.live = LiveIndex(self.index, id_map.column("faiss_id").to_numpy(), tombstones)
        self.keep_columns = manifest.keep_columns
        if self.chunks is not None:  # where in its text each window lies
            self.keep_columns += ["char_start", "char_end"]
        parts = self.infos.get("parts")
        if parts is None:  # an index written before infos listed its parts
            files = Ledger(self.store).vector_files()
            parts = [{"file": f, "rows": r} for f, r in zip(files, VectorParts(self.store, files).rows())]
        self.part_files = [p["file"] for p in parts]
        self.part_starts = np.cumsum([0] + [p["rows"] for p in parts]).tolist()

    @property
    def metric(self) -> str:
        """What the scores are: ip, l2 (squared distance), or hamming (a binary index's)."""
        if self.rescore:  # the job's metric, on the float query and the kept vectors
            return (self.infos.get("config") or {}).get("metric") or "ip"
        return self.infos.get("metric", "ip")

    def search_vectors(self, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores, row positions), [queries, k]; a position of -1 means fewer than k found.
        Collapsing windows to documents, each document's best window, k documents."""
        vectors = np.ascontiguousarray(vectors, np.float32)
        if not self.collapse:
            return self._search_rows(vectors, max(1, min(k, self.live.count)))
        return self._best_windows(vectors, k)

    def _search_rows(self, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores, row positions) of the k best rows a query: the index's, or with rescoring,
        the best k of its rescore x k candidates by the kept vectors."""
        queries = query_values(self.precision, vectors)
        if not self.rescore:
            return self.live.search(queries, k)
        _, candidates = self.live.search(queries, min(k * self.rescore, self.live.count))
        return self.rescored(vectors, candidates, k)

    def rescored(self, vectors: np.ndarray, candidates: np.ndarray,
                 k: int) -> tuple[np.ndarray, np.ndarray]:
        """The k best of each query's candidate rows (-1: none) by the job's metric on the float
        query and the candidates' kept vectors, dequantized; ties keep the index's order."""
        found = np.unique(candidates[candidates >= 0])
        kept = self.read_rows(found, [self.rescore_column])[self.rescore_column]
        matrix = self.rescore_with.dequantize(to_matrix(kept), vectors.shape[1]) if len(found) \
            else np.zeros((0, vectors.shape[1]), np.float32)
        at = np.minimum(np.searchsorted(found, np.maximum(candidates, 0)), max(0, len(found) - 1))
        scores = np.zeros(candidates.shape, np.float32)
        for start in range(0, len(vectors) if len(found) else 0, RESCORE_QUERIES):
            block = slice(start, start + RESCORE_QUERIES)
            picked = matrix[at[block]]  # [queries, candidates, dim]
            query = vectors[block, None, :]
            scores[block] = ((picked - query) ** 2).sum(-1) if self.metric == "l2" \
                else (picked * query).sum(-1)
        # l2: squared distance, ascending as FAISS gives it; ip: descending
        order_key = np.where(candidates >= 0, scores if self.metric == "l2" else -scores, np.inf)
        order = np.argsort(order_key, axis=1, kind="stable")[:, :k]
        positions = np.take_along_axis(candidates, order, 1)
        return np.take_along_axis(scores, order, 1).astype(np.float32), positions

    def _best_windows(self, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The best window of each of the k best documents: windows are searched k x 4 at a
        time, more while some query has found fewer than k documents and windows remain."""
        if self._documents is None:  # once, not for every batch of queries
            ids = self.ids.combine_chunks() if isinstance(self.ids, pa.ChunkedArray) else self.ids
            self._documents = pc.dictionary_encode(ids).indices.to_numpy(zero_copy_only=False)
        doc = self._documents
        scores = np.full((len(vectors), k), np.nan, np.float32)
        positions = np.full((len(vectors), k), -1, np.int64)
        todo, fetch = np.arange(len(vectors)), k * 4
        while len(todo):
            fetch = min(fetch, self.live.count)
            found_scores, found = self._search_rows(vectors[todo], max(1, fetch))
            unfinished = []
            for q, row_scores, rows in zip(todo, found_scores, found):
                rows = rows[rows >= 0]
                _, first = np.unique(doc[rows], return_index=True)
                best = np.sort(first)[:k]  # rank order: the first window of each document
                scores[q, :len(best)], positions[q, :len(best)] = row_scores[best], rows[best]
                if len(best) < k and fetch < self.live.count:
                    unfinished.append(q)
            todo, fetch = np.array(unfinished, np.int64), fetch * 4
        return scores, positions

    def search(self, texts: list[str], k: int = 10, pairs: list[str] | None = None) -> pa.Table:
        """One row per hit: query (position in texts), rank (1-based), id, score, kept columns.
        pairs: the queries' second texts, for a folder of sentence-pair vectors."""
        scores, positions = self.search_vectors(self.embedder.embed(list(texts), pairs), k)
        found = positions >= 0
        query = np.repeat(np.arange(len(texts)), found.sum(1))
        rank = np.concatenate([np.arange(1, c + 1) for c in found.sum(1)]) if len(texts) else []
        rows = positions[found]
        table = pa.table({"query": pa.array(query, pa.int64()), "rank": pa.array(rank, pa.int32()),
                          "id": self.ids.take(pa.array(rows, pa.int64())),
                          "score": pa.array(scores[found], pa.float32())})
        if self.chunks is not None:  # the matching window
            table = table.append_column("chunk", self.chunks.take(pa.array(rows, pa.int64())))
        for name, column in self.kept(rows).items():
            table = table.append_column(name, column)
        return table

    def kept(self, rows: np.ndarray) -> dict[str, pa.Array]:
        """The kept columns of the given row positions, reading only the row groups they are in."""
        if not self.keep_columns or len(rows) == 0:
            return {}
        return self.read_rows(rows, self.keep_columns)

    def read_rows(self, rows: np.ndarray, columns: list[str]) -> dict[str, pa.Array]:
        """The columns' values at the given row positions (in that order), reading only the
        row groups they are in."""
        if len(rows) == 0:
            return {name: pa.array([]) for name in columns}
        pieces: list[tuple[np.ndarray, pa.Table]] = []  # (indices into rows, their values)
        part_of = np.array([bisect.bisect_right(self.part_starts, r) - 1 for r in rows])
        for part in np.unique(part_of):
            wanted = np.flatnonzero(part_of == part)
            local = rows[wanted] - self.part_starts[part]
            name = self.part_files[part]
            with reading(name), self.store.open_input(name) as handle:
                parquet = pq.ParquetFile(handle, **PAGE_CHECKSUMS)
                sizes = [parquet.metadata.row_group(g).num_rows
                         for g in range(parquet.metadata.num_row_groups)]
                starts = np.cumsum([0] + sizes)
                group_of = np.searchsorted(starts, local, side="right") - 1
                for group in np.unique(group_of):
                    inside = group_of == group
                    values = parquet.read_row_group(int(group), columns=columns)
                    pieces.append((wanted[inside],
                                   values.take(pa.array(local[inside] - starts[group]))))
        order = np.argsort(np.concatenate([w for w, _ in pieces]), kind="stable")
        merged = pa.concat_tables([t for _, t in pieces]).take(pa.array(order))
        return {name: merged.column(name).combine_chunks() for name in columns}

    def search_file(self, queries: str, out: str, k: int = 10, text_column: str | None = None,
                    id_column: str | None = None,
                    pair_column: str | None = None) -> tuple[int, int]:
        """Search every text of a Parquet file (or folder) in batches; write the hits to Parquet.
        Columns not given are those the folder's job read (`self.query_columns`).

        Output columns: query_id (the queries' id column, else the row number), query (the text),
        rank, id, score, kept columns. Returns (queries searched, null or blank texts skipped)."""
        done, skipped = 0, 0
        self.query_columns = self.record.columns(text_column, id_column, pair_column)
        with ResultFile(out, f"{queries}: no query texts found") as results:
            for batch in read_text_batches(queries, self.query_columns, QUERY_BATCH):
                skipped += batch.skipped
                if not batch.texts:
                    continue
                hits = self.search(batch.texts, k, batch.pairs)
                query = pa.array(hits.column("query").to_numpy())
                hits = hits.drop_columns(["query"]).add_column(0, "query_id", batch.ids.take(query))
                hits = hits.add_column(1, "query", pa.array(batch.texts, pa.string()).take(query))
                results.write(hits)
                done += len(batch.texts)
        return done, skipped


WINDOW_KEYS = ("chunk", "char_start", "char_end")


def render_hits(hits: list[dict], metric: str = "ip", width: int = 100) -> str:
    """rank, id, score and the first kept text column (cut to fit a line)."""
    if not hits:
        return "no hits"
    extra = [k for k in hits[0] if k not in ("rank", "id", "score", *WINDOW_KEYS)]
    text = "text" if "text" in extra else (extra[0] if extra else None)
    if "chunk" in hits[0]:  # a window of a document: id #chunk
        hits = [{**h, "id": f"{h['id']} #{h['chunk']}"} for h in hits]
    id_width = max(2, *(len(str(h["id"])) for h in hits))
    score = {"ip": "score", "l2": "l2 dist"}.get(metric, metric)
    lines = [f"{'rank':>4}  {'id':>{id_width}}  {score:>7}" + (f"  {text}" if text else "")]
    for h in hits:
        value = f"{h['score']:7.0f}" if metric == "hamming" else f"{h['score']:7.4f}"
        line = f"{h['rank']:>4}  {h['id']!s:>{id_width}}  {value}"
        if text:
            value = " ".join(str(h[text]).split())
            room = max(20, width - len(line) - 2)
            line += "  " + (value if len(value) <= room else value[:room - 1] + "…")
        lines.append(line)
    return "\n".join(lines)
