"""Keeping a folder's index in step with its vector parts by adding and removing what changed,
so a nightly run pays for the units it re-embedded, not for the whole index.

Every row is stored under its own label (the parts' faiss_id column, io/writer.py): a row that
keeps its id and text across runs keeps its label, wherever its part now lies and whatever the
file is called; a new row gets a new one. Maintenance works on label sets: the labels the id map
lists (the index's live rows) against the stored rows' labels. Labels no longer stored are
removed (IDSelectorBatch), rows whose label the index lacks are added (only the parts holding one
are read), and the rest is not touched. The same labels in other files (a re-export: renamed,
re-cut) cost reading the label columns and writing a new id map; the index file stays as it is.
A folder written before rows kept labels has unit-row labels, (unit_id << 32) | row within the
unit: its kept parts keep them, and rows reused out of its parts get new ones, so its first
night after the change adds those anew (HNSW: tombstones past the limit, one full rebuild).

Per kind:
- flat (IndexIDMap2 over IndexFlat): remove and add; searches return what a fresh build returns.
  Any kind that takes add_with_ids and remove_ids is maintained the same way.
- IVF kinds (single layout): remove and add with the trained quantizer, while it still fits the
  data. Drift is measured: at training the mean squared L2 distance of the training sample to its
  nearest centroid is recorded (`training_error`); the added vectors' mean is compared with it,
  and a ratio above DRIFT_RATIO (1.5) retrains (full rebuild). So does a count that has doubled
  or halved since the build (the nlist was chosen for that count), and, for `auto`, a count for
  which auto would now choose another kind.
- HNSW cannot remove: removed labels become tombstones (tombstones-<build>.npy, named in the
  infos), skipped by search through an ID selector (live.py). Over TOMBSTONE_FRACTION (10%) of
  the vectors in the graph, a full rebuild. Added vectors join the existing graph.
- shards / ondisk layouts: not here (index/shard_build.py keeps the unchanged shards).

Anything that does not add up (infos unreadable, a file missing, the index holding another count
than its infos say, other index settings or dimension, an index of row positions, a label stored
twice, a label that comes back as a tombstone) is a full rebuild, logged with its reason. The search parameters (nprobe, efSearch)
tuned at build time are kept; recall is measured only when the index is rebuilt.
Writing goes through commit.py: new files, then the infos naming them.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from typing import Iterator

import faiss
import numpy as np
import pyarrow as pa

from ..config import IndexConfig
from ..io.storage import Store
from ..io.vectors import VectorParts
from .build import build_index, load_index, part_records
from .choose import choose_kind
from .commit import commit_index, new_build
from .files import INFOS_FILE, LABELLED, ids_file, index_file, read_id_map, read_tombstones
from .family import codes_of, hnsw_of, ivf_of, ranges_digest, serialize
from .tuning import training_error

log = logging.getLogger(__name__)

DRIFT_RATIO = 1.5  # added vectors' mean squared distance to their centroid / the training sample's
GROWTH = 2.0  # IVF: retrain once the count has doubled or halved since training
TOMBSTONE_FRACTION = 0.10  # HNSW: rebuild once tombstones pass this share of the graph


class Rebuild(Exception):
    """Maintenance cannot keep this index; the message says why."""


def update_index(store: Store, parts: VectorParts, cfg: IndexConfig,
                 rebuild: str | None = None) -> dict:
    """Bring the folder's index in step with `parts` by adding and removing, or rebuild it where
    the rules above say so, or where `rebuild` gives a reason (its files are damaged: nothing
    in them is kept). Returns the infos written."""
    started = time.perf_counter()
    try:
        if rebuild:
            raise Rebuild(rebuild)
        infos = _maintain(store, parts, cfg, started)
    except Rebuild as why:
        log.info("index: full rebuild (%s)", why)
        infos = build_index(store, parts, cfg)
        infos["rebuilt"] = str(why)
        store.write_json(INFOS_FILE, infos)
    return infos


def built_with(infos: dict, cfg: IndexConfig) -> bool:
    """Whether the index these infos describe was built with the job's [index] settings."""
    return infos.get("config") == dataclasses.asdict(cfg)


