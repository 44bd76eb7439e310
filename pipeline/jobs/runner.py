"""Run a job: plan units against the ledger, embed what is new or changed, index, summarise.

The runner owns the loop, the ledger and the timings; the stages (stages.py) never reach back.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import posixpath
import time
from dataclasses import dataclass

import pyarrow as pa

from ..config import ConfigError, JobConfig, settings_hash
from ..encode.chunking import resolve_chunking
from ..encode.encoder import EncoderSettings
from ..models.model_files import ModelSource, resolve_model
from ..models.recipe import resolve_recipe
from ..runtime.runtime import Runtime, resolve_runtime, vector_settings
from ..faults import checkpoint
from ..index.maintain import settings_changed, update_index
from ..index.check import index_damage, index_problems
from ..index.choose import check_config as check_index_config, faiss_reason
from ..index.files import INDEX_DIR
from ..index.layouts import run_here
from ..index.shard_build import refuse_one_process_index, sharded, update_sharded
from ..io.folder_check import unit_damage, unit_problems
from ..io.ledger import Ledger, acquire_lock, refuse_foreign_folder, release_lock
from ..io.manifest import MANIFEST, UnitRecord
from ..io.precision import Calibration, Precision, calibrated, row_bytes
from ..io.reader import Unit, open_parquet, plan_units, refuse_overlap
from ..io.content_hash import CONTENT_HASH
from ..io.registry import ReuseSource, StoredRows, scan_input
from ..io.storage import Store, filesystem
from ..io.vectors import VectorParts
from ..io.multivectors import MULTIVECTORS_DIR
from ..io.writer import REJECTS_DIR, TOKENS_DIR, VECTORS_DIR, remove_files
from ..sinks.base import Sink, SinkError, SinkLoad, close_all, preflight, prune_records, sync_sink
from ..sinks.make import make_sink
from ..sinks.multivector import MULTIVECTOR
from ..version import package_versions
from .calibrate import calibrate
from .embedder import EmbedPlan, UnitEmbedder
from .messages import Stats
from .ray_index import part_digests, ray_shard_runner, ray_sink_sync
from .partitioned_scan import remove_scratch
from .summary import RunSummary
from .unit_diff import UnitDiff, diff_units

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunOptions:
    mode: str = "incremental"  # incremental | overwrite
    keep_removed: bool = False
    progress: bool = True
    runner: str = "local"  # local | ray
    ray_address: str | None = None  # None: start a local Ray instance
    workers: int | None = None  # Ray actors; None: one per GPU, or per 2 CPUs


@dataclass
class RunContext:
    """One run's fixed inputs and its running record, handed from step to step."""
    job: JobConfig  # with the runtime's attention and compile choices written in
    options: RunOptions
    source: ModelSource
    runtime: Runtime
    settings: dict  # the vector settings, as the manifest records them
    store: Store
    ledger: Ledger
    summary: RunSummary
    stats: Stats = dataclasses.field(default_factory=Stats)
    sinks: list[Sink] = dataclasses.field(default_factory=list)  # [[sink]], checked and open
    changed: bool = False  # the folder has begun to change: a failure from here on is exit 1
    # --runner ray: the run's one Ray session, opened when first needed, closed by run_job
    ray: contextlib.ExitStack = dataclasses.field(default_factory=contextlib.ExitStack)
    ray_open: bool = False

    def open_ray(self) -> None:
        """--runner ray: one Ray session for the embedding, the shards and every sink's loads
        (each stage's own ray_session then uses it), with every sink's connection variable
        forwarded to the workers."""
        from .distributed import ray_session

        if self.options.runner == "ray" and not self.ray_open:
            names = [s.cfg.dsn_env for s in self.sinks if getattr(s.cfg, "dsn_env", None)]
            self.ray.enter_context(ray_session(self.options.ray_address, names))
            self.ray_open = True


