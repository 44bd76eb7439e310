"""The LanceDB sink: an embedded columnar store, local or on an object store.

Rows go in as Arrow record batches through one `merge_insert` on id (update matched, insert
new), streamed from the parts; ids not in the folder go by `delete("id IN (...)")` in chunks.
Each is one LanceDB commit (a new table version); the table's schema metadata carries the
marker. A crash between the two leaves a row count the record does not have, so the rerun
does a full sync. The vector column follows the folder's precision (sinks/precision.py):
float32 or float16 values, or for the binary kinds their packed bits as uint8, searched by
hamming distance.
"""
from __future__ import annotations

import itertools
from typing import Iterator

import numpy as np
import pyarrow as pa

from ..config import ConfigError, SinkConfig
from ..faults import checkpoint
from ..io.vectors import to_matrix
from .base import Marker, Sink, SinkError, key_columns, key_tuples, one_line, vector_digests
from .precision import BITS, codes_block, from_codes, query_codes

MARKER_KEY = b"embedpipe"
DELETE_CHUNK = 2000  # ids per delete predicate


def _import_lancedb(name: str):
    try:
        import lancedb
    except ImportError as exc:
        raise ConfigError(f'sink "{name}": LanceDB is not installed ({one_line(exc)}): '
                          f"pip install 'embedpipe[lancedb]'") from None
    return lancedb


def _literal(value) -> str:
    if isinstance(value, str):
        return "'" + value.replace("'", "''") + "'"
    return str(int(value))


