"""embedpipe's attention kernel, each kind this CPU has (AMX tiles, AVX-512 BF16), against SDPA,
per call, on bf16 inputs shaped as a BERT model hands them over (12 heads of 32 by default), with
random key-padding masks.

    .venv/bin/python -m bench.kernels.attention_bench [--heads 12] [--dim 32] [--calls 20]

Prints, per (batch x length): SDPA's and each kernel's median time per call over interleaved
repeats, each kernel's speed-up over SDPA, and each one's largest error against attention
computed in float64.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from pipeline.runtime import cpu_attention, hardware

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
    kinds = [kind for kind, present in (("amx", hardware.this_cpu().amx_bf16),
                                        ("avx512", hardware.this_cpu().avx512_bf16)) if present]
    print(f"{hardware.cpu_model()}, torch threads {torch.get_num_threads()}, "
          f"{args.heads} heads of {args.dim}")
    gen = torch.Generator().manual_seed(0)
    header = f"{'batch x length':>15} {'SDPA ms':>9}"
    for kind in kinds:
        header += f" {kind + ' ms':>10} {'speed-up':>9}"
    header += f" {'SDPA err':>9}" + "".join(f" {kind + ' err':>11}" for kind in kinds)
    print(header)
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

            calls = {"sdpa": sdpa}
            for kind in kinds:
                calls[kind] = (lambda op: lambda: op(q, k, v, keep, scale))(cpu_attention.op(kind))
            for fn in calls.values():
                fn()  # warm
            times = {name: [] for name in calls}
            for _ in range(args.rounds):  # interleaved, so machine load falls on all
                for name, fn in calls.items():
                    times[name].append(timed(fn, args.calls))
            qd, kd, vd = (t.double() for t in (q, k, v))
            scores = (qd @ kd.transpose(-1, -2) * scale).masked_fill(~keep[:, None, None, :], -torch.inf)
            exact = (scores.softmax(-1) @ vd).transpose(1, 2)
            errors = {name: (fn().double() - exact).abs().max().item() for name, fn in calls.items()}
        ms = {name: statistics.median(t) for name, t in times.items()}
        line = f"{f'{batch} x {length}':>15} {ms['sdpa']:>9.2f}"
        for kind in kinds:
            line += f" {ms[kind]:>10.2f} {ms['sdpa'] / ms[kind]:>8.2f}x"
        line += f" {errors['sdpa']:>9.4f}" + "".join(f" {errors[kind]:>11.4f}" for kind in kinds)
        print(line)


if __name__ == "__main__":
    main()
