"""Trust the bytes: a byte changed anywhere in a folder is caught, never copied into the index,
and the command verify names repairs it.

Each kind of damage on a real folder made by the real CLI: `verify` exits 1 naming the repair,
that command runs, `verify` exits 0, and the folder (vectors, ids, index answers) equals a clean
run's. Damage is made as a hostile hand would: bytes changed in place, same size, footers left."""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from helpers import (embedpipe, film_texts, index_paths, read_vectors, three_shards, write_job,
                     write_shards)

pytestmark = pytest.mark.integrity


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    return three_shards(tmp_path_factory.mktemp("trust") / "in")


def job_for(tmp: Path, inputs: Path, model: Path, **index) -> Path:
    return write_job(tmp / "job.toml", inputs, tmp / "out", model,
                     model={"max_length": 32}, output={"rows_per_file": 25},
                     encode={"normalize": True}, index={"type": "flat", "metric": "ip", **index})


@pytest.fixture(scope="module")
def clean(tmp_path_factory, inputs, tiny_model) -> Path:
    tmp = tmp_path_factory.mktemp("clean")
    result = embedpipe("run", job_for(tmp, inputs, tiny_model))
    assert result.returncode == 0, result.stderr
    return tmp / "out"


def answers(out: Path, k: int = 5) -> list[list]:
    """The index's answers: the ids of the k nearest live vectors to every stored vector."""
    from pipeline.index.build import load_index
    from pipeline.index.files import read_tombstones
    from pipeline.index.live import LiveIndex
    from pipeline.io.storage import Store
    from helpers import matrix

    store = Store(str(out))
    index, infos = load_index(store)
    id_map = pq.read_table(index_paths(out)[1])
    live = LiveIndex(index, id_map.column("faiss_id").to_numpy(), read_tombstones(store, infos))
    _, rows = live.search(matrix(read_vectors(out)), k)
    ids = id_map.column("id").to_pylist()
    return [[ids[r] for r in row] for row in rows]


def assert_same_folder(a: Path, b: Path) -> None:
    va, vb = read_vectors(a), read_vectors(b)
    assert va.select(["id", "vector", "n_tokens"]).equals(vb.select(["id", "vector", "n_tokens"]))
    assert pq.read_table(index_paths(a)[1]).column("id").equals(
        pq.read_table(index_paths(b)[1]).column("id"))
    assert answers(a) == answers(b)


def negate_row(path: Path, row: int) -> None:
    """One row's vector negated inside the part, in place: same size, footer untouched."""
    vector = np.asarray(pq.read_table(path).column("vector")[row].as_py(), np.float32)
    data = bytearray(path.read_bytes())
    at = data.find(vector.tobytes())
    assert at > 0 and data.find(vector.tobytes(), at + 1) < 0
    data[at:at + vector.nbytes] = (-vector).tobytes()
    path.write_bytes(bytes(data))


def swap_ids(path: Path) -> None:
    """Two ids swapped in the index's id map (rewritten whole: a valid Parquet file)."""
    table = pq.read_table(path)
    ids = table.column("id").to_pylist()
    ids[0], ids[1] = ids[1], ids[0]
    pq.write_table(table.set_column(table.schema.get_field_index("id"), "id",
                                    pa.array(ids, table.schema.field("id").type)), path)


def damage(out: Path, how: str) -> str:
    """Damage the folder; returns what verify must say."""
    parts = sorted((out / "vectors").glob("*.parquet"))
    index_file, ids_file = index_paths(out)
    if how == "vector bytes":
        negate_row(parts[1], 7)
        return "its bytes changed since it was committed"
    if how == "truncated part":
        parts[2].write_bytes(parts[2].read_bytes()[:-100])
        return "footer"
    if how == "swapped ids":
        swap_ids(ids_file)
        return "index/ids-"
    if how == "truncated index":
        index_file.write_bytes(index_file.read_bytes()[:1000])
        return "recorded when it was written (truncated or replaced)"
    if how == "zeroed index":
        index_file.write_bytes(bytes(index_file.stat().st_size))
        return "its bytes changed since it was written"
    if how == "id map labels":  # a row's label in the id map changed (a valid Parquet file)
        table = pq.read_table(ids_file)
        labels = table.column("faiss_id").to_numpy().copy()
        labels[3] += 1
        pq.write_table(table.set_column(0, "faiss_id", pa.array(labels)), ids_file)
        return "index/ids-"
    raise AssertionError(how)


@pytest.mark.parametrize("how, command", [
    ("vector bytes", "run"), ("truncated part", "run"), ("swapped ids", "run"),
    ("swapped ids", "index"), ("truncated index", "run"), ("zeroed index", "index"),
    ("id map labels", "run")])
