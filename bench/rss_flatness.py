"""Peak RSS of full embedpipe runs at several input sizes: it should stay flat.

    .venv/bin/python -m bench.rss_flatness --rows 100000 --rows 1000000

Each size gets synthetic rows (bench.synthetic.generate_rows: spans of real English words with
the bench corpus' length spread) and one `run_job` in a fresh child process, whose peak RSS
(getrusage ru_maxrss) is the figure. To keep a 1M-row run to minutes on 2 CPU cores it uses a
short max_length (default 16 tokens) and no FAISS index: a flat index holds every vector in
memory by design, so it grows with the input whatever the pipeline does. Tokenizing, batching,
encoding and writing run as in any job.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

CHILD = r"""
import json, resource, sys, time
from pipeline.config import config_from_dict
from pipeline.jobs.runner import RunOptions, run_job
job = config_from_dict(json.loads(sys.argv[1]))
start = time.perf_counter()
summary = run_job(job, RunOptions(mode="overwrite", progress=False))
print(json.dumps({"seconds": time.perf_counter() - start, "vectors": summary.vectors_written,
                  "real_tokens": summary.real_tokens, "dtype": summary.dtype,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, action="append", help="input sizes (repeatable)")
    parser.add_argument("--max-length", type=int, default=16)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--compile", action="store_true",
                        help="model.compile = true (default false here: the same for every size)")
    parser.add_argument("--model", default="all-MiniLM-L6-v2")
    parser.add_argument("--workdir", default="out/rss-flatness")
    args = parser.parse_args()
    sizes = args.rows or [100_000, 1_000_000]
    work = Path(args.workdir)

    from bench.synthetic import generate_rows

    results = []
    for n in sizes:
        folder = work / f"in-{n}"
        generate_rows(folder, n)
        job = {"name": f"rss-{n}", "input": {"path": str(folder)},
               "model": {"name": args.model, "max_length": args.max_length, "dtype": args.dtype,
                         "compile": args.compile},
               "encode": {"normalize": True}, "output": {"path": str(work / f"out-{n}")},
               "index": {"enabled": False}}
        start = time.perf_counter()
        child = subprocess.run([sys.executable, "-c", CHILD, json.dumps(job)], check=True,
                               capture_output=True, text=True)
        result = json.loads(child.stdout.strip().splitlines()[-1])
        result.update(rows=n, wall=time.perf_counter() - start)
        results.append(result)
        print(f"{n:>10,} rows: {result['vectors']:,} vectors in {result['seconds']:.0f} s "
              f"({n / result['seconds']:,.0f} rows/s, {result['dtype']}), "
              f"peak RSS {result['peak_rss_mb']:,.0f} MB", flush=True)
    base = results[0]["peak_rss_mb"]
    for result in results[1:]:
        change = 100 * (result["peak_rss_mb"] / base - 1)
        print(f"peak RSS at {result['rows']:,} rows vs {results[0]['rows']:,}: {change:+.1f}% "
              f"({'within' if abs(change) <= 10 else 'NOT within'} 10%)")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
