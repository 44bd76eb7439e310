"""`embedpipe bench`: embedpipe's full path against SentenceTransformer.encode, interleaved.

In one process, after a warm-up on a few rows, each round runs every contender once, in turn
(A B C A B C ...), so that load from other processes falls on all of them alike; the figures are
medians over the rounds. The contenders:

* ``embedpipe <dtype>``: the real runner (Parquet in -> vectors + FAISS index out, overwrite mode);
* ``encode-only <dtype>``: the same encoder over the same batches, tokenized beforehand, with
  nothing else running: what the end-to-end time is measured against;
* ``sentence-transformers float32``: ``SentenceTransformer.encode`` on the same texts, same model,
  same max_length, and, where embedpipe runs in a half dtype, the same model cast to that dtype.

Peak RSS is measured per contender: VmHWM is reset through /proc/self/clear_refs before each one
(Linux), with a sampling thread as the fallback where that is not allowed.
"""
from __future__ import annotations

import contextlib
import json
import os
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..config import DEFAULT_MODEL
from ..runtime.hardware import cpu_model
from ..io.rejects import blank_texts
from .measure import PeakRSS, cosines, encoder_flops, matmul_rate

STAGES = ("read", "tokenize", "encode", "write", "index", "total")
ST = "sentence-transformers"
DEFAULT_CORPUS_DIR = Path("~/.cache/embedpipe/bench")


@dataclass
class BenchOptions:
    input: str | None = None  # a Parquet file or folder; None: the built-in corpus
    rows: int | None = None  # first N embeddable rows (built-in corpus: its size, default 4,000)
    text_column: str = "text"
    id_column: str = "id"
    model: str = DEFAULT_MODEL
    dtypes: tuple[str, ...] = ("auto",)  # embedpipe's dtypes, each a contender
    device: str = "auto"
    max_length: int | None = None  # None: the model's own limit
    rounds: int = 3
    warmup_rows: int = 200
    st_batch_size: int = 32
    batch_tokens: int | None = None  # None: the job default
    compile: bool = False  # torch.compile embedpipe's model (both its contenders)
    attention: str = "auto"  # model.attention for embedpipe's contenders
    forward: str = "auto"  # model.forward for embedpipe's contenders
    max_batch_size: int | None = None
    compare_st: bool = True
    encode_only: bool = True
    index: bool = True  # the runner builds its flat FAISS index (off: a machine without faiss)
    workdir: str | None = None  # None: a temporary folder, removed afterwards


@dataclass
class Result:
    name: str
    kind: str  # embedpipe | encode-only | sentence-transformers
    dtype: str
    rows: int = 0
    real_tokens: int = 0
    padded_tokens: int = 0
    seconds: list[float] = field(default_factory=list)
    peak_rss: list[int] = field(default_factory=list)
    warmup_seconds: float = 0.0  # the warm-up run: with --compile, the compile (cold or cached)
    stages: list[dict[str, float]] = field(default_factory=list)
    vectors: np.ndarray | None = None

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    def to_dict(self) -> dict[str, Any]:
        s = self.median
        out = {"name": self.name, "kind": self.kind, "dtype": self.dtype, "rows": self.rows,
               "seconds_median": round(s, 3), "seconds": [round(x, 3) for x in self.seconds],
               "texts_per_s": round(self.rows / s, 1), "tokens_per_s": round(self.real_tokens / s),
               "real_tokens": self.real_tokens, "padded_tokens": self.padded_tokens,
               "padding_pct": round(100.0 * (self.padded_tokens - self.real_tokens)
                                    / max(self.real_tokens, 1), 1),
               "peak_rss_mb": round(max(self.peak_rss) / 2**20, 1),
               "warmup_seconds": round(self.warmup_seconds, 2)}
        if self.stages:
            out["stages"] = {k: round(statistics.median(st.get(k, 0.0) for st in self.stages), 3)
                             for k in STAGES}
        return out


# ---- inputs -----------------------------------------------------------------------------------

