"""A sparse (SPLADE) folder's rows in PostgreSQL's pgvector `sparsevec(vocabulary)` (issue #28),
against the real server the fixture starts: the table's rows equal the folder's (read back by
the server's own sparsevec text form), verify and sync find and repair a changed row, search
through the sink (pgvector's <#>) returns sparse_search's exact top-10, an HNSW index only where
max_active_dims keeps every row under pgvector's 1,000, and the refusals are one line."""
from __future__ import annotations

import json
import re
import uuid

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from helpers import embedpipe, film_texts, make_job, run, run_and_kill
from pipeline.io.output import open_output
from test_sinks import DSN_ENV, write_job_file

pytestmark = pytest.mark.sinks
VOCABULARY = 30522
TEXTS = film_texts(40) + [" ".join(["the warm film has a slow ending"] * 20), "a warm film"]


@pytest.fixture(scope="module")
def splade_folders(tmp_path_factory, bundled_model):
    """A tiny random BertForMaskedLM with the real tokenizer, saved by sentence-transformers as
    a SparseEncoder: without max_active_dims ("open"), and with the folder's 48 ("top48")."""
    import torch
    from sentence_transformers import SparseEncoder
    from sentence_transformers.sparse_encoder.modules import MLMTransformer, SpladePooling
    from transformers import AutoTokenizer, BertConfig, BertForMaskedLM

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("splade_sink_models")
    config = BertConfig(vocab_size=VOCABULARY, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=64, max_position_embeddings=128)
    BertForMaskedLM(config).eval().save_pretrained(root / "mlm")
    AutoTokenizer.from_pretrained(bundled_model.path).save_pretrained(root / "mlm")
    out = {}
    for name, dims in (("open", None), ("top48", 48)):
        mlm = MLMTransformer(str(root / "mlm"), max_seq_length=64)
        SparseEncoder(modules=[mlm, SpladePooling("max")], max_active_dims=dims).save(
            str(root / name))
        out[name] = root / name
    return out


@pytest.fixture
def texts_file(tmp_path):
    path = tmp_path / "in.parquet"
    pq.write_table(pa.table({"id": pa.array(range(len(TEXTS)), pa.int64()), "text": TEXTS}), path)
    return path


def sparse_job(texts_file, out, folder, table, **sink_keys) -> dict:
    raw = make_job(texts_file, out, folder, model={"dtype": "float32"},
                   output={"keep_columns": ["text"]}, encode=sink_keys.pop("encode", {}))
    raw["sink"] = [{"kind": "pgvector", "name": "pg", "table": table, **sink_keys}]
    return raw


def table_rows(dsn: str, table: str) -> dict:
    """id -> {0-based index: value}, parsed from the server's sparsevec text ({i:v,...}/dim)."""
    import psycopg
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(f"SELECT id, vector::text FROM {table}").fetchall()
    out = {}
    for ident, text in rows:
        body, dim = text.rsplit("/", 1)
        assert int(dim) == VOCABULARY
        pairs = [p.split(":") for p in body.strip("{}").split(",") if p]
        out[ident] = {int(i) - 1: np.float32(v) for i, v in pairs}
    return out


def folder_rows(out) -> dict:
    rows = open_output(str(out)).sparse()
    ids = open_output(str(out)).table(["id"]).column("id").to_pylist()
    return {i: dict(zip(rows[n].indices.tolist(), rows[n].data.tolist())) for n, i in enumerate(ids)}


@pytest.fixture
def table():
    return "sp_" + uuid.uuid4().hex[:10]


