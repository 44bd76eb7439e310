"""Multi-vector (ColBERT) folders in a LanceDB sink (issue #28): the table's multi-vector column
against the folder's token vectors read by pyarrow, `search --sink` against embedpipe's exact
MaxSim and a numpy brute force, incremental runs, verify / sync repairing a changed row, a kill
during the load, and the refusals (pgvector, a folder not normalized)."""
from __future__ import annotations

import string
import time
import uuid

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from helpers import embedpipe, film_texts, make_job, run, run_and_kill, write_shards
from test_sinks import write_job_file

pytestmark = pytest.mark.sinks
QUERIES = ["warm funny film", "slow story ending", "the music and the cast", "actor"]


@pytest.fixture(scope="module")
def colbert_folders(tmp_path_factory, tiny_model):
    """Tiny random MultiVectorEncoder folders saved by sentence-transformers: with a Normalize
    module (unit-length tokens) and without one."""
    import torch
    from sentence_transformers import MultiVectorEncoder
    from sentence_transformers.base.modules import Dense, Normalize, Transformer
    from sentence_transformers.multi_vector_encoder.modules import MultiVectorMask

    root = tmp_path_factory.mktemp("mv_sink_models")
    out = {}
    for name, normalize in (("colbert", True), ("plain", False)):
        torch.manual_seed(3)
        modules = [Transformer(str(tiny_model), max_seq_length=64,
                               query_expansion={"strategy": "fixed", "length": 16}),
                   Dense(32, 16, bias=False, activation_function=torch.nn.Identity(),
                         module_input_name="token_embeddings"),
                   MultiVectorMask(skiplist_words=list(string.punctuation))]
        if normalize:
            modules.append(Normalize(module_input_name="token_embeddings"))
        MultiVectorEncoder(modules=modules, prompts={"query": "[Q] ", "document": "[D] "}
                           ).save(str(root / name))
        out[name] = root / name
    return out


def _shards(folder, changed: bool = False):
    """Three shards of 20 distinct film texts (ids 0..59); changed: one text of the second
    shard changed, the third removed, a fourth added."""
    texts = [film_texts(20, i) for i in range(4)]
    assert len(set(sum(texts, []))) == 80  # no two rows tie by having the same text
    if changed:
        texts[1][5] = "a slow warm story with great music"
        (folder / "part-00002.parquet").unlink()
        write_shards(folder, [pa.table({"id": np.arange(20, 40), "text": texts[1]}),
                              pa.table({"id": np.arange(60, 80), "text": texts[3]})],
                     ["part-00001.parquet", "part-00003.parquet"])
    else:
        write_shards(folder, [pa.table({"id": np.arange(i * 20, i * 20 + 20), "text": texts[i]})
                              for i in range(3)])
    return folder


def _job(tmp_path, model, table, kind="lancedb", **sections) -> dict:
    merged = {"model": {"dtype": "float32"}, **sections}
    merged.setdefault("output", {}).update(keep_columns=["text"], rows_per_file=10)
    raw = make_job(tmp_path / "in", tmp_path / "out", model, **merged)
    sink = {"kind": kind, "name": "lance", "table": table}
    raw["sink"] = [{**sink, "uri": str(tmp_path / "db.lance")} if kind == "lancedb" else sink]
    return raw


def _folder_rows(out) -> dict:
    """id -> (token vectors as stored, text), read by pyarrow from the parts themselves."""
    vectors = pq.read_table(out / "multivectors")
    texts = pq.read_table(out / "vectors", columns=["id", "text"])
    assert vectors.column("id").equals(texts.column("id"))
    dtype = vectors.schema.field("vectors").type.value_type.value_type.to_pandas_dtype()
    return {i: (np.array(v, dtype).reshape(len(v), -1), t) for i, v, t in zip(
        vectors.column("id").to_pylist(), vectors.column("vectors").to_pylist(),
        texts.column("text").to_pylist())}


def _table_rows(uri, table) -> dict:
    import lancedb
    data = lancedb.connect(str(uri)).open_table(table).to_arrow()
    dtype = data.schema.field("vector").type.value_type.value_type.to_pandas_dtype()
    rows = {i: (np.array(v, dtype).reshape(len(v), -1), t) for i, v, t in zip(
        data.column("id").to_pylist(), data.column("vector").to_pylist(),
        data.column("text").to_pylist())}
    assert len(rows) == data.num_rows, "duplicate ids in the LanceDB table"
    return rows


