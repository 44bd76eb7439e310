"""Write a unit's vectors (and its rejects) as Parquet parts that appear whole."""
from __future__ import annotations

import posixpath
from contextlib import ExitStack

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..config import ConfigError
from ..faults import checkpoint
from .checks import WRITE_CHECKSUMS
from .content_hash import HASH_TYPE
from .storage import Store, with_filename
from .vectors import LABEL_COLUMN

VECTORS_DIR = "vectors"
REJECTS_DIR = "rejects"
TOKENS_DIR = "tokens"  # the token table (output.granularity = "subword" | "word")
REJECT_SCHEMA_FIELDS = [("input_file", pa.string()), ("row_number", pa.int64()), ("reason", pa.string())]


def vector_array(vectors: np.ndarray, vector_dtype: str) -> pa.FixedSizeListArray:
    """Zero-copy view of a C-contiguous [rows, dim] array as Arrow fixed-size lists."""
    values = np.ascontiguousarray(vectors, dtype=np.dtype(vector_dtype)).reshape(-1)
    return pa.FixedSizeListArray.from_arrays(pa.array(values), vectors.shape[1])


# each row's FAISS label: kept by a row that keeps its id and text (a reused row), new otherwise
# (jobs/write.py), so an index is maintained by label sets (index/maintain.py)
NEW_LABEL = -1  # a row whose label the writer gives when it writes it

# long_text = "chunk": the columns a row of a text's pooled windows, or of one window, adds
WINDOW_COLUMNS = ("chunk", "token_start", "token_end", "char_start", "char_end")


def vectors_schema(id_type: pa.DataType, width: int, vector_dtype: str,
                   keep: pa.Schema | None = None, chunks: str | None = None,
                   rescore: tuple[int, str] | None = None,
                   sparse: int | None = None, dense: bool | None = None) -> pa.Schema:
    """id, vector (width stored values: io/precision.py), n_tokens, truncated, text_hash (what the
    model saw, hashed: content_hash.py), faiss_id (the row's index label), then the kept columns.
    chunks = "pool" adds n_chunks
    (windows pooled into the row); "rows" makes a row a window: id, chunk, its token and
    character spans (WINDOW_COLUMNS), vector, n_tokens (the window's), truncated.
    rescore (width, value type): a rescore_vector column after vector (output.rescore_precision).
    sparse (the vocabulary's size): a sparse (SPLADE) folder's rows hold no vector column but
    SPARSE_COLUMNS, the vocabulary in the indices' field metadata (docs/sparse.md); dense (unset:
    without sparse) keeps the vector column beside them (a BGE-M3 folder storing both:
    docs/multi-representation.md)."""
    value_type = pa.from_numpy_dtype(np.dtype(vector_dtype))  # float32/16, or int8/uint8 quantized
    int32 = pa.int32()
    fields = [pa.field("id", id_type)]
    if chunks == "rows":
        fields += [pa.field(name, int32) for name in WINDOW_COLUMNS]
    if dense if dense is not None else sparse is None:
        fields.append(pa.field("vector", pa.list_(value_type, width)))
    if sparse is not None:
        fields += sparse_fields(sparse)
    if rescore is not None:
        fields.append(pa.field("rescore_vector", pa.list_(pa.from_numpy_dtype(
            np.dtype(rescore[1])), rescore[0])))
    fields += [pa.field("n_tokens", int32),
               pa.field("truncated", pa.bool_()), pa.field("text_hash", HASH_TYPE),
               pa.field(LABEL_COLUMN, pa.int64())]
    if chunks == "pool":
        fields.append(pa.field("n_chunks", int32))
    return pa.schema(fields + (list(keep) if keep is not None else []))


# a sparse row: its non-zero dimensions, ascending, and their values
SPARSE_COLUMNS = ("sparse_indices", "sparse_values")


def sparse_fields(vocabulary: int) -> list[pa.Field]:
    return [pa.field("sparse_indices", pa.list_(pa.int32()),
                     metadata={"vocabulary": str(vocabulary)}),
            pa.field("sparse_values", pa.list_(pa.float32()))]


