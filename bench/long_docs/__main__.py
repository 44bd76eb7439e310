"""`python -m bench.long_docs fetch | eval`."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import bench.long_docs
from pipeline.tools.artifacts import FetchError

from .corpus import fetch_long_docs
from .evaluate import SETTINGS, evaluate


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.long_docs",
                                     description=bench.long_docs.__doc__.split("\n\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    f = sub.add_parser("fetch", help="build the long-document corpus and its queries")
    f.add_argument("dest", help="folder for the document shards (e.g. data/long_docs)")
    f.add_argument("queries", help="folder for the query shard (e.g. data/long_docs_queries)")
    f.add_argument("--min-words", type=int, default=1500)
    f.add_argument("--max-words", type=int, default=20_000)
    f.add_argument("--max-docs", type=int, default=600)
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--sources", default="python-doc,manpages",
                   help="comma-separated: python-doc, manpages (default: both)")

    e = sub.add_parser("eval", help="run truncate / chunk+pool / chunk+rows and score recall")
    e.add_argument("docs", help="document shards written by `fetch`")
    e.add_argument("queries", help="query shards written by `fetch`")
    e.add_argument("--work", default="out/long-docs-eval",
                   help="folder for the sample, job files, outputs, hits and results")
    e.add_argument("--settings", default=",".join(SETTINGS),
                   help=f"comma-separated subset of {', '.join(SETTINGS)}")
    e.add_argument("--limit", type=int, default=None, help="only the first N documents")
    e.add_argument("-k", type=int, default=10)
    e.add_argument("--search-k", type=int, default=None,
                   help="neighbours asked of `embedpipe search` (default: k)")
    e.add_argument("--max-length", type=int, default=256)
    e.add_argument("--python", default=sys.executable,
                   help="interpreter that runs `-m pipeline.cli` (default: this one)")
    e.add_argument("--pythonpath", default=None, metavar="DIR",
                   help="checkout whose pipeline/ the CLI runs (default: this one)")
    e.add_argument("--set", dest="extra_sets", action="append", default=[],
                   metavar="SECTION.KEY=VALUE", help="extra --set for every run")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "fetch":
            stats = fetch_long_docs(args.dest, args.queries, min_words=args.min_words,
                                    max_words=args.max_words, max_docs=args.max_docs,
                                    seed=args.seed, sources=tuple(args.sources.split(",")))
            brief = {k: stats[k] for k in ("documents", "queries", "sections", "words", "tokens",
                                           "over_256_tokens", "windows_256_no_overlap",
                                           "query_position")}
            print(json.dumps(brief, indent=2))
            return 0
        unknown = set(args.settings.split(",")) - set(SETTINGS)
        if unknown:
            parser.error(f"unknown setting(s) {', '.join(sorted(unknown))}")
        results = evaluate(args.docs, args.queries, args.work,
                           settings=args.settings.split(","), limit=args.limit, k=args.k,
                           search_k=args.search_k, max_length=args.max_length,
                           python=args.python, pythonpath=args.pythonpath,
                           extra_sets=args.extra_sets)
    except FetchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(results["table"])
    print(f"\nwritten: {Path(args.work) / 'results.json'}, {Path(args.work) / 'results.md'}")
    statuses = [e.get("status") for e in results["settings"].values()]
    if "failed" in statuses:
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
