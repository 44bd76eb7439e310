"""The nightly benchmark end to end on a tiny corpus: its equivalence checks pass on a maintained
folder, and fail when a stored vector is altered (so they cannot pass vacuously)."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.io.ledger import Ledger
from pipeline.io.storage import Store
from bench import nightly as nb


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    work = tmp_path_factory.mktemp("nightly")
    return work, nb.run_nights(work, rows=2000, files=4, model="tiniest", max_length=32,
                               index_type="flat", log=lambda msg: None)


def test_corpus_edits_are_what_they_say():
    pool = [f"Sentence number {i}." for i in range(1000)]
    maker = nb.TextMaker(pool, 0)
    corpus = nb.base_corpus(maker, 1000)
    assert len(set(corpus.texts)) == 1000 - 5  # 0.5% exact duplicates
    before = list(corpus.texts)
    changed = nb.change_rows(corpus, maker, 0.01)
    assert len(changed) == 10
    assert [i for i in range(1000) if corpus.texts[i] != before[i]] == changed.tolist()
    after, counts = nb.night_b_corpus(corpus, maker)
    assert counts == {"changed": 10, "added": 5, "removed": 5}
    assert after.rows == 1000 and len(np.unique(after.ids)) == 1000
    assert (np.sort(after.ids)[-5:] == np.arange(1000, 1005)).all()


def test_nights_run_and_match_a_fresh_run(report):
    work, rep = report
    labels = [r["label"] for r in rep["runs"]]
    assert labels == ["full run", "night a", "night b", "night c", "fresh"]
    assert all(r["peak_rss_mb"] and r["seconds"] > 0 for r in rep["runs"])
    night_c = rep["runs"][3]["summary"]
    assert night_c["rows_read"] == 0  # nothing changed: nothing read
    assert rep["runs"][4]["summary"]["vectors_written"] == rep["input_rows_final"]
    assert {name: c["pass"] for name, c in rep["checks"].items()} == {
        "ids": True, "vectors": True, "search": True}
    assert not nb.failed(rep)
    text = nb.render(rep)
    assert "STAND-IN model" in text and "PASS  vectors" in text
    assert nb.render(rep, markdown=True).count("| night ") == 3


def test_an_altered_vector_fails_the_check(report):
    work, rep = report
    maintained = work / "out" / "maintained"
    store = Store(str(maintained))
    path = store.path(Ledger(store).vector_files()[1])
    table = pq.read_table(path)
    vectors = np.stack(table.column("vector").to_numpy(zero_copy_only=False)).astype(np.float32)
    vectors[7, 3] += 1e-3
    column = pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel()), vectors.shape[1])
    pq.write_table(table.set_column(table.schema.get_field_index("vector"), "vector", column), path)
    checks = nb.compare_folders(maintained, work / "out" / "fresh", index_type="flat")
    assert checks["ids"]["pass"]
    assert not checks["vectors"]["pass"]
    assert checks["vectors"]["max_abs_diff"] == pytest.approx(1e-3, rel=1e-2)
