"""`embedpipe bench --peers`: embedpipe against the peers' own CPU backends, whole processes.

The peers are sentence-transformers' backends (torch, ONNX Runtime, ONNX O3, ONNX dynamic int8
for this CPU's instruction set, OpenVINO, OpenVINO static int8 calibrated on the bench's own
texts) and FastEmbed where it is installed. Their exporters pin other library versions than
embedpipe's, so they run in a venv of their own (`peers_venv`: made on first use with
`python -m venv` and pip from the package registries, kept under `$EMBEDPIPE_CACHE`) through
`peer_worker.py`; embedpipe runs in this Python through its real runner. Each round starts every
contender once, in turn, as a process of its own over the same texts (one Parquet file); each
times its own encode after loading and a warm-up, and writes its vectors. Reported: the median
and min seconds, the ratio to sentence-transformers' torch float32, min cosine to its vectors,
and the share of this CPU's measured float32 matmul rate each reaches.
"""
from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..config import DEFAULT_MODEL
from ..runtime.compile_cache import cache_root
from ..runtime.hardware import cpu_flags, cpu_model

WORKER = Path(__file__).with_name("peer_worker.py")
# What `pip install 'sentence-transformers[onnx,openvino]' datasets pyarrow` resolved to on
# 2026-12-07 (Python 3.11; huggingface-hub held below 1.0 for transformers 4.57), pinned so that
# every machine benches the same peers. torch comes from PyPI (its CUDA build: ~3 GB).
PEER_REQUIREMENTS = (
    "sentence-transformers[onnx,openvino]==5.7.0",
    "transformers==4.57.6",
    "huggingface-hub==0.36.2",
    "torch==2.14.1",
    "onnxruntime==1.32.0",
    "onnx==1.23.2",
    "optimum==2.1.0",
    "optimum-onnx==0.1.0",
    "optimum-intel==1.27.0",
    "openvino==2026.4.1",
    "nncf==3.4.0",
    "datasets==5.0.1",
    "pyarrow==26.0.1",
)
PEERS = ("st-torch", "st-onnx", "st-onnx-o3", "st-onnx-int8", "st-openvino", "st-openvino-f32",
         "st-openvino-int8")
REFERENCE = "st-torch"
LABELS = {
    "st-torch": "ST torch float32",
    "st-onnx": 'ST backend="onnx"',
    "st-onnx-o3": "ST onnx O3",
    "st-onnx-int8": "ST onnx dynamic int8 ({int8})",
    "st-openvino": 'ST backend="openvino" (default precision)',
    "st-openvino-f32": "ST openvino, f32 precision hint",
    "st-openvino-int8": "ST openvino static int8",
    "fastembed": "FastEmbed",
}
MARKER = "embedpipe-requirements.txt"


class PeersUnavailable(RuntimeError):
    """The peers' venv could not be made here (no registry, no pip, a failed resolve)."""


class PeerFailed(RuntimeError):
    """A contender's process failed (its export, load or encode): one line from its stderr."""


def int8_config(flags: frozenset[str]) -> str | None:
    """sentence-transformers' dynamic int8 export for a CPU with these features: VNNI where it
    has AVX-512 VNNI, AVX2 otherwise; None for a CPU with neither (Arm: no x86 export)."""
    if {"avx512f", "avx512bw", "avx512_vnni"} <= flags:
        return "avx512_vnni"
    if "avx2" in flags:
        return "avx2"
    return None


def venv_dir() -> Path:
    return cache_root() / "bench-peers-venv"


def venv_python(folder: Path | None = None) -> Path:
    return (folder or venv_dir()) / "bin" / "python"


def venv_ready(folder: Path | None = None) -> bool:
    folder = folder or venv_dir()
    marker = folder / MARKER
    return (venv_python(folder).exists() and marker.exists()
            and marker.read_text() == "\n".join(PEER_REQUIREMENTS))


