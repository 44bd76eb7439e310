"""Never exit 0 with wrong or missing data, and every failure one line with its exit code.

A corpus of bad models, bad folders and bad environments, each run through the real CLI in a
subprocess: the exit code, no traceback on stderr, a message that names what to fix, and where
rows were involved, rows read = vectors + rejects read back from disk.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from helpers import (embedpipe, film_texts, index_paths, read_vectors, three_shards, write_job,
                     write_shards)

pytestmark = pytest.mark.integrity
N_ROWS = 60


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    return three_shards(tmp_path_factory.mktemp("integrity") / "in")


def one_line(result: subprocess.CompletedProcess, code: int, *needles: str) -> str:
    """The run failed as documented: its exit code, no traceback, one error line naming it."""
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


def job_for(tmp: Path, inputs: Path, model_path: Path, out: Path | None = None, **sections) -> Path:
    sections.setdefault("model", {}).setdefault("max_length", 32)
    sections.setdefault("output", {}).setdefault("rows_per_file", 25)
    return write_job(tmp / "job.toml", inputs, out or tmp / "out", model_path, **sections)


def folder_state(out: Path) -> dict:
    """What a folder holds, for comparing with a clean run: vectors (ids, values, flags),
    rejects, the index's ids."""
    vectors = read_vectors(out)
    return {"vectors": vectors.select(["id", "vector", "n_tokens", "truncated"]),
            "ids": pq.read_table(index_paths(out)[1]).column("id").to_pylist()}


def assert_same_folder(a: Path, b: Path) -> None:
    sa, sb = folder_state(a), folder_state(b)
    assert sa["vectors"].equals(sb["vectors"])
    assert sa["ids"] == sb["ids"]


@pytest.fixture(scope="module")
def clean(tmp_path_factory, inputs, tiny_model) -> Path:
    tmp = tmp_path_factory.mktemp("clean")
    result = embedpipe("run", job_for(tmp, inputs, tiny_model))
    assert result.returncode == 0, result.stderr
    return tmp / "out"


# ---- silent wrong data ------------------------------------------------------------------------

def test_model_folder_without_tokenizer_files_is_refused(tmp_path, inputs, tiny_model):
    model = tmp_path / "model"
    model.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny_model / name, model / name)
    line = one_line(embedpipe("run", job_for(tmp_path, inputs, model)), 2,
                    "unknown token", "tokenizer files present: none")
    assert str(model) in line
    assert not (tmp_path / "out" / "manifest.json").exists()  # refused before any work


def test_pooler_pooling_on_weights_without_a_pooler_is_refused(tmp_path, inputs, tiny_model):
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    torch.manual_seed(0)
    model = tmp_path / "no_pooler"
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=64, max_position_embeddings=128)
    BertModel(config, add_pooling_layer=False).save_pretrained(model)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(model)
    one_line(embedpipe("run", job_for(tmp_path, inputs, model, encode={"pooling": "pooler"})), 2,
             "lacks weights", "pooler.dense")
    # the same weights are fine for a pooling that does not use the pooler
    assert embedpipe("run", job_for(tmp_path, inputs, model, encode={"pooling": "cls"})).returncode == 0


@pytest.mark.parametrize("max_length, needle", [(1, "leaves no room"), (2, "leaves no room"),
                                                (129, "above what model")])
def test_max_length_outside_the_models_range_is_refused(tmp_path, inputs, tiny_model, max_length,
                                                        needle):
    job = job_for(tmp_path, inputs, tiny_model, model={"max_length": max_length})
    one_line(embedpipe("run", job), 2, needle, f"{max_length}")


