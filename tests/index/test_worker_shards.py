"""Index shards written by Ray actors (index/shard_build.py, jobs/ray_index.py), against the
driver's own build with the same trained quantizer: the same shard files byte for byte, the same
inverted lists, the same search answers; a worker killed mid-shard; a night that rewrites only
the shards whose parts changed; verify on the result; flat / HNSW refused on the ray runner.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import faiss
import numpy as np
import pyarrow as pa
import pytest

from helpers import embedpipe, matrix, read_vectors, small_job, write_shards
from pipeline.config import ConfigError, IndexConfig
from pipeline.index.build import load_index
from pipeline.index.family import ivf_of
from pipeline.index.files import INFOS_FILE
from pipeline.index.layouts import shard_groups, write_shard
from pipeline.index.shard_build import refuse_one_process_index
from pipeline.io.ledger import Ledger
from pipeline.io.precision import Precision
from pipeline.io.storage import Store

pytestmark = pytest.mark.slow  # real CLI runs, several with a Ray instance (~1 min each)

INDEX = {"type": "ivf-flat", "nlist": 8, "nprobe": 3, "layout": "shards", "shard_rows": 120}
FILES = 5
ROWS = 96  # a file: two parts of 50 and 46 rows (rows_per_file 50); 2 files a shard


def texts(movie_table, night: int = 0) -> list[list[str]]:
    rows = movie_table.column("text").to_pylist()
    out = [rows[i * ROWS:(i + 1) * ROWS] for i in range(FILES)]
    if night:  # the third file's texts changed
        out[2] = [t + " (revised)" for t in out[2]]
    return out


def write_input(folder, movie_table, night: int = 0):
    write_shards(folder, [pa.table({"id": pa.array(range(i * 1000, i * 1000 + ROWS), pa.int64()),
                                    "text": t}) for i, t in enumerate(texts(movie_table, night))])
    return folder


def infos_of(out) -> dict:
    return json.loads((out / INFOS_FILE).read_text())


def ray_run(job, env=None, pause=None):
    """The CLI on the ray runner with two workers; (process, json summary)."""
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", **(env or {})}
    # a Ray instance of the test's own, never a cluster something else started on this machine
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "run", str(job), "--runner",
                             "ray", "--ray-address", "local", "--workers", "2", "--json"],
                            env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    if pause is not None:
        deadline = time.time() + 300
        while not pause.exists():
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.time() < deadline, "no shard worker paused"
            time.sleep(0.1)
        time.sleep(0.2)
        worker = int(pause.read_text())
        assert worker != proc.pid  # a Ray worker, not the driver
        os.kill(worker, signal.SIGKILL)
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr[-3000:]
    return proc, json.loads(stdout)


def driver_shards(out, tmp_path) -> tuple[list[dict], dict[str, bytes]]:
    """The shards layouts.write_shard writes in this process from the folder's parts and the
    trained index the workers' shards share: the reference the workers must equal."""
    infos = infos_of(out)
    store = Store(str(out))
    parts = Ledger(store).vector_parts()
    trained = np.frombuffer((out / infos["index_file"]).read_bytes(), np.uint8)
    scratch = tmp_path / "driver"
    (scratch / "index").mkdir(parents=True)
    shards, first_row = [], 0
    for number, group in enumerate(shard_groups(parts.rows(), infos["shard_rows"])):
        rel = f"index/shard-driver-{number:05d}.faiss"
        rows = write_shard(Store(str(scratch)), trained, parts.subset(group), rel)
        shards.append({"file": rel, "rows": rows, "first_row": first_row})
        first_row += rows
    return shards, {s["file"]: (scratch / s["file"]).read_bytes() for s in shards}


def queries(out) -> np.ndarray:
    vectors = matrix(read_vectors(out))
    rng = np.random.default_rng(5)
    mixed = vectors[rng.choice(len(vectors), 60)] + vectors[rng.choice(len(vectors), 60)]
    return np.ascontiguousarray(np.vstack([vectors[::7], mixed]), np.float32)


def single_index_hits(out, q: np.ndarray, k: int = 10):
    """Every stored vector added under its label to the folder's trained index, in one process:
    what a search must return with the same quantizer and nprobe."""
    infos = infos_of(out)
    parts = Ledger(Store(str(out))).vector_parts()
    index = faiss.deserialize_index(np.frombuffer((out / infos["index_file"]).read_bytes(),
                                                  np.uint8))
    labels, row = parts.row_labels(), 0
    for block in parts.vectors():
        index.add_with_ids(block, labels[row:row + len(block)])
        row += len(block)
    ivf_of(index).nprobe = INDEX["nprobe"]
    return index.search(q, k)


@pytest.fixture(scope="module")
def ray_folder(tmp_path_factory, movie_table, tiny_model):
    tmp = tmp_path_factory.mktemp("worker_shards")
    job = small_job(tmp / "job.toml", write_input(tmp / "in", movie_table), tmp / "out",
                    tiny_model, index=INDEX)
    proc, summary = ray_run(job)
    return tmp / "out", proc.pid, summary


