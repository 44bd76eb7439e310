"""Index layouts: one IVF index, shards searched together, shards merged into on-disk lists.

The same real vectors (2,652 snippets in parts of 1,000 rows) are indexed three times with the
same trained quantizer; searches must agree exactly, ids and distances, through `load_index`,
the Searcher and the `embedpipe search` command.
"""
from __future__ import annotations

import json
import shutil

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from helpers import embedpipe, index_paths, matrix, read_vectors
from pipeline.index import layouts
from pipeline.cli import main
from pipeline.config import ConfigError, IndexConfig, config_from_dict
from pipeline.commands.reindex import rebuild_index
from pipeline.index.build import load_index
from pipeline.index.files import INFOS_FILE
from pipeline.commands.search import Searcher
from pipeline.io.storage import Store

LAYOUTS = ("single", "shards", "ondisk")
KINDS = {"ivf-flat": {"nlist": 32, "nprobe": 4},
         "ivf-pq": {"nlist": 32, "nprobe": 4, "pq_m": 24}}


@pytest.fixture(scope="module")
def vectors(snippets_out) -> np.ndarray:
    return matrix(read_vectors(snippets_out))


@pytest.fixture(scope="module")
def built(snippets_out, tmp_path_factory) -> dict:
    """{(kind, layout): (folder, infos)}: every kind in every layout, a shard per 1,000-row part."""
    folders = {}
    for kind, knobs in KINDS.items():
        for layout in LAYOUTS:
            out = tmp_path_factory.mktemp(f"{kind}-{layout}") / "out"
            shutil.copytree(snippets_out, out)
            folders[kind, layout] = out, rebuild_index(str(out), {
                "type": kind, "layout": layout, "shard_rows": 1000, **knobs})
    return folders


def queries(vectors: np.ndarray) -> np.ndarray:
    """300 stored vectors and 300 off-data points (two stored vectors averaged)."""
    rng = np.random.default_rng(3)
    own = vectors[rng.choice(len(vectors), 300, replace=False)]
    mixed = vectors[rng.choice(len(vectors), 300)] + vectors[rng.choice(len(vectors), 300)]
    return np.ascontiguousarray(np.vstack([own, mixed / np.linalg.norm(mixed, axis=1)[:, None]]))


@pytest.mark.parametrize("kind", KINDS)
def test_layouts_return_identical_hits(built, vectors, kind):
    q = queries(vectors)
    results, centroids = {}, {}
    for layout in LAYOUTS:
        out, infos = built[kind, layout]
        assert infos["layout"] == layout and infos["count"] == len(vectors)
        assert infos["search_params"] == {"nprobe": 4}
        index, _ = load_index(Store(str(out)))
        assert index.ntotal == len(vectors)
        results[layout] = index.search(q, 10)
        stored = faiss.read_index(str(index_paths(out)[0]), faiss.IO_FLAG_MMAP)
        quantizer = faiss.extract_index_ivf(stored).quantizer
        centroids[layout] = quantizer.reconstruct_n(0, quantizer.ntotal)
    for layout in ("shards", "ondisk"):
        # the same trained quantizer (training is deterministic on the same even sample) ...
        assert np.array_equal(centroids[layout], centroids["single"])
        d, i = results[layout]
        d0, i0 = results["single"]
        same, gap = (i == i0).mean(), np.abs(d - d0).max()
        print(f"{kind} {layout} vs single: identical ids {same:.4f}, max |distance diff| {gap}")
        # ... gives exactly the same neighbours and distances
        assert np.array_equal(i, i0) and np.array_equal(d, d0)
    assert built[kind, "shards"][1]["recall_at_10"] == built[kind, "single"][1]["recall_at_10"]
    assert built[kind, "ondisk"][1]["recall_at_10"] == built[kind, "single"][1]["recall_at_10"]


