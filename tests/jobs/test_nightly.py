"""Nightly runs that cost what changed: rows reused by content hash, repeated texts encoded once,
the columnar id registry, crash safety of retired parts. The reference is always a fresh run
with reuse off on the same input: same ids in the same order, vectors within 1e-5."""
from __future__ import annotations

import json
import shutil
import tracemalloc

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from helpers import (SMALL, embedpipe, make_job, matrix, read_vectors, run, run_and_kill,
                     small_job, write_shards)
from pipeline.io.content_hash import hash_keys, text_hashes
from pipeline.io.registry import StoredRows, scan_input
from pipeline.io.storage import Store
from pipeline.io.reader import plan_units
from pipeline.config import InputConfig


def _job(inp, out, model, **sections):
    merged = {k: {**SMALL.get(k, {}), **sections.get(k, {})} for k in {*SMALL, *sections}}
    return make_job(inp, out, model, **merged)


@pytest.fixture
def corpus(movie_table):
    """300 real snippets with int ids, in three files."""
    table = movie_table.slice(0, 300).select(["id", "text"])
    return table.set_column(0, "id", pa.array(np.arange(300, dtype=np.int64)))


def _fresh(tmp_path, inp, model, **sections):
    """The reference: a clean run of the same input with reuse off."""
    out = tmp_path / f"fresh-{len(list(tmp_path.iterdir()))}"
    encode = {**sections.pop("encode", {}), "reuse": "off"}
    summary = run(_job(inp, out, model, encode=encode, **sections))
    assert summary.exit_code == 0, summary.failures
    return out


def _same_as_fresh(tmp_path, out, inp, model, **sections):
    """Same ids in the same order, vectors within 1e-5, and the maintained (flat) index answers
    every stored vector as a query with the ids and scores of the fresh run's index."""
    from pipeline.commands.search import Searcher

    fresh_out = _fresh(tmp_path, inp, model, **sections)
    mine, fresh = read_vectors(out), read_vectors(fresh_out)
    assert mine.column("id").equals(fresh.column("id"))
    assert np.abs(matrix(mine) - matrix(fresh)).max() < 1e-5
    assert mine.column("text_hash").equals(fresh.column("text_hash"))
    queries = matrix(fresh)
    answers = []
    for folder in (out, fresh_out):
        searcher = Searcher(str(folder), device="cpu")
        scores, rows = searcher.search_vectors(queries, 10)
        answers.append((scores, np.asarray(searcher.ids.to_pylist(), object)[rows]))
    (mine_scores, mine_ids), (fresh_scores, fresh_ids) = answers
    assert np.abs(mine_scores - fresh_scores).max() < 1e-4
    assert (mine_ids[:, 0] == fresh_ids[:, 0]).mean() > 0.99  # ties aside
    return mine, fresh


def _edit(path, rows: dict[int, str]):
    data = pq.read_table(path).to_pydict()
    for row, text in rows.items():
        data["text"][row] = text
    pq.write_table(pa.table(data), path)


def test_text_hash_is_stable_and_covers_prompt_and_pairs():
    a = text_hashes(["hello", "world"], prompt="query: ")
    assert a.equals(text_hashes(["hello", "world"], prompt="query: "))
    assert not a.equals(text_hashes(["hello", "world"]))
    # the length prefix keeps ("ab", "c") and ("a", "bc") apart
    assert not text_hashes(["ab"], ["c"]).equals(text_hashes(["a"], ["bc"]))
    keys = hash_keys(a)
    assert keys.dtype == np.uint64 and keys[0] != keys[1]