def test_roberta_family_default_length_leaves_the_padding_offset(tmp_path, tiny_model):
    """A RoBERTa folder whose tokenizer sets no model_max_length: 66 positions read 64 tokens."""
    import torch
    from transformers import AutoTokenizer, RobertaConfig, RobertaModel

    torch.manual_seed(0)
    model = tmp_path / "roberta"
    RobertaModel(RobertaConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=1,
                               num_attention_heads=2, intermediate_size=64,
                               max_position_embeddings=66)).save_pretrained(model)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(model)
    config = json.loads((model / "tokenizer_config.json").read_text())
    config.pop("model_max_length", None)
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    write_shards(tmp_path / "in", [pa.table({"id": [1, 2], "text": ["short", "word " * 300]})])
    job = write_job(tmp_path / "job.toml", tmp_path / "in", tmp_path / "out", model)
    result = embedpipe("run", job, "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["truncated"] == 1 and summary["vectors_written"] == 2
    from pipeline.models.model_files import resolve_model

    assert resolve_model(str(model)).max_length == 64


@pytest.mark.parametrize("out", ["in", "in/out", "."])
def test_output_overlapping_the_input_is_refused(tmp_path, tiny_model, out):
    write_shards(tmp_path / "in", [pa.table({"id": [1], "text": ["a"]})])
    job = write_job(tmp_path / "job.toml", tmp_path / "in", tmp_path / out, tiny_model)
    one_line(embedpipe("run", job), 2, "overlap")


def test_output_overlapping_a_glob_input_is_refused(tmp_path, tiny_model):
    write_shards(tmp_path / "in", [pa.table({"id": [1], "text": ["a"]})])
    job = write_job(tmp_path / "job.toml", str(tmp_path / "in" / "*.parquet"),
                    tmp_path / "in" / "out", tiny_model)
    one_line(embedpipe("run", job), 2, "overlap")


# ---- deleted or altered output files ----------------------------------------------------------

def _damage(out: Path, how: str) -> str:
    parts = sorted((out / "vectors").glob("*.parquet"))
    if how == "delete part":
        parts[1].unlink()
        return "missing"
    if how == "truncate part":
        data = parts[2].read_bytes()
        parts[2].write_bytes(data[: len(data) // 2])
        return "footer"
    if how == "replace part":  # a whole, valid Parquet file, but not the one committed
        table = pq.read_table(parts[0])
        pq.write_table(table.slice(0, 5), parts[0])
        return "altered"
    if how == "delete ids":
        index_paths(out)[1].unlink()
        return "index"
    if how == "delete index":
        index_paths(out)[0].unlink()
        return "index"
    raise AssertionError(how)


@pytest.mark.parametrize("how", ["delete part", "truncate part", "replace part", "delete ids",
                                 "delete index"])
def test_damaged_folder_fails_verify_then_a_rerun_repairs_it(tmp_path, inputs, tiny_model, clean,
                                                             how):
    job = job_for(tmp_path, inputs, tiny_model)
    assert embedpipe("run", job).returncode == 0
    out = tmp_path / "out"
    needle = _damage(out, how)
    check = embedpipe("verify", out)
    assert check.returncode == 1 and "Traceback" not in check.stderr
    assert needle in check.stdout, check.stdout
    rerun = embedpipe("run", job, "--json")
    assert rerun.returncode == 0, rerun.stderr
    summary = json.loads(rerun.stdout)
    if "part" in how:
        assert summary["units_repaired"] == 1 and summary["units_done"] == 1
    assert_same_folder(out, clean)
    assert embedpipe("verify", out).returncode == 0


def test_deleted_rejects_part_is_redone(tmp_path, tiny_model):
    write_shards(tmp_path / "in", [pa.table({"id": [1, 2, 3], "text": ["a b", None, "c"]})])
    job = write_job(tmp_path / "job.toml", tmp_path / "in", tmp_path / "out", tiny_model)
    assert embedpipe("run", job).returncode == 0
    (rejects,) = (tmp_path / "out" / "rejects").glob("*.parquet")
    rejects.unlink()
    assert "missing" in embedpipe("verify", tmp_path / "out").stdout
    rerun = embedpipe("run", job, "--json")
    assert rerun.returncode == 0 and json.loads(rerun.stdout)["units_repaired"] == 1
    # the unit redone under a new number: its parts never take the old names
    (redone,) = (tmp_path / "out" / "rejects").glob("*.parquet")
    assert redone.name != rejects.name
    assert pq.read_table(redone).column("reason").to_pylist() == ["null text"]


def test_verify_reports_a_good_folder_and_json(clean):
    result = embedpipe("verify", clean, "--json")
    assert result.returncode == 0, result.stdout
    verdict = json.loads(result.stdout)
    assert verdict["ok"] and verdict["vectors"] == N_ROWS and verdict["problems"] == []


def test_verify_finds_duplicate_ids_and_miscounts(tmp_path, clean):
    """A folder whose manifest was edited to claim other counts, or whose parts repeat ids."""
    out = shutil.copytree(clean, tmp_path / "out")
    manifest = json.loads((out / "manifest.json").read_text())
    unit = next(iter(manifest["units"].values()))
    unit["vectors_out"] += 1
    (out / "manifest.json").write_text(json.dumps(manifest))
    result = embedpipe("verify", out)
    assert result.returncode == 1 and "rows read" in result.stdout and "hold" in result.stdout

    from pipeline.io.folder_check import duplicate_ids
    from pipeline.io.storage import Store
    from pipeline.io.vectors import VectorParts

    files = sorted(str(p.relative_to(clean)) for p in (clean / "vectors").glob("*.parquet"))
    assert duplicate_ids(VectorParts(Store(str(clean)), files)) == []
    assert "stored more than once" in duplicate_ids(VectorParts(Store(str(clean)),
                                                                files + files[:1]))[0]


def test_random_damage_never_ends_in_exit_0_with_other_data(tmp_path, inputs, tiny_model, clean):
    """Random deletions and truncations of output files, then either verify or a rerun: verify
    never says ok over a damaged folder, and a rerun either fails or ends equal to a clean run."""
    rng = np.random.default_rng(7)
    job = job_for(tmp_path, inputs, tiny_model)
    out = tmp_path / "out"
    assert embedpipe("run", job).returncode == 0
    for _ in range(6):
        files = sorted(p for p in out.rglob("*") if p.is_file() and p.name != ".lock")
        victims = rng.choice(len(files), size=int(rng.integers(1, 4)), replace=False)
        for i in victims:
            path = files[i]
            if rng.random() < 0.5:
                path.unlink()
            else:
                data = path.read_bytes()
                path.write_bytes(data[: int(rng.integers(0, max(1, len(data))))])
        check = embedpipe("verify", out)
        assert "Traceback" not in check.stderr
        assert check.returncode in (1, 2), check.stdout  # damage is never reported as ok
        rerun = embedpipe("run", job)
        assert "Traceback" not in rerun.stderr
        if rerun.returncode == 0:
            assert_same_folder(out, clean)
            assert embedpipe("verify", out).returncode == 0
        else:  # a destroyed manifest: one line, and --mode overwrite is the way out
            one_line(rerun, 2, "manifest")
            assert embedpipe("run", job, "--mode", "overwrite").returncode == 0
            assert_same_folder(out, clean)


# ---- configuration, files and folders ---------------------------------------------------------

@pytest.mark.parametrize("keep, needle", [(["id"], "'id'"), (["vector"], "'vector'"),
                                          (["text", "text"], "named twice")])
def test_keep_columns_that_clash_are_refused(tmp_path, inputs, tiny_model, keep, needle):
    job = job_for(tmp_path, inputs, tiny_model, output={"keep_columns": keep})
    one_line(embedpipe("run", job), 2, "keep_columns", needle)


def test_a_decoder_model_is_refused_by_name(tmp_path, inputs):
    from transformers import GPT2Config, GPT2Model

    model = tmp_path / "gpt2"
    GPT2Model(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=100)).save_pretrained(model)
    one_line(embedpipe("run", job_for(tmp_path, inputs, model)), 2, "'gpt2'", "decoder", "encoder")


def test_output_path_that_is_a_file_or_under_one(tmp_path, inputs, tiny_model):
    (tmp_path / "afile").write_text("x")
    one_line(embedpipe("run", job_for(tmp_path, inputs, tiny_model, out=tmp_path / "afile")), 2,
             "is a file")
    one_line(embedpipe("run", job_for(tmp_path, inputs, tiny_model,
                                      out=tmp_path / "afile" / "out")), 2, "afile")


def test_a_foreign_folder_is_refused(tmp_path, inputs, tiny_model):
    out = tmp_path / "mine"
    (out / "vectors").mkdir(parents=True)
    (out / "notes.txt").write_text("keep me")
    (out / "vectors" / "mine.parquet").write_text("keep me too")
    one_line(embedpipe("run", job_for(tmp_path, inputs, tiny_model, out=out)), 2, "notes.txt",
             "no embedpipe manifest")
    assert (out / "vectors" / "mine.parquet").read_text() == "keep me too"


def _mount_tmpfs(path: Path, options: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
                          capture_output=True).returncode == 0


def after_work(result: subprocess.CompletedProcess, *needles: str) -> str:
    """The run failed after the folder began to change: exit 1, the summary printed, one FAILED
    line naming the cause, no traceback."""
    assert result.returncode == 1, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    assert result.stdout.startswith("embedpipe run ") and "  rows       " in result.stdout
    failed = [line for line in result.stdout.splitlines() if all(n in line for n in needles)]
    assert len(failed) == 1 and failed[0].startswith("  FAILED     "), result.stdout
    return failed[0]


@pytest.mark.skipif(os.geteuid() != 0, reason="mounts a small tmpfs (needs root)")
@pytest.mark.parametrize("options, needle", [("ro,size=1m", "Read-only file system"),
                                             ("size=20k", "No space left on device")])
def test_unwritable_or_full_output_is_one_line_and_the_rerun_completes(tmp_path, inputs,
                                                                       tiny_model, clean,
                                                                       options, needle):
    """Read-only: refused before any work (2, one line). Full once parts are being written: the
    folder has changed, so 1 with the summary and the failure in it."""
    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, options):
        pytest.skip("tmpfs cannot be mounted here")
    try:
        job = job_for(tmp_path, inputs, tiny_model, out=disk / "out")
        if options.startswith("ro"):
            one_line(embedpipe("run", job), 2, needle, str(disk / "out"))  # the path, the reason
        else:
            after_work(embedpipe("run", job), needle, str(disk / "out"))
        subprocess.run(["mount", "-o", "remount,rw,size=8m", str(disk)], check=True)
        rerun = embedpipe("run", job)
        assert rerun.returncode == 0, rerun.stderr
        assert_same_folder(disk / "out", clean)
    finally:
        subprocess.run(["umount", "-l", str(disk)])


@pytest.mark.skipif(os.geteuid() != 0, reason="mounts a small tmpfs (needs root)")
def test_disk_full_writing_the_index_after_units_committed_is_1_with_the_summary(tmp_path):
    """A disk with room for the parts but not for the index (the bundled model's 384-wide
    vectors, 1,200 rows: the flat index is as large as the parts): the units commit, the index
    cannot be written: exit 1 with the summary; with room again the rerun completes the folder
    as a clean run made it."""
    rows = 1200
    write_shards(tmp_path / "in", [pa.table({"id": np.arange(i * 400, (i + 1) * 400),
                                             "text": film_texts(400, 10 + i)}) for i in range(3)])
    sections = {"model": {"max_length": 32}, "index": {"type": "flat"}}
    clean_job = write_job(tmp_path / "clean.toml", tmp_path / "in", tmp_path / "clean", None,
                          **sections)
    assert embedpipe("run", clean_job).returncode == 0
    pages = sum(-(-f.stat().st_size // 4096) * 4096 for f in (tmp_path / "clean").rglob("*")
                if f.is_file() and "index" not in f.relative_to(tmp_path / "clean").parts)
    index_bytes = sum(f.stat().st_size for f in (tmp_path / "clean" / "index").iterdir())
    assert index_bytes > rows * 384 * 4  # the index needs more than the room left below
    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, f"size={pages // 1024 + 512}k"):
        pytest.skip("tmpfs cannot be mounted here")
    try:
        job = write_job(tmp_path / "job.toml", tmp_path / "in", disk / "out", None, **sections)
        result = embedpipe("run", job)
        after_work(result, "No space left on device")
        assert "  units      3 in input: 3 embedded" in result.stdout
        assert "  rows       1,200 read = 1,200 vectors + 0 rejected (ok)" in result.stdout
        assert "  folder     1,200 vectors; index: none" in result.stdout
        subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True)
        rerun = embedpipe("run", job)
        assert rerun.returncode == 0, rerun.stdout + rerun.stderr
        assert "3 already done" in rerun.stdout
        assert_same_folder(disk / "out", tmp_path / "clean")
        assert embedpipe("verify", disk / "out").returncode == 0
    finally:
        subprocess.run(["umount", "-l", str(disk)])


