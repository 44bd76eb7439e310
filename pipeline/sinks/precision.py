"""Which column a sink gives a folder's vectors, by the folder's precision (output.precision), and
the conversions between the parts' stored values and what the store holds.

| precision       | pgvector                                   | LanceDB                           |
| --------------- | ------------------------------------------ | --------------------------------- |
| float32         | vector(dim) (halfvec if asked: rounds)     | fixed_size_list<float32, dim>     |
| float16         | halfvec(dim) (vector if asked: exact)      | fixed_size_list<float16, dim>     |
| binary, ubinary | bit(dim), hamming distance                 | fixed_size_list<uint8, dim/8>, hamming |
| int8, uint8     | refused: pgvector has no 8-bit vector type | refused: no int8 vector column    |
| sparse (SPLADE) | sparsevec(vocabulary) (sinks/sparse.py)    | refused: no sparse vector column  |
| multi-vector    | refused: no multi-vector type              | list<fixed_size_list<dim>> (sinks/multivector.py) |

The binary kinds are held as their packed bits (ubinary's bytes; binary's are its int8 values
+ 128), the query quantized as the folder's vectors were: packbits(q > 0).
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa

from ..config import ConfigError
from ..io.precision import Precision
from .multivector import MULTIVECTOR, multivector_column
from .sparse import pg_column

BITS = ("binary", "ubinary")
PG_TYPES = {"float32": "vector", "float16": "halfvec", "binary": "bit", "ubinary": "bit"}
RESTORE = ("rerun the job with another output.path and output.precision = \"float16\" or "
           "\"binary\"")


def precision_of(config: dict) -> str:
    """The precision a recorded job config stores (folders made before output.precision
    existed: their vector_dtype)."""
    output = config.get("output") or {}
    if str((config.get("encode") or {}).get("pooling", "")).startswith("splade-"):
        return "sparse"  # a SparseEncoder folder's rows (docs/sparse.md)
    if (config.get("encode") or {}).get("pooling") == MULTIVECTOR:
        return MULTIVECTOR  # a MultiVectorEncoder folder's token vectors (docs/multivector.md)
    return output.get("precision") or output.get("vector_dtype") or "float32"


def column_type(kind: str, name: str, precision: str, vector_type: str = "auto") -> str:
    """The vector column's type: pgvector's vector | halfvec | bit; LanceDB: vector | bit (its
    float width follows the folder). A ConfigError (one line) where the store has no type that
    holds the folder's values as they are, or `vector_type` contradicts them."""
    where = f'sink "{name}"'
    if precision == "sparse":
        return pg_column(kind, name, vector_type)
    if precision == MULTIVECTOR:
        return multivector_column(kind, name, vector_type)
    if precision in ("int8", "uint8"):
        engine = ("pgvector has no 8-bit integer vector type (vector, halfvec, bit and sparsevec "
                  "only)" if kind == "pgvector" else
                  "LanceDB has no 8-bit integer vector column (int8 is no vector type, uint8 "
                  "takes hamming distance only)")
        raise ConfigError(f"{where}: the folder stores {precision} vectors (output.precision) "
                          f"and {engine}; {RESTORE}, or keep this folder without the sink")
    natural = PG_TYPES[precision]
    if kind != "pgvector":
        return "bit" if natural == "bit" else "vector"
    if vector_type in ("auto", natural):
        return natural
    if natural == "bit":
        raise ConfigError(f'{where}: vector_type = "{vector_type}" cannot hold the folder\'s '
                          f"{precision} vectors (packed bits, output.precision); leave "
                          f'vector_type out or set it to "bit"')
    if vector_type == "bit":
        raise ConfigError(f'{where}: vector_type = "bit" holds packed bits and the folder stores '
                          f"{precision} vectors; leave vector_type out ({natural}), or rerun the "
                          f'job with another output.path and output.precision = "binary"')
    return vector_type  # vector on float16 (exact), halfvec on float32 (float16 rounding)


def to_codes(precision: str, values: np.ndarray) -> np.ndarray:
    """The parts' stored values (of any numeric dtype: to_matrix widens them to float32) as
    the store holds them: packed bits as uint8 for the binary kinds, else float32."""
    if precision == "binary":
        return (np.asarray(values).astype(np.int16) + 128).astype(np.uint8)
    if precision == "ubinary":
        return np.asarray(values).astype(np.uint8)
    return np.asarray(values, np.float32)


def from_codes(precision: str, codes: np.ndarray) -> np.ndarray:
    """to_codes undone: the folder's stored values, as float32 (what VectorParts.sample gives)."""
    if precision == "binary":
        return (np.asarray(codes).astype(np.int16) - 128).astype(np.float32)
    return np.asarray(codes, np.float32)


def query_codes(precision: str, queries: np.ndarray) -> np.ndarray:
    """Float queries quantized as the folder's vectors were: packed bits (ubinary's form)."""
    return Precision("ubinary").store(np.asarray(queries, np.float32)) if precision in BITS \
        else np.asarray(queries, np.float32)


def codes_block(block: pa.Table, precision: str) -> pa.Table:
    """A block of the parts' rows with its vector column as the store holds it (binary: the
    int8 values' bytes with the top bit flipped, i.e. + 128 as uint8)."""
    if precision not in BITS or "vector" not in block.column_names:
        return block
    column = block.column("vector").combine_chunks()
    width = column.type.list_size
    flat = column.flatten().to_numpy(zero_copy_only=False)
    packed = flat.view(np.uint8) ^ np.uint8(0x80) if precision == "binary" else flat.astype(np.uint8)
    vectors = pa.FixedSizeListArray.from_arrays(pa.array(packed, pa.uint8()), width)
    return block.set_column(block.column_names.index("vector"), "vector", vectors)
