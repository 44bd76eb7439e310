"""The Ray runner's checks on the workers (jobs/partitioned_scan.py, jobs/ray_checks.py) against
the in-memory registry the local runner uses (io/registry.py), and Ray runs against local ones.

Run the Ray tests alone with `pytest -m ray tests/jobs/test_ray_driver.py`.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from helpers import embedpipe, make_job, matrix, read_vectors, run, small_job, write_shards


def _tables(texts: list[str], string_ids: bool) -> list[pa.Table]:
    """Four files: ids repeated across and within files, texts repeated across and within
    files, a null and a blank text."""
    ids = [list(range(i * 100, i * 100 + 90)) for i in range(4)]
    body = [list(texts[i * 90:(i + 1) * 90]) for i in range(4)]
    body[1][0:5] = texts[0:5]  # texts of file 0 again
    ids[1][5], ids[1][6] = 0, 1  # ids of file 0 again: rejected in file 1
    ids[2][3] = ids[2][1]  # twice in one file: the second rejected
    body[2][10], body[2][11] = None, "   "
    body[3][5] = body[3][6] = body[3][7] = texts[7]  # three times in file 3, once in file 0
    # a text whose first row is rejected (id 1 again), then in files 2 and 3
    body[1][6] = body[3][8] = texts[200]
    make = (lambda n: f"film-{n}") if string_ids else (lambda n: n)
    return [pa.table({"id": pa.array([make(n) for n in i], pa.string() if string_ids
                                     else pa.int64()), "text": pa.array(t, pa.string())})
            for i, t in zip(ids, body)]


def _night(folder, into, texts: list[str]) -> None:
    """A re-export: every file under a new name, 1% of the texts changed (4 rows), three rows
    gone, a new row with a text the folder already holds."""
    into.mkdir()
    for n, path in enumerate(sorted(folder.iterdir())):
        data = pq.read_table(path).to_pydict()
        data["text"][20 + n] = f"changed tonight, row {n}: " + (data["text"][20 + n] or "")
        if n == 3:
            for key in data:
                del data[key][40:43]
            data["id"].append(type(data["id"][0])(999) if isinstance(data["id"][0], int)
                              else "film-999")
            data["text"].append(texts[0])
        pq.write_table(pa.table(data, schema=pq.read_schema(path)),
                       into / f"export-2026-12-08-{n:03d}.parquet")


# ------------------------------------------------------------ the checks, no Ray: every answer


@pytest.fixture(scope="module", params=[False, True], ids=["int-ids", "string-ids"])
def folder(request, tmp_path_factory, movie_table, tiny_model):
    """A folder embedded from the four files, and tonight's re-export of them."""
    string_ids = request.param
    tmp = tmp_path_factory.mktemp("checks")
    texts = movie_table.column("text").to_pylist()
    write_shards(tmp / "in", _tables(texts, string_ids))
    raw = make_job(tmp / "in", tmp / "out", tiny_model, model={"max_length": 32},
                   output={"rows_per_file": 40}, index={"enabled": False})
    run(raw)
    _night(tmp / "in", tmp / "night", texts)
    return tmp, raw, string_ids


@pytest.mark.parametrize("mode", ["id+content", "content"])
@pytest.mark.parametrize("partitions", [1, 5])
def test_partitioned_checks_answer_as_the_registry_does(folder, mode, partitions):
    """Two of the folder's units kept, two retired (gone ids, stored rows), tonight's files as
    input: each unit's rejected rows, repeated texts and stored candidates, and the ids gone,
    equal the in-memory registry's answers."""
    base, raw, string_ids = folder
    _check_against_registry(str(base / "out"), base, raw, string_ids, mode, partitions)
    assert not (base / "out" / "_scan").exists()


@pytest.mark.s3
def test_partitioned_checks_on_object_storage(s3, folder):
    """The key files written to and read from an S3-compatible server, then removed."""
    fs, bucket = s3
    base, raw, string_ids = folder
    fs.put(str(base / "out"), f"{bucket}/out", recursive=True)
    _check_against_registry(f"s3://{bucket}/out", base, raw, string_ids, "id+content", 3)
    fs.invalidate_cache()
    assert not fs.exists(f"{bucket}/out/_scan")