def settings_changed(store: Store, cfg: IndexConfig) -> bool:
    """The job's [index] differs from the one the folder's index was built with (a rerun of a
    complete folder with another index type rebuilds it from the stored vectors)."""
    try:
        return not built_with(store.read_json(INFOS_FILE), cfg)
    except (FileNotFoundError, ValueError, AttributeError, UnicodeDecodeError):
        return False  # no readable infos: index_problems names that


def _maintain(store: Store, parts: VectorParts, cfg: IndexConfig, started: float) -> dict:
    infos = _readable_infos(store, parts, cfg)
    n, built = sum(parts.rows()), int(infos.get("built_count") or infos["count"])
    codes = codes_of(parts.precision)
    if infos.get("codes", "float") != codes:
        raise Rebuild(f"the index holds {infos.get('codes', 'float')} codes, the folder's "
                      f"precision takes {codes}")
    if infos.get("ranges") != ranges_digest(parts.precision):
        raise Rebuild("the index's SQ8 ranges are not the folder's calibration")
    auto = choose_kind(cfg, n, infos["dimension"], codes)
    if cfg.type == "auto" and auto != infos["kind"]:
        raise Rebuild(f"auto now chooses {auto} for {n} vectors, not {infos['kind']}")
    labels = parts.row_labels()
    if len(np.unique(labels)) != n:
        raise Rebuild("the stored rows hold a label twice")
    try:
        held = read_id_map(store, infos)
        tombstones = read_tombstones(store, infos)
    except (RuntimeError, ValueError, OSError, EOFError, KeyError) as exc:
        raise Rebuild(f"the id map cannot be read ({' '.join(str(exc).split())[:200]})") from None
    if len(held) != infos["count"]:
        raise Rebuild(f"the id map lists {len(held)} labels, the infos say {infos['count']}")
    fresh = ~np.isin(labels, held)  # rows the index lacks
    added_labels, removed_labels = labels[fresh], np.setdiff1d(held, labels)
    if len(added_labels) or len(removed_labels):
        index_bytes, tombstones = _apply(store, parts, infos, fresh, added_labels,
                                         removed_labels, tombstones, n, built)
    else:  # the same rows under the same labels (files renamed or reordered): the index stays
        index_bytes = None

    id_map = parts.keys().add_column(0, "faiss_id", pa.array(labels, pa.int64()))
    since = infos.get("maintained", {}).get("since_build", {"added": 0, "removed": 0, "updates": 0})
    added, removed = len(added_labels), len(removed_labels)
    size = len(index_bytes) if index_bytes is not None else infos["size_bytes"]
    updated = {
        **{k: v for k, v in infos.items() if k != "rebuilt"},
        "count": n, "size_bytes": size, "parts": part_records(parts), "labels": "stored",
        "tombstones": len(tombstones),
        "maintained": {"added": added, "removed": removed,
                       "seconds": round(time.perf_counter() - started, 3),
                       "since_build": {"added": since["added"] + added,
                                       "removed": since["removed"] + removed,
                                       "updates": since["updates"] + 1}},
        "recall_note": "recall_at_10 was measured at the build; maintenance keeps its search "
                       "parameters and does not measure again",
    }
    updated = commit_index(store, new_build(), index_bytes, id_map, tombstones, updated)
    log.info("index: maintained (%d added, %d removed, %d tombstones)", added, removed,
             len(tombstones))
    return updated


