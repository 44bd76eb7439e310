"""Sparse (SPLADE) output (issue #28): tiny random SparseEncoder folders of each kind, saved by
sentence-transformers itself; the stored rows against its encode_document, queries against its
encode_query, search against a brute-force dot product, and reuse, resume, verify and the config
guard on sparse folders."""
from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from helpers import (embedpipe, make_job, read_vectors, run, run_and_kill, small_job, film_texts,
                     write_shards)
from pipeline.io.output import open_output

MAX_LENGTH = 64  # the tiny folders' max_seq_length (their tokenizer's model_max_length)
LONG = " ".join(["the warm film has a slow ending"] * 20)  # past max_length


def _st_folder(base, path, kind):
    import torch
    from sentence_transformers import SparseEncoder
    from sentence_transformers.base.modules import Router, Transformer
    from sentence_transformers.sparse_encoder.modules import (MLMTransformer,
                                                              SparseStaticEmbedding,
                                                              SpladePooling)

    torch.manual_seed(1)
    mlm = MLMTransformer(str(base), max_seq_length=MAX_LENGTH)
    if kind == "splade-max":
        model = SparseEncoder(modules=[mlm, SpladePooling("max")])
    elif kind == "fill-mask-transformer":  # sentence-transformers 5.4+'s layout of SPLADE
        model = SparseEncoder(modules=[Transformer(str(base), transformer_task="fill-mask",
                                                   max_seq_length=MAX_LENGTH),
                                       SpladePooling("max")])
    elif kind == "splade-sum-top":  # sum pooling, 48 active dimensions a row (the folder's)
        model = SparseEncoder(modules=[mlm, SpladePooling("sum")], max_active_dims=48)
    else:  # inference-free: the query side a SparseStaticEmbedding behind a Router
        static = SparseStaticEmbedding(tokenizer=mlm.tokenizer, weight=torch.rand(30522),
                                       frozen=True)
        router = Router.for_query_document(query_modules=[static],
                                           document_modules=[mlm, SpladePooling("max")])
        model = SparseEncoder(modules=[router], similarity_fn_name="dot")
    model.save(str(path))
    return path


KINDS = ("splade-max", "fill-mask-transformer", "splade-sum-top", "inference-free")