def test_sparsevec_rows_equal_the_folder_verify_sync_and_search(
        tmp_path, texts_file, splade_folders, pg_dsn, table, monkeypatch):
    import psycopg
    from pipeline.commands.sink_search import SinkSearcher
    from pipeline.commands.sparse_search import SparseSearcher

    monkeypatch.setenv(DSN_ENV, pg_dsn)
    out = tmp_path / "out"
    summary = run(sparse_job(texts_file, out, splade_folders["open"], table,
                             encode={"max_active_dims": 300}))
    assert not summary.failures and summary.precision == "sparse"
    want = folder_rows(out)
    got = table_rows(pg_dsn, table)
    assert set(got) == set(want) == set(range(len(TEXTS)))
    for ident, row in want.items():
        assert got[ident].keys() == row.keys() and len(row) == 300
        np.testing.assert_array_equal(np.float32(list(got[ident].values())),
                                      np.float32(list(row.values())))  # exact float4
    with psycopg.connect(pg_dsn) as conn:
        kind = conn.execute("SELECT format_type(atttypid, atttypmod) FROM pg_attribute WHERE "
                            "attrelid = %s::regclass AND attname = 'vector'", (table,)).fetchone()
    assert kind == (f"sparsevec({VOCABULARY})",)
    env = {DSN_ENV: pg_dsn}
    assert embedpipe("verify", out, env=env).returncode == 0

    # search through the sink (pgvector's <#>, exact: index none) = sparse_search's exact top-10
    queries = ["a warm, funny film", "slow plot", "great music and a fine cast"]
    exact = SparseSearcher(str(out)).search(queries, k=10)
    searcher = SinkSearcher(str(out), "pg")
    hits = searcher.search(queries, k=10)
    searcher.close()
    assert hits.column("id").to_pylist() == exact.column("id").to_pylist()
    np.testing.assert_allclose(hits.column("score").to_numpy(), exact.column("score").to_numpy(),
                               rtol=1e-5)
    assert hits.column("text").to_pylist() == exact.column("text").to_pylist()
    cli = embedpipe("search", out, queries[0], "-k", "3", "--sink", "pg", "--json", env=env)
    assert cli.returncode == 0, cli.stderr
    assert [h["id"] for h in json.loads(cli.stdout)] == exact.column("id").to_pylist()[:3]

    # a value changed and a row deleted behind embedpipe's back: verify finds both, sync repairs
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(f"UPDATE {table} SET vector = '{{5:1.5}}/{VOCABULARY}' WHERE id = 3")
        conn.execute(f"DELETE FROM {table} WHERE id = 7")
    verify = embedpipe("verify", out, env=env)
    assert verify.returncode == 1
    assert "1 of the folder's ids missing (e.g. 7)" in verify.stdout
    assert "1 of 42 vectors differ from the folder's (e.g. id 3)" in verify.stdout
    synced = embedpipe("sync", out, "--json", env=env)
    assert synced.returncode == 0, synced.stderr
    load = json.loads(synced.stdout)["sinks"][0]
    assert load["full"] and load["upserted"] == 42  # the count differs from the record    assert table_rows(pg_dsn, table) == got
    assert embedpipe("verify", out, env=env).returncode == 0
    # a value changed, the count as recorded: only the digest comparison finds it
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(f"UPDATE {table} SET vector = '{{9:2.5}}/{VOCABULARY}' WHERE id = 11")
    quick = embedpipe("verify", out, "--quick", env=env)
    assert quick.returncode == 1 and "(e.g. id 11)" in quick.stdout
    synced = json.loads(embedpipe("sync", out, "--json", env=env).stdout)["sinks"][0]
    assert not synced["full"] and synced["rewritten"] == 1
    assert table_rows(pg_dsn, table) == got


