"""Quantized vectors' quality and cost (#29): each output.precision x rescoring choice run through
the real pipeline on a labelled corpus, and the movie head at each precision, against float32.

Retrieval: an even sample of the pinned Wikipedia lead sections
(:func:`pipeline.tools.datasets.wiki_extracts`; the 1,000 "Uncategorized" ones left out, 11
topics stay) is the corpus, an even sample of the other leads the queries; a hit is relevant when
it shares the query's topic. For each configuration a job file is written and run with
`embedpipe run`, and the queries are searched through the folder's `Searcher` (embedded as
`embedpipe search` embeds them). Reported: recall@10 (the share of the 10 hits on the query's
topic), nDCG@10 with that binary relevance, overlap@10 with float32's exact top 10, the bytes a
row (the stored vector and the rescore column: their size, and their column chunks on disk), the
index file's bytes, and queries a second (the same queries, the same FAISS threads, median of 3).

Heads: the movie snippets (label = sign of the valence, zeros left out, as jobs/movie_reviews.toml
keeps them) at each precision: `embedpipe train-head` held-out accuracy against float32's.

    python -m bench.quantized_quality --json out/quantized-quality/results.json
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from bench import REPO_ROOT

PRECISIONS = ("float32", "float16", "int8", "uint8", "binary", "ubinary")
LEFT_OUT_TOPIC = "Uncategorized"  # no topic: it cannot tell a relevant hit


@dataclass(frozen=True)
class Config:
    name: str
    precision: str
    rescore_precision: str | None = None  # the kept rescore column ([output] rescore_precision)
    rescored: bool = False  # candidates k x factor re-ranked by the float query
    folder: str | None = None  # search another configuration's folder (no run of its own)


CONFIGS = (
    Config("float32", "float32"),
    Config("float16", "float16"),
    Config("int8", "int8"),
    Config("uint8", "uint8"),
    Config("binary", "binary"),
    Config("ubinary", "ubinary"),
    Config("binary, rescored by its bits", "binary", rescored=True, folder="binary"),
    Config("binary, rescored by int8 kept", "binary", "int8", True),
    Config("binary, rescored by float16 kept", "binary", "float16", True),
    Config("binary, rescored by float32 kept", "binary", "float32", True),
    Config("int8, rescored by float32 kept", "int8", "float32", True),
)


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name).replace("--", "-").strip("-")


# ---- data ---------------------------------------------------------------------------------------

def even(n: int, count: int) -> np.ndarray:
    """`count` positions spread evenly over range(n)."""
    if not 0 < count <= n:
        raise ValueError(f"cannot take {count} evenly of {n}")
    return np.unique(np.linspace(0, n - 1, count).round().astype(np.int64))


def wiki_split(rows: int, queries: int, cache_dir: Path | None = None) -> tuple[pa.Table, pa.Table]:
    """(corpus: id, text, topic; queries: query_id, text, topic): the corpus an even sample of
    the topical leads, the queries an even sample of the rest."""
    from pipeline.tools.datasets import wiki_extracts

    leads = [(t, e) for t, e in wiki_extracts(cache_dir) if t and t != LEFT_OUT_TOPIC]
    if rows + queries > len(leads):
        raise ValueError(f"--rows {rows} + --queries {queries} exceed the {len(leads)} leads")
    picked = even(len(leads), rows)
    rest = np.setdiff1d(np.arange(len(leads)), picked)
    asked = rest[even(len(rest), queries)]
    corpus = pa.table({"id": np.arange(len(picked), dtype=np.int64),
                       "text": [leads[i][1] for i in picked],
                       "topic": [leads[i][0] for i in picked]})
    query = pa.table({"query_id": np.arange(len(asked), dtype=np.int64),
                      "text": [leads[i][1] for i in asked],
                      "topic": [leads[i][0] for i in asked]})
    return corpus, query


def movie_sample(rows: int | None, cache_dir: Path | None = None) -> pa.Table:
    """The movie snippets (id, text, label: positive / negative, null at valence 0), an even
    sample of `rows` of them (the file is ordered by valence, so both labels stay)."""
    from pipeline.tools.datasets import movie_rows

    ids, texts, valences = movie_rows(cache_dir)
    labels = ["positive" if v > 0 else "negative" if v < 0 else None for v in valences]
    table = pa.table({"id": pa.array(ids, pa.int64()), "text": texts,
                      "label": pa.array(labels, pa.string())})
    return table if rows is None or rows >= table.num_rows else table.take(even(table.num_rows, rows))


def job_toml(name: str, input_path: Path, out: Path, model: str, max_length: int,
             precision: str, rescore_precision: str | None, keep: str,
             index_type: str | None) -> str:
    lines = [f"# written by bench.quantized_quality ({name})", f"name = {json.dumps(slug(name))}",
             "", "[input]", f"path = {json.dumps(str(input_path))}", 'text_column = "text"',
             'id_column = "id"', "", "[model]", f"name = {json.dumps(model)}",
             f"max_length = {max_length}", "", "[encode]", 'pooling = "mean"', "normalize = true",
             "", "[output]", f"path = {json.dumps(str(out))}", f'precision = "{precision}"',
             f"keep_columns = [{json.dumps(keep)}]"]
    if rescore_precision:
        lines.append(f'rescore_precision = "{rescore_precision}"')
    lines += ["", "[index]", f"enabled = {str(index_type is not None).lower()}"]
    if index_type:
        lines += [f'type = "{index_type}"', 'metric = "ip"']
    return "\n".join(lines) + "\n"


# ---- running the CLI ----------------------------------------------------------------------------

def cli(args: list[str], log_path: Path) -> tuple[int, str]:
    """`python -m pipeline.cli ARGS` in the checkout (its pipeline/ first on the path)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    root = str(REPO_ROOT)
    env["PYTHONPATH"] = os.pathsep.join([root, env["PYTHONPATH"]]) if env.get("PYTHONPATH") else root
    cmd = [sys.executable, "-m", "pipeline.cli", *args]
    log_path.parent.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=root)
    log_path.write_text(f"$ {shlex.join(cmd)}\n# exit {proc.returncode}\n--- stdout\n"
                        f"{proc.stdout}\n--- stderr\n{proc.stderr}")
    last = (proc.stderr.strip().splitlines() or [""])[-1]
    return proc.returncode, proc.stdout if proc.returncode == 0 else last


