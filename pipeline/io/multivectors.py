"""Multi-vector (ColBERT-style) rows: each row's token vectors, stored and read back.

A multi-vector folder keeps its rows' bookkeeping in the vector parts (`vectors/`: id, n_tokens,
truncated, text_hash, faiss_id, kept columns; no `vector` column) and its token vectors in
parallel parts under `multivectors/`: `multivectors/part-UUUUU-SSSS.parquet` holds exactly the
rows of `vectors/part-UUUUU-SSSS.parquet`, in the same order, with the columns

- `id`: the row's id (as in the vector part);
- `faiss_id`: the row's label (as in the vector part);
- `vectors`: `list<fixed_size_list<float32 | float16, dim>>`, the row's token vectors.

Why that layout: the inner fixed-size list carries the dimension in the schema, and a block of
rows reads back as ONE contiguous [tokens, dim] numpy view of the Parquet page buffer (no copy:
`values.values` of the outer list) plus the outer list's offsets, so a row is a slice of that
view (`row_arrays`). A flat list with a count column would read as fast but leave the dimension
and the row/token split to a second column that could disagree with the first.

The files are committed with their unit in the manifest (UnitRecord.multivector_files), checked
by `embedpipe verify` as every part is (size, rows, sha256).

Public API (m3 and search use these):

- `multivector_schema(id_type, dim, dtype)`, `multivector_array(rows, dtype)`: writing;
- `multivector_files(vector_files)`: the parallel names;
- `block_tokens(table)` -> (tokens [T, dim] view, offsets [rows + 1]); `row_arrays(table)`;
- `read_multivectors(store, files)` -> list of [tokens, dim] arrays, one a row, in row order;
- `iter_multivectors(store, files)` -> iterator of (ids, list of arrays) a block of rows at a time.

Arrays come as stored (float32, or float16 where the folder stores float16).
"""
from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np
import pyarrow as pa

from .storage import Store
from .vectors import LABEL_COLUMN, READ_ROWS, VectorParts

MULTIVECTORS_DIR = "multivectors"
MULTIVECTOR_COLUMN = "vectors"  # the column of a multivectors/ part
ROW_KEY = "multivector"  # a row dict's key for its token vectors while a unit is written


def multivector_type(dim: int, dtype: str = "float32") -> pa.DataType:
    return pa.list_(pa.list_(pa.from_numpy_dtype(np.dtype(dtype)), dim))


def multivector_schema(id_type: pa.DataType, dim: int, dtype: str = "float32") -> pa.Schema:
    return pa.schema([pa.field("id", id_type), pa.field(LABEL_COLUMN, pa.int64()),
                      pa.field(MULTIVECTOR_COLUMN, multivector_type(dim, dtype))])


def multivector_array(rows: Sequence[np.ndarray], dim: int, dtype: str = "float32"
                      ) -> pa.ListArray:
    """Rows of [tokens_i, dim] arrays as one Arrow list<fixed_size_list<dtype, dim>>."""
    lengths = np.fromiter((len(r) for r in rows), np.int64, count=len(rows))
    offsets = np.zeros(len(rows) + 1, np.int32)
    np.cumsum(lengths, out=offsets[1:])
    flat = (np.concatenate([np.asarray(r).reshape(-1, dim) for r in rows]) if len(rows)
            else np.zeros((0, dim))).astype(np.dtype(dtype), copy=False)
    inner = pa.FixedSizeListArray.from_arrays(pa.array(np.ascontiguousarray(flat).reshape(-1)),
                                              dim)
    return pa.ListArray.from_arrays(pa.array(offsets), inner)


def multivector_files(vector_files: Sequence[str]) -> list[str]:
    """The multivectors/ parts parallel to these vectors/ parts."""
    return [MULTIVECTORS_DIR + "/" + name.split("/", 1)[1] for name in vector_files]