@pytest.fixture(scope="module")
def sparse_folders(tmp_path_factory, bundled_model):
    """A 2-layer, 32-wide random BertForMaskedLM with the real tokenizer, as each folder kind."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForMaskedLM

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("sparse_models")
    base = root / "mlm"
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=64, max_position_embeddings=128)
    BertForMaskedLM(config).eval().save_pretrained(base)
    AutoTokenizer.from_pretrained(bundled_model.path).save_pretrained(base)
    return {kind: _st_folder(base, root / kind, kind) for kind in KINDS}


def _reference(folder):
    from sentence_transformers import SparseEncoder
    return SparseEncoder(str(folder), device="cpu")


def _dense(tensor) -> np.ndarray:
    return tensor.coalesce().to_dense().float().numpy()


TEXTS = film_texts(24) + [LONG, "a warm film", "A Warm Film!"]


@pytest.fixture(scope="module")
def sparse_runs(sparse_folders, tmp_path_factory):
    """Each kind run once with the defaults (pooling auto, an index asked for by default)."""
    root = tmp_path_factory.mktemp("sparse_runs")
    pq.write_table(pa.table({"id": np.arange(len(TEXTS)), "text": TEXTS}), root / "in.parquet")
    outs = {}
    for kind, folder in sparse_folders.items():
        outs[kind] = root / kind
        summary = run(make_job(root / "in.parquet", outs[kind], folder,
                               model={"dtype": "float32"}, output={"keep_columns": ["text"]}))
        assert not summary.failures and summary.precision == "sparse"
        assert "no FAISS index" in " ".join(summary.recipe)
    return outs


def _assert_same_rows(got, expected: np.ndarray):
    """Same non-zero dimensions in every row, values within 1e-4."""
    got = got.toarray()
    assert got.shape == expected.shape
    np.testing.assert_array_equal(got != 0, expected != 0)
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_stored_rows_equal_encode_document(sparse_folders, sparse_runs, kind):
    out = sparse_runs[kind]
    table = read_vectors(out)
    assert "vector" not in table.column_names
    assert table.schema.field("sparse_indices").type == pa.list_(pa.int32())
    assert table.schema.field("sparse_values").type == pa.list_(pa.float32())
    for indices in table.column("sparse_indices").to_pylist():
        assert indices == sorted(set(indices))  # ascending, no repeats
    assert table.column("truncated").to_pylist()[len(TEXTS) - 3] is True  # LONG
    assert table.column("id").to_pylist() == list(range(len(TEXTS)))
    rows = open_output(str(out)).sparse()
    assert rows.shape == (len(TEXTS), 30522)
    expected = _dense(_reference(sparse_folders[kind]).encode_document(TEXTS))
    _assert_same_rows(rows, expected)
    if kind == "splade-sum-top":
        assert ((expected != 0).sum(1) == 48).all()  # the folder's max_active_dims applied
    assert not (out / "index").exists()  # a sparse folder has no FAISS index
    with pytest.raises(Exception, match="sparse"):
        open_output(str(out)).vectors()


@pytest.mark.parametrize("kind", KINDS)
def test_queries_equal_encode_query(sparse_folders, sparse_runs, kind):
    from pipeline.commands.query import EmbeddingRecord
    from pipeline.commands.sparse_search import SparseQueries
    from pipeline.io.manifest import read_manifest
    from pipeline.io.storage import Store

    queries = ["warm funny film", LONG, "the plot", "Cast!"]
    record = EmbeddingRecord.from_manifest(read_manifest(Store(str(sparse_runs[kind]))))
    got = SparseQueries(record, purpose="query").embed(queries)
    expected = _dense(_reference(sparse_folders[kind]).encode_query(queries))
    _assert_same_rows(got, expected)
    if kind == "inference-free":  # the static side: only the query's own tokens weigh
        assert (expected != 0).sum(1).max() < 200


@pytest.mark.parametrize("kind", KINDS)
def test_search_returns_the_brute_force_top_10(sparse_folders, sparse_runs, kind):
    out = sparse_runs[kind]
    queries = ["warm funny film", "slow story ending", "the music"]
    # brute force: the parts read by pyarrow, the queries by sentence-transformers, numpy's dot
    table = read_vectors(out)
    matrix = np.zeros((table.num_rows, 30522))
    for row, (idx, val) in enumerate(zip(table.column("sparse_indices").to_pylist(),
                                         table.column("sparse_values").to_pylist())):
        matrix[row, idx] = val
    scores = matrix @ _dense(_reference(sparse_folders[kind]).encode_query(queries)).T
    for q, query in enumerate(queries):
        result = embedpipe("search", out, query, "-k", "10", "--json")
        assert result.returncode == 0, result.stderr
        hits = json.loads(result.stdout)
        expected = np.lexsort((np.arange(len(matrix)), -scores[:, q]))[:10]
        assert [h["id"] for h in hits] == expected.tolist()
        np.testing.assert_allclose([h["score"] for h in hits], scores[expected, q], rtol=1e-5)
        assert all("text" in h for h in hits)
    for args in (("search", out, "warm", "--rescore", "2"), ("index", out)):
        refused = embedpipe(*args)
        assert refused.returncode == 2 and len(refused.stderr.strip().splitlines()) == 1
        assert "sparse" in refused.stderr


def _shards(folder, changed: bool = False):
    tables = [pa.table({"id": np.arange(i * 20, i * 20 + 20), "text": film_texts(20, i)})
              for i in range(3)]
    if changed:  # one row's text changed, a fourth shard added
        texts = tables[1].column("text").to_pylist()
        texts[5] = LONG
        tables[1] = tables[1].set_column(1, "text", pa.array(texts))
        tables.append(pa.table({"id": np.arange(60, 75), "text": film_texts(15, 9)}))
    write_shards(folder, tables)
    return folder


def test_incremental_run_reuses_rows_and_equals_a_clean_run(sparse_folders, tmp_path):
    folder = sparse_folders["splade-sum-top"]
    _shards(tmp_path / "in")
    first = run(make_job(tmp_path / "in", tmp_path / "out", folder, model={"dtype": "float32"}))
    assert first.rows_encoded == 60
    _shards(tmp_path / "in", changed=True)
    night = run(make_job(tmp_path / "in", tmp_path / "out", folder, model={"dtype": "float32"}))
    assert night.rows_encoded == 1 + 15 and night.rows_reused == 59
    clean = run(make_job(tmp_path / "in", tmp_path / "clean", folder, model={"dtype": "float32"},
                         encode={"reuse": "off"}))
    assert clean.rows_encoded == 75
    got, expected = read_vectors(tmp_path / "out"), read_vectors(tmp_path / "clean")
    for name in ("id", "sparse_indices", "n_tokens", "truncated", "text_hash"):
        assert got.column(name).equals(expected.column(name)), name
    # splade-sum values reach ~16, where float32's spacing is ~2e-6: a row encoded beside other
    # rows (the runs batch them differently) sums its tokens in another order, so rows agree to
    # float32 rounding, relative to their size
    np.testing.assert_allclose(open_output(str(tmp_path / "out")).sparse().toarray(),
                               open_output(str(tmp_path / "clean")).sparse().toarray(),
                               rtol=1e-5, atol=1e-6)
    assert embedpipe("verify", tmp_path / "out").returncode == 0


def test_repeated_texts_are_copied(sparse_folders, tmp_path):
    texts = film_texts(10) * 3
    pq.write_table(pa.table({"id": np.arange(30), "text": texts}), tmp_path / "in.parquet")
    summary = run(make_job(tmp_path / "in.parquet", tmp_path / "out",
                           sparse_folders["splade-sum-top"], model={"dtype": "float32"}))
    assert (summary.rows_encoded, summary.rows_copied) == (10, 20)
    rows = open_output(str(tmp_path / "out")).sparse().toarray()
    np.testing.assert_array_equal(rows[:10], rows[10:20])
    np.testing.assert_array_equal(rows[:10], rows[20:])


def test_killed_run_then_rerun_equals_a_clean_run(sparse_folders, tmp_path):
    folder = sparse_folders["splade-max"]
    _shards(tmp_path / "in")
    sections = {"model": {"dtype": "float32"}}
    clean = small_job(tmp_path / "clean.toml", tmp_path / "in", tmp_path / "clean", folder,
                      **sections)
    assert embedpipe("run", clean).returncode == 0
    job = small_job(tmp_path / "job.toml", tmp_path / "in", tmp_path / "out", folder, **sections)
    run_and_kill(job, "encode:3", tmp_path)
    rerun = embedpipe("run", job)
    assert rerun.returncode == 0, rerun.stderr
    got, expected = read_vectors(tmp_path / "out"), read_vectors(tmp_path / "clean")
    assert got.drop_columns(["faiss_id"]).equals(expected.drop_columns(["faiss_id"]))
    assert embedpipe("verify", tmp_path / "out").returncode == 0


def test_verify_finds_a_changed_sparse_value(sparse_runs, tmp_path):
    import shutil

    out = shutil.copytree(sparse_runs["splade-max"], tmp_path / "out")
    ok = embedpipe("verify", out)
    assert ok.returncode == 0 and "(sparse)" in ok.stdout and "no index" in ok.stdout
    part = next((out / "vectors").glob("*.parquet"))
    table = pq.read_table(part)
    values = table.column("sparse_values").to_pylist()
    values[3][7] += 0.5
    table = table.set_column(table.schema.get_field_index("sparse_values"), "sparse_values",
                             pa.array(values, pa.list_(pa.float32())))
    pq.write_table(table, part)
    found = embedpipe("verify", out)
    assert found.returncode == 1 and part.name in found.stdout


def test_broken_sparse_rows_are_named(sparse_runs, tmp_path):
    """The rows' own shape (indices ascending, inside the vocabulary) checked by verify."""
    from pipeline.io.sparse_rows import sparse_problems
    from pipeline.io.storage import Store
    from pipeline.io.vectors import VectorParts
    from pipeline.io.writer import sparse_fields

    schema = pa.schema(sparse_fields(100))
    good = pa.table({"sparse_indices": [[1, 5, 9], [0, 99]],
                     "sparse_values": [[1.0, 2.0, 3.0], [0.5, 0.25]]}, schema)
    pq.write_table(good, tmp_path / "good.parquet")
    for name, rows in (("down", [[1, 9, 5], [0, 99]]), ("out", [[1, 5, 9], [0, 100]])):
        bad = pa.table({"sparse_indices": rows, "sparse_values": good.column(1)}, schema)
        pq.write_table(bad, tmp_path / f"{name}.parquet")
    parts = VectorParts(Store(str(tmp_path)), ["good.parquet", "down.parquet", "out.parquet"])
    problems = sparse_problems(parts)
    assert len(problems) == 2
    assert "down.parquet" in problems[0] and "ascending" in problems[0]
    assert "out.parquet" in problems[1] and "vocabulary" in problems[1]


