"""The manifest's unit records and reading a finished folder back."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from pipeline.config import ConfigError
from pipeline.io.ledger import Ledger
from pipeline.io.manifest import UnitCounts, UnitRecord
from pipeline.io.reader import Unit
from pipeline.io.storage import Store


def _unit(key: str, fingerprint: str = "f1", path: str | None = None) -> Unit:
    return Unit(key=key, path=path or f"/in/{key}.parquet", row_groups=(0,), first_row=0,
                num_rows=10, fingerprint=fingerprint)


def test_unit_records_round_trip_through_the_manifest(tmp_path):
    store = Store(str(tmp_path))
    ledger = Ledger(store)
    done = UnitRecord.for_unit(_unit("b", path="/in/b.parquet"), "complete", unit_id=1,
                               counts=UnitCounts(rows_in=5, vectors=4, rows=4, rejects=1,
                                                 reject_reasons={"null text": 1}),
                               vector_files=["vectors/part-00001-0000.parquet"],
                               reject_files=["rejects/part-00001.parquet"], seconds=0.5)
    first = UnitRecord.for_unit(_unit("a", path="/in/a.parquet"), "complete", unit_id=0,
                                vector_files=["vectors/part-00000-0000.parquet"])
    failed = UnitRecord.for_unit(_unit("c"), "failed", error="ArrowInvalid: corrupt")
    for record in (done, first, failed):
        ledger.commit_unit(record)
    raw = store.read_json("manifest.json")["units"]
    assert raw["b"]["vectors"] == done.vector_files and raw["b"]["rejects_files"] == done.reject_files
    assert set(raw["c"]) == {"key", "path", "first_row", "row_groups", "fingerprint", "status",
                             "error"}
    again = Ledger(store)
    assert again.units["b"] == done and again.units["c"].error == failed.error
    # files of complete units, in input order (path, first row); failed units name none
    assert again.vector_files() == first.vector_files + done.vector_files
    assert again.reject_files() == ["rejects/part-00001.parquet"]


@pytest.mark.slow
def test_open_output_reads_the_folder_back_in_order(tmp_path, tiny_model):
    from helpers import make_job, read_vectors, run, write_shards
    from pipeline import open_output

    tables = [pa.table({"id": np.arange(i * 30, i * 30 + 30), "text": [f"text {j} of {i}" for j in range(30)]})
              for i in range(3)]
    write_shards(tmp_path / "in", tables)
    run(make_job(tmp_path / "in", tmp_path / "out", tiny_model, output={"rows_per_file": 20,
                                                                         "keep_columns": ["text"]}))
    out = open_output(str(tmp_path / "out"))
    expected = read_vectors(tmp_path / "out")
    assert out.count == 90 and out.ids().to_pylist() == list(range(90))
    assert out.columns == ["id", "vector", "n_tokens", "truncated", "text_hash", "faiss_id", "text"]
    assert out.table(["id", "text"]).column("text").to_pylist() == expected.column("text").to_pylist()
    with pytest.raises(ConfigError, match=r"has no column 'label'; its parts have id, vector"):
        out.table(["id", "label"])  # not kept: refused, not a table without it
    stored = np.stack(expected.column("vector").to_numpy(zero_copy_only=False))
    assert np.array_equal(out.vectors(), stored)


def test_pyarrow_reads_a_local_folder_through_native_files(tmp_path):
    """Store.open_input: a local file is an Arrow native file (its reads never take the GIL, so
    no Arrow thread can be left freeing Python buffers as the interpreter exits, which aborted
    `search --hybrid` about once in 40 runs); elsewhere the filesystem's own handle, which
    pyarrow reads the same; a missing file is FileNotFoundError either way."""
    import pyarrow.parquet as pq

    table = pa.table({"id": ["a", "b"], "n": [1, 2]})
    for store in (Store(str(tmp_path)), Store("memory://open-input")):
        with store.open_atomic("t.parquet") as handle:
            pq.write_table(table, handle)
        with store.open_input("t.parquet") as handle:
            assert isinstance(handle, pa.NativeFile) == store.local
            assert pq.read_table(handle).equals(table)
        with pytest.raises(FileNotFoundError):
            store.open_input("missing.parquet")