def bench_source(opts) -> tuple[str, str]:
    """(where the bench's texts come from, its words for them): the user's `--input`, else the
    built-in corpus of `--rows` (default 4,000) rows, built once and cached."""
    if opts.input:
        return opts.input, "input"
    from .datasets import fetch_bench_corpus

    n = opts.rows or 4000
    folder = DEFAULT_CORPUS_DIR.expanduser() / f"corpus-{n}"
    return str(fetch_bench_corpus(folder, n_rows=n)[0].parent), "built-in"


def load_rows(path: str, text_column: str, id_column: str, limit: int | None) -> pa.Table:
    """(id, text, file) of the rows embedpipe embeds: an id, a non-blank text, the id's first row."""
    import pyarrow.dataset as ds

    table = ds.dataset(path, format="parquet").to_table(
        columns=[id_column, text_column, "__filename"])
    table = table.rename_columns(["id", "text", "file"])
    ok = pc.and_(pc.is_valid(table["id"]), pc.is_valid(table["text"]))
    table = table.filter(ok)
    table = table.filter(pc.invert(blank_texts(table["text"].combine_chunks())))
    _, first = np.unique(table["id"].to_numpy(zero_copy_only=False), return_index=True)
    table = table.take(np.sort(first))
    return table.slice(0, limit) if limit else table


def _write_input(table: pa.Table, folder: Path) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, folder / "part-00000.parquet")
    return str(folder)


# ---- contenders -------------------------------------------------------------------------------

def bench_job(opts: BenchOptions, input_path: str, out: Path, dtype: str):
    from ..config import config_from_dict

    encode: dict[str, Any] = {"pooling": "mean", "normalize": True}
    if opts.batch_tokens:
        encode["batch_tokens"] = opts.batch_tokens
    if opts.max_batch_size:
        encode["max_batch_size"] = opts.max_batch_size
    model = {"name": opts.model, "dtype": dtype, "device": opts.device, "compile": opts.compile,
             "attention": opts.attention, "forward": opts.forward}
    if opts.max_length:
        model["max_length"] = opts.max_length
    return config_from_dict({
        "name": "bench",
        "input": {"path": input_path, "text_column": opts.text_column, "id_column": opts.id_column},
        "model": model, "encode": encode, "output": {"path": str(out)},
        "index": {"enabled": opts.index, "type": "flat", "metric": "ip"},
    })


def run_embedpipe(job) -> tuple[Any, np.ndarray, np.ndarray]:
    """The runner's full path; returns its summary and the vectors it wrote, ordered by id."""
    from ..jobs.runner import RunOptions, run_job

    summary = run_job(job, RunOptions(mode="overwrite", progress=False))
    table = pq.read_table(Path(job.output.path) / "vectors", columns=["id", "vector"])
    table = table.sort_by("id")
    flat = table["vector"].combine_chunks().flatten().to_numpy(zero_copy_only=False)
    return summary, table["id"].to_numpy(), flat.reshape(table.num_rows, -1).astype(np.float32)


def runner_batches(job, runtime, tokenizer):
    """The batches the runner makes for this job's input (its own PrepareStage: rejects, windows,
    sorting, budget), with positions over the embedded rows in input order."""
    from ..io.reader import plan_units
    from ..io.registry import scan_input
    from ..jobs.runner import id_type_of, unit_schema
    from ..jobs.prepare import FlowSettings, PrepareStage, Stats
    from .batch_collector import BatchCollector

    units = plan_units(job.input)
    duplicates = scan_input(units, job.input.id_column, job.input.text_column, None, [],
                            job.input.text_pair_column).duplicates
    id_type = id_type_of(unit_schema(units[0]), job.input.id_column)
    collector = BatchCollector()
    PrepareStage(FlowSettings.for_job(job, runtime), tokenizer, duplicates, id_type, Stats()).run(
        [(unit, number) for number, unit in enumerate(units)], collector)
    return collector


def st_padded_tokens(texts: list[str], lengths: np.ndarray, batch_size: int) -> int:
    """Tokens SentenceTransformer.encode computes: it sorts by character count, pads per batch."""
    order = np.argsort([-len(t) for t in texts], kind="stable")
    return int(sum(len(chunk) * lengths[chunk].max()
                   for chunk in np.array_split(order, range(batch_size, len(order), batch_size))))


