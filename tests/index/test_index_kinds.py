"""Index kinds on real snippet vectors: recall against brute force, rebuilds, auto choice."""
from __future__ import annotations

import logging
import shutil

import faiss
import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from helpers import index_paths, matrix, read_vectors
from pipeline.cli import main
from pipeline.commands.reindex import rebuild_index
from pipeline.config import ConfigError, IndexConfig
from pipeline.index import choose
from pipeline.index.build import build_index, load_index
from pipeline.index.choose import TRAIN_PER_CENTROID, choose_kind
from pipeline.index.check import index_problems
from pipeline.io.vectors import VectorParts
from pipeline.index.family import unwrapped
from pipeline.index.tuning import even_positions
from pipeline.io.storage import Store
from pipeline.io.writer import vector_array, vectors_schema


@pytest.fixture(scope="module")
def vectors(snippets_out) -> np.ndarray:
    return matrix(read_vectors(snippets_out))


def copy_out(snippets_out, tmp_path):
    target = tmp_path / "out"
    shutil.copytree(snippets_out, target)
    return target


def brute_force_recall(out, vectors: np.ndarray, n_queries: int = 300, k: int = 10) -> float:
    """recall@10 of the stored index, loaded as search loads it, against numpy brute force."""
    index, _ = load_index(Store(str(out)))
    queries = vectors[np.random.default_rng(1).choice(len(vectors), n_queries, replace=False)]
    truth = np.argsort(-(queries @ vectors.T), axis=1, kind="stable")[:, :k]
    _, found = index.search(queries, k)
    return np.mean([len(set(t) & set(f)) / k for t, f in zip(truth, found)])


@pytest.mark.parametrize("kind, options, floor", [
    ("flat", {}, 1.0),
    ("hnsw", {}, 0.95),
    ("ivf-flat", {}, 0.95),
    ("ivf-pq", {"pq_m": 24}, 0.3),  # 24-byte codes (96, the default, trains slowly on 2 cores)
    ("factory", {"factory": "IVF16,SQ8"}, 0.9),
])
def test_kind_recall(snippets_out, vectors, tmp_path, kind, options, floor):
    out = copy_out(snippets_out, tmp_path)
    infos = rebuild_index(str(out), {"type": kind, **options})
    n, dim = vectors.shape
    assert (infos["count"], infos["dimension"], infos["metric"]) == (n, dim, "ip")
    assert infos["kind"] == kind and infos["normalized"] is True
    assert infos["size_bytes"] == index_paths(out)[0].stat().st_size
    assert infos["build_seconds"] > 0 and infos["recall_queries"] == 1000
    measured = brute_force_recall(out, vectors)
    print(f"{kind}: {infos['factory']} reported recall@10 {infos['recall_at_10']}, "
          f"brute force {measured:.4f}, {infos['size_bytes']} bytes, {infos['build_seconds']} s")
    assert infos["recall_at_10"] >= floor and measured >= floor
    assert abs(infos["recall_at_10"] - measured) < 0.05
    # `embedpipe verify`'s index checks (count, id map, sampled vectors) pass for every kind
    assert index_problems(Store(str(out)), VectorParts(Store(str(out)), [p["file"] for p in infos["parts"]]),
                          full=True) == []
    index, _ = load_index(Store(str(out)))
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        # trained on an even sample of at least 39 per list; the tuned nprobe is the one loaded
        assert infos["trained_on"] >= min(n, TRAIN_PER_CENTROID * ivf.nlist)
        assert ivf.nprobe == infos["search_params"]["nprobe"]
    if kind == "hnsw":
        assert unwrapped(index).hnsw.efSearch == infos["search_params"]["efSearch"] == 128


def test_stored_search_params_are_used(snippets_out, vectors, tmp_path):
    out = copy_out(snippets_out, tmp_path)
    infos = rebuild_index(str(out), {"type": "ivf-flat", "nlist": 40, "nprobe": 3})
    assert infos["factory"] == "IVF40,Flat" and infos["search_params"] == {"nprobe": 3}
    index, _ = load_index(Store(str(out)))
    assert faiss.extract_index_ivf(index).nprobe == 3
    low = brute_force_recall(out, vectors)
    infos = rebuild_index(str(out), {"type": "hnsw", "ef_search": 16, "hnsw_m": 8})
    assert infos["factory"] == "HNSW8,Flat" and infos["search_params"] == {"efSearch": 16}
    assert low < 0.95  # a few probes of 40 lists miss neighbours: the setting really applies


