"""Long texts as whole jobs: window rows through the index and search (documents collapsed
against brute force), a run killed while a long text's windows are in flight, the config guard,
`reject`, incremental runs, verify, and heads on pooled windows."""
from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from helpers import (embedpipe, index_paths, make_job, matrix, read_vectors, run, run_and_kill, small_job,
                     to_toml, write_shards)

from pipeline.io.ledger import SettingsMismatch

CHUNK = {"long_text": "chunk", "chunk_overlap": 8}


@pytest.fixture(scope="module")
def long_dir(tmp_path_factory, mixed_texts):
    """60 texts: 40 joined snippets (2-16 snippets long) and 20 short ones, in two files."""
    folder = tmp_path_factory.mktemp("long_texts")
    texts = mixed_texts[200:] + mixed_texts[:20]
    labels = ["long" if i < 40 else "short" for i in range(len(texts))]
    table = pa.table({"id": np.arange(len(texts)), "text": texts, "label": labels})
    write_shards(folder, [table.slice(0, 30), table.slice(30)])
    return folder, texts


def test_window_rows_round_trip_through_the_index_and_search(long_dir, tmp_path, tiny_model):
    from pipeline.commands.search import Searcher

    folder, texts = long_dir
    out = tmp_path / "rows"
    summary = run(make_job(folder, out, tiny_model, model={"max_length": 64}, encode=CHUNK,
                           output={"chunks": "rows", "keep_columns": ["text"]}))
    assert summary.exit_code == 0 and summary.rows_read == 60 and summary.vectors_written == 60
    table = read_vectors(out)
    assert table.num_rows == summary.windows == summary.folder_vectors > 60
    ids, chunks = table.column("id").to_numpy(), table.column("chunk").to_numpy()
    # every text's windows, numbered from 0, in input order; the kept text is the window's slice
    for i, text in enumerate(texts):
        mine = np.flatnonzero(ids == i)
        assert chunks[mine].tolist() == list(range(len(mine)))
        for row in mine:
            a, b = table.column("char_start")[row].as_py(), table.column("char_end")[row].as_py()
            assert table.column("text")[row].as_py() == text[a:b]
        assert table.column("char_end")[mine[-1]].as_py() == len(text)
    id_map = pq.read_table(index_paths(out)[1])
    assert id_map.column("id").to_pylist() == ids.tolist()
    assert id_map.column("chunk").to_pylist() == chunks.tolist()
    assert embedpipe("verify", out).returncode == 0

    # search: each document's best window, k documents, as brute force over the stored vectors
    vectors = matrix(table)
    searcher = Searcher(str(out))
    queries = vectors[[0, 17, len(vectors) - 1]] + 0.01
    scores, positions = searcher.search_vectors(queries, k=5)
    for q, query in enumerate(queries):
        sims = vectors @ query
        best = {}
        for row in np.argsort(-sims, kind="stable"):
            best.setdefault(ids[row], row)
        expected = list(best.values())[:5]
        assert [ids[p] for p in positions[q]] == [ids[p] for p in expected]
        np.testing.assert_allclose(scores[q], sims[expected], rtol=1e-5)
    per_chunk = Searcher(str(out), per_chunk=True).search_vectors(queries, k=5)[1]
    for q, query in enumerate(queries):  # every window a hit
        assert per_chunk[q].tolist() == np.argsort(-(vectors @ query), kind="stable")[:5].tolist()