def list_array(rows, value_type: pa.DataType) -> pa.ListArray:
    """Variable-length rows (a sequence of 1-d arrays) as one Arrow list array."""
    lengths = np.fromiter(map(len, rows), np.int64, count=len(rows))
    offsets = np.zeros(len(rows) + 1, np.int32)
    np.cumsum(lengths, out=offsets[1:])
    values = (np.concatenate(list(rows)) if len(rows) else np.zeros(0)).astype(
        value_type.to_pandas_dtype())
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values, value_type))


def tokens_schema(id_type: pa.DataType, dim: int, vector_dtype: str) -> pa.Schema:
    """The token table: a row per token (or word) of a text, in input order."""
    value_type = pa.float16() if vector_dtype == "float16" else pa.float32()
    return pa.schema([pa.field("id", id_type), pa.field("position", pa.int32()),
                      pa.field("token", pa.string()), pa.field("char_start", pa.int32()),
                      pa.field("char_end", pa.int32()),
                      pa.field("vector", pa.list_(value_type, dim))])


def rejects_schema(id_type: pa.DataType) -> pa.Schema:
    return pa.schema([pa.field("id", id_type)] + [pa.field(n, t) for n, t in REJECT_SCHEMA_FIELDS])


def part_options(schema: pa.Schema) -> dict:
    """ParquetWriter options for vector parts.

    Float vectors neither repeat nor compress: a dictionary attempt and snappy on the vector
    column only cost time (4x slower writes, 3x slower reads, larger files, measured on
    2,000 x 384 float32), and min/max statistics of embedding values help no query. Text
    hashes are random bytes: the same holds for them."""
    raw = ("vector", "rescore_vector", "text_hash", *SPARSE_COLUMNS, "vectors")  # multivectors/
    others = [name for name in schema.names if name not in raw]
    # Parquet keeps an int8 / uint8 as a 4-byte INT32; its dictionary (<= 256 values) stores a
    # quantized value in one byte (1.02 bytes measured on random int8 rows, 4.01 without)
    quantized = [f"{name}.list.element" for name in ("vector", "rescore_vector")
                 if name in schema.names and pa.types.is_integer(
                     schema.field(name).type.value_type)]
    dictionary = others + quantized
    return {"use_dictionary": dictionary, "write_statistics": others, **WRITE_CHECKSUMS,
            "compression": {**{name: "snappy" for name in others},
                            **{name: "none" for name in raw if name in schema.names}}}


