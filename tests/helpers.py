"""Helpers the tests share: build jobs, run them, read what they wrote."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.config import config_from_dict
from pipeline.runner import RunOptions, run_job


def write_shards(folder: Path, tables: list[pa.Table], names: list[str] | None = None) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, table in enumerate(tables):
        path = folder / (names[i] if names else f"part-{i:05d}.parquet")
        pq.write_table(table, path)
        paths.append(path)
    return paths


def make_job(input_path, output_path, model=None, **sections) -> dict:
    """A job dict; sections override keys, e.g. encode={"pooling": "cls"}."""
    raw = {"name": "test", "input": {"path": str(input_path)},
           "model": {"name": str(model) if model else "all-MiniLM-L6-v2"},
           "output": {"path": str(output_path)}}
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    return raw


def run(raw: dict, **options):
    return run_job(config_from_dict(raw), RunOptions(progress=False, **options))


def read_vectors(out: Path) -> pa.Table:
    """Every stored vector row, in the manifest's unit order."""
    from pipeline.ledger import Ledger
    from pipeline.storage import Store

    files = Ledger(Store(str(out))).files("vectors")
    return pa.concat_tables([pq.read_table(out / f) for f in files]) if files else None


def matrix(table: pa.Table) -> np.ndarray:
    from pipeline.indexing import to_matrix
    return to_matrix(table.column("vector"))


def embedpipe(*args, env=None, **kwargs) -> subprocess.CompletedProcess:
    """Run the real CLI in a subprocess."""
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *map(str, args)],
                          capture_output=True, text=True, env={**os.environ, **(env or {})}, **kwargs)


def copy_tree(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst
