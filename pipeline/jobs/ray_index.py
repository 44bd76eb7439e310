"""The run's work after the units, on Ray: index shards written by actors (index/shard_build.py),
sinks loaded by tasks (sinks/parallel_load.py).

The driver plans the jobs and commits the infos; the `ShardActor`s (one per worker, as many as
the run's embedding actors, kept for the run's Ray session) run them: the training and recall
samples of each group of parts, the training, the label check, the whole shard files (with their
rows' exact neighbours of the recall queries and the pid that wrote them), the `ondisk` merge
and the recall searches of the shard files: the driver reads no vector and holds no per-row
array. An actor that dies is restarted by Ray and its pending jobs run again (a shard file is
written whole or not at all, under a name no infos name yet). Ray is an
optional extra: nothing in the index or sink layers imports it. A sink's loads are Ray tasks
(retried when their worker dies; an upsert by id repeats harmlessly); the driver deletes, checks
and records after every load returned.
"""
from __future__ import annotations

import logging
import time

from ..index.layouts import Job, ShardRunner
from ..io.ledger import Ledger
from .distributed import ray_session

log = logging.getLogger(__name__)

MAX_RESTARTS = 3


class ShardActor:
    def __init__(self, threads: int):
        import faiss

        faiss.omp_set_num_threads(threads)

    def run(self, job: Job):
        return job.run()


def actor_count(ray, workers: int | None, jobs: int) -> tuple[int, int]:
    """(actors, CPU threads each): --workers, else one per 2 CPUs, never more than jobs or
    the cluster's CPUs (an actor of one CPU beyond them would wait for ever)."""
    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    count = max(1, min(workers or max(1, cpus // 2), jobs, cpus))
    return count, max(1, cpus // count)


def ray_shard_runner(address: str | None, workers: int | None) -> ShardRunner:
    """A ShardRunner that hands the jobs round-robin to Ray actors, in the order given back.
    The actors are kept from call to call while the run's Ray session lasts (a build's samples,
    label checks, shards and recall searches reuse them). Each actor adds with the driver's
    FAISS thread count: the coarse assignment's products are summed per thread block, so
    another count can put a vector on a near-tie between two lists into the other one; with the
    same count the shards are the local build's, byte for byte (on the same kind of CPU)."""
    actors: list = []

    def run(jobs: list[Job]) -> list:
        import faiss
        import ray as ray_module

        if not ray_module.is_initialized():
            actors.clear()  # a session of this call's own: earlier actors went with theirs
        threads = faiss.omp_get_max_threads()
        with ray_session(address) as ray:
            count, _ = actor_count(ray, workers, len(jobs))
            if len(actors) < count:
                actor_class = ray.remote(num_cpus=1, max_restarts=MAX_RESTARTS,
                                         max_task_retries=MAX_RESTARTS)(ShardActor)
                actors.extend(actor_class.remote(threads) for _ in range(count - len(actors)))
                log.info("ray: %d index actors", len(actors))
            log.debug("ray: %d %s jobs on %d actors", len(jobs),
                      type(jobs[0]).__name__ if jobs else "no", count)
            refs = [actors[i % count].run.remote(job) for i, job in enumerate(jobs)]
            return ray.get(refs)
    return run


def part_digests(ledger: Ledger) -> list[str | None]:
    """Each committed vector part's sha256 as the manifest recorded it, in the parts' order."""
    return [(r.checks[f].digest if f in r.checks else None)
            for r in ledger.complete_units() for f in r.vector_files]


def _load_task(load) -> int:
    from ..sinks.parallel_load import load_units
    return load_units(load)


def ray_sink_sync(address: str | None, workers: int | None):
    """A sync_sink for the ray runner: each group of units upserted by a Ray task, the deletes,
    the count check and the record on the driver (sinks/parallel_load.py)."""
    from ..sinks.base import SinkError
    from ..sinks.parallel_load import finish_sync, plan_sync

    def sync(sink, ledger: Ledger):
        tick = time.perf_counter()
        plan = plan_sync(sink, ledger)
        upserted = 0
        if plan.loads:
            dsn_env = getattr(sink.cfg, "dsn_env", None)
            with ray_session(address, [dsn_env] if dsn_env else []) as ray:
                count, _ = actor_count(ray, workers, len(plan.loads))
                task = ray.remote(num_cpus=1, max_retries=MAX_RESTARTS)(_load_task)
                log.info("ray: sink %s: %d loads on up to %d workers", sink.name,
                         len(plan.loads), count)
                try:
                    upserted = sum(ray.get([task.remote(load) for load in plan.loads]))
                except ray.exceptions.RayTaskError as exc:
                    cause = exc.cause if isinstance(exc.cause, Exception) else exc
                    raise SinkError(str(cause).splitlines()[0] if str(cause) else
                                    type(cause).__name__) from None
        return finish_sync(sink, ledger, plan, upserted, time.perf_counter() - tick)
    return sync
