"""Where a folder's index lives, and reading its stored FAISS files."""
from __future__ import annotations

import io
import os
import sys
from contextlib import contextmanager
from typing import Iterator

import faiss
import numpy as np
import pyarrow.parquet as pq

from ..io.checks import PAGE_CHECKSUMS, reading
from ..io.storage import Store
from . import family

INDEX_DIR = "index"
INDEX_FILE = f"{INDEX_DIR}/index.faiss"
IDS_FILE = f"{INDEX_DIR}/ids.parquet"
INFOS_FILE = f"{INDEX_DIR}/index_infos.json"
# infos["labels"] of an index whose rows are under their stored labels ("unit-row": written
# before rows kept their own, the same labels for those parts); else "position" (rebuilt)
LABELLED = ("stored", "unit-row")


def read_stored_index(store: Store, rel: str, flags: int = 0, binary: bool = False) -> faiss.Index:
    """A stored index: read (memory-mapped with IO_FLAG_MMAP) from a local disk, else fetched;
    `binary`: a binary index (infos["codes"] == "binary")."""
    if store.local:
        return family.read(store.path(rel), binary, flags)
    return family.deserialize(store.read_bytes(rel), binary)

@contextmanager
def faiss_stdout_to_stderr() -> Iterator[None]:
    """FAISS's C++ notices (ondisk resizing, path updates) print to stdout, which carries the
    command's output (e.g. `search --json`); send them to stderr meanwhile."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def index_file(infos: dict) -> str:
    """The index file the infos name (folders written before builds were named: index.faiss)."""
    return infos.get("index_file", INDEX_FILE)

def ids_file(infos: dict) -> str:
    return infos.get("ids_file", IDS_FILE)

def read_tombstones(store: Store, infos: dict) -> np.ndarray:
    """Labels an HNSW index still holds but that are no longer stored, sorted (index/maintain.py)."""
    name = infos.get("tombstones_file")
    if not name:
        return np.zeros(0, np.int64)
    return load_array(store, name)


def save_array(store: Store, rel: str, array: np.ndarray) -> None:
    """An array (.npy) in the folder: a build's scratch that its jobs read, written once."""
    buffer = io.BytesIO()
    np.save(buffer, array)
    store.write_bytes(rel, buffer.getvalue())


def load_array(store: Store, rel: str) -> np.ndarray:
    """An array save_array wrote."""
    return np.load(io.BytesIO(store.read_bytes(rel)))


def read_id_map(store: Store, infos: dict) -> np.ndarray:
    """The labels the index holds live, from its id map (faiss_id, in row order)."""
    with reading(ids_file(infos)), store.open_input(ids_file(infos)) as handle:
        table = pq.read_table(handle, columns=["faiss_id"], **PAGE_CHECKSUMS)
    return table.column(0).to_numpy().astype(np.int64)