def _assert_table_equals_folder(tmp_path, table) -> None:
    want, got = _folder_rows(tmp_path / "out"), _table_rows(tmp_path / "db.lance", table)
    assert sorted(got) == sorted(want)
    for i in want:
        assert got[i][0].dtype == want[i][0].dtype and got[i][1] == want[i][1]
        np.testing.assert_array_equal(got[i][0], want[i][0])  # every token, bit for bit


@pytest.fixture
def table():
    return "mv_" + uuid.uuid4().hex[:10]


def _search(tmp_path, queries, *args) -> list[list[dict]]:
    """The top-10 of each query by the real CLI, all queries in one process (--queries)."""
    pq.write_table(pa.table({"id": np.arange(len(queries)), "text": queries}),
                   tmp_path / "queries.parquet")
    hits = tmp_path / f"hits-{uuid.uuid4().hex[:6]}.parquet"
    result = embedpipe("search", tmp_path / "out", "--queries", tmp_path / "queries.parquet",
                       "--out", hits, "-k", "10", *args)
    assert result.returncode == 0, result.stderr
    rows = pq.read_table(hits).to_pylist()
    return [sorted((h for h in rows if h["query_id"] == q), key=lambda h: h["rank"])
            for q in range(len(queries))]


def _brute_force(out, folder, queries) -> np.ndarray:
    """MaxSim (dot products) over the parts as pyarrow reads them, queries from
    sentence-transformers' own encode_query: [queries, rows] in row order."""
    from sentence_transformers import MultiVectorEncoder
    rows = [v.astype(np.float32) for v, _ in _folder_rows(out).values()]
    encoded = MultiVectorEncoder(str(folder), device="cpu").encode_query(
        queries, convert_to_numpy=True)
    return np.array([[(r @ q.T).max(0).sum() for r in rows] for q in encoded])


@pytest.mark.slow
def test_rows_equal_the_folder_search_equals_exact_maxsim_and_runs_update_changed_ids(
        tmp_path, colbert_folders, table):
    _shards(tmp_path / "in")
    raw = _job(tmp_path, colbert_folders["colbert"], table)
    first = run(raw)
    assert first.failures == [] and first.sinks[0]["upserted"] == 60
    _assert_table_equals_folder(tmp_path, table)
    out = tmp_path / "out"
    ids = list(_folder_rows(out))
    scores = _brute_force(out, colbert_folders["colbert"], QUERIES)
    through_sink = _search(tmp_path, QUERIES, "--sink", "lance")
    exact = _search(tmp_path, QUERIES, "--maxsim", "exact")  # index/maxsim.py over the parts
    for q in range(len(QUERIES)):
        assert [h["id"] for h in through_sink[q]] == [h["id"] for h in exact[q]]
        expected = np.lexsort((np.arange(len(ids)), -scores[q]))[:10]
        assert [h["id"] for h in through_sink[q]] == [ids[r] for r in expected]
        np.testing.assert_allclose([h["score"] for h in through_sink[q]], scores[q, expected],
                                   rtol=1e-5)
        assert all(h["text"] for h in through_sink[q])
    time.sleep(0.01)
    _shards(tmp_path / "in", changed=True)
    night = run(raw)
    assert night.failures == []
    load = night.sinks[0]
    # only the changed unit's rows (20) and the new unit's (20) go in; the removed unit's go
    assert (load["full"], load["units"], load["upserted"], load["deleted"]) == (False, 2, 40, 20)
    _assert_table_equals_folder(tmp_path, table)
    assert embedpipe("verify", out).returncode == 0


def _change_row(uri, table, row_id) -> None:
    """One row's third token vector changed in place in the table (the row count unchanged)."""
    import lancedb
    t = lancedb.connect(str(uri)).open_table(table)
    row = t.search().where(f"id = {row_id}").limit(1).to_arrow()
    tokens = np.array(row.column("vector")[0].as_py(), np.float32)
    tokens[2] = -tokens[2]
    column = pa.ListArray.from_arrays(pa.array([0, len(tokens)], pa.int32()),
                                      pa.FixedSizeListArray.from_arrays(
                                          pa.array(tokens.reshape(-1)), tokens.shape[1]))
    changed = row.drop_columns(["vector"]).append_column("vector", column).select(
        t.schema.names).cast(t.schema)
    t.merge_insert("id").when_matched_update_all().execute(changed)
    assert t.count_rows() == 60