def run_job(job: Path, log_path: Path) -> str | None:
    """None, or why `embedpipe run` failed (its last stderr line)."""
    rc, output = cli(["run", str(job), "--mode", "overwrite", "--no-progress"], log_path)
    return None if rc == 0 else f"embedpipe run exited {rc}: {output}"


# ---- measuring ----------------------------------------------------------------------------------

def column_bytes(out: Path, column: str) -> int:
    """On-disk (compressed) bytes of a column's chunks over the folder's vector parts."""
    from pipeline.io.output import open_output

    total = 0
    for name in open_output(str(out)).files:
        meta = pq.ParquetFile(out / name).metadata
        index = meta.schema.to_arrow_schema().get_field_index(column)
        if index < 0:
            continue
        for g in range(meta.num_row_groups):
            group = meta.row_group(g)
            total += sum(group.column(c).total_compressed_size for c in range(group.num_columns)
                         if group.column(c).path_in_schema.split(".")[0] == column)
    return total


def row_bytes(out: Path, rescore_precision: str | None) -> dict:
    """Bytes a row: the stored vector's and the rescore column's sizes, and both on disk."""
    from pipeline.io.output import open_output
    from pipeline.io.precision import Precision

    output = open_output(str(out))
    dim, rows = output.manifest.dim or 0, output.count
    vector = output.precision.bytes_per_row(dim)
    rescore = Precision(rescore_precision).bytes_per_row(dim) if rescore_precision else 0
    if vector + rescore != output.bytes_per_row:  # the folder's own count: both columns
        raise ValueError(f"{out}: {vector} + {rescore} bytes a row, the folder says "
                         f"{output.bytes_per_row}")
    on_disk = column_bytes(out, "vector") + column_bytes(out, "rescore_vector")
    return {"rows": rows, "dim": dim, "vector": vector, "rescore": rescore,
            "total": output.bytes_per_row, "on_disk": on_disk / max(rows, 1)}


def index_bytes(out: Path) -> int | None:
    from pipeline.index.files import INFOS_FILE, index_file

    infos = out / INFOS_FILE
    if not infos.exists():
        return None
    return (out / index_file(json.loads(infos.read_text()))).stat().st_size


def queries_per_second(search, vectors: np.ndarray, repeats: int = 3,
                       min_seconds: float = 0.2) -> float:
    """The query set searched again and again for at least `min_seconds`, `repeats` times: the
    median's queries a second (after one warm-up search)."""
    search(vectors)
    times = []
    for _ in range(repeats):
        n, start = 0, time.perf_counter()
        while True:
            search(vectors)
            n += 1
            elapsed = time.perf_counter() - start
            if elapsed >= min_seconds:
                break
        times.append(elapsed / n)
    return len(vectors) / float(np.median(times))