def test_renamed_files_reuse_every_row(tmp_path, corpus, tiny_model):
    write_shards(tmp_path / "in", [corpus.slice(0, 100), corpus.slice(100, 100), corpus.slice(200)])
    out = tmp_path / "out"
    first = run(_job(tmp_path / "in", out, tiny_model))
    assert first.rows_encoded == 300 and first.rows_reused == 0
    before = read_vectors(out)
    # a full re-export under new names: every unit is new, every row is stored already
    shutil.move(tmp_path / "in", tmp_path / "export")
    for i, path in enumerate(sorted((tmp_path / "export").iterdir())):
        path.rename(path.with_name(f"export-{i}.parquet"))
    night = run(_job(tmp_path / "export", out, tiny_model))
    assert night.exit_code == 0, night.failures
    assert (night.rows_encoded, night.rows_reused, night.rows_removed) == (0, 300, 0)
    assert night.real_tokens == 0  # nothing went through the model
    after = read_vectors(out)
    assert after.column("id").equals(before.column("id"))
    np.testing.assert_array_equal(matrix(after), matrix(before))  # the stored vectors, as stored
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["retired"] == [] and manifest["content_hash"].startswith("blake2b-128")
    named = {f for u in manifest["units"].values() for f in u["vectors"]}
    assert {f"vectors/{p.name}" for p in (out / "vectors").iterdir()} == named  # old parts gone
    assert embedpipe("verify", out).returncode == 0


def test_changed_row_is_encoded_again_and_its_old_vector_gone(tmp_path, corpus, tiny_model):
    paths = write_shards(tmp_path / "in", [corpus.slice(0, 150), corpus.slice(150)])
    out = tmp_path / "out"
    run(_job(tmp_path / "in", out, tiny_model))
    old = read_vectors(out)
    _edit(paths[1], {3: "an entirely new sentence about a film", 40: "and another new one"})
    night = run(_job(tmp_path / "in", out, tiny_model))
    assert (night.units_skipped, night.units_changed) == (1, 1)
    assert (night.rows_encoded, night.rows_reused) == (2, 148)
    mine, _ = _same_as_fresh(tmp_path, out, tmp_path / "in", tiny_model)
    ids = mine.column("id").to_numpy()
    for changed in (153, 190):
        row = int(np.flatnonzero(ids == changed)[0])
        assert np.abs(matrix(mine)[row] - matrix(old)[row]).max() > 1e-3  # not the old vector


def test_reuse_by_content_alone(tmp_path, corpus, tiny_model):
    """A re-keyed export (new ids, same texts): "content" reuses every vector, "id+content"
    reuses none; both equal a fresh run."""
    write_shards(tmp_path / "in", [corpus])
    rekeyed = corpus.set_column(0, "id", pa.array(np.arange(300, dtype=np.int64) + 10_000))
    for mode, encoded in (("content", 0), ("id+content", 300)):
        out = tmp_path / f"out-{mode}"
        run(_job(tmp_path / "in", out, tiny_model, encode={"reuse": mode}))
        write_shards(tmp_path / f"rekeyed-{mode}", [rekeyed], ["export.parquet"])
        night = run(_job(tmp_path / f"rekeyed-{mode}", out, tiny_model, encode={"reuse": mode}))
        assert night.rows_encoded == encoded and night.rows_reused == 300 - encoded
        assert night.rows_removed == 300  # the old ids are gone
        _same_as_fresh(tmp_path, out, tmp_path / f"rekeyed-{mode}", tiny_model)


def test_duplicate_texts_are_encoded_once_a_unit(tmp_path, corpus, tiny_model):
    """A text repeated within a unit is encoded once there and copied; in another unit it is
    encoded again (a unit's vectors never depend on another unit's batches: Ray = local)."""
    texts = corpus.column("text").to_pylist()
    for target in (10, 120, 250, 299):  # one text four times, across units and windows
        texts[target] = texts[5]
    texts[200] = texts[100]
    table = corpus.set_column(1, "text", pa.array(texts))
    write_shards(tmp_path / "in", [table.slice(0, 100), table.slice(100, 100), table.slice(200)])
    out = tmp_path / "out"
    summary = run(_job(tmp_path / "in", out, tiny_model))
    # texts[5]: rows 5, 10 in unit 0 (1 copy), 120 in unit 1, 250, 299 in unit 2 (1 copy);
    # texts[100]: rows 100 and 200, in two units (no copy)
    assert (summary.rows_encoded, summary.rows_copied) == (298, 2)
    _same_as_fresh(tmp_path, out, tmp_path / "in", tiny_model)


