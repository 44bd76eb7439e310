"""Run a job: plan units against the ledger, embed what is new or changed, index, summarise.

The runner owns the loop, the ledger and the timings; the stages (flow.py) never reach back.
"""
from __future__ import annotations

import dataclasses

import logging
import posixpath
import time
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from . import __version__
from .config import JobConfig, settings_hash
from .faults import checkpoint
from .embedder import EmbedPlan, UnitEmbedder
from .encoder import (dtype_reason, resolve_attention, resolve_compile, resolve_device,
                      resolve_dtype)
from .flow import Stats
from .indexing import INDEX_DIR, INDEX_FILE, build_index
from .ledger import MANIFEST, Ledger, acquire_lock, release_lock
from .models import ModelSource, resolve_model
from .reader import Unit, open_parquet, plan_units
from .rejects import find_duplicates
from .storage import Store, filesystem
from .summary import RunSummary
from .writer import REJECTS_DIR, VECTORS_DIR, remove_files

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunOptions:
    mode: str = "incremental"  # incremental | overwrite
    keep_removed: bool = False
    progress: bool = True
    runner: str = "local"  # local | ray
    ray_address: str | None = None  # None: start a local Ray instance
    workers: int | None = None  # Ray actors; None: one per GPU, or per 2 CPUs


def id_type_of(unit_schema: pa.Schema, id_column: str) -> pa.DataType:
    """Integer ids are stored as int64, string ids as string, whatever width the input used."""
    return pa.int64() if pa.types.is_integer(unit_schema.field(id_column).type) else pa.string()


def package_versions() -> dict[str, str]:
    import faiss
    import torch
    import transformers
    return {"embedpipe": __version__, "torch": torch.__version__,
            "transformers": transformers.__version__, "pyarrow": pa.__version__,
            "faiss": faiss.__version__}


def vector_settings(job: JobConfig, source: ModelSource, dtype: str) -> dict[str, Any]:
    """The settings that change a vector, with the model's weights and the dtype resolved."""
    settings = job.vector_settings()
    settings.update({"model.fingerprint": source.fingerprint, "model.dtype": dtype,
                     "model.max_length": job.model.max_length or source.max_length})
    return settings


def _wipe(store: Store) -> None:
    """--mode overwrite: the manifest goes first, so a crash mid-wipe leaves only strays."""
    store.remove(MANIFEST)
    for folder in (VECTORS_DIR, REJECTS_DIR, INDEX_DIR):
        for name in store.listdir(folder):
            store.remove(posixpath.join(folder, name))


def _sweep(store: Store, ledger: Ledger) -> int:
    """Remove temporaries and parts that no committed unit names (left by a killed run)."""
    named = {f for r in ledger.units.values() for f in r.get("vectors", []) + r.get("rejects_files", [])}
    swept = 0
    for folder in (VECTORS_DIR, REJECTS_DIR, INDEX_DIR):
        swept += len(store.sweep_temporaries(folder))
        if folder == INDEX_DIR:
            continue
        for name in store.listdir(folder):
            if posixpath.join(folder, name) not in named:
                store.remove(posixpath.join(folder, name))
                swept += 1
    return swept


def _committed_ids(store: Store, files: list[str]) -> set:
    ids: set = set()
    for name in files:
        with store.fs.open(store.path(name), "rb") as handle:
            ids.update(pq.read_table(handle, columns=["id"]).column("id").to_pylist())
    return ids


def unit_schema(unit: Unit) -> pa.Schema:
    fs, path = filesystem(unit.path)
    return open_parquet(fs, path).schema_arrow


def _unit_record(record: dict) -> dict:
    record = dict(record)
    unit: Unit = record.pop("unit")
    return {"key": unit.key, "path": unit.path, "first_row": unit.first_row, "row_groups": list(unit.row_groups),
            "fingerprint": unit.fingerprint, **record}


def run_job(job: JobConfig, options: RunOptions = RunOptions()) -> RunSummary:
    started = time.perf_counter()
    keep_columns = job.output.keep_columns
    units = plan_units(job.input, keep_columns)  # config errors surface before the model loads
    source = resolve_model(job.model.name)

    device = resolve_device(job.model.device)
    dtype = resolve_dtype(job.model.dtype, device)
    # Resolved once here, so that the manifest, the summary and every worker agree. Compiling
    # goes by all the input's rows, so a rerun after a crash decides as the first run did.
    attention = resolve_attention(job.model.attention, device, dtype, source)
    compiled = resolve_compile(job.model.compile, device, dtype, sum(u.num_rows for u in units))
    job = dataclasses.replace(job, model=dataclasses.replace(
        job.model, attention=attention, compile=compiled))
    settings = vector_settings(job, source, dtype)
    store = Store(job.output.path)
    lock = acquire_lock(store)
    try:
        if options.mode == "overwrite":
            _wipe(store)
        ledger = Ledger(store)
        ledger.check_settings(settings)
        summary = _run_locked(job, options, units, source, device, dtype, settings, store, ledger)
    finally:
        release_lock(store)
    summary.lock_taken_over = lock.took_over
    summary.seconds["total"] = time.perf_counter() - started
    return summary