def scores(hit_ids: np.ndarray, corpus_topics: np.ndarray, query_topics: np.ndarray,
           k: int) -> dict[str, float]:
    """recall@k (the share of the k hits on the query's topic; a missing hit, id -1, counts as
    not relevant) and nDCG@k with that binary relevance (the ideal: min(k, the topic's corpus
    rows) relevant hits first)."""
    hits = hit_ids[:, :k]
    relevant = (hits >= 0) & (corpus_topics[np.maximum(hits, 0)] == query_topics[:, None])
    discount = 1 / np.log2(np.arange(2, k + 2))
    dcg = (relevant * discount).sum(1)
    topics, counts = np.unique(corpus_topics, return_counts=True)
    in_corpus = dict(zip(topics.tolist(), counts.tolist()))
    ideal = np.array([discount[:min(k, in_corpus.get(t, 0))].sum() for t in query_topics])
    ndcg = np.divide(dcg, ideal, out=np.zeros_like(dcg), where=ideal > 0)
    return {f"recall@{k}": float(relevant.mean()), f"ndcg@{k}": float(ndcg.mean())}


def overlap(hit_ids: np.ndarray, exact_ids: np.ndarray, k: int) -> float:
    """The share of float32's exact top k found in the top k."""
    return float(np.mean([len(set(a[:k]) & set(b[:k]) - {-1}) / k
                          for a, b in zip(hit_ids, exact_ids)]))


def search_folder(out: Path, texts: list[str], k: int, factor: int, threads: int):
    """(query vectors, hit ids [queries, k], queries a second) through the folder's Searcher;
    factor > 0: k x factor candidates re-ranked by the float query."""
    import faiss

    from pipeline.commands.search import Searcher

    faiss.omp_set_num_threads(threads)
    searcher = Searcher(str(out), device="cpu", rescore=factor or None)
    vectors = searcher.embedder.embed(texts)
    search = lambda v: searcher.search_vectors(v, k)  # noqa: E731
    _, positions = search(vectors)
    ids = np.asarray(searcher.ids.to_numpy() if hasattr(searcher.ids, "to_numpy")
                     else searcher.ids, np.int64)
    hit_ids = np.where(positions >= 0, ids[np.maximum(positions, 0)], -1)
    return vectors, hit_ids, queries_per_second(search, vectors)


# ---- the two evaluations ------------------------------------------------------------------------

@dataclass(frozen=True)
class Settings:
    work: Path
    model: str = "all-MiniLM-L6-v2"
    max_length: int = 256
    rows: int = 4000
    queries: int = 300
    k: int = 10
    factor: int = 4  # rescoring: k x factor candidates
    index_type: str = "flat"
    threads: int = 1
    head_rows: int | None = None  # None: every movie snippet
    configs: tuple[str, ...] = tuple(c.name for c in CONFIGS)
    heads: tuple[str, ...] = PRECISIONS


