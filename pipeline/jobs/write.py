"""The write stage: each window's encoded rows put back in input order and written to the
unit's parts; a unit is committed (on_unit_done) once its parts are in place."""
from __future__ import annotations

import time
from collections import Counter
from typing import Callable

import numpy as np
import pyarrow as pa

from ..encode.chunking import pool_windows
from ..encode.token_output import gather
from ..faults import checkpoint
from ..io.checks import check_file
from ..io.manifest import UnitCounts, UnitRecord
from ..io.multivectors import (MULTIVECTOR_COLUMN, MULTIVECTORS_DIR, ROW_KEY,
                               multivector_array)
from ..io.precision import Precision
from ..io.vectors import LABEL_COLUMN
from ..io.writer import NEW_LABEL, TOKENS_DIR, UnitWriter, write_rejects
from .messages import DONE, Channel, Encoded, Stats, UnitEnd, UnitFailed, UnitStart, Window
from .reuse import Assemble, HeldRows, merge_rows


class WriteStage:
    """Puts each window back in input order, writes parts, commits units through on_unit_done."""

    def __init__(self, store, schema: pa.Schema, rows_per_file: int,
                 precision: Precision, stats: Stats, on_unit_done: Callable[[UnitRecord], None],
                 progress: Callable[[int], None], normalize: bool = False,
                 token_schema: pa.Schema | None = None, token_mean: bool = False,
                 rescore: Precision | None = None,
                 sparse: bool = False, multivectors: pa.Schema | None = None,
                 multi_head: bool = False):
        """normalize: L2-normalise texts' pooled windows (long_text = "chunk", chunks = "pool");
        token_schema: the token table's (output.granularity = subword | word), whose rows are
        their sub-tokens' mean when token_mean (word_pooling = "mean"); precision: what a
        window's vectors become before they are written or held (reused rows are stored values
        already, so encoded, reused and copied rows merge alike); rescore: the precision of a
        second copy kept as rescore_vector (output.rescore_precision); sparse: the encoder sends
        CSR rows (a SPLADE folder), written as sparse_indices / sparse_values; multivectors: the
        multivectors/ parts' schema (a multi-vector folder: the encoder sends each row's token
        vectors, written there beside the vector part's row: io/multivectors.py); multi_head:
        the encoder sends M3Rows (a BGE-M3 folder's representations: encode/m3_heads.py)."""
        self.sparse, self.multivectors, self.multi_head = sparse, multivectors, multi_head
        self.mv_writer: UnitWriter | None = None
        self.token_schema, self.token_mean = token_schema, token_mean
        self.store, self.schema = store, schema
        self.rows_per_file, self.precision, self.rescore = rows_per_file, precision, rescore
        self.vector_dtype = precision.storage
        self.stats, self.on_unit_done, self.progress = stats, on_unit_done, progress
        self.normalize = normalize
        self.window_rows = "chunk" in schema.names  # one row a token window, not a text
        self.labels = LABEL_COLUMN in schema.names
        self.held: list[HeldRows] = []  # encoded rows waiting for their window's Assemble
        # the unit being written: its parts' writers, counts and rejects so far
        self.unit_id = -1
        self.unit_rows = 0  # the unit's vector rows written so far
        self.writer: UnitWriter | None = None
        self.token_writer: UnitWriter | None = None
        self.counts, self.rejects = UnitCounts(), []
        # the window being filled: its vectors (and per-token vectors) as its batches come in
        self.window: Window | None = None
        self.vectors: np.ndarray | None = None
        self.token_states: list[np.ndarray | None] | None = None
        self.filled = 0  # its batches in

    def run(self, inbox: Channel) -> None:
        handlers = {UnitStart: self._start, Window: self._window, Assemble: self._assemble,
                    Encoded: self._encoded, UnitEnd: self._end, UnitFailed: self._failed}
        try:
            while (item := inbox.get()) is not DONE:
                tick = time.perf_counter()
                handlers[type(item)](item)
                if self.window is not None and self.filled == self.window.n_batches:
                    self._window_done()
                self.stats.seconds["write"] += time.perf_counter() - tick
        finally:  # a stopped run's open parts are let go here, while their files are still open
            self.writer = self.token_writer = self.window = self.vectors = None
            self.mv_writer = None

    def _start(self, item: UnitStart) -> None:
        self.unit_id = item.unit_id
        self.writer = UnitWriter(self.store, item.unit_id, self.schema, self.rows_per_file,
                                 self.vector_dtype)
        if self.token_schema is not None:
            self.token_writer = UnitWriter(self.store, item.unit_id, self.token_schema,
                                           self.rows_per_file, self.vector_dtype, TOKENS_DIR)
        if self.multivectors is not None:
            self.mv_writer = UnitWriter(self.store, item.unit_id, self.multivectors,
                                        self.rows_per_file, self.vector_dtype, MULTIVECTORS_DIR)
        self.counts, self.rejects = UnitCounts(), []
        self.unit_rows = 0

    def _window(self, item: Window) -> None:
        self.window, self.filled, self.vectors = item, 0, None
        self.token_states = None if item.tokens is None else [None] * item.n_vectors
        self.rejects.append(item.rejects)

    def _encoded(self, item: Encoded) -> None:
        if self.sparse or self.multi_head or self.multivectors is not None:
            self.vectors = (self.vectors or []) + [(item.positions, item.vectors)]
            self.filled += 1
            return
        if self.vectors is None:
            self.vectors = np.empty((self.window.n_vectors, item.vectors.shape[1]), np.float32)
        self.vectors[item.positions] = item.vectors
        if self.token_states is not None:
            for position, states in zip(item.positions.tolist(), item.tokens):
                self.token_states[position] = states
        self.filled += 1

    def _end(self, item: UnitEnd) -> None:
        if self.held:
            raise RuntimeError("internal: encoded rows left without their Assemble")
        files = self.writer.close()
        token_files = self.token_writer.close() if self.token_writer is not None else []
        mv_files = self.mv_writer.close() if self.mv_writer is not None else []
        reject_table = pa.concat_tables(self.rejects) if self.rejects else None
        reject_files = write_rejects(self.store, self.unit_id, reject_table) if reject_table else []
        reasons = Counter(reject_table.column("reason").to_pylist()) if reject_table else {}
        counts = self.counts + UnitCounts(rows_in=item.rows_in, rejects=sum(reasons.values()),
                                          reject_reasons=dict(reasons))
        self.on_unit_done(UnitRecord.for_unit(
            item.unit, "complete", unit_id=self.unit_id, counts=counts,
            window_rows=self.window_rows, vector_files=files, reject_files=reject_files,
            token_files=token_files, multivector_files=mv_files, seconds=round(item.seconds, 3),
            checks={f: check_file(self.store, f, full=True)
                    for f in files + reject_files + token_files + mv_files}))
        self.writer = self.token_writer = self.mv_writer = None

    def _failed(self, item: UnitFailed) -> None:
        for open_writer in (self.writer, self.token_writer, self.mv_writer):
            if open_writer is not None:
                open_writer.abort()
        self.writer = self.token_writer = self.mv_writer = None
        self.held = []
        self.on_unit_done(UnitRecord.for_unit(item.unit, "failed", error=item.error,
                                              counts=UnitCounts(rows_in=item.rows_in)))

    def _window_done(self) -> None:
        """The window's rows all encoded: written (or held for its Assemble), then its
        token-table rows, before the next window's."""
        self._write_window(self.window, self.vectors)
        if self.token_writer is not None:
            self._write_tokens(self.token_writer, self.window, self.token_states)
        self.window = self.token_states = None

    def _write_window(self, window: Window, vectors: np.ndarray | None) -> None:
        n, windows = len(window.ids), window.windows
        if not n:  # every text of the window rejected, or taken from stored rows
            self.progress(window.rejects.num_rows)
            return
        if self.multi_head:
            rows = {**head_rows(vectors, n), "n_tokens": window.n_tokens,
                    "truncated": window.truncated}
        elif self.sparse:
            rows = {**sparse_rows(vectors, n), "n_tokens": window.n_tokens,
                    "truncated": window.truncated}
        elif self.multivectors is not None:
            rows = {ROW_KEY: by_position(vectors, n), "n_tokens": window.n_tokens,
                    "truncated": window.truncated}
        elif windows is None:
            rows = {"vector": vectors, "n_tokens": window.n_tokens, "truncated": window.truncated}
        elif not self.window_rows:  # one row a text: its windows pooled
            rows = {"vector": pool_windows(vectors, windows.owner, windows.weights, self.normalize),
                    "n_tokens": window.n_tokens, "truncated": window.truncated,
                    "n_chunks": windows.n_chunks}
        else:  # one row a window
            rows = {"vector": vectors, "n_tokens": windows.weights.astype(np.int32),
                    "truncated": window.truncated[windows.owner], "chunk": windows.chunk,
                    "token_start": windows.token_start, "token_end": windows.token_end,
                    "char_start": windows.char_start, "char_end": windows.char_end}
        if self.rescore is not None:  # from the float vectors, before they are quantized
            rows["rescore_vector"] = self.rescore.store(rows["vector"])
        if self.precision.quantized:
            rows["vector"] = self.precision.store(rows["vector"])
        owner = pa.array(windows.owner, pa.int64()) if self.window_rows else None
        ids = window.ids.take(owner) if self.window_rows else window.ids
        rows["text_hash"] = window.text_hash.take(owner) if self.window_rows else window.text_hash
        if self.labels:
            rows[LABEL_COLUMN] = np.full(len(ids), NEW_LABEL, np.int64)
        if window.rows_at is not None:  # written with the window's reused rows
            if len(ids):  # each row's text, among the sort window's good texts
                self.held.append(HeldRows(window.rows_at[windows.owner] if self.window_rows
                                          else window.rows_at, rows))
        elif len(ids):
            self._write(ids, rows, window.keep)
        self.counts += UnitCounts(
            vectors=n, rows=len(ids), truncated=int(window.truncated.sum()),
            windows=0 if windows is None else len(windows.ids),
            chunked=0 if windows is None else int((windows.n_chunks > 1).sum()))
        self.progress(n + window.rejects.num_rows)

    def _assemble(self, plan: Assemble) -> None:
        """A sort window's encoded rows (held) with its reused and copied rows, in input order."""
        ids, rows, keep, skipped = merge_rows(self.held, plan)
        self.held = []
        if len(ids):
            self._write(ids, rows, keep)
        checkpoint("reuse")  # reused rows written into the unit's open part
        self.counts += UnitCounts(vectors=skipped.texts, rows=skipped.rows,
                                  truncated=skipped.truncated, chunked=skipped.chunked,
                                  reused=skipped.reused, copied=skipped.texts - skipped.reused)
        self.progress(skipped.texts)

    def _write(self, ids: pa.Array, rows: dict, keep: pa.Table | None) -> None:
        """Rows into the unit's parts; a row without a label gets (unit_id << 32) | its row in
        the unit. Every unit to embed has a number no stored label carries (io/ledger.py:
        unit_id), and a kept label travels only with its own id, so no two live rows share one."""
        if self.labels:
            labels = np.array(rows[LABEL_COLUMN], np.int64)
            new = np.flatnonzero(labels == NEW_LABEL)
            labels[new] = (self.unit_id << 32) | (self.unit_rows + new)
            rows = {**rows, LABEL_COLUMN: labels}
        if self.mv_writer is not None:
            token_vectors = rows[ROW_KEY]
            rows = {c: v for c, v in rows.items() if c != ROW_KEY}
            dim = self.multivectors.field(MULTIVECTOR_COLUMN).type.value_type.list_size
            self.mv_writer.write(ids, {LABEL_COLUMN: rows[LABEL_COLUMN], MULTIVECTOR_COLUMN:
                                       multivector_array(token_vectors, dim, self.vector_dtype)})
        self.writer.write(ids, rows, keep)
        self.unit_rows += len(ids)

    def _write_tokens(self, writer: UnitWriter, window: Window, states: list[np.ndarray]) -> None:
        """The window's token-table rows, in input order, written before the next window's."""
        rows = window.tokens
        if not len(rows):
            return
        columns = {"vector": gather(states, rows, self.token_mean), "position": rows.position,
                   "token": rows.token, "char_start": rows.char_start, "char_end": rows.char_end}
        writer.write(window.ids.take(pa.array(rows.owner, pa.int64())), columns)
        self.counts += UnitCounts(token_rows=len(rows))


