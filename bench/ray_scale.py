"""The Ray runner's driver memory at N and 10N rows, on a multi-node Ray cluster on one machine
(issue #30, item 4).

    python -m bench.ray_scale --rows 100000 --rows 1000000 --json out/ray-scale.json

A Ray cluster of three nodes on this machine (`ray.cluster_utils.Cluster`: a head with 1 CPU,
two worker nodes with 2 logical CPUs each, each node its own raylet and object store). For each
size: synthetic rows (bench.synthetic.generate_rows, 50,000 rows a file), then two
`embedpipe run --runner ray --ray-address <cluster> --workers 2` nights into one folder, each
driver a fresh process whose peak RSS is its own VmHWM (/proc/self/status, read at exit):

| night | input |
| --- | --- |
| first | the rows, into an empty folder |
| re-export | every file under a new name, 1% of the texts changed (every 100th row) |

**The model is a stand-in** so rows are cheap: the tiniest random BERT of bench/nightly (1
layer, hidden 32, FFN 64, all-MiniLM-L6-v2's tokenizer), max_length 32. Its vectors mean
nothing; the driver's memory, the scan's cost and the night's share of the first run are the
point. Target: the driver's peak RSS at 10N within 10% of N's, for both kinds of night.
`--index`: an IVF-Flat index in the shards layout, a shard a 50,000-row part, built by the
run's actors (who wrote each shard is read from index_infos.json). `--compare-local`: at the
smallest size, each night's input is also run by the local runner into a folder of its own, and
the two folders compared: ids in order, vectors bit for bit, labels, and (with --index) the
index's answers to 200 stored vectors.

    python -m bench.ray_scale --index --compare-local --rows 100000 --rows 1000000
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from bench import REPO_ROOT

# Runs embedpipe's CLI in this process and writes the process's VmHWM (kB) and pid to argv[1]
# at exit.
DRIVER = r"""
import os, sys
out = sys.argv[1]
sys.argv = ['embedpipe'] + sys.argv[2:]
try:
    from pipeline.cli import main
    main()
finally:
    for line in open('/proc/self/status'):
        if line.startswith('VmHWM'):
            open(out, 'w').write(f"{line.split()[1]} {os.getpid()}")
"""
ROWS_PER_FILE = 50_000
CHANGED_EVERY = 100  # 1% of the texts change on the re-export night


def start_cluster():
    """A head and two worker nodes, each its own raylet, all on this machine. Its own temp
    folder, so that no other `ray.init()` on the machine joins it unasked (one that finds
    /tmp/ray's current cluster does)."""
    from ray.cluster_utils import Cluster

    temp = tempfile.mkdtemp(prefix="rs-", dir="/tmp")  # short: Ray's socket paths have a limit
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "temp_dir": temp})
    cluster.add_node(num_cpus=2, temp_dir=temp)
    cluster.add_node(num_cpus=2, temp_dir=temp)
    cluster.wait_for_nodes()
    # Ray still names the newest cluster in /tmp/ray for any `ray.init()` to join: not this one
    current = Path("/tmp/ray/ray_current_cluster")
    if current.is_file() and current.read_text().strip() == cluster.address:
        current.unlink()
    return cluster


def reexport(source: Path, dest: Path) -> int:
    """Every file of source under a new name in dest, every 100th text changed; returns how
    many texts changed."""
    dest.mkdir(parents=True, exist_ok=True)
    changed = 0
    for n, path in enumerate(sorted(source.glob("*.parquet"))):
        table = pq.read_table(path)
        texts = table.column("text").to_pylist()
        for i in range(0, len(texts), CHANGED_EVERY):
            texts[i] = f"{texts[i]} (revised tonight)"
            changed += 1
        table = table.set_column(table.schema.get_field_index("text"), "text",
                                 pa.array(texts, pa.string()))
        pq.write_table(table, dest / f"export-2026-12-08-{n:05d}.parquet")
    return changed