def retrieval(s: Settings, log=print) -> dict:
    """Every configuration run and searched; its entry, or status "failed" and why."""
    corpus, queries = wiki_split(s.rows, s.queries)
    data = s.work / "wiki"
    data.mkdir(parents=True, exist_ok=True)
    pq.write_table(corpus, data / "corpus.parquet")
    pq.write_table(queries, s.work / "queries.parquet")
    corpus_topics = np.array(corpus.column("topic").to_pylist())
    query_topics = np.array(queries.column("topic").to_pylist())
    texts = queries.column("text").to_pylist()
    result = {"corpus_rows": corpus.num_rows, "queries": queries.num_rows, "k": s.k,
              "rescore_factor": s.factor, "index_type": s.index_type, "threads": s.threads,
              "topics": len(set(corpus_topics)), "configs": {}}
    exact = None
    for config in CONFIGS:
        if config.name not in s.configs:
            continue
        name = slug(config.name)
        out = s.work / "out" / slug(config.folder or config.name)
        entry: dict = {**asdict(config), "folder": str(out)}
        result["configs"][config.name] = entry
        log(f"{config.name}: ...")
        if config.folder is None:
            job = s.work / "jobs" / f"{name}.toml"
            job.parent.mkdir(parents=True, exist_ok=True)
            job.write_text(job_toml(config.name, data, out, s.model, s.max_length,
                                    config.precision, config.rescore_precision, "topic",
                                    s.index_type))
            entry["job"] = str(job)
            failed = run_job(job, s.work / "logs" / f"{name}-run.log")
            if failed:
                entry.update(status="failed", message=failed)
                log(f"  {failed}")
                continue
        elif not (out / "manifest.json").exists():
            entry.update(status="failed", message=f"{config.folder} was not run")
            continue
        entry["bytes_per_row"] = row_bytes(out, config.rescore_precision)
        entry["index_bytes"] = index_bytes(out)
        try:
            vectors, hit_ids, qps = search_folder(out, texts, s.k, s.factor if config.rescored
                                                  else 0, s.threads)
        except Exception as exc:  # noqa: BLE001 (a row of the table says why; the rest run)
            entry.update(status="failed", message=f"search: {type(exc).__name__}: {exc}")
            log(f"  {entry['message']}")
            continue
        if config.name == "float32":
            exact = hit_ids
            np.save(s.work / "query_vectors.npy", vectors)
        pq.write_table(pa.table({"query_id": np.repeat(np.arange(len(hit_ids)), s.k),
                                 "rank": np.tile(np.arange(1, s.k + 1), len(hit_ids)),
                                 "id": hit_ids.ravel()}), s.work / f"hits-{name}.parquet")
        entry.update(status="ok", queries_per_second=qps,
                     **scores(hit_ids, corpus_topics, query_topics, s.k),
                     **{f"overlap@{s.k}": None if exact is None else overlap(hit_ids, exact, s.k)})
    base = result["configs"].get("float32", {})
    for entry in result["configs"].values():
        for metric in (f"recall@{s.k}", f"ndcg@{s.k}", "queries_per_second"):
            if entry.get("status") == "ok" and base.get("status") == "ok":
                entry[f"{metric}_x_float32"] = entry[metric] / base[metric]
    return result


def heads(s: Settings, log=print) -> dict:
    """`embedpipe train-head` on the movie snippets at each precision (CV-chosen C)."""
    table = movie_sample(s.head_rows)
    data = s.work / "movies"
    data.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, data / "snippets.parquet")
    result = {"rows": table.num_rows, "labelled": table.num_rows - table.column("label").null_count,
              "precisions": {}}
    for precision in s.heads:
        out = s.work / "out" / f"movies-{precision}"
        entry: dict = {"folder": str(out)}
        result["precisions"][precision] = entry
        log(f"head on {precision}: ...")
        job = s.work / "jobs" / f"movies-{precision}.toml"
        job.parent.mkdir(parents=True, exist_ok=True)
        job.write_text(job_toml(f"movies {precision}", data, out, s.model, s.max_length,
                                precision, None, "label", None))
        failed = run_job(job, s.work / "logs" / f"movies-{precision}-run.log")
        if not failed:
            rc, output = cli(["train-head", str(out), "--label-column", "label", "--json",
                              "--out", str(s.work / "heads" / precision)],
                             s.work / "logs" / f"movies-{precision}-head.log")
            failed = None if rc == 0 else f"embedpipe train-head exited {rc}: {output}"
        if failed:
            entry.update(status="failed", message=failed)
            log(f"  {failed}")
            continue
        card = json.loads(output)
        entry.update(status="ok", bytes_per_row=row_bytes(out, None)["vector"],
                     accuracy=card["metrics"]["accuracy"], macro_f1=card["metrics"]["macro_f1"],
                     majority=card["metrics"]["majority_class_accuracy"], C=card["model"]["C"],
                     test_rows=card["split"]["test"])
    base = result["precisions"].get("float32", {})
    for entry in result["precisions"].values():
        if entry.get("status") == "ok" and base.get("status") == "ok":
            entry["accuracy_x_float32"] = entry["accuracy"] / base["accuracy"]
    return result


# ---- the report ---------------------------------------------------------------------------------