def peers_venv(folder: Path | None = None, log: Callable[[str], None] = lambda _: None) -> Path:
    """The peers' Python: the venv made once with PEER_REQUIREMENTS (remade when they change)."""
    folder = folder or venv_dir()
    if venv_ready(folder):
        return venv_python(folder)
    if folder.exists() and not folder.is_dir():
        raise PeersUnavailable(f"the peers' venv {folder} is a file: pass a new or empty folder")
    if folder.exists() and any(folder.iterdir()):
        if not (folder / MARKER).exists():  # never remove a folder embedpipe did not make
            raise PeersUnavailable(f"{folder} is not empty and not a peers' venv embedpipe made: "
                                   f"pass a new or empty folder")
        shutil.rmtree(folder)  # ours, half-made or with other pins: made again
    log(f"bench: making the peers' venv in {folder} (pip from the registries; once)")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / MARKER).write_text("(being made)")
    except OSError as exc:
        raise PeersUnavailable(f"could not make the peers' venv in {folder}: {exc}") from None
    base = getattr(sys, "_base_executable", sys.executable)
    steps = ([base, "-m", "venv", str(folder)],
             [str(venv_python(folder)), "-m", "pip", "install", "-q", *PEER_REQUIREMENTS])
    for step in steps:
        done = subprocess.run(step, capture_output=True, text=True)
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
            raise PeersUnavailable(f"could not make the peers' venv in {folder}: "
                                   f"{' '.join(step[:3])} ... failed: {last}")
    (folder / MARKER).write_text("\n".join(PEER_REQUIREMENTS))
    return venv_python(folder)


@dataclass
class PeerOptions:
    input: str | None = None  # a Parquet file or folder; None: the built-in corpus
    rows: int | None = None
    text_column: str = "text"
    id_column: str = "id"
    model: str = DEFAULT_MODEL
    dtypes: tuple[str, ...] = ("auto",)  # embedpipe's contenders
    peers: tuple[str, ...] = PEERS
    rounds: int = 3
    max_length: int | None = None
    batch_size: int = 32  # the peers' encode batch size
    warmup: int = 64
    venv: str | None = None  # the peers' venv folder (default: $EMBEDPIPE_CACHE/bench-peers-venv)
    workdir: str | None = None
    flags: frozenset[str] | None = None  # the CPU's features (default: this CPU's)