def test_sequence_of_nights_equals_a_fresh_run(tmp_path, corpus, movie_table, tiny_model):
    """Change in place, add, remove, rename, re-export with changes: after each night the
    folder equals a fresh run of that night's input, and verify passes."""
    extra = movie_table.slice(300, 60).select(["id", "text"])
    extra = extra.set_column(0, "id", pa.array(np.arange(1000, 1060, dtype=np.int64)))
    inp = tmp_path / "in"
    paths = write_shards(inp, [corpus.slice(0, 100), corpus.slice(100, 100), corpus.slice(200)])
    out = tmp_path / "out"
    job = _job(inp, out, tiny_model, output={"keep_columns": ["text"]})
    run(job)
    nights = [
        lambda: _edit(paths[0], {0: "changed text one", 99: "changed text two"}),
        lambda: write_shards(inp, [extra], ["added.parquet"]),
        lambda: paths[1].unlink(),
        lambda: (inp / "added.parquet").rename(inp / "zz-renamed.parquet"),
        lambda: (_edit(inp / "zz-renamed.parquet", {5: "re-exported and changed"}),
                 (inp / "zz-renamed.parquet").rename(inp / "aa-first.parquet")),
    ]
    for night in nights:
        night()
        summary = run(job)
        assert summary.exit_code == 0, summary.failures
        mine, fresh = _same_as_fresh(tmp_path, out, inp, tiny_model,
                                     output={"keep_columns": ["text"]})
        assert mine.column("text").equals(fresh.column("text"))
        assert embedpipe("verify", out).returncode == 0
    assert summary.rows_encoded == 1 and summary.rows_reused == 59


@pytest.mark.parametrize("point", ["reuse:1", "unit:1", "index"])
def test_sigkill_mid_reuse_then_rerun_equals_a_clean_run(tmp_path, corpus, tiny_model, point):
    """A re-export with one change, killed while reused rows are copied, between units, and
    before the index: the rerun equals a clean run and reuses the retired parts still there."""
    write_shards(tmp_path / "in", [corpus.slice(0, 100), corpus.slice(100, 100), corpus.slice(200)])
    out = tmp_path / "out"
    job = small_job(tmp_path / "job.toml", tmp_path / "in", out, tiny_model)
    assert embedpipe("run", job).returncode == 0
    shutil.move(tmp_path / "in", tmp_path / "old")
    shutil.copytree(tmp_path / "old", tmp_path / "in")
    for i, path in enumerate(sorted((tmp_path / "in").iterdir())):
        path.rename(path.with_name(f"night-{i}.parquet"))
    _edit(tmp_path / "in" / "night-1.parquet", {7: "the one row that changed tonight"})
    run_and_kill(job, point, tmp_path)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["retired"]  # the replaced parts are still named, so still readable
    done = embedpipe("run", job, "--json")
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["rows_encoded"] <= 1  # the changed row at most: the rest is reused
    _same_as_fresh(tmp_path, out, tmp_path / "in", tiny_model)
    assert json.loads((out / "manifest.json").read_text())["retired"] == []
    assert embedpipe("verify", out).returncode == 0


def test_reuse_off_drops_replaced_parts_at_once(tmp_path, corpus, tiny_model):
    """With reuse off nothing is retired: a run killed after its first unit has already deleted
    the replaced parts, and its rerun encodes every row of the changed units."""
    paths = write_shards(tmp_path / "in", [corpus.slice(0, 150), corpus.slice(150)])
    out = tmp_path / "out"
    job = small_job(tmp_path / "job.toml", tmp_path / "in", out, tiny_model,
                    encode={"reuse": "off"})
    assert embedpipe("run", job).returncode == 0
    before = {p.name for p in (out / "vectors").iterdir()}
    _edit(paths[0], {1: "changed"})
    _edit(paths[1], {1: "changed too"})
    run_and_kill(job, "unit:1", tmp_path)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest.get("retired", []) == []
    old_second = [f for f in before if f.startswith("part-00001")]
    assert old_second and not any((out / "vectors" / f).exists() for f in old_second)
    done = embedpipe("run", job, "--json")
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert (summary["rows_encoded"], summary["rows_reused"], summary["reuse"]) == (150, 0, "off")