def id_type_of(unit_schema: pa.Schema, id_column: str) -> pa.DataType:
    """Integer ids are stored as int64, string ids as string, whatever width the input used."""
    return pa.int64() if pa.types.is_integer(unit_schema.field(id_column).type) else pa.string()


def _wipe(store: Store) -> None:
    """--mode overwrite: the manifest goes first, so a crash mid-wipe leaves only strays."""
    store.remove(MANIFEST)
    for folder in (VECTORS_DIR, REJECTS_DIR, TOKENS_DIR, MULTIVECTORS_DIR, INDEX_DIR):
        for name in store.listdir(folder):
            store.remove(posixpath.join(folder, name))


def _sweep(store: Store, ledger: Ledger) -> int:
    """Remove temporaries and parts that no committed unit names (left by a killed run)."""
    named = {f for r in [*ledger.units.values(), *ledger.retired] for f in r.files}
    swept = 0
    for folder in (VECTORS_DIR, REJECTS_DIR, TOKENS_DIR, MULTIVECTORS_DIR, INDEX_DIR):
        swept += len(store.sweep_temporaries(folder))
        if folder == INDEX_DIR:
            continue
        for name in store.listdir(folder):
            if posixpath.join(folder, name) not in named:
                store.remove(posixpath.join(folder, name))
                swept += 1
    return swept + remove_scratch(store)  # a killed Ray run's key files


def unit_schema(unit: Unit) -> pa.Schema:
    fs, path = filesystem(unit.path)
    return open_parquet(fs, path).schema_arrow


def run_job(job: JobConfig, options: RunOptions = RunOptions()) -> RunSummary:
    started = time.perf_counter()
    # Everything that can be refused is refused here, before the folder is touched.
    refuse_overlap(job.input.path, job.output.path)
    units = plan_units(job.input, job.output.keep_columns)  # config errors before the model loads
    source = resolve_model(job.model.name)
    job, recipe = resolve_recipe(job, source)  # pooling, normalize, prompt: concrete from here on
    # a SPLADE folder's rows: sparsevec (sinks/sparse.py); a ColBERT folder's token vectors:
    # LanceDB's multi-vector column (sinks/multivector.py); else by precision. Extras, env vars
    rows = "sparse" if job.encode.sparse else MULTIVECTOR if job.encode.multivector else \
        job.output.precision
    sinks = [make_sink(s, job.index.metric, job.index, rows, job.encode.max_active_dims)
             for s in job.sink]
    # Resolved once here, so that the manifest, the summary and every worker agree.
    runtime = resolve_runtime(job.model, source, sum(u.num_rows for u in units))
    job = dataclasses.replace(job, model=dataclasses.replace(
        job.model, attention=runtime.attention, compile=runtime.compile, forward=runtime.forward))
    job = resolve_chunking(job, source, runtime)
    settings = vector_settings(job, source, runtime)
    if job.index.enabled:
        width = EncoderSettings.for_job(job).width(source.hidden_size)
        check_index_config(job.index, width, Precision(job.output.precision))
        if options.runner == "ray":  # one process would hold every vector: refused up front
            refuse_one_process_index(job.index, sum(u.num_rows for u in units), width,
                                     Precision(job.output.precision))
    preflight(sinks, settings_hash(settings))  # reachable; tables ours and alike, or absent
    store = Store(job.output.path)
    refuse_foreign_folder(store)
    lock = acquire_lock(store)
    try:
        if options.mode == "overwrite":
            _wipe(store)
        ledger = Ledger(store)
        ledger.check_settings(settings)
        summary = RunSummary(job=job.name, output=store.url, model=source.name,
                             runtime=runtime, units_total=len(units), recipe=recipe,
                             long_text=job.encode.long_text,
                             granularity=job.output.granularity,
                             precision="sparse" if job.encode.sparse
                             else job.output.precision,
                             rescore_precision=job.output.rescore_precision,
                             bytes_per_row=0 if job.encode.sparse
                             else row_bytes(job.output, EncoderSettings.for_job(
                                 job).width(source.hidden_size)))
        ctx = RunContext(job, options, source, runtime, settings, store, ledger, summary,
                         sinks=sinks)
        try:
            with ctx.ray:
                _run_locked(ctx, units)
        except Exception as exc:  # signals (BaseException) still stop the run as they do
            if not ctx.changed:
                raise  # found before any work: the command's one line, exit 2
            summary.failures.append(_failure_after_work(exc))
            _record_stats(ctx)
    finally:
        release_lock(store)
        close_all(sinks)
    summary.lock_taken_over = lock.took_over
    summary.seconds["total"] = time.perf_counter() - started
    return summary


