"""embedpipe's AMX attention kernel against SDPA, per call, on bf16 inputs shaped as a BERT model
hands them over (12 heads of 32 by default), with random key-padding masks.

    .venv/bin/python scripts/attention_bench.py [--heads 12] [--dim 32] [--calls 20]

Prints, per (batch x length): SDPA's and the kernel's median time per call over interleaved
repeats, the ratio, and each one's largest error against attention computed in float64.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from pipeline.encode import cpu_attention

SHAPES = [(33, 122), (128, 32), (64, 64), (16, 256), (2, 300), (3, 7)]


def timed(fn, calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--dim", type=int, default=32)
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    cpu_attention.build()
    kernel = torch.ops.embedpipe.padded_attention
    gen = torch.Generator().manual_seed(0)
    print(f"{'batch x length':>15} {'SDPA ms':>9} {'kernel ms':>10} {'speed-up':>9} "
          f"{'SDPA err':>9} {'kernel err':>11}")
    for batch, length in SHAPES:
        x = (torch.randn(batch, length, 3, args.heads, args.dim, generator=gen) * 2).bfloat16()
        q, k, v = (x[:, :, i].transpose(1, 2) for i in range(3))
        lengths = torch.randint(max(1, length // 2), length + 1, (batch,), generator=gen)
        keep = torch.arange(length)[None, :] < lengths[:, None]
        scale = args.dim ** -0.5
        with torch.inference_mode():
            def sdpa():
                return F.scaled_dot_product_attention(
                    q, k, v, attn_mask=keep[:, None, None, :], scale=scale).transpose(1, 2).contiguous()

            def ours():
                return kernel(q, k, v, keep, scale)

            sdpa(), ours()  # warm
            times = {"sdpa": [], "ours": []}
            for _ in range(args.rounds):  # interleaved, so machine load falls on both
                times["sdpa"].append(timed(sdpa, args.calls))
                times["ours"].append(timed(ours, args.calls))
            qd, kd, vd = (t.double() for t in (q, k, v))
            scores = (qd @ kd.transpose(-1, -2) * scale).masked_fill(~keep[:, None, None, :], -torch.inf)
            exact = (scores.softmax(-1) @ vd).transpose(1, 2)
            errors = [(f().double() - exact).abs().max().item() for f in (sdpa, ours)]
        a, b = statistics.median(times["sdpa"]), statistics.median(times["ours"])
        print(f"{f'{batch} x {length}':>15} {a:>9.2f} {b:>10.2f} {a / b:>8.2f}x "
              f"{errors[0]:>9.4f} {errors[1]:>11.4f}")


if __name__ == "__main__":
    main()
