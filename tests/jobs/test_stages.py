"""The pieces a run is made of, each on its own: the window cut, the writer's reordering, and the
diff of the input's units against the ledger."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.io.content_hash import text_hashes
from pipeline.io.manifest import UnitRecord
from pipeline.io.precision import Precision
from pipeline.io.reader import Unit
from pipeline.io.storage import Store
from pipeline.io.writer import vectors_schema
from pipeline.jobs.messages import DONE, Encoded, Stats, UnitEnd, UnitStart, Window
from pipeline.jobs.prepare import _take
from pipeline.jobs.write import WriteStage
from pipeline.jobs.unit_diff import diff_units


def _unit(key: str, fingerprint: str = "f1", path: str | None = None) -> Unit:
    return Unit(key=key, path=path or f"/in/{key}.parquet", row_groups=(0,), first_row=0,
                num_rows=10, fingerprint=fingerprint)


class _Inbox:
    def __init__(self, items):
        self.items = iter(items)

    def get(self):
        return next(self.items)


def test_take_splits_the_first_rows_off_pieces():
    batches = [pa.record_batch({"x": list(range(a, b))}) for a, b in ((0, 3), (3, 8), (8, 10))]
    pieces = [(batches[0], 0), (batches[1], 3), (batches[2], 8)]
    taken, rest, left = _take(pieces, 4)
    assert [(b.column(0).to_pylist(), first) for b, first in taken] == [([0, 1, 2], 0), ([3], 3)]
    assert [(b.column(0).to_pylist(), first) for b, first in rest] == [([4, 5, 6, 7], 4), ([8, 9], 8)]
    assert left == 6
    taken, rest, left = _take(pieces, 10)
    assert sum(b.num_rows for b, _ in taken) == 10 and rest == [] and left == 0


def test_writer_puts_sorted_batches_back_in_input_order(tmp_path):
    """Batches arrive longest first, in any order; the part holds rows in input order."""
    store = Store(str(tmp_path))
    schema = vectors_schema(pa.int64(), 2, "float32")
    ids = pa.array([10, 11, 12, 13, 14], pa.int64())
    vectors = np.arange(10, dtype=np.float32).reshape(5, 2)  # row i is [2i, 2i+1]
    window = Window(ids=ids, n_tokens=np.array([3, 9, 5, 1, 7], np.int32),
                    truncated=np.zeros(5, bool), keep=None,
                    rejects=pa.table({"id": pa.array([], pa.int64()),
                                      "input_file": pa.array([], pa.string()),
                                      "row_number": pa.array([], pa.int64()),
                                      "reason": pa.array([], pa.string())}), n_batches=2,
                    text_hash=text_hashes(["a", "b", "c", "d", "e"]))
    first, second = np.array([1, 4]), np.array([2, 0, 3])  # sorted by length, as plan_batches does
    unit = _unit("a")
    records = []
    writer = WriteStage(store, schema, rows_per_file=100, precision=Precision(), stats=Stats(),
                    on_unit_done=records.append, progress=lambda n: None)
    writer.run(_Inbox([UnitStart(unit, 7), window, Encoded(second, vectors[second]),
                       Encoded(first, vectors[first]), UnitEnd(unit, 5, 0.1), DONE]))
    [record] = records
    assert record.complete and record.unit_id == 7 and record.counts.vectors == 5
    table = pq.read_table(tmp_path / record.vector_files[0])
    assert table.column("id").to_pylist() == [10, 11, 12, 13, 14]
    assert table.column("n_tokens").to_pylist() == [3, 9, 5, 1, 7]
    assert table.column("text_hash").combine_chunks().equals(window.text_hash)
    stored = np.stack(table.column("vector").to_numpy(zero_copy_only=False))
    assert np.array_equal(stored, vectors)


def test_diff_units_sorts_the_input_against_the_ledger():
    recorded = {
        "same": UnitRecord.for_unit(_unit("same"), "complete"),
        "edited": UnitRecord.for_unit(_unit("edited", "old"), "complete"),
        "broken": UnitRecord.for_unit(_unit("broken"), "failed", error="bad file"),
        "gone": UnitRecord.for_unit(_unit("gone"), "complete"),
    }
    units = [_unit("same"), _unit("edited", "new"), _unit("broken"), _unit("fresh")]
    diff = diff_units(recorded, units)
    assert diff.kept == ["same"]
    assert diff.changed == ["edited"]
    assert sorted(diff.redo) == ["broken", "edited"]
    assert diff.removed == ["gone"]
    assert [u.key for u in diff.todo] == ["edited", "broken", "fresh"]  # input order
    assert diff_units({}, units).todo == units
