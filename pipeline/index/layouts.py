"""Index layouts for IVF kinds beyond one in-memory index.

`shards` trains once, then adds each group of consecutive parts to its own copy of the trained
index (ids = the rows' labels), written as index/shard-<build>-NNNNN.faiss and searched
together, memory-mapped. `ondisk` merges those shards with FAISS's OnDiskInvertedLists into
index/merged-<build>.ivfdata, which index.faiss references and search memory-maps (local disks
only). With the same trained index and nprobe both return what `single` returns.
"""
from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass
from typing import Callable, Iterator

import faiss
import numpy as np

from ..config import ConfigError, IndexConfig
from ..faults import checkpoint
from ..io.precision import Precision
from ..io.storage import TMP_MARK, Store
from ..io.vectors import VectorParts
from .choose import BINARY_LAYOUT, new_index
from .family import is_binary, serialize
from .files import (INDEX_DIR, faiss_stdout_to_stderr, load_array, read_stored_index,
                    save_array)
from .labels import LabelCheckJob, LabelJob
from .tuning import TopK, index_search, train_quantizer

log = logging.getLogger(__name__)


def choose_layout(cfg: IndexConfig, index: faiss.Index, factory: str, store: Store) -> str:
    """The layout to build: shards and ondisk need an IVF index, ondisk a local disk."""
    if cfg.layout == "single":
        return "single"
    if is_binary(index):
        raise ConfigError(BINARY_LAYOUT.format(layout=cfg.layout))
    if faiss.try_extract_index_ivf(index) is None:
        if cfg.type == "auto":  # auto chose flat or HNSW for this count: nothing to shard
            log.warning("index.layout = %r: auto chose %s, not IVF; building one index",
                        cfg.layout, factory)
            return "single"
        raise ConfigError(f"index.layout = {cfg.layout!r} needs an IVF index; {factory!r} is not")
    if cfg.layout == "ondisk" and not store.local:
        raise ConfigError(f"index.layout = 'ondisk' memory-maps a local file; {store.url} is not "
                          f"on a local disk (use layout 'shards' or 'single' there)")
    return cfg.layout

def shard_groups(rows: list[int], shard_rows: int) -> list[list[int]]:
    """Consecutive part indices grouped up to shard_rows rows a group (a larger part alone)."""
    groups: list[list[int]] = []
    filled = 0
    for i, r in enumerate(rows):
        if not groups or filled + r > shard_rows:
            groups.append([])
            filled = 0
        groups[-1].append(i)
        filled += r
    return groups

def write_shard(store: Store, trained: np.ndarray, parts: VectorParts, rel: str,
                on_block: Callable[[np.ndarray, np.ndarray], None] | None = None) -> int:
    """Add the parts' vectors, with ids = their labels, to a copy of the serialized trained
    index and write it to rel. The unit of work of a shard worker; it holds only these parts'
    codes. `on_block` sees each block of vectors, with its labels, as it is added. Returns the
    rows added."""
    index = faiss.deserialize_index(trained)
    labels, row = parts.row_labels(), 0
    for block in parts.vectors():
        index.add_with_ids(block, labels[row:row + len(block)])
        if on_block is not None:
            on_block(block, labels[row:row + len(block)])
        row += len(block)
    store.write_bytes(rel, faiss.serialize_index(index).tobytes())
    return row


@dataclass(frozen=True)
class ShardJob:
    """One shard file to write: these parts added to the trained index (read from the file
    `trained`, written once for every job); with `queries` (an .npy file), their exact
    neighbours among the shard's rows too (recall's truth, computed where the vectors are read
    anyway)."""
    rel: str
    trained: str
    parts: VectorParts
    identities: tuple[str, ...] = ()  # the parts' (shard_build.part_identities); () for none
    first_row: int = 0  # the shard's first row in the whole index
    queries: str | None = None
    k: int = 10
    metric: str = "ip"

    def run(self) -> dict:
        """The shard file written whole, and what the infos record of it, with the process
        that wrote it; with queries, "truth": (distances, positions, labels) [queries, k]."""
        checkpoint("shard")  # a worker about to write a shard: nothing of it is on disk yet
        store = self.parts.store
        top = TopK(load_array(store, self.queries), self.k, self.metric, self.first_row) \
            if self.queries is not None else None
        rows = write_shard(store, np.frombuffer(store.read_bytes(self.trained), np.uint8),
                           self.parts, self.rel, top.add if top is not None else None)
        done = {"file": self.rel, "rows": rows, "parts": list(self.identities),
                "pid": os.getpid(), "host": socket.gethostname()}
        if top is not None:
            done["truth"] = (top.distances, top.positions, top.labels)
        return done


