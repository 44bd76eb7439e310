"""verify's duplicate-id check (io/folder_check.py: duplicate_ids) with keys spilled by hash
into partitions: the same answer as one group-by over every stored key, whatever the partition
count, for string ids, integer ids and (id, chunk) windows, and never a false duplicate where
two different ids share a 64-bit key."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from pipeline.io import folder_check
from pipeline.io.folder_check import duplicate_ids
from pipeline.io.storage import Store
from pipeline.io.vectors import VectorParts


def reference(tables: list[pa.Table], keys: list[str]) -> set:
    """Every key stored more than once: one group-by over all the parts at once."""
    counts = pa.concat_tables(tables).group_by(keys).aggregate([([], "count_all")])
    repeated = counts.filter(pc.greater(counts.column("count_all"), 1)).select(keys).to_pylist()
    return {r["id"] if len(keys) == 1 else tuple(r.values()) for r in repeated}


def folder(tmp_path, kind: str, repeats: bool) -> tuple[VectorParts, list[pa.Table], list[str]]:
    rng = np.random.default_rng(3)
    tables = []
    for part in range(4):
        n = 60
        numbers = np.arange(part * n, (part + 1) * n)
        if repeats:  # some ids again in this part and from earlier parts
            numbers[::13] = rng.integers(0, (part + 1) * n, len(numbers[::13]))
        ids = pa.array(numbers, pa.int64()) if kind == "int" else \
            pa.array([f"doc-{i}" for i in numbers])
        columns = {"id": ids}
        if kind == "window":  # a document's windows: (id, chunk) names a row
            columns["id"] = pa.array([f"doc-{i // 3}" for i in numbers])
            columns["chunk"] = pa.array(numbers % 3, pa.int32())
        tables.append(pa.table(columns))
    files = []
    for number, table in enumerate(tables):
        name = f"vectors/part-{number:05d}.parquet"
        (tmp_path / "vectors").mkdir(parents=True, exist_ok=True)
        pq.write_table(table, tmp_path / name, row_group_size=25)
        files.append(name)
    keys = ["id", "chunk"] if kind == "window" else ["id"]
    return VectorParts(Store(str(tmp_path)), files), tables, keys


def found(problems: list[str]) -> int:
    return int(problems[0].split()[0]) if problems else 0


@pytest.mark.parametrize("kind", ["str", "int", "window"])
@pytest.mark.parametrize("per_partition", [25_000_000, 7, 1])
def test_the_partitioned_check_equals_one_group_by(tmp_path, monkeypatch, kind, per_partition):
    monkeypatch.setattr(folder_check, "KEYS_PER_PARTITION", per_partition)
    parts, tables, keys = folder(tmp_path, kind, repeats=True)
    want = reference(tables, keys)
    assert len(want) > 5  # the fixture repeats keys
    problems = duplicate_ids(parts, shown=len(want))
    assert found(problems) == len(want)
    what = "ids are" if kind != "window" else "(id, chunk) windows are"
    assert f"{len(want)} {what} stored more than once" in problems[0]
    shown = problems[0].split("(e.g. ", 1)[1]
    assert all(repr(key) in shown for key in want)

    clean, _, _ = folder(tmp_path / "clean", kind, repeats=False)
    assert duplicate_ids(clean) == []


def test_ids_that_share_a_key_are_not_duplicates(tmp_path, monkeypatch):
    """A string id's key is 8 bytes of a hash: keys made to collide (id length mod 2) are
    only candidates, and the ids themselves decide."""
    monkeypatch.setattr(folder_check, "KEYS_PER_PARTITION", 50)
    real = folder_check.id_keys
    monkeypatch.setattr(folder_check, "id_keys",
                        lambda ids: (real(ids) % np.uint64(2)).astype(np.uint64))
    clean, _, _ = folder(tmp_path / "clean", "str", repeats=False)
    assert duplicate_ids(clean) == []
    parts, tables, keys = folder(tmp_path, "str", repeats=True)
    assert found(duplicate_ids(parts)) == len(reference(tables, keys))