def write_job(path: Path, input_dir: Path, out: Path, model: Path, shard_rows: int = 0) -> Path:
    """shard_rows: 0 for no index, else an IVF-Flat index in the shards layout (groups of parts
    up to shard_rows rows, written by the run's Ray actors)."""
    index = ("enabled = false\n" if not shard_rows else
             f'enabled = true\ntype = "ivf-flat"\nlayout = "shards"\n'
             f'shard_rows = {shard_rows}\n')
    path.write_text(
        f'name = "ray-scale"\n[input]\npath = {json.dumps(str(input_dir))}\n'
        f'[model]\nname = {json.dumps(str(model))}\nmax_length = 32\ndevice = "cpu"\n'
        f'dtype = "float32"\ncompile = false\n[encode]\npooling = "mean"\nnormalize = true\n'
        f'[output]\npath = {json.dumps(str(out))}\n[index]\n{index}')
    return path


def shard_writers(out: Path) -> dict:
    """Who wrote the index's shards: {pid: shards} from the infos, and the driver's pid is not
    among them when workers did."""
    infos = json.loads((out / "index" / "index_infos.json").read_text())
    writers: dict = {}
    for shard in infos.get("shards", []):
        writers[shard.get("pid")] = writers.get(shard.get("pid"), 0) + 1
    return {"shards": len(infos.get("shards", [])), "writers": writers,
            "recall_at_10": infos.get("recall_at_10"),
            "kept": infos.get("maintained", {}).get("shards_kept", 0)}


def run_night(job: Path, address: str | None, label: str) -> dict:
    """One `embedpipe run --runner ray` driver process (address None: the local runner): its
    summary, wall seconds, VmHWM."""
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "RAY_AUTH_MODE": "disabled"}
    runner = ["--runner", "ray", "--ray-address", address, "--workers", "2"] if address else []
    with tempfile.TemporaryDirectory() as tmp:
        peak = Path(tmp) / "hwm"
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", DRIVER, str(peak), "run", str(job),
                               *runner, "--json", "--no-progress"], capture_output=True,
                              text=True, env=env)
        wall = time.perf_counter() - start
        if proc.returncode != 0:
            raise SystemExit(f"{label}: embedpipe run exited {proc.returncode}: "
                             f"{proc.stderr.strip().splitlines()[-1:]}")
        hwm_kb, pid = peak.read_text().split()
        hwm_mb = int(hwm_kb) / 1024
    summary = json.loads(proc.stdout)
    seconds = summary["seconds"]
    return {"night": label, "wall": wall, "driver_peak_rss_mb": hwm_mb, "driver_pid": int(pid),
            "rows_read": summary["rows_read"], "rows_encoded": summary["rows_encoded"],
            "rows_reused": summary["rows_reused"], "units": summary["units_done"],
            "scan": seconds.get("scan", 0.0), "scan_keys": seconds.get("scan_keys", 0.0),
            "scan_check": seconds.get("scan_check", 0.0),
            "embed": seconds.get("embed_wall", 0.0), "index": seconds.get("index", 0.0),
            "total": seconds.get("total", 0.0)}


