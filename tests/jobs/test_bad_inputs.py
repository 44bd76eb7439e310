"""Every input row ends as a vector or a reject with a reason; bad files fail alone."""
from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from helpers import embedpipe, read_vectors, write_job, write_shards

UNICODE = ["Ελληνικά κείμενα", "русский текст", "中文文本", "日本語のテキスト", "한국어 텍스트",
           "עברית", "العربية", "हिन्दी पाठ", "ไทย", "emoji 😀🚀👍🏽 👨‍👩‍👧", "Z̤͔ͧ̑̓ä͖̭̈̇lgo", "\u200b zero width"]


@pytest.fixture(scope="module")
def bad_run(tmp_path_factory, tiny_model):
    tmp = tmp_path_factory.mktemp("bad")
    folder = tmp / "input"
    a = pa.table({"id": pa.array([1, 2, 3, 4, 5, 6, 2, None, 7, 8], pa.int64()),
                  "text": ["fine text", None, "", "   \t\n ", "word " * 20_000, "more fine text",
                           "id 2 again: the first id-2 row had no text, so this one holds it", "null id row", "fine again", None]})
    b = pa.table({"id": pa.array(list(range(100, 100 + len(UNICODE))) + [1, 6, 9], pa.int64()),
                  "text": UNICODE + ["dup of 1 across files", "dup of 6 across files", "ok nine"]})
    write_shards(folder, [a, b], ["a.parquet", "b.parquet"])
    pq.write_table(a.slice(0, 0), folder / "c_empty.parquet")
    with pq.ParquetWriter(folder / "d_no_row_groups.parquet", a.schema):
        pass
    whole = (folder / "a.parquet").read_bytes()
    (folder / "e_truncated.parquet").write_bytes(whole[: len(whole) // 2])
    pq.write_table(pa.table({"id": [1000, 1001], "text": [1, 2]}), folder / "f_int_text.parquet")
    pq.write_table(pa.table({"key": [2000], "text": ["no id column"]}), folder / "g_no_id.parquet")
    # A later file: id 3's first row (in a.parquet) was empty, so this row with id 3 holds it.
    pq.write_table(pa.table({"id": pa.array([3, 10], pa.int64()), "text": ["three, for real", "ten"]}),
                   folder / "h_late.parquet")
    out = tmp / "out"
    job = write_job(tmp / "job.toml", folder, out, tiny_model, model={"max_length": 32})
    result = embedpipe("run", job, "--json")
    return folder, out, job, result


def test_exit_code_and_accounting(bad_run):
    _, _, _, result = bad_run
    assert result.returncode == 1, result.stderr  # some units failed
    summary = json.loads(result.stdout)
    assert summary["units_total"] == 8 and summary["units_failed"] == 3 and summary["units_done"] == 5
    assert summary["rows_read"] == 10 + 15 + 2
    assert summary["rows_read"] == summary["vectors_written"] + summary["rejected"]
    assert summary["rejects"] == {"null text": 2, "empty text": 2, "null id": 1, "duplicate id": 2}
    assert summary["truncated"] == 1
    failures = "\n".join(summary["failures"])
    assert "e_truncated.parquet" in failures and "unreadable Parquet" in failures
    assert "f_int_text.parquet" in failures and "not a string type" in failures
    assert "g_no_id.parquet" in failures and "no column 'id'" in failures and "key, text" in failures


def test_exact_rejects_with_file_and_row(bad_run):
    folder, out, _, _ = bad_run
    rejects = pa.concat_tables([pq.read_table(p) for p in sorted((out / "rejects").glob("*.parquet"))])
    got = sorted(zip(rejects.column("input_file").to_pylist(), rejects.column("row_number").to_pylist(),
                     rejects.column("id").to_pylist(), rejects.column("reason").to_pylist()))
    a, b = str(folder / "a.parquet"), str(folder / "b.parquet")
    assert got == sorted([
        (a, 1, 2, "null text"), (a, 2, 3, "empty text"), (a, 3, 4, "empty text"),
        (a, 7, None, "null id"), (a, 9, 8, "null text"),
        (b, 12, 1, "duplicate id"), (b, 13, 6, "duplicate id"),
    ])


def test_every_good_row_has_its_vector(bad_run):
    _, out, _, _ = bad_run
    table = read_vectors(out)
    ids = table.column("id").to_pylist()
    # An id belongs to its first row that can be embedded: a.parquet's second id-2 row, and
    # h_late's id-3 row (a.parquet's id-3 row was empty).
    assert ids == [1, 5, 6, 2, 7] + list(range(100, 100 + len(UNICODE))) + [9, 3, 10]
    truncated = dict(zip(ids, table.column("truncated").to_pylist()))
    assert truncated[5] is True and sum(truncated.values()) == 1
    assert table.column("n_tokens").to_pylist()[1] > 32


def test_rerun_retries_only_failed_units(bad_run):
    folder, out, job, _ = bad_run
    pq.write_table(pa.table({"id": [1000, 1001], "text": ["now a string", "and another"]}),
                   folder / "f_int_text.parquet")
    result = embedpipe("run", job, "--json")
    summary = json.loads(result.stdout)
    assert result.returncode == 1  # e_truncated and g_no_id still fail
    assert summary["units_done"] == 1 and summary["units_skipped"] == 5 and summary["units_failed"] == 2
    assert summary["vectors_written"] == 2
    assert 1000 in read_vectors(out).column("id").to_pylist()


def test_all_files_missing_the_column_is_a_config_error(tmp_path):
    folder = tmp_path / "input"
    write_shards(folder, [pa.table({"id": [1], "body": ["x"]}), pa.table({"id": [2], "body": ["y"]})])
    job = write_job(tmp_path / "job.toml", folder, tmp_path / "out", tmp_path / "not-loaded")
    result = embedpipe("run", job)
    assert result.returncode == 2
    assert "no column 'text'" in result.stderr and "id, body" in result.stderr
    assert "not-loaded" not in result.stderr  # refused before the model was looked at


def test_a_unit_that_fails_once_read_counts_its_rows_and_no_index_check_fails(tmp_path,
                                                                                tiny_model):
    """A file whose footer reads but whose data page is damaged fails its unit once read: the
    summary counts its rows as read, in failed units, and a folder left with no vectors gets no
    index check failure of its own."""
    table = pa.table({"id": pa.array(range(30), pa.int64()),
                      "text": [f"a short text number {i} about a film" for i in range(30)]})
    write_shards(tmp_path / "in", [table])
    path = tmp_path / "in" / "part-00000.parquet"
    pq.write_table(table, path, compression="snappy", use_dictionary=False)
    page = pq.ParquetFile(path).metadata.row_group(0).column(1).data_page_offset
    data = bytearray(path.read_bytes())
    data[page + 40:page + 100] = b"\xff" * 60  # the text column's page, the footer intact
    path.write_bytes(bytes(data))
    job = write_job(tmp_path / "job.toml", tmp_path / "in", tmp_path / "out", tiny_model)
    result = embedpipe("run", job)
    assert result.returncode == 1, result.stderr
    lines = result.stdout.splitlines()
    assert "  rows       30 read = 0 vectors + 0 rejected + 30 in failed units (ok)" in lines
    failed = [line for line in lines if "FAILED" in line]
    assert len(failed) == 1 and str(path) in failed[0], failed
    summary = json.loads(embedpipe("run", job, "--json").stdout)  # the rerun: the same, counted
    assert summary["rows_read"] == summary["rows_failed"] == 30 and summary["accounted"]


def test_a_folder_whose_every_row_is_rejected_completes(tmp_path, tiny_model):
    """No vectors at all: its empty index is no check failure, run, rerun or verify."""
    write_shards(tmp_path / "in", [pa.table({"id": pa.array([1, 2, 3], pa.int64()),
                                             "text": ["", "  ", None]})])
    job = write_job(tmp_path / "job.toml", tmp_path / "in", tmp_path / "out", tiny_model)
    for _ in range(2):
        result = embedpipe("run", job, "--json")
        assert result.returncode == 0, result.stdout + result.stderr
        assert json.loads(result.stdout)["failures"] == []
    verified = embedpipe("verify", tmp_path / "out")
    assert verified.returncode == 0, verified.stdout + verified.stderr
