"""The input scan and the reuse lookups as hash-partitioned key files: work for many processes,
so the Ray driver holds nothing a row (jobs/ray_checks.py runs it).

What `io/registry.scan_input` and `StoredRows` decide in one process is decided here by three
kinds of task, whose files live in `OUT/_scan/<run>/` (written whole through `Store`, removed
when the run's embedding ends, swept as strays after a kill):

- `scan_unit`: one input unit's valid rows as keys (id key, text key, (id, text) key, row), cut
  by hash into `partitions` batches: one Arrow IPC file per key space (`id`: by id key, `text`:
  by text key). A unit that cannot be read to its end writes nothing: it claims no id.
- `scan_part`: one folder part's rows in the roles the run gives it: a kept id (claims its id
  before every input row), a gone id (counted when no input row has it), a stored row (a reuse
  candidate at its location, `StoredRows`' numbering of (file << 40) | row).
- `check_partition`: one partition of one key space, all producers' batches of it: later rows of
  an id (input order: kept ids, then units in order, rows in order; string ids compared as
  strings), text keys seen more than once, unit rows joined with stored rows on the reuse key.
  Its results are one IPC batch per unit, so the worker that embeds a unit reads only its own
  (`UnitChecks.for_unit`): the rejected rows, the repeated text keys and the stored candidates
  it may ask about, each exactly what the in-memory registry answers for that unit's rows.
"""
from __future__ import annotations

import posixpath
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..faults import checkpoint
from ..io.content_hash import hash_keys, id_keys, pair_keys, partition_order, text_hashes
from ..io.reader import Unit
from ..io.registry import _ROW_BITS, ReuseSource, StoredRows, _parquet, valid_rows
from ..io.checks import reading
from ..io.rejects import plain_texts
from ..io.storage import Store

SCAN_DIR = "_scan"
SPACES = ("id", "text")
KEPT, GONE, STORED = -1, -2, -3  # the `order` of folder rows; input units count from 0
DUPLICATE, REPEATED, CANDIDATE = 0, 1, 2  # result kinds
RESULT_SCHEMA = pa.schema([("kind", pa.int8()), ("value", pa.uint64()), ("loc", pa.uint64())])


@dataclass(frozen=True)
class ScanPlan:
    """What every scan task needs (picklable, O(units + parts))."""
    output: str  # the output folder's URL
    folder: str  # the run's scratch folder inside it: _scan/<run>
    partitions: int
    id_column: str
    text_column: str
    pair_column: str | None
    prompt: str
    mode: str  # reuse: id+content | content | off (off: no text space, no stored rows)
    string_ids: bool
    units: tuple[str, ...]  # unit keys in input order: a unit's number is its place here
    stored: tuple[str, ...] = ()  # the folder parts a vector may be reused from, numbered

    @property
    def spaces(self) -> tuple[str, ...]:
        return SPACES if self.mode != "off" else ("id",)

    def producer(self, name: str, space: str) -> str:
        return posixpath.join(self.folder, f"{name}.{space}.arrow")

    def result(self, space: str, partition: int) -> str:
        return posixpath.join(self.folder, f"result.{space}.{partition:05d}.arrow")


@dataclass
class PartitionCount:
    """A partition task's totals (the driver adds them up: nothing a row)."""
    ids_gone: int = 0
    rows: int = 0  # input rows in the partition
    key_bytes: int = 0  # the task's largest key arrays


def _id_schema(string_ids: bool) -> pa.Schema:
    fields = [("key", pa.uint64()), ("order", pa.int32()), ("row", pa.int64()),
              ("reuse", pa.uint64())]
    return pa.schema(fields + ([("id", pa.large_string())] if string_ids else []))


TEXT_SCHEMA = pa.schema([("key", pa.uint64()), ("order", pa.int32()), ("row", pa.int64())])