def same_result(ray_out: Path, local_out: Path, indexed: bool, queries: int = 200) -> dict:
    """The Ray run's folder against the local runner's: ids in order, vectors bit for bit,
    labels, and (`indexed`) the index's answers, labels and distances, to `queries` stored
    vectors."""
    import numpy as np

    from pipeline.index.build import load_index
    from pipeline.io.ledger import Ledger
    from pipeline.io.storage import Store

    held = {}
    for name, folder in (("ray", ray_out), ("local", local_out)):
        store = Store(str(folder))
        parts = Ledger(store).vector_parts()
        ids = pa.concat_tables(list(parts.read(["id"]))).column("id")
        held[name] = (ids, np.concatenate(list(parts.stored())), parts.row_labels(),
                      load_index(store)[0] if indexed else None)
    (ids, vectors, labels, index), (ids0, vectors0, labels0, index0) = held["ray"], held["local"]
    same = {"rows": len(vectors), "ids": ids.equals(ids0),
            "vectors": vectors.shape == vectors0.shape and bool(np.array_equal(vectors, vectors0)),
            "labels": bool(np.array_equal(labels, labels0))}
    if indexed:
        asked = np.ascontiguousarray(vectors[np.linspace(0, len(vectors) - 1, queries).astype(int)])
        (d, i), (d0, i0) = index.search(asked, 10), index0.search(asked, 10)
        same["search"] = bool(np.array_equal(i, i0) and np.array_equal(d, d0))
    return same


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, action="append", help="sizes (repeatable)")
    parser.add_argument("--workdir", default="out/ray-scale")
    parser.add_argument("--json", help="write the results here too")
    parser.add_argument("--index", action="store_true",
                        help="build an IVF-Flat index in the shards layout on the actors (a shard "
                             "a 50,000-row part)")
    parser.add_argument("--compare-local", action="store_true",
                        help="at the smallest size, run the local runner on each night's input "
                             "too and compare the folders (ids, vectors, labels, search)")
    args = parser.parse_args()
    sizes = args.rows or [100_000, 1_000_000]
    work = Path(args.workdir).resolve()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ["PYTHONPATH"] = str(REPO_ROOT)  # the raylets' workers import this checkout

    from bench.nightly.runs import build_tiny_model
    from bench.synthetic import generate_rows
    from pipeline.runtime.hardware import this_cpu

    model = work / "model-tiniest"
    build_tiny_model(model, "tiniest")
    cluster = start_cluster()
    results = []
    try:
        for n in sizes:
            first_in, night_in = work / f"in-{n}", work / f"in-{n}-reexport"
            generate_rows(first_in, n, rows_per_file=ROWS_PER_FILE)
            if not night_in.exists():
                reexport(first_in, night_in)
            out = work / f"out-{n}"
            subprocess.run(["rm", "-rf", str(out)], check=True)
            for label, folder in (("first", first_in), ("re-export", night_in)):
                job = write_job(work / f"job-{n}.toml", folder, out, model,
                                ROWS_PER_FILE if args.index else 0)
                result = run_night(job, cluster.address, label)
                result["rows"] = n
                if args.index:
                    result.update(shard_writers(out))
                results.append(result)
                print(f"{n:>10,} rows, {label:<9}: {result['wall']:7.1f} s wall "
                      f"(scan {result['scan']:.1f} s, embed {result['embed']:.1f} s), "
                      f"encoded {result['rows_encoded']:,}, reused {result['rows_reused']:,}, "
                      f"driver peak RSS {result['driver_peak_rss_mb']:,.0f} MB", flush=True)
                if args.index:
                    print(f"{'':>17}index {result['index']:.1f} s: {result['shards']} shards "
                          f"written by pids {result['writers']} (driver {result['driver_pid']}), "
                          f"{result['kept']} kept, recall@10 {result['recall_at_10']}", flush=True)
                if args.compare_local and n == min(sizes):
                    local_out = work / f"out-{n}-local"
                    if label == "first":
                        subprocess.run(["rm", "-rf", str(local_out)], check=True)
                    local_job = write_job(work / f"job-{n}-local.toml", folder, local_out, model,
                                          ROWS_PER_FILE if args.index else 0)
                    local = run_night(local_job, None, f"{label} (local)")
                    result["local"] = {"wall": local["wall"],
                                       "driver_peak_rss_mb": local["driver_peak_rss_mb"],
                                       **same_result(out, local_out, args.index)}
                    print(f"{'':>17}local runner: {local['wall']:.1f} s wall; the folders "
                          f"equal: {result['local']}", flush=True)
    finally:
        cluster.shutdown()
    print(f"CPU: {this_cpu().model}; {os.cpu_count()} cores")
    for label in ("first", "re-export"):
        rows = [r for r in results if r["night"] == label]
        for small, big in zip(rows, rows[1:]):
            change = 100 * (big["driver_peak_rss_mb"] / small["driver_peak_rss_mb"] - 1)
            print(f"{label}: driver peak RSS at {big['rows']:,} rows vs {small['rows']:,}: "
                  f"{change:+.1f}% ({'within' if abs(change) <= 10 else 'NOT within'} 10%)")
    for n in sizes:
        first = next(r for r in results if r["rows"] == n and r["night"] == "first")
        night = next(r for r in results if r["rows"] == n and r["night"] == "re-export")
        print(f"{n:,} rows: the re-export night took {100 * night['wall'] / first['wall']:.0f}% "
              f"of the first run's wall time")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