def test_damage_fails_verify_and_the_named_command_repairs_it(tmp_path, inputs, tiny_model, clean,
                                                             how, command):
    job = job_for(tmp_path, inputs, tiny_model)
    assert embedpipe("run", job).returncode == 0
    out = tmp_path / "out"
    needle = damage(out, how)
    check = embedpipe("verify", out)
    assert check.returncode == 1, check.stdout
    assert needle in check.stdout, check.stdout
    advice = check.stdout.splitlines()[-1]
    assert "`embedpipe run` on the same job" in advice and f"`embedpipe index {out}`" in advice
    if command == "run":
        repair = embedpipe("run", job, "--json")
        assert repair.returncode == 0, repair.stderr
        if "part" in how or "vector" in how:
            assert json.loads(repair.stdout)["units_repaired"] == 1
    else:
        repair = embedpipe("index", out)
        assert repair.returncode == 0, repair.stderr
    after = embedpipe("verify", out)
    assert after.returncode == 0, after.stdout
    assert "every byte as recorded" in after.stdout
    assert_same_folder(out, clean)


def test_a_changed_vector_is_never_read_nor_copied_into_the_index(tmp_path, inputs, tiny_model,
                                                                 clean):
    """The damage of issue 26 (1, 2): open_output refuses the part (its page checksum), `index`
    refuses to build from it, naming it, and leaves the index as it was."""
    from pipeline.io.checks import DamagedFile
    from pipeline.io.output import open_output

    job = job_for(tmp_path, inputs, tiny_model)
    assert embedpipe("run", job).returncode == 0
    out = tmp_path / "out"
    before = index_paths(out)[0].read_bytes()
    negate_row(out / "vectors" / "part-00001-0000.parquet", 3)
    with pytest.raises(DamagedFile, match="part-00001-0000.parquet.*checksum"):
        open_output(str(out)).vectors()
    refused = embedpipe("index", out)
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    (line,) = [x for x in refused.stderr.splitlines() if x.startswith("error: ")]
    assert "vectors/part-00001-0000.parquet" in line and "`embedpipe run`" in line
    assert index_paths(out)[0].read_bytes() == before
    assert embedpipe("verify", out, "--quick").returncode == 1  # the page checksum, read
    assert embedpipe("run", job).returncode == 0
    assert_same_folder(out, clean)


def test_hnsw_tombstones_changed_are_found_and_rebuilt(tmp_path, tiny_model):
    """An HNSW index keeps removed rows as tombstones (a file the infos name): one changed in
    place is found by verify, and the next run rebuilds the index."""
    inputs = tmp_path / "in"
    write_shards(inputs, [pa.table({"id": np.arange(i * 20, i * 20 + 20), "text": film_texts(20, i)})
                          for i in range(10)])
    job = job_for(tmp_path, inputs, tiny_model, type="hnsw")
    assert embedpipe("run", job).returncode == 0
    write_shards(inputs, [pa.table({"id": np.arange(20, 40), "text": film_texts(20, 99)})],
                 ["part-00001.parquet"])
    assert embedpipe("run", job).returncode == 0
    out = tmp_path / "out"
    infos = json.loads((out / "index" / "index_infos.json").read_text())
    tomb = out / infos["tombstones_file"]
    labels = np.load(io.BytesIO(tomb.read_bytes()))
    assert len(labels) == 20
    clean_answers = answers(out, 1)
    changed = labels.copy()
    changed[0] = labels[0] + (1 << 32)  # a label of another unit
    buffer = io.BytesIO()
    np.save(buffer, changed)
    assert len(buffer.getvalue()) == tomb.stat().st_size
    tomb.write_bytes(buffer.getvalue())
    check = embedpipe("verify", out)
    assert check.returncode == 1 and infos["tombstones_file"] in check.stdout, check.stdout
    assert embedpipe("run", job).returncode == 0
    assert embedpipe("verify", out).returncode == 0
    assert answers(out, 1) == clean_answers == [[i] for i in read_vectors(out).column("id").to_pylist()]


def test_a_manifest_without_digests_still_works_and_is_repaired(tmp_path, inputs, tiny_model,
                                                               clean):
    """Records written before digests: verify says so in its ok line; a changed page is still
    found (its checksum) by verify and by the run, which re-embeds the unit."""
    job = job_for(tmp_path, inputs, tiny_model)
    assert embedpipe("run", job).returncode == 0
    out = tmp_path / "out"
    manifest = json.loads((out / "manifest.json").read_text())
    for unit in manifest["units"].values():
        for check in unit["checks"].values():
            del check["digest"]
    (out / "manifest.json").write_text(json.dumps(manifest))
    ok = embedpipe("verify", out)
    assert ok.returncode == 0 and "3 from before digests" in ok.stdout, ok.stdout
    negate_row(out / "vectors" / "part-00002-0000.parquet", 5)
    check = embedpipe("verify", out)
    assert check.returncode == 1 and "CRC checksum verification failed" in check.stdout
    repair = embedpipe("run", job, "--json")
    assert repair.returncode == 0 and json.loads(repair.stdout)["units_repaired"] == 1
    assert embedpipe("verify", out).returncode == 0
    assert_same_folder(out, clean)
