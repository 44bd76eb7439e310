"""The index stage of a `shards` layout, driver-only against worker-built (issue #30, item 2).

    python -m bench.ray_index_stage --rows 200000 --work /tmp/ris [--workers 2] [--type ivf-pq]

Builds (once, kept in --work) a folder of `rows` real-run vectors: random film-word texts
embedded by bench/nightly's stand-in model (a random 2-layer BERT, hidden 128, with
all-MiniLM-L6-v2's tokenizer) through `embedpipe run`, index off. Then times the index stage on
copies of that folder, each a full build as a first run does: `update_sharded` with the shards
written in this process (what the driver did alone) and on Ray actors (`--workers`), the Ray
instance started before the clock. Prints one JSON line: seconds each, the CPU, who wrote the
shards, and whether the two indexes' shard files are byte for byte the same.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

WORDS = ("the a film story cast warm funny slow plot music ending scene actor great dull "
         "bright score night city long short quiet loud").split()


def make_folder(work: Path, rows: int) -> Path:
    from bench.nightly.runs import build_tiny_model

    out = work / f"out-{rows}"
    if (out / "manifest.json").exists():
        return out
    model = work / "model"
    if not model.exists():
        build_tiny_model(model, "tiny")
    rng = np.random.default_rng(0)
    inputs = work / f"in-{rows}"
    inputs.mkdir(parents=True, exist_ok=True)
    files = 20
    for i in range(files):
        n = rows // files
        texts = [" ".join(rng.choice(WORDS, int(rng.integers(5, 25)))) for _ in range(n)]
        pq.write_table(pa.table({"id": pa.array(range(i * n, (i + 1) * n), pa.int64()),
                                 "text": texts}), inputs / f"part-{i:05d}.parquet")
    job = work / f"job-{rows}.toml"
    job.write_text(f'name = "ris"\n[input]\npath = "{inputs}"\n[model]\nname = "{model}"\n'
                   f'max_length = 64\n[output]\npath = "{out}"\nrows_per_file = 10000\n'
                   f'[index]\nenabled = false\n')
    subprocess.run([sys.executable, "-m", "pipeline.cli", "run", str(job), "--no-progress"],
                   check=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rows", type=int, default=200_000)
    p.add_argument("--work", type=Path, default=Path("/tmp/ray-index-stage"))
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--type", default="ivf-pq")
    p.add_argument("--shard-rows", type=int, default=50_000)
    args = p.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")

    from pipeline.config import IndexConfig
    from pipeline.index.shard_build import run_here, update_sharded
    from pipeline.io.ledger import Ledger
    from pipeline.io.storage import Store
    from pipeline.jobs.ray_index import part_digests, ray_session, ray_shard_runner
    from pipeline.runtime.hardware import cpu_model

    source = make_folder(args.work, args.rows)
    cfg = IndexConfig(type=args.type, layout="shards", shard_rows=args.shard_rows, nprobe=16)
    seconds, shards = {}, {}
    for name in ("driver", "workers"):
        folder = args.work / f"{name}-{args.rows}"
        shutil.rmtree(folder, ignore_errors=True)
        shutil.copytree(source, folder)
        ledger = Ledger(Store(str(folder)))
        parts, digests = ledger.vector_parts(), part_digests(ledger)
        # a Ray instance of this process's own ("local": not a cluster another job started)
        with ray_session("local", num_cpus=args.workers) as _:
            runner = run_here if name == "driver" else ray_shard_runner(None, args.workers)
            tick = time.perf_counter()
            infos = update_sharded(Store(str(folder)), parts, cfg, digests, runner)
            seconds[name] = round(time.perf_counter() - tick, 2)
        shards[name] = infos["shards"]
    same = all((args.work / f"driver-{args.rows}" / a["file"]).read_bytes()
               == (args.work / f"workers-{args.rows}" / b["file"]).read_bytes()
               for a, b in zip(shards["driver"], shards["workers"]))
    print(json.dumps({"rows": args.rows, "type": args.type, "shards": len(shards["driver"]),
                      "seconds": seconds, "cpu": cpu_model(), "cpus": os.cpu_count(),
                      "load_average": os.getloadavg()[0], "driver_pid": os.getpid(),
                      "worker_pids": sorted({s["pid"] for s in shards["workers"]}),
                      "shards_identical": same}))


if __name__ == "__main__":
    main()
