"""What a folder's index holds, by its precision (output.precision), and the FAISS calls that
differ between float and binary indexes.

- float32 / float16 folders: float indexes over the vectors as stored.
- int8 / uint8 folders: the scalar-quantizer kinds (SQ8), their per-dimension ranges set to the
  folder's calibration. FAISS's 8-bit code of a value v is floor(255 (v - min) / (max - min))
  and decodes to min + (code + 0.5) (max - min) / 255: fed the stored values dequantized (the
  middle of each bucket), it stores exactly the stored bucket numbers (uint8: int8 + 128), one
  byte a dimension, and a float query is scored against the dequantized vectors.
- binary / ubinary folders: FAISS's binary indexes (IndexBinaryFlat, IndexBinaryHNSW,
  IndexBinaryIVF) over the packed bits as uint8 codes, searched by Hamming distance with the
  query's bits (`> 0`, as quantize_embeddings sets them).
"""
from __future__ import annotations

import hashlib

import faiss
import numpy as np

from ..io.precision import CALIBRATED, Precision

FLOAT, SQ8, BINARY = "float", "sq8", "binary"
# the id maps flat and HNSW kinds are kept in for their labels
ID_MAPS = (faiss.IndexIDMap, faiss.IndexIDMap2, faiss.IndexBinaryIDMap, faiss.IndexBinaryIDMap2)


def codes_of(precision: Precision) -> str:
    """float, sq8 (int8 / uint8 folders) or binary (binary / ubinary folders)."""
    if precision.name.endswith("binary"):
        return BINARY
    return SQ8 if precision.name in CALIBRATED else FLOAT


def query_values(precision: Precision, vectors: np.ndarray) -> np.ndarray:
    """Float query vectors as the folder's index takes them: binary kinds' packed bits
    (uint8), else float32."""
    vectors = np.ascontiguousarray(vectors, np.float32)
    if codes_of(precision) == BINARY:
        return np.packbits(vectors > 0, axis=-1)
    return vectors


def is_binary(index: faiss.Index | faiss.IndexBinary) -> bool:
    return isinstance(index, faiss.IndexBinary)


def downcast(index):
    return faiss.downcast_IndexBinary(index) if is_binary(index) else faiss.downcast_index(index)


def unwrapped(index):
    """The index inside its id map (flat and HNSW are kept in an IndexIDMap2 for their labels)."""
    inner = downcast(index)
    while isinstance(inner, ID_MAPS):
        inner = downcast(inner.index)
    return inner


def hnsw_of(index):
    """The HNSW graph of an HNSW index (float or binary), else None."""
    inner = unwrapped(index)
    return inner.hnsw if isinstance(inner, (faiss.IndexHNSW, faiss.IndexBinaryHNSW)) else None


def ivf_of(index):
    """The IVF index inside (float or binary), else None."""
    if is_binary(index):
        inner = unwrapped(index)
        return inner if isinstance(inner, faiss.IndexBinaryIVF) else None
    return faiss.try_extract_index_ivf(index)


def with_labels(index):
    """An index that takes add_with_ids: IVF kinds as they are, others in an id map (which also
    reconstructs by label)."""
    if ivf_of(index) is not None or isinstance(downcast(index), ID_MAPS):
        return index
    return faiss.IndexBinaryIDMap2(index) if is_binary(index) else faiss.IndexIDMap2(index)


def serialize(index) -> np.ndarray:
    return faiss.serialize_index_binary(index) if is_binary(index) else faiss.serialize_index(index)


def deserialize(data: np.ndarray | bytes, binary: bool):
    data = np.frombuffer(data, np.uint8) if isinstance(data, bytes) else data
    return faiss.deserialize_index_binary(data) if binary else faiss.deserialize_index(data)


def read(path: str, binary: bool, flags: int = 0):
    return faiss.read_index_binary(path, flags) if binary else faiss.read_index(path, flags)


def exact_knn(queries: np.ndarray, block: np.ndarray, k: int,
              metric: int) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force (distances, positions in block): Hamming for uint8 codes, else the metric."""
    if queries.dtype == np.uint8:
        flat = faiss.IndexBinaryFlat(block.shape[1] * 8)
        flat.add(block)
        distances, positions = flat.search(queries, k)
        return distances.astype(np.float32), positions
    return faiss.knn(queries, block, k, metric=metric)


def set_ranges(index, precision: Precision) -> None:
    """Give the 8-bit scalar quantizer inside the folder's calibration ranges (see above), so
    its codes are the stored values; IVF kinds encode vectors, not residuals. Flat and HNSW
    kinds need no training after this; IVF kinds train their lists first, then call it again."""
    if codes_of(precision) != SQ8 or precision.calibration is None:
        return
    inner = unwrapped(index)
    ivf = ivf_of(index)
    if ivf is not None:
        ivf = downcast(ivf)
        if isinstance(ivf, faiss.IndexIVFScalarQuantizer) and eight_bit(ivf.sq):
            ivf.by_residual = False
            if ivf.is_trained:  # train() fits the lists and its own ranges: ours replace them
                _copy_ranges(ivf.sq, precision)
        return
    holder = downcast(inner.storage) if isinstance(inner, faiss.IndexHNSW) else inner
    if isinstance(holder, faiss.IndexScalarQuantizer) and eight_bit(holder.sq):
        _copy_ranges(holder.sq, precision)
        holder.is_trained = True
        inner.is_trained = True


def ranges_digest(precision: Precision) -> str | None:
    """A short digest of the ranges an SQ8 index holds (None for other codes): an index built
    with other ranges than the folder's is rebuilt, not maintained."""
    if codes_of(precision) != SQ8 or precision.calibration is None:
        return None
    return hashlib.sha256(precision.calibration.ranges.tobytes()).hexdigest()[:16]


def eight_bit(sq: faiss.ScalarQuantizer) -> bool:
    return sq.qtype == faiss.ScalarQuantizer.QT_8bit


def _copy_ranges(sq: faiss.ScalarQuantizer, precision: Precision) -> None:
    low, high = precision.calibration.ranges
    span = np.where(high == low, 255, high - low)  # Precision's step of 1 for a flat dimension
    faiss.copy_array_to_vector(np.concatenate([low, span]).astype(np.float32), sq.trained)
