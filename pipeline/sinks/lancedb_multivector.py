"""LanceDB's multi-vector column for a multi-vector (ColBERT) folder's rows (sinks/multivector.py).

The table's `vector` column is `list<fixed_size_list<float32 | float16, dim>>`, the folder's
token vectors as stored (float16 stays float16); the load, deletes, marker and record are
LanceSink's. Search is LanceDB's multi-vector search with distance type cosine (the one its
documentation supports), flat (no index: every row scored, so exact): its distance is the sum
over query tokens of 1 - max cosine, so the score given is MaxSim = query tokens - distance,
which on unit-length tokens is embedpipe's MaxSim. A folder whose tokens are not of unit length
is refused before the table is made or touched.
"""
from __future__ import annotations

import itertools
from typing import Iterator

import numpy as np
import pyarrow as pa

from ..config import ConfigError
from .base import DIGEST_BYTES, Marker, SinkError, one_line
from .lancedb_sink import LanceSink
from .multivector import row_digests, unit_length_problem


class LanceMultiSink(LanceSink):
    """A LanceDB table of one row a text, its token vectors in a multi-vector column."""

    def _field(self, field: pa.Field) -> pa.Field:
        return field  # the parts' list<fixed_size_list<float32 | float16, dim>> as it is

    def load(self, schema: pa.Schema, blocks: Iterator[pa.Table], keep: pa.Table | None,
             marker: Marker) -> tuple[int, int]:
        """LanceSink's load, every block's tokens checked to be of unit length first: the first
        block before the table is made, the others as they stream (a failure aborts the merge:
        nothing committed)."""
        failed: list[Exception] = []

        def checked(block: pa.Table) -> pa.Table:
            why = unit_length_problem(block)
            if why:
                raise ValueError(why)
            return block

        def stream(rest: Iterator[pa.Table]) -> Iterator[pa.Table]:
            try:
                for block in rest:
                    yield checked(block)
            except Exception as exc:  # reading the parts or the check: reported as itself
                failed.append(exc)
                raise

        rest = stream(iter(blocks))
        try:
            first = next(rest, None)
            blocks = itertools.chain([first], rest) if first is not None else iter(())
            return super().load(schema, blocks, keep, marker)
        except Exception:
            if failed:  # the engine's error wraps ours in a traceback: ours, as one line
                raise SinkError(f'sink "{self.name}": {one_line(failed[0])}') from None
            raise

    def block_digests(self, block: pa.Table) -> pa.Array:
        return row_digests(block.column("vector"), DIGEST_BYTES)

    def row_digests(self, keys: list[str]) -> pa.Table:
        """Each row's digest over its token vectors as read back from the table."""
        rows = (self._table().search().select([*keys, "vector"]).limit(None).to_arrow()
                .combine_chunks())
        return pa.table({**{k: rows.column(k) for k in keys},
                         "digest": row_digests(rows.column("vector"), DIGEST_BYTES)})

    def search(self, queries: list[np.ndarray], k: int, columns: list[str]) -> list[pa.Table]:
        """Per query ([tokens, dim]) a table of id, score (MaxSim) and columns, best first."""
        table = self._table()
        if table is None:
            raise ConfigError(f'sink "{self.name}": {self.describe()} does not exist; run '
                              f"`embedpipe sync` on the folder")
        out = []
        for query in queries:
            query = np.ascontiguousarray(query, np.float32)
            hits = (table.search(query, vector_column_name="vector").distance_type("cosine")
                    .select(["id", *columns, "_distance"]).limit(k).to_arrow())
            score = len(query) - hits.column("_distance").to_numpy()
            out.append(pa.table({"id": hits.column("id"), "score": pa.array(score, pa.float32()),
                                 **{c: hits.column(c) for c in columns}}))
        return out