def test_a_failure_in_the_index_stage_after_units_committed_is_1_with_the_summary(
        tmp_path, inputs, tiny_model, clean):
    """Without root: the index's infos path blocked (a directory in its place) while a new input
    file is embedded: the unit commits, the index stage fails: 1 with the summary naming the
    path; unblocked, the rerun completes the folder as a clean run made it."""
    job = job_for(tmp_path, inputs, tiny_model, input={"path": str(tmp_path / "in")})
    shutil.copytree(inputs, tmp_path / "in")
    first = sorted((tmp_path / "in").glob("*.parquet"))[0]
    held = first.rename(tmp_path / first.name)
    assert embedpipe("run", job).returncode == 0
    held.rename(first)
    infos = tmp_path / "out" / "index" / "index_infos.json"
    infos.unlink()
    (infos / "blocked").mkdir(parents=True)
    result = embedpipe("run", job)
    after_work(result, "index_infos.json")
    assert "  units      3 in input: 1 embedded, 2 already done" in result.stdout
    assert "  folder     60 vectors; index: none" in result.stdout
    shutil.rmtree(infos)
    rerun = embedpipe("run", job)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert_same_folder(tmp_path / "out", clean)


@pytest.mark.parametrize("content", [b"", b"\x00\xff garbage", b"[1, 2]", b'{"format": 1, "units": []}',
                                     b'{"format": 1, "units": {"a": {"path": 3}}}'])