def test_shard_and_ondisk_files(built, vectors):
    n = len(vectors)
    out, infos = built["ivf-flat", "shards"]
    shards = infos["shards"]
    assert [s["rows"] for s in shards] == [1000, 1000, n - 2000]  # one per part, added alone
    assert [s["first_row"] for s in shards] == [0, 1000, 2000]
    for s in shards:
        shard = faiss.read_index(str(out / s["file"]))
        ivf = faiss.extract_index_ivf(shard)
        ids = np.concatenate([faiss.rev_swig_ptr(ivf.invlists.get_ids(lst), ivf.invlists.list_size(lst))
                              for lst in range(ivf.nlist)])
        assert sorted(ids) == list(range(s["first_row"], s["first_row"] + s["rows"]))  # global ids
    assert faiss.read_index(str(index_paths(out)[0])).ntotal == 0  # the trained index they share
    index, _ = load_index(Store(str(out)))
    assert isinstance(index, faiss.IndexShards) and index.count() == 3
    assert infos["size_bytes"] == sum((out / s["file"]).stat().st_size for s in shards) + (
        index_paths(out)[0]).stat().st_size

    out, infos = built["ivf-flat", "ondisk"]
    names = sorted(p.name for p in (out / "index").iterdir())
    assert names == sorted([*(p.name for p in index_paths(out)), "index_infos.json",
                            infos["ivfdata"].split("/")[-1]])  # the shards were merged away
    index, _ = load_index(Store(str(out)))
    lists = faiss.downcast_InvertedLists(faiss.extract_index_ivf(index).invlists)
    assert isinstance(lists, faiss.OnDiskInvertedLists) and lists.read_only
    assert index_paths(out)[0].stat().st_size < infos["ivfdata_bytes"] / 10  # lists live outside


def test_verify_accepts_every_layout_and_sees_a_missing_shard(built):
    from pipeline.index.check import index_problems
    from pipeline.io.vectors import VectorParts

    for (kind, layout), (out, infos) in built.items():
        store = Store(str(out))
        parts = VectorParts(store, [p["file"] for p in infos["parts"]])
        assert index_problems(store, parts, full=True) == [], (kind, layout)
    out, infos = built["ivf-flat", "shards"]
    moved = out / infos["shards"][1]["file"]
    moved.rename(moved.with_suffix(".away"))
    try:
        store = Store(str(out))
        problems = index_problems(store, VectorParts(store, [p["file"] for p in infos["parts"]]))
        assert problems == [f"index: {infos['shards'][1]['file']} missing"]
    finally:
        moved.with_suffix(".away").rename(moved)


def test_ondisk_folder_moves_and_rebuilds_clean_up(built, vectors, tmp_path):
    """A copied on-disk folder finds its .ivfdata next to index.faiss; a rebuild in another
    layout removes the previous build's files only after the new infos are written."""
    out, _ = built["ivf-flat", "ondisk"]
    moved = tmp_path / "moved"
    shutil.copytree(out, moved)
    q = queries(vectors)[:50]
    expected = load_index(Store(str(out)))[0].search(q, 10)
    got = load_index(Store(str(moved)))[0].search(q, 10)
    assert all(np.array_equal(a, b) for a, b in zip(expected, got))

    infos = rebuild_index(str(moved), {"type": "ivf-flat", "layout": "shards"})
    assert infos["layout"] == "shards" and not list((moved / "index").glob("*.ivfdata"))
    infos = rebuild_index(str(moved), {"type": "flat"})  # flat drops the recorded layout
    assert infos["layout"] == "single" and not list((moved / "index").glob("shard-*"))
    assert json.loads((moved / INFOS_FILE).read_text())["layout"] == "single"


