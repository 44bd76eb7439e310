"""Writing an index so that the folder always names a whole one.

Every build or maintenance writes its files under new names (index/index-<build>.faiss,
ids-<build>.parquet, tombstones-<build>.npy, and the layouts' shard/ivfdata files), then
index_infos.json naming them: that one atomic write is the commit. Until it, the earlier infos
still name the earlier, whole files; after it, files no infos name are removed. A process killed
in between leaves only strays, removed by the next commit.
"""
from __future__ import annotations

import hashlib
import io
import re
import time
import uuid
from typing import Iterable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..faults import checkpoint
from ..io.checks import WRITE_CHECKSUMS, file_digest
from ..io.storage import TMP_MARK, Store
from .files import INDEX_DIR, INFOS_FILE

BUILT = re.compile(r"(index(-.+)?\.faiss|ids(-.+)?\.parquet|tombstones-.+\.npy|shard-.+\.faiss"
                   r"|merged-.+\.ivfdata|labels-.+\.bin"
                   r"|sample-.+\.npy|queries-.+\.npy)")


def new_build() -> str:
    """A name for one build's files: when, and a random tail against clashes."""
    return f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:6]}"


def commit_index(store: Store, build: str, index_bytes: bytes | None,
                 id_map: pa.Table | Iterable[pa.Table] | None, tombstones: np.ndarray | None,
                 infos: dict) -> dict:
    """Write the index and id map (and tombstones, if any) under the build's names, then the
    infos naming them (the commit), then remove what earlier builds left. Returns the infos.
    `id_map`: a table, or tables of one schema streamed into the file a block at a time (a
    sharded build's: the process holds one part's ids, not the folder's)."""
    previous = infos.get("files") or {}
    # index_bytes None with an index_file named: that file is kept as it is (maintenance that
    # neither added nor removed a vector)
    infos = {k: v for k, v in infos.items()
             if k not in ("ids_file", "tombstones_file", "files")
             and (k != "index_file" or index_bytes is None)}
    written: dict[str, bytes] = {}
    if index_bytes is not None:
        infos["index_file"] = f"{INDEX_DIR}/index-{build}.faiss"
        written[infos["index_file"]] = index_bytes
    streamed: dict[str, dict] = {}
    if isinstance(id_map, pa.Table):
        infos["ids_file"] = f"{INDEX_DIR}/ids-{build}.parquet"
        buffer = io.BytesIO()
        pq.write_table(id_map, buffer, **WRITE_CHECKSUMS)
        written[infos["ids_file"]] = buffer.getvalue()
    elif id_map is not None:
        infos["ids_file"] = f"{INDEX_DIR}/ids-{build}.parquet"
        streamed[infos["ids_file"]] = _write_streamed(store, infos["ids_file"], id_map)
    if tombstones is not None and len(tombstones):
        infos["tombstones_file"] = f"{INDEX_DIR}/tombstones-{build}.npy"
        buffer = io.BytesIO()
        np.save(buffer, np.sort(np.asarray(tombstones, np.int64)))
        written[infos["tombstones_file"]] = buffer.getvalue()
    for rel, body in written.items():
        store.write_bytes(rel, body)
    # every file the infos name, with its size and sha256 (index/check.py: index_damage); the
    # layouts' shard and ivfdata files were written before, and are read back once here
    infos["files"] = {rel: {"bytes": len(body), "digest": hashlib.sha256(body).hexdigest()[:32]}
                      for rel, body in written.items()} | streamed
    for rel in sorted(named_files(infos) - set(written) - set(streamed)):
        infos["files"][rel] = previous.get(rel) or {"bytes": store.size(rel),
                                                    "digest": file_digest(store, rel)}
    checkpoint("index-commit")  # new files whole, the infos still name the earlier ones
    store.write_json(INFOS_FILE, infos)
    remove_unnamed(store, infos)
    return infos


class _Digesting:
    """A file object that hands what is written on and keeps its size and sha256."""

    def __init__(self, handle):
        self.handle, self.size, self.sha = handle, 0, hashlib.sha256()
        self.closed = False

    def write(self, data) -> int:
        data = bytes(data)
        self.handle.write(data)
        self.sha.update(data)
        self.size += len(data)
        return len(data)

    def tell(self) -> int:
        return self.size

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True


def _write_streamed(store: Store, rel: str, tables: Iterable[pa.Table]) -> dict:
    """The tables as one Parquet file at rel (atomically), a block at a time; its size and
    digest as the infos record them."""
    with store.open_atomic(rel) as handle:
        sink = _Digesting(handle)
        writer = None
        for table in tables:
            if writer is None:  # no dictionary: ids are distinct, and its builder holds ~50 MB
                writer = pq.ParquetWriter(sink, table.schema, use_dictionary=False,
                                          **WRITE_CHECKSUMS)
            writer.write_table(table)
        if writer is None:
            raise ValueError(f"{rel}: an id map of no blocks")
        writer.close()
    return {"bytes": sink.size, "digest": sink.sha.hexdigest()[:32]}


def named_files(infos: dict) -> set[str]:
    return ({infos.get(k) for k in ("index_file", "ids_file", "tombstones_file", "ivfdata")}
            | {s["file"] for s in infos.get("shards", [])}) - {None}


def remove_unnamed(store: Store, infos: dict) -> None:
    """Index files of earlier builds (and of folders from before builds were named)."""
    keep = named_files(infos)
    for name in store.listdir(INDEX_DIR):
        rel = f"{INDEX_DIR}/{name}"
        if BUILT.fullmatch(name) and TMP_MARK not in name and rel not in keep:
            store.remove(rel)
