"""Build a FAISS index over the stored vectors, streamed part by part, with its id map and infos.

Index choice (a factory string from the config, or `auto` from the count and a memory budget) is
kept apart from building; IVF kinds train on an even sample, then add part by part, so the whole
vector set is never in memory at once. The search-time knobs (efSearch, nprobe) are written into
index_infos.json and applied by `load_index`, so a search runs the index as it was measured.

Layouts (IVF kinds): `single` adds every part to one in-memory index. `shards` trains once, then
adds each group of consecutive parts to its own copy of the trained index (ids = global row
positions), written as index/shard-<build>-NNNNN.faiss and searched together, memory-mapped.
`ondisk` merges those shards with FAISS's OnDiskInvertedLists into index/merged-<build>.ivfdata,
which index.faiss references and search memory-maps (local disks only). With the same trained
index and nprobe the three return the same ids and distances. index_infos.json, written last,
names the layout's files; files of earlier builds are removed after it.
"""
from __future__ import annotations

import json
import logging
import time
import uuid

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..config import ConfigError, IndexConfig
from ..io.storage import Store
from ..io.vectors import VectorParts
from .choose import new_index, training_size
from .files import IDS_FILE, INDEX_FILE, INFOS_FILE, faiss_stdout_to_stderr, read_stored_index
from .layouts import (build_shards, choose_layout, merge_shards_ondisk, open_shards,
                      remove_earlier_builds)
from .tuning import RECALL_QUERIES, apply_search_params, even_positions, measure

log = logging.getLogger(__name__)


def build_index(store: Store, files: list[str], cfg: IndexConfig) -> dict:
    """Build, write atomically, and describe the index for the given parts. Returns the infos.

    The ip-without-cosine warning goes by the vectors themselves (a sample's norms), so a model
    that normalises on its own draws no warning."""
    started = time.perf_counter()
    parts = VectorParts(store, files)
    rows = parts.rows()
    n = sum(rows)
    dim = parts.dimension()
    if n == 0:
        store.remove(INDEX_FILE)
        store.remove(IDS_FILE)
        infos = {"type": cfg.type, "count": 0}
        store.write_json(INFOS_FILE, infos)
        remove_earlier_builds(store, set())
        return infos
    index, kind, factory = new_index(cfg, n, dim)
    layout = choose_layout(cfg, index, factory, store)
    trained_on = 0
    if not index.is_trained:
        trained_on = training_size(index, n)
        index.train(parts.sample(even_positions(n, trained_on)))
    layout_infos: dict = {"layout": layout}
    if layout == "single":
        for block in parts.vectors():
            index.add(block)
        index_bytes = faiss.serialize_index(index)
    else:
        build = f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:6]}"
        trained = faiss.serialize_index(index)
        shards = build_shards(store, parts, rows, trained, build, cfg.shard_rows)
        layout_infos["shard_rows"] = cfg.shard_rows
        if layout == "shards":
            index = open_shards(store, [s["file"] for s in shards])
            index_bytes = trained  # index.faiss: the trained (empty) index the shards share
            layout_infos["shards"] = shards
            layout_infos["shards_bytes"] = sum(store.size(s["file"]) for s in shards)
        else:
            index, ivfdata = merge_shards_ondisk(store, trained, shards, build)
            index_bytes = faiss.serialize_index(index)
            for shard in shards:
                store.remove(shard["file"])
            layout_infos["ivfdata"] = ivfdata
            layout_infos["ivfdata_bytes"] = store.size(ivfdata)
            layout_infos["merged_shards"] = len(shards)

    build_seconds = time.perf_counter() - started
    measured, params, unit = measure(index, parts, n, cfg)
    if cfg.metric == "ip" and not unit:
        log.warning("index.metric = 'ip' on vectors that are not normalised is not cosine "
                    "similarity; set encode.normalize = true for cosine")
    store.write_bytes(INDEX_FILE, index_bytes.tobytes())

    id_map = parts.keys()  # id, and chunk in a folder of one row a window
    id_map = id_map.add_column(0, "faiss_id", pa.array(np.arange(n, dtype=np.int64)))
    with store.open_atomic(IDS_FILE) as handle:
        pq.write_table(id_map, handle)
    size = store.size(INDEX_FILE) + layout_infos.get("shards_bytes", 0) + layout_infos.get(
        "ivfdata_bytes", 0)
    infos = {
        "type": cfg.type, "kind": kind, "factory": factory, "count": n, "dimension": dim,
        "metric": cfg.metric, "normalized": unit, "size_bytes": size,
        "build_seconds": round(build_seconds, 3), "recall_at_10": round(measured, 4),
        "recall_queries": min(n, RECALL_QUERIES), "search_params": params,
        "trained_on": trained_on, "max_memory": cfg.max_memory if cfg.type == "auto" else None,
        **layout_infos,
        "parts": [{"file": f, "rows": r} for f, r in zip(files, rows)],
    }
    store.write_json(INFOS_FILE, infos)
    remove_earlier_builds(store, {s["file"] for s in layout_infos.get("shards", [])}
                          | {layout_infos.get("ivfdata")})
    log.info("index: %s", json.dumps({k: v for k, v in infos.items()
                                      if k not in ("parts", "shards")}))
    return infos

def load_index(store: Store) -> tuple[faiss.Index, dict]:
    """The folder's index with the search parameters it was measured with, and its infos.

    shards: the shard files as one faiss.IndexShards (memory-mapped on a local disk, fetched
    into memory from an object store); ondisk: index.faiss with its lists memory-mapped from the
    .ivfdata file next to it."""
    if not store.exists(INDEX_FILE) or not store.exists(INFOS_FILE):
        raise ConfigError(f"{store.url} has no index; build one with `embedpipe index {store.url}`")
    infos = store.read_json(INFOS_FILE)
    layout = infos.get("layout", "single")
    if layout == "shards":
        index = open_shards(store, [s["file"] for s in infos["shards"]])
    elif layout == "ondisk":
        if not store.local:
            raise ConfigError(f"{store.url}: an ondisk index is memory-mapped and needs a local "
                              f"disk; copy the folder locally or rebuild with --layout shards")
        with faiss_stdout_to_stderr():  # FAISS prints the .ivfdata path it resolves
            index = faiss.read_index(store.path(INDEX_FILE),
                                     faiss.IO_FLAG_ONDISK_SAME_DIR | faiss.IO_FLAG_READ_ONLY)
    else:
        index = read_stored_index(store, INDEX_FILE)
    apply_search_params(index, infos.get("search_params", {}))
    return index, infos