def test_rebuild_equals_the_run_index(snippets_out, vectors, tmp_path):
    """`embedpipe index` from Parquet gives the run's flat index back: same search results."""
    out = copy_out(snippets_out, tmp_path)
    before = faiss.read_index(str(index_paths(snippets_out)[0]))
    result = CliRunner().invoke(main, ["index", str(out), "--type", "flat", "--json"])
    assert result.exit_code == 0, result.output
    after = faiss.read_index(str(index_paths(out)[0]))
    queries = vectors[even_positions(len(vectors), 200)]
    d0, i0 = before.search(queries, 10)
    d1, i1 = after.search(queries, 10)
    assert np.array_equal(i0, i1) and np.array_equal(d0, d1)
    assert pq.read_table(index_paths(snippets_out)[1]).equals(pq.read_table(index_paths(out)[1]))


def test_ivf_streams_parts_and_trains_on_an_even_sample(snippets_out, vectors, tmp_path,
                                                        monkeypatch):
    out = copy_out(snippets_out, tmp_path)
    monkeypatch.setattr(choose, "MIN_TRAIN", 0)  # train on exactly 39 x nlist
    added, trained = [], []
    real_factory = faiss.index_factory

    def spy_factory(*args):
        index = real_factory(*args)
        real_add, real_train = index.add_with_ids, index.train  # added under their labels
        index.add_with_ids = lambda x, ids: (added.append(len(x)), real_add(x, ids))[1]
        index.train = lambda x: (trained.append(x.copy()), real_train(x))[1]
        return index

    monkeypatch.setattr(faiss, "index_factory", spy_factory)
    infos = rebuild_index(str(out), {"type": "ivf-flat", "nlist": 20})
    n = len(vectors)
    assert infos["trained_on"] == TRAIN_PER_CENTROID * 20 == len(trained[0])
    step = n / len(trained[0])
    expected = vectors[(np.arange(len(trained[0])) * step).astype(int)]
    np.testing.assert_array_equal(trained[0], expected)  # spread evenly over the whole input
    assert sum(added) == n and max(added) <= 1000  # added part by part (parts of 1,000 rows)


def test_auto_choice_follows_count_and_budget():
    cfg = IndexConfig(type="auto", max_memory="4GB")
    assert choose_kind(cfg, 10_000, 384) == "flat"
    assert choose_kind(cfg, 1_000_000, 384) == "hnsw"  # too many for exact search
    assert choose_kind(IndexConfig(type="auto", max_memory="1GB"), 1_000_000, 384) == "ivf-pq"
    assert choose_kind(IndexConfig(type="auto", max_memory="1MB"), 10_000, 384) == "ivf-pq"
    factory = choose.factory_string(IndexConfig(type="auto", max_memory="1GB"), 5_000_000, 384)
    assert factory.startswith("IVF8944,PQ") and factory.endswith("np")
    m = int(factory.split("PQ")[1].rstrip("np"))
    assert 5_000_000 * (m + 8) + 8944 * 384 * 4 <= 2 ** 30  # codes + ids + centroids fit
    with pytest.raises(ConfigError, match="too small"):
        choose.factory_string(IndexConfig(type="auto", max_memory="10MB"), 5_000_000, 384)
    with pytest.raises(ConfigError, match="max_memory"):
        choose.parse_memory("lots")


def test_auto_builds_flat_for_few_vectors(snippets_out, tmp_path):
    out = copy_out(snippets_out, tmp_path)
    infos = rebuild_index(str(out), {"type": "auto"})
    assert (infos["type"], infos["kind"], infos["factory"]) == ("auto", "flat", "Flat")
    assert infos["recall_at_10"] == 1.0


def test_ip_on_unnormalised_vectors_warns(vectors, tmp_path, caplog):
    store = Store(str(tmp_path / "raw"))
    import pyarrow as pa

    from pipeline.io.content_hash import text_hashes
    schema = vectors_schema(pa.int64(), vectors.shape[1], "float32")
    rows = vectors[:500] * np.linspace(0.5, 3, 500)[:, None]  # real directions, other lengths
    with store.open_atomic("vectors/part-0.parquet") as handle:
        pq.write_table(pa.table([pa.array(np.arange(500)), vector_array(rows, "float32"),
                                 pa.array(np.ones(500, np.int32)), pa.array(np.zeros(500, bool)),
                                 text_hashes([str(i) for i in range(500)]),
                                 pa.array(np.arange(500, dtype=np.int64))],
                                schema=schema), handle)
    with caplog.at_level(logging.WARNING, logger="pipeline.index.build"):
        infos = build_index(store, ["vectors/part-0.parquet"], IndexConfig())
    assert "not normalised" in caplog.text and infos["normalized"] is False
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="pipeline.index.build"):
        build_index(store, ["vectors/part-0.parquet"], IndexConfig(metric="l2"))
    assert "not normalised" not in caplog.text


def test_bad_factory_is_a_config_error(snippets_out, tmp_path):
    out = copy_out(snippets_out, tmp_path)
    result = CliRunner().invoke(main, ["index", str(out), "--factory", "NoSuchIndex"])
    assert result.exit_code == 2 and "cannot build" in result.output