def _write_partitioned(store: Store, rel: str, table: pa.Table, partitions: int) -> None:
    """A table as `partitions` IPC batches (batch p: the rows whose key falls in p)."""
    order, bounds = partition_order(table.column("key").to_numpy(), partitions)
    table = table.take(pa.array(order, pa.int64())).combine_chunks()
    _write_batches(store, rel, table, bounds)


def _write_batches(store: Store, rel: str, table: pa.Table, bounds: np.ndarray) -> None:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, table.schema) as writer:
        batch = table.to_batches()[0] if table.num_rows else None
        for start, end in zip(bounds[:-1].tolist(), bounds[1:].tolist()):
            writer.write_batch(batch.slice(start, end - start) if batch is not None
                               else pa.record_batch([pa.array([], f.type) for f in table.schema],
                                                    schema=table.schema))
    store.write_bytes(rel, sink.getvalue().to_pybytes())


def _read_batch(store: Store, rel: str, number: int) -> pa.RecordBatch:
    source = pa.memory_map(store.path(rel)) if store.local else store.fs.open(store.path(rel), "rb")
    with source:
        return pa.ipc.open_file(source).get_batch(number)


def scan_unit(plan: ScanPlan, number: int, unit: Unit) -> int:
    """One unit's valid rows as partitioned key files; returns the rows written (0: the unit
    could not be read to its end and claims nothing)."""
    columns = [plan.id_column, plan.text_column] + ([plan.pair_column] if plan.pair_column else [])
    pieces: dict[str, list] = {c: [] for c in ("key", "text", "row", "id")}
    try:
        for ids, rows, texts, pairs in valid_rows(unit, columns, plan.pair_column is not None):
            pieces["key"].append(id_keys(ids))
            pieces["row"].append(np.asarray(rows, np.int64))
            pieces["text"].append(hash_keys(text_hashes(
                plain_texts(texts).to_pylist(),
                plain_texts(pairs).to_pylist() if pairs is not None else None, plan.prompt)))
            if plan.string_ids:
                pieces["id"].append(ids.cast(pa.large_string()))
    except Exception:  # a unit that breaks mid-file fails when embedded; it claims nothing
        return 0
    join = {k: np.concatenate(v) if v else np.zeros(0, np.uint64 if k != "row" else np.int64)
            for k, v in pieces.items() if k != "id"}
    n = len(join["key"])
    order = np.full(n, number, np.int32)
    table = pa.table({"key": join["key"], "order": order, "row": join["row"],
                      "reuse": pair_keys(join["key"], join["text"])}, schema=_id_schema(False))
    if plan.string_ids:
        table = table.append_column("id", pa.concat_arrays(pieces["id"]) if pieces["id"]
                                    else pa.array([], pa.large_string()))
    store = Store(plan.output)
    _write_partitioned(store, plan.producer(f"unit-{number:06d}", "id"), table, plan.partitions)
    if "text" in plan.spaces:
        _write_partitioned(store, plan.producer(f"unit-{number:06d}", "text"), pa.table(
            {"key": join["text"], "order": order, "row": join["row"]}, schema=TEXT_SCHEMA),
            plan.partitions)
    return n


