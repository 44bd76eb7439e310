"""`python -m bench.nightly`."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import bench.nightly
from pipeline.tools.artifacts import FetchError

from .nights import run_nights, run_scale
from .report import failed, render
from .runs import INDEX_TYPES, BenchError


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.nightly",
                                description=bench.nightly.__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--files", type=int, default=20, help="Parquet shards of the base corpus")
    p.add_argument("--model", default="tiny",
                   help="tiny (the stand-in: random 2-layer BERT, hidden 128, FFN 256), tiniest "
                        "(1 layer, hidden 32), or a model name "
                        "or folder, e.g. all-MiniLM-L6-v2 (use fewer rows)")
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--index-type", choices=[*INDEX_TYPES, "none"], default="flat")
    p.add_argument("--precision", default="float32",
                   choices=["float32", "float16", "int8", "uint8", "binary", "ubinary"],
                   help="output.precision of every run (binary: binary indexes)")
    p.add_argument("--work", default="out/nightly-bench", help="working folder (emptied)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None,
                   help="OMP_NUM_THREADS for every run (on a shared machine 1 is steadier)")
    p.add_argument("--scale", action="store_true",
                   help="also full runs at 1M and 5M rows (tiniest model, no index): peak RSS")
    p.add_argument("--scale-rows", default="1000000,5000000")
    p.add_argument("--json", dest="json_file", help="write the whole report to this file")
    p.add_argument("--markdown", action="store_true", help="the table as Markdown")
    args = p.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    work = Path(args.work)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    index_type = None if args.index_type == "none" else args.index_type
    try:
        report = run_nights(work / "nights", args.rows, args.files, args.model, args.max_length,
                            index_type, args.seed, log=log, threads=args.threads,
                            precision=args.precision)
        if args.scale:
            sizes = [int(x) for x in args.scale_rows.split(",")]
            report["scale"] = run_scale(work / "scale", sizes, seed=args.seed, log=log)
    except (BenchError, FetchError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(render(report, args.markdown))
    if args.json_file:
        Path(args.json_file).write_text(json.dumps(report, indent=2, default=str) + "\n")
    return 1 if failed(report) else 0


if __name__ == "__main__":
    sys.exit(main())