def test_searcher_and_cli_agree_across_layouts(built, snippets_out):
    texts = ["a warm, funny film with a great cast", "dull, overlong and badly acted",
             "the soundtrack is the best thing about it"]
    tables = {layout: Searcher(str(built["ivf-pq", layout][0])).search(texts, k=8)
              for layout in LAYOUTS}
    for layout in ("shards", "ondisk"):
        assert tables[layout].equals(tables["single"])
    cli = {}
    for layout in ("single", "shards"):
        result = CliRunner().invoke(main, ["search", str(built["ivf-pq", layout][0]), texts[0],
                                           "-k", "5", "--json"])
        assert result.exit_code == 0, result.output
        cli[layout] = json.loads(result.output)
    # the real command in a process of its own: FAISS's notice on opening an on-disk index
    # must not reach stdout, which carries the JSON
    done = embedpipe("search", built["ivf-pq", "ondisk"][0], texts[0], "-k", "5", "--json")
    assert done.returncode == 0, done.stderr
    cli["ondisk"] = json.loads(done.stdout)
    assert cli["shards"] == cli["single"] == cli["ondisk"]
    assert [h["id"] for h in cli["single"]] == tables["single"].column("id").to_pylist()[:5]


def test_layout_needs_ivf_and_ondisk_a_local_disk(snippets_out, tmp_path):
    with pytest.raises(ConfigError, match="needs an IVF index"):
        config_from_dict({"index": {"type": "hnsw", "layout": "shards"}})
    with pytest.raises(ConfigError, match="layout"):
        config_from_dict({"index": {"type": "ivf-flat", "layout": "sideways"}})
    index = faiss.index_factory(8, "IVF4,Flat")
    with pytest.raises(ConfigError, match="local disk"):
        layouts.choose_layout(IndexConfig(type="ivf-flat", layout="ondisk"), index, "IVF4,Flat",
                               Store("memory://embedpipe-test"))
    assert layouts.choose_layout(IndexConfig(type="ivf-flat", layout="shards"), index,
                                  "IVF4,Flat", Store("memory://embedpipe-test")) == "shards"
    flat = faiss.index_factory(8, "Flat")
    assert layouts.choose_layout(IndexConfig(type="auto", layout="ondisk"), flat, "Flat",
                                  Store(str(tmp_path))) == "single"  # auto chose exact search
    with pytest.raises(ConfigError, match="not"):
        layouts.choose_layout(IndexConfig(type="factory", factory="Flat", layout="shards"), flat,
                               "Flat", Store(str(tmp_path)))
    out = tmp_path / "out"
    shutil.copytree(snippets_out, out)
    result = CliRunner().invoke(main, ["index", str(out), "--type", "hnsw", "--layout", "ondisk"])
    assert result.exit_code == 2 and "needs an IVF index" in result.output


def test_shard_groups():
    assert layouts.shard_groups([400, 700, 300, 1000, 50], 1000) == [[0], [1, 2], [3], [4]]
    assert layouts.shard_groups([5000, 10], 1000) == [[0], [1]]
    assert layouts.shard_groups([], 1000) == []


