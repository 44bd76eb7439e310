"""A multi-vector (ColBERT) folder's rows as a sink holds them: LanceDB's multi-vector column.

The sync reads a multi-vector folder's rows from two parallel parts (docs/multivector.md): the
vector part's columns (id, n_tokens, truncated, kept columns) and the multivectors/ part's
`vectors`, row for row, which travel through the shared sync (sinks/base.py: by id, markers,
digests) as one `vector` column of type `list<fixed_size_list<float32 | float16, dim>>`: what
LanceDB takes as a multi-vector column. A row's digest is taken over its token vectors as
float32 bytes, so a token changed, added or dropped changes it. pgvector has no multi-vector
type: refused.

LanceDB (0.40) searches such a column by MaxSim; its documented metric is cosine only, and its
distance is sum over query tokens of (1 - max cosine), so MaxSim = query tokens - distance.
That equals embedpipe's MaxSim (dot products, index/maxsim.py) where every token vector is of
unit length, which the folder's Normalize module makes them: a folder whose stored tokens are
not (no Normalize) is refused (`unit_length_problem`), as LanceDB would rank it otherwise.
"""
from __future__ import annotations

import hashlib
from typing import Iterator

import numpy as np
import pyarrow as pa

from ..config import ConfigError
from ..io.multivectors import MULTIVECTOR_COLUMN, block_tokens, multivector_files
from ..io.storage import Store
from ..io.vectors import VectorParts

MULTIVECTOR = "multivector"  # a multi-vector folder's "precision" and its sink's vector_type
UNIT_TOLERANCE = 1e-2  # |norm - 1| a stored token may have (float16 rounding: about 1e-3)


def multivector_column(kind: str, name: str, vector_type: str) -> str:
    """The column a multi-vector folder's rows get: LanceDB's multi-vector; refused elsewhere."""
    if kind != "lancedb":
        raise ConfigError(f'sink "{name}": the folder holds multi-vector (ColBERT) rows and '
                          f"pgvector has no multi-vector type; use a LanceDB sink (its "
                          f"multi-vector column) or none")
    if vector_type != "auto":
        raise ConfigError(f'sink "{name}": vector_type = "{vector_type}" does not apply to '
                          f"multi-vector rows; leave vector_type out")
    return MULTIVECTOR


def is_multivector(schema: pa.Schema) -> bool:
    """Whether a sink schema's `vector` holds a row's token vectors (a list of vectors)."""
    return "vector" in schema.names and pa.types.is_list(schema.field("vector").type)


def with_multivectors(store: Store, files: list[str], schema: pa.Schema) -> pa.Schema:
    """A vector part's schema with the `vector` field a multi-vector folder's rows take (the
    multivectors/ part's `vectors` type); a dense or sparse folder's as it is."""
    if not files or "vector" in schema.names:
        return schema
    name = multivector_files(files[:1])[0]
    if not store.exists(name):
        return schema
    parts = VectorParts(store, [name])
    kind = parts.metadata(name).schema.to_arrow_schema().field(MULTIVECTOR_COLUMN).type
    return schema.append(pa.field("vector", kind))


def multivector_blocks(parts: VectorParts, schema: pa.Schema, rows: int) -> Iterator[pa.Table]:
    """The folder's rows as the sink takes them: the vector parts' columns of `schema` and each
    row's token vectors from the parallel multivectors/ parts as `vector`, at most `rows` rows a
    block. A multivectors/ part whose ids differ from its vector part's stops the load (ValueError)."""
    names = [n for n in schema.names if n != "vector"]
    left = parts.read(names if "id" in names else ["id", *names], rows)
    right = VectorParts(parts.store, multivector_files(parts.files)).read(
        ["id", MULTIVECTOR_COLUMN], rows)
    a = b = None
    while True:
        a = next(left, None) if a is None or not a.num_rows else a
        b = next(right, None) if b is None or not b.num_rows else b
        if a is None or b is None:
            if a is not None or b is not None:
                raise ValueError("the multivectors/ parts hold another number of rows than the "
                                 "vector parts; run `embedpipe verify` on the folder")
            return
        n = min(a.num_rows, b.num_rows)
        head, tokens = a.slice(0, n), b.slice(0, n)
        if not head.column("id").equals(tokens.column("id")):
            raise ValueError("the multivectors/ parts' ids differ from the vector parts'; run "
                             "`embedpipe verify` on the folder")
        head = head.replace_schema_metadata(None).append_column(
            "vector", tokens.column(MULTIVECTOR_COLUMN))
        yield head.select(schema.names)
        a, b = a.slice(n), b.slice(n)


def row_digests(column: pa.Array | pa.ChunkedArray, size: int) -> pa.Array:
    """Each row's digest (sha256, its first `size` bytes) over its token vectors as float32
    bytes (float16 widened), as fixed-size binary."""
    tokens, offsets = block_tokens(column)
    flat = np.ascontiguousarray(tokens, "<f4")
    digests = b"".join(hashlib.sha256(flat[a:b].tobytes()).digest()[:size]
                       for a, b in zip(offsets[:-1].tolist(), offsets[1:].tolist()))
    return pa.FixedSizeBinaryArray.from_buffers(pa.binary(size), len(offsets) - 1,
                                                 [None, pa.py_buffer(digests)])


def unit_length_problem(block: pa.Table) -> str | None:
    """Why a block's token vectors cannot go to LanceDB's cosine MaxSim unchanged (a token not
    of unit length: its ranking would differ from embedpipe's MaxSim), or None."""
    tokens, offsets = block_tokens(block.column("vector"))
    if not len(tokens):
        return None
    norms = np.linalg.norm(np.asarray(tokens, np.float32), axis=1)
    off = np.abs(norms - 1.0)
    worst = int(np.argmax(off))
    if off[worst] <= UNIT_TOLERANCE:
        return None
    row = int(np.searchsorted(offsets, worst, "right")) - 1
    return (f"row id {block.column('id')[row].as_py()} has a token vector of norm "
            f"{float(norms[worst]):.4g}, not 1: the model folder has no "
            f"Normalize module, and LanceDB's multi-vector search ranks by cosine, so its "
            f"ranking would differ from embedpipe's MaxSim (dot products); keep this folder "
            f"without the sink, or add a Normalize module to the model (a new output.path)")
