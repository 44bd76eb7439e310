"""bench.multivector_speed at a tiny size: its report's structure, its vectors checked against
sentence-transformers' before any timing counts, and that check firing on rows that differ."""
from __future__ import annotations

import json

import numpy as np
import pytest

from bench.multivector_speed import TOLERANCE, largest_difference, main


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("multivector_speed")  # the stand-in body built once


@pytest.mark.parametrize("pool", [None, 2.0])
def test_the_bench_runs_and_its_vectors_agree(work, tmp_path, capsys, pool):
    argv = ["--texts", "10", "--rounds", "1", "--work", str(work), "--json",
            str(tmp_path / "report.json")] + (["--pool-factor", str(pool)] if pool else [])
    assert main(argv) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["texts"] == 10 and report["pool_factor"] == pool
    assert 0 <= report["max_abs_diff"] <= TOLERANCE
    assert set(report["median_s"]) == {"embedpipe", "sentence-transformers"}
    assert all(len(v) == 1 for v in report["seconds"].values())  # the warm-up round left out
    assert report["tokens_a_row"] > 3
    printed = capsys.readouterr().out
    assert "STAND-IN" in printed and "| embedpipe |" in printed


def test_the_agreement_check_fires():
    rng = np.random.default_rng(0)
    rows = [rng.standard_normal((n, 8)).astype(np.float32) for n in (5, 1, 9)]
    assert largest_difference(rows, [r.copy() for r in rows]) == 0.0
    moved = [r.copy() for r in rows]
    moved[2][4, 3] += 1e-3
    with pytest.raises(AssertionError, match="differ by 1.00e-03"):
        largest_difference(moved, rows)
    with pytest.raises(AssertionError, match="row 1"):
        largest_difference([rows[0], rows[1][:0], rows[2]], rows)
    with pytest.raises(AssertionError, match="2 rows against 3"):
        largest_difference(rows[:2], rows)