class LanceSink(Sink):
    kind = "lancedb"

    def __init__(self, cfg: SinkConfig, metric: str = "ip", index_cfg=None,
                 precision: str = "float32"):
        super().__init__(cfg, metric, index_cfg, precision)
        self.lancedb = _import_lancedb(cfg.name)
        self.db = None

    def describe(self) -> str:
        return f"LanceDB table {self.cfg.table} in {self.cfg.uri}"

    def target(self) -> str:
        return f"lancedb:{self.cfg.uri}#{self.cfg.table}"

    def open(self) -> None:
        try:
            self.db = self.lancedb.connect(self.cfg.uri)
        except Exception as exc:  # the engine's errors have no common base
            raise ConfigError(f'sink "{self.name}": cannot open LanceDB at {self.cfg.uri}: '
                              f"{one_line(exc)}") from None

    def _table(self):
        try:
            return self.db.open_table(self.cfg.table)
        except ValueError as exc:
            if "not found" in str(exc) or "does not exist" in str(exc):
                return None
            raise SinkError(f'sink "{self.name}": {one_line(exc)}') from None

    def marker(self) -> str | None:
        table = self._table()
        if table is None:
            return None
        value = (table.schema.metadata or {}).get(MARKER_KEY)
        return value.decode() if value else None

    def count(self) -> int | None:
        table = self._table()
        return None if table is None else table.count_rows()

    def _create(self, schema: pa.Schema, marker: Marker):
        schema = pa.schema([self._field(f) for f in schema]).with_metadata(
            {MARKER_KEY: marker.to_json().encode()})
        return self.db.create_table(self.cfg.table, schema=schema)

    def _field(self, field: pa.Field) -> pa.Field:
        """The vector column at the folder's precision: float32, float16, or packed bits as
        uint8 (a table made before float16 was kept holds float32: exactly the same values)."""
        if field.name == "vector":
            value = {"float16": pa.float16()}.get(self.precision, pa.float32())
            return pa.field("vector", pa.list_(pa.uint8() if self.precision in BITS else value,
                                               field.type.list_size))
        return field

    def load(self, schema: pa.Schema, blocks: Iterator[pa.Table], keep: pa.Table | None,
             marker: Marker) -> tuple[int, int]:
        table = self._table()
        if table is None:
            if not len(schema):
                return 0, 0
            table = self._create(schema, marker)
        target = table.schema
        counted = [0]

        def batches() -> Iterator[pa.RecordBatch]:
            for i, block in enumerate(blocks):
                block = codes_block(block.select(target.names), self.precision)
                block = block.cast(target.remove_metadata())
                counted[0] += block.num_rows
                for batch in block.to_batches():
                    yield batch
                if i == 0:
                    checkpoint("sink-merge")  # the merge has begun, nothing committed yet

        batches_left = batches()
        try:
            first = next(batches_left, None)
            if first is not None:
                stream = itertools.chain([first], batches_left)
                reader = pa.RecordBatchReader.from_batches(target.remove_metadata(), stream)
                (table.merge_insert(key_columns(target)).when_matched_update_all()
                 .when_not_matched_insert_all().execute(reader))
            deleted = self._delete_absent(table, keep) if keep is not None else 0
        except (OSError, RuntimeError, ValueError) as exc:
            raise SinkError(f'sink "{self.name}": {self.describe()}: {one_line(exc)}') from None
        return counted[0], deleted

    def _keys(self, table) -> pa.Table:
        keys = key_columns(table.schema)
        return table.search().select(keys).limit(None).to_arrow().select(keys).combine_chunks()

    @staticmethod
    def _absent(left: pa.Table, right: pa.Table) -> pa.Table:
        """Rows of left whose key is not in right."""
        keys = left.column_names
        right = right.select(keys).cast(left.schema)
        return left.join(right, keys, join_type="left anti")

    def _predicates(self, keys: pa.Table) -> Iterator[str]:
        """Filters matching exactly the given keys, a few thousand at a time."""
        if keys.num_columns == 1:
            values = keys.column(0).to_pylist()
            for start in range(0, len(values), DELETE_CHUNK):
                yield f"id IN ({', '.join(map(_literal, values[start:start + DELETE_CHUNK]))})"
            return
        by_id: dict = {}
        for key, chunk in key_tuples(keys):
            by_id.setdefault(key, []).append(chunk)
        items = list(by_id.items())
        for start in range(0, len(items), DELETE_CHUNK // 4):
            yield " OR ".join(f"(id = {_literal(k)} AND chunk IN ({', '.join(map(str, c))}))"
                              for k, c in items[start:start + DELETE_CHUNK // 4])

    def _delete_absent(self, table, keep: pa.Table) -> int:
        absent = self._absent(self._keys(table), keep)
        for predicate in self._predicates(absent):
            table.delete(predicate)
        return absent.num_rows

    def id_difference(self, keys: pa.Table) -> tuple[int, int, list]:
        held = self._keys(self._table())
        keys = keys.select(held.column_names)
        missing, extra = self._absent(keys, held), self._absent(held, keys)
        return (missing.num_rows, extra.num_rows,
                key_tuples(missing.slice(0, 5)) + key_tuples(extra.slice(0, 5)))

    def vectors_of(self, keys: list[tuple]) -> dict:
        table = self._table()
        names = key_columns(table.schema)
        wanted = pa.table({n: [k[i] for k in keys] for i, n in enumerate(names)})
        out = {}
        for predicate in self._predicates(wanted):
            rows = table.search().where(predicate).select([*names, "vector"]).limit(None).to_arrow()
            stored = self._stored(rows.column("vector")) if rows.num_rows else []
            for key, v in zip(key_tuples(rows.select(names)), stored):
                out[key] = from_codes(self.precision, v)
        return out

    def _stored(self, column) -> np.ndarray:
        """The table's vectors as stored: uint8 codes, else float32 (float16 widened)."""
        matrix = to_matrix(column)
        return matrix.astype(np.uint8) if self.precision in BITS else matrix

    def row_digests(self, keys: list[str]) -> pa.Table:
        """Each row's vector digest, over the vectors read back from the table (packed bits as
        they are, floats as float32)."""
        rows = (self._table().search().select([*keys, "vector"]).limit(None).to_arrow()
                .combine_chunks())
        payload = self.vector_bytes(self._stored(rows.column("vector"))) if rows.num_rows else \
            np.zeros((0, 0), np.uint8)
        return pa.table({**{k: rows.column(k) for k in keys}, "digest": vector_digests(payload)})

    def search(self, queries: np.ndarray, k: int, columns: list[str]) -> list[pa.Table]:
        """Exact (brute-force) search: LanceDB scans when the table has no vector index. The
        binary kinds: the query's packed bits (q > 0) by hamming distance, the score."""
        table = self._table()
        if table is None:
            raise ConfigError(f'sink "{self.name}": {self.describe()} does not exist; run '
                              f"`embedpipe sync` on the folder")
        distance = "hamming" if self.vector_type == "bit" else "dot" if self.metric == "ip" \
            else "l2"
        out = []
        for query in query_codes(self.precision, queries):
            hits = (table.search(query).distance_type(distance)
                    .select(["id", *columns, "_distance"]).limit(k).to_arrow())
            d = hits.column("_distance").to_numpy()
            score = 1.0 - d if distance == "dot" else d  # LanceDB's dot distance is 1 - dot
            out.append(pa.table({"id": hits.column("id"), "score": pa.array(score, pa.float32()),
                                 **{c: hits.column(c) for c in columns}}))
        return out
