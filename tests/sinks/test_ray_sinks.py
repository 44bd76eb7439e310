"""Sinks loaded by Ray workers (sinks/parallel_load.py, jobs/ray_index.py: ray_sink_sync) into a
real LanceDB and a real PostgreSQL with pgvector: each unit's rows upserted by a worker, the
record written by the driver once every unit is in. A ray-loaded sink must hold what the local
runner's sync loads (ids, vectors, kept columns), also after a worker killed mid-load and after
the driver killed before the record, each followed by a rerun."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid

import pytest

from helpers import write_shards
from test_sinks import (DSN_ENV, assert_both_equal, job_dict, lance_rows, pg_rows, shard,
                        sinks_for, write_job_file)

pytestmark = [pytest.mark.sinks, pytest.mark.ray, pytest.mark.slow]


def cli_run(job, env: dict, pause=None, kill_driver: bool = False):
    """`embedpipe run --runner ray --workers 2`; with `pause`, the process that paused there is
    SIGKILLed (a worker: the run goes on; the driver: the run is gone). Returns the exit code."""
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", **env}
    # a Ray instance of the test's own, never a cluster something else started on this machine
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "-v", "run", str(job), "--runner",
                             "ray", "--ray-address", "local", "--workers", "2", "--json"],
                            env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    if pause is not None:
        deadline = time.time() + 300
        while not pause.exists():
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.time() < deadline, "nothing paused"
            time.sleep(0.1)
        time.sleep(0.2)
        paused = int(pause.read_text())
        assert (paused == proc.pid) == kill_driver
        os.kill(paused, signal.SIGKILL)
    stdout, stderr = proc.communicate(timeout=600)
    if not kill_driver:
        assert proc.returncode == 0, stderr[-3000:]
        assert json.loads(stdout)["failures"] == []
        # one Ray session for the whole run: embedding, index shards and both sinks' loads
        assert stderr.count("ray: session started") == 1, stderr[-3000:]
    return proc.returncode


def corpus(folder, texts, night: bool = False):
    write_shards(folder, [shard(texts[i * 120:(i + 1) * 120], i * 1000) for i in range(4)])
    if night:  # a file changed (120 -> 50 rows) and one removed
        write_shards(folder, [shard(texts[600:650], 1000)], ["part-00001.parquet"])
        (folder / "part-00002.parquet").unlink()


def tables(tmp_path, dsn, name) -> tuple[dict, dict]:
    return pg_rows(dsn, name), lance_rows(tmp_path / "db.lance", name)


def same(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for key, (vector, *rest) in a.items():
        assert (vector == b[key][0]).all() and rest == list(b[key][1:]), key


@pytest.fixture(scope="module")
def local_sinks(tmp_path_factory, movie_table, tiny_model, pg_dsn):
    """The local runner's sinks, first run and night: {night: (pgvector rows, LanceDB rows)}."""
    tmp = tmp_path_factory.mktemp("local_sinks")
    texts = movie_table.column("text").to_pylist()
    name = "t_local_" + uuid.uuid4().hex[:8]
    job = write_job_file(tmp / "job.toml", job_dict(tmp / "in", tmp / "out", tiny_model,
                                                    sinks_for(tmp, name)))
    env = {**os.environ, DSN_ENV: pg_dsn}
    out = {}
    for night in (False, True):
        corpus(tmp / "in", texts, night)
        result = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", str(job)],
                                env=env, capture_output=True, text=True)
        assert result.returncode == 0, result.stderr[-3000:]
        out[night] = tables(tmp, pg_dsn, name)
    return out


def test_ray_loaded_sinks_equal_local_even_when_killed(tmp_path, movie_table, tiny_model,
                                                       pg_dsn, local_sinks):
    texts = movie_table.column("text").to_pylist()
    name = "t_ray_" + uuid.uuid4().hex[:8]
    out = tmp_path / "out"
    job = write_job_file(tmp_path / "job.toml", job_dict(tmp_path / "in", out, tiny_model,
                                                         sinks_for(tmp_path, name)))
    env = {DSN_ENV: pg_dsn}
    corpus(tmp_path / "in", texts)
    # a worker killed in the middle of a pgvector COPY: Ray runs its load again
    pause = tmp_path / "paused-copy"
    cli_run(job, {**env, "EMBEDPIPE_PAUSE_AT": "sink-copy", "EMBEDPIPE_PAUSE_FILE": str(pause)},
            pause)
    assert_both_equal(tmp_path, out, pg_dsn, name)
    for mine, local in zip(tables(tmp_path, pg_dsn, name), local_sinks[False]):
        same(mine, local)

    # the night: a worker killed in the middle of a LanceDB merge, then the driver killed with
    # every unit in but the records not written; the rerun equals the local runner's night
    corpus(tmp_path / "in", texts, night=True)
    pause = tmp_path / "paused-merge"
    cli_run(job, {**env, "EMBEDPIPE_PAUSE_AT": "sink-merge", "EMBEDPIPE_PAUSE_FILE": str(pause)},
            pause)
    assert_both_equal(tmp_path, out, pg_dsn, name)
    write_shards(tmp_path / "in", [shard(texts[700:730], 3000)], ["part-00003.parquet"])
    before = json.loads((out / "manifest.json").read_text())["sinks"]
    pause = tmp_path / "paused-record"
    assert cli_run(job, {**env, "EMBEDPIPE_PAUSE_AT": "sink", "EMBEDPIPE_PAUSE_FILE": str(pause)},
                   pause, kill_driver=True) == -signal.SIGKILL
    assert json.loads((out / "manifest.json").read_text())["sinks"] == before  # not recorded
    corpus(tmp_path / "in", texts, night=True)  # back to the local runner's night input
    cli_run(job, env)
    assert_both_equal(tmp_path, out, pg_dsn, name)
    for mine, local in zip(tables(tmp_path, pg_dsn, name), local_sinks[True]):
        same(mine, local)
    verify = subprocess.run([sys.executable, "-m", "pipeline.cli", "verify", str(out)],
                            env={**os.environ, **env}, capture_output=True, text=True)
    assert verify.returncode == 0, verify.stdout + verify.stderr
