"""Helpers the tests share: build jobs, run them, read what they wrote."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.config import config_from_dict
from pipeline.jobs.runner import RunOptions, run_job


def write_shards(folder: Path, tables: list[pa.Table], names: list[str] | None = None) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, table in enumerate(tables):
        path = folder / (names[i] if names else f"part-{i:05d}.parquet")
        pq.write_table(table, path)
        paths.append(path)
    return paths


def film_texts(n: int, offset: int = 0) -> list[str]:
    """n short random texts of film words, the same for the same offset."""
    words = "the a film story cast warm funny slow plot music ending scene actor great".split()
    rng = np.random.default_rng(offset)
    return [" ".join(rng.choice(words, int(rng.integers(3, 30)))) for _ in range(n)]


def three_shards(folder: Path) -> Path:
    """Three shards of 20 film texts, ids 0..59."""
    write_shards(folder, [pa.table({"id": np.arange(i * 20, i * 20 + 20),
                                    "text": film_texts(20, i)}) for i in range(3)])
    return folder


def make_job(input_path, output_path, model_name=None, **sections) -> dict:
    """A job dict; sections override keys, e.g. encode={"pooling": "cls"}."""
    raw = {"name": "test", "input": {"path": str(input_path)},
           "model": {"name": str(model_name) if model_name else "all-MiniLM-L6-v2"},
           "output": {"path": str(output_path)}}
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    return raw


# Small batches and parts, so that a few hundred rows make several windows, batches and parts.
SMALL = {"model": {"max_length": 64},
         "encode": {"sort_window": 40, "batch_tokens": 512, "max_batch_size": 16},
         "output": {"rows_per_file": 50}}


def to_toml(raw: dict) -> str:
    """A job dict as TOML (the value types a job uses: str, int, bool, lists)."""
    def value(v):
        return json.dumps(v) if not isinstance(v, bool) else str(v).lower()
    lines = [f"{k} = {value(v)}" for k, v in raw.items() if not isinstance(v, dict)]
    for section, values in raw.items():
        if isinstance(values, dict):
            lines += [f"[{section}]"] + [f"{k} = {value(v)}" for k, v in values.items()]
    return "\n".join(lines) + "\n"


def write_job(path: Path, input_path, output_path, model_name=None, **sections) -> Path:
    """A job file at path; sections override keys as in make_job."""
    path.write_text(to_toml(make_job(input_path, output_path, model_name, **sections)))
    return path


def small_job(path: Path, input_path, output_path, model_name, **sections) -> Path:
    merged = {k: {**SMALL.get(k, {}), **sections.get(k, {})} for k in {*SMALL, *sections}}
    return write_job(path, input_path, output_path, model_name, **merged)


def run(raw: dict, **options):
    return run_job(config_from_dict(raw), RunOptions(progress=False, **options))


def read_vectors(out: Path) -> pa.Table:
    """Every stored vector row, in the manifest's unit order."""
    from pipeline.io.ledger import Ledger
    from pipeline.io.storage import Store

    files = Ledger(Store(str(out))).vector_files()
    return pa.concat_tables([pq.read_table(out / f) for f in files]) if files else None


def matrix(table: pa.Table) -> np.ndarray:
    from pipeline.io.vectors import to_matrix
    return to_matrix(table.column("vector"))


def embedpipe(*args, env=None, **kwargs) -> subprocess.CompletedProcess:
    """Run the real CLI in a subprocess."""
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *map(str, args)],
                          capture_output=True, text=True, env={**os.environ, **(env or {})}, **kwargs)


def run_and_kill(job: Path, point: str, tmp_path: Path, env: dict | None = None) -> None:
    """Run the real CLI on a job until it pauses at a named point (faults.py), then SIGKILL it."""
    import signal
    import time

    pause_file = tmp_path / f"paused-{point.replace(':', '-')}"
    env = {**os.environ, **(env or {}), "EMBEDPIPE_PAUSE_AT": point,
           "EMBEDPIPE_PAUSE_FILE": str(pause_file)}
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "run", str(job)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not pause_file.exists():
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.time() < deadline, "the run never reached " + point
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL


def copy_tree(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def runtime_for(source, device="cpu", dtype="float32", attention="auto", compile=False,
                max_length=None, forward="auto", cpu=None):
    """The runtime a job with these model settings resolves to on this machine (or planned for
    `cpu`, a hardware.Cpu made by hand)."""
    from pipeline.config import ModelConfig
    from pipeline.runtime.runtime import resolve_runtime

    return resolve_runtime(ModelConfig(name=str(source.path), device=device, dtype=dtype,
                                       attention=attention, compile=compile,
                                       max_length=max_length, forward=forward), source, cpu=cpu)


def encoder_for(source, device, dtype, settings, compile=False, attention="auto", forward="auto"):
    from pipeline.encode.encoder import Encoder

    return Encoder(source, runtime_for(source, device, dtype, attention, compile,
                                       forward=forward), settings)


def index_paths(out: Path) -> tuple[Path, Path]:
    """(index file, id map) the folder's index_infos.json names (each build writes new ones)."""
    infos = json.loads((Path(out) / "index" / "index_infos.json").read_text())
    return (Path(out) / infos.get("index_file", "index/index.faiss"),
            Path(out) / infos.get("ids_file", "index/ids.parquet"))