def _run_locked(ctx: RunContext, units: list[Unit]) -> None:
    job, store, ledger, summary = ctx.job, ctx.store, ctx.ledger, ctx.summary
    # every committed file read whole against its recorded digest, as `verify` does
    damage = {k: why for k, why in unit_damage(ledger, full=True).items() if why}
    diff = diff_units(ledger.units, units, set(damage))
    summary.units_skipped, summary.units_changed = len(diff.kept), len(diff.changed)
    summary.units_repaired = len(diff.repaired)
    for key in diff.repaired:
        summary.repairs.append(f"{ledger.units[key].path}: {damage[key][0]}")
        log.warning("unit %s is redone: %s", key, "; ".join(damage[key]))
    # The model is loaded and checked (tokenizer, weights) before anything in the folder changes.
    embedder = _prepare(ctx, diff.todo) if diff.todo else None
    calibration = _calibration(ctx, embedder, diff.todo)
    hashed_alike = (ledger.manifest.content_hash or CONTENT_HASH) == CONTENT_HASH
    dropped = _drop(ctx, diff)
    summary.stray_files_removed = _sweep(store, ledger)
    ctx.changed = bool(dropped or summary.stray_files_removed)
    ledger.update(job=job.name, config=job.to_dict(), vector_settings=ctx.settings,
                  settings_hash=settings_hash(ctx.settings), complete=False,
                  content_hash=CONTENT_HASH,
                  model={"name": ctx.source.name, "path": str(ctx.source.path),
                         "fingerprint": ctx.source.fingerprint},
                  versions=package_versions(), calibration=calibration)
    ctx.changed = True  # from here on the run writes parts, the index, sinks

    if embedder is not None:
        _embed(ctx, diff.todo, embedder, hashed_alike)
        summary.stray_files_removed += _sweep(store, ledger)  # what a dead Ray worker left
    current = {u.key for u in units}
    summary.failures = [f"{r.path}: {r.error}" for k, r in ledger.units.items()
                        if not r.complete and k in current]

    parts = ledger.vector_parts()  # every file was checked (kept) or just written
    if job.index.enabled:
        damaged = index_damage(store)  # the index files' sizes and digests, every byte read
        stale = damaged + index_problems(store, parts)
        if diff.todo or dropped or stale or settings_changed(store, job.index):
            if stale and not (diff.todo or dropped):
                log.warning("rebuilding the index: %s", "; ".join(stale))
            _index(ctx, parts, rebuild=damaged[0] if damaged else None)
        else:
            summary.index = ledger.manifest.index or {}
    _record_stats(ctx)
    # What the folder now holds is checked as `embedpipe verify` would, files and counts only.
    problems = unit_problems(ledger) + (index_problems(store, parts) if job.index.enabled
                                        and not summary.index.get("error") else [])
    summary.failures += [f"check: {p}" for p in problems]
    _sync_sinks(ctx, healthy=not problems)
    # The completion record is written last: a folder whose manifest says complete is whole.
    ledger.update(index=summary.index, complete=not summary.failures,
                  last_run=summary.to_dict())
    # The replaced parts go once a run reaches its end, failed units or not (so they never pile
    # up night after night); a run killed before here leaves them named, for its rerun to reuse.
    remove_files(store, ledger.clear_retired())