class UnitWriter:
    """Parts `vectors/part-UUUUU-SSSS.parquet` (or under `folder`: the token table's) of at most
    rows_per_file rows, in input order.

    A part is streamed to a temporary name and renamed into place when it is full or the unit
    ends, so memory holds one window of rows, never a whole part.
    """

    def __init__(self, store: Store, unit_id: int, schema: pa.Schema, rows_per_file: int,
                 vector_dtype: str, folder: str = VECTORS_DIR):
        self.store, self.unit_id, self.schema, self.folder = store, unit_id, schema, folder
        self.rows_per_file, self.vector_dtype = rows_per_file, vector_dtype
        self.files: list[str] = []
        self._open: tuple[ExitStack, pq.ParquetWriter] | None = None
        self._rows_in_part = 0

    def write(self, ids: pa.Array, rows: dict[str, np.ndarray], keep: pa.Table | None = None) -> None:
        """rows: the vectors (key "vector") and embedpipe's other columns, by name."""
        values = {"id": ids.cast(self.schema.field("id").type)}
        if "vector" in self.schema.names:
            values["vector"] = vector_array(rows["vector"], self.vector_dtype)
        for name in self.schema.names:
            if name in values:
                continue
            if name in SPARSE_COLUMNS:
                values[name] = list_array(rows[name], self.schema.field(name).type.value_type)
                continue
            if name in rows and pa.types.is_fixed_size_list(self.schema.field(name).type) \
                    and isinstance(rows[name], np.ndarray):  # rescore_vector
                values[name] = vector_array(
                    rows[name], self.schema.field(name).type.value_type.to_pandas_dtype())
            elif name in rows:
                value = rows[name]
                if isinstance(value, pa.ChunkedArray):
                    value = value.combine_chunks()
                values[name] = (value.cast(self.schema.field(name).type)
                                if isinstance(value, pa.Array)
                                else pa.array(value, self.schema.field(name).type))
            else:
                values[name] = keep.column(name).combine_chunks()
        batch = pa.RecordBatch.from_arrays([values[n] for n in self.schema.names], schema=self.schema)
        try:
            self._write(batch)
        except OSError as exc:  # the disk filled: the unit's parts go, the error names the part
            part = self.store.path(self.files[-1]) if self.files else self.store.path(self.folder)
            self.abort()
            raise with_filename(exc, part) from exc

    def _write(self, batch: pa.RecordBatch) -> None:
        while batch.num_rows:
            if self._open is None:
                self._start_part()
            room = self.rows_per_file - self._rows_in_part
            self._open[1].write_batch(batch.slice(0, room))
            self._rows_in_part += min(room, batch.num_rows)
            batch = batch.slice(room)
            if self._rows_in_part == self.rows_per_file:
                self._finish_part()

    def _start_part(self) -> None:
        name = f"{self.folder}/part-{self.unit_id:05d}-{len(self.files):04d}.parquet"
        stack = ExitStack()
        handle = stack.enter_context(self.store.open_atomic(name))
        self._open = (stack, pq.ParquetWriter(handle, self.schema, **part_options(self.schema)))
        self.files.append(name)
        self._rows_in_part = 0

    def _finish_part(self) -> None:
        stack, parquet = self._open
        self._open = None
        parquet.close()
        checkpoint("write")  # the part is complete under its temporary name
        stack.close()  # renames the part into place

    def close(self) -> list[str]:
        if self._open is not None:
            self._finish_part()
        return self.files

    def abort(self) -> None:
        """Drop the part being written (its temporary file goes) and forget the finished ones."""
        if self._open is not None:
            stack, parquet = self._open
            self._open = None
            stack.__exit__(RuntimeError, RuntimeError("unit aborted"), None)
        remove_files(self.store, self.files)
        self.files = []


def write_rejects(store: Store, unit_id: int, table: pa.Table) -> list[str]:
    if table.num_rows == 0:
        return []
    name = f"{REJECTS_DIR}/part-{unit_id:05d}.parquet"
    with store.open_atomic(name) as handle:
        pq.write_table(table, handle, **WRITE_CHECKSUMS)
    return [name]


def remove_files(store: Store, names: list[str]) -> None:
    for name in names:
        store.remove(name)


class ResultFile:
    """A Parquet file of results (search hits, predictions) written table by table, which appears
    under its name only when complete and holds at least one row."""

    def __init__(self, path: str, empty_error: str):
        self.path, self.empty_error = path, empty_error
        self.rows = 0
        self._parquet: pq.ParquetWriter | None = None

    def __enter__(self) -> "ResultFile":
        parent, name = posixpath.split(self.path)
        self._file = Store(parent or ".").open_atomic(name)
        self._handle = self._file.__enter__()
        return self

    def write(self, table: pa.Table) -> None:
        if self._parquet is None:
            self._parquet = pq.ParquetWriter(self._handle, table.schema)
        self._parquet.write_table(table)
        self.rows += table.num_rows

    def __exit__(self, kind, exc, tb) -> bool:
        if self._parquet is not None:
            self._parquet.close()
        if exc is None and self._parquet is None:
            exc = ConfigError(self.empty_error)
            self._file.__exit__(ConfigError, exc, None)  # the temporary file goes
            raise exc
        self._file.__exit__(kind, exc, tb)  # renamed into place, or removed on an error
        return False
