"""Reading an output folder's committed vector parts back, in row order, a block at a time."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .checks import PAGE_CHECKSUMS, reading
from .precision import Precision
from .storage import Store

LABEL_COLUMN = "faiss_id"  # each row's index label (io/writer.py writes it)

READ_ROWS = 65_536  # rows per streamed block of a vector part


@dataclass(frozen=True)
class VectorParts:
    """The committed vector parts of an output folder, in row order. `known_rows`: the parts'
    row counts when the caller has them already (the manifest's file checks, once the files
    were checked against them), so they are not read from every footer again.

    `labels`: each file's first unit-row label, (unit_id << 32) | row within the unit (None:
    labels are row positions, as before). A part's rows carry their own labels in its faiss_id
    column (io/writer.py); a part written before that column has its unit-row labels.
    `footers`: the recorded footer hash of each file, which tells a part's content apart where
    its name and row count are the same (None: unknown).
    `positions`: the labels are row positions in a larger set (a subset of parts without
    stored labels), whatever faiss_id the parts hold.
    `precision`: what the parts store (output.precision); `vectors()` and `sample()` give the
    values the folder's index takes (Precision.index_values), `stored()` the values as stored."""
    store: Store
    files: list[str]
    known_rows: tuple[int, ...] | None = None
    labels: tuple[int, ...] | None = None
    footers: tuple[str, ...] | None = None
    precision: Precision = Precision()
    positions: bool = False  # `labels` are row positions in a larger set (a subset's)

    def first_labels(self) -> list[int]:
        """Each file's first label: the recorded ones, else its first row position."""
        if self.labels is not None:
            return list(self.labels)
        return np.cumsum([0] + self.rows()[:-1]).tolist() if self.files else []

    def row_labels(self) -> np.ndarray:
        """Every stored row's label, in row order: its faiss_id, or its unit-row label in a part
        without one (row positions where the ledger gives no labels)."""
        pieces = []
        for name, first, r in zip(self.files, self.first_labels(), self.rows()):
            if self.labels is not None and not self.positions \
                    and LABEL_COLUMN in self.metadata(name).schema.names:
                pieces += [t.column(0).to_numpy().astype(np.int64)
                           for t in VectorParts(self.store, [name]).read([LABEL_COLUMN])]
            else:
                pieces.append(np.arange(first, first + r, dtype=np.int64))
        return np.concatenate(pieces) if pieces else np.zeros(0, np.int64)

    def subset(self, indices: list[int]) -> "VectorParts":
        """These files (by position in `files`) with what is known of them; their labels are
        those they have here (row positions in the whole, where labels are positions)."""
        def pick(values):
            return None if values is None else tuple(values[i] for i in indices)
        return VectorParts(self.store, [self.files[i] for i in indices], pick(self.known_rows),
                           pick(self.first_labels()), pick(self.footers), self.precision,
                           self.positions or self.labels is None)

    def metadata(self, name: str) -> pq.FileMetaData:
        with self.store.open_input(name) as handle:
            return pq.ParquetFile(handle).metadata

    def rows(self) -> list[int]:
        if self.known_rows is not None:
            return list(self.known_rows)
        return [self.metadata(f).num_rows for f in self.files]

    def dimension(self) -> int:
        """The index's dimension: stored values a row (binary kinds: 8 bits a stored byte)."""
        for name in self.files:
            vector = self.metadata(name).schema.to_arrow_schema().field("vector").type
            return vector.list_size * (8 if self.precision.name.endswith("binary") else 1)
        return 0

    def key_columns(self) -> list[str]:
        """What names a stored row: its id, and its chunk in a folder of one row a window."""
        for name in self.files:
            return ["id", "chunk"] if "chunk" in self.metadata(name).schema.names else ["id"]
        return ["id"]

    def keys(self) -> pa.Table:
        """The key columns of every stored row, in row order (the index's id map)."""
        keys = self.key_columns()
        tables = list(self.read(keys))
        return pa.concat_tables(tables) if tables else pa.table(
            {k: pa.array([], pa.int32() if k == "chunk" else pa.string()) for k in keys})

    def id_map(self) -> Iterator[pa.Table]:
        """The index's id map a block at a time, in row order: each row's label (faiss_id)
        and key columns; what `keys()` and `row_labels()` give, one part in memory at once."""
        for i in range(len(self.files)):
            part = self.subset([i])
            labels, row = part.row_labels(), 0
            for table in part.read(self.key_columns()):
                yield table.add_column(0, LABEL_COLUMN,
                                       pa.array(labels[row:row + table.num_rows], pa.int64()))
                row += table.num_rows

    def read(self, columns: list[str], batch_rows: int = READ_ROWS) -> Iterator[pa.Table]:
        """The columns, part after part, at most batch_rows rows at a time, every page's
        checksum verified (parts written before checksums: none to verify). A page that fails,
        or a part that cannot be read, is DamagedFile naming the part."""
        for name in self.files:
            with reading(name), self.store.open_input(name) as handle:
                batches = pq.ParquetFile(handle, **PAGE_CHECKSUMS).iter_batches(
                    batch_size=batch_rows, columns=columns)
                for batch in batches:
                    yield pa.Table.from_batches([batch])

    def stored(self) -> Iterator[np.ndarray]:
        """The stored values, a block at a time, widened to float32."""
        for table in self.read(["vector"]):
            yield to_matrix(table.column("vector"))

    def vectors(self) -> Iterator[np.ndarray]:
        """The values the folder's index takes, a block at a time."""
        for block in self.stored():
            yield self.precision.index_values(block)

    def sample(self, positions: np.ndarray) -> np.ndarray:
        """The vectors at the given global row positions (sorted), streaming part by part."""
        out, start = [], 0
        for block in self.vectors():
            inside = positions[(positions >= start) & (positions < start + len(block))]
            out.append(block[inside - start])
            start += len(block)
        return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def to_matrix(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    dim = array.type.list_size
    flat = array.flatten().to_numpy(zero_copy_only=False)
    return np.ascontiguousarray(flat.reshape(-1, dim), dtype=np.float32)
