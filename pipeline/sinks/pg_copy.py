"""Arrow blocks as PostgreSQL's binary COPY format, built with numpy (no per-row Python).

A row is an int16 field count, then per field an int32 byte length (-1 for NULL) and the value
in network byte order. pgvector's `vector` is int16 dim, int16 0, float4 x dim; `halfvec` the
same with float2; PostgreSQL's `bit(dim)` is int32 dim, then the packed bits (dim / 8 bytes
rounded up, the last byte's unused bits zero: what np.packbits gives). `sparsevec` (a sparse
folder's rows, sinks/sparse.py) is int32 dim, int32 nnz, int32 0, then nnz int32 indices
(0-based: pgvector's internal form; its text form is 1-based) and nnz float4 values
(pgvector's sparsevec_send / sparsevec_recv).
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .sparse import row_lists

HEADER = b"PGCOPY\n\xff\r\n\x00" + (0).to_bytes(4, "big") + (0).to_bytes(4, "big")
TRAILER = (-1).to_bytes(2, "big", signed=True)


def pg_type(field: pa.Field, vector_type: str, dim: int) -> str:
    """The column type a part's column gets in PostgreSQL."""
    t = field.type
    if field.name == "vector":
        return f"{vector_type}({dim})"
    if pa.types.is_boolean(t):
        return "boolean"
    if pa.types.is_integer(t):
        wide = t.bit_width > 32 or (t.bit_width == 32 and pa.types.is_unsigned_integer(t))
        return "bigint" if wide else "integer"
    if pa.types.is_floating(t):
        return "double precision"
    return "text"  # strings, and any other type as its text form


class _Pieces:
    """Per row, the byte runs of each field, kept as (lengths, contiguous bytes) pairs."""

    def __init__(self, rows: int):
        self.rows = rows
        self.lengths: list[np.ndarray] = []
        self.buffers: list[np.ndarray] = []

    def add(self, lengths: np.ndarray, data: np.ndarray) -> None:
        self.lengths.append(np.broadcast_to(np.asarray(lengths, np.int64), (self.rows,)))
        self.buffers.append(np.frombuffer(data, np.uint8) if not isinstance(data, np.ndarray)
                            else data.view(np.uint8).reshape(-1))

    def fixed(self, values: np.ndarray, valid: np.ndarray | None) -> None:
        """A fixed-width value (already big-endian): length prefix, then the bytes; NULL: -1."""
        width = values.dtype.itemsize * int(np.prod(values.shape[1:], dtype=np.int64))
        if valid is None or valid.all():
            prefix = np.full(self.rows, width, ">i4")
            self.add(4, prefix)
            self.add(width, np.ascontiguousarray(values))
        else:
            self.add(4, np.where(valid, width, -1).astype(">i4"))
            self.add(np.where(valid, width, 0), np.ascontiguousarray(values[valid]))

    def join(self, field_count: int) -> bytes:
        count = np.full(self.rows, field_count, ">i2")
        lengths = [np.full(self.rows, 2, np.int64)] + self.lengths
        buffers = [count.view(np.uint8)] + self.buffers
        per_row = np.stack(lengths, axis=1)
        row_start = np.concatenate([[0], np.cumsum(per_row.sum(axis=1))])
        out = np.empty(int(row_start[-1]), np.uint8)
        before = np.cumsum(per_row, axis=1) - per_row  # offset of each piece inside its row
        for p, (length, data) in enumerate(zip(lengths, buffers)):
            if not len(data):
                continue
            dest = row_start[:-1] + before[:, p]
            run_start = np.cumsum(length) - length
            index = np.repeat(dest - run_start, length) + np.arange(len(data))
            out[index] = data
        return out.tobytes()


