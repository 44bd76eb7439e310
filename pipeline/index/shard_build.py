"""Shards of the `shards` / `ondisk` layouts built by workers, and kept from night to night.

A shard is a copy of the trained (empty) IVF index with a group of parts' vectors added
(layouts.write_shard). `layouts.ShardJob` is one shard to write, picklable, run wherever a
`ShardRunner` sends it: in this process one after another (the local runner), or on Ray actors
(jobs/ray_index.py). A full build is `build_index`'s with that runner: the quantizer trained once
on an even sample of every stored row (read by the runner's jobs), so a worker-built index is
the local build, file for file. Each shard records its parts' identities (sha256 of the file as the manifest checked it,
rows, first label): a later run keeps every shard whose parts are all still stored, unchanged,
and writes new shards only for the rest (parts new or changed, and the unchanged parts of a shard
that lost one), with the trained index kept. The commit is index/commit.py's: new shard files
first, then index_infos.json naming the kept and the new ones.

Rebuilt in full (retrained) where a kept quantizer would no longer fit: other settings, codes or
dimension, no readable infos or trained file, a count doubled or halved since training, and
always for `ondisk` (its merge removes the shards it merges: one .ivfdata file, written by one
process; see docs/indexes.md).
"""
from __future__ import annotations

import logging
import os
import time

import faiss
import numpy as np

from ..config import ConfigError, IndexConfig, parse_memory
from ..io.precision import Precision
from ..io.storage import Store
from ..io.vectors import VectorParts
from .build import build_index, part_records
from .choose import choose_kind, code_bytes, hnsw_bytes, new_index
from .commit import commit_index, new_build
from .family import codes_of, ivf_of, ranges_digest
from .files import INDEX_DIR, INFOS_FILE, index_file
from .labels import repeated_labels
from .layouts import ShardJob, ShardRunner, run_here, shard_groups
from .maintain import GROWTH, Rebuild, built_with, update_index

log = logging.getLogger(__name__)

RAM_SHARE = 0.5  # a one-process index (flat, HNSW) may take at most this share of the node's RAM


def part_identities(parts: VectorParts, digests: list[str | None]) -> list[str]:
    """What tells a part's content apart: the sha256 the manifest recorded for it (its name
    where none is), its rows and its first label."""
    return [f"{digest or name}:{rows}:{label}" for name, digest, rows, label
            in zip(parts.files, digests, parts.rows(), parts.first_labels())]


def sharded(cfg: IndexConfig) -> bool:
    return cfg.layout in ("shards", "ondisk")


def update_sharded(store: Store, parts: VectorParts, cfg: IndexConfig, digests: list[str | None],
                   runner: ShardRunner = run_here, rebuild: str | None = None) -> dict:
    """The index of a `shards` / `ondisk` layout in step with `parts`: only the shards whose
    parts changed are written again (by `runner`), or a full build with its shards written by
    `runner` where a kept quantizer does not fit. Other layouts and non-IVF kinds go to
    maintain.update_index."""
    n = sum(parts.rows())
    if not sharded(cfg) or not n or not _is_ivf(cfg, n, parts):
        return update_index(store, parts, cfg, rebuild)
    started = time.perf_counter()
    identities = part_identities(parts, digests)
    try:
        if rebuild:
            raise Rebuild(rebuild)
        return _keep_shards(store, parts, cfg, identities, runner, started)
    except Rebuild as why:
        log.info("index: full rebuild (%s)", why)
        infos = build_index(store, parts, cfg, runner, identities)
        infos["rebuilt"] = str(why)
        store.write_json(INFOS_FILE, infos)
        return infos


def _is_ivf(cfg: IndexConfig, n: int, parts: VectorParts) -> bool:
    try:
        index, _, _ = new_index(cfg, n, parts.dimension(), parts.precision)
    except ConfigError:
        return False  # build_index says why, as it does for the single layout
    return ivf_of(index) is not None and not isinstance(index, faiss.IndexBinary)


