"""Scale-out on real parts: a local Ray instance, and an S3-compatible server (moto) on 127.0.0.1.

Run alone with `pytest -m ray` or `pytest -m s3`.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pytest

from helpers import embedpipe, index_paths, matrix, read_vectors, small_job, write_shards



@pytest.fixture(scope="module")
def shards(tmp_path_factory, movie_table):
    folder = tmp_path_factory.mktemp("scale_input")
    texts = movie_table.column("text").to_pylist()
    write_shards(folder, [pa.table({"id": pa.array(range(i * 100, i * 100 + 90), pa.int64()),
                                    "text": texts[i * 90:(i + 1) * 90]}) for i in range(4)])
    return folder


@pytest.fixture(scope="module")
def local_result(tmp_path_factory, shards, tiny_model):
    tmp = tmp_path_factory.mktemp("local")
    job = small_job(tmp / "job.toml", shards, tmp / "out", tiny_model)
    result = embedpipe("run", job)
    assert result.returncode == 0, result.stderr
    table = read_vectors(tmp / "out")
    return table.column("id").to_pylist(), matrix(table)


def wait_for(path, proc, seconds=300):
    deadline = time.time() + seconds
    while not path.exists():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.time() < deadline, f"timed out waiting for {path}"
        time.sleep(0.1)
    time.sleep(0.2)  # let the writer finish the pid
    return int(path.read_text())


@pytest.mark.ray
def test_ray_equals_local_even_when_a_worker_is_killed(tmp_path, shards, tiny_model, local_result):
    out = tmp_path / "out"
    job = small_job(tmp_path / "job.toml", shards, out, tiny_model)
    pause = tmp_path / "paused"
    env = {**os.environ, "EMBEDPIPE_PAUSE_AT": "encode:2", "EMBEDPIPE_PAUSE_FILE": str(pause),
           "RAY_AUTH_MODE": "disabled"}
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "run", str(job), "--runner", "ray",
                             "--workers", "2", "--json"], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    worker_pid = wait_for(pause, proc)
    assert worker_pid != proc.pid  # a Ray worker process, not the driver
    os.kill(worker_pid, signal.SIGKILL)
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr[-3000:]
    summary = json.loads(stdout)
    assert summary["units_done"] == 4 and summary["vectors_written"] == 360
    ids, vectors = read_vectors(out).column("id").to_pylist(), matrix(read_vectors(out))
    local_ids, local_vectors = local_result
    assert ids == local_ids
    assert np.abs(vectors - local_vectors).max() <= 1e-6
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name]
    manifest = json.loads((out / "manifest.json").read_text())
    named = {f for u in manifest["units"].values() for f in u["vectors"]}
    assert {f"vectors/{p.name}" for p in (out / "vectors").iterdir()} == named


@pytest.mark.s3
def test_s3_in_and_out_with_resume_after_kill(tmp_path, s3, shards, tiny_model, local_result):
    fs, bucket = s3
    for path in sorted(shards.iterdir()):
        fs.put_file(str(path), f"{bucket}/shards/{path.name}")
    out = f"s3://{bucket}/vectors-out"
    job = small_job(tmp_path / "job.toml", f"s3://{bucket}/shards", out, tiny_model)
    pause = tmp_path / "paused"
    env = {**os.environ, "EMBEDPIPE_PAUSE_AT": "write:3", "EMBEDPIPE_PAUSE_FILE": str(pause)}
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "run", str(job)], env=env,
                            text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    wait_for(pause, proc)
    proc.kill()
    proc.wait()
    result = embedpipe("run", job, "--json")
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout)
    assert summary["units_skipped"] >= 1 and summary["lock_taken_over"] is not None
    fs.invalidate_cache()
    local = tmp_path / "copy"
    fs.get(f"{bucket}/vectors-out", str(local), recursive=True)
    ids, vectors = read_vectors(local).column("id").to_pylist(), matrix(read_vectors(local))
    local_ids, local_vectors = local_result
    assert ids == local_ids
    np.testing.assert_array_equal(vectors, local_vectors)
    manifest = json.loads((local / "manifest.json").read_text())
    named = {f for u in manifest["units"].values() for f in u["vectors"]}
    assert {f"vectors/{p.name}" for p in (local / "vectors").iterdir()} == named
    assert index_paths(local)[0].exists() and manifest["complete"] is True


@pytest.mark.s3
def test_s3_manifest_writes_are_conditional(s3):
    from pipeline.io.ledger import Ledger
    from pipeline.io.storage import ConcurrentWrite, Store

    fs, bucket = s3
    store = Store(f"s3://{bucket}/out")
    first = Ledger(store)
    first.update(job="a")
    second = Ledger(store)  # reads the manifest first wrote
    second.update(job="b")
    with pytest.raises(ConcurrentWrite):
        first.update(job="stale")  # first's view is out of date: refused, not overwritten
    assert Ledger(store).manifest.job == "b"


def test_local_runner_never_imports_ray(tmp_path, shards, tiny_model):
    job = small_job(tmp_path / "job.toml", shards, tmp_path / "out", tiny_model)
    code = ("import sys; from pipeline.config import load_job; from pipeline.jobs.runner import "
            f"RunOptions, run_job; run_job(load_job({str(job)!r}), RunOptions(progress=False)); "
            "print('ray' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "False"


CHUNKED = {"model": {"max_length": 24}, "encode": {"long_text": "chunk", "chunk_overlap": 4}}


@pytest.fixture(scope="module")
def chunked_local(tmp_path_factory, shards, tiny_model):
    """Local runs with texts past 24 tokens cut into windows: one row a window, and pooled."""
    results = {}
    for chunks in ("rows", "pool"):
        tmp = tmp_path_factory.mktemp(f"chunked-{chunks}")
        job = small_job(tmp / "job.toml", shards, tmp / "out", tiny_model,
                        **CHUNKED, output={"chunks": chunks})
        assert embedpipe("run", job).returncode == 0
        results[chunks] = read_vectors(tmp / "out")
    assert results["rows"].num_rows > results["pool"].num_rows == 360
    return results


@pytest.mark.ray
def test_ray_writes_window_rows_as_the_local_runner_does(tmp_path, shards, tiny_model,
                                                         chunked_local):
    job = small_job(tmp_path / "job.toml", shards, tmp_path / "out", tiny_model, **CHUNKED,
                    output={"chunks": "rows"})
    result = embedpipe("run", job, "--runner", "ray", "--workers", "2", "--json",
                       env={"RAY_AUTH_MODE": "disabled"})
    assert result.returncode == 0, result.stderr[-3000:]
    got, local = read_vectors(tmp_path / "out"), chunked_local["rows"]
    assert got.drop_columns(["vector"]).equals(local.drop_columns(["vector"]))
    assert np.abs(matrix(got) - matrix(local)).max() <= 1e-6


@pytest.mark.s3
def test_s3_output_of_pooled_windows_equals_local(tmp_path, s3, shards, tiny_model, chunked_local):
    fs, bucket = s3
    out = f"s3://{bucket}/pooled"
    job = small_job(tmp_path / "job.toml", shards, out, tiny_model, **CHUNKED,
                    output={"chunks": "pool"})
    result = embedpipe("run", job)
    assert result.returncode == 0, result.stderr[-3000:]
    fs.invalidate_cache()
    fs.get(f"{bucket}/pooled", str(tmp_path / "copy"), recursive=True)
    got, local = read_vectors(tmp_path / "copy"), chunked_local["pool"]
    assert got.drop_columns(["vector"]).equals(local.drop_columns(["vector"]))
    np.testing.assert_array_equal(matrix(got), matrix(local))
    assert embedpipe("verify", out).returncode == 0


@pytest.mark.ray
def test_ray_reuses_stored_rows_as_the_local_runner_does(tmp_path, shards, tiny_model,
                                                         local_result):
    """A re-export under new names with one changed row, embedded on Ray actors: the stored
    rows travel to the actors once (object store), only the changed row is encoded, and the
    folder equals the local runner's."""
    import shutil

    import pyarrow.parquet as pq

    out = tmp_path / "out"
    job = small_job(tmp_path / "job.toml", tmp_path / "in", out, tiny_model)
    shutil.copytree(shards, tmp_path / "in")
    assert embedpipe("run", job).returncode == 0
    for path in sorted((tmp_path / "in").iterdir()):
        path.rename(path.with_name("export-" + path.name))
    changed = sorted((tmp_path / "in").iterdir())[2]
    data = pq.read_table(changed).to_pydict()
    data["text"][0] = texts_changed = "a changed row, the only one tonight"
    pq.write_table(pa.table(data), changed)
    done = embedpipe("run", job, "--runner", "ray", "--workers", "2", "--json",
                     env={"RAY_AUTH_MODE": "disabled"})
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout)
    assert (summary["rows_encoded"], summary["rows_reused"]) == (1, 359)
    table = read_vectors(out)
    ids, vectors = local_result
    assert table.column("id").to_pylist() == ids
    row = ids.index(200)  # the changed row (first of the third file)
    keep = np.arange(len(ids)) != row
    assert np.abs(matrix(table)[keep] - vectors[keep]).max() < 1e-5
    assert texts_changed and np.abs(matrix(table)[row] - vectors[row]).max() > 1e-3


@pytest.mark.s3
def test_s3_output_reuses_stored_rows(tmp_path, s3, shards, tiny_model, local_result):
    """An output folder on S3: a renamed input reuses every stored row (read back from the
    object store row group by row group) and the folder equals the local runner's."""
    import shutil

    fs, bucket = s3
    out = f"s3://{bucket}/nightly"
    shutil.copytree(shards, tmp_path / "in")
    job = small_job(tmp_path / "job.toml", tmp_path / "in", out, tiny_model)
    assert embedpipe("run", job).returncode == 0
    for path in sorted((tmp_path / "in").iterdir()):
        path.rename(path.with_name("export-" + path.name))
    done = embedpipe("run", job, "--json")
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout)
    assert (summary["rows_encoded"], summary["rows_reused"]) == (0, 360)
    fs.invalidate_cache()
    fs.get(f"{bucket}/nightly", str(tmp_path / "copy"), recursive=True)
    table = read_vectors(tmp_path / "copy")
    ids, vectors = local_result
    assert table.column("id").to_pylist() == ids
    assert np.abs(matrix(table) - vectors).max() < 1e-5
    assert not json.loads((tmp_path / "copy" / "manifest.json").read_text())["retired"]
    assert embedpipe("verify", out).returncode == 0