def sparsevec_pieces(pieces: _Pieces, column: pa.Array, dim: int) -> None:
    """A `vector` struct column (sinks/sparse.py) as sparsevec binary fields."""
    offsets, indices, values = row_lists(column)
    nnz = np.diff(offsets)
    head = np.zeros((len(nnz), 3), ">i4")
    head[:, 0], head[:, 1] = dim, nnz
    pieces.add(4, (12 + 8 * nnz).astype(">i4"))
    pieces.add(12, head)
    pieces.add(4 * nnz, indices.astype(">i4"))
    pieces.add(4 * nnz, values.astype(">f4"))


def sparsevec_payload(column: pa.Array, dim: int) -> list[bytes]:
    """Each row of a `vector` struct column as sparsevec_send returns it."""
    offsets, indices, values = row_lists(column)
    big_i, big_v = indices.astype(">i4"), values.astype(">f4")
    return [np.array([dim, b - a, 0], ">i4").tobytes() + big_i[a:b].tobytes() + big_v[a:b].tobytes()
            for a, b in zip(offsets[:-1], offsets[1:])]


def vector_payload(flat: np.ndarray, vector_type: str = "vector", dim: int = 0) -> np.ndarray:
    """[rows, dim] vectors as pgvector's binary form, a row of bytes each: int16 dim, int16 0,
    the values as big-endian float4 (`halfvec`: float2). What `vector_send` returns for them.
    `bit`: [rows, dim / 8] packed uint8 codes as int32 dim then the bytes (`bit_send`)."""
    if vector_type == "bit":
        head = np.full((len(flat), 1), dim, ">i4").view(np.uint8)
        return np.concatenate([head, np.asarray(flat, np.uint8)], axis=1)
    rows, dim = flat.shape
    head = np.zeros((rows, 2), ">i2")
    head[:, 0] = dim
    body = flat.astype(">f2" if vector_type == "halfvec" else ">f4")
    return np.concatenate([head.view(np.uint8).reshape(rows, 4),
                           body.view(np.uint8).reshape(rows, -1)], axis=1)


def encode(table: pa.Table, vector_type: str = "vector", dim: int = 0) -> bytes:
    """The rows of `table` as binary COPY tuples (no header or trailer); `bit`: the vector
    column holds packed uint8 codes of `dim` bits (sinks/precision.py: codes_block)."""
    rows = table.num_rows
    pieces = _Pieces(rows)
    for name in table.column_names:
        column = table.column(name).combine_chunks()
        valid = None if column.null_count == 0 else np.asarray(column.is_valid())
        t = column.type
        if name == "vector" and vector_type == "sparsevec":
            sparsevec_pieces(pieces, column, dim)
        elif name == "vector":
            flat = column.flatten().to_numpy(zero_copy_only=False).reshape(rows, t.list_size)
            pieces.fixed(vector_payload(flat, vector_type, dim), valid)
        elif pa.types.is_boolean(t):
            pieces.fixed(np.asarray(column.fill_null(False)).astype(np.uint8), valid)
        elif pa.types.is_integer(t):
            kind = ">i8" if pg_type(pa.field(name, t), "", 0) == "bigint" else ">i4"
            pieces.fixed(np.asarray(column.fill_null(0)).astype(kind), valid)
        elif pa.types.is_floating(t):
            pieces.fixed(np.asarray(column.cast(pa.float64()).fill_null(0)).astype(">f8"), valid)
        else:
            text = column if pa.types.is_string(t) else pc.cast(column, pa.string())
            ok = np.asarray(text.is_valid())
            text = text.fill_null("").cast(pa.large_string())
            offsets = np.frombuffer(text.buffers()[1], np.int64)[text.offset:text.offset + rows + 1]
            lengths = np.diff(offsets)
            data = np.frombuffer(text.buffers()[2], np.uint8)[offsets[0]:offsets[-1]] \
                if text.buffers()[2] is not None else np.zeros(0, np.uint8)
            pieces.add(4, np.where(ok, lengths, -1).astype(">i4"))
            pieces.add(np.where(ok, lengths, 0), data)
    return pieces.join(table.num_columns)
