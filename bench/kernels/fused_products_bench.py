"""The fused forward's matrix products against the alternatives, at a BERT encoder's shapes.

For each product of a layer (QKV, attention out + residual, up + GELU, down + residual), at a
few batch-token counts, times in float32:
* ``onednn``: oneDNN on weights packed once, the epilogue fused (what the fused forward runs);
* ``onednn+eager``: the same packed product, bias fused, the GELU / residual as passes of their own;
* ``aten``: ``torch.nn.functional.linear`` on unpacked weights (MKL's sgemm), epilogue eager;
* ``addmm``: ``torch.addmm`` with the weight pre-transposed to (in, out), epilogue eager.
Rounds interleave the variants (A B C D A B C D ...); prints min and median GFLOP/s per variant.
Cap the ISA from outside to see an AVX2 CPU on an AVX-512 one:
    ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 ATEN_CPU_CAPABILITY=avx2 \
        python -m bench.kernels.fused_products_bench
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
import torch.nn.functional as F


def products(m: int, hidden: int, inter: int):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(m, hidden, generator=g)
    h = torch.randn(m, inter, generator=g)
    out = {}
    for name, inp, n_out, epi in (("qkv", x, 3 * hidden, "none"), ("out+res", x, hidden, "add"),
                                  ("up+gelu", x, inter, "gelu"), ("down+res", h, hidden, "add")):
        k = inp.shape[1]
        w = torch.randn(n_out, k, generator=g) * k ** -0.5
        b = torch.randn(n_out, generator=g)
        res = torch.randn(m, n_out, generator=g) if epi == "add" else None
        packed = torch.ops.mkldnn._reorder_linear_weight(w, 4096)
        wt = w.t().contiguous()

        def eager(y, epi=epi, res=res):
            if epi == "gelu":
                return F.gelu(y)
            if epi == "add":
                return y.add_(res)
            return y

        if epi == "add":
            fused = lambda inp=inp, res=res, packed=packed, b=b: \
                torch.ops.mkldnn._linear_pointwise.binary(inp, res, packed, b, "add")
        else:
            fused = lambda inp=inp, packed=packed, b=b, epi=epi: \
                torch.ops.mkldnn._linear_pointwise(inp, packed, b, epi, [], "none" if epi == "gelu" else "")
        variants = {
            "onednn": fused,
            "onednn+eager": lambda inp=inp, packed=packed, b=b, eager=eager: eager(
                torch.ops.mkldnn._linear_pointwise(inp, packed, b, "none", [], "")),
            "aten": lambda inp=inp, w=w, b=b, eager=eager: eager(F.linear(inp, w, b)),
            "addmm": lambda inp=inp, wt=wt, b=b, eager=eager: eager(torch.addmm(b, inp, wt)),
        }
        ref = eager(F.linear(inp.double(), w.double(), b.double()).float()) if epi != "add" else \
            F.linear(inp.double(), w.double(), b.double()).float() + res
        for v, f in variants.items():
            err = (f() - ref).abs().max().item()
            assert err < 1e-3, (name, v, err)
        out[name] = (2.0 * m * k * n_out, variants)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, nargs="+", default=[2048, 4096, 8192])
    ap.add_argument("--hidden", type=int, default=384)
    ap.add_argument("--intermediate", type=int, default=1536)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=0.25, help="per variant per round")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    from pipeline.runtime.hardware import cpu_model

    header = {"cpu": cpu_model(), "aten_capability": torch.backends.cpu.get_cpu_capability(),
              "onednn_max_isa": os.environ.get("ONEDNN_MAX_CPU_ISA", "-"),
              "mkl_instructions": os.environ.get("MKL_ENABLE_INSTRUCTIONS", "-"),
              "threads": torch.get_num_threads()}
    print(json.dumps(header))
    results = []
    for m in args.tokens:
        table = products(m, args.hidden, args.intermediate)
        for name, (flops, variants) in table.items():
            rates = {v: [] for v in variants}
            for f in variants.values():
                f(); f()
            for _ in range(args.rounds):
                for v, f in variants.items():
                    count, start = 0, time.perf_counter()
                    while True:
                        f()
                        count += 1
                        elapsed = time.perf_counter() - start
                        if elapsed >= args.seconds:
                            break
                    rates[v].append(flops * count / elapsed / 1e9)
            row = {"tokens": m, "product": name,
                   **{v: [round(max(r), 1), round(statistics.median(r), 1)] for v, r in rates.items()}}
            results.append(row)
            print(json.dumps(row) if args.json else
                  f"{m:>6} {name:<10} " + "  ".join(f"{v} {r[0]:.0f}/{r[1]:.0f}"
                                                   for v, r in list(row.items())[2:]), flush=True)


if __name__ == "__main__":
    main()