def _apply(store: Store, parts: VectorParts, infos: dict, fresh: np.ndarray,
           added_labels: np.ndarray, removed_labels: np.ndarray, tombstones: np.ndarray,
           n: int, built: int) -> tuple[bytes, np.ndarray]:
    """The loaded index with the removed labels taken out (HNSW: tombstones) and the fresh rows
    added under their labels; its bytes and the tombstones."""
    try:
        index, _ = load_index(store)
    except (RuntimeError, ValueError, OSError, EOFError) as exc:
        raise Rebuild(f"the index cannot be loaded ({' '.join(str(exc).split())[:200]})") from None
    if index.ntotal != infos["count"] + len(tombstones):
        raise Rebuild(f"the index holds {index.ntotal} vectors, its infos say "
                      f"{infos['count']} live and {len(tombstones)} tombstones")
    ivf = ivf_of(index)
    if hnsw_of(index) is not None:
        tombstones = np.union1d(tombstones, removed_labels)
        if np.isin(added_labels, tombstones).any():
            raise Rebuild("an added row reuses a label that is a tombstone in the graph")
        if len(tombstones) > TOMBSTONE_FRACTION * (index.ntotal + len(added_labels)):
            raise Rebuild(f"{len(tombstones)} tombstones would pass {TOMBSTONE_FRACTION:.0%} "
                          f"of the graph")
    else:
        if ivf is not None and (n > GROWTH * built or n < built / GROWTH):
            raise Rebuild(f"{n} vectors, {built} when the quantizer was trained")
        if ivf is not None and infos.get("training_error"):
            _check_drift(index, _fresh_blocks(parts, fresh), float(infos["training_error"]))
        if len(removed_labels):
            try:
                removed = index.remove_ids(faiss.IDSelectorBatch(removed_labels))
            except RuntimeError as exc:
                raise Rebuild(f"{type(index).__name__} cannot remove ({exc})") from None
            if removed != len(removed_labels):
                raise Rebuild(f"{removed} vectors removed, {len(removed_labels)} labels gone")
    row = 0
    for block in _fresh_blocks(parts, fresh):
        index.add_with_ids(block, added_labels[row:row + len(block)])
        row += len(block)
    if index.ntotal != n + len(tombstones):
        raise Rebuild(f"after maintenance the index holds {index.ntotal}, not {n} vectors")
    return serialize(index).tobytes(), tombstones


def _fresh_blocks(parts: VectorParts, fresh: np.ndarray) -> Iterator[np.ndarray]:
    """The vectors of the rows marked fresh, in row order; parts without one are not read."""
    start = 0
    for number, rows in enumerate(parts.rows()):
        mine = fresh[start:start + rows]
        start += rows
        if not mine.any():
            continue
        at = 0
        for block in parts.subset([number]).vectors():
            take = mine[at:at + len(block)]
            at += len(block)
            if take.any():
                yield block[take]


def _readable_infos(store: Store, parts: VectorParts, cfg: IndexConfig) -> dict:
    """The current infos, when they describe an index maintenance can start from."""
    if parts.labels is None:
        raise Rebuild("the ledger gives no unit labels for the parts")
    try:
        infos = store.read_json(INFOS_FILE)
        if not int(infos.get("count", 0)):
            raise Rebuild("no vectors indexed yet")
        if infos.get("labels") not in LABELLED:
            raise Rebuild("the index was built over row positions")
    except FileNotFoundError:
        raise Rebuild(f"no {INFOS_FILE}") from None
    except (ValueError, TypeError, KeyError, AttributeError, UnicodeDecodeError) as exc:
        raise Rebuild(f"{INFOS_FILE} unreadable ({type(exc).__name__} {exc})") from None
    if not built_with(infos, cfg):
        raise Rebuild("the index settings changed")
    if infos.get("layout", "single") != "single":
        raise Rebuild(f"layout {infos['layout']} is rebuilt, not maintained")
    if parts.files and parts.dimension() != infos.get("dimension"):
        raise Rebuild(f"vectors of {parts.dimension()} dimensions, the index "
                      f"{infos.get('dimension')}")
    if not parts.files:
        raise Rebuild("no vectors stored")
    for rel in (index_file(infos), ids_file(infos), infos.get("tombstones_file")):
        if rel and not store.exists(rel):
            raise Rebuild(f"{rel} missing")
    return infos


def _check_drift(index: faiss.Index, added: Iterator[np.ndarray], trained_error: float) -> None:
    """Retrain when the added vectors sit farther from their centroids than the training sample
    did, by more than DRIFT_RATIO (their mean squared distance over the sample's)."""
    total, count = 0.0, 0
    for block in added:
        error = training_error(index, block)
        if error is not None:
            total, count = total + error * len(block), count + len(block)
    if count and total / count > DRIFT_RATIO * trained_error:
        raise Rebuild(f"data drift: the added vectors' mean squared distance to their centroid "
                      f"is {total / count / trained_error:.2f} x the training sample's "
                      f"(limit {DRIFT_RATIO})")
