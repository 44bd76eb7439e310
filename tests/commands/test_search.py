"""`embedpipe search`: queries encoded as the run did, against the real index of real snippets."""
from __future__ import annotations

import json
import shutil
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from helpers import matrix, read_vectors
from pipeline.cli import main
from pipeline.config import ConfigError
from pipeline.commands.search import Searcher


@pytest.fixture(scope="module")
def searcher(snippets_out) -> Searcher:
    return Searcher(str(snippets_out))


@pytest.fixture(scope="module")
def stored(snippets_out) -> pa.Table:
    return read_vectors(snippets_out)


def unique_texts(stored: pa.Table, n: int) -> list[tuple[int, str]]:
    """(id, text) of stored rows whose text occurs once, spread over the folder."""
    texts = stored.column("text").to_pylist()
    counts = Counter(t.strip().lower() for t in texts)
    ids = stored.column("id").to_pylist()
    rows = [i for i, t in enumerate(texts) if counts[t.strip().lower()] == 1 and len(t.split()) > 4]
    return [(ids[i], texts[i]) for i in rows[:: max(1, len(rows) // n)][:n]]


def test_own_text_comes_first(searcher, stored):
    picks = unique_texts(stored, 12)
    hits = searcher.search([t for _, t in picks], k=5).to_pylist()
    firsts = [h for h in hits if h["rank"] == 1]
    assert [h["id"] for h in firsts] == [i for i, _ in picks]
    assert all(h["score"] > 0.999 for h in firsts)  # cosine with itself
    assert [h["text"] for h in firsts] == [t for _, t in picks]  # the kept text comes along
    assert {h["label"] for h in firsts} <= {"positive", "negative", None}


def test_query_vector_and_hits_match_independent_references(searcher, stored, bundled_model):
    """The query encoder against sentence-transformers; the hits against numpy brute force."""
    from sentence_transformers import SentenceTransformer

    queries = ["a warm, funny film with a great cast", "dull, overlong and badly acted",
               "the soundtrack is the best thing about it"]
    ours = searcher.embedder.embed(queries)
    st = SentenceTransformer(str(bundled_model.path), device="cpu")
    st.max_seq_length = 128
    reference = st.encode(queries, normalize_embeddings=True, convert_to_numpy=True)
    cos = (ours * reference).sum(1) / np.linalg.norm(ours, axis=1) / np.linalg.norm(reference, axis=1)
    assert cos.min() > 0.9999

    vectors = matrix(stored)
    truth = np.argsort(-(reference @ vectors.T), axis=1)[:, :10]
    hits = searcher.search(queries, k=10)
    ids = np.array(stored.column("id").to_pylist())
    for q in range(len(queries)):
        found = [h["id"] for h in hits.to_pylist() if h["query"] == q]
        assert found == ids[truth[q]].tolist()


def test_batch_equals_one_by_one(searcher, stored, tmp_path):
    queries = [t for _, t in unique_texts(stored, 6)] + ["an utterly forgettable sequel",
                                                         "great performances all round"]
    batch = searcher.search(queries, k=7).to_pylist()
    for q, text in enumerate(queries):
        single = searcher.search([text], k=7).to_pylist()
        mine = [h for h in batch if h["query"] == q]
        assert [h["id"] for h in mine] == [h["id"] for h in single]
        np.testing.assert_allclose([h["score"] for h in mine], [h["score"] for h in single],
                                   atol=1e-5)

    # --queries FILE: the same hits, written to Parquet, with the queries' own ids
    qfile = tmp_path / "queries.parquet"
    pq.write_table(pa.table({"id": [100 + i for i in range(len(queries))], "text": queries}), qfile)
    out = tmp_path / "hits.parquet"
    result = CliRunner().invoke(main, ["search", str(searcher.store.url), "--queries", str(qfile),
                                       "--out", str(out), "-k", "7"])
    assert result.exit_code == 0, result.output
    written = pq.read_table(out)
    assert written.column_names[:5] == ["query_id", "query", "rank", "id", "score"]
    assert written.column("query_id").to_pylist() == [100 + h["query"] for h in batch]
    assert written.column("id").to_pylist() == [h["id"] for h in batch]
    np.testing.assert_allclose(written.column("score").to_numpy(), [h["score"] for h in batch],
                               atol=1e-5)


def test_cli_prints_rank_id_score_text(snippets_out, stored):
    (own_id, text), = unique_texts(stored, 1)
    result = CliRunner().invoke(main, ["search", str(snippets_out), text, "-k", "3"])
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    assert lines[0].split()[:3] == ["rank", "id", "score"] and lines[0].split()[-1] == "text"
    assert lines[1].split()[:2] == ["1", str(own_id)] and len(lines) == 4
    as_json = CliRunner().invoke(main, ["search", str(snippets_out), text, "-k", "3", "--json"])
    hits = json.loads(as_json.output)
    assert [h["rank"] for h in hits] == [1, 2, 3] and hits[0]["id"] == own_id
    assert hits[0]["text"] == text


def test_loading_and_searching_read_no_vectors(snippets_out, monkeypatch):
    import pipeline.io.vectors as vectors

    def refuse(*args, **kwargs):
        raise AssertionError("search read the stored vectors")

    monkeypatch.setattr(vectors, "to_matrix", refuse)
    monkeypatch.setattr(vectors.VectorParts, "vectors", refuse)
    real_read = pq.ParquetFile.read_row_group

    def no_vector_columns(self, i, columns=None, **kwargs):
        assert columns is not None and "vector" not in columns
        return real_read(self, i, columns=columns, **kwargs)

    monkeypatch.setattr(pq.ParquetFile, "read_row_group", no_vector_columns)
    hits = Searcher(str(snippets_out)).search(["a gripping thriller"], k=3)
    assert hits.num_rows == 3 and hits.column("text").null_count == 0


def _copy(snippets_out, tmp_path):
    target = tmp_path / "copy"
    shutil.copytree(snippets_out, target)
    return target


def test_other_embedding_settings_are_refused(snippets_out, tmp_path):
    out = _copy(snippets_out, tmp_path)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["vector_settings"]["model.fingerprint"] = "0123456789abcdef"  # other weights
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ConfigError, match="model.fingerprint"):
        Searcher(str(out))
    result = CliRunner().invoke(main, ["search", str(out), "anything"])
    assert result.exit_code == 2 and "refusing" in result.output


def test_missing_model_is_refused(snippets_out, tmp_path):
    out = _copy(snippets_out, tmp_path)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["config"]["model"]["name"] = str(tmp_path / "no-such-model")
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ConfigError, match="no model found"):
        Searcher(str(out))


@pytest.mark.parametrize("query", ["", "   ", "\t\n", "\u3000\u2003"])
def test_an_empty_or_blank_query_is_refused_in_one_line(snippets_out, query):
    from helpers import embedpipe

    result = embedpipe("search", snippets_out, query)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.splitlines() == [
        "error: QUERY is empty or white space only: give the text to search for"]