def test_corrupt_manifest_is_one_line_and_overwrite_is_the_way_out(tmp_path, inputs, tiny_model,
                                                                   clean, content):
    job = job_for(tmp_path, inputs, tiny_model)
    assert embedpipe("run", job).returncode == 0
    (tmp_path / "out" / "manifest.json").write_bytes(content)
    one_line(embedpipe("run", job), 2, "manifest.json", "--mode overwrite")
    assert embedpipe("verify", tmp_path / "out").returncode == 2
    assert embedpipe("run", job, "--mode", "overwrite").returncode == 0
    assert_same_folder(tmp_path / "out", clean)


@pytest.mark.parametrize("content", [b"", b"not json", b'{"pid": "x"}', b"[]"])
def test_corrupt_lock_is_taken_over_with_a_warning(tmp_path, inputs, tiny_model, content):
    out = tmp_path / "out"
    out.mkdir()
    (out / ".lock").write_bytes(content)
    result = embedpipe("run", job_for(tmp_path, inputs, tiny_model))
    assert result.returncode == 0, result.stderr
    assert not (out / ".lock").exists()


@pytest.mark.parametrize("content, needle", [(b"\xff\xfe\x00n\x00a", "not UTF-8"),
                                             (b"\x89PNG\r\n\x1a\n\x00\x00", "not UTF-8")])