def _f(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def markdown(report: dict) -> str:
    lines = []
    r = report.get("retrieval")
    if r:
        k = r["k"]
        lines += [f"Retrieval: {r['corpus_rows']:,} Wikipedia leads ({r['topics']} topics), "
                  f"{r['queries']} queries, k={k}, index type {r['index_type']}, rescoring "
                  f"k x {r['rescore_factor']} candidates, {r['threads']} FAISS thread(s).", "",
                  f"| configuration | B/row (vector + rescore) | on disk B/row | index bytes "
                  f"| queries/s | recall@{k} | x float32 | nDCG@{k} | x float32 "
                  f"| overlap@{k} |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for name, e in r["configs"].items():
            if e.get("status") != "ok":
                lines.append(f"| {name} | - | - | - | - | - | - | - | - | - |")
                continue
            b = e["bytes_per_row"]
            lines.append(
                f"| {name} | {b['vector']} + {b['rescore']} = {b['total']} | {b['on_disk']:.0f} "
                f"| {_f(e['index_bytes'], ',')} | {e['queries_per_second']:,.0f} "
                f"| {e[f'recall@{k}']:.4f} | {_f(e.get(f'recall@{k}_x_float32'), '.3f')} "
                f"| {e[f'ndcg@{k}']:.4f} | {_f(e.get(f'ndcg@{k}_x_float32'), '.3f')} "
                f"| {_f(e.get(f'overlap@{k}'), '.3f')} |")
        lines += [f"- {name} failed: {e.get('message')}" for name, e in r["configs"].items()
                  if e.get("status") != "ok"]
    h = report.get("heads")
    if h:
        lines += ["" if lines else None, f"Head: {h['labelled']:,} labelled movie snippets "
                  f"(of {h['rows']:,}), `embedpipe train-head` (C by 3-fold CV), held-out 20%.", "",
                  "| precision | B/row | accuracy | x float32 | macro-F1 | C |",
                  "|---|---:|---:|---:|---:|---:|"]
        for name, e in h["precisions"].items():
            if e.get("status") != "ok":
                lines.append(f"| {name} | - | - | - | - | - |")
                continue
            lines.append(f"| {name} | {e['bytes_per_row']} | {e['accuracy']:.4f} "
                         f"| {_f(e.get('accuracy_x_float32'), '.3f')} | {e['macro_f1']:.4f} "
                         f"| {e['C']} |")
        lines += [f"- {name} failed: {e.get('message')}" for name, e in h["precisions"].items()
                  if e.get("status") != "ok"]
    return "\n".join(line for line in lines if line is not None)


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def failed(report: dict) -> bool:
    entries = [*report.get("retrieval", {}).get("configs", {}).values(),
               *report.get("heads", {}).get("precisions", {}).values()]
    return any(e.get("status") != "ok" for e in entries)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.quantized_quality",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--work", default="out/quantized-quality", help="folder for data, jobs, outputs")
    p.add_argument("--model", default="all-MiniLM-L6-v2", help="model name or folder")
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--rows", type=int, default=4000, help="corpus leads")
    p.add_argument("--queries", type=int, default=300, help="query leads (others)")
    p.add_argument("-k", type=int, default=10)
    p.add_argument("--rescore", type=int, default=4, help="rescoring: k x N candidates")
    p.add_argument("--index-type", default="flat")
    p.add_argument("--threads", type=int, default=1, help="FAISS threads while searching")
    p.add_argument("--head-rows", type=int, default=None,
                   help="movie snippets for the heads, an even sample (default: all 10,605)")
    p.add_argument("--configs", default=None,
                   help=f"comma-separated subset of: {'; '.join(c.name for c in CONFIGS)} "
                        "(names as listed; separate them with ';')")
    p.add_argument("--no-retrieval", action="store_true")
    p.add_argument("--no-heads", action="store_true")
    p.add_argument("--json", dest="json_file", help="write the whole report to this file")
    args = p.parse_args(argv)
    from pipeline.tools.artifacts import FetchError

    known = {c.name for c in CONFIGS}
    configs = tuple(c.strip() for c in args.configs.split(";")) if args.configs else tuple(known)
    if set(configs) - known:
        p.error(f"unknown configuration(s): {', '.join(sorted(set(configs) - known))}")
    work = Path(args.work).resolve()  # job files hold absolute paths
    s = Settings(work, args.model, args.max_length, args.rows, args.queries, args.k, args.rescore,
                 args.index_type, args.threads, args.head_rows, configs)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    report: dict = {"command": shlex.join(["python", "-m", "bench.quantized_quality",
                                           *(argv if argv is not None else sys.argv[1:])]),
                    "cpu": cpu_name(), "model": args.model, "max_length": args.max_length}
    started = time.perf_counter()
    try:
        if not args.no_retrieval:
            report["retrieval"] = retrieval(s, log)
        if not args.no_heads:
            report["heads"] = heads(s, log)
    except (ValueError, FetchError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    report["seconds"] = round(time.perf_counter() - started, 1)
    report["table"] = markdown(report)
    print(report["table"])
    if args.json_file:
        Path(args.json_file).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_file).write_text(json.dumps(report, indent=2) + "\n")
    return 1 if failed(report) else 0


if __name__ == "__main__":
    sys.exit(main())
