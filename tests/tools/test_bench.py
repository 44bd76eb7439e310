"""`embedpipe bench` on a few real texts, one round: the report's facts, not its speeds."""
from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.tools.bench import (BenchOptions, load_rows, render, run_bench, runner_batches,
                                  st_padded_tokens)
from pipeline.tools.measure import PeakRSS


@pytest.fixture(scope="module")
def report(tmp_path_factory, mixed_texts):
    folder = tmp_path_factory.mktemp("bench_in")
    texts = mixed_texts[::5][:48] + ["   ", None]  # 48 texts of mixed length, 2 rejected rows
    pq.write_table(pa.table({"key": np.arange(100, 150), "body": texts}), folder / "a.parquet")
    opts = BenchOptions(input=str(folder), text_column="body", id_column="key",
                        dtypes=("float32", "bfloat16"), device="cpu", rounds=1, warmup_rows=8,
                        workdir=str(tmp_path_factory.mktemp("bench_work")))
    return run_bench(opts)


def test_every_contender_ran_on_the_same_rows(report):
    names = [r["name"] for r in report["results"]]
    assert names == ["embedpipe float32", "encode-only float32", "embedpipe bfloat16",
                     "encode-only bfloat16", "sentence-transformers float32",
                     "sentence-transformers bfloat16"]
    assert report["texts"] == 48
    for row in report["results"]:
        assert row["rows"] == 48 and len(row["seconds"]) == 1
        assert row["texts_per_s"] > 0 and row["peak_rss_mb"] > 100
        assert row["padded_tokens"] >= row["real_tokens"] > 48


def test_vectors_agree_with_sentence_transformers(report):
    by = {r["name"]: r for r in report["results"]}
    assert by["embedpipe float32"]["min_cosine_vs_st_float32"] >= 0.99999
    assert by["encode-only float32"]["min_cosine_vs_st_float32"] >= 0.99999
    assert by["embedpipe bfloat16"]["min_cosine_vs_st_float32"] >= 0.999
    assert by["embedpipe bfloat16"]["real_tokens"] == by["sentence-transformers float32"]["real_tokens"]


def test_stages_ratios_and_matmul_fraction(report):
    row = next(r for r in report["results"] if r["name"] == "embedpipe bfloat16")
    assert set(row["stages"]) == {"read", "tokenize", "encode", "write", "index", "total"}
    assert row["stages"]["encode"] > 0
    assert row["x_vs_sentence-transformers float32"] > 0
    assert row["x_vs_sentence-transformers bfloat16"] > 0
    assert 0 < row["encoder_fraction_of_matmul"] and row["matmul_tflops"] > 0
    assert "overhead_vs_encode_only_pct" in row
    assert "targets" not in report  # the product reports ratios; targets live in the docs
    text = render(report)
    assert "embedpipe bfloat16" in text and "matmul rate" in text and "targets" not in text
    assert report["cpu_model"] in text  # every speed figure names its CPU
    json.dumps(report)


def test_rows_are_those_embedpipe_embeds(tmp_path):
    path = tmp_path / "x.parquet"
    pq.write_table(pa.table({"id": [3, 1, None, 3, 2, 4], "text": ["a", "b", "c", "d", " ", None]}),
                   path)
    rows = load_rows(str(path), "text", "id", None)
    assert rows["id"].to_pylist() == [3, 1] and rows["text"].to_pylist() == ["a", "b"]


def test_encode_only_runs_the_runners_own_batches(report):
    """Each file apart, `sort_window` rows a window: the batches the runner itself makes, so
    both contenders compute the same padded tokens."""
    by = {r["name"]: r for r in report["results"]}
    for dtype in ("float32", "bfloat16"):
        assert by[f"encode-only {dtype}"]["padded_tokens"] == by[f"embedpipe {dtype}"]["padded_tokens"]


def test_runner_batches_window_each_file_apart(tmp_path, bundled_model):
    from helpers import runtime_for
    from pipeline.config import config_from_dict
    from pipeline.encode.tokenizer import TextTokenizer

    pq.write_table(pa.table({"id": [1, 2, 3, 4, 5], "text": ["a b", "c", "d e f", "", "g"]}),
                   tmp_path / "a.parquet")
    pq.write_table(pa.table({"id": [6, 7, 1], "text": ["h", "i j", "again"]}), tmp_path / "b.parquet")
    job = config_from_dict({"input": {"path": str(tmp_path)}, "encode": {"sort_window": 2}})
    made = runner_batches(job, runtime_for(bundled_model),
                          TextTokenizer(bundled_model.path, 128))
    assert made.rows == 6  # 8 rows less one empty text and one duplicate id
    windows = sorted(sorted(b.positions.tolist()) for b in made.batches)
    # file a: rows 0-1 | rows 2-3 (the empty one rejected) | row 4; file b: rows 0-1 | row 2
    # (a duplicate id, rejected): one batch per window, never across windows or files
    assert windows == [[0, 1], [2], [3], [4, 5]]


def test_st_padding_follows_its_character_sort():
    texts = ["aaaa", "b", "cc", "ddd"]
    lengths = np.array([9, 2, 3, 5])
    # sorted by characters: aaaa(9) ddd(5) | cc(3) b(2) -> 2*9 + 2*3
    assert st_padded_tokens(texts, lengths, 2) == 24


def test_peak_rss_is_per_block():
    with PeakRSS() as big:
        block = np.ones(200 * 2**20 // 8)  # 200 MB, touched
        del block
    with PeakRSS() as small:
        pass
    assert big.peak - small.peak > 150 * 2**20