def scan_part(plan: ScanPlan, name: str, kept: bool, gone: bool, stored: int | None,
              tag: str) -> list[str]:
    """One folder part in its roles (stored: its number among plan.stored); returns the key
    spaces it wrote files for (under the producer name `tag`)."""
    store = Store(plan.output)
    want_hash = stored is not None
    parquet = _parquet(store, name)
    if want_hash and "text_hash" not in parquet.schema_arrow.names:
        want_hash = False  # written before text hashes: nothing in it can be reused
        if not (kept or gone):
            return []
    columns = ["id"] + (["text_hash"] if want_hash else [])
    ids, hashes = [], []
    with reading(name):
        for batch in parquet.iter_batches(65_536, columns=columns):
            ids.append(batch.column(0))
            if want_hash:
                hashes.append(hash_keys(batch.column(1)))
    id_array = pa.chunked_array(ids, parquet.schema_arrow.field("id").type).combine_chunks() \
        if ids else pa.array([], pa.int64())
    keys = id_keys(id_array)
    n = len(keys)
    text = np.concatenate(hashes) if hashes else np.zeros(n, np.uint64)
    locs = (np.uint64(stored or 0) << np.uint64(_ROW_BITS)) | np.arange(n, dtype=np.uint64)
    pieces, written = [], []
    for role, on in ((KEPT, kept), (GONE, gone), (STORED, want_hash and plan.mode == "id+content")):
        if on:
            piece = {"key": keys, "order": np.full(n, role, np.int32),
                     "row": (locs if role == STORED else np.zeros(n, np.uint64)).astype(np.int64),
                     "reuse": pair_keys(keys, text) if role == STORED else np.zeros(n, np.uint64)}
            if plan.string_ids:
                piece["id"] = id_array.cast(pa.large_string())
            pieces.append(pa.table(piece, schema=_id_schema(plan.string_ids)))
    if pieces:
        _write_partitioned(store, plan.producer(tag, "id"), pa.concat_tables(pieces),
                           plan.partitions)
        written.append("id")
    if want_hash and plan.mode == "content":
        _write_partitioned(store, plan.producer(tag, "text"), pa.table(
            {"key": text, "order": np.full(n, STORED, np.int32), "row": locs.astype(np.int64)},
            schema=TEXT_SCHEMA), plan.partitions)
        written.append("text")
    return written


def check_partition(plan: ScanPlan, space: str, partition: int,
                    producers: list[str]) -> PartitionCount:
    """One partition of one key space: its results, one IPC batch per unit."""
    store = Store(plan.output)
    checkpoint("scan")
    batches = [_read_batch(store, plan.producer(p, space), partition) for p in producers]
    schema = _id_schema(plan.string_ids) if space == "id" else TEXT_SCHEMA
    table = pa.Table.from_batches([b for b in batches if b.num_rows], schema=schema)
    table = table.combine_chunks()
    order = table.column("order").to_numpy()
    keys = table.column("key").to_numpy()
    rows = table.column("row").to_numpy()
    count = PartitionCount(rows=int((order >= 0).sum()), key_bytes=table.nbytes)
    results: list[tuple[np.ndarray, int, np.ndarray, np.ndarray]] = []  # (unit, kind, value, loc)
    if space == "id":
        claim = np.flatnonzero(order >= KEPT)
        results.append(_duplicates(table, claim, keys, order, rows, plan.string_ids))
        gone = keys[order == GONE]
        count.ids_gone = int((~np.isin(gone, keys[claim])).sum())
        if plan.mode == "id+content":
            results.append(_candidates(table.column("reuse").to_numpy(), order, rows))
    else:
        mine = order >= 0
        sorted_keys = np.sort(keys[mine])
        repeated = np.unique(sorted_keys[1:][sorted_keys[1:] == sorted_keys[:-1]])
        hit = mine & np.isin(keys, repeated)
        results.append((order[hit], REPEATED, keys[hit], np.zeros(int(hit.sum()), np.uint64)))
        if plan.mode == "content":
            results.append(_candidates(keys, order, rows))
    _write_results(store, plan.result(space, partition), results, len(plan.units))
    return count


def _duplicates(table: pa.Table, claim: np.ndarray, keys, order, rows, string_ids: bool):
    """Rows whose id an earlier row (kept ids first, then input order) has."""
    if string_ids:  # keys of string ids can collide: order by the ids themselves
        sub = pa.table({"id": table.column("id").take(pa.array(claim, pa.int64())),
                        "order": order[claim], "row": rows[claim]})
        by = pc.sort_indices(sub, [("id", "ascending"), ("order", "ascending"),
                                   ("row", "ascending")]).to_numpy()
        ids = sub.column("id").take(pa.array(by, pa.int64()))
        same = np.asarray(pc.equal(ids.slice(1), ids.slice(0, len(ids) - 1))) if len(ids) > 1 \
            else np.zeros(0, bool)
    else:
        by = np.lexsort((rows[claim], order[claim], keys[claim]))
        sorted_keys = keys[claim][by]
        same = sorted_keys[1:] == sorted_keys[:-1]
    later = claim[by[1:][same]] if len(by) > 1 else np.zeros(0, np.int64)
    return order[later], DUPLICATE, rows[later].astype(np.uint64), np.zeros(len(later), np.uint64)


