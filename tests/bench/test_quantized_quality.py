"""bench.quantized_quality at a tiny size (a random 2-layer BERT, 300 corpus leads, 30 queries): its
numbers against brute force over the folders' stored vectors, computed here with numpy."""
from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from bench.quantized_quality import CONFIGS, even, main, slug, wiki_split
from pipeline.io.output import open_output

K = 10
RUN = ("float32", "float16", "int8", "binary", "binary, rescored by its bits",
       "binary, rescored by float32 kept")


@pytest.fixture(scope="module")
def report(tmp_path_factory, tiny_model):
    work = tmp_path_factory.mktemp("quantized_quality")
    rc = main(["--work", str(work), "--model", str(tiny_model), "--max-length", "64",
               "--rows", "300", "--queries", "30", "--head-rows", "300",
               "--configs", ";".join(RUN), "--json", str(work / "r.json")])
    data = json.loads((work / "r.json").read_text())
    return rc, data, work


def brute_force(out, queries: np.ndarray) -> np.ndarray:
    """ids of the K best rows by inner product with the stored float vectors."""
    output = open_output(str(out))
    vectors, ids = output.vectors(), output.ids().to_numpy()
    return ids[np.argsort(-(queries @ vectors.T), axis=1, kind="stable")[:, :K]]


def own_scores(hit_ids, corpus_topics, query_topics):
    recall, ndcg = [], []
    for hits, topic in zip(hit_ids, query_topics):
        rel = [int(h >= 0 and corpus_topics[h] == topic) for h in hits[:K]]
        recall.append(sum(rel) / K)
        ideal = sum(1 / np.log2(i + 2) for i in range(min(K, int((corpus_topics == topic).sum()))))
        ndcg.append(sum(r / np.log2(i + 2) for i, r in enumerate(rel)) / ideal)
    return np.mean(recall), np.mean(ndcg)


def test_the_split_is_even_and_disjoint():
    corpus, queries = wiki_split(300, 30)
    assert corpus.num_rows == 300 and queries.num_rows == 30
    assert not set(corpus.column("text").to_pylist()) & set(queries.column("text").to_pylist())
    assert "Uncategorized" not in set(corpus.column("topic").to_pylist())
    assert len(set(queries.column("topic").to_pylist())) > 5
    assert even(10, 3).tolist() == [0, 4, 9]


def test_numbers_match_brute_force(report):
    rc, data, work = report
    r = data["retrieval"]
    configs = r["configs"]
    assert list(configs) == list(RUN)
    assert all(e["status"] == "ok" for e in configs.values()), \
        [e.get("message") for e in configs.values()]
    assert rc == 0
    corpus = pq.read_table(work / "wiki" / "corpus.parquet")
    queries = pq.read_table(work / "queries.parquet")
    topics = np.array(corpus.column("topic").to_pylist())
    query_topics = np.array(queries.column("topic").to_pylist())
    q = np.load(work / "query_vectors.npy")
    exact = brute_force(work / "out" / "float32", q)

    def hits(name):
        table = pq.read_table(work / f"hits-{slug(name)}.parquet").sort_by([("query_id", "ascending"),
                                                                           ("rank", "ascending")])
        return table.column("id").to_numpy().reshape(-1, K)

    f32 = configs["float32"]
    # flat float32 is exact: the bench's hits are the brute-force ranking (up to score ties)
    assert np.mean([len(set(a) & set(b)) for a, b in zip(hits("float32"), exact)]) >= K - 0.1
    recall, ndcg = own_scores(exact, topics, query_topics)
    assert f32["recall@10"] == pytest.approx(recall, abs=0.01)
    assert f32["ndcg@10"] == pytest.approx(ndcg, abs=0.01)
    assert f32["overlap@10"] == 1.0 and f32["recall@10_x_float32"] == 1.0
    dim = q.shape[1]
    for name, e in configs.items():
        got = hits(name)
        recall, ndcg = own_scores(got, topics, query_topics)
        assert e["recall@10"] == pytest.approx(recall) and e["ndcg@10"] == pytest.approx(ndcg)
        assert e["recall@10_x_float32"] == pytest.approx(e["recall@10"] / f32["recall@10"])
        assert e["overlap@10"] == pytest.approx(
            np.mean([len(set(a) & set(b)) / K for a, b in zip(got, exact)]))
        config = next(c for c in CONFIGS if c.name == name)
        b = e["bytes_per_row"]
        assert b["vector"] == {"float32": 4 * dim, "float16": 2 * dim, "int8": dim,
                               "binary": dim // 8}[config.precision]
        assert b["rescore"] == ({"float32": 4 * dim}.get(config.rescore_precision, 0))
        assert b["vector"] + b["rescore"] == b["total"] and b["on_disk"] > 0
        out = work / "out" / slug(config.folder or name)
        index = json.loads((out / "index" / "index_infos.json").read_text())
        assert e["index_bytes"] == (out / index["index_file"]).stat().st_size
        assert e["queries_per_second"] > 0
    # float16's flat index ranks the float16-rounded vectors: nearly float32's order
    assert configs["float16"]["overlap@10"] >= 0.9


def test_binary_hits_are_the_smallest_hamming_distances(report):
    _, data, work = report
    out = work / "out" / "binary"
    stored = open_output(str(out)).vectors()
    bits = np.unpackbits((stored.astype(np.int16) + 128).astype(np.uint8), axis=1)
    query_bits = (np.load(work / "query_vectors.npy") > 0).astype(np.uint8)
    distances = (query_bits[:, None, :] != bits[None, :, :]).sum(2)
    ids = open_output(str(out)).ids().to_numpy()
    position = {i: p for p, i in enumerate(ids)}
    got = pq.read_table(work / "hits-binary.parquet").sort_by(
        [("query_id", "ascending"), ("rank", "ascending")]).column("id").to_numpy().reshape(-1, K)
    for row, hit in zip(distances, got):
        # ties may come back in any order: the distances, not the ids, must be the K smallest
        assert sorted(row[[position[h] for h in hit]]) == sorted(row)[:K]


def test_the_head_rows(report):
    _, data, work = report
    h = data["heads"]
    assert h["rows"] == 300 and list(h["precisions"]) == ["float32", "float16", "int8", "uint8",
                                                         "binary", "ubinary"]
    for precision, e in h["precisions"].items():
        assert e["status"] == "ok", e
        card = json.loads((work / "heads" / precision / "head.json").read_text())
        assert card["precision"]["name"] == precision
        assert e["accuracy"] == card["metrics"]["accuracy"]
        assert e["accuracy_x_float32"] == pytest.approx(
            e["accuracy"] / h["precisions"]["float32"]["accuracy"])
    assert f"| binary | 4 | {h['precisions']['binary']['accuracy']:.4f} |" in data["table"]
