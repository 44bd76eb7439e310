"""The nights in sequence on one maintained folder (full, a, b, c, fresh) and the --scale runs,
each judged against its target."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from .corpus import (CHANGED_SHARE, DUPLICATE_SHARE, Corpus, TextMaker, base_corpus, change_rows,
                     night_b_corpus, sentence_pool, write_layout)
from .runs import TINY_SIZES, RunResult, build_tiny_model, compare_folders, run_embedpipe, write_job

TARGETS = {"night a": 0.10, "night b": 0.10, "night c": 0.02}
SCALE_RSS_TARGET = 1.10


def _copy_input(corpus: Corpus) -> Corpus:
    return Corpus(corpus.ids.copy(), list(corpus.texts))


def _num(value: Any) -> int | None:
    return int(value) if isinstance(value, (int, float)) else None


def judge(result: RunResult, full: RunResult) -> None:
    """Ratio to the full run, and whether each target is met (None: unknown)."""
    result.ratio = result.seconds / full.seconds if full.seconds else None
    result.target_ratio = TARGETS.get(result.label)
    if result.target_ratio is not None:
        result.checks["time"] = result.ratio is not None and result.ratio <= result.target_ratio
        encoded = _num(result.get("rows_encoded"))
        read = _num(result.get("rows_read"))
        if encoded is None and read is not None and result.expected_encoded is not None \
                and read <= result.expected_encoded:
            encoded = read  # a summary without rows_encoded: a run encodes no more than it reads
        result.checks["encode"] = (None if encoded is None or result.expected_encoded is None
                                   else encoded <= result.expected_encoded)
        if result.peak_rss_mb is not None and full.peak_rss_mb is not None:
            result.checks["rss"] = result.peak_rss_mb <= full.peak_rss_mb
        else:
            result.checks["rss"] = None


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return platform.processor() or "unknown"


def run_nights(work: Path, rows: int, files: int, model: str, max_length: int,
               index_type: str | None, seed: int = 0, cache_dir: Path | None = None,
               log=print, threads: int | None = None,
               precision: str = "float32") -> dict[str, Any]:
    """The whole benchmark on `rows` rows under `work` (emptied first). Returns the report."""
    phases: dict[str, float] = {}
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    t = time.perf_counter()
    model_info: dict[str, Any] = {"name": model, "max_length": max_length, "stand_in": False}
    if model in TINY_SIZES:
        model_info.update(build_tiny_model(work / "model", model), stand_in=True,
                          tokenizer="all-MiniLM-L6-v2 WordPiece (uncased, 30,522)")
        model_path = str(work / "model")
    else:
        model_path = model
    phases["model"] = time.perf_counter() - t

    t = time.perf_counter()
    pool, source_counts = sentence_pool(cache_dir)
    maker = TextMaker(pool, seed)
    corpus = base_corpus(maker, rows)
    input_dir = work / "input"
    write_layout(corpus, input_dir, files)
    phases["corpus"] = time.perf_counter() - t
    log(f"corpus: {rows:,} rows in {files} files from {len(pool):,} unique sentences "
        f"({', '.join(f'{k} {v:,}' for k, v in source_counts.items())}), "
        f"{phases['corpus']:.1f} s")

    maintained, fresh = work / "out" / "maintained", work / "out" / "fresh"
    job = write_job(work / "job.toml", input_dir, maintained, model_path, max_length, index_type,
                    precision)
    results: list[RunResult] = []

    def do_run(label: str, job_file: Path, expected: int | None, mode: str = "incremental"):
        r = run_embedpipe(job_file, label, mode, threads)
        r.expected_encoded = expected
        results.append(r)
        phases[label] = r.seconds
        total = r.summary.get("seconds", {}).get("total")
        log(f"{label}: {r.seconds:.1f} s (summary total {total} s), "
            f"peak RSS {r.peak_rss_mb or 0:.0f} MB, "
            f"rows read {r.get('rows_read')}, vectors written {r.get('vectors_written')}, "
            f"load average {r.load_before:.1f} -> {r.load_after:.1f}, CPU {r.cpu_seconds} s, "
            f"involuntary context switches {r.involuntary_switches}")
        return r

    full = do_run("full run", job, rows)

    # night a: 1% of rows changed, their files rewritten under the same names
    changed = change_rows(corpus, maker, CHANGED_SHARE)
    touched = {int(np.searchsorted([i * rows // files for i in range(1, files)], p, "right"))
               for p in changed}
    write_layout(corpus, input_dir, files, only=touched)
    do_run("night a", job, len(changed))
    night_a = {"changed": len(changed), "files_rewritten": len(touched)}

    # night b: a full re-export into a new layout (other names, another file count)
    corpus, night_b = night_b_corpus(corpus, maker)
    shutil.rmtree(input_dir)
    files_b = files + max(1, files // 4)
    write_layout(corpus, input_dir, files_b, "export-2/batch-{i:04d}-of-{n:04d}.parquet")
    night_b["files"] = files_b
    do_run("night b", job, night_b["changed"] + night_b["added"])

    do_run("night c", job, 0)  # nothing changed

    fresh_job = write_job(work / "fresh.toml", input_dir, fresh, model_path, max_length,
                          index_type, precision)
    do_run("fresh", fresh_job, None)
    for r in results[1:]:
        judge(r, full)

    t = time.perf_counter()
    checks = compare_folders(maintained, fresh, index_type=index_type, seed=seed,
                             precision=precision)
    phases["checks"] = time.perf_counter() - t
    return {"rows": rows, "files": files, "input_rows_final": corpus.rows,
            "duplicate_share": DUPLICATE_SHARE, "unique_sentences": len(pool),
            "sentence_sources": source_counts, "model": model_info, "index_type": index_type,
            "precision": precision,
            "cpu": cpu_name(), "cores": os.cpu_count(), "threads": threads, "sequential": True,
            "night_a": night_a, "night_b": night_b,
            "runs": [asdict(r) for r in results], "checks": checks,
            "phases_seconds": {k: round(v, 2) for k, v in phases.items()}}


def run_scale(work: Path, sizes: list[int], files_per_million: int = 20, seed: int = 0,
              cache_dir: Path | None = None, log=print) -> dict[str, Any]:
    """Full runs at each size (the tiniest model, no index): peak RSS should not grow with rows."""
    work.mkdir(parents=True, exist_ok=True)
    model_info = build_tiny_model(work / "model", "tiniest")
    pool, _ = sentence_pool(cache_dir)
    out: dict[str, Any] = {"model": {"size": "tiniest", **model_info, "max_length": 32},
                           "index": "disabled", "runs": []}
    for rows in sizes:
        maker = TextMaker(pool, seed, unique=False)  # 5M texts: distinctness is not the point
        input_dir = work / f"input-{rows}"
        if input_dir.exists():
            shutil.rmtree(input_dir)
        files = max(1, rows * files_per_million // 1_000_000)
        per = rows // files
        for i in range(files):  # a file at a time: the bench's own memory stays small
            n = per if i < files - 1 else rows - per * (files - 1)
            part = Corpus(np.arange(i * per, i * per + n, dtype=np.int64), maker.make(n))
            write_layout(part, input_dir, 1, f"part-{i:05d}.parquet")
        job = write_job(work / f"scale-{rows}.toml", input_dir, work / f"out-{rows}",
                        str(work / "model"), 32, None)
        r = run_embedpipe(job, f"scale {rows:,}", mode="overwrite")
        log(f"scale {rows:,} rows: {r.seconds:.1f} s, peak RSS {r.peak_rss_mb or 0:.0f} MB")
        out["runs"].append({"rows": rows, "seconds": r.seconds, "peak_rss_mb": r.peak_rss_mb})
        shutil.rmtree(input_dir)
        shutil.rmtree(work / f"out-{rows}", ignore_errors=True)
    rss = [r["peak_rss_mb"] for r in out["runs"]]
    if len(rss) >= 2 and all(rss):
        out["rss_ratio"] = rss[-1] / rss[0]
        out["pass"] = out["rss_ratio"] <= SCALE_RSS_TARGET
    return out