def block_tokens(column: pa.Array | pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """A block's `vectors` column as (every token vector [T, dim], row offsets [rows + 1] from 0):
    row i is tokens[offsets[i]:offsets[i + 1]]. No copy where the column is one chunk."""
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    offsets = array.offsets.to_numpy().astype(np.int64)
    inner = array.values  # fixed_size_list<dtype, dim>, unsliced
    dim = inner.type.list_size
    values = inner.values.to_numpy(zero_copy_only=False)
    start = inner.offset * dim
    tokens = values[start:start + len(inner) * dim].reshape(-1, dim)
    return tokens[offsets[0]:offsets[-1]], offsets - offsets[0]


def row_arrays(column: pa.Array | pa.ChunkedArray) -> list[np.ndarray]:
    """A block's rows, one [tokens_i, dim] view each."""
    tokens, offsets = block_tokens(column)
    return [tokens[a:b] for a, b in zip(offsets[:-1].tolist(), offsets[1:].tolist())]


def iter_multivectors(store: Store, files: Sequence[str], batch_rows: int = 4096
                      ) -> Iterator[tuple[pa.Array, list[np.ndarray]]]:
    """(ids, one [tokens, dim] array a row) a block of rows at a time, in row order; each page's
    checksum verified as vector parts are read (a damaged part is DamagedFile naming it)."""
    for table in VectorParts(store, list(files)).read(["id", MULTIVECTOR_COLUMN], batch_rows):
        yield table.column("id").combine_chunks(), row_arrays(table.column(MULTIVECTOR_COLUMN))


def read_multivectors(store: Store, files: Sequence[str]) -> list[np.ndarray]:
    """Every row's [tokens, dim] array, in row order (views into the blocks read)."""
    out: list[np.ndarray] = []
    for table in VectorParts(store, list(files)).read([MULTIVECTOR_COLUMN], READ_ROWS):
        out += row_arrays(table.column(MULTIVECTOR_COLUMN))
    return out


def stored_tokens(store: Store, files: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Every stored token vector as one float32 [T, dim] matrix and the row offsets [rows + 1]
    (search's token index and MaxSim read the folder this way)."""
    blocks, offsets, base = [], [np.zeros(1, np.int64)], 0
    for table in VectorParts(store, list(files)).read([MULTIVECTOR_COLUMN], READ_ROWS):
        tokens, block_offsets = block_tokens(table.column(MULTIVECTOR_COLUMN))
        blocks.append(tokens.astype(np.float32, copy=False))
        offsets.append(block_offsets[1:] + base)
        base += len(tokens)
    dim = blocks[0].shape[1] if blocks else 0
    return (np.concatenate(blocks) if blocks else np.zeros((0, dim), np.float32),
            np.concatenate(offsets))


def stored_token_count(store: Store, files: Sequence[str]) -> int:
    """Token vectors stored in these parts, from their footers alone (leaf values / dim)."""
    total = 0
    for name in files:
        meta = VectorParts(store, [name]).metadata(name)
        dim = meta.schema.to_arrow_schema().field(MULTIVECTOR_COLUMN).type.value_type.list_size
        column = next(i for i in range(meta.num_columns)
                      if meta.schema.column(i).path.split(".")[0] == MULTIVECTOR_COLUMN)
        total += sum(meta.row_group(g).column(column).num_values
                     for g in range(meta.num_row_groups)) // dim
    return total


def multivector_problems(store: Store, vector_files: Sequence[str], files: Sequence[str],
                         rows: Sequence[int]) -> list[str]:
    """verify's look at a multi-vector folder: a multivectors/ part for each vector part, with as
    many rows, the same ids in the same order, every value finite (one line a broken part)."""
    problems = []
    if list(files) != multivector_files(vector_files):
        return ["the multivectors/ parts do not pair with the vector parts one to one"]
    for vector_name, name, count in zip(vector_files, files, rows):
        ids = [t.column("id") for t in VectorParts(store, [vector_name]).read(["id"])]
        got, stored_ids, finite = 0, [], True
        for table in VectorParts(store, [name]).read(["id", MULTIVECTOR_COLUMN]):
            got += table.num_rows
            stored_ids.append(table.column("id"))
            tokens, _ = block_tokens(table.column(MULTIVECTOR_COLUMN))
            finite = finite and bool(np.isfinite(tokens).all())
        same = got == count and (not count or pa.concat_arrays(
            [c for a in ids for c in a.chunks]).equals(pa.concat_arrays(
                [c for a in stored_ids for c in a.chunks])))
        why = (f"{got} rows, its vector part {count}" if got != count else
               "ids differ from its vector part's" if not same else
               "a value not finite" if not finite else None)
        if why:
            problems.append(f"{name}: multi-vector rows broken ({why})")
    return problems