def test_hnsw_only_under_pgvectors_limit(tmp_path, texts_file, splade_folders, pg_dsn, table,
                                         monkeypatch):
    import psycopg
    from pipeline.commands.sink_search import SinkSearcher
    from pipeline.commands.sparse_search import SparseSearcher

    monkeypatch.setenv(DSN_ENV, pg_dsn)
    out = tmp_path / "out"
    # the folder's own max_active_dims (48) bounds every row: the HNSW index is built
    summary = run(sparse_job(texts_file, out, splade_folders["top48"], table, index="hnsw"))
    assert not summary.failures
    assert summary.sinks[0]["index"].startswith("hnsw built")
    with psycopg.connect(pg_dsn) as conn:
        found = [r[0] for r in conn.execute("SELECT indexdef FROM pg_indexes WHERE "
                                            "tablename = %s", (table,)).fetchall()]
    assert any("USING hnsw (vector sparsevec_ip_ops)" in d for d in found), found
    queries = ["a warm, funny film", "slow plot"]
    exact = SparseSearcher(str(out)).search(queries, k=10)
    searcher = SinkSearcher(str(out), "pg")
    hits = searcher.search(queries, k=10)  # 42 rows, ef_search 40: the graph finds them all
    searcher.close()
    assert sorted(hits.column("id").to_pylist()) == sorted(exact.column("id").to_pylist())

    # no bound on the rows (open folder), or one over 1,000: refused before any work
    for encode, held in (({}, "no max_active_dims bounds them"),
                         ({"max_active_dims": 1001}, "max_active_dims is 1001")):
        other = tmp_path / f"o{len(encode)}"
        job = write_job_file(tmp_path / "j.toml", sparse_job(
            texts_file, other, splade_folders["open"], table + "_x", index="hnsw", encode=encode))
        refused = embedpipe("run", job, env={DSN_ENV: pg_dsn})
        assert refused.returncode == 2
        assert refused.stderr.strip().splitlines() == [
            f'error: sink "pg": pgvector\'s HNSW index takes sparse rows of at most 1000 non-zero '
            f"values and {held}; set encode.max_active_dims <= 1000, or index = \"none\" (exact "
            f"search)"]
        assert not (other / "manifest.json").exists()


@pytest.mark.parametrize("sink, why", [
    ({"kind": "pgvector", "index": "ivfflat"}, "pgvector has no IVFFlat index for sparsevec"),
    ({"kind": "pgvector", "vector_type": "halfvec"},
     'vector_type = "halfvec" cannot hold the folder\'s sparse (SPLADE) rows'),
    ({"kind": "lancedb", "uri": "db.lance"},
     "LanceDB has no sparse vector column; use a pgvector sink (sparsevec) or none")])
def test_sinks_that_cannot_hold_sparse_rows_are_refused_in_one_line(
        tmp_path, texts_file, splade_folders, pg_dsn, table, sink, why):
    raw = sparse_job(texts_file, tmp_path / "out", splade_folders["top48"], table)
    raw["sink"] = [{"name": "s", "table": table, **sink}]
    refused = embedpipe("run", write_job_file(tmp_path / "j.toml", raw), env={DSN_ENV: pg_dsn})
    assert refused.returncode == 2
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('error: sink "s": ') and why in lines[0]
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_a_row_over_sparsevecs_limit_fails_the_load_naming_it(
        tmp_path, texts_file, splade_folders, pg_dsn, table):
    """The tiny random model activates ~28,000 of 30,522 entries a row: over pgvector's 16,000.
    The folder is written; the sink load fails in one line naming the row, the table untouched."""
    import psycopg
    out = tmp_path / "out"
    job = write_job_file(tmp_path / "j.toml",
                         sparse_job(texts_file, out, splade_folders["open"], table))
    result = embedpipe("run", job, env={DSN_ENV: pg_dsn})
    assert result.returncode != 0
    assert re.search(r'sink "pg": row id \d+ has [\d,]+ non-zero values and pgvector\'s '
                     r"sparsevec holds at most 16,000; set encode.max_active_dims <= 16000",
                     result.stderr + result.stdout)
    assert open_output(str(out)).count == len(TEXTS)  # the folder itself is complete
    with psycopg.connect(pg_dsn) as conn:
        assert conn.execute("SELECT to_regclass(%s)", (table,)).fetchone() == (None,)


def test_kill_during_the_sparsevec_copy_then_rerun_equals_the_folder(
        tmp_path, texts_file, splade_folders, pg_dsn, table):
    out = tmp_path / "out"
    job = write_job_file(tmp_path / "j.toml", sparse_job(
        texts_file, out, splade_folders["open"], table, encode={"max_active_dims": 64}))
    run_and_kill(job, "sink-copy", tmp_path, {DSN_ENV: pg_dsn})
    rerun = embedpipe("run", job, env={DSN_ENV: pg_dsn})
    assert rerun.returncode == 0, rerun.stderr
    want, got = folder_rows(out), table_rows(pg_dsn, table)
    assert got.keys() == want.keys()
    assert all(got[i].keys() == want[i].keys() for i in want)
    assert embedpipe("verify", out, env={DSN_ENV: pg_dsn}).returncode == 0
