"""Sinks of quantized and float16 folders (output.precision) against real engines: the column
type follows the precision, the stored values are the folder's (and, for the binary kinds,
sentence-transformers' quantize_embeddings of the float vectors, packed), search through the
sink ranks as a numpy brute force over the stored values does, verify finds one changed value,
a second sync writes nothing, and what a store cannot hold is refused in one line."""
from __future__ import annotations

import json
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from helpers import SMALL, embedpipe, make_job, run, write_shards

pytestmark = pytest.mark.sinks
quantize_embeddings = pytest.importorskip("sentence_transformers").quantize_embeddings
DSN_ENV = "EMBEDPIPE_PG_DSN"
K = 10


def job_dict(folder: Path, out: Path, model: Path, sinks: list[dict], **output) -> dict:
    raw = make_job(folder, out, model, model=SMALL["model"], encode=SMALL["encode"],
                   output={**SMALL["output"], "keep_columns": ["text"], **output},
                   index={"enabled": False})
    raw["sink"] = sinks
    return raw


def write_job_file(path: Path, raw: dict) -> Path:
    from helpers import to_toml
    text = to_toml({k: v for k, v in raw.items() if k != "sink"})
    for sink in raw.get("sink", []):
        text += "[[sink]]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in sink.items())
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, movie_table):
    texts = movie_table.column("text").to_pylist()
    folder = tmp_path_factory.mktemp("precision-input")
    write_shards(folder, [pa.table({"id": pa.array(range(i * 1000, i * 1000 + 120), pa.int64()),
                                    "text": texts[i * 120:(i + 1) * 120]}) for i in range(2)])
    return folder, texts[3000:3012]


def pg_type_of(dsn: str, table: str) -> str:
    import psycopg
    with psycopg.connect(dsn) as conn:
        return conn.execute("SELECT format_type(atttypid, atttypmod) FROM pg_attribute WHERE "
                            "attrelid = %s::regclass AND attname = 'vector'", (table,)).fetchone()[0]


def pg_stored(dsn: str, table: str, bits: bool) -> dict:
    """id -> the stored vector: packed bits (uint8) for bit, else float32."""
    import psycopg
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(f"SELECT id, vector::text FROM {table}").fetchall()
    if bits:
        return {i: np.packbits(np.array([c == "1" for c in text])) for i, text in rows}
    return {i: np.asarray(json.loads(text), np.float32) for i, text in rows}


def lance_table(uri: Path, table: str):
    import lancedb
    return lancedb.connect(str(uri)).open_table(table)


def lance_stored(uri: Path, table: str) -> tuple[pa.DataType, dict]:
    data = lance_table(uri, table).to_arrow()
    kind = data.schema.field("vector").type
    flat = data.column("vector").combine_chunks().flatten().to_numpy()
    values = flat.reshape(data.num_rows, kind.list_size)
    values = values if values.dtype == np.uint8 else values.astype(np.float32)
    return kind, dict(zip(data.column("id").to_pylist(), values))


def brute_force(stored: np.ndarray, queries: np.ndarray, bits: bool) -> np.ndarray:
    """[queries, rows] the store's own score of every row: hamming distance over packed bits
    (queries quantized by quantize_embeddings, as the folder's vectors were), else inner
    product over the stored values."""
    if bits:
        q = quantize_embeddings(queries, "ubinary")
        return np.unpackbits(q[:, None, :] ^ stored[None], axis=-1).sum(-1).astype(np.float32)
    return queries @ stored.T


def assert_ranked_as_brute_force(hits: pa.Table, ids: np.ndarray, scores: np.ndarray,
                                 lower_better: bool, atol: float) -> None:
    """Each query's hits: K distinct ids whose brute-force scores are, rank by rank, the best K
    brute-force scores (rows with equal scores in any order), and the reported score is it."""
    position = {int(i): p for p, i in enumerate(ids)}
    for q in range(len(scores)):
        mine = hits.filter(pa.compute.equal(hits.column("query"), q))
        got = [position[i] for i in mine.column("id").to_pylist()]
        assert len(set(got)) == K
        best = np.sort(scores[q])[:K] if lower_better else -np.sort(-scores[q])[:K]
        np.testing.assert_allclose(scores[q][got], best, atol=atol, rtol=0)
        np.testing.assert_allclose(mine.column("score").to_numpy(), scores[q][got], atol=atol,
                                   rtol=0)