def _check_against_registry(url: str, base, raw, string_ids: bool, mode: str,
                            partitions: int) -> None:
    from pipeline.config import config_from_dict
    from pipeline.io.ledger import Ledger
    from pipeline.io.reader import plan_units
    from pipeline.io.registry import StoredRows, scan_input, valid_rows
    from pipeline.io.content_hash import hash_keys, text_hashes
    from pipeline.io.rejects import plain_texts
    from pipeline.io.storage import Store
    from pipeline.jobs.partitioned_scan import (ScanPlan, UnitChecks, check_partition,
                                                remove_scratch, scan_part, scan_unit)

    store = Store(url)
    records = Ledger(store).complete_units()
    kept = [f for r in records[:2] for f in r.vector_files]
    retired = [f for r in records[2:] for f in r.vector_files]
    stored = (kept if mode == "content" else []) + retired
    job = config_from_dict({**raw, "input": {"path": str(base / "night")}})
    units = plan_units(job.input, ())
    expected = scan_input(units, "id", "text", store, kept, gone_files=retired)
    whole = StoredRows(store, stored, mode)
    assert expected.ids_gone > 0 and len(expected.repeated) > 0
    assert sum(len(d) for d in expected.duplicates.values()) >= 3

    plan = ScanPlan(output=store.url, folder=f"_scan/test-{partitions}", partitions=partitions,
                    id_column="id", text_column="text", pair_column=None, prompt="", mode=mode,
                    string_ids=string_ids, units=tuple(u.key for u in units),
                    stored=tuple(stored))
    producers = {"id": [], "text": []}
    for n, unit in enumerate(units):
        assert scan_unit(plan, n, unit) > 0
        producers["id"].append(f"unit-{n:06d}")
        producers["text"].append(f"unit-{n:06d}")
    for n, name in enumerate(dict.fromkeys(kept + retired)):
        for space in scan_part(plan, name, name in kept, name in retired,
                               stored.index(name) if name in stored else None, f"part-{n:06d}"):
            producers[space].append(f"part-{n:06d}")
    counts = [check_partition(plan, space, p, producers[space])
              for space in ("id", "text") for p in range(partitions)]
    assert sum(c.ids_gone for c in counts) == expected.ids_gone
    assert sum(c.rows for c in counts[:partitions]) == expected.rows_scanned
    checks = UnitChecks(plan)
    asked = 0
    for unit in units:
        duplicates, reuse = checks.for_unit(unit)
        np.testing.assert_array_equal(duplicates, expected.duplicates[unit.key])
        for ids, _, texts, _ in valid_rows(unit, ["id", "text"], False):
            hashes = text_hashes(plain_texts(texts).to_pylist())
            keys = hash_keys(hashes)
            at = np.minimum(np.searchsorted(expected.repeated, keys), len(expected.repeated) - 1)
            np.testing.assert_array_equal(reuse.is_repeated(keys), expected.repeated[at] == keys)
            for got, want in zip(reuse.stored.find_all(ids, hashes), whole.find_all(ids, hashes)):
                np.testing.assert_array_equal(got, want)
            asked += len(whole.find_all(ids, hashes)[0])
    assert asked > 150  # the retired half at least has stored candidates: the join was tested
    assert remove_scratch(store) > 0


# ------------------------------------------------------------ Ray runs against local runs


def _summary_counts(summary: dict) -> dict:
    """The counts Ray and local runs share: all of them but the seconds."""
    keys = ("units_done", "vectors_written", "rows_read", "rows_encoded", "rows_copied",
            "rows_reused", "rows_removed", "rejects", "reuse")
    return {k: summary.get(k) for k in keys}


def _rejects(out) -> pa.Table:
    from pipeline.io.ledger import Ledger
    from pipeline.io.storage import Store

    records = Ledger(Store(str(out))).complete_units()
    tables = [pq.read_table(out / f) for r in records for f in r.files if f.startswith("rejects/")]
    table = pa.concat_tables(tables)
    names = pa.array([os.path.basename(p) for p in table.column("input_file").to_pylist()])
    table = table.set_column(table.schema.get_field_index("input_file"), "input_file", names)
    return table.sort_by([("input_file", "ascending"), ("row_number", "ascending")])