def _record_stats(ctx: RunContext) -> None:
    """The stages' counts and times, and what the folder holds, into the summary."""
    ctx.summary.real_tokens = ctx.stats.real_tokens
    ctx.summary.padded_tokens = ctx.stats.padded_tokens
    ctx.summary.seconds.update(ctx.stats.seconds)
    ctx.summary.folder_vectors = sum(r.stored_rows for r in ctx.ledger.complete_units())
    if ctx.job.output.representations:  # a BGE-M3 folder: each stored representation's bytes
        from ..io.representations import bytes_by_representation
        ctx.summary.representation_bytes = bytes_by_representation(ctx.store, ctx.ledger)
    if ctx.job.encode.multivector and ctx.summary.folder_vectors:  # measured: tokens x dim x bytes
        from ..io.multivectors import stored_token_count
        files = ctx.ledger.multivector_files()
        tokens = stored_token_count(ctx.store, files)
        width = ctx.source.st.multivector.dim * (2 if ctx.job.output.precision == "float16" else 4)
        ctx.summary.stored_tokens = tokens
        ctx.summary.bytes_per_row = round(tokens * width / ctx.summary.folder_vectors)


def _failure_after_work(exc: Exception) -> str:
    """A failure once the folder began to change (a full disk writing the index, ...): a line of
    the summary (exit 1), the committed units kept for the rerun."""
    log.debug("the run failed after the folder began to change", exc_info=True)
    if isinstance(exc, OSError):
        where = f"{exc.filename}: " if exc.filename else ""
        what = f"{where}{exc.strerror or exc}"
    else:
        what = f"{type(exc).__name__}: {exc}"
    return f"{what}; the committed units are kept: a rerun finishes the rest"


def _sync_sinks(ctx: RunContext, healthy: bool) -> None:
    """Each [[sink]] brought in step with the committed parts (sinks/base.py: sync_sink); one
    that fails is a failure line (exit 1) and is synced by the next run or `embedpipe sync`."""
    prune_records(ctx.ledger, [s.name for s in ctx.sinks])
    if healthy and ctx.sinks:
        ctx.open_ray()
    sync = ray_sink_sync(ctx.options.ray_address, ctx.options.workers) \
        if ctx.options.runner == "ray" else sync_sink  # each unit's rows loaded by a worker
    for sink in ctx.sinks:
        if not healthy:
            ctx.summary.failures.append(f'sink "{sink.name}": not synced, the folder failed '
                                        f"its check")
            continue
        try:
            load = sync(sink, ctx.ledger)
        except (SinkError, ConfigError) as exc:
            why = str(exc) if str(exc).startswith('sink "') else f'sink "{sink.name}": {exc}'
            load = SinkLoad(sink.name, sink.kind, sink.target(), error=why)
            ctx.summary.failures.append(why)
        ctx.summary.sinks.append(load.to_dict())
        ctx.summary.seconds["sinks"] = ctx.summary.seconds.get("sinks", 0.0) + load.seconds


def _index(ctx: RunContext, parts: VectorParts, rebuild: str | None = None) -> None:
    """Bring the index in step with the parts (index/maintain.py: add and remove what changed,
    or rebuild; always rebuild when `rebuild` says why: its files are damaged); one that cannot
    be built for this data (too few vectors to train, a memory budget too small) fails with one
    line, the vectors staying committed."""
    tick = time.perf_counter()
    checkpoint("index")
    try:
        if sharded(ctx.job.index):  # shards written by the workers, only those that changed
            ctx.open_ray()
            runner = ray_shard_runner(ctx.options.ray_address, ctx.options.workers) \
                if ctx.options.runner == "ray" else run_here
            ctx.summary.index = update_sharded(ctx.store, parts, ctx.job.index,
                                               part_digests(ctx.ledger), runner, rebuild)
        else:
            ctx.summary.index = update_index(ctx.store, parts, ctx.job.index, rebuild)
    except (ConfigError, RuntimeError) as exc:
        reason = faiss_reason(exc)
        ctx.summary.index = {"error": reason}
        ctx.summary.failures.append(
            f"index: {reason}; the vectors are committed: rebuild it with other settings, e.g. "
            f"`embedpipe index {ctx.store.url} --type flat`")
    ctx.stats.seconds["index"] += time.perf_counter() - tick


