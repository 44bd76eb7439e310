"""output.precision: quantized vector parts, against sentence-transformers' quantize_embeddings
with the ranges the manifest records; the ranges kept across nights, refused changes, verify,
open_output's dequantized vectors, and a killed run's rerun."""
from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.io.output import open_output
from tests.helpers import embedpipe, film_texts, run_and_kill, small_job, write_shards

quantize_embeddings = pytest.importorskip("sentence_transformers").quantize_embeddings

NO_INDEX = {"enabled": False}


def shards(folder, first: int, count: int = 2, rows: int = 30):
    """`count` shards of `rows` film texts, ids first*rows...; a fixed text set per shard."""
    return write_shards(folder, [pa.table({"id": np.arange(i * rows, i * rows + rows),
                                           "text": film_texts(rows, 100 + i)})
                                 for i in range(first, first + count)],
                        names=[f"shard-{i:03d}.parquet" for i in range(first, first + count)])


def run_cli(job):
    result = embedpipe("run", job, "--no-progress")
    assert result.returncode == 0, result.stderr
    return result


def float_reference(tmp_path, data, model, name="float", **output):
    """The same job stored as float32: the vectors quantize_embeddings starts from."""
    job = small_job(tmp_path / f"{name}.toml", data, tmp_path / name, model,
                    output={"precision": "float32", **output}, index=NO_INDEX)
    run_cli(job)
    return open_output(str(tmp_path / name)).vectors()


@pytest.mark.parametrize("precision", ["int8", "uint8", "binary", "ubinary", "float16"])
def test_stored_vectors_are_quantize_embeddings_with_the_manifest_ranges(tmp_path, tiny_model,
                                                                         precision):
    data = tmp_path / "in"
    shards(data, 0)
    job = small_job(tmp_path / "q.toml", data, tmp_path / "q", tiny_model,
                    output={"precision": precision}, index=NO_INDEX)
    summary = run_cli(job).stdout
    floats = float_reference(tmp_path, data, tiny_model)
    out = open_output(str(tmp_path / "q"))
    assert out.precision.name == precision
    stored = out.vectors()
    manifest = json.loads((tmp_path / "q" / "manifest.json").read_text())
    if precision == "float16":
        assert stored.dtype == np.float32 and np.array_equal(stored, floats.astype(np.float16))
        assert "calibration" not in manifest
        return
    calibration = manifest.get("calibration")
    if precision in ("int8", "uint8"):
        ranges = np.array([calibration["min"], calibration["max"]], np.float32)
        # every row of this small input is in the sample: its ranges are the rows' own extremes
        # (encoded in other batches, so equal up to float rounding)
        assert calibration["rows"] == 60
        np.testing.assert_allclose(ranges, [floats.min(0), floats.max(0)], atol=1e-5)
    else:
        ranges = None
        assert calibration is None
    expected = quantize_embeddings(floats, precision, ranges=ranges)
    assert stored.dtype == expected.dtype and stored.shape == expected.shape
    assert np.array_equal(stored, expected)
    width = expected.shape[1] * expected.itemsize
    assert out.bytes_per_row == width
    # the parts themselves hold the quantized type, about one byte a value on disk
    for part in (tmp_path / "q" / "vectors").glob("*.parquet"):
        meta = pq.ParquetFile(part)
        assert meta.schema_arrow.field("vector").type.value_type == pa.from_numpy_dtype(
            expected.dtype)
        column = meta.schema_arrow.names.index("vector")
        on_disk = sum(meta.metadata.row_group(g).column(column).total_compressed_size
                      for g in range(meta.num_row_groups))
        # values, levels, and a dictionary page of at most 256 4-byte values (plain INT32 would
        # be 4 bytes a value: 3,840 bytes for these 30 rows of 32 int8)
        assert on_disk <= 1.3 * width * meta.metadata.num_rows + 1200
    assert f"  stored     {precision}, {width:,} bytes a row" in summary
    verified = embedpipe("verify", tmp_path / "q")
    assert verified.returncode == 0, verified.stderr
    assert f"{precision}, {width} bytes a row" in verified.stdout


