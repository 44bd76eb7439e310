"""The typed manifest against manifests written before it existed.

tests/io/data/manifest_{a,b,c}.json were written by `embedpipe run` on main before the typed
records (rejects, a repeated text, a failed unit, an index and a LanceDB sink; one row a token
window; a token table)."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from pipeline.config import ConfigError
from pipeline.io.ledger import Ledger
from pipeline.io.manifest import (MANIFEST, Manifest, ManifestError, SinkRecord, UnitCounts,
                                  UnitRecord, read_manifest)
from pipeline.io.storage import Store

DATA = Path(__file__).parent / "data"
SAMPLES = ["manifest_a.json", "manifest_b.json", "manifest_c.json"]


def _sample(name: str) -> dict:
    return json.loads((DATA / name).read_text())


def _folder(tmp_path: Path, raw: dict) -> Store:
    (tmp_path / MANIFEST).write_text(json.dumps(raw))
    return Store(str(tmp_path))


@pytest.mark.parametrize("name", SAMPLES)
def test_a_manifest_written_before_the_typed_records_reads_and_writes_back_the_same(name):
    raw = _sample(name)
    manifest = Manifest.from_json(copy.deepcopy(raw))
    assert json.loads(manifest.to_bytes()) == raw
    # and every unit record alone
    for key, record in raw["units"].items():
        assert UnitRecord.from_json(record).to_json() == record


@pytest.mark.parametrize("name", SAMPLES)
def test_the_typed_fields_hold_what_the_json_says(name):
    raw = _sample(name)
    m = Manifest.from_json(copy.deepcopy(raw))
    assert (m.job, m.dim, m.id_type, m.settings_hash, m.complete, m.content_hash) == (
        raw["job"], raw["dim"], raw["id_type"], raw["settings_hash"], raw["complete"],
        raw["content_hash"])
    assert m.keep_columns == raw["config"]["output"]["keep_columns"]
    assert m.index_config == raw["config"]["index"]
    for key, unit in raw["units"].items():
        record = m.units[key]
        if unit["status"] != "complete":
            assert not record.complete and record.error == unit["error"]
            continue
        c = record.counts
        assert (c.rows_in, c.vectors, c.rejects, dict(c.reject_reasons), c.truncated,
                c.windows, c.chunked, c.copied, c.token_rows) == (
            unit["rows_in"], unit["vectors_out"], unit["rejects"], unit["reject_reasons"],
            unit["truncated"], unit["windows"], unit["chunked"], unit.get("copied", 0),
            unit.get("token_rows", 0))
        assert record.stored_rows == (unit["part_rows"] if unit["part_rows"] is not None
                                      else unit["vectors_out"])
        assert record.vector_files == unit["vectors"]
        assert record.reject_files == unit["rejects_files"]


def test_a_sink_record_is_typed_and_written_back_as_it_was():
    raw = _sample("manifest_a.json")
    m = Manifest.from_json(copy.deepcopy(raw))
    (name, record), = m.sinks.items()
    assert isinstance(record, SinkRecord)
    assert record.units == raw["sinks"][name]["units"] and record.rows == raw["sinks"][name]["rows"]
    assert record.to_json() == raw["sinks"][name]


def test_the_counts_add_up_to_the_summary_main_wrote():
    """The units' counts added with + give the totals the run's summary (written by main, which
    summed field by field) recorded in last_run."""
    from pipeline.runtime.runtime import Runtime
    from pipeline.jobs.summary import RunSummary

    keys = ["rows_read", "rows_failed", "vectors_written", "rows_reused", "rows_copied",
            "rejects", "rejected", "truncated", "windows", "texts_chunked", "token_rows",
            "units_done", "units_failed", "rows_encoded", "accounted"]
    for name in SAMPLES:
        raw = _sample(name)
        m = Manifest.from_json(copy.deepcopy(raw))
        summary = RunSummary(job="", output="", model="",
                             runtime=Runtime("cpu", "float32", "float32", "sdpa", False, 32))
        for record in m.units.values():
            summary.add(record)
        got, want = summary.to_dict(), raw["last_run"]
        assert {k: got[k] for k in keys} == {k: want[k] for k in keys}, name


def test_unit_counts_add():
    zero = UnitCounts()
    a = UnitCounts(rows_in=5, vectors=3, rows=4, rejects=2, reject_reasons={"null text": 2},
                   truncated=1, windows=4, chunked=1, reused=1, copied=1, token_rows=9)
    b = UnitCounts(rows_in=7, vectors=6, rows=6, rejects=1, reject_reasons={"null text": 1,
                                                                           "duplicate id": 1})
    assert a + zero == a and zero + a == a
    s = a + b
    assert (s.rows_in, s.vectors, s.rows, s.rejects, s.truncated, s.windows, s.token_rows) == (
        12, 9, 10, 3, 1, 4, 9)
    assert s.reject_reasons == {"null text": 3, "duplicate id": 1}
    assert (a + b) + a == a + (b + a)
    assert a.reject_reasons == {"null text": 2}  # the operands are left as they were


def test_unknown_top_level_keys_are_kept_and_nulls_read_as_absent(tmp_path):
    raw = _sample("manifest_c.json")
    raw["from_a_later_version"] = {"x": [1, 2]}
    raw["dim"] = None
    store = _folder(tmp_path, raw)
    ledger = Ledger(store)
    assert ledger.manifest.dim is None
    ledger.update(complete=False)
    written = json.loads((tmp_path / MANIFEST).read_text())
    assert written["from_a_later_version"] == {"x": [1, 2]}
    assert "dim" not in written  # null and absent mean the same to every reader
    assert written["complete"] is False
    assert {k: v for k, v in written.items() if k not in ("updated", "complete", "dim")} == {
        k: v for k, v in raw.items() if k not in ("updated", "complete", "dim")}


def test_retired_records_round_trip(tmp_path):
    """A run killed after retiring units leaves them named under `retired`."""
    raw = _sample("manifest_a.json")
    key = next(k for k, u in raw["units"].items() if u["status"] == "complete")
    raw["retired"] = [raw["units"].pop(key)]
    store = _folder(tmp_path, raw)
    ledger = Ledger(store)
    assert [r.key for r in ledger.retired] == [key]
    assert json.loads(ledger.manifest.to_bytes()) == raw
    files = raw["retired"][0]["vectors"] + raw["retired"][0]["rejects_files"]
    assert ledger.clear_retired() == files
    assert json.loads((tmp_path / MANIFEST).read_text())["retired"] == []


def test_the_ledger_refuses_an_unknown_field(tmp_path):
    raw = _sample("manifest_b.json")
    ledger = Ledger(_folder(tmp_path, raw))
    with pytest.raises(TypeError, match="no field 'dimension'"):
        ledger.update(dimension=3)
    assert json.loads((tmp_path / MANIFEST).read_text()) == raw


@pytest.mark.parametrize("damage, what", [
    (lambda raw, unit: unit.__setitem__("vectors_out", "many"), "a unit record is malformed"),
    (lambda raw, unit: unit.pop("fingerprint"), "a unit record is malformed"),
    (lambda raw, unit: raw.__setitem__("retired", {"a": 1}), "a retired unit record"),
])
def test_a_malformed_record_is_one_line_naming_the_folder(tmp_path, damage, what):
    raw = _sample("manifest_b.json")
    damage(raw, next(iter(raw["units"].values())))
    store = _folder(tmp_path, raw)
    with pytest.raises(ManifestError) as caught:
        read_manifest(store)
    message = str(caught.value)
    assert what in message and "\n" not in message and f"embedpipe verify {store.url}" in message
    assert isinstance(caught.value, ConfigError)  # the CLI's exit 2


def test_a_malformed_sink_record_is_dropped_so_the_sink_is_synced_in_full(tmp_path):
    raw = _sample("manifest_a.json")
    (name, record), = raw["sinks"].items()
    raw["sinks"][name] = {"target": record["target"], "units": "not a map"}
    m = read_manifest(_folder(tmp_path, raw))
    assert m.sinks == {}


def test_verify_warns_of_a_malformed_sink_record_once(tmp_path, caplog):
    from pipeline.commands.verify import verify_folder

    raw = _sample("manifest_a.json")
    (name, record), = raw["sinks"].items()
    raw["sinks"][name] = {"target": record["target"], "units": "not a map"}
    store = _folder(tmp_path, raw)
    with caplog.at_level("WARNING"):
        verify_folder(store.url, quick=True)
    assert sum("is malformed; it is synced in full" in r.getMessage()
               for r in caplog.records) == 1


def test_ledger_rewrites_a_sample_folder_unchanged_but_for_the_time(tmp_path):
    raw = _sample("manifest_a.json")
    store = _folder(tmp_path, raw)
    ledger = Ledger(store)
    ledger.update()
    written = json.loads((tmp_path / MANIFEST).read_text())
    written.pop("updated"), raw.pop("updated")
    assert written == raw