def _drop(ctx: RunContext, diff: UnitDiff) -> list[str]:
    """Changed or failed units are redone; removed ones go unless kept on request. Changed and
    removed units are retired (out of the folder's vectors, their parts kept for reuse until
    the run completes); damaged and failed ones are dropped with their files."""
    removed = [] if ctx.options.keep_removed else list(diff.removed)
    if ctx.options.keep_removed:
        ctx.summary.units_removed_kept = len(diff.removed)
    ctx.summary.units_removed = len(removed)
    retire = [k for k in diff.changed + removed] if ctx.job.encode.reuse != "off" else []
    drop = [k for k in diff.redo + removed if k not in set(retire)]
    if retire:
        ctx.ledger.retire(retire)
    if drop:
        files = [f for k in drop for f in ctx.ledger.units[k].files]
        ctx.ledger.drop_units(drop)
        remove_files(ctx.store, files)
    return retire + drop


def _prepare(ctx: RunContext, todo: list[Unit]) -> UnitEmbedder:
    """The embed plan and a loaded embedder. Loading refuses a model that would give wrong
    vectors (a tokenizer without its vocabulary, weights the pooling needs that the files lack).
    With Ray, the workers load their own; the driver's copy only checks the model."""
    job = ctx.job
    healthy = [u for u in todo if not u.error]
    # The first healthy file sets the id type and the kept columns' types for the folder.
    first = unit_schema(healthy[0]) if healthy else pa.schema([])
    id_type = ctx.ledger.manifest.id_type or (
        str(id_type_of(first, job.input.id_column)) if healthy else "string")
    keep_schema = pa.schema([first.field(c) for c in job.output.keep_columns]) if healthy else None
    return UnitEmbedder(EmbedPlan(job=job, source=ctx.source, runtime=ctx.runtime,
                                  id_type=id_type, keep_schema=keep_schema))


def _calibration(ctx: RunContext, embedder: UnitEmbedder | None,
                 todo: list[Unit]) -> Calibration | None:
    """output.precision (or rescore_precision) int8 / uint8: the folder's recorded ranges, or
    (its first run, or a folder that holds no unit) ranges from an even sample of the rows to
    embed; handed to the embedder's plan. None for the other precisions."""
    job, recorded = ctx.job, ctx.ledger.manifest.calibration
    name = calibrated(job.output.precision, job.output.rescore_precision)
    if name is None:
        return None
    if embedder is None:
        return recorded
    fits = recorded is not None and recorded.precision == name \
        and len(recorded.low) == embedder.plan.width
    if not fits and any(r.complete for r in ctx.ledger.units.values()):
        raise ConfigError(f"{ctx.store.url}: the manifest holds no {name} "
                          f"calibration for its vectors; start the folder afresh with "
                          f"--mode overwrite")
    calibration = recorded if fits else calibrate(embedder, todo, name)
    embedder.plan = dataclasses.replace(embedder.plan, calibration=calibration)
    return calibration


def _stored_files(ctx: RunContext, plan: EmbedPlan, retired: list[str],
                  hashed_alike: bool) -> tuple[str, list[str]]:
    """The reuse mode ("off" where nothing can be reused) and where stored vectors can be
    found: the retired parts (changed, renamed, removed units), and with reuse = "content" the
    kept parts too (a kept id cannot come again: it is a duplicate)."""
    mode = ctx.job.encode.reuse
    if mode == "off" or not plan.reusable:
        return "off", []
    files = (ctx.ledger.vector_files() if mode == "content" else []) + retired
    return mode, files if hashed_alike else []