def _candidates(reuse: np.ndarray, order: np.ndarray, rows: np.ndarray):
    """Each unit row's stored rows with its reuse key: (unit, key, location), each pair once."""
    stored = np.flatnonzero(order == STORED)
    asking = np.flatnonzero(order >= 0)
    by = stored[np.lexsort((rows[stored], reuse[stored]))]
    stored_keys = reuse[by]
    low = np.searchsorted(stored_keys, reuse[asking], "left")
    counts = np.searchsorted(stored_keys, reuse[asking], "right") - low
    owner = np.repeat(asking, counts)
    starts = np.repeat(low - np.concatenate([[0], np.cumsum(counts)[:-1]]), counts)
    found = by[starts + np.arange(len(owner))]
    pairs = np.unique(np.stack([order[owner].astype(np.uint64), reuse[owner],
                                rows[found].astype(np.uint64)]), axis=1) if len(owner) \
        else np.zeros((3, 0), np.uint64)
    return pairs[0].astype(np.int32), CANDIDATE, pairs[1], pairs[2]


def _write_results(store: Store, rel: str, results, units: int) -> None:
    unit = np.concatenate([r[0] for r in results]).astype(np.int64)
    kind = np.concatenate([np.full(len(r[0]), r[1], np.int8) for r in results])
    value = np.concatenate([r[2] for r in results]).astype(np.uint64)
    loc = np.concatenate([r[3] for r in results]).astype(np.uint64)
    order = np.argsort(unit, kind="stable")
    table = pa.table({"kind": kind[order], "value": value[order], "loc": loc[order]},
                     schema=RESULT_SCHEMA)
    _write_batches(store, rel, table, np.searchsorted(unit[order], np.arange(units + 1)))


@dataclass
class UnitChecks:
    """What a worker needs to embed a unit as the local runner would (picklable: file names).
    `for_unit` reads the unit's share of every partition's results."""
    plan: ScanPlan
    index: dict[str, int] = field(default_factory=dict)  # unit key -> number

    def __post_init__(self):
        self.index = {key: number for number, key in enumerate(self.plan.units)}

    def for_unit(self, unit: Unit) -> tuple[np.ndarray, ReuseSource]:
        """(rows rejected as duplicate ids, the reuse lookups for this unit's rows)."""
        plan, store = self.plan, Store(self.plan.output)
        number = self.index.get(unit.key)
        if number is None:  # not scanned (failed before): nothing claimed, nothing reused
            return np.zeros(0, np.int64), ReuseSource(mode=plan.mode)
        found = [_read_batch(store, plan.result(space, p), number)
                 for space in plan.spaces for p in range(plan.partitions)]
        table = pa.Table.from_batches(found, schema=RESULT_SCHEMA)
        kind = table.column("kind").to_numpy()
        value = table.column("value").to_numpy()
        duplicates = np.sort(value[kind == DUPLICATE].astype(np.int64))
        if plan.mode == "off":
            return duplicates, ReuseSource(mode="off")
        take = kind == CANDIDATE
        stored = StoredRows.from_arrays(store, list(plan.stored), plan.mode, value[take],
                                        table.column("loc").to_numpy()[take]) \
            if plan.stored else None
        return duplicates, ReuseSource(mode=plan.mode, stored=stored,
                                       repeated=np.unique(value[kind == REPEATED]))


def remove_scratch(store: Store, folder: str = SCAN_DIR) -> int:
    """The scan's files (a run's folder, or every run's after a kill); returns how many."""
    if not store.exists(folder):
        return 0
    removed = len(store.fs.find(store.path(folder)))
    store.fs.rm(store.path(folder), recursive=True)
    return removed