def test_config_guard_refuses_a_dense_model_on_a_sparse_folder(sparse_folders, tiny_model,
                                                               tmp_path):
    _shards(tmp_path / "in")
    sparse = make_job(tmp_path / "in", tmp_path / "out", sparse_folders["splade-max"],
                      model={"dtype": "float32"})
    assert not run(sparse).failures
    for model, extra in ((tiny_model, {}), (sparse_folders["splade-sum-top"], {}),
                         (sparse_folders["splade-max"], {"encode": {"max_active_dims": 8}})):
        job = small_job(tmp_path / "job.toml", tmp_path / "in", tmp_path / "out", model,
                        model={"dtype": "float32", "max_length": MAX_LENGTH}, **extra)
        result = embedpipe("run", job)
        assert result.returncode == 2, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("sections", [
    {"output": {"precision": "int8"}}, {"encode": {"normalize": True}},
    {"output": {"granularity": "subword"}}, {"encode": {"long_text": "chunk"}},
    {"encode": {"pooling": "mean", "max_active_dims": 4}},
])
def test_settings_that_do_not_apply_are_refused(sparse_folders, tiny_model, tmp_path, sections):
    _shards(tmp_path / "in")
    model = tiny_model if sections.get("encode", {}).get("pooling") == "mean" \
        else sparse_folders["splade-max"]
    job = small_job(tmp_path / "job.toml", tmp_path / "in", tmp_path / "out", model, **sections)
    result = embedpipe("run", job)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not (tmp_path / "out").exists()


def test_splade_pooling_on_a_dense_folder_is_refused(tiny_model, tmp_path):
    _shards(tmp_path / "in")
    job = small_job(tmp_path / "job.toml", tmp_path / "in", tmp_path / "out", tiny_model,
                    encode={"pooling": "splade-max"})
    result = embedpipe("run", job)
    assert result.returncode == 2 and "SparseEncoder" in result.stderr
