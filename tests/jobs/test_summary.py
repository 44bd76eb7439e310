"""The run summary holds the Runtime and sums UnitCounts, yet says what it said before: its JSON
(`embedpipe run --json`, the manifest's last_run) and its text against the same summary made by
main's RunSummary before the change (tests/jobs/data/summary_before.json)."""
from __future__ import annotations

import json
from pathlib import Path

from pipeline.runtime.runtime import Runtime
from pipeline.io.manifest import UnitCounts, UnitRecord
from pipeline.jobs.summary import RunSummary

BEFORE = json.loads((Path(__file__).parent / "data" / "summary_before.json").read_text())
# added since (output.precision): the JSON's two keys and the text's "stored" line
ADDED_LINE = "  stored     float32, 0 bytes a row"


def _summary() -> RunSummary:
    """The summary main's test script filled field by field, made the new way."""
    runtime = Runtime(device="cpu", dtype="bfloat16",
                      dtype_note="bfloat16 (auto: CPU has AVX-512 BF16)", attention="avx512",
                      compile=True, max_length=128, compile_note="auto: warm compile cache",
                      forward="fused")
    s = RunSummary(job="films", output="/out/films", model="mini", runtime=runtime,
                   recipe=["pooling mean (folder)"], units_total=5, units_skipped=1,
                   units_changed=1, units_removed=1, units_removed_kept=2, units_repaired=1,
                   repairs=["/in/a.parquet: size differs"], reuse="id", rows_removed=3,
                   registry_bytes=4096, long_text="chunk", granularity="word",
                   real_tokens=100000, padded_tokens=120000, oom_splits=2,
                   stray_files_removed=4, folder_vectors=950,
                   failures=["/in/b.parquet: OSError: boom"],
                   index={"factory": "Flat", "count": 950, "recall_at_10": 1.0},
                   lock_taken_over={"host": "h", "pid": 12},
                   sinks=[{"name": "lance", "target": "/t", "upserted": 900, "deleted": 3,
                           "full": False, "rows": 950, "seconds": 1.5,
                           "rows_per_second": 600.0, "index": "ivf"}],
                   seconds={"scan": 0.5, "read": 1.25, "tokenize": 2.0, "encode": 10.0,
                            "write": 1.0, "index": 0.5, "total": 20.0})
    units = [UnitCounts(rows_in=500, vectors=450, rows=450, rejects=30,
                        reject_reasons={"blank text": 30}, truncated=7, windows=700, chunked=10,
                        reused=100, token_rows=2000),
             UnitCounts(rows_in=300, vectors=270, rows=270, rejects=30,
                        reject_reasons={"blank text": 20, "duplicate id": 10}, windows=300,
                        chunked=20, copied=20, token_rows=1000),
             UnitCounts(rows_in=160, vectors=180, rows=180, windows=200, token_rows=2000)]
    for i, counts in enumerate(units):
        s.add(UnitRecord(key=f"u{i}", path=f"/in/{i}", first_row=0, row_groups=[0],
                         fingerprint="f", status="complete", counts=counts))
    s.add(UnitRecord(key="bad", path="/in/b.parquet", first_row=0, row_groups=[0],
                     fingerprint="f", status="failed", counts=UnitCounts(rows_in=40)))
    return s


def test_the_json_keeps_its_keys_and_values():
    got = json.loads(json.dumps(_summary().to_dict()))
    assert (got.pop("precision"), got.pop("rescore_precision"), got.pop("bytes_per_row"),
            got.pop("stored_tokens")) == ("float32", None, 0, 0)
    assert list(got) == list(BEFORE["json"])  # the same keys, in the same order
    assert got == BEFORE["json"]


def test_the_text_and_exit_code_are_as_before():
    summary = _summary()
    lines = summary.render().splitlines()
    assert ADDED_LINE in lines
    assert "\n".join(line for line in lines if line != ADDED_LINE) == BEFORE["text"]
    assert summary.exit_code == BEFORE["exit_code"]


def test_units_done_and_failed_come_from_the_records():
    s = _summary()
    assert (s.units_done, s.units_failed, s.rows_failed, s.rows_read) == (3, 1, 40, 1000)
    assert s.accounted  # 1000 read = 900 vectors + 60 rejected + 40 in the failed unit