@dataclass(frozen=True)
class SampleJob:
    """The stored vectors at these positions (counted within the parts), read where the parts
    are: the recall queries' returned, the training sample's written to `rel` (.npy) for the
    TrainJob, so that neither the sample nor its training passes through the planning process."""
    parts: VectorParts
    queries: np.ndarray
    training: np.ndarray
    rel: str

    def run(self) -> np.ndarray:
        wanted = np.union1d(self.queries, self.training)
        sample = self.parts.sample(wanted)
        save_array(self.parts.store, self.rel, sample[np.isin(wanted, self.training)])
        return sample[np.isin(wanted, self.queries)]


@dataclass(frozen=True)
class TrainJob:
    """The index for n vectors (choose.new_index: built here, since an index's clustering
    settings, spherical k-means for inner product, are not serialized) trained on the
    SampleJobs' files: (the trained, empty index serialized, tuning.training_error)."""
    cfg: IndexConfig
    n: int
    dim: int
    precision: Precision
    store: Store
    files: tuple[str, ...]

    def run(self) -> tuple[bytes, float | None]:
        index, _, _ = new_index(self.cfg, self.n, self.dim, self.precision)
        training = np.concatenate([load_array(self.store, rel) for rel in self.files])
        fit = train_quantizer(index, training, self.precision)
        return serialize(index).tobytes(), fit


@dataclass(frozen=True)
class SearchJob:
    """One shard file searched for the recall queries (an .npy file), memory-mapped where it
    lies: (distances, labels) [queries, k] at this nprobe."""
    store: Store
    rel: str
    queries: str
    k: int
    nprobe: int | None

    def run(self) -> tuple[np.ndarray, np.ndarray]:
        shard = read_stored_index(self.store, self.rel, faiss.IO_FLAG_MMAP)
        return index_search(shard)(load_array(self.store, self.queries), self.k, self.nprobe)


@dataclass(frozen=True)
class MergeJob:
    """The `ondisk` merge of the shard files (merge_shards_ondisk) on a worker, on FAISS's
    OpenMP threads: (the merged index serialized: where each list lies in the .ivfdata file,
    not the lists themselves; the .ivfdata file; the process that merged, as the infos
    record it)."""
    store: Store
    trained: str
    shards: tuple[str, ...]
    build: str

    def run(self) -> tuple[bytes, str, dict]:
        merged, rel = merge_shards_ondisk(
            self.store, np.frombuffer(self.store.read_bytes(self.trained), np.uint8),
            list(self.shards), self.build)
        return (faiss.serialize_index(merged).tobytes(), rel,
                {"pid": os.getpid(), "host": socket.gethostname()})


Job = ShardJob | SampleJob | TrainJob | SearchJob | MergeJob | LabelJob | LabelCheckJob
ShardRunner = Callable[[list[Job]], list]  # runs the jobs, returns their results in order


def run_here(jobs: list[Job]) -> list:
    """The local runner's ShardRunner: one job after another in this process."""
    return [job.run() for job in jobs]


JOBS_A_CALL = 64  # jobs handed to a runner at once where each returns an array to merge


def calls(runner: ShardRunner, jobs: list[Job]) -> Iterator[tuple[list[Job], list]]:
    """(jobs, their results), the jobs handed to the runner JOBS_A_CALL at a time, so that the
    caller merges one call's results before the next call's arrive: it holds a call's results,
    not a result for each of a billion-row index's shards."""
    for at in range(0, len(jobs), JOBS_A_CALL):
        batch = jobs[at:at + JOBS_A_CALL]
        yield batch, runner(batch)


def open_shards(store: Store, names: list[str]) -> faiss.IndexShards:
    """The shard files as one index; their ids are the rows' labels, kept as they are.
    On a local disk the inverted lists stay memory-mapped (IO_FLAG_MMAP)."""
    shards = None
    for name in names:
        shard = read_stored_index(store, name, faiss.IO_FLAG_MMAP)
        if shards is None:
            shards = faiss.IndexShards(shard.d, False, False)  # not threaded, ids as stored
        shards.add_shard(shard)  # the wrapper keeps a reference to shard
    return shards

def merge_shards_ondisk(store: Store, trained: np.ndarray, shards: list[str],
                        build: str) -> tuple[faiss.Index, str]:
    """faiss.contrib.ondisk.merge_ondisk of the shards into index/merged-<build>.ivfdata (under a
    temporary name until complete); returns the merged index, whose lists are memory-mapped."""
    from faiss.contrib.ondisk import merge_ondisk

    rel = f"{INDEX_DIR}/merged-{build}.ivfdata"
    final = store.path(rel)
    tmp = store.path(f"{INDEX_DIR}/.merged-{build}.ivfdata{TMP_MARK}{os.getpid()}")
    index = faiss.deserialize_index(trained)
    try:
        with faiss_stdout_to_stderr():
            merge_ondisk(index, [store.path(rel) for rel in shards], tmp)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, final)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    invlists = faiss.downcast_InvertedLists(faiss.extract_index_ivf(index).invlists)
    invlists.filename = final  # index.faiss names the final file (search resolves it by basename)
    return index, rel