def _run_locked(job: JobConfig, options: RunOptions, units: list[Unit], source: ModelSource,
                device, dtype: str, settings: dict, store: Store, ledger: Ledger) -> RunSummary:
    current = {u.key: u for u in units}
    kept = {k for k, r in ledger.units.items() if r["status"] == "complete"
            and k in current and r["fingerprint"] == current[k].fingerprint}
    changed = [k for k, r in ledger.units.items() if k in current and k not in kept
               and r["status"] == "complete"]
    removed = [k for k in ledger.units if k not in current]
    todo = [u for u in units if u.key not in kept]
    summary = RunSummary(job=job.name, output=store.url, device=str(device), dtype=dtype,
                         dtype_note=dtype_reason(job.model.dtype, device),
                         attention=job.model.attention, compiled=job.model.compile,
                         model=source.name, units_total=len(units), units_skipped=len(kept),
                         units_changed=len(changed))

    # Changed or failed units are redone from scratch; removed ones go unless kept on request.
    dropped = [k for k in ledger.units if k in current and k not in kept]
    if not options.keep_removed:
        dropped += removed
        summary.units_removed = len(removed)
    else:
        summary.units_removed_kept = len(removed)
    if dropped:
        files = [f for k in dropped for f in ledger.units[k].get("vectors", [])
                 + ledger.units[k].get("rejects_files", [])]
        ledger.drop_units(dropped)
        remove_files(store, files)
    summary.stray_files_removed = _sweep(store, ledger)
    ledger.update(job=job.name, config=job.to_dict(), vector_settings=settings,
                  settings_hash=settings_hash(settings), complete=False,
                  model={"name": source.name, "path": str(source.path),
                         "fingerprint": source.fingerprint},
                  versions=package_versions())

    stats = Stats()
    if todo:
        _embed(job, todo, source, dtype, store, ledger, stats, summary, options)
        summary.stray_files_removed += _sweep(store, ledger)  # what a dead Ray worker left
    summary.failures = [f"{r['path']}: {r['error']}" for k, r in ledger.units.items()
                        if r["status"] == "failed" and k in current]

    if job.index.enabled:
        needs_index = bool(todo or dropped) or not store.exists(INDEX_FILE)
        if needs_index:
            tick = time.perf_counter()
            checkpoint("index")
            summary.index = build_index(store, ledger.files("vectors"), job.index,
                                        normalized=job.encode.normalize)
            stats.seconds["index"] += time.perf_counter() - tick
        else:
            summary.index = ledger.data.get("index", {})
    summary.real_tokens = stats.real_tokens
    summary.padded_tokens = stats.padded_tokens
    summary.seconds.update(stats.seconds)
    summary.folder_vectors = sum(r.get("vectors_out", 0) for r in ledger.units.values())
    # The completion record is written last: a folder whose manifest says complete is whole.
    ledger.update(index=summary.index, dim=ledger.data.get("dim"),
                  complete=not summary.failures, last_run=summary.to_dict())
    return summary


def _embed(job: JobConfig, todo: list[Unit], source: ModelSource, dtype: str, store: Store,
           ledger: Ledger, stats: Stats, summary: RunSummary, options: RunOptions) -> None:
    from tqdm import tqdm

    healthy = [u for u in todo if not u.error]
    # The first healthy file sets the id type and the kept columns' types for the folder.
    first = unit_schema(healthy[0]) if healthy else pa.schema([])
    id_type = ledger.data.get("id_type") or (
        str(id_type_of(first, job.input.id_column)) if healthy else "string")
    keep_schema = pa.schema([first.field(c) for c in job.output.keep_columns]) if healthy else None
    plan = EmbedPlan(job=job, source=source, dtype=dtype, id_type=id_type, keep_schema=keep_schema)
    ledger.update(id_type=id_type, dim=plan.width)
    duplicates = find_duplicates(healthy, job.input.id_column, job.input.text_column,
                                 claimed=_committed_ids(store, ledger.files("vectors")))
    units = [(u, ledger.unit_id(u.key)) for u in todo]
    bar = tqdm(total=sum(u.num_rows for u in healthy), unit="rows", disable=not options.progress,
               desc=job.name, dynamic_ncols=True)

    def commit(record: dict) -> None:
        unit_record = _unit_record(record)
        if unit_record["status"] == "complete":
            summary.units_done += 1
            summary.rows_read += unit_record["rows_in"]
            summary.vectors_written += unit_record["vectors_out"]
            summary.truncated += unit_record["truncated"]
            for reason, count in unit_record["reject_reasons"].items():
                summary.rejects[reason] = summary.rejects.get(reason, 0) + count
        else:
            summary.units_failed += 1
        ledger.commit_unit(unit_record["key"], unit_record)
        checkpoint("unit")

    try:
        if options.runner == "ray":
            from .distributed import embed_on_ray
            summary.oom_splits = embed_on_ray(plan, units, duplicates, commit, bar.update, stats,
                                              address=options.ray_address,
                                              workers=options.workers)
        else:
            embedder = UnitEmbedder(plan)
            embedder.embed(units, duplicates, commit, bar.update, stats)
            summary.oom_splits = embedder.encoder.oom_splits
    finally:
        bar.close()