def sync_json(out: Path, dsn: str) -> dict:
    result = embedpipe("sync", out, "--json", env={DSN_ENV: dsn})
    assert result.returncode == 0, result.stderr
    return {s["name"]: s for s in json.loads(result.stdout)["sinks"]}


def change_one_pg(dsn: str, table: str, row_id: int, vector_type: str, dim: int) -> None:
    """One value of one row changed by the least the column type can: the last real bit
    flipped (bit), one value moved to the next float16 / float32 up."""
    import psycopg
    with psycopg.connect(dsn, autocommit=True) as conn:
        if vector_type == "bit":
            conn.execute(f"UPDATE {table} SET vector = set_bit(vector, {dim - 1}, "
                         f"1 - get_bit(vector, {dim - 1})) WHERE id = %s", (row_id,))
            return
        text = conn.execute(f"SELECT vector::text FROM {table} WHERE id = %s", (row_id,)).fetchone()[0]
        dtype = np.float16 if vector_type == "halfvec" else np.float32
        v = np.asarray(json.loads(text), dtype)
        v[0] = np.nextafter(v[0], dtype(np.inf))
        conn.execute(f"UPDATE {table} SET vector = %s::{vector_type} WHERE id = %s",
                     ("[" + ",".join(repr(float(x)) for x in v) + "]", row_id))


def change_one_lance(uri: Path, table: str, row_id: int) -> None:
    tbl = lance_table(uri, table)
    row = tbl.search().where(f"id = {row_id}").limit(None).to_arrow()
    kind = row.schema.field("vector").type
    v = row.column("vector").combine_chunks().flatten().to_numpy().copy()
    if pa.types.is_uint8(kind.value_type):
        v[-1] ^= 1
    else:
        v[0] = np.nextafter(v[0], v.dtype.type(np.inf))
    vectors = pa.FixedSizeListArray.from_arrays(pa.array(v, kind.value_type), kind.list_size)
    row = row.set_column(row.column_names.index("vector"), "vector", vectors)
    tbl.merge_insert("id").when_matched_update_all().execute(row)


