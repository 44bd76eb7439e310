"""Writing an index so that the folder always names a whole one.

Every build or maintenance writes its files under new names (index/index-<build>.faiss,
ids-<build>.parquet, tombstones-<build>.npy, and the layouts' shard/ivfdata files), then
index_infos.json naming them: that one atomic write is the commit. Until it, the earlier infos
still name the earlier, whole files; after it, files no infos name are removed. A process killed
in between leaves only strays, removed by the next commit.
"""
from __future__ import annotations

import io
import re
import time
import uuid

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..faults import checkpoint
from ..io.storage import TMP_MARK, Store
from .files import INDEX_DIR, INFOS_FILE

BUILT = re.compile(r"(index(-.+)?\.faiss|ids(-.+)?\.parquet|tombstones-.+\.npy|shard-.+\.faiss"
                   r"|merged-.+\.ivfdata)")


def new_build() -> str:
    """A name for one build's files: when, and a random tail against clashes."""
    return f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:6]}"


def commit_index(store: Store, build: str, index_bytes: bytes | None, id_map: pa.Table | None,
                 tombstones: np.ndarray | None, infos: dict) -> dict:
    """Write the index and id map (and tombstones, if any) under the build's names, then the
    infos naming them (the commit), then remove what earlier builds left. Returns the infos."""
    infos = {k: v for k, v in infos.items()
             if k not in ("index_file", "ids_file", "tombstones_file")}
    if index_bytes is not None:
        infos["index_file"] = f"{INDEX_DIR}/index-{build}.faiss"
        store.write_bytes(infos["index_file"], index_bytes)
    if id_map is not None:
        infos["ids_file"] = f"{INDEX_DIR}/ids-{build}.parquet"
        with store.open_atomic(infos["ids_file"]) as handle:
            pq.write_table(id_map, handle)
    if tombstones is not None and len(tombstones):
        infos["tombstones_file"] = f"{INDEX_DIR}/tombstones-{build}.npy"
        buffer = io.BytesIO()
        np.save(buffer, np.sort(np.asarray(tombstones, np.int64)))
        store.write_bytes(infos["tombstones_file"], buffer.getvalue())
    checkpoint("index-commit")  # new files whole, the infos still name the earlier ones
    store.write_json(INFOS_FILE, infos)
    remove_unnamed(store, infos)
    return infos


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