def _assert_same_folder(got, want) -> None:
    """Ids, vectors, every column and rejects bit for bit: a repeated text is copied within its
    unit only, on both runners, so no vector depends on which actor embedded which unit."""
    a, b = read_vectors(got), read_vectors(want)
    assert a.column("id").to_pylist() == b.column("id").to_pylist()
    assert a.drop_columns(["vector"]).equals(b.drop_columns(["vector"]))
    np.testing.assert_array_equal(matrix(a), matrix(b))
    assert _rejects(got).equals(_rejects(want))


# The driver of every Ray run here cannot scan rows: scan_input and StoredRows raise in it (the
# Ray workers are processes of their own and keep the real ones).
_NO_DRIVER_SCAN = (
    "import sys\n"
    "import pipeline.io.registry as registry, pipeline.jobs.runner as runner\n"
    "def refuse(*a, **k):\n"
    "    raise AssertionError('the Ray driver scanned rows')\n"
    "registry.scan_input = runner.scan_input = refuse\n"
    "registry.StoredRows.__init__ = refuse\n"
    "from pipeline.cli import main\n"
    "sys.argv = ['embedpipe'] + sys.argv[1:]\n"
    "main()\n")


def _ray_run(job, *extra, env=None, **kwargs):
    return subprocess.run([sys.executable, "-c", _NO_DRIVER_SCAN, "run", str(job), "--runner",
                           "ray", "--workers", "2", "--json", "--no-progress", *extra],
                          capture_output=True, text=True,
                          env={**os.environ, "RAY_AUTH_MODE": "disabled", **(env or {})}, **kwargs)


@pytest.fixture(scope="module")
def nights(tmp_path_factory, movie_table, tiny_model):
    """The four files and tonight's re-export, run locally into one folder (the reference)."""
    tmp = tmp_path_factory.mktemp("ray_nights")
    texts = movie_table.column("text").to_pylist()
    write_shards(tmp / "first", _tables(texts, False))
    _night(tmp / "first", tmp / "night", texts)
    shutil.copytree(tmp / "first", tmp / "in")
    job = small_job(tmp / "job.toml", tmp / "in", tmp / "local", tiny_model)
    first = embedpipe("run", job, "--json", "--no-progress")
    assert first.returncode == 0, first.stderr[-3000:]
    shutil.copytree(tmp / "local", tmp / "local-first")
    shutil.rmtree(tmp / "in")
    shutil.copytree(tmp / "night", tmp / "in")
    night = embedpipe("run", job, "--json", "--no-progress")
    assert night.returncode == 0, night.stderr[-3000:]
    return tmp, json.loads(first.stdout), json.loads(night.stdout)


def test_a_units_vectors_do_not_depend_on_the_other_units(tmp_path, nights, tiny_model):
    """A repeated text is copied within its unit only: the file that repeats texts of earlier
    files, embedded alone, gets the same vectors bit for bit as in the four-file run (which is
    why an actor embedding any subset of the units writes the local runner's bits), and its own
    repeats are still copied."""
    base, local_first, _ = nights
    last = sorted((base / "first").iterdir())[-1]
    (tmp_path / "in").mkdir()
    shutil.copy(last, tmp_path / "in" / last.name)
    job = small_job(tmp_path / "job.toml", tmp_path / "in", tmp_path / "out", tiny_model)
    alone = embedpipe("run", job, "--json", "--no-progress")
    assert alone.returncode == 0, alone.stderr[-3000:]
    assert json.loads(alone.stdout)["rows_copied"] == 2  # texts[7] three times in the file
    mine = read_vectors(tmp_path / "out")
    everything = read_vectors(base / "local-first")
    ids = set(mine.column("id").to_pylist())
    same = everything.filter(pa.array([i in ids for i in everything.column("id").to_pylist()]))
    assert same.column("id").to_pylist() == mine.column("id").to_pylist()
    np.testing.assert_array_equal(matrix(same), matrix(mine))


