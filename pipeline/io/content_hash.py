"""Stable hashes of what the model sees for a row, and 64-bit keys for columnar lookups.

`text_hash` (stored beside every vector) is BLAKE2b-128 of the prompt and the raw text (and the
second text of a sentence pair), each length-prefixed so no two inputs share a byte stream. It
is stable across processes, machines and versions of Python, unlike `hash()`; the manifest
records its name (CONTENT_HASH), and vectors are reused only between parts hashed alike.

Keys are the first 8 bytes of a hash as uint64: lookups sort and search numpy arrays of keys
(8 bytes a row, no Python object per row) and confirm a match on the full 16 bytes and the id.
"""
from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa

CONTENT_HASH = "blake2b-128/prompt+text/v1"
HASH_BYTES = 16
HASH_TYPE = pa.binary(HASH_BYTES)
_FIBONACCI = np.uint64(0x9E3779B97F4A7C15)  # 2^64 / golden ratio: nearby keys spread evenly


def _prefixed(data: bytes) -> bytes:
    return len(data).to_bytes(8, "little") + data


def text_hashes(texts: list[str], pairs: list[str] | None = None, prompt: str = "") -> pa.Array:
    """One 16-byte hash a row (a fixed-size binary array)."""
    base = hashlib.blake2b(_prefixed(prompt.encode()), digest_size=HASH_BYTES)
    out = bytearray()
    for i, text in enumerate(texts):
        h = base.copy()
        h.update(_prefixed(text.encode("utf-8", "surrogatepass")))
        if pairs is not None:
            h.update(_prefixed(pairs[i].encode("utf-8", "surrogatepass")))
        out += h.digest()
    return pa.FixedSizeBinaryArray.from_buffers(HASH_TYPE, len(texts), [None, pa.py_buffer(out)])


def hash_keys(hashes: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """uint64 keys: the first 8 bytes of each hash (nulls are not expected)."""
    if isinstance(hashes, pa.ChunkedArray):
        hashes = hashes.combine_chunks()
    data = np.frombuffer(hashes.buffers()[1], np.uint8)
    start = hashes.offset * HASH_BYTES
    raw = data[start:start + len(hashes) * HASH_BYTES].reshape(-1, HASH_BYTES)
    return np.ascontiguousarray(raw[:, :8]).view("<u8").reshape(-1)


def hash_bytes(hashes: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """The hashes as an [n, 16] uint8 array (for comparing whole hashes)."""
    if isinstance(hashes, pa.ChunkedArray):
        hashes = hashes.combine_chunks()
    data = np.frombuffer(hashes.buffers()[1], np.uint8)
    start = hashes.offset * HASH_BYTES
    return data[start:start + len(hashes) * HASH_BYTES].reshape(-1, HASH_BYTES)


def id_keys(ids: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """uint64 keys of ids: an integer id is its own key (exact); a string id's key is 8 bytes of
    BLAKE2b, so equal keys of string ids must be confirmed on the ids themselves."""
    if isinstance(ids, pa.ChunkedArray):
        ids = ids.combine_chunks()
    if pa.types.is_integer(ids.type):
        return ids.cast(pa.int64()).to_numpy(zero_copy_only=False).view(np.uint64)
    return np.frombuffer(b"".join([hashlib.blake2b(s.encode("utf-8", "surrogatepass"),
                                                   digest_size=8).digest()
                                   for s in ids.to_pylist()]), "<u8").astype(np.uint64)


def pair_keys(ids: np.ndarray, texts: np.ndarray) -> np.ndarray:
    """One uint64 key for (id key, text key): reuse by id and content looks up both at once."""
    mixed = ids * _FIBONACCI
    return mixed ^ (mixed >> np.uint64(29)) ^ texts


def partition_of(keys: np.ndarray, partitions: int) -> np.ndarray:
    """Each 64-bit key's partition in [0, partitions) (Fibonacci hashing): every copy of a key
    lands in one partition, and consecutive keys (labels, integer ids) spread evenly."""
    with np.errstate(over="ignore"):
        mixed = np.asarray(keys).astype(np.uint64, copy=False) * _FIBONACCI
    return ((mixed >> np.uint64(32)) % np.uint64(partitions)).astype(np.int64)


def partition_order(keys: np.ndarray, partitions: int) -> tuple[np.ndarray, np.ndarray]:
    """(order, bounds): the positions of `keys` grouped by partition (stable within one), and
    partition p's positions order[bounds[p]:bounds[p + 1]]."""
    where = partition_of(keys, partitions)
    order = np.argsort(where, kind="stable")
    return order, np.searchsorted(where[order], np.arange(partitions + 1))