@pytest.mark.ray
def test_worker_built_shards_equal_the_driver_build(ray_folder, tmp_path, tiny_model,
                                                    movie_table):
    out, driver_pid, summary = ray_folder
    assert summary["vectors_written"] == FILES * ROWS and not summary["failures"]
    infos = infos_of(out)
    assert infos["layout"] == "shards" and len(infos["shards"]) == 5
    pids = {s["pid"] for s in infos["shards"]}
    assert len(pids) >= 2 and driver_pid not in pids  # two worker processes wrote them
    reference, files = driver_shards(out, tmp_path)
    assert [(s["rows"], s["first_row"]) for s in infos["shards"]] == \
        [(s["rows"], s["first_row"]) for s in reference]
    for mine, theirs in zip(infos["shards"], reference):
        assert (out / mine["file"]).read_bytes() == files[theirs["file"]]  # ids and lists too
    q = queries(out)
    index, _ = load_index(Store(str(out)))
    got_d, got_i = index.search(q, 10)
    want_d, want_i = single_index_hits(out, q)
    assert np.array_equal(got_i, want_i)
    assert np.allclose(got_d, want_d, atol=1e-5)

    # the local runner on the same input: the same ids, the same search answers
    local = tmp_path / "local"
    job = small_job(tmp_path / "job.toml", out.parent / "in", local, tiny_model, index=INDEX)
    assert embedpipe("run", job).returncode == 0
    assert read_vectors(local).column("id").equals(read_vectors(out).column("id"))
    assert np.abs(matrix(read_vectors(local)) - matrix(read_vectors(out))).max() <= 1e-6
    assert (local / infos_of(local)["index_file"]).read_bytes() == \
        (out / infos["index_file"]).read_bytes()  # the same trained quantizer
    local_index, _ = load_index(Store(str(local)))
    assert np.array_equal(local_index.search(q, 10)[1], got_i)

    assert embedpipe("verify", out).returncode == 0


@pytest.mark.ray
def test_a_worker_killed_mid_shard_equals_an_uninterrupted_run(tmp_path, movie_table,
                                                               tiny_model, ray_folder):
    out = tmp_path / "out"
    job = small_job(tmp_path / "job.toml", write_input(tmp_path / "in", movie_table), out,
                    tiny_model, index=INDEX)
    pause = tmp_path / "paused"
    _, summary = ray_run(job, {"EMBEDPIPE_PAUSE_AT": "shard:2",
                               "EMBEDPIPE_PAUSE_FILE": str(pause)}, pause)
    assert not summary["failures"]
    infos, clean = infos_of(out), infos_of(ray_folder[0])
    assert [s["rows"] for s in infos["shards"]] == [s["rows"] for s in clean["shards"]]
    for mine, theirs in zip(infos["shards"], clean["shards"]):
        assert (out / mine["file"]).read_bytes() == (ray_folder[0] / theirs["file"]).read_bytes()
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name]
    named = {s["file"] for s in infos["shards"]} | {infos["index_file"], infos["ids_file"]}
    assert {f"index/{p.name}" for p in (out / "index").iterdir()} == named | {INFOS_FILE}


def test_flat_and_hnsw_beyond_a_node_are_refused_on_ray(tmp_path, movie_table, tiny_model):
    ram = 128 * 2**30
    billion = 1_000_000_000
    with pytest.raises(ConfigError, match="ivf-pq.*shards"):
        refuse_one_process_index(IndexConfig(type="flat", max_memory="1TB"), billion, 384,
                                 Precision(), ram)
    with pytest.raises(ConfigError, match="hnsw"):
        refuse_one_process_index(IndexConfig(type="hnsw", max_memory="1TB"), 100_000_000, 384,
                                 Precision(), ram)
    refuse_one_process_index(IndexConfig(type="ivf-pq", layout="shards"), billion, 384,
                             Precision(), ram)
    # 64 GiB of flat vectors: 44.7M float32 rows fit half of 128 GiB, 45M do not; binary is 1/32
    refuse_one_process_index(IndexConfig(type="flat", max_memory="1TB"), 44_700_000, 384,
                             Precision(), ram)
    with pytest.raises(ConfigError):
        refuse_one_process_index(IndexConfig(type="flat", max_memory="1TB"), 45_000_000, 384,
                                 Precision(), ram)
    refuse_one_process_index(IndexConfig(type="flat", max_memory="1TB"), 45_000_000, 384,
                             Precision("binary"), ram)

    # the CLI: refused before anything is embedded (exit 2, one line, nothing written)
    out = tmp_path / "out"
    job = small_job(tmp_path / "job.toml", write_input(tmp_path / "in", movie_table), out,
                    tiny_model, index={"type": "flat", "max_memory": "16KB"})
    result = embedpipe("run", job, "--runner", "ray")
    assert result.returncode == 2, result.stderr
    assert "ivf-pq" in result.stderr and "layout = 'shards'" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not out.exists() or not any(out.rglob("*.parquet"))
    assert embedpipe("run", job).returncode == 0  # the local runner builds it as before