def _reuse_source(ctx: RunContext, plan: EmbedPlan, retired: list[str],
                  hashed_alike: bool) -> ReuseSource:
    mode, files = _stored_files(ctx, plan, retired, hashed_alike)
    if mode == "off":
        return ReuseSource(mode="off")
    return ReuseSource(mode=mode, stored=StoredRows(ctx.store, files, mode) if files else None)


def _embed_ray(ctx: RunContext, todo: list[Unit], plan: EmbedPlan, retired: list[str],
               hashed_alike: bool, commit, progress) -> None:
    """--runner ray: the input scan, duplicate ids, repeated texts and reuse lookups run on
    the workers (jobs/ray_checks.py); the driver holds nothing a row."""
    from .ray_checks import ScanInputs, embed_checked_on_ray

    job, summary = ctx.job, ctx.summary
    mode, stored = _stored_files(ctx, plan, retired, hashed_alike)
    inputs = ScanInputs(id_column=job.input.id_column, text_column=job.input.text_column,
                        pair_column=job.input.text_pair_column, prompt=job.encode.prompt or "",
                        mode=mode, kept=tuple(ctx.ledger.vector_files()), gone=tuple(retired),
                        stored=tuple(stored), string_ids=plan.id_type == "string")
    scan, summary.oom_splits = embed_checked_on_ray(
        ctx.store, inputs, plan, [(u, ctx.ledger.unit_id(u.key)) for u in todo], commit,
        progress, ctx.stats, address=ctx.options.ray_address, workers=ctx.options.workers)
    summary.reuse = mode
    summary.rows_removed = scan.ids_gone
    summary.registry_bytes = scan.key_bytes


def _embed(ctx: RunContext, todo: list[Unit], embedder: UnitEmbedder, hashed_alike: bool) -> None:
    from tqdm import tqdm

    job, ledger, summary, plan = ctx.job, ctx.ledger, ctx.summary, embedder.plan
    healthy = [u for u in todo if not u.error]
    ledger.update(id_type=plan.id_type, dim=plan.width)
    # retired parts that no longer match their record (a hostile hand) are never read
    retired = [f for r in ledger.retired if not r.damage(ctx.store, full=True)
               for f in r.vector_files]
    bar = tqdm(total=sum(u.num_rows for u in healthy), unit="rows",
               disable=not ctx.options.progress, desc=job.name, dynamic_ncols=True)

    def commit(record: UnitRecord) -> None:
        summary.add(record)
        ledger.commit_unit(record)
        checkpoint("unit")

    try:
        if ctx.options.runner == "ray":
            ctx.open_ray()
            _embed_ray(ctx, todo, plan, retired, hashed_alike, commit, bar.update)
            return
        tick = time.perf_counter()
        scan = scan_input(healthy, job.input.id_column, job.input.text_column, ctx.store,
                          ledger.vector_files(), job.input.text_pair_column,
                          job.encode.prompt or "", gone_files=retired)
        reuse = _reuse_source(ctx, plan, retired, hashed_alike)
        reuse.repeated = scan.repeated if reuse.mode != "off" else reuse.repeated
        summary.reuse = reuse.mode
        summary.rows_removed = scan.ids_gone
        summary.registry_bytes = max(scan.key_bytes, reuse.stored.nbytes if reuse.stored else 0)
        ctx.stats.seconds["scan"] += time.perf_counter() - tick
        units = [(u, ledger.unit_id(u.key)) for u in todo]
        embedder.embed(units, scan.duplicates, commit, bar.update, ctx.stats, reuse)
        summary.oom_splits = embedder.encoder.oom_splits
    finally:
        bar.close()
