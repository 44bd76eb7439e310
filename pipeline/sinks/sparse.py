"""A sparse (SPLADE) folder's rows as a sink holds them: pgvector's `sparsevec(vocabulary)`.

The parts' two columns (sparse_indices, sparse_values) travel through the sync as one `vector`
column, a struct of the two lists, so that the shared sync logic (by id, markers, digests) sees
one vector column as for dense folders. pgvector's limits: a sparsevec holds at most 16,000
non-zero values, and its HNSW index at most 1,000 a row (a row over it cannot be inserted once
the index exists), and it has no IVFFlat for sparsevec. So an HNSW index is built only where the
folder's max_active_dims guarantees every row, now and later, is under 1,000; a row over 16,000
fails the load naming the row. LanceDB (0.40) has no sparse vector column or index: refused.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import scipy.sparse as sp

from ..config import ConfigError, SinkConfig

SPARSE_COLUMNS = ("sparse_indices", "sparse_values")
SPARSEVEC_MAX_NNZ = 16000  # pgvector's SPARSEVEC_MAX_NNZ
HNSW_MAX_NNZ = 1000  # pgvector's HNSW_MAX_NNZ for a sparsevec index
SINCE = (0, 7, 0)  # pgvector's first release with sparsevec


def pg_column(kind: str, name: str, vector_type: str) -> str:
    """The column a sparse folder's rows get: pgvector's sparsevec; refused elsewhere."""
    if kind != "pgvector":
        raise ConfigError(f'sink "{name}": the folder holds sparse (SPLADE) rows and LanceDB has '
                          f"no sparse vector column; use a pgvector sink (sparsevec) or none")
    if vector_type not in ("auto", "sparsevec"):
        raise ConfigError(f'sink "{name}": vector_type = "{vector_type}" cannot hold the '
                          f"folder's sparse (SPLADE) rows; leave vector_type out (sparsevec)")
    return "sparsevec"


def check_index(cfg: SinkConfig, max_active_dims: int | None) -> None:
    """Refuse an ANN index pgvector cannot keep for these rows (one line, before any work)."""
    if cfg.index == "ivfflat":
        raise ConfigError(f'sink "{cfg.name}": pgvector has no IVFFlat index for sparsevec; '
                          f'use index = "hnsw" (with encode.max_active_dims <= {HNSW_MAX_NNZ}) '
                          f'or "none" (exact search)')
    if cfg.index == "hnsw" and not (max_active_dims and max_active_dims <= HNSW_MAX_NNZ):
        held = f"max_active_dims is {max_active_dims}" if max_active_dims else \
            "no max_active_dims bounds them"
        raise ConfigError(f'sink "{cfg.name}": pgvector\'s HNSW index takes sparse rows of at '
                          f"most {HNSW_MAX_NNZ} non-zero values and {held}; set "
                          f'encode.max_active_dims <= {HNSW_MAX_NNZ}, or index = "none" (exact '
                          f"search)")


def is_sparse(schema: pa.Schema) -> bool:
    return SPARSE_COLUMNS[0] in schema.names


def struct_type() -> pa.DataType:
    return pa.struct([("indices", pa.list_(pa.int32())), ("values", pa.list_(pa.float32()))])


def sink_schema(schema: pa.Schema) -> pa.Schema:
    """The parts' schema with the two sparse columns as one `vector` field (dense: as is)."""
    if not is_sparse(schema):
        return schema
    fields = [f for f in schema if f.name not in SPARSE_COLUMNS]
    return pa.schema([*fields, pa.field("vector", struct_type())])


def part_columns(names: list[str], sparse: bool) -> list[str]:
    """The parts' columns that a sink schema's names are read from."""
    return [c for n in names for c in (SPARSE_COLUMNS if sparse and n == "vector" else (n,))]


def sink_block(table: pa.Table) -> pa.Table:
    """A block of parts' rows with sparse_indices / sparse_values as the `vector` struct."""
    if not is_sparse(table.schema):
        return table
    indices = table.column(SPARSE_COLUMNS[0]).combine_chunks()
    values = table.column(SPARSE_COLUMNS[1]).combine_chunks()
    vector = pa.StructArray.from_arrays([indices, values], fields=list(struct_type()))
    return table.drop_columns(list(SPARSE_COLUMNS)).append_column("vector", vector)


def row_lists(column: pa.Array) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A `vector` struct column as (offsets, 0-based indices, float32 values), rebased at 0."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    indices, values = column.flatten()  # the struct's own offset applied
    offsets = indices.offsets.to_numpy()
    if not np.array_equal(offsets, values.offsets.to_numpy()):
        raise ValueError("a sparse row's indices and values differ in length; run "
                         "`embedpipe verify` on the folder")
    flat = indices.values.to_numpy()[offsets[0]:offsets[-1]]
    data = values.values.to_numpy()[offsets[0]:offsets[-1]]
    return offsets - offsets[0], flat, data


def over_limit(table: pa.Table, limit: int = SPARSEVEC_MAX_NNZ) -> str | None:
    """Why a block cannot go into sparsevec (a row over pgvector's limit), or None."""
    offsets, _, _ = row_lists(table.column("vector"))
    counts = np.diff(offsets)
    if not len(counts) or counts.max() <= limit:
        return None
    row = int(np.argmax(counts))
    return (f"row id {table.column('id')[row].as_py()} has {int(counts[row]):,} non-zero values "
            f"and pgvector's sparsevec holds at most {limit:,}; set encode.max_active_dims <= "
            f"{limit} (a new output.path) or drop this sink")


def query_text(row: sp.csr_matrix) -> str:
    """One query row as sparsevec's text form: {index:value,...}/dim, indices 1-based."""
    row = row.tocsr()
    row.sort_indices()
    pairs = ",".join(f"{int(i) + 1}:{float(v)!r}" for i, v in zip(row.indices, row.data) if v)
    return "{" + pairs + "}/" + str(row.shape[1])
