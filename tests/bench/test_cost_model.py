"""bench/cost_model.py: the re-export night it makes, and the model's arithmetic."""
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bench.cost_model import BILLION, CPU_ROWS_PER_S, _re_export, cost_table


def test_a_re_export_renames_every_file_and_changes_one_text_in_a_hundred(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    for i in range(3):
        pq.write_table(pa.table({"id": list(range(i * 200, i * 200 + 200)),
                                 "text": [f"row {k}" for k in range(i * 200, i * 200 + 200)]}),
                       src / f"part-{i}.parquet")
    changed = _re_export(src, tmp_path / "night", 0.01)
    before = {p.name for p in src.glob("*.parquet")}
    after = sorted((tmp_path / "night").glob("*.parquet"))
    assert len(after) == 3 and not before & {p.name for p in after}
    old = pa.concat_tables(pq.read_table(p) for p in sorted(src.glob("*.parquet")))
    new = pa.concat_tables(pq.read_table(p) for p in after)
    assert new.column("id").to_pylist() == old.column("id").to_pylist()
    differ = sum(a != b for a, b in zip(old.column("text").to_pylist(),
                                        new.column("text").to_pylist()))
    assert changed == differ == 6  # 2 of each file's 200


def test_the_model_prices_full_runs_by_rate_and_nights_by_change_plus_every_row():
    table = cost_table(tokens_per_row=100, flop_per_token=2e7, other_us_per_row=10.0,
                       nodes=(1, 4))
    name, rate = next(iter(CPU_ROWS_PER_S.items()))
    for row in (r for r in table if name in r["kind"]):
        n = row["workers"]
        full = BILLION / (n * rate) / 3600
        assert row["full_hours"][0] == pytest.approx(full)
        assert row["night_hours"][0] == pytest.approx(0.01 * full + BILLION * 10e-6 / n / 3600)
    gpu = next(r for r in table if r["kind"].startswith("GPU T4") and r["workers"] == 1)
    # 65 TFLOP/s at 25% over 2 GFLOP a row
    assert gpu["rows_per_s_each"][0] == pytest.approx(65e12 * 0.25 / 2e9)