def test_a_retired_part_damaged_before_the_rerun_is_not_reused(tmp_path, corpus, tiny_model):
    write_shards(tmp_path / "in", [corpus.slice(0, 100), corpus.slice(100)])
    out = tmp_path / "out"
    job = small_job(tmp_path / "job.toml", tmp_path / "in", out, tiny_model)
    assert embedpipe("run", job).returncode == 0
    for path in sorted((tmp_path / "in").iterdir()):
        path.rename(path.with_name("renamed-" + path.name))
    run_and_kill(job, "unit:1", tmp_path)
    retired = json.loads((out / "manifest.json").read_text())["retired"]
    victim = out / retired[-1]["vectors"][0]
    victim.write_bytes(victim.read_bytes()[:-100])  # truncated by a hostile hand
    done = embedpipe("run", job, "--json")
    assert done.returncode == 0, done.stderr
    _same_as_fresh(tmp_path, out, tmp_path / "in", tiny_model)


def test_string_ids_duplicates_and_reuse(tmp_path, corpus, tiny_model):
    """String ids: duplicate ids rejected exactly as before (first row wins, the folder's ids
    first), reuse by id and content across a rename."""
    ids = [f"doc-{i:05d}" for i in range(300)]
    ids[150] = ids[20]  # a duplicate across units
    table = corpus.set_column(0, "id", pa.array(ids))
    write_shards(tmp_path / "in", [table.slice(0, 100), table.slice(100)])
    out = tmp_path / "out"
    first = run(_job(tmp_path / "in", out, tiny_model))
    assert first.rejects == {"duplicate id": 1}
    for path in sorted((tmp_path / "in").iterdir()):
        path.rename(path.with_name("x-" + path.name))
    night = run(_job(tmp_path / "in", out, tiny_model))
    assert (night.rows_encoded, night.rows_reused, night.rejects) == (0, 299, {"duplicate id": 1})


def _folder_of(tmp_path, n: int) -> tuple[Store, list[str], pa.Table]:
    """A folder of n stored rows (int ids, real hashes) in parts of 50,000 rows as a run writes
    them, and n input rows of which 1% repeat a stored id."""
    ids = np.arange(n, dtype=np.int64) * 7
    table = pa.table({"id": ids, "text": pa.array([f"t{i}" for i in range(n)])})
    fresh = np.where(np.arange(n) % 100 == 0, ids, ids + 1)
    stored = pa.table({"id": ids, "vector": pa.FixedSizeListArray.from_arrays(
        pa.array(np.zeros(n, np.float32)), 1),
        "text_hash": text_hashes(table.column("text").to_pylist())})
    out = tmp_path / f"out-{n}"
    (out / "vectors").mkdir(parents=True)
    parts = []
    for number, start in enumerate(range(0, n, 50_000)):
        parts.append(f"vectors/part-00000-{number:04d}.parquet")
        pq.write_table(stored.slice(start, 50_000), out / parts[-1], row_group_size=8192)
    pq.write_table(table.set_column(0, "id", pa.array(fresh)), tmp_path / f"input-{n}.parquet",
                   row_group_size=65_536)
    return Store(str(out)), parts, table


def _traced(build) -> tuple[object, int, int]:
    """build()'s result, the memory it still holds and its peak (numpy reports to tracemalloc)."""
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    result = build()
    held, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return result, held - base, peak - base


def test_registry_memory_per_id(tmp_path):
    """The lookups hold numpy arrays, not a Python object an id. Bytes an id are the growth
    between two sizes (fixed per-batch buffers cancel out): the stored-row registry holds 16
    and peaks at 32 while sorting; the input scan (stored ids and input rows: two ids an input
    row here) peaks under 32 an id."""
    small, large = 150_000, 450_000
    measured = {}
    for n in (small, large):
        store, parts, _ = _folder_of(tmp_path, n)
        registry, held, peak = _traced(lambda: StoredRows(store, parts, "id+content"))
        assert len(registry) == n and registry.nbytes == 16 * n
        del registry
        units = plan_units(InputConfig(path=str(tmp_path / f"input-{n}.parquet"), unit_rows=65_536))
        scan, _, scan_peak = _traced(lambda: scan_input(units, "id", "text", store, parts))
        # the 1% of input ids the folder holds are duplicates, found without a set of ids
        assert sum(map(len, scan.duplicates.values())) == n // 100 and scan.rows_scanned == n
        measured[n] = (held, peak, scan_peak)
    grow = {what: (measured[large][i] - measured[small][i]) / (large - small)
            for i, what in enumerate(("held", "peak", "scan peak"))}
    print("registry bytes an id:", grow)
    assert grow["held"] < 16.5 and grow["peak"] < 33, grow
    assert grow["scan peak"] / 2 < 32, grow