@pytest.mark.ray
@pytest.mark.slow  # a Ray instance and two runs: ~1 minute
def test_ray_equals_local_first_run_and_reexport_night(tmp_path, nights, tiny_model):
    """Duplicate ids across and within files, repeated texts, rejects; then every file renamed,
    1% of texts changed, rows gone and added: the Ray folder equals the local one bit for bit
    after each night, with the same counts (reused, copied, removed), and the driver never
    scanned a row."""
    base, local_first, local_night = nights
    shutil.copytree(base / "first", tmp_path / "in")
    out = tmp_path / "out"
    job = small_job(tmp_path / "job.toml", tmp_path / "in", out, tiny_model)
    first = _ray_run(job)
    assert first.returncode == 0, first.stderr[-3000:]
    assert _summary_counts(json.loads(first.stdout)) == _summary_counts(local_first)
    assert local_first["rows_copied"] > 0 and sum(local_first["rejects"].values()) >= 5
    _assert_same_folder(out, base / "local-first")

    shutil.rmtree(tmp_path / "in")
    shutil.copytree(base / "night", tmp_path / "in")
    night = _ray_run(job)
    assert night.returncode == 0, night.stderr[-3000:]
    summary = json.loads(night.stdout)
    assert _summary_counts(summary) == _summary_counts(local_night)
    assert local_night["rows_reused"] > 300 and local_night["rows_removed"] == 3
    _assert_same_folder(out, base / "local")
    assert not (out / "_scan").exists()
    assert summary["seconds"]["scan"] > 0


@pytest.mark.ray
@pytest.mark.slow  # a Ray instance and two runs: ~1 minute
@pytest.mark.parametrize("point", ["scan:1", "encode:2"])
def test_ray_equals_local_when_a_worker_is_killed(tmp_path, nights, tiny_model, point):
    """A worker SIGKILLed in the partition checks (its task runs again) or while encoding (its
    unit goes to a new actor), on the re-export night: the folder still equals the local one."""
    from test_scale_out import wait_for

    base, _, local_night = nights
    out = tmp_path / "out"
    shutil.copytree(base / "local-first", out)
    shutil.copytree(base / "night", tmp_path / "in")
    job = small_job(tmp_path / "job.toml", tmp_path / "in", out, tiny_model)
    pause = tmp_path / "paused"
    env = {**os.environ, "EMBEDPIPE_PAUSE_AT": point, "EMBEDPIPE_PAUSE_FILE": str(pause),
           "RAY_AUTH_MODE": "disabled"}
    proc = subprocess.Popen([sys.executable, "-c", _NO_DRIVER_SCAN, "run", str(job), "--runner",
                             "ray", "--workers", "2", "--json", "--no-progress"], env=env,
                            text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    worker = wait_for(pause, proc)
    assert worker != proc.pid
    os.kill(worker, signal.SIGKILL)
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr[-3000:]
    counts = _summary_counts(json.loads(stdout))
    assert counts == _summary_counts(local_night)
    _assert_same_folder(out, base / "local")
    assert not (out / "_scan").exists()


@pytest.mark.ray
@pytest.mark.slow  # a Ray instance and two runs: ~1 minute
def test_a_killed_ray_runs_key_files_are_swept(tmp_path, nights, tiny_model):
    """The driver killed while the partition checks run: the rerun (local here) sweeps the key
    files and ends as the uninterrupted run."""
    from test_scale_out import wait_for

    base, _, local_night = nights
    out = tmp_path / "out"
    shutil.copytree(base / "local-first", out)
    shutil.copytree(base / "night", tmp_path / "in")
    job = small_job(tmp_path / "job.toml", tmp_path / "in", out, tiny_model)
    pause = tmp_path / "paused"
    env = {**os.environ, "EMBEDPIPE_PAUSE_AT": "scan:1", "EMBEDPIPE_PAUSE_FILE": str(pause),
           "RAY_AUTH_MODE": "disabled"}
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "run", str(job), "--runner",
                             "ray", "--workers", "2", "--no-progress"], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    wait_for(pause, proc)
    assert any((out / "_scan").rglob("*.arrow"))
    proc.kill()
    proc.wait()
    done = embedpipe("run", job, "--json", "--no-progress")
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout)
    assert summary["stray_files_removed"] > 0 and not (out / "_scan").exists()
    assert _summary_counts(summary) == _summary_counts(local_night)
    _assert_same_folder(out, base / "local")
