"""The CLI end to end on real shards and the real model: files, schema, order, counts, manifest, index."""
from __future__ import annotations

import json

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from helpers import embedpipe, index_paths, matrix, read_vectors, write_job, write_shards

JOB = """
name = "e2e"
[input]
path = "{input}"
[model]
max_length = 128
[encode]
normalize = true
sort_window = 64
batch_tokens = 2048
[output]
path = "{output}"
rows_per_file = 70
"""


@pytest.fixture(scope="module")
def shards(tmp_path_factory, movie_table):
    """Three shards of real snippets (one long text truncated), string ids that don't sort like rows."""
    folder = tmp_path_factory.mktemp("e2e_input")
    texts = movie_table.column("text").to_pylist()[:240]
    texts[5] = " ".join(texts[:40])  # far beyond 128 tokens
    ids = [f"doc-{(i * 7919) % 1000:04d}" for i in range(240)]
    write_shards(folder, [pa.table({"id": ids[a:a + 80], "text": texts[a:a + 80]})
                          for a in (0, 80, 160)])
    return folder, ids, texts


@pytest.fixture(scope="module")
def finished(tmp_path_factory, shards):
    folder, ids, texts = shards
    out = tmp_path_factory.mktemp("e2e") / "out"
    job = out.parent / "job.toml"
    job.write_text(JOB.format(input=folder, output=out))
    result = embedpipe("run", job, "--json")
    assert result.returncode == 0, result.stderr
    return out, json.loads(result.stdout), job


def test_outputs_schema_order_and_counts(finished, shards):
    out, summary, _ = finished
    _, ids, texts = shards
    assert summary["rows_read"] == summary["vectors_written"] == 240
    assert summary["rejected"] == 0 and summary["accounted"] is True
    assert summary["truncated"] == 1
    assert summary["real_tokens"] > 0 and 0 <= summary["padding_overhead_pct"] < 100
    table = read_vectors(out)
    assert table.column("id").to_pylist() == ids  # input order kept across shards and parts
    assert table.schema.field("vector").type == pa.list_(pa.float32(), 384)
    assert table.schema.field("n_tokens").type == pa.int32()
    assert table.column("truncated").to_pylist() == [i == 5 for i in range(240)]
    assert table.column("n_tokens")[5].as_py() > 128
    parts = sorted(p.name for p in (out / "vectors").iterdir())
    assert parts == ["part-00000-0000.parquet", "part-00000-0001.parquet",
                     "part-00001-0000.parquet", "part-00001-0001.parquet",
                     "part-00002-0000.parquet", "part-00002-0001.parquet"]
    assert [pq.ParquetFile(out / "vectors" / p).metadata.num_rows for p in parts] == [70, 10] * 3
    assert not list(out.rglob("*.tmp-*")) and not (out / ".lock").exists()


def test_manifest_records_what_made_the_folder(finished, bundled_model):
    out, _, _ = finished
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] is True
    assert manifest["dim"] == 384
    assert manifest["model"]["fingerprint"] == bundled_model.fingerprint
    assert manifest["vector_settings"]["encode.pooling"] == "mean"
    assert manifest["vector_settings"]["model.max_length"] == 128
    assert len(manifest["settings_hash"]) == 16
    assert {"torch", "transformers", "pyarrow", "faiss"} <= set(manifest["versions"])
    assert sum(u["vectors_out"] for u in manifest["units"].values()) == 240
    assert all(u["status"] == "complete" for u in manifest["units"].values())
    # the run's own choices, resolved: 240 rows are far too few to repay compiling
    assert manifest["config"]["model"]["compile"] is False
    assert manifest["config"]["model"]["attention"] in ("sdpa", "amx", "avx512")


def test_every_vector_is_its_own_nearest_neighbour_and_ids_round_trip(finished, shards):
    out, _, _ = finished
    _, ids, _ = shards
    vectors = matrix(read_vectors(out))
    index = faiss.read_index(str(index_paths(out)[0]))
    assert index.ntotal == 240 and index.d == 384
    id_map = pq.read_table(index_paths(out)[1])
    labels = id_map.column("faiss_id").to_numpy()  # FAISS labels, (unit << 32) | row, row order
    assert (np.diff(labels) > 0).all() and (labels & 0xFFFFFFFF).min() == 0
    scores, found = index.search(vectors, 1)
    found = np.searchsorted(labels, found)  # labels rise with the row order: rows
    # A few snippets repeat word for word; for those any copy is an equally good answer.
    exact = (vectors @ vectors.T)[np.arange(240), found[:, 0]]
    assert np.allclose(exact, 1.0, atol=1e-5)
    assert (found[:, 0] == np.arange(240)).mean() > 0.97
    assert id_map.column("id").to_pylist() == ids
    infos = json.loads((out / "index" / "index_infos.json").read_text())
    assert infos["count"] == 240 and infos["dimension"] == 384 and infos["recall_at_10"] == 1.0


def test_integer_ids_round_trip_through_the_index(tmp_path, movie_table):
    folder = tmp_path / "in"
    texts = movie_table.column("text").to_pylist()[:60]
    ids = [37 * i for i in range(30)] + [10_000_000_000 + i for i in range(30)]  # sparse
    write_shards(folder, [pa.table({"id": pa.array(ids[:30], pa.int32()), "text": texts[:30]}),
                          pa.table({"id": pa.array(ids[30:], pa.int64()), "text": texts[30:]})])
    job = write_job(tmp_path / "job.toml", folder, tmp_path / "out", model={"max_length": 64})
    assert embedpipe("run", job).returncode == 0
    id_map = pq.read_table(index_paths(tmp_path / "out")[1])
    assert id_map.schema.field("id").type == pa.int64()
    assert id_map.column("id").to_pylist() == ids


def test_summary_screen_and_rerun_skips_everything(finished):
    out, _, job = finished
    result = embedpipe("run", job)
    assert result.returncode == 0, result.stderr
    assert "0 embedded, 3 already done" in result.stdout
    assert ", attention " in result.stdout and "compiled" not in result.stdout
    assert "240 vectors" in result.stdout


def test_missing_column_names_the_columns_that_exist(tmp_path, shards):
    folder, _, _ = shards
    job = write_job(tmp_path / "job.toml", folder, tmp_path / "out", input={"text_column": "body"})
    result = embedpipe("run", job)
    assert result.returncode == 2
    assert "'body'" in result.stderr and "id, text" in result.stderr


def test_unknown_model_path_says_what_was_looked_for(tmp_path, shards):
    folder, _, _ = shards
    job = write_job(tmp_path / "job.toml", folder, tmp_path / "out", tmp_path / "no-model")
    result = embedpipe("run", job)
    assert result.returncode == 2
    assert str(tmp_path / "no-model") in result.stderr and "config.json" in result.stderr


def test_help_explains():
    result = embedpipe("run", "--help")
    assert result.returncode == 0
    for word in ("--set", "--mode", "incremental", "overwrite", "--json", "--keep-removed"):
        assert word in result.stdout
