"""A re-export night through real runs (a tiny random BERT, real FAISS): every input file renamed
and re-cut, 1% of the texts changed, a few rows added. Rows that keep their id and text keep their
label, so the index is maintained (not rebuilt) by label sets, and it answers as a fresh build
does; no label is held twice; a SIGKILL in the middle of the night and a rerun give what an
uninterrupted night gives."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from helpers import embedpipe, make_job, matrix, read_vectors, run, run_and_kill, write_job
from pipeline.commands.search import Searcher
from pipeline.index.check import index_problems
from pipeline.index.files import INFOS_FILE
from pipeline.io.ledger import Ledger
from pipeline.io.storage import Store

from test_maintain_runs import assert_same_hits, fresh_copy, query_vectors

FILES, ROWS = 8, 50  # 400 rows; 1% changed: 4 texts
CHANGED = [7, 111, 205, 333]  # row positions whose text changes on the night


@pytest.fixture(scope="module")
def texts(movie_table) -> list[str]:
    return movie_table.column("text").to_pylist()[:1200]


def export(folder, ids: np.ndarray, texts: list[str], files: int, name: str) -> None:
    """The table cut into `files` files named after `name` (the folder emptied first)."""
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    for number, cut in enumerate(np.array_split(np.arange(len(ids)), files)):
        path = folder / name.format(number)
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.table({"id": ids[cut], "text": [texts[i] for i in cut]}), path)


def night_table(texts: list[str]) -> tuple[np.ndarray, list[str]]:
    """The re-exported rows: 1% of the texts changed, three ids added, two of them with one new
    text (a repeated text: encoded once, copied to the other) and one with a stored row's text."""
    ids = np.arange(FILES * ROWS, dtype=np.int64)
    night = list(texts[:len(ids)])
    for position in CHANGED:
        night[position] = texts[600 + position]
    return (np.concatenate([ids, [9001, 9002, 9003]]),
            night + [texts[1100], texts[1100], night[20]])


def labels_by_id(out) -> dict[int, int]:
    table = read_vectors(out)
    labels = table.column("faiss_id").to_numpy()
    assert len(np.unique(labels)) == len(labels), "a label held twice"
    return dict(zip(table.column("id").to_pylist(), labels.tolist()))


def exact_recall(out, k: int = 10) -> float:
    """recall@k of the folder's index against brute force over its stored vectors."""
    vectors, q = matrix(read_vectors(out)), query_vectors(out)
    truth = np.argsort(-(q @ vectors.T), axis=1, kind="stable")[:, :k]
    found = Searcher(str(out)).search_vectors(q, k)[1]
    return float(np.mean([len(set(a) & set(b)) / k for a, b in zip(found, truth)]))


KINDS = {"flat": {}, "ivf-flat": {"nlist": 8, "nprobe": 8}, "hnsw": {}}


@pytest.mark.parametrize("kind, reuse, precision",
                         [(kind, "id+content", "float32") for kind in KINDS]
                         + [("flat", "content", "float32")]  # content reuse: the labels' rule
                         + [(kind, "id+content", "binary") for kind in KINDS])
def test_reexport_night_is_maintained_and_answers_as_a_fresh_build(tiny_model, texts, tmp_path,
                                                                    kind, reuse, precision):
    inputs, out = tmp_path / "in", tmp_path / "out"
    ids = np.arange(FILES * ROWS, dtype=np.int64)
    export(inputs, ids, texts, FILES, "day-{:03d}.parquet")
    job = make_job(inputs, out, tiny_model, index={"type": kind, **KINDS[kind]},
                   encode={"reuse": reuse}, output={"precision": precision})
    assert "rebuilt" in run(job).index
    before = labels_by_id(out)

    night_ids, night_texts = night_table(texts)
    export(inputs, night_ids, night_texts, FILES - 2, "export-2/batch-{:04d}.parquet")
    summary = run(job)
    infos = summary.index
    assert "rebuilt" not in infos, infos
    assert infos["labels"] == "stored"
    # the four changed texts and the three new ids are added; the four old texts removed
    assert infos["maintained"] | {"seconds": 0} == {
        **infos["maintained"], "added": len(CHANGED) + 3, "removed": len(CHANGED), "seconds": 0}
    after = labels_by_id(out)
    changed_ids = {int(ids[p]) for p in CHANGED}
    kept = [i for i in before if i not in changed_ids]
    assert all(after[i] == before[i] for i in kept)  # a row that keeps id and text: its label
    assert all(after[i] not in set(before.values()) for i in [*changed_ids, 9001, 9002, 9003])
    if reuse == "content":  # 9003 took row 20's stored vector, under a label of its own
        assert summary.rows_reused >= len(kept) + 1 and after[9003] != after[20]
    if kind == "hnsw":
        assert infos["tombstones"] == len(CHANGED)
    store = Store(str(out))
    assert index_problems(store, Ledger(store).vector_parts(), full=True) == []

    reference = fresh_copy(out, tmp_path, "fresh")
    if kind == "hnsw" and precision == "binary":  # Hamming: another graph, live hits
        assert (Searcher(str(out)).search_vectors(query_vectors(out), 10)[1] >= 0).all()
    elif kind == "hnsw":  # another graph: recall against brute force, as a fresh build's
        assert exact_recall(out) >= exact_recall(reference) - 0.01
        assert (Searcher(str(out)).search_vectors(query_vectors(out), 10)[1] >= 0).all()
    else:  # flat, and IVF with every list probed: exact, the same hits as brute force
        assert_same_hits(out, reference)
        assert precision == "binary" or exact_recall(out) == 1.0

    # the same rows again under other names: nothing added or removed, the index file kept
    index_file = infos["index_file"]
    export(inputs, night_ids, night_texts, FILES + 1, "export-3/part-{:04d}.parquet")
    again = run(job).index
    assert "rebuilt" not in again and again["maintained"]["added"] == 0
    assert again["maintained"]["removed"] == 0 and again["index_file"] == index_file
    assert labels_by_id(out) == after
    assert embedpipe("verify", out).returncode == 0