def run_bench(opts: BenchOptions, log: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    import torch

    from ..encode.batching import encode_in_order
    from ..encode.encoder import Encoder, EncoderSettings
    from ..models.model_files import resolve_model
    from ..runtime.runtime import resolve_runtime
    from ..models.recipe import resolve_recipe
    from ..encode.tokenizer import tokenizer_for

    if opts.rounds < 1:
        raise ValueError("rounds must be at least 1")
    if opts.compare_st:
        try:
            import sentence_transformers  # noqa: F401
        except ImportError:
            raise ValueError("the comparison needs sentence-transformers "
                             "(pip install sentence-transformers), or pass --no-st") from None
    source = resolve_model(opts.model)
    requested = {d: resolve_runtime(bench_job(opts, "-", Path("-"), d).model, source)
                 for d in opts.dtypes}
    runtimes = {rt.dtype: rt for rt in requested.values()}  # one contender per resolved dtype
    compile_words = {d: _compile_words(rt) for d, rt in runtimes.items() if rt.compile}
    dtypes = list(runtimes)
    first = next(iter(runtimes.values()))
    device, max_length = first.torch_device, first.max_length

    with contextlib.ExitStack() as stack:
        work = Path(opts.workdir) if opts.workdir else Path(
            stack.enter_context(tempfile.TemporaryDirectory(prefix="embedpipe-bench-")))
        source_path, corpus = bench_source(opts)
        rows = load_rows(source_path, opts.text_column, opts.id_column, opts.rows)
        if opts.input and opts.rows:
            # a slice of the user's input, written as-is (id, text) for the runner
            rows = rows.drop_columns(["file"])
            source_path = _write_input(rows.rename_columns([opts.id_column, opts.text_column]),
                                       work / "input")
            rows = rows.append_column("file", pa.array(["input"] * rows.num_rows))
        texts, ids = rows["text"].to_pylist(), rows["id"].to_numpy(zero_copy_only=False)
        warm = rows.slice(0, min(opts.warmup_rows, rows.num_rows))
        warm_path = _write_input(warm.drop_columns(["file"]).rename_columns(
            [opts.id_column, opts.text_column]), work / "warmup")
        log(f"bench: {len(texts):,} texts ({corpus}: {opts.input or source_path}), "
            f"{opts.rounds} rounds after a warm-up on {warm.num_rows} rows")

        recipe_job = resolve_recipe(bench_job(opts, source_path, work / "-", dtypes[0]), source)[0]
        tokenizer = tokenizer_for(source, first, recipe_job)
        tokens = tokenizer(texts)
        lengths = np.fromiter(map(len, tokens.ids), dtype=np.int64, count=len(texts))
        real = int(lengths.sum())

        # -- contenders: name -> (kind, dtype, one run over all rows, one warm-up run)
        runs: dict[str, tuple[Callable[[], None], Callable[[], None]]] = {}
        results: dict[str, Result] = {}

        def add(name: str, kind: str, dtype: str, run, warmup) -> None:
            results[name] = Result(name, kind, dtype, rows=len(texts), real_tokens=real)
            runs[name] = (run, warmup)

        for dtype in dtypes:
            name = f"embedpipe {dtype}"
            job = bench_job(opts, source_path, work / f"out-{dtype}", dtype)
            warm_job = bench_job(opts, warm_path, work / f"warm-{dtype}", dtype)

            def embed(name=name, job=job) -> None:
                summary, out_ids, vectors = run_embedpipe(job)
                res = results[name]
                if not np.array_equal(out_ids, np.sort(ids)):
                    raise RuntimeError(f"{name}: wrote {len(out_ids)} vectors for {len(ids)} rows")
                res.vectors = vectors[np.searchsorted(out_ids, ids)]
                res.padded_tokens, res.real_tokens = summary.padded_tokens, summary.real_tokens
                res.stages.append(dict(summary.seconds))

            add(name, "embedpipe", dtype, embed, lambda warm_job=warm_job: run_embedpipe(warm_job))

            if opts.encode_only:
                runtime = runtimes[dtype]
                encoder = Encoder(source, runtime, EncoderSettings.for_job(recipe_job))
                made = runner_batches(job, runtime, tokenizer)
                if made.rows != len(texts):
                    raise RuntimeError(f"the runner's batches hold {made.rows} rows, the bench "
                                       f"{len(texts)}")
                padded = sum(b.padded_tokens for b in made.batches)

                def encode_only(name=f"encode-only {dtype}", encoder=encoder, batches=made.batches,
                                padded=padded) -> None:
                    out = encode_in_order(encoder.encode_batch, batches, len(texts), encoder.width)
                    results[name].vectors, results[name].padded_tokens = out, padded

                add(f"encode-only {dtype}", "encode-only", dtype, encode_only,
                    lambda encoder=encoder, batches=made.batches: encoder.encode_batch(batches[-1]))

        st_dtypes = ["float32"] + [d for d in dtypes if d != "float32"] if opts.compare_st else []
        st_padded = st_padded_tokens(texts, lengths, opts.st_batch_size)
        for dtype in st_dtypes:
            from sentence_transformers import SentenceTransformer

            model = SentenceTransformer(str(source.path), device=str(device),
                                        model_kwargs={"dtype": torch.float32})
            model.max_seq_length = max_length
            # cast both: transformers 5 loads a folder saved in float16 as float16
            model = model.to(getattr(torch, dtype))
            name = f"{ST} {dtype}"

            def st_encode(name=name, model=model, batch=texts) -> None:
                out = model.encode(batch, batch_size=opts.st_batch_size, convert_to_tensor=True)
                results[name].vectors = out.float().cpu().numpy()
                results[name].padded_tokens = st_padded

            add(name, ST, dtype, st_encode,
                lambda model=model: model.encode(texts[:opts.warmup_rows],
                                                 batch_size=opts.st_batch_size))

        for name, (_, warmup) in runs.items():
            log(f"  warm-up {name}")
            start = time.perf_counter()
            warmup()
            results[name].warmup_seconds = time.perf_counter() - start
        rates = {d: matmul_rate(d, str(device)) for d in dtypes}
        for r in range(opts.rounds):
            for name, (run, _) in runs.items():
                with PeakRSS() as peak:
                    start = time.perf_counter()
                    run()
                    elapsed = time.perf_counter() - start
                results[name].seconds.append(elapsed)
                results[name].peak_rss.append(peak.peak)
                log(f"  round {r + 1}/{opts.rounds} {name}: {elapsed:.2f} s, "
                    f"{len(texts) / elapsed:,.1f} texts/s")
        from transformers import AutoConfig

        model_config = AutoConfig.from_pretrained(source.path)
        return _report(opts, results, rates, encoder_flops(model_config, lengths), device,
                       [rt.dtype_note for rt in requested.values()],
                       {d: rt.attention for d, rt in runtimes.items()}, source_path, corpus,
                       compile_words, {d: rt.forward for d, rt in runtimes.items()})


def _compile_words(runtime) -> str:
    """How the bench's compiled contender compiles: through the persistent cache (warm or cold,
    as the cache held it when the bench started) or with frozen weights, uncached."""
    from ..runtime import compile_cache

    if not runtime.compile_cache:
        return "frozen weights, no cache"
    warm = "warm" if compile_cache.is_warm(runtime.compile_cache) else "cold"
    return f"through the compile cache, {warm} at start ({compile_cache.inductor_dir()})"


def _report(opts: BenchOptions, results: dict[str, Result], rates: dict[str, float],
            flops: float, device, dtype_notes: list[str], attention: dict[str, str],
            source_path: str, corpus: str, compile_notes: dict[str, str] | None = None,
            forward: dict[str, str] | None = None) -> dict[str, Any]:
    import torch

    ref = results.get(f"{ST} float32")
    rows = []
    for res in results.values():
        row = res.to_dict()
        for other in (f"{ST} float32", f"{ST} {res.dtype}"):
            if other in results and other != res.name:
                row[f"x_vs_{other}"] = round(results[other].median / res.median, 2)
        if ref is not None and res is not ref:
            cos = cosines(res.vectors, ref.vectors)
            row["min_cosine_vs_st_float32"] = round(float(cos.min()), 6)
            row["mean_cosine_vs_st_float32"] = round(float(cos.mean()), 7)
        if res.kind == "embedpipe":
            only = results.get(f"encode-only {res.dtype}")
            if only is not None:
                row["overhead_vs_encode_only_pct"] = round(100.0 * (res.median / only.median - 1), 1)
            encode_s = row["stages"]["encode"]
            row["matmul_tflops"] = round(rates[res.dtype] / 1e12, 3)
            row["encoder_tflops"] = round(flops / encode_s / 1e12, 3)
            row["encoder_fraction_of_matmul"] = round(flops / encode_s / rates[res.dtype], 3)
            row["end_to_end_fraction_of_matmul"] = round(flops / res.median / rates[res.dtype], 3)
        rows.append(row)
    return {
        "corpus": corpus, "input": source_path, "texts": next(iter(results.values())).rows,
        "real_tokens": next(iter(results.values())).real_tokens, "model": opts.model,
        "device": str(device), "dtype": dtype_notes, "attention": attention,
        "forward": forward or {}, "rounds": opts.rounds,
        "st_batch_size": opts.st_batch_size, "torch_threads": torch.get_num_threads(),
        "cpus": os.cpu_count(), "cpu_model": cpu_model(), "encoder_gflop": round(flops / 1e9, 1),
        "compile": compile_notes or {},
        "results": rows,
    }


def render(report: dict[str, Any]) -> str:
    lines = [
        f"embedpipe bench: {report['texts']:,} texts, {report['real_tokens']:,} real tokens "
        f"({report['corpus']}: {report['input']})",
        f"  model {report['model']} on {report['device']}, dtype {', '.join(report['dtype'])}, "
        f"attention {', '.join(f'{a} ({d})' for d, a in report['attention'].items())}, "
        f"forward {', '.join(f'{f} ({d})' for d, f in report.get('forward', {}).items()) or '-'}; "
        f"{report['cpus']} CPUs ({report['cpu_model']}), torch threads {report['torch_threads']}; "
        f"median of {report['rounds']} interleaved rounds after a warm-up",
        "",
        f"  {'contender':<32}{'texts/s':>9}{'tokens/s':>10}{'padding':>9}{'peak RSS':>10}"
        f"{'x ST fp32':>10}{'x ST same':>10}{'min cos':>10}",
    ]
    for r in report["results"]:
        same = r.get(f"x_vs_{ST} {r['dtype']}")
        lines.append(
            f"  {r['name']:<32}{r['texts_per_s']:>9,.1f}{r['tokens_per_s']:>10,}"
            f"{r['padding_pct']:>8.1f}%{r['peak_rss_mb']:>7,.0f} MB"
            f"{r.get(f'x_vs_{ST} float32', 1.0 if r['name'] == f'{ST} float32' else '-'):>10}"
            f"{same if same is not None else '-':>10}"
            f"{r.get('min_cosine_vs_st_float32', '-'):>10}")
    for r in report["results"]:
        if r["kind"] != "embedpipe":
            continue
        s = r["stages"]
        lines += [
            "",
            f"  {r['name']}: stages (s, thread time, median) " + ", ".join(
                f"{k} {s[k]:.2f}" for k in STAGES),
            f"    warm-up {r['warmup_seconds']:.1f} s"
            + (f" (compiled: {report['compile'][r['dtype']]})" if report.get("compile", {}).get(
                r["dtype"]) else ""),
            f"    end to end {r['seconds_median']:.2f} s"
            + (f", {r['overhead_vs_encode_only_pct']:+.1f}% vs encode-only"
               if "overhead_vs_encode_only_pct" in r else ""),
            f"    encoder {r['encoder_tflops']:.3f} TFLOP/s = {100 * r['encoder_fraction_of_matmul']:.0f}% "
            f"of this machine's measured {r['dtype']} matmul rate ({r['matmul_tflops']:.3f} TFLOP/s); "
            f"end to end {100 * r['end_to_end_fraction_of_matmul']:.0f}%",
        ]
    return "\n".join(lines)


def to_json(report: dict[str, Any]) -> str:
    return json.dumps(report, indent=2)