@pytest.mark.ray
def test_a_night_rewrites_only_the_changed_shards(ray_folder, movie_table):
    """Last of the tests on the module's folder: the night changes it."""
    out = ray_folder[0]
    job = out.parent / "job.toml"
    before = infos_of(out)
    digests = {p.name: p.read_bytes() for p in (out / "index").glob("shard-*")}
    night = texts(movie_table, night=1)[2]  # file 2 of 0..4 changed
    write_shards(out.parent / "in", [pa.table({"id": pa.array(range(2000, 2000 + ROWS),
                                                               pa.int64()), "text": night})],
                 ["part-00002.parquet"])

    _, summary = ray_run(job)
    assert summary["units_changed"] == 1 and not summary["failures"]
    after = infos_of(out)
    assert after["maintained"]["shards_kept"] == 4 and after["maintained"]["shards_written"] == 1
    assert after["index_file"] == before["index_file"]  # the trained quantizer kept
    now = {p.name: p.read_bytes() for p in (out / "index").glob("shard-*")}
    # file 2's parts were shard 2 (files 0, 1, 2, 3, 4: one shard each at 120 rows a shard)
    changed = sorted(set(digests) ^ set(now))
    assert changed == sorted([before["shards"][2]["file"].split("/")[1],
                              after["shards"][2]["file"].split("/")[1]])
    assert all(now[name] == digests[name] for name in set(now) & set(digests))
    q = queries(out)
    index, _ = load_index(Store(str(out)))
    got_d, got_i = index.search(q, 10)
    want_d, want_i = single_index_hits(out, q)
    assert np.array_equal(got_i, want_i) and np.allclose(got_d, want_d, atol=1e-5)

    assert embedpipe("verify", out).returncode == 0
    shard = out / after["shards"][0]["file"]
    body = bytearray(shard.read_bytes())
    body[len(body) // 2] ^= 0x01
    shard.write_bytes(bytes(body))
    result = embedpipe("verify", out)
    assert result.returncode == 1 and after["shards"][0]["file"] in result.stdout + result.stderr


def test_the_local_runner_keeps_unchanged_shards_too(tmp_path, movie_table, tiny_model):
    out = tmp_path / "out"
    job = small_job(tmp_path / "job.toml", write_input(tmp_path / "in", movie_table), out,
                    tiny_model, index=INDEX)
    assert embedpipe("run", job).returncode == 0
    before = infos_of(out)
    assert {s["pid"] for s in before["shards"]} == {before["shards"][0]["pid"]}  # one process
    night = texts(movie_table, night=1)[2]
    write_shards(tmp_path / "in", [pa.table({"id": pa.array(range(2000, 2060), pa.int64()),
                                             "text": night[:60]})], ["part-00002.parquet"])
    assert embedpipe("run", job).returncode == 0
    after = infos_of(out)
    assert after["maintained"]["shards_kept"] == 4 and after["maintained"]["shards_written"] == 1
    assert [s["file"] for i, s in enumerate(after["shards"]) if i != 2] == \
        [s["file"] for i, s in enumerate(before["shards"]) if i != 2]
    assert after["shards"][2]["rows"] == 60 and after["count"] == FILES * ROWS - ROWS + 60
    q = queries(out)
    got = load_index(Store(str(out)))[0].search(q, 10)
    want = single_index_hits(out, q)
    assert np.array_equal(got[1], want[1]) and np.allclose(got[0], want[0], atol=1e-5)
    assert embedpipe("verify", out).returncode == 0


@pytest.mark.ray
def test_the_ondisk_merge_runs_on_a_worker(tmp_path, tiny_model, movie_table):
    """`layout = "ondisk"` on the ray runner: the shards are written by the actors and merged
    into the .ivfdata file by one of them (FAISS's OpenMP threads), not by the driver; the
    merged index answers as the shards layout does, built by the local runner from the same
    input. Its own input: the module's folder is changed by the night test, which may run first
    on the same xdist worker."""
    out = tmp_path / "out"
    job = small_job(tmp_path / "job.toml", write_input(tmp_path / "in", movie_table), out,
                    tiny_model, index={**INDEX, "layout": "ondisk"})
    proc, summary = ray_run(job)
    assert not summary["failures"]
    infos = infos_of(out)
    assert infos["layout"] == "ondisk" and infos["merged_shards"] == 5
    assert infos["merged_by"]["pid"] != proc.pid
    assert not list((out / "index").glob("shard-*"))
    q = queries(out)
    index, _ = load_index(Store(str(out)))
    got_d, got_i = index.search(q, 10)
    local = tmp_path / "local"
    job = small_job(tmp_path / "local.toml", tmp_path / "in", local, tiny_model, index=INDEX)
    assert embedpipe("run", job).returncode == 0
    want_d, want_i = load_index(Store(str(local)))[0].search(q, 10)
    assert np.array_equal(got_i, want_i) and np.array_equal(got_d, want_d)
    assert embedpipe("verify", out).returncode == 0
