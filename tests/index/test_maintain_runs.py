"""Index maintenance through real runs over an input folder that changes between them (a tiny
random BERT, real FAISS): the maintained index searches as a fresh build does, a SIGKILL in the
middle of maintenance leaves the earlier index whole, and old position indexes are rebuilt."""
from __future__ import annotations

import json
import shutil

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from helpers import (embedpipe, index_paths, make_job, matrix, read_vectors, run, run_and_kill,
                     write_job)
from pipeline.commands.reindex import rebuild_index
from pipeline.commands.search import Searcher
from pipeline.index.build import load_index
from pipeline.index.check import index_problems
from pipeline.index.files import INFOS_FILE
from pipeline.index.family import unwrapped
from pipeline.io.ledger import Ledger
from pipeline.io.storage import Store

ROWS = 40  # texts an input file


@pytest.fixture(scope="module")
def texts(movie_table) -> list[str]:
    return movie_table.column("text").to_pylist()[:2000]


def write_input(folder, number: int, texts: list[str], offset: int = 0) -> None:
    """Input file number `number`: ROWS texts, ids number * 1000 + i."""
    folder.mkdir(parents=True, exist_ok=True)
    start = number * ROWS + offset
    pq.write_table(pa.table({"id": np.arange(ROWS) + number * 1000,
                             "text": texts[start:start + ROWS]}),
                   folder / f"in-{number:02d}.parquet")


def query_vectors(out) -> np.ndarray:
    """Float queries near the stored vectors (a quantized folder's dequantized)."""
    from pipeline.io.output import open_output
    stored = open_output(str(out)).dequantized()
    rng = np.random.default_rng(5)
    mixed = stored[rng.choice(len(stored), 150)] + stored[rng.choice(len(stored), 150)]
    return np.ascontiguousarray(np.vstack([stored[rng.choice(len(stored), 150, replace=False)],
                                           mixed]), np.float32)


def fresh_copy(out, tmp_path, name: str):
    """The folder copied and its index rebuilt from scratch (`embedpipe index`)."""
    copy = tmp_path / name
    shutil.copytree(out, copy)
    rebuild_index(str(copy), {})
    return copy


def assert_same_hits(out, reference, atol=1e-5) -> None:
    """Searches return the same rows and scores (rows tied at the k-th score aside)."""
    q = query_vectors(out)
    d0, i0 = Searcher(str(reference)).search_vectors(q, 10)
    d1, i1 = Searcher(str(out)).search_vectors(q, 10)
    np.testing.assert_allclose(d1, d0, atol=atol)
    for a, b, d in zip(i1, i0, d0):
        above = (d > d[-1] + atol) if d[0] >= d[-1] else (d < d[-1] - atol)
        assert set(a[above]) == set(b[above]) and (a >= 0).all()


KNOBS = {"flat": {}, "hnsw": {},
         "ivf-flat": {"nlist": 8, "nprobe": 8}}  # every list probed: exact, as a fresh build


@pytest.mark.parametrize("kind", KNOBS)
def test_runs_maintain_the_index_as_inputs_come_change_and_go(tiny_model, texts, tmp_path, kind):
    inputs, out = tmp_path / "in", tmp_path / "out"
    for number in range(12):  # one unit removed of 13: HNSW's 40 tombstones stay under 10%
        write_input(inputs, number, texts)
    job = make_job(inputs, out, tiny_model, index={"type": kind, **KNOBS[kind]})
    assert "rebuilt" in run(job).index  # the first index is a build
    steps = [("add", lambda: write_input(inputs, 12, texts)),
             ("remove", lambda: (inputs / "in-03.parquet").unlink())]
    if kind != "hnsw":  # a changed unit (HNSW: its labels come back, which rebuilds)
        steps.append(("change", lambda: write_input(inputs, 5, texts, offset=1000)))
    for what, step in steps:
        vectors_before = matrix(read_vectors(out))
        step()
        infos = run(job).index
        assert "rebuilt" not in infos, (what, infos)
        assert infos["maintained"]["added"] + infos["maintained"]["removed"] > 0, what
        reference = fresh_copy(out, tmp_path, f"fresh-{what}")
        if kind != "hnsw":
            assert_same_hits(out, reference)
        elif what == "remove":  # tombstones: never a hit
            assert infos["tombstones"] == ROWS
            searcher = Searcher(str(out))
            q = query_vectors(out)
            q[:ROWS] = vectors_before[3 * ROWS:4 * ROWS]  # the removed texts' own vectors
            # a tombstone found would be a label the id map lacks: a -1 row
            assert (searcher.search_vectors(q, 10)[1] >= 0).all()
            _, labels = searcher.index.search(q, 10, params=searcher.live.params)
            tombstones = set(np.load(out / infos["tombstones_file"]).tolist())
            assert len(tombstones) == ROWS and not tombstones & set(labels.ravel().tolist())
    assert embedpipe("verify", out).returncode == 0


def test_sigkill_during_maintenance_then_rerun(tiny_model, texts, tmp_path):
    inputs, out = tmp_path / "in", tmp_path / "out"
    for number in range(6):
        write_input(inputs, number, texts)
    job = write_job(tmp_path / "job.toml", inputs, out, tiny_model, index={"type": "flat"})
    done = embedpipe("run", job)
    assert done.returncode == 0, done.stderr
    before = json.loads((out / INFOS_FILE).read_text())
    write_input(inputs, 6, texts)
    (inputs / "in-01.parquet").unlink()
    run_and_kill(job, "index-commit", tmp_path)  # new index files written, infos not yet
    store = Store(str(out))
    assert json.loads((out / INFOS_FILE).read_text()) == before
    index, _ = load_index(store)  # the earlier index, whole
    assert index.ntotal == before["count"]
    assert len(list((out / "index").glob("index-*.faiss"))) == 2  # the killed build's strays
    assert any("other vector parts" in p for p in index_problems(store, Ledger(store).vector_parts()))

    done = embedpipe("run", job)
    assert done.returncode == 0, done.stderr
    infos = json.loads((out / INFOS_FILE).read_text())
    assert infos["maintained"] == {**infos["maintained"], "added": ROWS, "removed": ROWS}
    assert sorted(p.name for p in (out / "index").iterdir()) == sorted(
        [*(p.name for p in index_paths(out)), "index_infos.json"])
    assert_same_hits(out, fresh_copy(out, tmp_path, "fresh"))
    verified = embedpipe("verify", out)
    assert verified.returncode == 0, verified.stdout + verified.stderr