def test_a_second_night_quantizes_with_the_first_nights_ranges(tmp_path, tiny_model):
    data = tmp_path / "in"
    shards(data, 0)
    job = small_job(tmp_path / "q.toml", data, tmp_path / "q", tiny_model,
                    output={"precision": "int8"}, index=NO_INDEX)
    run_cli(job)
    first = json.loads((tmp_path / "q" / "manifest.json").read_text())["calibration"]
    # the new night's texts are longer: values past the first night's ranges are clipped
    write_shards(data, [pa.table({"id": np.arange(60, 90),
                                  "text": [t + " " + t for t in film_texts(30, 7)]})],
                 names=["shard-900.parquet"])
    run_cli(job)
    second = json.loads((tmp_path / "q" / "manifest.json").read_text())["calibration"]
    assert second == first
    floats = float_reference(tmp_path, data, tiny_model)
    ranges = np.array([first["min"], first["max"]], np.float32)
    new = floats[60:]
    assert ((new < ranges[0]) | (new > ranges[1])).any()  # the night did leave the ranges
    stored = open_output(str(tmp_path / "q")).vectors()
    assert np.array_equal(stored, quantize_embeddings(floats, "int8", ranges=ranges))


def test_a_changed_precision_is_refused_and_overwrite_recalibrates(tmp_path, tiny_model):
    data = tmp_path / "in"
    shards(data, 0)
    job = small_job(tmp_path / "q.toml", data, tmp_path / "q", tiny_model,
                    output={"precision": "int8"}, index=NO_INDEX)
    run_cli(job)
    before = (tmp_path / "q" / "manifest.json").read_text()
    for other in ("uint8", "float32"):
        changed = small_job(tmp_path / f"{other}.toml", data, tmp_path / "q", tiny_model,
                            output={"precision": other}, index=NO_INDEX)
        refused = embedpipe("run", changed, "--no-progress")
        assert refused.returncode == 2
        assert "output.precision" in refused.stderr and "--mode overwrite" in refused.stderr
        assert len(refused.stderr.strip().splitlines()) == 1
    assert (tmp_path / "q" / "manifest.json").read_text() == before
    # the new ranges come from the rows the overwrite embeds: a new shard widens them
    shards(data, 5, count=1)
    result = embedpipe("run", job, "--no-progress", "--mode", "overwrite")
    assert result.returncode == 0, result.stderr
    calibration = json.loads((tmp_path / "q" / "manifest.json").read_text())["calibration"]
    assert calibration["rows"] == 90
    assert calibration != json.loads(before)["calibration"]


def test_matryoshka_dimensions_with_binary(tmp_path, tiny_model):
    data = tmp_path / "in"
    shards(data, 0)
    job = small_job(tmp_path / "q.toml", data, tmp_path / "q", tiny_model,
                    output={"precision": "binary", "dimensions": 20}, index=NO_INDEX)
    summary = run_cli(job).stdout
    floats = float_reference(tmp_path, data, tiny_model, dimensions=20)
    assert floats.shape[1] == 20
    out = open_output(str(tmp_path / "q"))
    stored = out.vectors()
    assert stored.shape == (60, 3)  # 20 bits packed into 3 bytes
    assert np.array_equal(stored, quantize_embeddings(floats, "binary"))
    assert "  stored     binary, 3 bytes a row" in summary
    # dequantized: +1 where the float was > 0, -1 elsewhere, 20 dimensions
    assert np.array_equal(out.dequantized(), np.where(floats > 0, 1.0, -1.0).astype(np.float32))


def test_dequantized_int8_lies_in_each_values_bucket(tmp_path, tiny_model):
    data = tmp_path / "in"
    shards(data, 0)
    job = small_job(tmp_path / "q.toml", data, tmp_path / "q", tiny_model,
                    output={"precision": "uint8"}, index=NO_INDEX)
    run_cli(job)
    floats = float_reference(tmp_path, data, tiny_model)
    out = open_output(str(tmp_path / "q"))
    ranges = out.precision.calibration.ranges
    step = (ranges[1] - ranges[0]) / 255
    back = out.dequantized()
    assert back.shape == floats.shape and back.dtype == np.float32
    # every float within its ranges comes back as the middle of its bucket: half a step away
    inside = (floats >= ranges[0]) & (floats <= ranges[1])
    assert (np.abs(back - floats) <= step / 2 + 1e-6)[inside].all()
    expected = ranges[0] + (out.vectors().astype(np.float32) + 0.5) * step
    np.testing.assert_allclose(back, expected, rtol=0, atol=1e-6)