CASES = {  # precision, output extras, pgvector column type, LanceDB value type, width
    "float32": ({}, "vector(32)", pa.float32(), 32),
    "float16": ({}, "halfvec(32)", pa.float16(), 32),
    "binary": ({}, "bit(32)", pa.uint8(), 4),
    "ubinary-20": ({"dimensions": 20}, "bit(20)", pa.uint8(), 3),  # 4 padding bits
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_folder_of_each_precision_in_both_sinks(tmp_path, corpus, tiny_model, pg_dsn,
                                                  monkeypatch, case):
    from pipeline.commands.sink_search import SinkSearcher
    from pipeline.commands.verify import verify_folder
    from pipeline.io.output import open_output

    monkeypatch.setenv(DSN_ENV, pg_dsn)
    precision = case.split("-")[0]
    extra, pg_type, lance_value, width = CASES[case]
    bits = precision.endswith("binary")
    folder, queries = corpus
    table = "t_" + uuid.uuid4().hex[:10]
    uri = tmp_path / "db.lance"
    sinks = [{"kind": "lancedb", "name": "lance", "uri": str(uri), "table": table},
             {"kind": "pgvector", "name": "pg", "table": table}]
    if bits:
        sinks.append({"kind": "pgvector", "name": "pgh", "table": table + "_h", "index": "hnsw"})
    out = tmp_path / "out"
    summary = run(job_dict(folder, out, tiny_model, sinks, precision=precision, **extra))
    assert summary.failures == []
    folder_out = open_output(str(out))
    ids = np.asarray(folder_out.ids().to_numpy())
    stored = folder_out.vectors()
    assert folder_out.precision.name == precision and stored.shape == (240, width)
    if bits:  # the folder's values, and independently quantize_embeddings of the float run
        float_out = tmp_path / "float"
        assert run(job_dict(folder, float_out, tiny_model, [], precision="float32",
                            **extra)).failures == []
        floats = open_output(str(float_out)).vectors()
        packed = quantize_embeddings(floats, "ubinary")
        assert np.array_equal(packed, stored.astype(np.int16) + 128 if precision == "binary"
                              else stored)
    else:
        packed = None
    expect = packed if bits else stored

    # the column types, and every stored value equal to the folder's
    assert pg_type_of(pg_dsn, table) == pg_type
    kind, lance_values = lance_stored(uri, table)
    assert kind == pa.list_(lance_value, width)
    for held in (pg_stored(pg_dsn, table, bits), lance_values):
        assert sorted(held) == sorted(ids.tolist())
        got = np.stack([held[i] for i in ids.tolist()])
        assert got.dtype == expect.dtype and np.array_equal(got, expect)

    # a second sync writes nothing, and finds every row as the folder's
    for name, load in sync_json(out, pg_dsn).items():
        assert (load["upserted"], load["deleted"], load["rewritten"], load["full"]) == \
            (0, 0, 0, False), name
        assert load["compared"]

    # search through each sink ranks as a brute force over the stored values does
    for name in ("pg", "lance"):
        searcher = SinkSearcher(str(out), name)
        q = searcher.embedder.embed(queries)
        hits = searcher.search(queries, k=K)
        searcher.close()
        if precision == "float16":  # each store rounds the query to float16 too
            q = q.astype(np.float16).astype(np.float32)
        scores = brute_force(expect, q, bits)
        atol = 0 if bits else 1e-5 if precision == "float32" else 2e-3
        assert_ranked_as_brute_force(hits, ids, scores, bits, atol)
        if bits and name == "pg":  # exact, ties in id order: the whole list
            best = [[int(ids[j]) for j in np.lexsort((ids, s))[:K]] for s in scores]
            assert hits.column("id").to_pylist() == sum(best, [])
    if bits:
        cli = embedpipe("search", out, queries[0], "-k", "3", "--sink", "pg", env={DSN_ENV: pg_dsn})
        assert cli.returncode == 0, cli.stderr
        assert cli.stdout.splitlines()[0].split()[:3] == ["rank", "id", "hamming"]
        import psycopg
        with psycopg.connect(pg_dsn) as conn:
            indexdef = conn.execute("SELECT indexdef FROM pg_indexes WHERE tablename = %s",
                                    (table + "_h",)).fetchall()
        assert any("hnsw" in d and "bit_hamming_ops" in d for (d,) in indexdef), indexdef
        searcher = SinkSearcher(str(out), "pgh")  # approximate: each hit's distance is its own
        hits = searcher.search(queries[:2], k=K)
        q = quantize_embeddings(searcher.embedder.embed(queries[:2]), "ubinary")
        searcher.close()
        position = {int(i): p for p, i in enumerate(ids)}
        for query, hit_id, score in zip(hits.column("query").to_pylist(),
                                        hits.column("id").to_pylist(),
                                        hits.column("score").to_pylist()):
            assert score == np.unpackbits(q[query] ^ packed[position[hit_id]]).sum()

    # one value changed in each store is found by verify, and the sync rewrites that row
    victim = int(ids[17])
    vector_type = pg_type.split("(")[0]
    change_one_pg(pg_dsn, table, victim, vector_type, int(pg_type[:-1].split("(")[1]))
    change_one_lance(uri, table, victim)
    verdict = verify_folder(str(out))
    differ = [p for p in verdict.problems if "vectors differ" in p]
    assert len(differ) == 2 and all(f"e.g. id {victim}" in p and p.count("1 of 240") for p in differ)
    if precision != "float32":  # exact at the folder's precision: the sample finds it too
        quick = verify_folder(str(out), quick=True)
        assert sum("sampled vectors differ" in p for p in quick.problems) == 2, quick.problems
    loads = sync_json(out, pg_dsn)
    assert loads["pg"]["rewritten"] == loads["lance"]["rewritten"] == 1
    assert verify_folder(str(out)).ok
    assert np.array_equal(np.stack([pg_stored(pg_dsn, table, bits)[i] for i in ids.tolist()]),
                          expect)


@pytest.mark.parametrize("precision", ["int8", "uint8"])
def test_int8_folders_are_refused_by_both_stores_in_one_line(tmp_path, corpus, tiny_model,
                                                             pg_dsn, precision):
    """Neither store has an 8-bit integer vector type: refused before any work, exit 2; and
    `sync --job` on a finished folder of that precision likewise."""
    folder, _ = corpus
    table = "t_" + uuid.uuid4().hex[:10]
    env = {DSN_ENV: pg_dsn}
    lines = {
        "pg": f'error: sink "pg": the folder stores {precision} vectors (output.precision) and '
              f"pgvector has no 8-bit integer vector type (vector, halfvec, bit and sparsevec "
              f'only); rerun the job with another output.path and output.precision = "float16" '
              f'or "binary", or keep this folder without the sink',
        "lance": f'error: sink "lance": the folder stores {precision} vectors (output.precision) '
                 f"and LanceDB has no 8-bit integer vector column (int8 is no vector type, uint8 "
                 f"takes hamming distance only); rerun the job with another output.path and "
                 f'output.precision = "float16" or "binary", or keep this folder without the sink'}
    sinks = {"pg": {"kind": "pgvector", "name": "pg", "table": table},
             "lance": {"kind": "lancedb", "name": "lance", "uri": str(tmp_path / "db.lance"),
                       "table": table}}
    for name, sink in sinks.items():
        out = tmp_path / f"out-{name}"
        job = write_job_file(tmp_path / f"{name}.toml", job_dict(folder, out, tiny_model, [sink],
                                                                 precision=precision))
        refused = embedpipe("run", job, env=env)
        assert refused.returncode == 2
        assert refused.stderr.strip().splitlines() == [lines[name]]
        assert not out.exists()
    out = tmp_path / "plain"
    made = write_job_file(tmp_path / "plain.toml", job_dict(folder, out, tiny_model, [],
                                                            precision=precision))
    assert embedpipe("run", made, env=env).returncode == 0
    job = write_job_file(tmp_path / "sinks.toml", job_dict(folder, out, tiny_model,
                                                           list(sinks.values()),
                                                           precision=precision))
    for name in sinks:
        refused = embedpipe("sync", out, "--job", job, "--sink", name, env=env)
        assert refused.returncode == 2
        assert refused.stderr.strip().splitlines() == [lines[name]]
    assert "sinks" not in json.loads((out / "manifest.json").read_text())


@pytest.mark.parametrize("precision, vector_type, words", [
    ("binary", "vector", 'vector_type = "vector" cannot hold the folder\'s binary vectors '
                         '(packed bits, output.precision); leave vector_type out or set it to "bit"'),
    ("ubinary", "halfvec", 'vector_type = "halfvec" cannot hold the folder\'s ubinary vectors'),
    ("float32", "bit", 'vector_type = "bit" holds packed bits and the folder stores float32 '
                       "vectors; leave vector_type out (vector), or rerun the job with another "
                       'output.path and output.precision = "binary"'),
    ("float16", "bit", 'vector_type = "bit" holds packed bits and the folder stores float16'),
])
def test_a_vector_type_that_contradicts_the_precision_is_refused(tmp_path, corpus, tiny_model,
                                                                precision, vector_type, words):
    folder, _ = corpus
    out = tmp_path / "out"
    job = write_job_file(tmp_path / "job.toml", job_dict(
        folder, out, tiny_model, [{"kind": "pgvector", "name": "pg", "table": "t",
                                   "vector_type": vector_type}], precision=precision))
    refused = embedpipe("run", job, env={DSN_ENV: ""})  # refused before the DSN is read
    assert refused.returncode == 2
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f'error: sink "pg": {words}'), lines
    assert not out.exists()