@pytest.mark.parametrize("layout", ["shards", "ondisk"])
def test_a_sharded_build_reads_vectors_only_in_its_jobs(snippets_out, tmp_path, monkeypatch,
                                                        layout):
    """The shards layouts' build hands every read of vectors to its runner's jobs (the training
    and recall samples, the training, the shards, the recall queries' exact neighbours and the
    recall searches), and every read of the whole folder's labels (the repeated-label check): the
    process that commits reads no vector and holds no folder-wide label or key array, only one
    part's ids at a time while it streams the id map. The recall it records is the one measured
    the old way, by streaming every part here (the same index, the same exact neighbours)."""
    from pipeline.index.build import build_index
    from pipeline.index.tuning import measure
    from pipeline.io.ledger import Ledger
    from pipeline.io.vectors import VectorParts

    out = tmp_path / "out"
    shutil.copytree(snippets_out, out)
    inside, jobs = [], []
    streamed, row_labels, keys = VectorParts.vectors, VectorParts.row_labels, VectorParts.keys

    def vectors(self, *args, **kwargs):
        assert inside, "a vector part read outside the runner's jobs"
        return streamed(self, *args, **kwargs)

    def labels_here(self):
        assert inside or len(self.files) == 1, "every row's label read outside the jobs"
        return row_labels(self)

    def keys_here(self):
        raise AssertionError("every row's key read at once")

    def runner(batch):
        jobs.extend(type(job).__name__ for job in batch)
        inside.append(True)
        try:
            return [job.run() for job in batch]
        finally:
            inside.pop()

    monkeypatch.setattr(VectorParts, "vectors", vectors)
    monkeypatch.setattr(VectorParts, "row_labels", labels_here)
    monkeypatch.setattr(layouts, "JOBS_A_CALL", 1)  # each shard's answers merged as they come
    monkeypatch.setattr(VectorParts, "keys", keys_here)
    store = Store(str(out))
    parts = Ledger(store).vector_parts()
    cfg = IndexConfig(type="ivf-flat", nlist=32, layout=layout, shard_rows=1000)
    infos = build_index(store, parts, cfg, runner)
    assert jobs.count("SampleJob") == jobs.count("ShardJob") == jobs.count("LabelJob") \
        == len(parts.files) >= 2
    assert jobs.count("MergeJob") == (layout == "ondisk")  # the merge on a worker too
    assert jobs.count("LabelCheckJob") == jobs.count("TrainJob") == 1  # 2,652 labels: one
    # partition; the quantizer trained by a job, on the samples its SampleJobs left
    assert jobs.count("SearchJob") >= 2 * len(parts.files)  # a tuning round and the report
    assert not [f for f in store.listdir("index")
                if f.startswith(("labels-", "sample-", "queries-"))]
    for name, original in (("vectors", streamed), ("row_labels", row_labels), ("keys", keys)):
        monkeypatch.setattr(VectorParts, name, original)
    index, _ = load_index(store)
    recall, params, _ = measure(index, parts, infos["count"], cfg)
    assert 0.5 < round(recall, 4) == infos["recall_at_10"] and params == infos["search_params"]
    ids = pq.read_table(out / infos["ids_file"])
    assert ids.column("faiss_id").to_numpy().tolist() == parts.row_labels().tolist()
    assert ids.column("id").to_pylist() == parts.keys().column("id").to_pylist()


@pytest.mark.parametrize("layout", LAYOUTS)
def test_labels_held_twice_index_row_positions(snippets_out, tmp_path, caplog, layout):
    """A folder whose parts carry a label twice (a damaged or hand-edited faiss_id column) is
    indexed over row positions, with a warning, by every layout: the sharded ones find it
    through their label jobs, and their shards take the positions too, not the parts' column."""
    from pipeline.index.build import build_index
    from pipeline.io.ledger import Ledger
    from pipeline.io.vectors import VectorParts

    out = tmp_path / "out"
    shutil.copytree(snippets_out, out)
    store = Store(str(out))
    parts = Ledger(store).vector_parts()
    first, second = (out / parts.files[0], out / parts.files[1])
    table = pq.read_table(second)
    copied = pq.read_table(first, columns=["faiss_id"]).column(0).to_numpy()[:5]
    held = table.column("faiss_id").to_numpy().copy()
    held[:5] = copied  # five rows of the second part take labels of the first's
    pq.write_table(table.set_column(table.schema.get_field_index("faiss_id"), "faiss_id",
                                    pa.array(held, pa.int64())), second)
    parts = VectorParts(store, parts.files, labels=parts.labels, precision=parts.precision)
    cfg = IndexConfig(type="ivf-flat", nlist=32, nprobe=32, layout=layout, shard_rows=1000)
    with caplog.at_level("WARNING"):
        infos = build_index(store, parts, cfg)
    assert "hold a label twice" in caplog.text and infos["labels"] == "position"
    n = infos["count"]
    ids = pq.read_table(out / infos["ids_file"])
    assert ids.column("faiss_id").to_numpy().tolist() == list(range(n))
    index, _ = load_index(store)
    vectors = matrix(read_vectors(out))
    probe = np.array([0, 999, 1000, 1004, n - 1])
    _, found = index.search(np.ascontiguousarray(vectors[probe]), 1)
    assert found[:, 0].tolist() == probe.tolist()


