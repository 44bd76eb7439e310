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

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..faults import checkpoint
from ..io.checks import WRITE_CHECKSUMS, file_digest
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
    if id_map is not None:
        infos["ids_file"] = f"{INDEX_DIR}/ids-{build}.parquet"
        buffer = io.BytesIO()
        pq.write_table(id_map, buffer, **WRITE_CHECKSUMS)
        written[infos["ids_file"]] = buffer.getvalue()
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
                      for rel, body in written.items()}
    for rel in sorted(named_files(infos) - set(written)):
        infos["files"][rel] = previous.get(rel) or {"bytes": store.size(rel),
                                                    "digest": file_digest(store, rel)}
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