def test_job_file_that_is_not_text(tmp_path, content, needle):
    (tmp_path / "job.toml").write_bytes(content)
    one_line(embedpipe("run", tmp_path / "job.toml"), 2, needle)


@pytest.mark.parametrize("index, needle", [
    ({"type": "factory", "factory": "IVF4,PQ7"}, "multiple"),
    ({"type": "factory", "factory": "Nonsense42"}, "could not parse"),
    ({"type": "ivf-pq", "pq_m": 5}, "pq_m = 5"),
    ({"type": "auto", "max_memory": "lots"}, "max_memory"),
])
def test_index_settings_that_cannot_work_are_refused_before_embedding(tmp_path, inputs, tiny_model,
                                                                     index, needle):
    one_line(embedpipe("run", job_for(tmp_path, inputs, tiny_model, index=index)), 2, needle)
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_index_that_cannot_train_on_the_data_fails_with_vectors_committed(tmp_path, inputs,
                                                                          tiny_model):
    job = job_for(tmp_path, inputs, tiny_model, index={"type": "factory", "factory": "IVF256,Flat"})
    result = embedpipe("run", job, "--json")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    summary = json.loads(result.stdout)
    assert any(f.startswith("index: ") and "embedpipe index" in f for f in summary["failures"])
    assert summary["vectors_written"] == N_ROWS and len(read_vectors(tmp_path / "out")) == N_ROWS
    fixed = embedpipe("index", tmp_path / "out", "--type", "flat")
    assert fixed.returncode == 0, fixed.stderr


