"""Sinks against real engines: LanceDB (embedded) and PostgreSQL with pgvector (a server the
fixture starts on 127.0.0.1). After every run, crash or sync, each sink must hold exactly the
folder's rows: the same ids, no duplicates, no stale rows, the same vectors."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from helpers import (SMALL, embedpipe, make_job, matrix, read_vectors, run, run_and_kill, to_toml,
                     write_shards)

pytestmark = pytest.mark.sinks
DSN_ENV = "EMBEDPIPE_PG_DSN"


def shard(texts: list[str], first_id: int) -> pa.Table:
    return pa.table({"id": pa.array(range(first_id, first_id + len(texts)), pa.int64()),
                     "text": texts})


@pytest.fixture
def corpus(tmp_path, movie_table):
    texts = movie_table.column("text").to_pylist()
    folder = tmp_path / "input"
    write_shards(folder, [shard(texts[i * 120:(i + 1) * 120], i * 1000) for i in range(3)])
    return folder, texts


@pytest.fixture
def table_name():
    return "t_" + uuid.uuid4().hex[:10]


def sinks_for(tmp_path: Path, table: str, pg: bool = True, lance: bool = True,
              **pg_keys) -> list[dict]:
    out = []
    if lance:
        out.append({"kind": "lancedb", "name": "lance", "uri": str(tmp_path / "db.lance"),
                    "table": table})
    if pg:
        out.append({"kind": "pgvector", "name": "pg", "table": table, **pg_keys})
    return out


def job_dict(folder: Path, out: Path, model: Path, sinks: list[dict], **sections) -> dict:
    merged = {k: {**SMALL.get(k, {}), **sections.get(k, {})} for k in {*SMALL, *sections}}
    merged.setdefault("output", {})["keep_columns"] = ["text"]
    raw = make_job(folder, out, model, **merged)
    raw["sink"] = sinks
    return raw


def write_job_file(path: Path, raw: dict) -> Path:
    plain = {k: v for k, v in raw.items() if k != "sink"}
    text = to_toml(plain)
    for sink in raw.get("sink", []):
        text += "[[sink]]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in sink.items())
    path.write_text(text)
    return path


def pg_rows(dsn: str, table: str) -> dict:
    import psycopg
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(f"SELECT id, vector::text, n_tokens, truncated, text FROM {table}").fetchall()
    out = {r[0]: (np.asarray(json.loads(r[1]), np.float32), r[2], r[3], r[4]) for r in rows}
    assert len(out) == len(rows)
    return out


def lance_rows(uri: Path, table: str) -> dict:
    import lancedb
    data = lancedb.connect(str(uri)).open_table(table).to_arrow()
    ids = data.column("id").to_pylist()
    vectors = matrix(data)
    out = {i: (v, n, t, x) for i, v, n, t, x in zip(
        ids, vectors, data.column("n_tokens").to_pylist(), data.column("truncated").to_pylist(),
        data.column("text").to_pylist())}
    assert len(out) == len(ids), "duplicate ids in the LanceDB table"
    return out


def assert_sink_equals_folder(out: Path, rows: dict, atol: float = 0.0) -> None:
    table = read_vectors(out)
    ids = table.column("id").to_pylist()
    assert sorted(rows) == sorted(ids)
    vectors = matrix(table)
    got = np.stack([rows[i][0] for i in ids])
    if atol:
        np.testing.assert_allclose(got, vectors, atol=atol, rtol=atol)
    else:
        np.testing.assert_array_equal(got, vectors)
    for i, n, t, x in zip(ids, table.column("n_tokens").to_pylist(),
                          table.column("truncated").to_pylist(), table.column("text").to_pylist()):
        assert rows[i][1:] == (n, t, x)


def assert_both_equal(tmp_path: Path, out: Path, dsn: str, table: str) -> None:
    assert_sink_equals_folder(out, pg_rows(dsn, table))
    assert_sink_equals_folder(out, lance_rows(tmp_path / "db.lance", table))


def by_name(summary) -> dict:
    return {s["name"]: s for s in summary.sinks}


def test_full_and_incremental_runs_keep_three_sinks_equal_to_the_folder(
        tmp_path, corpus, tiny_model, pg_dsn, table_name, monkeypatch):
    """Two sinks and a halfvec one with an HNSW index, at once; add, change, remove files."""
    monkeypatch.setenv(DSN_ENV, pg_dsn)
    folder, texts = corpus
    out = tmp_path / "out"
    sinks = sinks_for(tmp_path, table_name) + [
        {"kind": "pgvector", "name": "half", "table": table_name + "_h", "vector_type": "halfvec",
         "index": "hnsw"}]
    job = job_dict(folder, out, tiny_model, sinks)

    def check(summary, expect: dict) -> None:
        assert summary.failures == []
        for name, (upserted, deleted) in expect.items():
            load = by_name(summary)[name]
            assert (load["upserted"], load["deleted"]) == (upserted, deleted), (name, load)
            assert load["rows"] == summary.folder_vectors
        assert_both_equal(tmp_path, out, pg_dsn, table_name)
        assert_sink_equals_folder(out, pg_rows(pg_dsn, table_name + "_h"), atol=2e-3)
        from pipeline.commands.verify import verify_folder
        verdict = verify_folder(str(out))
        assert verdict.ok, verdict.problems
        assert verdict.sinks == ["lance", "pg", "half"]

    summary = run(job)
    check(summary, {"lance": (360, 0), "pg": (360, 0), "half": (360, 0)})
    assert "hnsw built" in by_name(summary)["half"]["index"]
    assert by_name(summary)["pg"]["rows_per_second"] > 0
    check(run(job), {"lance": (0, 0), "pg": (0, 0)})  # nothing changed: nothing touched
    write_shards(folder, [shard(texts[500:560], 5000)], ["part-00003.parquet"])  # a new file
    check(run(job), {"lance": (60, 0), "pg": (60, 0), "half": (60, 0)})
    time.sleep(0.01)
    write_shards(folder, [shard(texts[600:650], 1000)], ["part-00001.parquet"])  # 120 -> 50 rows
    check(run(job), {"lance": (50, 70), "pg": (50, 70), "half": (50, 70)})
    (folder / "part-00000.parquet").unlink()  # removed
    summary = run(job)
    check(summary, {"lance": (0, 120), "pg": (0, 120)})
    assert summary.folder_vectors == 50 + 120 + 60
    # A sink the job no longer names is forgotten by the manifest, its table left as it is.
    job["sink"] = [s for s in job["sink"] if s["name"] != "half"]
    run(job)
    manifest = json.loads((out / "manifest.json").read_text())
    assert set(manifest["sinks"]) == {"lance", "pg"}
    assert pg_dsn not in (out / "manifest.json").read_text()  # never the connection string


def changed_corpus(folder: Path, texts: list[str]) -> None:
    """The incremental step of the crash tests: a file changed (120 -> 50 rows), one removed."""
    write_shards(folder, [shard(texts[600:650], 1000)], ["part-00001.parquet"])
    (folder / "part-00002.parquet").unlink()


@pytest.fixture(scope="module")
def clean_rows(tmp_path_factory, movie_table, tiny_model, pg_dsn):
    """The sinks of an uninterrupted run on the changed input: (pgvector rows, LanceDB rows)."""
    tmp = tmp_path_factory.mktemp("clean")
    texts = movie_table.column("text").to_pylist()
    write_shards(tmp / "input", [shard(texts[i * 120:(i + 1) * 120], i * 1000) for i in range(3)])
    changed_corpus(tmp / "input", texts)
    table = "t_clean_" + uuid.uuid4().hex[:8]
    os.environ[DSN_ENV] = pg_dsn
    try:
        assert run(job_dict(tmp / "input", tmp / "out", tiny_model,
                            sinks_for(tmp, table))).failures == []
    finally:
        del os.environ[DSN_ENV]
    return pg_rows(pg_dsn, table), lance_rows(tmp / "db.lance", table)


def assert_same_rows(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    assert all(np.array_equal(a[i][0], b[i][0]) and a[i][1:] == b[i][1:] for i in a)


@pytest.mark.parametrize("point", ["sink-copy", "sink-merge", "sink:1", "sink:2"])
def test_kill_minus_nine_during_a_sink_load_then_rerun_equals_a_clean_run(
        tmp_path, corpus, tiny_model, pg_dsn, table_name, monkeypatch, point, clean_rows):
    """sink-copy: in the middle of PostgreSQL's COPY; sink-merge: in the middle of LanceDB's
    merge_insert; sink:N: after the N-th sink committed, before the manifest records it. The
    kill comes in an incremental run (a file changed, one removed), so the tables hold old
    rows that must be replaced or deleted."""
    monkeypatch.setenv(DSN_ENV, pg_dsn)
    folder, texts = corpus
    out = tmp_path / "out"
    raw = job_dict(folder, out, tiny_model, sinks_for(tmp_path, table_name))
    assert run(raw).failures == []
    time.sleep(0.01)
    changed_corpus(folder, texts)
    job = write_job_file(tmp_path / "job.toml", raw)
    run_and_kill(job, point, tmp_path, {DSN_ENV: pg_dsn})
    if point == "sink-copy":  # the transaction never committed: the old rows, untouched
        assert len(pg_rows(pg_dsn, table_name)) == 360
    rerun = embedpipe("run", job, "--json", env={DSN_ENV: pg_dsn})
    assert rerun.returncode == 0, rerun.stderr
    summary = json.loads(rerun.stdout)
    assert summary["folder_vectors"] == 120 + 50
    assert_both_equal(tmp_path, out, pg_dsn, table_name)
    # ... and equal to an uninterrupted run of the same input into fresh tables
    assert_same_rows(pg_rows(pg_dsn, table_name), clean_rows[0])
    assert_same_rows(lance_rows(tmp_path / "db.lance", table_name), clean_rows[1])
    from pipeline.commands.verify import verify_folder
    verdict = verify_folder(str(out))
    assert verdict.ok and verdict.sinks == ["lance", "pg"], verdict.problems


def test_sync_adds_a_sink_later_and_restores_a_wiped_one(
        tmp_path, corpus, tiny_model, pg_dsn, table_name, monkeypatch):
    monkeypatch.setenv(DSN_ENV, pg_dsn)
    folder, _ = corpus
    out = tmp_path / "out"
    raw = job_dict(folder, out, tiny_model, sinks_for(tmp_path, table_name, pg=False))
    assert run(raw).failures == []
    # Add the pgvector sink to the finished folder, without the model.
    raw["sink"] = sinks_for(tmp_path, table_name)
    job = write_job_file(tmp_path / "job.toml", raw)
    env = {DSN_ENV: pg_dsn}
    added = embedpipe("sync", out, "--job", job, "--json", env=env)
    assert added.returncode == 0, added.stderr
    loads = {s["name"]: s for s in json.loads(added.stdout)["sinks"]}
    assert loads["pg"]["upserted"] == 360 and loads["lance"]["upserted"] == 0
    assert_both_equal(tmp_path, out, pg_dsn, table_name)
    # Wipe both: drop the PostgreSQL table, delete the LanceDB rows.
    import lancedb
    import psycopg
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(f"DROP TABLE {table_name}")
    lancedb.connect(str(tmp_path / "db.lance")).open_table(table_name).delete("id >= 0")
    verify = embedpipe("verify", out, env=env)
    assert verify.returncode == 1
    assert 'sink "pg"' in verify.stdout and 'sink "lance"' in verify.stdout
    assert "embedpipe sync" in verify.stdout
    synced = embedpipe("sync", out, env=env)  # the sinks recorded by the --job sync
    assert synced.returncode == 0, synced.stderr
    assert "(full sync)" in synced.stdout
    assert_both_equal(tmp_path, out, pg_dsn, table_name)
    assert embedpipe("verify", out, env=env).returncode == 0


def test_refuses_a_foreign_or_differently_made_table(tmp_path, corpus, tiny_model, pg_dsn,
                                                     table_name, monkeypatch):
    import lancedb
    import psycopg
    from pipeline.config import ConfigError

    monkeypatch.setenv(DSN_ENV, pg_dsn)
    folder, _ = corpus
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(f"CREATE TABLE {table_name} (id bigint PRIMARY KEY, vector vector(32))")
        conn.execute(f"INSERT INTO {table_name} VALUES (1, %s::vector)", (str([0.0] * 32),))
    out = tmp_path / "out"
    job = write_job_file(tmp_path / "job.toml", job_dict(
        folder, out, tiny_model, sinks_for(tmp_path, table_name, lance=False)))
    refused = embedpipe("run", job, env={DSN_ENV: pg_dsn})
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines() == [
        f'error: sink "pg": PostgreSQL table {table_name} at {pg_dsn.split("@")[1]} exists and '
        f"was not made by embedpipe; refusing to write into it. Name another table, or drop it"]
    assert not (out / "manifest.json").exists()  # refused before any work
    with psycopg.connect(pg_dsn) as conn:  # untouched
        assert conn.execute(f"SELECT count(*) FROM {table_name}").fetchone()[0] == 1

    # LanceDB: a table made by someone else
    db = lancedb.connect(str(tmp_path / "db.lance"))
    db.create_table(table_name, data=pa.table({"id": [1], "vector": [[0.0, 1.0]]}))
    with pytest.raises(ConfigError, match="was not made by embedpipe"):
        run(job_dict(folder, out, tiny_model, sinks_for(tmp_path, table_name, pg=False)))

    # Tables made by embedpipe with other vector settings (here: CLS pooling)
    other = table_name + "_o"
    assert run(job_dict(folder, tmp_path / "cls", tiny_model, sinks_for(tmp_path, other),
                        encode={"pooling": "cls"})).failures == []
    for only in ("pg", "lance"):
        with pytest.raises(ConfigError, match=r"holds vectors made with other settings "
                                              r"\(settings_hash"):
            run(job_dict(folder, tmp_path / f"mean-{only}", tiny_model,
                         sinks_for(tmp_path, other, pg=only == "pg", lance=only == "lance"),
                         encode={"pooling": "mean"}))
    assert not (tmp_path / "mean-pg" / "manifest.json").exists()


def test_search_through_the_sinks_returns_the_faiss_flat_result(
        tmp_path, corpus, tiny_model, pg_dsn, table_name, monkeypatch, movie_table):
    from pipeline.commands.search import Searcher
    from pipeline.commands.sink_search import SinkSearcher

    monkeypatch.setenv(DSN_ENV, pg_dsn)
    folder, texts = corpus
    out = tmp_path / "out"
    job = job_dict(folder, out, tiny_model, sinks_for(tmp_path, table_name, index="none"),
                   encode={"pooling": "mean", "normalize": True},
                   index={"type": "flat", "metric": "ip"})
    assert run(job).failures == []
    queries = texts[2000:2008]
    faiss_hits = Searcher(str(out)).search(queries, k=10)
    for name in ("pg", "lance"):
        searcher = SinkSearcher(str(out), name)
        hits = searcher.search(queries, k=10)
        searcher.close()
        assert hits.column("id").to_pylist() == faiss_hits.column("id").to_pylist(), name
        assert hits.column("query").to_pylist() == faiss_hits.column("query").to_pylist()
        np.testing.assert_allclose(hits.column("score").to_numpy(),
                                   faiss_hits.column("score").to_numpy(), atol=1e-5)
        assert hits.column("text").to_pylist() == faiss_hits.column("text").to_pylist()
    cli = embedpipe("search", out, queries[0], "-k", "5", "--sink", "pg", "--json",
                    env={DSN_ENV: pg_dsn})
    assert cli.returncode == 0, cli.stderr
    assert [h["id"] for h in json.loads(cli.stdout)] == faiss_hits.column("id").to_pylist()[:5]
    unknown = embedpipe("search", out, "x", "--sink", "nope", env={DSN_ENV: pg_dsn})
    assert unknown.returncode == 2
    assert unknown.stderr.strip() == f"error: {out} has no sink named 'nope'; it has: lance, pg"


@pytest.mark.parametrize("module, extra", [("lancedb", "lancedb"), ("psycopg", "pgvector")])
def test_a_missing_extra_fails_at_load_with_one_line(tmp_path, corpus, tiny_model, pg_dsn,
                                                     table_name, module, extra):
    """The engine's import fails (a module that raises ImportError shadows it): the run stops
    before any work with one line naming the extra."""
    folder, _ = corpus
    shadow = tmp_path / "shadow"
    shadow.mkdir()
    (shadow / f"{module}.py").write_text(f"raise ImportError(\"No module named '{module}'\")\n")
    out = tmp_path / "out"
    job = write_job_file(tmp_path / "job.toml", job_dict(
        folder, out, tiny_model, sinks_for(tmp_path, table_name, pg=extra == "pgvector",
                                           lance=extra == "lancedb")))
    env = {DSN_ENV: pg_dsn, "PYTHONPATH": os.pathsep.join(
        [str(shadow), os.environ.get("PYTHONPATH", ""), str(Path(__file__).parents[2])])}
    result = embedpipe("run", job, env=env)
    assert result.returncode == 2
    name = "lance" if extra == "lancedb" else "pg"
    engine = "LanceDB" if extra == "lancedb" else "psycopg"
    assert result.stderr.strip().splitlines() == [
        f"error: sink \"{name}\": {engine} is not installed (No module named '{module}'): "
        f"pip install 'embedpipe[{extra}]'"]
    assert not out.exists()


def test_without_sinks_no_engine_is_imported_and_a_missing_dsn_is_one_line(tmp_path):
    code = ("import sys, pipeline.jobs.runner, pipeline.commands.verify, pipeline.cli; "
            "print(sorted(m for m in ('lancedb', 'psycopg') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.stdout.strip() == "[]", result.stderr
    from pipeline.config import ConfigError, config_from_dict
    from pipeline.sinks.make import make_sink

    cfg = config_from_dict({"sink": [{"kind": "pgvector", "table": "t",
                                      "dsn_env": "EMBEDPIPE_TEST_NO_SUCH_DSN"}]}).sink[0]
    with pytest.raises(ConfigError, match="environment variable EMBEDPIPE_TEST_NO_SUCH_DSN is "
                                          "not set"):
        make_sink(cfg)


def test_binary_copy_of_kept_columns_with_nulls(pg_dsn, table_name):
    """The numpy COPY encoder against the server: ints, floats, bools, strings (unicode,
    empty), dates (as text) and NULLs in each, a vector and a halfvec column."""
    import datetime

    import psycopg
    from pipeline.sinks.pg_copy import HEADER, TRAILER, encode

    vectors = np.array([[0.5, -1.25, 3.0], [1e-3, 2.0, -0.0], [7.0, 8.0, 9.0]], np.float32)
    table = pa.table({
        "id": pa.array([1, 2, 3], pa.int64()),
        "vector": pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel()), 3),
        "n_tokens": pa.array([5, None, 7], pa.int32()),
        "flag": pa.array([True, None, False]),
        "score": pa.array([0.25, 1.5, None], pa.float32()),
        "text": pa.array(["héllo ✓", None, ""]),
        "day": pa.array([datetime.date(2024, 1, 2), None, datetime.date(1999, 12, 31)]),
    })
    for vector_type in ("vector", "halfvec"):
        name = f"{table_name}_{vector_type}"
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            conn.execute(f"CREATE TABLE {name} (id bigint, vector {vector_type}(3), n_tokens "
                         f"integer, flag boolean, score double precision, text text, day text)")
            with conn.cursor().copy(f"COPY {name} FROM STDIN (FORMAT BINARY)") as copy:
                copy.write(HEADER + encode(table, vector_type) + TRAILER)
            rows = conn.execute(f"SELECT id, vector::text, n_tokens, flag, score, text, day "
                                f"FROM {name} ORDER BY id").fetchall()
        got = np.array([json.loads(r[1]) for r in rows], np.float32)
        np.testing.assert_allclose(got, vectors, atol=0 if vector_type == "vector" else 1e-3)
        assert [r[2:] for r in rows] == [(5, True, 0.25, "héllo ✓", "2024-01-02"),
                                         (None, None, 1.5, None, None),
                                         (7, False, None, "", "1999-12-31")]


@pytest.mark.parametrize("kind", ["lancedb", "pgvector"])
def test_window_rows_are_keyed_by_id_and_chunk(tmp_path, pg_dsn, table_name, monkeypatch, kind):
    """Where a row is one window of a text (a `chunk` column), the key is (id, chunk): a
    document's windows are upserted and deleted one by one, string ids with quotes included."""
    from pipeline.config import SinkConfig
    from pipeline.sinks.base import Marker
    from pipeline.sinks.make import make_sink

    monkeypatch.setenv(DSN_ENV, pg_dsn)
    cfg = SinkConfig(kind=kind, table=table_name, name="s", uri=str(tmp_path / "db.lance"))
    sink = make_sink(cfg)
    sink.open()
    marker = Marker("h", 4, "string")

    def rows(keys: list[tuple], seed: int) -> pa.Table:
        v = np.random.default_rng(seed).standard_normal((len(keys), 4)).astype(np.float32)
        return pa.table({"id": [k[0] for k in keys], "chunk": pa.array([k[1] for k in keys], pa.int32()),
                         "vector": pa.FixedSizeListArray.from_arrays(pa.array(v.ravel()), 4),
                         "n_tokens": pa.array([7] * len(keys), pa.int32()),
                         "truncated": [False] * len(keys)})

    first = [("a'b", 0), ("a'b", 1), ("a'b", 2), ("plain", 0), ('q"x', 0), ('q"x', 1)]
    table = rows(first, 0)
    assert sink.load(table.schema, iter([table]), None, marker) == (6, 0)
    # "a'b" now has 2 windows (one changed), 'q"x' is gone, "new" arrives
    second = [("a'b", 0), ("a'b", 1), ("plain", 0), ("new", 0)]
    update = rows(second, 1)
    keep = update.select(["id", "chunk"])
    assert sink.load(update.schema, iter([update]), keep, marker) == (4, 3)
    assert sink.count() == 4
    assert sink.id_difference(keep)[:2] == (0, 0)
    got = sink.vectors_of(second)
    want = dict(zip(second, matrix(update)))
    assert set(got) == set(second)
    assert all(np.array_equal(got[k], want[k]) for k in second)
    sink.close()
