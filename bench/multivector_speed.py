"""Multi-vector (ColBERT) output speed: `embedpipe run` against sentence-transformers' own
MultiVectorEncoder.encode_document on the same texts, float32, CPU.

The model is a STAND-IN of realistic shape, random weights (its vectors mean nothing, its speed
is the shape's): a MiniLM-L6-shaped BERT body (6 layers, 384 wide, the BERT uncased tokenizer),
a 128-dim Dense head on the token embeddings, the punctuation skiplist, a token Normalize and
the `[Q] ` / `[D] ` prompts, saved by sentence-transformers; `--pool-factor F` adds a
HierarchicalTokenPooling(pool_factor=F) after it.

Both in one process, the model loaded before timing. The first round is a warm-up, discarded;
in it the two contenders' vectors are compared (the same token count a row, largest absolute
difference at most 1e-4), else the bench stops before timing anything. Then `--rounds`
interleaved rounds, each a whole run over the texts: embedpipe's run_job (Parquet in, tokenize,
encode, token vectors to Parquet parts, manifest) into a fresh folder; encode_document(texts,
batch_size=32) to its list of arrays. Times are medians of wall time and of the process's CPU
time, its waited-for child processes' included (steadier on a shared machine); the ratio is ST /
embedpipe.

    python -m bench.multivector_speed --texts 300 --rounds 3
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import string
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from bench import print_contenders
from bench.sparse_speed import cpu_name

TOLERANCE = 1e-4


def stand_in(work: Path, pool_factor: float | None = None) -> Path:
    """STAND-IN: a random MiniLM-L6-shaped body with a 128-dim ColBERT head, as a
    MultiVectorEncoder folder."""
    import torch
    from sentence_transformers import MultiVectorEncoder
    from sentence_transformers.base.modules import Dense, Normalize, Transformer
    from sentence_transformers.multi_vector_encoder.modules import (HierarchicalTokenPooling,
                                                                    MultiVectorMask)
    from transformers import AutoTokenizer, BertConfig, BertModel

    from pipeline.models.model_files import resolve_model

    folder = work / ("stand-in-colbert" + (f"-pool{pool_factor:g}" if pool_factor else ""))
    if (folder / "modules.json").is_file():
        return folder
    torch.manual_seed(0)
    body = work / "stand-in-minilm-body"
    if not (body / "config.json").is_file():
        BertModel(BertConfig(hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                             intermediate_size=1536)).eval().save_pretrained(body)
        AutoTokenizer.from_pretrained(resolve_model("all-MiniLM-L6-v2").path).save_pretrained(body)
    pooling = [HierarchicalTokenPooling(pool_factor=pool_factor)] if pool_factor else []
    MultiVectorEncoder(modules=[
        Transformer(str(body), max_seq_length=256),
        Dense(384, 128, bias=False, activation_function=torch.nn.Identity(),
              module_input_name="token_embeddings"),
        MultiVectorMask(skiplist_words=list(string.punctuation)),
        Normalize(module_input_name="token_embeddings"), *pooling],
        prompts={"query": "[Q] ", "document": "[D] "}).save(str(folder))
    return folder


def cpu_seconds() -> float:
    """This process's CPU time, and its finished child processes'."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def largest_difference(got: list[np.ndarray], expected: list[np.ndarray]) -> float:
    """The largest absolute difference of two runs' rows; AssertionError where they do not
    pair (row count, a row's token count or dimension) or differ by more than TOLERANCE."""
    assert len(got) == len(expected), f"{len(got)} rows against {len(expected)}"
    worst = 0.0
    for i, (g, e) in enumerate(zip(got, expected)):
        assert g.shape == e.shape, f"row {i}: {g.shape} against sentence-transformers' {e.shape}"
        if len(g):
            worst = max(worst, float(np.abs(g.astype(np.float32) - e).max()))
    assert worst <= TOLERANCE, f"vectors differ by {worst:.2e} (> {TOLERANCE})"
    return worst


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--texts", type=int, default=2000, help="movie-review snippets (real texts)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--pool-factor", type=float, help="add HierarchicalTokenPooling(pool_factor)")
    p.add_argument("--work", default="out/multivector-speed")
    p.add_argument("--json", help="write the report here too")
    args = p.parse_args(argv)

    import torch
    from sentence_transformers import MultiVectorEncoder

    from pipeline.config import config_from_dict
    from pipeline.io.output import open_output
    from pipeline.jobs.runner import run_job
    from pipeline.tools.datasets import movie_rows

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    model = stand_in(work, args.pool_factor)
    texts = movie_rows()[1][:args.texts]
    pq.write_table(pa.table({"id": np.arange(len(texts)), "text": texts}), work / "in.parquet")
    st = MultiVectorEncoder(str(model), device="cpu")
    out = work / "run"
    stored: dict = {}

    def embedpipe():
        shutil.rmtree(out, ignore_errors=True)
        summary = run_job(config_from_dict({
            "name": "multivector-speed", "input": {"path": str(work / "in.parquet")},
            "model": {"name": str(model), "dtype": "float32", "device": "cpu"},
            "output": {"path": str(out)}}))
        assert not summary.failures, summary.failures
        stored.update(tokens=summary.stored_tokens, forward=summary.runtime.forward,
                      stages=dict(summary.seconds))

    def sentence_transformers():
        return st.encode_document(texts, batch_size=32, convert_to_numpy=True)

    contenders = {"embedpipe": embedpipe, "sentence-transformers": sentence_transformers}
    times: dict[str, list[float]] = {k: [] for k in contenders}
    cpu: dict[str, list[float]] = {k: [] for k in contenders}
    load = [os.getloadavg()[0]]
    difference = None
    for round_ in range(args.rounds + 1):
        for name, fn in contenders.items():
            tick, cpu_tick = time.perf_counter(), cpu_seconds()
            result = fn()
            if round_:  # the first round warms caches; its vectors are compared
                times[name].append(time.perf_counter() - tick)
                cpu[name].append(cpu_seconds() - cpu_tick)
            elif name == "sentence-transformers":
                difference = largest_difference(open_output(str(out)).multivectors(), result)
    load.append(os.getloadavg()[0])
    med = {k: statistics.median(v) for k, v in times.items()}
    med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
    report = {"cpu": cpu_name(), "threads": torch.get_num_threads(), "load_average": load,
              "model": str(model), "stand_in": "minilm-l6 body, 128-dim head, random weights",
              "pool_factor": args.pool_factor, "forward": stored["forward"],
              "texts": len(texts), "rounds": args.rounds,
              "tokens_a_row": stored["tokens"] / max(len(texts), 1),
              "max_abs_diff": difference, "embedpipe_stage_seconds": stored["stages"],
              "seconds": times, "median_s": med,
              "cpu_seconds": cpu, "median_cpu_s": med_cpu,
              "ratio_st_over_embedpipe": med["sentence-transformers"] / med["embedpipe"],
              "ratio_cpu_st_over_embedpipe":
                  med_cpu["sentence-transformers"] / med_cpu["embedpipe"]}
    print(f"{report['cpu']}, {report['threads']} threads, load {load[0]:.1f} -> {load[1]:.1f}; "
          f"{len(texts)} movie snippets, {report['tokens_a_row']:.1f} stored tokens a row; "
          f"model STAND-IN (MiniLM-L6-shaped body, 128-dim head, random weights"
          + (f", pool_factor {args.pool_factor:g}" if args.pool_factor else "") + ")")
    print_contenders(med, med_cpu, len(texts), report, args.json,
                     f"; largest vector difference {difference:.1e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
