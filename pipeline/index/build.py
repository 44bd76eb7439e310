"""Build a FAISS index over the stored vectors, streamed part by part, with its id map and infos.

Index choice (a factory string from the config, or `auto` from the count and a memory budget) is
kept apart from building; IVF kinds train on an even sample, then add part by part, so the whole
vector set is never in memory at once. The search-time knobs (efSearch, nprobe) are written into
index_infos.json and applied by `load_index`, so a search runs the index as it was measured.

Layouts (IVF kinds): `single` adds every part to one in-memory index. `shards` trains once, then
adds each group of consecutive parts to its own copy of the trained index (ids = the rows'
labels), written as index/shard-<build>-NNNNN.faiss and searched together, memory-mapped.
`ondisk` merges those shards with FAISS's OnDiskInvertedLists into index/merged-<build>.ivfdata,
which the index file references and search memory-maps (local disks only). With the same trained
index and nprobe the three return the same ids and distances. index_infos.json, written last
(commit.py), names the build's files; files of earlier builds are removed after it.

FAISS ids are labels, each row's own (the parts' faiss_id column; (unit_id << 32) | row within
the unit in parts written before it), kept by a row that keeps its id and text across runs, so
that maintenance (maintain.py) adds and removes rows by label without renumbering the rest;
ids.parquet maps each stored row, in row order, to its label.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass
from typing import Iterator

import faiss
import numpy as np
import pyarrow as pa

from ..config import ConfigError, IndexConfig
from ..io.storage import Store
from ..io.vectors import VectorParts
from .choose import new_index, training_size
from .commit import commit_index, new_build
from .family import BINARY, codes_of, deserialize, ranges_digest, serialize, with_labels
from .files import (INDEX_DIR, INFOS_FILE, faiss_stdout_to_stderr, index_file, read_stored_index,
                    save_array)
from .labels import repeated_labels
from .layouts import (MergeJob, SampleJob, SearchJob, ShardJob, ShardRunner, TrainJob, calls,
                      choose_layout, open_shards, run_here, shard_groups)
from .tuning import (RECALL_QUERIES, Search, TopK, Truth, apply_search_params, even_positions,
                     measure, query_sample, train_quantizer)

log = logging.getLogger(__name__)


def build_index(store: Store, files: list[str] | VectorParts, cfg: IndexConfig,
                runner: ShardRunner = run_here, identities: list[str] | None = None) -> dict:
    """Build, write atomically, and describe the index for the given parts. Returns the infos.

    Every vector is added under its label (VectorParts.row_labels: the rows' stored labels
    where the ledger knows the parts' units, else row positions); flat and HNSW inside an
    IndexIDMap2, IVF kinds with their own ids. The shards layouts' work that reads vectors or
    every row's label (the training and recall samples, the training, the repeated-label
    check, each shard's vectors and its rows' exact neighbours of the recall queries, the
    recall searches) goes to `runner` as jobs (layouts.run_here: in this process;
    jobs/ray_index.py: Ray actors), and the id map is streamed a part at a time, so this
    process reads no vector and holds no per-row array; `identities`: the parts'
    (shard_build.part_identities), recorded with each shard. The
    ip-without-cosine warning goes by the vectors themselves (a sample's norms), so a model
    that normalises on its own draws no warning."""
    started = time.perf_counter()
    parts = files if isinstance(files, VectorParts) else VectorParts(store, files)
    rows = parts.rows()
    n = sum(rows)
    dim = parts.dimension()
    build = new_build()
    if n == 0:
        return commit_index(store, build, None, None, None, {"type": cfg.type, "count": 0})
    codes = codes_of(parts.precision)
    index, kind, factory = new_index(cfg, n, dim, parts.precision)
    layout = choose_layout(cfg, index, factory, store)
    groups = shard_groups(rows, cfg.shard_rows) if layout != "single" else []
    fit, queries = None, None
    train_at = even_positions(n, training_size(index, n)) if not index.is_trained else None
    if groups:  # the samples read, and the quantizer trained, by the runner's jobs
        queries, trained = _sample_and_train(runner, parts, groups, query_sample(n, index)[0],
                                             train_at, cfg, build)
        if trained is not None:
            index, fit = deserialize(trained[0], codes == BINARY), trained[1]
    elif train_at is not None:
        fit = train_quantizer(index, parts.sample(train_at), parts.precision)
    trained_on = len(train_at) if train_at is not None else 0
    if layout == "single":
        built = _build_single(index, parts, cfg, started)
    else:
        built = _build_sharded(runner, store, index, parts, cfg, layout, groups, queries, build,
                               identities, started)
    parts, measured, params, unit = built.parts, built.recall, built.params, built.unit
    if cfg.metric == "ip" and not unit and codes != BINARY:
        log.warning("index.metric = 'ip' on vectors that are not normalised is not cosine "
                    "similarity; set encode.normalize = true for cosine")
    layout_infos = {"layout": layout, **built.layout_infos}
    size = len(built.index_bytes) + layout_infos.get("shards_bytes", 0) + layout_infos.get(
        "ivfdata_bytes", 0)
    infos = {
        "type": cfg.type, "kind": kind, "factory": factory, "count": n, "dimension": dim,
        "codes": codes, "ranges": ranges_digest(parts.precision),
        "metric": "hamming" if codes == BINARY else cfg.metric,
        "normalized": unit, "size_bytes": size,
        "build_seconds": round(built.seconds, 3), "recall_at_10": round(measured, 4),
        "recall_queries": min(n, RECALL_QUERIES), "search_params": params,
        "trained_on": trained_on, "max_memory": cfg.max_memory if cfg.type == "auto" else None,
        **layout_infos,
        "labels": "position" if parts.labels is None else "stored",
        "config": dataclasses.asdict(cfg), "built": build, "built_count": n,
        "training_error": fit,
        "parts": part_records(parts),
    }
    infos = commit_index(store, build, built.index_bytes.tobytes(), built.id_map, None, infos)
    log.info("index: %s", json.dumps({k: v for k, v in infos.items()
                                      if k not in ("parts", "shards", "config")}))
    return infos


@dataclass
class _Built:
    """An index built and measured, not yet committed."""
    parts: VectorParts  # as labelled: by row position where the stored labels repeat
    index_bytes: np.ndarray  # the index file
    layout_infos: dict
    id_map: pa.Table | Iterator[pa.Table]
    seconds: float  # the build's, before the recall is measured
    recall: float
    params: dict
    unit: bool  # the sampled vectors have unit length


def _build_single(index: faiss.Index, parts: VectorParts, cfg: IndexConfig,
                  started: float) -> _Built:
    """Every vector added here to one index under its label."""
    n = sum(parts.rows())
    labels = parts.row_labels()
    checked = _check_labels(parts, parts.labels is not None and len(np.unique(labels)) != n)
    if checked is not parts:  # row positions now
        parts, labels = checked, checked.row_labels()
    index = with_labels(index)
    row = 0
    for block in parts.vectors():
        index.add_with_ids(block, labels[row:row + len(block)])
        row += len(block)
    index_bytes = serialize(index)
    seconds = time.perf_counter() - started
    id_map = parts.keys()  # id, and chunk in a folder of one row a window
    id_map = id_map.add_column(0, "faiss_id", pa.array(labels, pa.int64()))
    return _Built(parts, index_bytes, {}, id_map, seconds, *measure(index, parts, n, cfg))


def _build_sharded(runner: ShardRunner, store: Store, index: faiss.Index, parts: VectorParts,
                   cfg: IndexConfig, layout: str, groups: list[list[int]], queries: np.ndarray,
                   build: str, identities: list[str] | None, started: float) -> _Built:
    """The trained `index`'s shards (and with `ondisk` their merge, a job too): every row's
    vector and label read by the runner's jobs, the recall measured by searching the shard
    files where they lie, the id map streamed."""
    n = sum(parts.rows())
    parts = _check_labels(parts, parts.labels is not None
                          and repeated_labels(runner, parts, groups, build) > 0)
    trained = serialize(index)
    # what every job reads is written once, not shipped with each of them: the trained index
    # under the name the commit gives the index file, the recall queries as scratch
    trained_rel = f"{INDEX_DIR}/index-{build}.faiss"  # commit_index writes it there again
    queries_rel = f"{INDEX_DIR}/queries-{build}.npy"
    store.write_bytes(trained_rel, trained.tobytes())
    layout_infos: dict = {"shard_rows": cfg.shard_rows}
    try:
        save_array(store, queries_rel, queries)
        shards, truth = _write_shards(runner, parts, groups, trained_rel, build, queries,
                                      queries_rel, min(10, n), cfg.metric, identities)
        if layout == "shards":
            index_bytes = trained  # the index file: the trained (empty) index they share
            layout_infos["shards"] = shards
            layout_infos["shards_bytes"] = sum(store.size(s["file"]) for s in shards)
        else:
            merged, ivfdata, layout_infos["merged_by"] = runner([MergeJob(
                store, trained_rel, tuple(s["file"] for s in shards), build)])[0]
            index_bytes = np.frombuffer(merged, np.uint8)
            layout_infos["ivfdata"] = ivfdata
            layout_infos["ivfdata_bytes"] = store.size(ivfdata)
            layout_infos["merged_shards"] = len(shards)
        seconds = time.perf_counter() - started
        # measured on the shard files where they lie (the ondisk merge answers as they do);
        # `index` is their trained, empty index: it takes the nprobe found
        measured = measure(index, parts, n, cfg, truth, shard_search(
            runner, store, [s["file"] for s in shards], cfg.metric, queries_rel))
    finally:
        if store.exists(queries_rel):
            store.remove(queries_rel)
    if layout == "ondisk":
        for shard in shards:
            store.remove(shard["file"])
    return _Built(parts, index_bytes, layout_infos, parts.id_map(), seconds, *measured)


def part_records(parts: VectorParts) -> list[dict]:
    """What the infos record of each part: what tells it apart when the index is maintained."""
    footers = parts.footers or [None] * len(parts.files)
    return [{"file": f, "rows": r, "label": label, "footer": footer}
            for f, r, label, footer in zip(parts.files, parts.rows(), parts.first_labels(),
                                           footers)]

def load_index(store: Store) -> tuple[faiss.Index, dict]:
    """The folder's index with the search parameters it was measured with, and its infos.

    shards: the shard files as one faiss.IndexShards (memory-mapped on a local disk, fetched
    into memory from an object store); ondisk: index.faiss with its lists memory-mapped from the
    .ivfdata file next to it."""
    infos = store.read_json(INFOS_FILE) if store.exists(INFOS_FILE) else None
    if infos is None or not store.exists(index_file(infos)):
        raise ConfigError(f"{store.url} has no index; build one with `embedpipe index {store.url}`")
    layout = infos.get("layout", "single")
    if layout == "shards":
        index = open_shards(store, [s["file"] for s in infos["shards"]])
    elif layout == "ondisk":
        if not store.local:
            raise ConfigError(f"{store.url}: an ondisk index is memory-mapped and needs a local "
                              f"disk; copy the folder locally or rebuild with --layout shards")
        with faiss_stdout_to_stderr():  # FAISS prints the .ivfdata path it resolves
            index = faiss.read_index(store.path(index_file(infos)),
                                     faiss.IO_FLAG_ONDISK_SAME_DIR | faiss.IO_FLAG_READ_ONLY)
    else:
        index = read_stored_index(store, index_file(infos), binary=infos.get("codes") == BINARY)
    apply_search_params(index, infos.get("search_params", {}))
    return index, infos


def _check_labels(parts: VectorParts, repeated: bool) -> VectorParts:
    """The parts as labelled for the index: by row position where their stored labels repeat."""
    if not repeated:
        return parts
    log.warning("the stored rows hold a label twice; the index is built over row positions "
                "and rebuilt by every run until the folder is written afresh")
    return dataclasses.replace(parts, labels=None)


def shard_search(runner: ShardRunner, store: Store, files: list[str], metric: str,
                 scratch: str) -> Search:
    """A Search over shard files, each searched by a runner's job where it lies (the queries
    written to `scratch` for them), the answers merged by faiss.merge_knn_results, the merge
    faiss.IndexShards makes of the same shards: the hits, ties included, of a search of the
    committed index. A call's answers are merged into those of the calls before (layouts.
    calls), which keeps IndexShards' order: every earlier shard is in the running answer."""
    def search(queries: np.ndarray, k: int, nprobe: int | None = None):
        save_array(store, scratch, queries)
        merged = None
        for _, answers in calls(runner, [SearchJob(store, f, scratch, k, nprobe) for f in files]):
            answers = ([merged] if merged is not None else []) + list(answers)
            merged = faiss.merge_knn_results(np.stack([d for d, _ in answers]),
                                             np.stack([i for _, i in answers]),
                                             keep_max=metric == "ip")
        return merged
    return search


