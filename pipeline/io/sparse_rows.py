"""A sparse (SPLADE) folder's rows read back: sparse_indices / sparse_values as one CSR matrix
[rows, vocabulary] in row order, the vocabulary from the parts' field metadata."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import scipy.sparse as sp

from ..config import ConfigError
from .vectors import VectorParts


def vocabulary(parts: VectorParts) -> int:
    for name in parts.files:
        field = parts.metadata(name).schema.to_arrow_schema().field("sparse_indices")
        return int((field.metadata or {})[b"vocabulary"])
    return 0


def csr_block(table: pa.Table, width: int) -> sp.csr_matrix:
    """A block of rows' sparse_indices / sparse_values as CSR [rows, width]."""
    indices = table.column("sparse_indices").combine_chunks()
    values = table.column("sparse_values").combine_chunks()
    offsets = indices.offsets.to_numpy()
    if not np.array_equal(offsets, values.offsets.to_numpy()):
        raise ConfigError("a sparse row's indices and values differ in length; run "
                          "`embedpipe verify` on the folder")
    flat = indices.values.to_numpy()[offsets[0]:offsets[-1]]
    data = values.values.to_numpy()[offsets[0]:offsets[-1]].astype(np.float32)
    return sp.csr_matrix((data, flat, offsets - offsets[0]), shape=(len(table), width))


def read_sparse(parts: VectorParts) -> sp.csr_matrix:
    width = vocabulary(parts)
    blocks = [csr_block(t, width) for t in parts.read(["sparse_indices", "sparse_values"])]
    if not blocks:
        return sp.csr_matrix((0, width), dtype=np.float32)
    return sp.vstack(blocks, format="csr")


def sparse_problems(parts: VectorParts) -> list[str]:
    """verify's look at a sparse folder's rows: indices ascending and inside the vocabulary,
    as many values as indices, every value finite (one line a part that breaks one)."""
    width, problems = vocabulary(parts), []
    for name in parts.files:
        sub = VectorParts(parts.store, [name])
        for table in sub.read(["sparse_indices", "sparse_values"]):
            indices = table.column("sparse_indices").combine_chunks()
            values = table.column("sparse_values").combine_chunks()
            offsets = indices.offsets.to_numpy()
            flat = indices.values.to_numpy()[offsets[0]:offsets[-1]]
            data = values.values.to_numpy()
            row = np.repeat(np.arange(len(offsets) - 1), np.diff(offsets))
            descending = ((np.diff(flat) <= 0) & (row[1:] == row[:-1])).any()
            why = ("indices and values differ in length"
                   if not np.array_equal(offsets, values.offsets.to_numpy()) else
                   "an index outside the vocabulary" if len(flat) and (
                       flat.min() < 0 or flat.max() >= width) else
                   "indices not ascending within a row" if descending else
                   "a value not finite" if not np.isfinite(data).all() else None)
            if why:
                problems.append(f"{name}: sparse rows broken ({why})")
                break
    return problems