def test_index_and_verify_refuse_a_foreign_manifest_or_none(tmp_path):
    (tmp_path / "manifest.json").write_text('{"name": "someone else"}')
    one_line(embedpipe("index", tmp_path), 2, "not an embedpipe manifest")
    one_line(embedpipe("verify", tmp_path), 2, "not an embedpipe manifest")
    assert json.loads((tmp_path / "manifest.json").read_text()) == {"name": "someone else"}
    one_line(embedpipe("verify", tmp_path / "nothing"), 2, "no manifest.json")


# ---- downstream commands ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def body_folder(tmp_path_factory, tiny_model) -> tuple[Path, Path]:
    """A job that read `body` / `doc_id`, with a label kept, and a head trained on it."""
    tmp = tmp_path_factory.mktemp("body")
    texts = film_texts(40, 3)
    write_shards(tmp / "in", [pa.table({"doc_id": [f"d{i}" for i in range(40)], "body": texts,
                                        "label": ["a" if i % 2 else "b" for i in range(40)]})])
    job = write_job(tmp / "job.toml", tmp / "in", tmp / "out", tiny_model,
                    input={"text_column": "body", "id_column": "doc_id"},
                    output={"keep_columns": ["body", "label"]})
    assert embedpipe("run", job).returncode == 0
    head = embedpipe("train-head", tmp / "out", "--label-column", "label", "--out", tmp / "head")
    assert head.returncode == 0, head.stderr
    return tmp / "out", tmp / "head"


def test_predict_and_search_default_to_the_folders_columns(tmp_path, body_folder):
    out, head = body_folder
    pq.write_table(pa.table({"doc_id": ["x1", "x2"], "body": ["a warm film", "slow plot"]}),
                   tmp_path / "new.parquet")
    predicted = embedpipe("predict", head, tmp_path / "new.parquet", "--out", tmp_path / "p.parquet")
    assert predicted.returncode == 0, predicted.stderr
    assert "'body'" in predicted.stdout and "'doc_id'" in predicted.stdout
    assert pq.read_table(tmp_path / "p.parquet").column("id").to_pylist() == ["x1", "x2"]
    searched = embedpipe("search", out, "--queries", tmp_path / "new.parquet", "--out",
                         tmp_path / "hits.parquet", "-k", "2")
    assert searched.returncode == 0, searched.stderr
    assert set(pq.read_table(tmp_path / "hits.parquet").column("query_id").to_pylist()) == {"x1", "x2"}