@dataclass
class PeerResult:
    name: str
    label: str
    seconds: list[float] = field(default_factory=list)
    vectors: np.ndarray | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def _run(cmd: list[str], what: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise PeerFailed(f"{what} failed (exit {done.returncode}): {last}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _embedpipe_env() -> dict[str, str]:
    root = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return env


def run_peers(opts: PeerOptions, log: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    from transformers import AutoConfig, AutoTokenizer

    from ..models.model_files import resolve_model
    from ..runtime.runtime import resolve_runtime
    from .bench import BenchOptions, bench_job, load_rows
    from .measure import cosines, encoder_flops, matmul_rate

    if opts.rounds < 1:
        raise ValueError("rounds must be at least 1")
    unknown = [p for p in opts.peers if p not in LABELS]
    if unknown:
        raise ValueError(f"unknown peer {unknown[0]!r}: one of {', '.join(LABELS)}")
    flags = cpu_flags() if opts.flags is None else opts.flags
    int8 = int8_config(flags)
    peers = [p for p in opts.peers if p != "st-onnx-int8" or int8]
    if len(peers) < len(opts.peers):
        log("bench: no ONNX dynamic int8 here: sentence-transformers' x86 int8 exports need AVX2")
    if REFERENCE not in peers:
        peers.insert(0, REFERENCE)
    source = resolve_model(opts.model)
    bench_opts = BenchOptions(model=opts.model, max_length=opts.max_length, device="cpu")
    runtimes = {d: resolve_runtime(bench_job(bench_opts, "-", Path("-"), d).model, source)
                for d in opts.dtypes}
    max_length = next(iter(runtimes.values())).max_length
    python = str(peers_venv(Path(opts.venv) if opts.venv else None, log))
    versions = _run([python, str(WORKER), "versions"], "the peers' venv")
    if "fastembed" in peers and "fastembed" not in versions:
        raise ValueError("FastEmbed is not in the peers' venv (it fetches its models from a hub;"
                         " install it there to bench it on the ONNX export)")

    with tempfile.TemporaryDirectory(prefix="embedpipe-peers-") as tmp:
        work = Path(opts.workdir) if opts.workdir else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        from .bench import bench_source

        source_path, corpus = bench_source(opts)
        rows = load_rows(source_path, opts.text_column, opts.id_column, opts.rows)
        texts = rows["text"].to_pylist()
        (work / "input").mkdir(exist_ok=True)
        texts_path = work / "input" / "texts.parquet"
        pq.write_table(pa.table({"id": np.arange(len(texts)), "text": texts}), texts_path)
        tokenizer = AutoTokenizer.from_pretrained(str(source.path))
        lengths = np.array([len(ids) for ids in tokenizer(
            texts, truncation=True, max_length=max_length)["input_ids"]], dtype=np.int64)
        flops = encoder_flops(AutoConfig.from_pretrained(source.path), lengths)

        exports = cache_root() / "bench-peers" / f"{source.fingerprint[:16]}-{int8 or 'none'}"
        log(f"bench: exporting {opts.model} for the peers into {exports} (once)")
        _run([python, str(WORKER), "prepare", "--model", str(source.path), "--exports",
              str(exports), "--texts", str(texts_path), "--int8", int8 or "avx2"],
             "exporting the model for the peers")

        results: dict[str, PeerResult] = {}
        commands: dict[str, tuple[list[str], dict[str, str] | None]] = {}
        for peer in peers:
            out = work / f"{peer}.npy"
            results[peer] = PeerResult(peer, LABELS[peer].format(int8=int8))
            commands[peer] = ([python, str(WORKER), "encode", "--contender", peer, "--exports",
                               str(exports), "--texts", str(texts_path), "--out", str(out),
                               "--int8", int8 or "avx2", "--max-length", str(max_length),
                               "--batch-size", str(opts.batch_size), "--warmup",
                               str(opts.warmup)], None)
        for dtype, runtime in runtimes.items():
            name = f"embedpipe {runtime.dtype}"
            results[name] = PeerResult(name, f"embedpipe {dtype} ({runtime.dtype}, "
                                             f"{runtime.forward} forward)")
            commands[name] = ([sys.executable, "-m", "pipeline.tools.bench_peers", "--input",
                               str(work / "input"), "--out", str(work / f"{name}.npy"),
                               "--model", opts.model, "--dtype", dtype, "--max-length",
                               str(max_length), "--warmup", str(opts.warmup),
                               "--workdir", str(work / f"run-{dtype}")], _embedpipe_env())
        rate = matmul_rate("float32")
        for r in range(opts.rounds):
            for name, (cmd, env) in commands.items():
                got = _run(cmd, name, env)
                res = results[name]
                res.seconds.append(got["seconds"])
                res.extra = {k: v for k, v in got.items() if k not in ("seconds", "contender")}
                log(f"  round {r + 1}/{opts.rounds} {res.label}: {got['seconds']:.2f} s")
        for name in results:
            results[name].vectors = np.load(work / f"{name}.npy")
        ref = results[REFERENCE]
        table = []
        for res in results.values():
            if res.vectors.shape != ref.vectors.shape:
                raise RuntimeError(f"{res.label} made vectors of shape {res.vectors.shape}, "
                                   f"the reference {ref.vectors.shape}")
            med = statistics.median(res.seconds)
            table.append({
                "name": res.name, "label": res.label, "seconds_median": round(med, 3),
                "seconds_min": round(min(res.seconds), 3),
                "seconds": [round(s, 3) for s in res.seconds],
                "x_vs_st_torch_float32": round(statistics.median(ref.seconds) / med, 3),
                "min_cosine": round(float(cosines(res.vectors, ref.vectors).min()), 6),
                "fraction_of_matmul": round(flops / med / rate, 3), **res.extra})
    return {"corpus": corpus, "input": source_path, "texts": len(texts),
            "real_tokens": int(lengths.sum()), "model": opts.model, "max_length": max_length,
            "rounds": opts.rounds, "batch_size": opts.batch_size, "cpu_model": cpu_model(),
            "cpus": os.cpu_count(), "int8_config": int8, "matmul_tflops": round(rate / 1e12, 3),
            "encoder_gflop": round(flops / 1e9, 1), "peer_versions": versions,
            "isa_caps": {k: os.environ[k] for k in ISA_CAPS if k in os.environ},
            "results": table}


ISA_CAPS = ("ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS", "ATEN_CPU_CAPABILITY")


def render_peers(report: dict[str, Any]) -> str:
    caps = ", ".join(f"{k}={v}" for k, v in report["isa_caps"].items())
    versions = ", ".join(f"{k} {v}" for k, v in report["peer_versions"].items())
    lines = [
        f"embedpipe bench --peers: {report['texts']:,} texts, {report['real_tokens']:,} real "
        f"tokens ({report['corpus']}: {report['input']}), model {report['model']}, max_length "
        f"{report['max_length']}",
        f"  CPU: {report['cpu_model']}, {report['cpus']} CPUs"
        + (f", capped: {caps}" if caps else "") + f"; float32 matmul "
        f"{report['matmul_tflops']:.3f} TFLOP/s measured; whole processes, encode timed after "
        f"a warm-up, median (min) of {report['rounds']} interleaved rounds",
        f"  peers: {versions}",
        "",
        f"  {'contender':<44}{'seconds':>9}{'(min)':>9}{'x ST fp32':>11}{'min cos':>10}"
        f"{'of matmul':>11}",
    ]
    for r in report["results"]:
        lines.append(f"  {r['label']:<44}{r['seconds_median']:>9.2f}{r['seconds_min']:>9.2f}"
                     f"{r['x_vs_st_torch_float32']:>10.2f}x{r['min_cosine']:>10.6f}"
                     f"{100 * r['fraction_of_matmul']:>10.0f}%")
    return "\n".join(lines)


def _embedpipe_worker() -> None:
    """One embedpipe contender as a process of its own: the runner's full path over the texts
    (Parquet in, vector parts out, no index), timed after a warm-up run on the first rows."""
    import argparse
    import time

    from .bench import BenchOptions, bench_job, run_embedpipe

    ap = argparse.ArgumentParser()
    for flag in ("--input", "--out", "--model", "--dtype", "--workdir"):
        ap.add_argument(flag, required=True)
    ap.add_argument("--max-length", type=int, required=True)
    ap.add_argument("--warmup", type=int, default=64)
    args = ap.parse_args()
    work = Path(args.workdir)
    opts = BenchOptions(model=args.model, max_length=args.max_length, device="cpu", index=False)
    texts = pq.read_table(Path(args.input) / "texts.parquet")
    (work / "warm").mkdir(parents=True, exist_ok=True)
    pq.write_table(texts.slice(0, args.warmup), work / "warm" / "texts.parquet")
    run_embedpipe(bench_job(opts, str(work / "warm"), work / "warm-out", args.dtype))
    start = time.perf_counter()
    summary, ids, vectors = run_embedpipe(bench_job(opts, args.input, work / "out", args.dtype))
    seconds = time.perf_counter() - start
    if not np.array_equal(ids, np.arange(texts.num_rows)):
        raise RuntimeError(f"embedpipe wrote {len(ids)} vectors for {texts.num_rows} rows")
    np.save(args.out, vectors)
    print(json.dumps({"seconds": seconds, "encode_seconds": summary.seconds["encode"],
                      "padded_tokens": summary.padded_tokens}))


if __name__ == "__main__":
    try:
        _embedpipe_worker()
    except Exception as exc:
        import traceback

        traceback.print_exc()
        print(f"{type(exc).__name__}: {exc}".splitlines()[0], file=sys.stderr)
        sys.exit(1)
