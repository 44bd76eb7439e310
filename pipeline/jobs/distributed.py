"""Run units of work on a Ray cluster: one actor per GPU (or per few CPUs), one encoder each.

The driver keeps the ledger exactly as the local runner does; actors only embed a unit into the
output folder and hand back its record. An actor that dies takes its unit with it: the unit is
queued again for a fresh actor, and whatever the dead one wrote is swept (its part names are
not in the manifest). Ray is an optional extra: nothing else in embedpipe imports it.
"""
from __future__ import annotations

import logging

import numpy as np
import os
from collections import deque
from contextlib import contextmanager
from typing import Callable, Iterator

from ..io.manifest import UnitRecord
from ..io.reader import Unit
from ..io.registry import ReuseSource
from .embedder import EmbedPlan, UnitEmbedder
from .messages import NO_ROWS, Stats
from .partitioned_scan import UnitChecks

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 3
FORWARDED_ENV = ("EMBEDPIPE_", "HF_", "TRANSFORMERS_", "TOKENIZERS_")


class EmbedActor:
    """Holds one loaded model for its whole life; embeds one unit per call."""

    def __init__(self, plan: EmbedPlan, threads: int,
                 reuse: ReuseSource | UnitChecks | None = None):
        """reuse: the stored-row lookup (shared through Ray's object store) and the texts
        repeated in the run, or (jobs/ray_checks.py) where each unit's share of the workers'
        checks lies. A repeated text is copied within its unit only, as the local runner does
        (jobs/reuse.py), so an actor's vectors are the local runner's bit for bit."""
        import torch

        torch.set_num_threads(threads)
        self.embedder = UnitEmbedder(plan)
        self.reuse = reuse

    def pid(self) -> int:
        return os.getpid()

    def embed(self, unit: Unit, unit_id: int,
              duplicate_rows: np.ndarray) -> tuple[list[UnitRecord], Stats, int]:
        records: list[UnitRecord] = []
        stats = Stats()
        before = self.embedder.encoder.oom_splits
        reuse = self.reuse
        if isinstance(reuse, UnitChecks):  # the unit's duplicate rows and lookups, from files
            duplicate_rows, reuse = reuse.for_unit(unit)
        self.embedder.embed([(unit, unit_id)], {unit.key: duplicate_rows}, records.append,
                            lambda rows: None, stats, reuse)
        return records, stats, self.embedder.encoder.oom_splits - before


@contextmanager
def ray_session(address: str | None, names: tuple[str, ...] | list[str] = ()) -> Iterator[object]:
    """Ray, connected to `address`, or a local instance of this run's own when none is given
    (never a cluster that happens to run on this machine: a bare ray.init() joins one advertised
    in /tmp/ray; RAY_ADDRESS still picks one). The run's environment and the variables `names`
    (a sink's connection string) are forwarded; a session started here is shut down after, one
    already open is used as it is."""
    import ray

    started_here = not ray.is_initialized()
    if started_here:
        env = {k: v for k, v in os.environ.items() if k.startswith(FORWARDED_ENV) or k in names}
        ray.init(address=address or (None if os.environ.get("RAY_ADDRESS") else "local"),
                 include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": env} if env else None)
        log.info("ray: session started (%s)", address or os.environ.get("RAY_ADDRESS")
                 or "a local instance")
    try:
        yield ray
    finally:
        if started_here:
            ray.shutdown()


def embed_on_ray(plan: EmbedPlan, units: list[tuple[Unit, int]], duplicates: dict[str, set[int]],
                 commit: Callable[[UnitRecord], None], progress: Callable[[int], None], stats: Stats,
                 address: str | None = None, workers: int | None = None,
                 reuse: ReuseSource | UnitChecks | None = None) -> int:
    """Embed `units` on Ray actors, committing each unit's record as it arrives. Returns OOM splits."""
    from ray.exceptions import RayActorError, WorkerCrashedError

    with ray_session(address) as ray:
        resources = ray.cluster_resources()
        gpus, cpus = int(resources.get("GPU", 0)), int(resources.get("CPU", 1))
        count = workers or (gpus if gpus else max(1, cpus // 2))
        threads = max(1, cpus // count) if not gpus else 2
        options = {"num_gpus": 1, "num_cpus": 1} if gpus else {"num_cpus": min(threads, cpus)}
        actor_class = ray.remote(**options)(EmbedActor)
        log.info("ray: %d actors (%s), %d units", count, "1 GPU each" if gpus else f"{threads} CPU threads each",
                 len(units))

        queue = deque(units)
        reuse_ref = ray.put(reuse)  # one copy in the object store, not one per actor call
        idle = [actor_class.remote(plan, threads, reuse_ref) for _ in range(min(count, len(units)))]
        pending: dict = {}
        attempts: dict[str, int] = {}
        oom_splits = 0
        while queue or pending:
            while idle and queue:
                actor = idle.pop()
                unit, unit_id = queue.popleft()
                ref = actor.embed.remote(unit, unit_id, duplicates.get(unit.key, NO_ROWS))
                pending[ref] = (actor, unit, unit_id)
            ready, _ = ray.wait(list(pending), num_returns=1)
            actor, unit, unit_id = pending.pop(ready[0])
            try:
                records, unit_stats, splits = ray.get(ready[0])
            except (RayActorError, WorkerCrashedError) as exc:
                attempts[unit.key] = attempts.get(unit.key, 0) + 1
                if attempts[unit.key] >= MAX_ATTEMPTS:
                    commit(UnitRecord.for_unit(
                        unit, "failed",
                        error=f"worker died {MAX_ATTEMPTS} times: {type(exc).__name__}",
                        rows_in=unit.num_rows))
                else:
                    log.warning("ray: worker died on %s; retrying on a new worker", unit.key)
                    queue.appendleft((unit, unit_id))
                idle.append(actor_class.remote(plan, threads, reuse_ref))
                continue
            for record in records:
                commit(record)
                progress(record.counts.rows_in)
            stats.merge(unit_stats)
            oom_splits += splits
            idle.append(actor)
        return oom_splits