@pytest.mark.slow
def test_search_cli_collapses_to_documents_and_shows_the_window(long_dir, tmp_path):
    folder, texts = long_dir
    out = tmp_path / "rows"
    run(make_job(folder, out, None, model={"max_length": 64}, encode=CHUNK,
                 output={"chunks": "rows", "keep_columns": ["text"]}))
    table = read_vectors(out)
    row = next(i for i in range(table.num_rows) if table.column("id")[i].as_py() == 35
               and table.column("chunk")[i].as_py() == 2)
    query = table.column("text")[row].as_py()  # the text of document 35's third window
    hits = json.loads(embedpipe("search", out, query, "-k", "8", "--json").stdout)
    assert len({h["id"] for h in hits}) == 8
    assert (hits[0]["id"], hits[0]["chunk"]) == (35, 2)
    for h in hits:
        assert texts[h["id"]][h["char_start"]:h["char_end"]] == h["text"]
    windows = json.loads(embedpipe("search", out, query, "-k", "8", "--per-chunk",
                                   "--json").stdout)
    assert len({(h["id"], h["chunk"]) for h in windows}) == 8
    assert windows[0] == hits[0]
    assert [h["score"] for h in windows] == sorted((h["score"] for h in windows), reverse=True)
    assert windows[-1]["score"] >= hits[-1]["score"]  # windows beat the 8th document's best


@pytest.mark.parametrize("chunks", ["rows", "pool"])
def test_killed_while_windows_are_in_flight_then_rerun_equals_a_clean_run(long_dir, tmp_path,
                                                                          tiny_model, chunks):
    folder, _ = long_dir
    sections = {"encode": {**CHUNK, "sort_window": 16}, "output": {"chunks": chunks}}
    clean = small_job(tmp_path / "clean.toml", folder, tmp_path / "clean", tiny_model, **sections)
    assert embedpipe("run", clean).returncode == 0
    job = small_job(tmp_path / "job.toml", folder, tmp_path / "out", tiny_model, **sections)
    run_and_kill(job, "encode:4", tmp_path)  # mid-unit: some windows of long texts encoded
    rerun = embedpipe("run", job, "--json")
    assert rerun.returncode == 0, rerun.stderr
    got, expected = read_vectors(tmp_path / "out"), read_vectors(tmp_path / "clean")
    assert got.drop_columns(["vector"]).equals(expected.drop_columns(["vector"]))
    np.testing.assert_array_equal(matrix(got), matrix(expected))
    assert embedpipe("verify", tmp_path / "out").returncode == 0


def test_config_guard_refuses_a_changed_window(long_dir, tmp_path, tiny_model):
    folder, _ = long_dir
    job = make_job(folder, tmp_path / "out", tiny_model, model={"max_length": 64}, encode=CHUNK)
    run(job)
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["vector_settings"]["encode.chunk_tokens"] == 62  # resolved: 64 less 2
    for change in ({"chunk_tokens": 40}, {"chunk_overlap": 4}, {"long_text": "truncate"}):
        changed = make_job(folder, tmp_path / "out", tiny_model, model={"max_length": 64},
                           encode={**CHUNK, **change})
        with pytest.raises(SettingsMismatch, match="encode.chunk_tokens|encode.chunk_overlap"
                                                   "|encode.long_text"):
            run(changed)
    run(make_job(folder, tmp_path / "out", tiny_model, model={"max_length": 64},
                 encode={**CHUNK, "chunk_tokens": 62}))  # the same value, given: accepted


def test_reject_mode_rejects_texts_over_one_window(long_dir, tmp_path, tiny_model):
    folder, texts = long_dir
    out = tmp_path / "out"
    summary = run(make_job(folder, out, tiny_model, model={"max_length": 64},
                           encode={"long_text": "reject"}))
    assert summary.exit_code == 0
    kept = read_vectors(out)
    rejects = pq.read_table(out / "rejects")
    assert summary.rows_read == kept.num_rows + rejects.num_rows == len(texts)
    assert set(rejects.column("reason").to_pylist()) == {"too long"}
    assert summary.rejects == {"too long": rejects.num_rows} and rejects.num_rows >= 30
    assert not any(kept.column("truncated").to_pylist())
    assert summary.exit_code == 0