def test_downstream_commands_fail_in_one_line(tmp_path, body_folder):
    out, head = body_folder
    (tmp_path / "queries.parquet").write_text("this is not parquet")
    one_line(embedpipe("search", out, "--queries", tmp_path / "queries.parquet", "--out",
                       tmp_path / "h.parquet"), 2, "unreadable Parquet")
    one_line(embedpipe("predict", head, tmp_path / "queries.parquet", "--out",
                       tmp_path / "p.parquet"), 2, "unreadable Parquet")
    pq.write_table(pa.table({"body": ["text"]}), tmp_path / "ok.parquet")
    (tmp_path / "a_folder").mkdir()
    one_line(embedpipe("predict", head, tmp_path / "ok.parquet", "--out", tmp_path / "a_folder"),
             2, "a_folder")
    broken = shutil.copytree(head, tmp_path / "broken_card")
    (broken / "head.json").write_text("{not json")
    one_line(embedpipe("predict", broken, tmp_path / "ok.parquet", "--out", tmp_path / "p.parquet"),
             2, "head.json")
    broken = shutil.copytree(head, tmp_path / "broken_weights")
    (broken / "head.npz").write_bytes(b"PK\x03\x04 not a zip")
    one_line(embedpipe("predict", broken, tmp_path / "ok.parquet", "--out", tmp_path / "p.parquet"),
             2, "head.npz")
    bad_c = embedpipe("train-head", out, "--label-column", "label", "--C", "-1")
    assert bad_c.returncode == 2 and "Traceback" not in bad_c.stderr and "--C" in bad_c.stderr


# ---- rows, not units ----------------------------------------------------------------------------

def test_one_row_of_invalid_utf8_is_rejected_alone(tmp_path, tiny_model):
    raw = pa.array([b"fine text", b"bad \xff\xfe bytes", b"more text", b"   "], pa.binary())
    write_shards(tmp_path / "in", [pa.table({"id": [1, 2, 3, 4], "text": raw.view(pa.string())})])
    job = write_job(tmp_path / "job.toml", tmp_path / "in", tmp_path / "out", tiny_model)
    result = embedpipe("run", job, "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["rejects"] == {"invalid utf-8": 1, "empty text": 1}
    assert read_vectors(tmp_path / "out").column("id").to_pylist() == [1, 3]
    rejects = pq.read_table(next((tmp_path / "out" / "rejects").glob("*.parquet")))
    assert rejects.column("id").to_pylist() == [2, 4]
    assert summary["rows_read"] == 4 == len(read_vectors(tmp_path / "out")) + rejects.num_rows


@pytest.mark.parametrize("encode", ["dictionary", "large_string"])
def test_dictionary_and_large_string_text_columns(tmp_path, inputs, tiny_model, clean, encode):
    tables = [pq.read_table(p) for p in sorted(inputs.glob("*.parquet"))]
    folder = tmp_path / "in"
    converted = []
    for table in tables:
        text = table.column("text")
        text = text.dictionary_encode() if encode == "dictionary" else text.cast(pa.large_string())
        converted.append(table.set_column(1, "text", text))
    write_shards(folder, converted, [p.name for p in sorted(inputs.glob("*.parquet"))])
    assert embedpipe("run", job_for(tmp_path, folder, tiny_model)).returncode == 0
    assert read_vectors(tmp_path / "out").select(["id", "vector"]).equals(
        read_vectors(clean).select(["id", "vector"]))


# ---- signals ----------------------------------------------------------------------------------

@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_sigterm_and_sigint_stop_cleanly_and_the_rerun_equals_a_clean_run(tmp_path, inputs,
                                                                         tiny_model, clean, sig,
                                                                         code):
    job = job_for(tmp_path, inputs, tiny_model)
    pause = tmp_path / "paused"
    env = {**os.environ, "EMBEDPIPE_PAUSE_AT": "encode:3", "EMBEDPIPE_PAUSE_FILE": str(pause)}
    # The run gets the signals' default dispositions whatever the test runner inherited: a
    # shell's background job (`cmd &`) ignores SIGINT, and an ignored SIGINT is inherited.
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "run", str(job)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 120
    while not pause.exists():
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == code, stderr
    assert "Traceback" not in stderr and "interrupted" in stderr
    out = tmp_path / "out"
    assert not (out / ".lock").exists()  # released
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] is False
    rerun = embedpipe("run", job)
    assert rerun.returncode == 0, rerun.stderr
    assert_same_folder(out, clean)
