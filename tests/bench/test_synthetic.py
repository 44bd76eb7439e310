"""bench.synthetic: streamed synthetic rows for the memory-flatness runs."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from bench.synthetic import generate_rows


def test_generate_rows(tmp_path: Path) -> None:
    paths = generate_rows(tmp_path / "synth", 2_500, rows_per_file=1_000, batch_rows=300)
    assert [pq.read_metadata(p).num_rows for p in paths] == [1_000, 1_000, 500]
    assert pq.read_metadata(paths[0]).num_row_groups == 4  # streamed in batches
    table = pa.concat_tables(pq.read_table(p) for p in paths)
    assert table.column("id").to_pylist() == list(range(2_500))
    assert all(t.strip() for t in table.column("text").to_pylist())