def _keep_shards(store: Store, parts: VectorParts, cfg: IndexConfig, identities: list[str],
                 runner: ShardRunner, started: float) -> dict:
    infos = _keepable(store, parts, cfg)
    rows, n = parts.rows(), sum(parts.rows())
    where = {ident: i for i, ident in enumerate(identities)}
    kept, covered = [], set()
    for shard in infos.get("shards", []):
        mine = shard.get("parts") or []
        if mine and all(p in where and p not in covered for p in mine) \
                and store.exists(shard["file"]):
            kept.append({k: v for k, v in shard.items() if k != "first_row"})
            covered.update(mine)
    loose = [i for i, ident in enumerate(identities) if ident not in covered]
    build = new_build()
    groups = shard_groups([rows[i] for i in loose], cfg.shard_rows) if loose else []
    jobs = [ShardJob(f"{INDEX_DIR}/shard-{build}-{number:05d}.faiss", index_file(infos),
                     parts.subset([loose[j] for j in group]),
                     tuple(identities[loose[j]] for j in group))
            for number, group in enumerate(groups)]
    built = runner(jobs) if jobs else []
    starts = np.cumsum([0] + rows)
    shards = sorted(kept + built, key=lambda s: where[s["parts"][0]])
    for shard in shards:
        shard["first_row"] = int(starts[where[shard["parts"][0]]])
    if sum(s["rows"] for s in shards) != n:
        raise Rebuild(f"the shards hold {sum(s['rows'] for s in shards)} vectors, the folder {n}")
    if repeated_labels(runner, parts, shard_groups(rows, cfg.shard_rows), build):
        raise Rebuild("the stored rows hold a label twice")
    shards_bytes = sum(store.size(s["file"]) for s in shards)
    since = infos.get("maintained", {}).get("since_build", {"updates": 0})
    updated = {
        **{k: v for k, v in infos.items() if k != "rebuilt"},
        "count": n, "parts": part_records(parts), "labels": "stored", "shards": shards,
        "shards_bytes": shards_bytes,
        "size_bytes": store.size(index_file(infos)) + shards_bytes,
        "maintained": {"shards_kept": len(kept), "shards_written": len(built),
                       "rows_added": sum(s["rows"] for s in built),
                       "seconds": round(time.perf_counter() - started, 3),
                       "since_build": {"updates": since.get("updates", 0) + 1}},
        "recall_note": "recall_at_10 was measured at the build; shards kept from night to night "
                       "keep its search parameters and do not measure again",
    }
    updated = commit_index(store, build, None, parts.id_map(), None, updated)
    log.info("index: %d shards kept, %d written (%d rows)", len(kept), len(built),
             sum(s["rows"] for s in built))
    return updated


def _keepable(store: Store, parts: VectorParts, cfg: IndexConfig) -> dict:
    """The current infos, when their trained quantizer and shards can be kept for `parts`."""
    if cfg.layout != "shards":
        raise Rebuild(f"layout {cfg.layout}: its merge removes the shards, so it is rebuilt")
    if parts.labels is None:
        raise Rebuild("the ledger gives no unit labels for the parts")
    try:
        infos = store.read_json(INFOS_FILE)
        built = int(infos.get("built_count") or infos["count"])
    except FileNotFoundError:
        raise Rebuild(f"no {INFOS_FILE}") from None
    except (ValueError, TypeError, KeyError, AttributeError, UnicodeDecodeError) as exc:
        raise Rebuild(f"{INFOS_FILE} unreadable ({type(exc).__name__} {exc})") from None
    n = sum(parts.rows())
    if not built_with(infos, cfg) or infos.get("layout") != "shards":
        raise Rebuild("the index settings changed")
    if infos.get("codes", "float") != codes_of(parts.precision) \
            or infos.get("ranges") != ranges_digest(parts.precision):
        raise Rebuild("the index's codes or ranges are not the folder's")
    if infos.get("dimension") != parts.dimension():
        raise Rebuild(f"vectors of {parts.dimension()} dimensions, the index "
                      f"{infos.get('dimension')}")
    if cfg.type == "auto" and choose_kind(cfg, n, parts.dimension()) != infos.get("kind"):
        raise Rebuild(f"auto now chooses another kind for {n} vectors")
    if n > GROWTH * built or n < built / GROWTH:
        raise Rebuild(f"{n} vectors, {built} when the quantizer was trained")
    if not store.exists(index_file(infos)):
        raise Rebuild(f"{index_file(infos)} missing")
    return infos


def one_process_bytes(cfg: IndexConfig, n: int, dim: int, precision: Precision) -> int | None:
    """What a flat or HNSW index of n vectors holds in one process's memory (None: another
    kind, built as shards by the workers or maintained in place)."""
    codes = codes_of(precision)
    if codes == "binary":
        dim = precision.width(dim) * 8
    kind = choose_kind(cfg, n, dim, codes)
    if kind == "flat":
        return n * code_bytes(dim, codes)
    if kind == "hnsw":
        return hnsw_bytes(n, dim, cfg.hnsw_m, codes)
    return None


def node_ram() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def refuse_one_process_index(cfg: IndexConfig, n: int, dim: int, precision: Precision,
                             ram: int | None = None) -> None:
    """--runner ray: a flat or HNSW index is built by one process holding every vector; over
    the smaller of index.max_memory and RAM_SHARE of this node's RAM it is refused (ConfigError,
    before anything is embedded), with the sharded IVF alternative."""
    need = one_process_bytes(cfg, n, dim, precision) if cfg.enabled else None
    ram = node_ram() if ram is None else ram
    limit = min(parse_memory(cfg.max_memory), int(RAM_SHARE * ram))
    if need is None or need <= limit:
        return
    kind = choose_kind(cfg, n, dim, codes_of(precision))
    raise ConfigError(
        f"index.type = {cfg.type!r} ({kind}) on the ray runner: {n:,} rows would make one "
        f"{need / 2**30:.1f} GiB index in one process, over the limit of "
        f"{limit / 2**30:.1f} GiB (the smaller of index.max_memory = {cfg.max_memory!r} and "
        f"{RAM_SHARE:.0%} of this node's {ram / 2**30:.1f} GiB); set index.type = 'ivf-pq' "
        f"(or 'ivf-flat') with index.layout = 'shards', built by the workers")