def test_old_position_index_is_searchable_then_rebuilt(tiny_model, texts, tmp_path):
    inputs, out = tmp_path / "in", tmp_path / "out"
    for number in range(3):
        write_input(inputs, number, texts)
    job = make_job(inputs, out, tiny_model, index={"type": "flat"})
    run(job)
    # the folder as an earlier embedpipe left it: index.faiss and ids.parquet of row positions
    infos = json.loads((out / INFOS_FILE).read_text())
    index_file, ids_file = index_paths(out)
    vectors = matrix(read_vectors(out))
    old = faiss.IndexFlatIP(vectors.shape[1])
    old.add(vectors)
    faiss.write_index(old, str(out / "index" / "index.faiss"))
    ids = pq.read_table(ids_file).drop_columns(["faiss_id"])
    pq.write_table(ids.add_column(0, "faiss_id", pa.array(np.arange(len(vectors)))),
                   out / "index" / "ids.parquet")
    index_file.unlink()
    ids_file.unlink()
    old_infos = {k: v for k, v in infos.items()
                 if k not in ("index_file", "ids_file", "labels", "config", "built", "built_count",
                              "training_error", "files")}
    old_infos["parts"] = [{"file": p["file"], "rows": p["rows"]} for p in infos["parts"]]
    (out / INFOS_FILE).write_text(json.dumps(old_infos))

    hits = Searcher(str(out)).search_vectors(vectors[:20], 1)[1]
    assert hits[:, 0].tolist() == np.argmax(vectors[:20] @ vectors.T, axis=1).tolist()
    write_input(inputs, 3, texts)
    infos = run(job).index
    assert infos["rebuilt"] == "the index was built over row positions"
    assert not (out / "index" / "index.faiss").exists()
    assert index_problems(Store(str(out)), Ledger(Store(str(out))).vector_parts(), full=True) == []


def test_another_index_type_on_a_complete_folder_rebuilds_it(tiny_model, texts, tmp_path):
    """Nothing to embed, but the job now asks for another index: the rerun builds that one from
    the stored vectors (it used to keep the old index and exit 0), and a rerun after it keeps it."""
    inputs, out = tmp_path / "in", tmp_path / "out"
    for number in range(3):
        write_input(inputs, number, texts)
    run(make_job(inputs, out, tiny_model, index={"type": "flat"}))
    vectors = matrix(read_vectors(out))
    job = make_job(inputs, out, tiny_model, index={"type": "hnsw", **KNOBS["hnsw"]})
    infos = run(job).index
    assert infos["kind"] == "hnsw" and infos["rebuilt"] == "the index settings changed"
    assert np.array_equal(matrix(read_vectors(out)), vectors)  # nothing embedded again
    assert isinstance(unwrapped(load_index(Store(str(out)))[0]), faiss.IndexHNSW)
    again = run(job)
    assert again.index == infos and again.units_done == 0 and again.units_skipped == 3
    assert embedpipe("verify", out).returncode == 0


def test_sigkill_in_a_sharded_build_then_rerun(tiny_model, texts, tmp_path):
    """A real SIGKILL while a sharded build writes its first shard (the trained index and the
    recall queries already in their scratch files, the label check done): the rerun builds the
    index afresh, removes every scratch file the killed build left, and its index answers as an
    uninterrupted run's does, file names aside."""
    inputs = tmp_path / "in"
    for number in range(6):
        write_input(inputs, number, texts)
    index = {"type": "ivf-flat", "nlist": 4, "nprobe": 4, "layout": "shards", "shard_rows": 80}
    job = write_job(tmp_path / "job.toml", inputs, tmp_path / "out", tiny_model, index=index)
    run_and_kill(job, "shard", tmp_path)
    out = tmp_path / "out"
    left = {p.name.split("-")[0] for p in (out / "index").iterdir()}
    assert {"index", "queries"} <= left and not (out / INFOS_FILE).exists()
    assert not {"labels", "sample", "shard"} & left  # removed when their step ended
    done = embedpipe("run", job)
    assert done.returncode == 0, done.stderr
    infos = json.loads((out / INFOS_FILE).read_text())
    assert infos["layout"] == "shards" and len(infos["shards"]) == 3
    named = [*(p.name for p in index_paths(out)), *(s["file"].split("/")[-1]
                                                     for s in infos["shards"])]
    assert sorted(p.name for p in (out / "index").iterdir()) == sorted(
        [*named, "index_infos.json"])
    clean = write_job(tmp_path / "clean.toml", inputs, tmp_path / "clean", tiny_model,
                      index=index)
    assert embedpipe("run", clean).returncode == 0
    reference = json.loads((tmp_path / "clean" / INFOS_FILE).read_text())
    assert infos["recall_at_10"] == reference["recall_at_10"]
    assert infos["search_params"] == reference["search_params"]
    assert_same_hits(out, tmp_path / "clean", atol=0)
    verified = embedpipe("verify", out)
    assert verified.returncode == 0, verified.stdout + verified.stderr