def test_bit_copy_and_digest_against_the_server(pg_dsn, monkeypatch):
    """Packed codes of 13 bits (3 padding bits) by binary COPY into bit(13): the server's text is
    the bits, and its digest of the stored bits is the one the sink computes from the codes."""
    import psycopg
    from pipeline.config import SinkConfig
    from pipeline.sinks.base import DIGEST_BYTES, vector_digests
    from pipeline.sinks.make import make_sink
    from pipeline.sinks.pg_copy import HEADER, TRAILER, encode

    bits = np.random.default_rng(3).integers(0, 2, (50, 13)).astype(bool)
    codes = np.packbits(bits, axis=-1)
    table = "t_" + uuid.uuid4().hex[:10]
    block = pa.table({"id": pa.array(range(50), pa.int64()),
                      "vector": pa.FixedSizeListArray.from_arrays(pa.array(codes.ravel()), 2)})
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(f"CREATE TABLE {table} (id bigint, vector bit(13))")
        with conn.cursor().copy(f"COPY {table} FROM STDIN (FORMAT BINARY)") as copy:
            copy.write(HEADER + encode(block, "bit", 13) + TRAILER)
        rows = conn.execute(f"SELECT vector::text, substring(sha256(substring(bit_send(vector) "
                            f"FROM 5)) FROM 1 FOR {DIGEST_BYTES}) FROM {table} ORDER BY id").fetchall()
    assert [r[0] for r in rows] == ["".join("1" if b else "0" for b in row) for row in bits]
    monkeypatch.setenv(DSN_ENV, pg_dsn)
    sink = make_sink(SinkConfig(kind="pgvector", table=table, name="s"), precision="ubinary")
    assert vector_digests(sink.vector_bytes(codes)).to_pylist() == [bytes(r[1]) for r in rows]