def test_verify_catches_a_changed_byte_of_a_quantized_part(tmp_path, tiny_model):
    data = tmp_path / "in"
    shards(data, 0)
    job = small_job(tmp_path / "q.toml", data, tmp_path / "q", tiny_model,
                    output={"precision": "int8"}, index=NO_INDEX)
    run_cli(job)
    part = sorted((tmp_path / "q" / "vectors").glob("*.parquet"))[0]
    raw = bytearray(part.read_bytes())
    raw[len(raw) // 3] ^= 0x01
    part.write_bytes(bytes(raw))
    result = embedpipe("verify", tmp_path / "q")
    assert result.returncode == 1
    assert part.name in result.stdout


def test_a_killed_quantized_run_reruns_to_the_clean_runs_vectors(tmp_path, tiny_model):
    data = tmp_path / "in"
    shards(data, 0, count=3)
    job = small_job(tmp_path / "q.toml", data, tmp_path / "q", tiny_model,
                    output={"precision": "int8"}, index=NO_INDEX)
    run_and_kill(job, "unit", tmp_path)  # after the first unit's commit
    killed = json.loads((tmp_path / "q" / "manifest.json").read_text())
    assert killed["calibration"] and len(killed["units"]) == 1
    run_cli(job)
    clean = small_job(tmp_path / "clean.toml", data, tmp_path / "clean", tiny_model,
                      output={"precision": "int8"}, index=NO_INDEX)
    run_cli(clean)
    rerun, whole = open_output(str(tmp_path / "q")), open_output(str(tmp_path / "clean"))
    assert rerun.manifest.calibration == whole.manifest.calibration
    assert np.array_equal(rerun.vectors(), whole.vectors())
    assert rerun.ids().to_pylist() == whole.ids().to_pylist()


@pytest.mark.parametrize("extra, words", [
    ({"output": {"vector_dtype": "float16"}, "index": NO_INDEX}, "disagree"),
    ({"output": {"granularity": "word"}, "index": NO_INDEX}, "token table"),
])
def test_refused_combinations_are_one_line(tmp_path, tiny_model, extra, words):
    data = tmp_path / "in"
    shards(data, 0, count=1)
    sections = {"output": {"precision": "int8", **extra.get("output", {})},
                "index": extra["index"]}
    job = small_job(tmp_path / "q.toml", data, tmp_path / "q", tiny_model, **sections)
    result = embedpipe("run", job, "--no-progress")
    assert result.returncode == 2
    assert words in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "q").exists()


def test_reused_rows_copy_the_stored_quantized_values(tmp_path, tiny_model):
    """A changed shard's unchanged rows take their stored int8 vectors; the folder still equals
    quantize_embeddings of the float vectors with the folder's ranges."""
    data = tmp_path / "in"
    path = shards(data, 0, count=1)[0]
    job = small_job(tmp_path / "q.toml", data, tmp_path / "q", tiny_model,
                    output={"precision": "int8"}, index=NO_INDEX)
    run_cli(job)
    texts = film_texts(30, 100)
    texts[3], texts[17] = "an entirely new review of the film", "a slow ending"
    write_shards(data, [pa.table({"id": np.arange(30), "text": texts})], names=[path.name])
    summary = json.loads(embedpipe("run", job, "--no-progress", "--json").stdout)
    assert summary["rows_reused"] == 28 and summary["rows_encoded"] == 2
    floats = float_reference(tmp_path, data, tiny_model)
    ranges = open_output(str(tmp_path / "q")).precision.calibration.ranges
    stored = open_output(str(tmp_path / "q")).vectors()
    assert np.array_equal(stored, quantize_embeddings(floats, "int8", ranges=ranges))


def test_vector_dtype_stays_precisions_float_alias():
    """Old job files keep their folders: vector_dtype alone is the precision, and a float
    precision adds nothing to the vector settings (the settings hash is unchanged)."""
    from pipeline.config import config_from_dict, settings_hash

    old = config_from_dict({"output": {"vector_dtype": "float16"}})
    new = config_from_dict({"output": {"precision": "float16"}})
    assert old.output.precision == "float16" and new.output.vector_dtype == "float16"
    assert old.vector_settings() == new.vector_settings()
    assert "output.precision" not in old.vector_settings()
    assert settings_hash(config_from_dict({}).vector_settings()) == settings_hash(
        config_from_dict({"output": {"precision": "float32"}}).vector_settings())
    quantized = config_from_dict({"output": {"precision": "ubinary"}, "index": NO_INDEX})
    assert quantized.vector_settings()["output.precision"] == "ubinary"
    # the recorded config loads back to the same output section
    assert config_from_dict({"output": quantized.to_dict()["output"],
                             "index": NO_INDEX}).output == quantized.output
