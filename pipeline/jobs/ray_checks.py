"""The Ray runner with its checks on the workers: the driver's memory grows with the units, not
the rows.

Before any unit is embedded, two waves of Ray tasks (jobs/partitioned_scan.py): one task per
input unit and per folder part writes its keys cut into hash partitions; then one task per
partition finds the later rows of an id, the repeated texts and the stored rows each unit may
reuse, and writes them per unit. The actors (jobs/distributed.py) then embed the units, each
reading its own unit's results. The driver holds the units, file names and counts.

Why key files in the output folder rather than Ray Data's shuffle: the partitions must hold
every input row's keys at once (a billion rows: tens of GB), which Ray's object store would
spill anyway (ray #26441), and the results must outlive a task wave for the actors, which read
only their unit's share. Files in the folder every node already reads and writes need no extra
service, are written whole (`Store.open_atomic`) so a retried task is harmless, and are swept
like any other stray file after a kill.
"""
from __future__ import annotations

import logging
import math
import posixpath
import time
import uuid
from dataclasses import dataclass
from typing import Callable

from ..io.manifest import UnitRecord
from ..io.reader import Unit
from ..io.storage import Store
from .distributed import embed_on_ray, ray_session
from .embedder import EmbedPlan
from .messages import Stats
from .partitioned_scan import (SCAN_DIR, ScanPlan, UnitChecks, check_partition, remove_scratch,
                               scan_part, scan_unit)

log = logging.getLogger(__name__)

ROWS_PER_PARTITION = 4_000_000  # ~40 bytes a row in a partition task: ~160 MB each
MAX_PARTITIONS = 4096
TASK_RETRIES = 3  # a task whose worker died runs again: its files are written whole


@dataclass(frozen=True)
class ScanInputs:
    """What the scan reads: the units to embed (in input order) and the folder's parts."""
    id_column: str
    text_column: str
    pair_column: str | None
    prompt: str
    mode: str  # the reuse mode, "off" where nothing is reused
    kept: tuple[str, ...]  # the kept units' vector parts: their ids come first
    gone: tuple[str, ...]  # the retired parts: ids no input row has are counted
    stored: tuple[str, ...]  # parts a vector may be reused from (StoredRows' files)
    string_ids: bool


@dataclass
class WorkerScan:
    """The scan's totals, as the driver keeps them."""
    checks: UnitChecks
    ids_gone: int
    rows_scanned: int
    key_bytes: int  # the largest key arrays one partition task held
    seconds: dict[str, float]


def partitions_for(rows: int, cpus: int) -> int:
    return int(min(MAX_PARTITIONS, max(cpus, math.ceil(rows / ROWS_PER_PARTITION), 1)))


def check_on_workers(store: Store, inputs: ScanInputs, units: list[Unit]) -> WorkerScan:
    """The two task waves on the Ray instance this process is connected to."""
    import ray

    healthy = [u for u in units if not u.error]
    cpus = int(ray.cluster_resources().get("CPU", 1))
    plan = ScanPlan(output=store.url, folder=posixpath.join(SCAN_DIR, uuid.uuid4().hex[:12]),
                    partitions=partitions_for(sum(u.num_rows for u in healthy), cpus),
                    id_column=inputs.id_column, text_column=inputs.text_column,
                    pair_column=inputs.pair_column, prompt=inputs.prompt, mode=inputs.mode,
                    string_ids=inputs.string_ids, units=tuple(u.key for u in healthy),
                    stored=inputs.stored)
    options = {"num_cpus": 1, "max_retries": TASK_RETRIES}
    unit_task = ray.remote(**options)(scan_unit)
    part_task = ray.remote(**options)(scan_part)
    check_task = ray.remote(**options)(check_partition)
    tick = time.perf_counter()
    plan_ref = ray.put(plan)  # once in the object store, not once a task
    unit_refs = [unit_task.remote(plan_ref, n, u) for n, u in enumerate(healthy)]
    stored_at = {name: n for n, name in enumerate(inputs.stored)}
    kept, gone = set(inputs.kept), set(inputs.gone)
    parts = list(dict.fromkeys([*inputs.kept, *inputs.gone, *inputs.stored]))
    part_refs = [part_task.remote(plan_ref, name, name in kept, name in gone, stored_at.get(name),
                                  f"part-{n:06d}") for n, name in enumerate(parts)]
    written = _get(unit_refs)
    producers = {space: [f"unit-{n:06d}" for n, rows in enumerate(written) if rows]
                 for space in plan.spaces}
    for n, spaces in enumerate(_get(part_refs)):
        for space in spaces:
            producers[space].append(f"part-{n:06d}")
    keys_written = time.perf_counter()
    lists = {space: ray.put(names) for space, names in producers.items()}
    counts = _get([check_task.remote(plan_ref, space, p, lists[space])
                   for space in plan.spaces for p in range(plan.partitions)])
    done = time.perf_counter()
    log.info("ray: %d units scanned into %d partitions by workers", len(healthy), plan.partitions)
    return WorkerScan(checks=UnitChecks(plan), ids_gone=sum(c.ids_gone for c in counts),
                      rows_scanned=sum(c.rows for c in counts[:plan.partitions]),  # the id space
                      key_bytes=max([c.key_bytes for c in counts], default=0),
                      seconds={"scan": done - tick, "scan_keys": keys_written - tick,
                               "scan_check": done - keys_written})


def _get(refs: list):
    """ray.get, a task's own exception raised as itself (one line from the runner)."""
    import ray
    from ray.exceptions import RayTaskError

    try:
        return ray.get(refs)
    except RayTaskError as exc:
        cause = getattr(exc, "cause", None)
        raise cause if isinstance(cause, Exception) else exc


def embed_checked_on_ray(store: Store, inputs: ScanInputs, plan: EmbedPlan,
                         units: list[tuple[Unit, int]], commit: Callable[[UnitRecord], None],
                         progress: Callable[[int], None], stats: Stats,
                         address: str | None = None,
                         workers: int | None = None) -> tuple[WorkerScan, int]:
    """Scan on the workers, then embed on actors; returns the scan's totals and OOM splits.
    The run's key files go once the units are embedded (or the run fails)."""
    with ray_session(address):
        remove_scratch(store)  # a killed run's (this run holds the lock)
        scan = None
        try:
            scan = check_on_workers(store, inputs, [u for u, _ in units])
            for stage, seconds in scan.seconds.items():
                stats.seconds[stage] += seconds
            tick = time.perf_counter()
            splits = embed_on_ray(plan, units, {}, commit, progress, stats, address=address,
                                  workers=workers, reuse=scan.checks)
            stats.seconds["embed_wall"] += time.perf_counter() - tick
        finally:
            remove_scratch(store)
        return scan, splits
