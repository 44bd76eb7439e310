"""`verify`'s content check of the index's id map (index/check.py), streamed a block at a time:
every way the map can differ from the stored rows is found, whatever the block sizes, and a
map that matches passes. The reference for "matches" is the whole id map read at once against
every part's ids and labels."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from helpers import film_texts, small_job, write_shards
from pipeline.index import check
from pipeline.index.check import index_problems
from pipeline.index.files import INFOS_FILE, ids_file
from pipeline.io.ledger import Ledger
from pipeline.io.storage import Store
from pipeline.config import load_job
from pipeline.jobs.runner import RunOptions, run_job

INDEX = {"type": "ivf-flat", "nlist": 4, "nprobe": 4}


@pytest.fixture(scope="module")
def folder(tmp_path_factory, tiny_model):
    tmp = tmp_path_factory.mktemp("index_check")
    write_shards(tmp / "in", [pa.table({"id": [f"d{i}-{j}" for j in range(70)],
                                        "text": film_texts(70, 90 + i)}) for i in range(3)])
    job = small_job(tmp / "job.toml", tmp / "in", tmp / "out", tiny_model, index=INDEX)
    run_job(load_job(str(job)), RunOptions(progress=False))
    return tmp / "out"


def problems(out) -> list[str]:
    store = Store(str(out))
    return index_problems(store, Ledger(store).vector_parts(), full=True)


def id_map_path(out):
    return out / ids_file(json.loads((out / INFOS_FILE).read_text()))


def rewritten(out, tmp_path, change):
    """A copy of the folder whose id map is `change(table)`, written as a valid Parquet file."""
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    path = id_map_path(copy)
    pq.write_table(change(pq.read_table(path)), path)
    return copy


@pytest.mark.parametrize("block", [65_536, 7, 50, 1])
def test_a_matching_id_map_passes_at_any_block_size(folder, monkeypatch, block):
    store = Store(str(folder))
    parts = Ledger(store).vector_parts()
    assert len(parts.files) >= 4  # 210 rows at 50 a part: the blocks cross the parts
    whole = pq.read_table(id_map_path(folder))  # the reference: everything at once
    assert np.array_equal(whole.column("faiss_id").to_numpy(), parts.row_labels())
    assert whole.column("id").equals(parts.keys().column("id"))
    monkeypatch.setattr(check, "READ_ROWS", block)
    assert problems(folder) == []


def swap_ids(table):
    ids = table.column("id").to_pylist()
    ids[60], ids[61] = ids[61], ids[60]  # in the second part
    return table.set_column(table.schema.get_field_index("id"), "id", pa.array(ids))


def change_label(table):
    labels = table.column("faiss_id").to_numpy().copy()
    labels[-1] += 1
    return table.set_column(table.schema.get_field_index("faiss_id"), "faiss_id",
                            pa.array(labels))


@pytest.mark.parametrize("change", [
    swap_ids, change_label,
    lambda t: pa.concat_tables([t.slice(1), t.slice(0, 1)]),  # every row one off
    lambda t: t.drop_columns(["id"]),  # no ids
], ids=["swapped ids", "a label changed", "rotated", "no id column"])
@pytest.mark.parametrize("block", [65_536, 7])
def test_every_difference_is_found(folder, tmp_path, monkeypatch, change, block):
    monkeypatch.setattr(check, "READ_ROWS", block)
    copy = rewritten(folder, tmp_path, change)
    found = problems(copy)
    # the digests are not compared here (full=True, digests=False): the content check finds it
    assert len(found) == 1 and "does not list the stored ids in order" in found[0], found


@pytest.mark.parametrize("change", [lambda t: t.slice(0, t.num_rows - 1),
                                    lambda t: pa.concat_tables([t, t.slice(0, 1)])],
                         ids=["a row short", "a row more"])
def test_a_map_of_other_length_is_found_before_it_is_read(folder, tmp_path, change):
    rel = id_map_path(folder).relative_to(folder).as_posix()
    assert problems(rewritten(folder, tmp_path, change)) == [f"index: {rel} does not map 210 ids"]
