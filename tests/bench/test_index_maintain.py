"""bench/index_maintain.py runs: its synthetic parts are parts as the writer makes them (the
bench broke unnoticed when parts gained text_hash and faiss_id)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_maintenance_bench_maintains_rather_than_rebuilds():
    done = subprocess.run([sys.executable, "-m", "bench.index_maintain", "--n", "20000",
                           "--dim", "32"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    assert [line.split(":")[0] for line in lines] == ["flat", "ivf-flat"]
    # 20 parts of 1,000 rows: 1% of the parts is one part, one removed and one added
    assert all("update_index (+1,000 / -1,000)" in line for line in lines), lines
