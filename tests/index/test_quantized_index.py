"""Indexes over quantized folders (output.precision): binary folders get FAISS binary indexes
searched by Hamming distance, int8 / uint8 folders scalar-quantizer indexes whose codes are the
stored values; checked against brute force over the stored vectors, through real runs."""
from __future__ import annotations

import json

import faiss
import numpy as np
import pyarrow as pa
import pytest

from pipeline.commands.search import Searcher
from pipeline.index.build import load_index
from pipeline.index.family import unwrapped
from pipeline.io.output import open_output
from pipeline.io.storage import Store
from tests.helpers import embedpipe, film_texts, small_job, write_shards

KINDS = {"flat": faiss.IndexBinaryFlat, "hnsw": faiss.IndexBinaryHNSW,
         "ivf-flat": faiss.IndexBinaryIVF}


def corpus(folder, rows: int = 300, offset: int = 0, shards: int = 2):
    per = rows // shards
    return write_shards(folder, [pa.table({"id": np.arange(offset + i * per, offset + (i + 1) * per),
                                           "text": film_texts(per, 500 + offset + i)})
                                 for i in range(shards)],
                        names=[f"shard-{i:03d}.parquet" for i in range(shards)])


def run(job):
    result = embedpipe("run", job, "--no-progress")
    assert result.returncode == 0, result.stderr
    return result


def hamming(queries: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """[queries, rows] bit differences between packed uint8 codes."""
    return np.unpackbits(queries[:, None, :] ^ codes[None, :, :], axis=-1).sum(-1)


def indexed_folder(tmp_path, model, precision: str, kind: str):
    """A run of `precision` vectors with a `kind` index (IVF: every list probed, exact):
    (folder, its loaded index, its infos)."""
    data = tmp_path / "in"
    corpus(data)
    index = {"type": kind, **({"nlist": 4, "nprobe": 4} if kind == "ivf-flat" else {})}
    run(small_job(tmp_path / "job.toml", data, tmp_path / "out", model,
                  output={"precision": precision}, index=index))
    return tmp_path / "out", *load_index(Store(str(tmp_path / "out")))


def as_codes(stored: np.ndarray, precision: str) -> np.ndarray:
    return (stored.astype(np.int16) + (128 if precision == "binary" else 0)).astype(np.uint8)


@pytest.mark.parametrize("precision", ["binary", "ubinary"])
@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivf-flat"])
def test_binary_folders_get_binary_indexes_searched_by_hamming(tmp_path, tiny_model, precision,
                                                               kind):
    folder, loaded, infos = indexed_folder(tmp_path, tiny_model, precision, kind)
    assert isinstance(unwrapped(loaded), KINDS[kind])
    assert infos["codes"] == "binary" and infos["metric"] == "hamming"
    # recall@10 counts a hit within the exact 10th Hamming distance (ties are arbitrary)
    assert infos["recall_at_10"] >= (1.0 if kind != "hnsw" else 0.9)
    out = open_output(str(folder))
    codes = as_codes(out.vectors(), precision)
    assert infos["dimension"] == codes.shape[1] * 8 and infos["count"] == len(codes)
    # a float query's bits, against every stored row's bits
    searcher = Searcher(str(folder))
    queries = np.random.default_rng(0).standard_normal((20, out.manifest.dim)).astype(np.float32)
    scores, rows = searcher.search_vectors(queries, 10)
    truth = hamming(np.packbits(queries > 0, axis=-1), codes)
    best = np.sort(truth, axis=1)[:, :10]
    if kind != "hnsw":  # exact (IVF with every list probed): the same distances as brute force
        np.testing.assert_array_equal(scores, best)
    # every hit's distance is its true Hamming distance
    np.testing.assert_array_equal(scores, np.take_along_axis(truth, rows, 1))
    assert (rows >= 0).all()
    assert embedpipe("verify", folder).returncode == 0


@pytest.mark.parametrize("precision", ["int8", "uint8"])
@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivf-flat"])
def test_int8_folders_get_sq8_indexes_holding_the_stored_values(tmp_path, tiny_model, precision,
                                                                kind):
    folder, loaded, infos = indexed_folder(tmp_path, tiny_model, precision, kind)
    assert infos["codes"] == "sq8" and "SQ8" in infos["factory"]
    out = open_output(str(folder))
    dequantized = out.dequantized()
    stored = out.vectors()
    # the index's codes are the stored values: it reconstructs them dequantized
    ids = json.loads((folder / "index" / "index_infos.json").read_text())["count"]
    assert ids == len(stored)
    searcher = Searcher(str(folder))
    labels = np.sort(searcher.live.sorted_labels)
    inner = faiss.extract_index_ivf(loaded) if kind == "ivf-flat" else loaded
    if kind == "ivf-flat":
        inner.set_direct_map_type(faiss.DirectMap.Hashtable)
    copies = np.stack([inner.reconstruct(int(label)) for label in
                       searcher.live.sorted_labels[np.argsort(searcher.live.order)]])
    np.testing.assert_allclose(copies, dequantized, atol=1e-5)
    # a float query is scored against the dequantized vectors
    queries = dequantized[:15] + 0.01
    scores, rows = searcher.search_vectors(queries, 10)
    truth = queries @ dequantized.T
    np.testing.assert_allclose(scores, np.take_along_axis(truth, rows, 1), rtol=1e-4, atol=1e-4)
    if kind != "hnsw":
        np.testing.assert_allclose(scores, -np.sort(-truth, axis=1)[:, :10], rtol=1e-4, atol=1e-4)
    assert len(labels) == len(stored)
    assert embedpipe("verify", folder).returncode == 0


def test_binary_refusals_are_one_line(tmp_path, tiny_model):
    data = tmp_path / "in"
    corpus(data, rows=60)
    for index, words in [({"type": "ivf-pq"}, "no product quantizer"),
                         ({"type": "ivf-flat", "layout": "shards"}, "one index"),
                         ({"type": "factory", "factory": "IVF4,PQ8"}, "binary index")]:
        job = small_job(tmp_path / "r.toml", data, tmp_path / "r", tiny_model,
                        output={"precision": "binary"}, index=index)
        result = embedpipe("run", job, "--no-progress")
        assert result.returncode == 2, (index, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and words in lines[0], (index, lines)