def test_incremental_runs_keep_window_rows_equal_to_a_fresh_run(long_dir, tmp_path, tiny_model,
                                                                mixed_texts):
    folder, _ = long_dir
    work = tmp_path / "in"
    work.mkdir()
    for f in folder.iterdir():
        (work / f.name).write_bytes(f.read_bytes())
    sections = {"model": {"max_length": 64}, "encode": CHUNK, "output": {"chunks": "rows"}}
    run(make_job(work, tmp_path / "inc", tiny_model, **sections))
    extra = pa.table({"id": np.arange(100, 110), "text": mixed_texts[230:240],
                      "label": ["long"] * 10})
    pq.write_table(extra, work / "part-00002.parquet")
    (work / "part-00000.parquet").unlink()
    summary = run(make_job(work, tmp_path / "inc", tiny_model, **sections))
    assert summary.units_skipped == 1 and summary.units_removed == 1 and summary.units_done == 1
    run(make_job(work, tmp_path / "fresh", tiny_model, **sections))
    got, fresh = read_vectors(tmp_path / "inc"), read_vectors(tmp_path / "fresh")
    key = lambda t: sorted(zip(t.column("id").to_pylist(), t.column("chunk").to_pylist()))
    assert key(got) == key(fresh)
    assert embedpipe("verify", tmp_path / "inc").returncode == 0


def test_heads_train_on_pooled_windows_and_predict_alike(long_dir, tmp_path, tiny_model):
    from pipeline.commands.heads import HeadOptions, load_training_set
    from pipeline.commands.query import EmbeddingRecord, TextEmbedder
    from pipeline.io.manifest import read_manifest
    from pipeline.io.storage import Store

    folder, texts = long_dir
    out = tmp_path / "rows"
    run(make_job(folder, out, tiny_model, model={"max_length": 64}, encode=CHUNK,
                 output={"chunks": "rows", "keep_columns": ["label"]}))
    refused = embedpipe("train-head", out, "--label-column", "label")
    assert refused.returncode == 2 and "--pool" in refused.stderr
    data = load_training_set(str(out), HeadOptions("label", pool=True))
    assert data.rows["vectors"] == len(texts) and data.labels[0] == "long"
    # predict embeds a new text window by window and pools it exactly so
    record = EmbeddingRecord.from_manifest(read_manifest(Store(str(out))))
    again = TextEmbedder(record).embed(texts)
    np.testing.assert_allclose(again, data.vectors, atol=1e-5)
    trained = embedpipe("train-head", out, "--label-column", "label", "--pool", "--json")
    assert trained.returncode == 0, trained.stderr
    assert json.loads(trained.stdout)["pooled_windows"] is True
    pred = embedpipe("predict", out / "heads" / "label", folder, "--out", tmp_path / "p.parquet")
    assert pred.returncode == 0, pred.stderr
    assert pq.read_table(tmp_path / "p.parquet").num_rows == len(texts)


def test_pool_folder_vectors_are_what_predict_embeds(long_dir, tmp_path, tiny_model):
    from pipeline.commands.query import EmbeddingRecord, TextEmbedder
    from pipeline.io.manifest import read_manifest
    from pipeline.io.storage import Store

    folder, texts = long_dir
    out = tmp_path / "pool"
    run(make_job(folder, out, tiny_model, model={"max_length": 64}, encode=CHUNK))
    record = EmbeddingRecord.from_manifest(read_manifest(Store(str(out))))
    np.testing.assert_allclose(TextEmbedder(record).embed(texts), matrix(read_vectors(out)),
                               atol=1e-5)


def test_chunk_settings_are_checked_at_load(tmp_path):
    from pipeline.config import ConfigError, load_job

    cases = {
        "encode.chunk_overlap = 8 must be less than": {"encode": {"long_text": "chunk",
                                                                  "chunk_tokens": 8,
                                                                  "chunk_overlap": 8}},
        "needs encode.long_text = 'chunk'": {"output": {"chunks": "rows"}},
        "does not take sentence pairs": {"encode": {"long_text": "chunk"},
                                         "input": {"text_pair_column": "b"}},
        "'sometimes' is not one of truncate, chunk, reject": {"encode": {"long_text": "sometimes"}},
    }
    for message, sections in cases.items():
        path = tmp_path / "job.toml"
        path.write_text(to_toml(make_job("in", "out", None, **sections)))
        with pytest.raises(ConfigError, match=message):
            load_job(path)