def test_sigkill_mid_night_then_rerun_equals_an_uninterrupted_night(tiny_model, texts,
                                                                     tmp_path):
    inputs, out = tmp_path / "in", tmp_path / "out"
    export(inputs, np.arange(FILES * ROWS, dtype=np.int64), texts, FILES, "day-{:03d}.parquet")
    job = write_job(tmp_path / "job.toml", inputs, out, tiny_model, index={"type": "hnsw"})
    done = embedpipe("run", job)
    assert done.returncode == 0, done.stderr
    uninterrupted = tmp_path / "uninterrupted"
    shutil.copytree(out, uninterrupted)
    night_ids, night_texts = night_table(texts)
    export(inputs, night_ids, night_texts, FILES - 2, "export-2/batch-{:04d}.parquet")

    run_and_kill(job, "unit:3", tmp_path)  # three units of the night committed, then SIGKILL
    done = embedpipe("run", job)
    assert done.returncode == 0, done.stderr
    other = write_job(tmp_path / "other.toml", inputs, uninterrupted, tiny_model,
                      index={"type": "hnsw"})
    done = embedpipe("run", other)
    assert done.returncode == 0, done.stderr

    assert labels_by_id(out) == labels_by_id(uninterrupted)
    for folder in (out, uninterrupted):
        infos = json.loads((folder / INFOS_FILE).read_text())
        assert "rebuilt" not in infos and infos["tombstones"] == len(CHANGED)
    assert np.array_equal(matrix(read_vectors(out)), matrix(read_vectors(uninterrupted)))
    assert exact_recall(out) >= exact_recall(uninterrupted) - 0.01
    assert embedpipe("verify", out).returncode == 0


def test_a_folder_from_before_labels_keeps_working(tiny_model, texts, tmp_path):
    """Parts without a faiss_id column and an index of unit-row labels (what earlier versions
    wrote): kept units keep their labels; the first re-export adds its reused rows anew, once."""
    from pipeline.io.checks import check_file

    inputs, out = tmp_path / "in", tmp_path / "out"
    ids = np.arange(FILES * ROWS, dtype=np.int64)
    export(inputs, ids, texts, FILES, "day-{:03d}.parquet")
    job = make_job(inputs, out, tiny_model, index={"type": "flat"})
    run(job)  # a first run: every row's label is its unit-row label
    store = Store(str(out))
    ledger = Ledger(store)
    for record in ledger.units.values():
        for name in record.vector_files:
            pq.write_table(pq.read_table(out / name).drop_columns(["faiss_id"]), out / name)
            record.checks[name] = check_file(store, name, full=True)
        ledger.commit_unit(record)
    infos = json.loads((out / INFOS_FILE).read_text())
    (out / INFOS_FILE).write_text(json.dumps({**infos, "labels": "unit-row"}))
    assert index_problems(store, Ledger(store).vector_parts(), full=True) == []

    night_ids, night_texts = night_table(texts)
    export(inputs, night_ids, night_texts, FILES - 2, "export-2/batch-{:04d}.parquet")
    first = run(job).index
    assert "rebuilt" not in first and first["maintained"]["added"] == len(night_ids)
    assert first["maintained"]["removed"] == len(ids)
    assert_same_hits(out, fresh_copy(out, tmp_path, "fresh"))
    labelled = labels_by_id(out)
    export(inputs, night_ids, night_texts, FILES + 1, "export-3/part-{:04d}.parquet")
    second = run(job).index
    assert second["maintained"]["added"] == second["maintained"]["removed"] == 0
    assert labels_by_id(out) == labelled
    assert embedpipe("verify", out).returncode == 0