@pytest.mark.parametrize("chunks", ["rows", "pool"])
def test_long_texts_reuse_every_window(tmp_path, mixed_texts, tiny_model, chunks):
    """Long texts cut into windows: a re-export with one text changed reuses the others' windows
    (all of them: in a folder of one row a window, every window of the text, in order, with the
    kept text sliced per window) and equals a fresh run."""
    texts = mixed_texts[200:230] + mixed_texts[:10]
    table = pa.table({"id": np.arange(len(texts)), "text": texts})
    write_shards(tmp_path / "in", [table.slice(0, 20), table.slice(20)])
    sections = {"encode": {"long_text": "chunk", "chunk_overlap": 8},
                "output": {"chunks": chunks, "keep_columns": ["text"]}}
    out = tmp_path / "out"
    first = run(_job(tmp_path / "in", out, tiny_model, **sections))
    assert first.texts_chunked > 10
    shutil.move(tmp_path / "in", tmp_path / "export")
    for i, path in enumerate(sorted((tmp_path / "export").iterdir())):
        path.rename(path.with_name(f"export-{i}.parquet"))
    _edit(tmp_path / "export" / "export-0.parquet", {4: texts[4] + " And one more sentence."})
    night = run(_job(tmp_path / "export", out, tiny_model, **sections))
    assert night.exit_code == 0, night.failures
    assert (night.rows_encoded, night.rows_reused) == (1, len(texts) - 1)
    assert night.windows < first.windows / 10  # only the changed text's windows were encoded
    mine, fresh = _same_as_fresh(tmp_path, out, tmp_path / "export", tiny_model, **sections)
    fresh_run = json.loads((tmp_path / "fresh-2" / "manifest.json").read_text())["last_run"]
    for count in ("texts_chunked", "truncated", "vectors_written"):
        assert getattr(night, count) == fresh_run[count], count
    for column in mine.column_names:
        if column not in ("vector", "faiss_id"):  # labels are the folder's history
            assert mine.column(column).equals(fresh.column(column)), column
    labels = mine.column("faiss_id").to_numpy()  # a window each, the reused ones kept
    assert len(np.unique(labels)) == len(labels)
    assert embedpipe("verify", out).returncode == 0


def test_sentence_pairs_hash_both_texts(tmp_path, corpus, tiny_model):
    """A pair is reused only when both of its texts are the same: a changed second text alone
    sends the row back through the model."""
    texts = corpus.column("text").to_pylist()
    table = corpus.append_column("second", pa.array(texts[1:] + texts[:1]))
    paths = write_shards(tmp_path / "in", [table.slice(0, 150), table.slice(150)])
    job = _job(tmp_path / "in", tmp_path / "out", tiny_model,
               input={"text_pair_column": "second"})
    run(job)
    data = pq.read_table(paths[1]).to_pydict()
    data["second"][10] = "only the second text changed"
    pq.write_table(pa.table(data), paths[1])
    night = run(job)
    assert (night.rows_encoded, night.rows_reused) == (1, 149)
    _same_as_fresh(tmp_path, tmp_path / "out", tmp_path / "in", tiny_model,
                   input={"text_pair_column": "second"})


def test_a_malformed_retired_record_is_refused_in_one_line(tmp_path, corpus, tiny_model):
    write_shards(tmp_path / "in", [corpus.slice(0, 50)])
    job = small_job(tmp_path / "job.toml", tmp_path / "in", tmp_path / "out", tiny_model)
    assert embedpipe("run", job).returncode == 0
    manifest_path = tmp_path / "out" / "manifest.json"
    for garbage in ("garbage", [{"path": "x"}]):
        manifest = json.loads(manifest_path.read_text())
        manifest["retired"] = garbage
        manifest_path.write_text(json.dumps(manifest))
        result = embedpipe("run", job)
        assert result.returncode == 2 and "retired unit record is malformed" in result.stderr
        assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