def sparse_rows(batches: list | None, n: int) -> dict[str, np.ndarray]:
    """A window's CSR batches (positions, rows) as its rows' sparse_indices / sparse_values, in
    window order: object arrays of one 1-d array a row, as reused rows come."""
    indices, values = np.empty(n, object), np.empty(n, object)
    for positions, csr in batches or ():
        for row, position in enumerate(positions.tolist()):
            start, end = csr.indptr[row], csr.indptr[row + 1]
            indices[position] = csr.indices[start:end].astype(np.int32)
            values[position] = csr.data[start:end].astype(np.float32)
    return {"sparse_indices": indices, "sparse_values": values}


def head_rows(batches: list | None, n: int) -> dict[str, np.ndarray]:
    """A window's M3Rows batches (positions, rows) as its rows' columns, in window order: the
    dense vector, sparse_indices / sparse_values, the token vectors (each where asked)."""
    batches = batches or []
    rows: dict = {}
    first = batches[0][1] if batches else None
    if first is not None and first.dense is not None:
        rows["vector"] = np.empty((n, first.dense.shape[1]), np.float32)
        for positions, got in batches:
            rows["vector"][positions] = got.dense
    if first is not None and first.sparse is not None:
        rows.update(sparse_rows([(p, got.sparse) for p, got in batches], n))
    if first is not None and first.multivectors is not None:
        rows[ROW_KEY] = by_position([(p, got.multivectors) for p, got in batches], n)
    return rows


def by_position(batches: list | None, n: int) -> np.ndarray:
    """A window's multi-vector batches (positions, one array a row) as an object array of its
    rows' [tokens, dim] arrays, in window order, as reused rows come."""
    rows = np.empty(n, object)
    for positions, arrays in batches or ():
        for position, array in zip(positions.tolist(), arrays):
            rows[position] = array
    return rows
