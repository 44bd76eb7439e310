"""A finished output folder read back: the vectors in order, their ids and kept columns."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np
import pyarrow as pa

from ..config import ConfigError
from .ledger import Ledger
from .manifest import Manifest, read_manifest
from .precision import Precision, stored_precision, stored_row_bytes
from .storage import Store
from .vectors import VectorParts, to_matrix


@dataclass(frozen=True)
class Output:
    """The committed parts of an output folder, in row order (the order of the index's ids).

    >>> out = open_output("out/movie-reviews")
    >>> out.vectors().shape, out.ids()[:3], out.table(["id", "text"]).num_rows
    """
    store: Store
    manifest: Manifest
    parts: VectorParts
    token_parts: VectorParts | None = None  # the token table's (output.granularity subword | word)
    multivector_files: tuple[str, ...] = ()  # a multi-vector folder's multivectors/ parts

    @property
    def files(self) -> list[str]:
        return self.parts.files

    @property
    def count(self) -> int:
        return sum(self.parts.rows())

    @property
    def columns(self) -> list[str]:
        """id, vector, n_tokens, truncated, text_hash, then the kept columns: those every part
        has (parts written before text hashes existed lack text_hash)."""
        if not self.files:
            return []
        names = [self.parts.metadata(f).schema.to_arrow_schema().names for f in self.files]
        every = set(names[0]).intersection(*names[1:])
        return [n for n in names[0] if n in every]

    def batches(self, columns: list[str] | None = None) -> Iterator[pa.Table]:
        """The columns (default all), part after part, a block of rows at a time. A column the
        parts lack is refused, naming those they have (never a table short of a column)."""
        have = self.columns
        missing = [c for c in columns or () if c not in have]
        if missing and self.files:
            raise ConfigError(f"{self.store.url} has no column {', '.join(map(repr, missing))}; "
                              f"its parts have {', '.join(have)}")
        yield from self.parts.read(columns or have)

    def table(self, columns: list[str] | None = None) -> pa.Table:
        tables = list(self.batches(columns))
        return pa.concat_tables(tables) if tables else pa.table({})

    def ids(self) -> pa.ChunkedArray:
        return pa.chunked_array([c for t in self.batches(["id"]) for c in t.column("id").chunks])

    @property
    def precision(self) -> Precision:
        """What the parts store (output.precision) and, for int8 / uint8, the folder's ranges
        (`precision.calibration.ranges`, as quantize_embeddings takes them)."""
        return stored_precision(self.manifest)

    @property
    def bytes_per_row(self) -> int:
        """Bytes of one row's stored vectors: the vector, and its rescore copy if one is kept."""
        return stored_row_bytes(self.manifest)

    @property
    def is_sparse(self) -> bool:
        """Rows hold sparse_indices / sparse_values and no vector (a SPLADE folder, or a
        BGE-M3 folder storing sparse rows without dense ones)."""
        columns = self.columns
        return "sparse_indices" in columns and "vector" not in columns

    @property
    def representations(self) -> tuple[str, ...]:
        """What the rows are stored as: dense, sparse, multivector (docs/multi-representation.md)."""
        from .representations import stored_representations
        return stored_representations(self.store)

    def bytes_by_representation(self) -> dict[str, float]:
        """Mean stored bytes a row of each representation (io/representations.py)."""
        from .representations import bytes_by_representation
        return bytes_by_representation(self.store)

    def sparse(self):
        """scipy.sparse.csr_matrix [count, vocabulary], float32, in row order (docs/sparse.md)."""
        from .sparse_rows import read_sparse
        return read_sparse(self.parts)

    @property
    def is_multivector(self) -> bool:
        """A multi-vector (ColBERT) folder: each row's token vectors in multivectors/ parts."""
        return bool(self.multivector_files)

    def multivectors(self) -> list[np.ndarray]:
        """One [tokens, dim] array a row, in row order, as stored (float32, or float16 with
        output.precision = "float16"): docs/multivector.md."""
        from .multivectors import read_multivectors
        self._refuse_unless_multivector()
        return read_multivectors(self.store, self.multivector_files)

    def multivector_batches(self, batch_rows: int = 4096
                            ) -> Iterator[tuple[pa.Array, list[np.ndarray]]]:
        """(ids, one [tokens, dim] array a row) a block of rows at a time, in row order."""
        from .multivectors import iter_multivectors
        self._refuse_unless_multivector()
        yield from iter_multivectors(self.store, self.multivector_files, batch_rows)

    def _refuse_unless_multivector(self) -> None:
        if not self.is_multivector:
            raise ConfigError(f"{self.store.url} holds no multi-vector rows; read its vectors "
                              f"with open_output(...).vectors()")

    def vectors(self) -> np.ndarray:
        """[count, width] as stored: float32 (float16 parts widened), or, with a quantized
        precision, the stored int8 / uint8 values (binary kinds: dim / 8 packed bytes a row)."""
        if self.is_multivector and self.files and "vector" not in self.columns:
            raise ConfigError(f"{self.store.url} holds multi-vector (ColBERT) rows: read them "
                              f"with open_output(...).multivectors()")
        if self.is_sparse:
            raise ConfigError(f"{self.store.url} holds sparse (SPLADE) vectors: read them with "
                              f"open_output(...).sparse()")
        blocks = list(self.parts.stored())
        if not blocks:
            return np.zeros((0, self.precision.width(self.manifest.dim or 0)), np.float32)
        stored = np.concatenate(blocks)
        return stored.astype(self.precision.storage) if self.precision.quantized else stored

    def dequantized(self) -> np.ndarray:
        """float32 [count, dim]: int8 / uint8 values as the middle of their bucket of the
        folder's ranges; binary / ubinary bits as +1.0 (set) and -1.0; floats as stored."""
        return self.precision.dequantize(self.vectors(), self.manifest.dim or 0)

    def token_batches(self, columns: list[str] | None = None) -> Iterator[pa.Table]:
        """The token table (a row per token or word, in input order), a block of rows at a
        time; nothing when the run wrote none."""
        if self.token_parts is not None:
            yield from self.token_parts.read(columns or list(TOKEN_COLUMNS))

    def token_vectors(self) -> np.ndarray:
        """float32 [token rows, width]: the token table's vectors, in its row order."""
        blocks = [to_matrix(t.column("vector")) for t in self.token_batches(["vector"])]
        return np.concatenate(blocks) if blocks else np.zeros((0, 0), np.float32)

    def tokens(self, columns: list[str] | None = None) -> pa.Table:
        """The whole token table: id, position, token, char_start, char_end, vector."""
        tables = list(self.token_batches(columns))
        return pa.concat_tables(tables) if tables else pa.table({})


TOKEN_COLUMNS = ("id", "position", "token", "char_start", "char_end", "vector")


def open_output(path: str) -> Output:
    store = Store(path)
    manifest = read_manifest(store)
    ledger = Ledger(store)
    tokens = ledger.token_files()
    return Output(store, manifest, VectorParts(store, ledger.vector_files()),
                  VectorParts(store, tokens) if tokens else None,
                  tuple(ledger.multivector_files()))


__all__ = ["Output", "open_output"]