@pytest.mark.parametrize("metric,jobs_a_call", [("ip", 64), ("l2", 64), ("ip", 2), ("l2", 1)])
def test_shard_search_answers_as_index_shards_does_ties_included(tmp_path, monkeypatch, metric,
                                                                 jobs_a_call):
    """Recall on a sharded build is measured by searching each shard in a job and merging the
    answers; the merge is faiss.IndexShards' own, so the recall recorded is that of a search of
    the committed index, also where stored vectors are equal and their distances tie, and also
    when the shards' answers arrive a few calls at a time, each merged into the running one."""
    monkeypatch.setattr(layouts, "JOBS_A_CALL", jobs_a_call)
    from pipeline.index.build import shard_search
    from pipeline.index.tuning import index_search

    rng = np.random.default_rng(5)
    base = rng.standard_normal((500, 16)).astype(np.float32)
    base /= np.linalg.norm(base, axis=1)[:, None]
    x = np.vstack([base, base, base[:200]])  # every vector stored two or three times: ties
    queries = np.ascontiguousarray(x[rng.choice(len(x), 300)])
    kind = faiss.METRIC_INNER_PRODUCT if metric == "ip" else faiss.METRIC_L2
    trained = faiss.IndexIVFFlat(faiss.IndexFlat(16, kind), 16, 8, kind)
    trained.train(x)
    store, files = Store(str(tmp_path)), []
    for number, (a, b) in enumerate([(0, 400), (400, 900), (900, 1200)]):
        shard = faiss.clone_index(trained)
        shard.add_with_ids(x[a:b], np.arange(a, b))
        files.append(f"index/shard-test-{number:05d}.faiss")
        store.write_bytes(files[-1], faiss.serialize_index(shard).tobytes())
    together = layouts.open_shards(store, files)
    for nprobe in (1, 2, 8):
        d, i = shard_search(layouts.run_here, store, files, metric,
                            "index/queries-test.npy")(queries, 10, nprobe)
        d0, i0 = index_search(together)(queries, 10, nprobe)
        assert np.array_equal(i, i0) and np.array_equal(d, d0)


@pytest.mark.s3
def test_a_sharded_build_on_object_storage_equals_the_local_one(built, vectors, s3):
    """The sharded build's scratch files (samples, labels, queries, the trained index), its
    shards and its streamed id map go through the folder's filesystem: on an S3-compatible
    server (moto, on loopback) the index is the local folder's, search for search, and no
    scratch file is left in the bucket."""
    fs, bucket = s3
    local, infos = built["ivf-flat", "shards"]
    fs.put(str(local), f"{bucket}/out", recursive=True)
    url = f"s3://{bucket}/out"
    remote = rebuild_index(url, {"type": "ivf-flat", "layout": "shards", "shard_rows": 1000,
                                 **KINDS["ivf-flat"]})
    assert remote["recall_at_10"] == infos["recall_at_10"]
    assert remote["search_params"] == infos["search_params"]
    assert len(remote["shards"]) == len(infos["shards"])
    q = queries(vectors)
    index, _ = load_index(Store(url))
    reference, _ = load_index(Store(str(local)))
    d, i = index.search(q, 10)
    d0, i0 = reference.search(q, 10)
    assert np.array_equal(i, i0) and np.array_equal(d, d0)
    with fs.open(f"{bucket}/out/{remote['ids_file']}", "rb") as handle:
        assert pq.read_table(handle).equals(pq.read_table(local / infos["ids_file"]))
    left = [p.rsplit("/", 1)[-1] for p in fs.ls(f"{bucket}/out/index")]
    assert not [p for p in left if p.startswith(("labels-", "sample-", "queries-"))]
    assert sorted(left) == sorted([remote["index_file"].split("/")[-1],
                                   remote["ids_file"].split("/")[-1], "index_infos.json",
                                   *(s["file"].split("/")[-1] for s in remote["shards"])])
