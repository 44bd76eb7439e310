"""The float32 fused forward against the alternatives for its products, on the runner's own
batches of the bench corpus (encode only, one process, rounds interleaved):
* ``fused onednn``: the fused forward as it runs (oneDNN on packed weights, fused epilogues);
* ``fused mkl``: the same layers with MKL's sgemm (`torch.addmm` on weights transposed once, the
  residual as the product's C, bias and GELU as passes of their own), defined here;
* ``transformers``: transformers' own forward (its Linear modules: MKL's sgemm).
Prints min and median seconds, and the share of the measured float32 matmul rate at the best.

    python -m bench.kernels.fused_forward_products_bench --rows 100 --rounds 3
Cap the ISA from outside to see an AVX2 CPU on an AVX-512 one (docs/performance/amd-zen3-avx2.md, "The fused forward's
products on AVX2"): ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 ATEN_CPU_CAPABILITY=avx2
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.runtime.fused_forward import FusedForward, _Layer, _Weights

EAGER = {"gelu": F.gelu, "gelu_new": lambda y: F.gelu(y, approximate="tanh"),
         "gelu_pytorch_tanh": lambda y: F.gelu(y, approximate="tanh"), "relu": torch.relu_}


class MklForward(FusedForward):
    """The fused forward's layers with MKL's products instead of oneDNN's (float32, SDPA)."""

    def __init__(self, state, config):
        super().__init__(state, config, torch.float32, "sdpa")
        act = getattr(config, "hidden_act", None) or getattr(config, "activation", None)
        self.eager_activation = EAGER[act]
        weights = _Weights(state, getattr(config, "layer_norm_eps", 1e-12), self.names.heads)
        n = self.names

        def product(*prefixes):
            w = torch.cat([weights.get(f"{p}.weight") for p in prefixes]).float()
            return w.t().contiguous(), torch.cat([weights.get(f"{p}.bias") for p in prefixes]).float()

        self.layers = []
        for i in range(config.num_hidden_layers):
            p = f"{n.layers}.{i}"
            self.layers.append(_Layer(
                *product(f"{p}.{n.query}", f"{p}.{n.key}", f"{p}.{n.value}"),
                *product(f"{p}.{n.out}"), weights.norm(f"{p}.{n.norm1}"), *product(f"{p}.{n.up}"),
                *product(f"{p}.{n.down}"), weights.norm(f"{p}.{n.norm2}")))

    def _layer_forward(self, layer, x, keep):
        batch, length, hidden = x.shape
        rows = x.reshape(-1, hidden)
        qkv = torch.addmm(layer.qkv_bias, rows, layer.qkv)
        q, k, v = (qkv.view(batch, length, 3, self.heads, self.head_dim)[:, :, i].transpose(1, 2)
                   for i in range(3))
        context = F.scaled_dot_product_attention(q, k, v, attn_mask=keep[:, None, None, :])
        context = context.transpose(1, 2).reshape(-1, hidden)
        rows = F.layer_norm(torch.addmm(rows, context, layer.out).add_(layer.out_bias), (hidden,),
                            *layer.norm1)
        up = self.eager_activation(torch.addmm(layer.up_bias, rows, layer.up))
        rows = F.layer_norm(torch.addmm(rows, up, layer.down).add_(layer.down_bias), (hidden,),
                            *layer.norm2)
        return rows.view(batch, length, hidden)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    import pyarrow.dataset as ds
    import pyarrow.parquet as pq
    from transformers import AutoConfig

    from pipeline.encode.batching import encode_in_order
    from pipeline.encode.encoder import Encoder, EncoderSettings
    from pipeline.runtime.hardware import cpu_model
    from pipeline.models.model_files import read_safetensors, resolve_model
    from pipeline.models.recipe import resolve_recipe
    from pipeline.runtime.runtime import resolve_runtime
    from pipeline.encode.tokenizer import tokenizer_for
    from pipeline.tools.bench import DEFAULT_CORPUS_DIR, BenchOptions, bench_job, runner_batches
    from pipeline.tools.measure import encoder_flops, matmul_rate
    from pipeline.tools.datasets import fetch_bench_corpus

    source = resolve_model("all-MiniLM-L6-v2")
    folder = fetch_bench_corpus(DEFAULT_CORPUS_DIR.expanduser() / "corpus-4000", 4000)[0].parent
    work = Path(tempfile.mkdtemp(prefix="ffpb-"))
    (work / "in").mkdir()
    pq.write_table(ds.dataset(str(folder)).to_table(columns=["id", "text"]).slice(0, args.rows),
                   work / "in" / "a.parquet")
    config = AutoConfig.from_pretrained(source.path)
    encoders = {}
    for forward in ("fused", "transformers"):
        opts = BenchOptions(device="cpu", forward=forward)
        job = resolve_recipe(bench_job(opts, str(work / "in"), work / "o", "float32"), source)[0]
        runtime = resolve_runtime(job.model, source)
        encoders[f"{forward} onednn" if forward == "fused" else forward] = Encoder(
            source, runtime, EncoderSettings.for_job(job))
        if forward == "fused":
            batches = runner_batches(job, runtime, tokenizer_for(source, runtime, job)).batches
            mkl = Encoder(source, runtime, EncoderSettings.for_job(job))
            mkl.model = MklForward(read_safetensors(source.path), config)
            encoders["fused mkl"] = mkl
    lengths = np.concatenate([b.attention_mask.sum(1).numpy() for b in batches])
    flops = encoder_flops(config, lengths)
    times, ref = {k: [] for k in encoders}, None
    for e in encoders.values():
        e.encode_batch(batches[-1])
    for _ in range(args.rounds):
        for name, e in encoders.items():
            start = time.perf_counter()
            out = encode_in_order(e.encode_batch, batches, args.rows, e.width)
            times[name].append(time.perf_counter() - start)
            if ref is None:
                ref = out
            cos = (out * ref).sum(1) / np.linalg.norm(out, axis=1) / np.linalg.norm(ref, axis=1)
            assert cos.min() > 0.99999, (name, cos.min())  # the same function, or no comparison
    rate = matmul_rate("float32")
    print(json.dumps({
        "cpu": cpu_model(), "aten": torch.backends.cpu.get_cpu_capability(),
        "onednn_max_isa": os.environ.get("ONEDNN_MAX_CPU_ISA", "-"),
        "mkl_instructions": os.environ.get("MKL_ENABLE_INSTRUCTIONS", "-"),
        "matmul_gflops": round(rate / 1e9, 1),
        **{name: {"min": round(min(t), 3), "median": round(statistics.median(t), 3),
                  "fraction_of_matmul_best": round(flops / min(t) / rate, 3)}
           for name, t in times.items()}}))


if __name__ == "__main__":
    main()
