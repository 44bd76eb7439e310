"""The run's work after the units, on Ray: index shards written by actors (index/shard_build.py).

The driver plans the shards and commits the infos; each `ShardActor` (one per worker, as many as
the run's embedding actors) writes whole shard files into the output folder and returns what the
infos record, with its pid. An actor that dies is restarted by Ray and its pending jobs run
again (a shard file is written whole or not at all, under a name no infos name yet). Ray is an
optional extra: nothing else in the index layer imports it.
"""
from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from typing import Iterator

from ..index.shard_build import ShardJob, ShardRunner, write_shard_job
from ..io.ledger import Ledger
from .distributed import FORWARDED_ENV

log = logging.getLogger(__name__)

MAX_RESTARTS = 3


class ShardActor:
    def __init__(self, threads: int):
        import faiss

        faiss.omp_set_num_threads(threads)

    def write(self, job: ShardJob) -> dict:
        return write_shard_job(job)


@contextmanager
def ray_session(address: str | None) -> Iterator[object]:
    """Ray, connected (or a local instance started, with the run's environment forwarded, and
    shut down after)."""
    import ray

    started_here = not ray.is_initialized()
    if started_here:
        env = {k: v for k, v in os.environ.items() if k.startswith(FORWARDED_ENV)}
        ray.init(address=address, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": env} if env else None)
    try:
        yield ray
    finally:
        if started_here:
            ray.shutdown()


def actor_count(ray, workers: int | None, jobs: int) -> tuple[int, int]:
    """(actors, CPU threads each): --workers, else one per 2 CPUs, never more than jobs."""
    cpus = int(ray.cluster_resources().get("CPU", 1))
    count = max(1, min(workers or max(1, cpus // 2), jobs))
    return count, max(1, cpus // count)


def ray_shard_runner(address: str | None, workers: int | None) -> ShardRunner:
    """A ShardRunner that hands the jobs round-robin to Ray actors, in the order given back."""
    def run(jobs: list[ShardJob]) -> list[dict]:
        with ray_session(address) as ray:
            count, threads = actor_count(ray, workers, len(jobs))
            actor_class = ray.remote(num_cpus=1, max_restarts=MAX_RESTARTS,
                                     max_task_retries=MAX_RESTARTS)(ShardActor)
            actors = [actor_class.remote(threads) for _ in range(count)]
            log.info("ray: %d shards on %d actors", len(jobs), count)
            refs = [actors[i % count].write.remote(job) for i, job in enumerate(jobs)]
            return ray.get(refs)
    return run


def part_digests(ledger: Ledger) -> list[str | None]:
    """Each committed vector part's sha256 as the manifest recorded it, in the parts' order."""
    return [(r.checks[f].digest if f in r.checks else None)
            for r in ledger.complete_units() for f in r.vector_files]
