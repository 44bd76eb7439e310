"""Whether the stored rows' labels are all distinct, decided by jobs, so that the process that
plans a sharded build holds nothing a row.

Each `LabelJob` reads one group of parts' labels (the faiss_id column, nothing else) and writes
them cut by hash into `partitions` spans of one scratch file, index/labels-<build>-NNNNN.bin:
(partitions + 1) int64 offsets, then the labels, partition after partition. Each
`LabelCheckJob` reads one partition's span of every file and counts the labels it holds more
than once: a label's copies all land in its partition. The scratch files are removed when the
check ends; a killed build's are removed by the next index commit (commit.BUILT).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from ..io.content_hash import partition_order
from ..io.storage import Store
from ..io.vectors import VectorParts
from .files import INDEX_DIR

LABELS_PER_CHECK = 25_000_000  # labels one check job holds (200 MB, twice that while sorting)
_OFFSET = np.dtype("<i8")


@dataclass(frozen=True)
class LabelJob:
    """One group of parts' labels, written cut by partition to `rel`."""
    parts: VectorParts
    rel: str
    partitions: int

    def run(self) -> int:
        labels = self.parts.row_labels()
        order, offsets = partition_order(labels, self.partitions)
        self.parts.store.write_bytes(self.rel, offsets.astype(_OFFSET).tobytes()
                                     + labels[order].astype(_OFFSET).tobytes())
        return len(labels)


@dataclass(frozen=True)
class LabelCheckJob:
    """One partition of every LabelJob's file: how many of its labels repeat an earlier one."""
    store: Store
    files: tuple[str, ...]
    partition: int
    partitions: int

    def run(self) -> int:
        pieces = []
        size = _OFFSET.itemsize
        for rel in self.files:
            with self.store.fs.open(self.store.path(rel), "rb") as handle:
                handle.seek(self.partition * size)
                start, end = np.frombuffer(handle.read(2 * size), _OFFSET)
                handle.seek((self.partitions + 1 + int(start)) * size)
                pieces.append(np.frombuffer(handle.read(int(end - start) * size), _OFFSET))
        labels = np.concatenate(pieces) if pieces else np.zeros(0, _OFFSET)
        return len(labels) - len(np.unique(labels))


def repeated_labels(runner: Callable[[list], list], parts: VectorParts,
                    groups: list[list[int]], build: str) -> int:
    """How many stored rows carry a label an earlier row has, checked by the runner's jobs: one
    LabelJob a group of parts, then one LabelCheckJob a partition."""
    n = sum(parts.rows())
    partitions = max(1, -(-n // LABELS_PER_CHECK))
    spills = [LabelJob(parts.subset(group), f"{INDEX_DIR}/labels-{build}-{number:05d}.bin",
                       partitions) for number, group in enumerate(groups)]
    try:
        runner(spills)
        files = tuple(job.rel for job in spills)
        return sum(runner([LabelCheckJob(parts.store, files, p, partitions)
                           for p in range(partitions)]))
    finally:
        for job in spills:
            if parts.store.exists(job.rel):
                parts.store.remove(job.rel)