@pytest.mark.slow
def test_verify_finds_a_changed_token_vector_and_sync_repairs_it(tmp_path, colbert_folders,
                                                                 table):
    _shards(tmp_path / "in")
    assert run(_job(tmp_path, colbert_folders["colbert"], table)).failures == []
    out = tmp_path / "out"
    _change_row(tmp_path / "db.lance", table, 27)
    for args in ((), ("--quick",)):  # token vectors are compared by digest either way
        check = embedpipe("verify", out, *args)
        assert check.returncode == 1, check.stdout
        assert "1 of 60 vectors differ from the folder's (e.g. id 27)" in check.stdout
    synced = embedpipe("sync", out)
    assert synced.returncode == 0, synced.stderr
    assert "1 rows differed from the folder (rewritten)" in synced.stdout, synced.stdout
    _assert_table_equals_folder(tmp_path, table)
    assert embedpipe("verify", out).returncode == 0


@pytest.mark.slow
@pytest.mark.parametrize("point", ["sink-merge", "sink"])
def test_kill_minus_nine_during_the_load_then_rerun_equals_the_folder(
        tmp_path, colbert_folders, table, point):
    """sink-merge: in the middle of LanceDB's merge_insert; sink: after LanceDB committed,
    before the manifest records it. In an incremental run (a file changed, one removed)."""
    _shards(tmp_path / "in")
    raw = _job(tmp_path, colbert_folders["colbert"], table)
    assert run(raw).failures == []
    time.sleep(0.01)
    _shards(tmp_path / "in", changed=True)
    job = write_job_file(tmp_path / "job.toml", raw)
    run_and_kill(job, point, tmp_path)
    rerun = embedpipe("run", job, "--json")
    assert rerun.returncode == 0, rerun.stderr
    _assert_table_equals_folder(tmp_path, table)
    verify = embedpipe("verify", tmp_path / "out")
    assert verify.returncode == 0, verify.stdout


@pytest.mark.parametrize("kind, model, why", [
    ("pgvector", "colbert", "pgvector has no multi-vector type; use a LanceDB sink"),
    ("lancedb", "plain", "tokens are not of unit length")])
def test_a_sink_that_cannot_hold_the_rows_is_refused_in_one_line(
        tmp_path, colbert_folders, table, kind, model, why):
    _shards(tmp_path / "in")
    job = write_job_file(tmp_path / "j.toml", _job(tmp_path, colbert_folders[model], table,
                                                   kind))
    refused = embedpipe("run", job)  # refused before the DSN is read
    assert refused.returncode == 2
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1 and why in lines[0], refused.stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / "db.lance").exists()


def test_sync_refuses_a_folder_whose_tokens_are_not_unit_length(tmp_path, colbert_folders,
                                                                table):
    """A folder made without a sink, then given one by `sync --job`: LanceDB's cosine MaxSim
    would rank it otherwise than embedpipe's, so the load fails in one line, no table made."""
    _shards(tmp_path / "in")
    raw = _job(tmp_path, colbert_folders["plain"], table)
    assert run({k: v for k, v in raw.items() if k != "sink"}).failures == []
    synced = embedpipe("sync", tmp_path / "out", "--job",
                       write_job_file(tmp_path / "j.toml", raw))
    assert synced.returncode == 1
    assert "has a token vector of norm" in synced.stdout and "Normalize" in synced.stdout
    assert len([x for x in synced.stdout.splitlines() if x.startswith("FAILED")]) == 1
    assert not (tmp_path / "db.lance" / f"{table}.lance").exists()


@pytest.mark.slow
def test_float16_folder_keeps_float16_tokens_and_ranks_alike(tmp_path, colbert_folders, table):
    """float16 tokens are held as float16; LanceDB's cosine over them re-normalizes each
    rounded token, so its scores differ from embedpipe's dot-product MaxSim by float16
    rounding (within 2e-3 here), never more."""
    _shards(tmp_path / "in")
    raw = _job(tmp_path, colbert_folders["colbert"], table, output={"precision": "float16"})
    assert run(raw).failures == []
    _assert_table_equals_folder(tmp_path, table)  # float16 both sides, bit for bit
    through_sink = _search(tmp_path, QUERIES, "--sink", "lance")
    exact = _search(tmp_path, QUERIES, "--maxsim", "exact")
    for q in range(len(QUERIES)):
        scores = {h["id"]: h["score"] for h in exact[q]}
        shared = [h for h in through_sink[q] if h["id"] in scores]
        assert len(shared) >= 9  # a swap at the 10th place by rounding at most
        np.testing.assert_allclose([h["score"] for h in shared],
                                   [scores[h["id"]] for h in shared], atol=2e-3)
