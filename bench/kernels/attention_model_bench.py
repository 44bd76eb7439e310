"""The bundled bf16 MiniLM (all-MiniLM-L6-v2) on CPU with SDPA attention against embedpipe's
attention kernel(s) this CPU has: texts/s of the whole encode (tokenize, batch, forward, pool),
interleaved rounds, and the smallest cosine between the kernel's vectors and SDPA's.

    .venv/bin/python -m bench.kernels.attention_model_bench [--texts 1000] [--rounds 5] [--compile]

Texts: the movie-review snippets (short) and joins of 2-8 of them (up to 256 tokens).
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import numpy as np
import pyarrow.parquet as pq
import torch

from pipeline.config import ModelConfig
from pipeline.runtime import hardware
from pipeline.encode.batching import encode_texts
from pipeline.encode.encoder import Encoder, EncoderSettings
from pipeline.models.model_files import resolve_model
from pipeline.runtime.runtime import resolve_runtime
from pipeline.encode.tokenizer import TextTokenizer
from pipeline.tools.datasets import fetch_movie_reviews

MEAN = EncoderSettings(layers=(-1,), layer_combine="concat", token_pooling="mean", normalize=True)


def texts(n: int) -> list[str]:
    with tempfile.TemporaryDirectory() as tmp:
        fetch_movie_reviews(tmp)
        snippets = pq.read_table(tmp).column("text").to_pylist()
    rng = np.random.default_rng(0)
    short = [snippets[i] for i in rng.choice(len(snippets), n - n // 5, replace=False)]
    joined = [" ".join(snippets[j] for j in rng.choice(len(snippets), int(k), replace=False))
              for k in rng.integers(2, 9, n // 5)]
    return short + joined


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--texts", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--compile", action="store_true")
    args = parser.parse_args()
    source = resolve_model("all-MiniLM-L6-v2")
    corpus = texts(args.texts)
    tokenizer = TextTokenizer(source.path, source.max_length)
    kinds = [kind for kind, present in (("amx", hardware.this_cpu().amx_bf16),
                                        ("avx512", hardware.this_cpu().avx512_bf16)) if present]
    encoders = {}
    for attention in ["sdpa", *kinds]:
        runtime = resolve_runtime(ModelConfig(name=str(source.path), device="cpu", dtype="bfloat16",
                                              attention=attention, compile=args.compile), source)
        encoders[attention] = Encoder(source, runtime, MEAN)

    def run(encoder):
        return encode_texts(tokenizer, encoder, corpus, 4096, 256)

    vectors = {name: run(encoder) for name, encoder in encoders.items()}  # warm (and compile)
    seconds = {name: [] for name in encoders}
    for _ in range(args.rounds):  # interleaved, so machine load falls on all
        for name, encoder in encoders.items():
            start = time.perf_counter()
            run(encoder)
            seconds[name].append(time.perf_counter() - start)
    lengths = [len(ids) for ids in tokenizer(corpus).ids]
    print(f"{hardware.cpu_model()}, torch threads {torch.get_num_threads()}; {len(corpus)} texts, "
          f"tokens median {int(np.median(lengths))}, max {max(lengths)}; bf16, "
          f"{'compiled' if args.compile else 'eager'}; median of {args.rounds} interleaved rounds")
    base = statistics.median(seconds["sdpa"])
    for name, times in seconds.items():
        t = statistics.median(times)
        cos = (vectors[name] * vectors["sdpa"]).sum(1).min()
        print(f"  {name:>7}: {t:6.2f} s  {len(corpus) / t:7.1f} texts/s  {base / t:5.2f}x SDPA  "
              f"min cosine to SDPA {cos:.6f}")


if __name__ == "__main__":
    main()
