"""Crash safety, resume, incremental runs, the config guard and the one-writer lock.

Crashes are real: the run is a subprocess that pauses at a named point (pipeline/faults.py)
and receives SIGKILL there; the rerun must produce what an uninterrupted run produces.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from helpers import embedpipe, index_paths, matrix, read_vectors, run_and_kill, small_job, write_shards



def shard(texts: list[str], first_id: int) -> pa.Table:
    return pa.table({"id": pa.array(range(first_id, first_id + len(texts)), pa.int64()),
                     "text": texts})


def make_corpus(folder: Path, movie_table):
    texts = movie_table.column("text").to_pylist()
    write_shards(folder, [shard(texts[i * 120:(i + 1) * 120], i * 1000) for i in range(3)])
    return folder, texts


@pytest.fixture(scope="module")
def shared_corpus(tmp_path_factory, movie_table):
    """Read-only input for the crash tests."""
    return make_corpus(tmp_path_factory.mktemp("input"), movie_table)


@pytest.fixture
def corpus(tmp_path, movie_table):
    """Input a test may change."""
    return make_corpus(tmp_path / "input", movie_table)


def job_file(tmp_path: Path, folder: Path, out: Path, model: Path, name="job.toml") -> Path:
    return small_job(tmp_path / name, folder, out, model)


def result_of(out: Path):
    table = read_vectors(out)
    return table.column("id").to_pylist(), matrix(table)


def assert_consistent(out: Path) -> None:
    """No temporaries or orphans, no duplicate ids, index and id map match the vectors."""
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name]
    manifest = json.loads((out / "manifest.json").read_text())
    named = {f for u in manifest["units"].values() for f in u.get("vectors", []) + u.get("rejects_files", [])}
    on_disk = {str(p.relative_to(out)) for d in ("vectors", "rejects") for p in (out / d).glob("*")}
    assert on_disk == named
    ids, vectors = result_of(out)
    assert len(ids) == len(set(ids))
    index = faiss.read_index(str(index_paths(out)[0]))
    assert index.ntotal == len(ids)
    id_map = pq.read_table(index_paths(out)[1])
    labels = id_map.column("faiss_id").to_pylist()  # each row's label, in row order
    np.testing.assert_array_equal(np.stack([index.reconstruct(label) for label in labels]),
                                  vectors)
    assert id_map.column("id").to_pylist() == ids
    assert manifest["complete"] is True


@pytest.fixture(scope="module")
def clean_result(tmp_path_factory, shared_corpus, tiny_model):
    folder, _ = shared_corpus
    tmp = tmp_path_factory.mktemp("clean")
    out = tmp / "out"
    assert embedpipe("run", job_file(tmp, folder, out, tiny_model)).returncode == 0
    return result_of(out)


@pytest.mark.parametrize("point", ["encode:3", "write:2", "unit:1", "unit:2", "index"])
def test_kill_minus_nine_then_rerun_equals_a_clean_run(tmp_path, shared_corpus, tiny_model,
                                                       clean_result, point):
    folder, _ = shared_corpus
    out = tmp_path / "crashed"
    job = job_file(tmp_path, folder, out, tiny_model)
    run_and_kill(job, point, tmp_path)
    if point.startswith("write"):
        assert [p for p in (out / "vectors").iterdir() if ".tmp-" in p.name]  # caught mid-write
    rerun = embedpipe("run", job, "--json")
    assert rerun.returncode == 0, rerun.stderr
    summary = json.loads(rerun.stdout)
    assert summary["lock_taken_over"]["pid"] > 0  # the killed run's lock
    ids, vectors = result_of(out)
    clean_ids, clean_vectors = clean_result
    assert ids == clean_ids
    np.testing.assert_array_equal(vectors, clean_vectors)  # bit for bit
    assert_consistent(out)
    if point.startswith("unit"):
        assert summary["units_skipped"] == int(point.split(":")[1])


def test_incremental_add_change_remove_equals_fresh_run(tmp_path, corpus, tiny_model):
    folder, texts = corpus
    out = tmp_path / "nightly"
    job = job_file(tmp_path, folder, out, tiny_model)

    def rerun_and_compare(expect: dict) -> dict:
        result = embedpipe("run", job, "--json")
        assert result.returncode == 0, result.stderr
        summary = json.loads(result.stdout)
        for key, value in expect.items():
            assert summary[key] == value, (key, summary[key])
        fresh = tmp_path / f"fresh-{len(os.listdir(tmp_path))}"
        fresh_job = job_file(tmp_path, folder, fresh, tiny_model, fresh.name + ".toml")
        assert embedpipe("run", fresh_job).returncode == 0
        ids, vectors = result_of(out)
        fresh_ids, fresh_vectors = result_of(fresh)
        assert ids == fresh_ids
        np.testing.assert_array_equal(vectors, fresh_vectors)
        assert_consistent(out)
        return summary

    rerun_and_compare({"units_done": 3})
    write_shards(folder, [shard(texts[500:560], 5000)], ["part-00003.parquet"])  # a new file
    rerun_and_compare({"units_done": 1, "units_skipped": 3, "rows_read": 60})
    time.sleep(0.01)
    write_shards(folder, [shard(texts[600:650], 1000)], ["part-00001.parquet"])  # changed
    summary = rerun_and_compare({"units_done": 1, "units_changed": 1, "units_skipped": 3})
    assert summary["folder_vectors"] == 120 + 50 + 120 + 60
    (folder / "part-00000.parquet").unlink()  # removed
    summary = rerun_and_compare({"units_done": 0, "units_removed": 1, "units_skipped": 3})
    assert summary["folder_vectors"] == 50 + 120 + 60


def test_keep_removed_keeps_vectors_of_a_vanished_file(tmp_path, corpus, tiny_model):
    folder, _ = corpus
    out = tmp_path / "out"
    job = job_file(tmp_path, folder, out, tiny_model)
    assert embedpipe("run", job).returncode == 0
    (folder / "part-00002.parquet").unlink()
    result = embedpipe("run", job, "--keep-removed")
    assert result.returncode == 0
    assert "gone from input but kept" in result.stdout
    assert len(result_of(out)[0]) == 360
    result = embedpipe("run", job)
    assert "1 removed" in result.stdout and len(result_of(out)[0]) == 240


def test_config_change_refused_overwrite_accepted(tmp_path, corpus, tiny_model):
    folder, _ = corpus
    out = tmp_path / "out"
    job = job_file(tmp_path, folder, out, tiny_model)
    assert embedpipe("run", job).returncode == 0
    refused = embedpipe("run", job, "--set", "encode.pooling=cls", "--set", "encode.normalize=true")
    assert refused.returncode == 2
    assert "encode.pooling" in refused.stderr and "encode.normalize" in refused.stderr
    assert "--mode overwrite" in refused.stderr
    # Settings that do not change vectors are not guarded.
    assert embedpipe("run", job, "--set", "encode.batch_tokens=256").returncode == 0
    accepted = embedpipe("run", job, "--set", "encode.pooling=cls", "--mode", "overwrite", "--json")
    assert accepted.returncode == 0 and json.loads(accepted.stdout)["units_done"] == 3
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["vector_settings"]["encode.pooling"] == "cls"


def test_concurrent_run_refused_and_stale_lock_taken_over(tmp_path, corpus, tiny_model):
    folder, _ = corpus
    out = tmp_path / "out"
    job = job_file(tmp_path, folder, out, tiny_model)
    pause_file = tmp_path / "paused"
    env = {**os.environ, "EMBEDPIPE_PAUSE_AT": "encode", "EMBEDPIPE_PAUSE_FILE": str(pause_file)}
    holder = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "run", str(job)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while not pause_file.exists():
            assert holder.poll() is None
            time.sleep(0.05)
        refused = embedpipe("run", job)
        assert refused.returncode == 2
        assert f"pid {holder.pid}" in refused.stderr and "in use" in refused.stderr
    finally:
        holder.kill()
        holder.wait()
    # A lock left by a process that no longer exists is taken over, and the summary says so.
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    (out / ".lock").write_text(json.dumps({"host": socket.gethostname(), "pid": int(dead)}))
    result = embedpipe("run", job)
    assert result.returncode == 0, result.stderr
    assert f"took over a stale lock of pid {dead}" in result.stdout
    assert not (out / ".lock").exists()


def test_large_file_split_into_row_group_units_equals_whole_file(tmp_path, movie_table, tiny_model):
    from pipeline.config import InputConfig
    from pipeline.io.reader import plan_units

    folder = tmp_path / "input"
    folder.mkdir()
    table = shard(movie_table.column("text").to_pylist()[:150], 0)
    pq.write_table(table, folder / "big.parquet", row_group_size=30)  # 5 row groups
    units = plan_units(InputConfig(path=str(folder), unit_rows=70))
    assert [(u.key.rsplit("#", 1)[1], u.first_row, u.num_rows) for u in units] == [
        ("rg0-1", 0, 60), ("rg2-3", 60, 60), ("rg4-4", 120, 30)]
    split_job = small_job(tmp_path / "split.toml", folder, tmp_path / "split", tiny_model,
                          input={"unit_rows": 70})
    whole_job = job_file(tmp_path, folder, tmp_path / "whole", tiny_model, "whole.toml")
    split = embedpipe("run", split_job, "--json")
    assert split.returncode == 0, split.stderr
    assert json.loads(split.stdout)["units_done"] == 3
    assert embedpipe("run", whole_job).returncode == 0
    ids, vectors = result_of(tmp_path / "split")
    whole_ids, whole_vectors = result_of(tmp_path / "whole")
    assert ids == whole_ids == list(range(150))
    np.testing.assert_allclose(vectors, whole_vectors, atol=1e-6)