def _sample_and_train(runner: ShardRunner, parts: VectorParts, groups: list[list[int]],
                      query_at: np.ndarray, train_at: np.ndarray | None, cfg: IndexConfig,
                      build: str) -> tuple[np.ndarray, tuple[bytes, float | None] | None]:
    """The recall queries (the vectors at `query_at`, sorted), and with `train_at`, cfg's index
    trained on the vectors there ((serialized, training_error)): one SampleJob a group of parts,
    its training rows left in a scratch file for the TrainJob, removed after."""
    jobs = []
    for number, (group, (first, count)) in enumerate(zip(groups, _spans(parts, groups))):
        def inside(positions):
            return positions[(positions >= first) & (positions < first + count)] - first
        jobs.append(SampleJob(parts.subset(group), inside(query_at),
                              inside(train_at) if train_at is not None else np.zeros(0, np.int64),
                              f"{INDEX_DIR}/sample-{build}-{number:05d}.npy"))
    try:
        queries = np.concatenate(runner(jobs))
        trained = runner([TrainJob(cfg, sum(parts.rows()), parts.dimension(), parts.precision,
                                   parts.store, tuple(job.rel for job in jobs))])[0] \
            if train_at is not None else None
    finally:
        for job in jobs:
            if parts.store.exists(job.rel):
                parts.store.remove(job.rel)
    return queries, trained


def _spans(parts: VectorParts, groups: list[list[int]]) -> list[tuple[int, int]]:
    """Each group's (first row, rows) in the whole index."""
    rows = parts.rows()
    counts = [sum(rows[i] for i in group) for group in groups]
    return list(zip(np.cumsum([0] + counts[:-1]).tolist(), counts))


def _write_shards(runner: ShardRunner, parts: VectorParts, groups: list[list[int]],
                  trained: str, build: str, queries: np.ndarray, queries_rel: str, k: int,
                  metric: str, identities: list[str] | None) -> tuple[list[dict], Truth]:
    """One shard a group of consecutive parts ([{file, rows, first_row, parts, pid, host}], in
    row order), and the recall queries' exact neighbours merged from each shard's, a call's
    worth at a time (TopK's merge is the same in any grouping)."""
    jobs = [ShardJob(f"{INDEX_DIR}/shard-{build}-{number:05d}.faiss", trained,
                     parts.subset(group), tuple(identities[i] for i in group)
                     if identities else (), first, queries_rel, k, metric)
            for number, (group, (first, _)) in enumerate(zip(groups, _spans(parts, groups)))]
    top = TopK(queries, k, metric)
    shards = []
    for batch, done in calls(runner, jobs):
        for job, shard in zip(batch, done):
            shard["first_row"] = job.first_row
            top.merge(*shard.pop("truth"))
            shards.append(shard)
    return shards, Truth(queries, top.labels, top.distances)
