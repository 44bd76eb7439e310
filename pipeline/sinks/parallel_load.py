"""A sink synced by several loaders at once, each upserting whole units (the ray runner's).

The same sync as base.sync_sink, cut in three: `plan_sync` (on the driver: which units the
sink lacks, whether the record can be trusted, the table made with its marker if missing),
`load_units` (anywhere: a fresh connection from the sink's config upserts these units' rows,
keyed by id; LanceDB commit conflicts between concurrent merges are retried), and `finish_sync`
(on the driver, after every loader returned: the ids no longer in the folder deleted, the row
count checked, the ANN index, then the record). The record is written only by `finish_sync`,
after every unit is in: a run killed before it leaves the old record (or a row count it does
not match, a full sync), and its rerun upserts the same rows again, which changes nothing.
Units hold disjoint ids, so concurrent loaders never write the same row.
"""
from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass, field

import pyarrow as pa

from ..config import IndexConfig, SinkConfig
from ..faults import checkpoint
from ..io.ledger import Ledger
from ..io.manifest import SinkRecord
from ..io.storage import Store
from ..io.vectors import VectorParts
from .base import (Marker, Sink, SinkError, SinkLoad, _blocks, _part_schema, folder_keys,
                   recorded, unit_version)
from .make import make_sink

log = logging.getLogger(__name__)

CONFLICT_RETRIES = 8  # a loader's whole upsert tried again after a commit conflict (LanceDB)


@dataclass(frozen=True)
class UnitLoad:
    """One loader's work, picklable: the sink's config and these units' vector parts."""
    sink: SinkConfig
    metric: str
    index: IndexConfig | None
    precision: str
    store_url: str
    schema: pa.Schema
    marker: Marker
    units: tuple[str, ...]
    files: tuple[str, ...]


@dataclass
class SyncPlan:
    marker: Marker
    now: dict[str, str]  # unit key -> version, what the record will say
    schema: pa.Schema
    loads: list[UnitLoad] = field(default_factory=list)
    deletes: bool = False  # ids not in the folder are deleted after the loads
    full: bool = False


def plan_sync(sink: Sink, ledger: Ledger, full: bool = False) -> SyncPlan:
    """What the loaders do: one load per unit the sink's record does not hold in its version
    now (every unit where the record cannot be trusted)."""
    marker = Marker.of_folder(ledger, sink.vector_type)
    sink.check(marker)
    units = ledger.complete_units()
    now = {r.key: unit_version(r) for r in units}
    record = recorded(ledger, sink)
    before = sink.count()
    trusted = record is not None and not full and before is not None and before == record.rows
    held = record.units if trusted else {}
    todo = [r for r in units if held.get(r.key) != now[r.key] and r.vector_files]
    stale = [k for k, v in held.items() if now.get(k) != v]
    schema = _part_schema(ledger.store, ledger.vector_files())
    plan = SyncPlan(marker, now, schema, deletes=bool(stale) or not trusted, full=not trusted)
    if todo and before is None:
        sink.load(schema, iter(()), None, marker)  # the table and its marker, made once here
    plan.loads = [UnitLoad(sink.cfg, sink.metric, sink.index_cfg, sink.precision,
                           ledger.store.url, schema, marker, (r.key,), tuple(r.vector_files))
                  for r in todo]
    return plan


def load_units(load: UnitLoad) -> int:
    """Upsert one load's rows through a connection of its own (in a worker). Returns the rows."""
    sink = make_sink(load.sink, load.metric, load.index, load.precision)
    sink.open()
    try:
        for attempt in range(CONFLICT_RETRIES + 1):
            blocks = _blocks(VectorParts(Store(load.store_url), list(load.files)), load.schema)
            try:
                return sink.upsert(load.schema, blocks, load.marker)
            except SinkError as exc:
                if "conflict" not in str(exc).lower() or attempt == CONFLICT_RETRIES:
                    raise
                log.info("%s: commit conflict, loading %d units again", sink.name,
                         len(load.units))
                time.sleep(random.uniform(0.05, 0.2) * 2 ** attempt)
        raise AssertionError("unreachable")
    finally:
        sink.close()


def finish_sync(sink: Sink, ledger: Ledger, plan: SyncPlan, upserted: int,
                seconds: float) -> SinkLoad:
    """After every load returned: delete what the folder no longer holds, check the count,
    build the ANN index, then write the record (the sink's commit point in the manifest)."""
    tick = time.perf_counter()
    report = SinkLoad(sink.name, sink.kind, sink.target(), full=plan.full,
                      units=sum(len(x.units) for x in plan.loads), upserted=upserted)
    if plan.deletes:
        keep = folder_keys(ledger.store, ledger.vector_files())
        _, report.deleted = sink.load(plan.schema, iter(()), keep, plan.marker)
    after = sink.count() or 0
    expected = sum(ledger.vector_parts().rows())
    if after != expected:
        raise SinkError(f'sink "{sink.name}": after the sync {sink.describe()} holds '
                        f"{after:,} rows, the folder {expected:,}; was the table written by "
                        f"something else meanwhile?")
    report.rows = after
    report.index = sink.ensure_index(after)
    report.seconds = seconds + time.perf_counter() - tick
    checkpoint("sink")  # every unit in, the record not yet written
    sinks = dict(ledger.manifest.sinks or {})
    sinks[sink.name] = SinkRecord(kind=sink.kind, target=sink.target(), units=plan.now,
                                  rows=after, settings_hash=plan.marker.settings_hash,
                                  synced=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    ledger.update(sinks=sinks)
    return report
