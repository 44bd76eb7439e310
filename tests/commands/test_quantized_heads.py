"""`train-head` / `predict` on quantized folders: the head trains on the stored values read back
as floats, against scikit-learn fitted here on the same values dequantized by the test's own
numpy; predict quantizes new texts' vectors with the folder's precision the same way."""
from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from helpers import make_job, read_vectors, run
from pipeline.cli import main
from pipeline.commands.heads import load_head
from pipeline.commands.query import EmbeddingRecord, TextEmbedder

C = 0.1


@pytest.fixture(scope="module")
def snippets(movie_table, tmp_path_factory):
    """Every 16th real snippet (663; the file is ordered by valence, so both labels)."""
    folder = tmp_path_factory.mktemp("quantized_snippets")
    pq.write_table(movie_table.take(np.arange(0, movie_table.num_rows, 16)),
                   folder / "snippets.parquet")
    return folder


def embedded(snippets, precision: str):
    out = snippets / precision
    job = make_job(snippets / "snippets.parquet", out, encode={"pooling": "mean", "normalize": True},
                   output={"keep_columns": ["text", "label"], "precision": precision},
                   index={"enabled": False})
    job["model"]["max_length"] = 64
    run(job)
    return out


def own_dequantized(out) -> np.ndarray:
    """The stored values back to floats, written out here: int8 bucket b -> min + (b + 128 +
    0.5) * (max - min) / 255 with the manifest's ranges; a binary byte's bits -> +1 / -1."""
    manifest = json.loads((out / "manifest.json").read_text())
    precision = manifest["config"]["output"]["precision"]
    stored = np.stack(read_vectors(out).column("vector").to_numpy(zero_copy_only=False))
    if precision == "int8":
        low, high = (np.array(manifest["calibration"][k], np.float64) for k in ("min", "max"))
        return low + (stored.astype(np.float64) + 128 + 0.5) * (high - low) / 255
    assert precision == "binary" and stored.dtype == np.int8
    bits = np.unpackbits((stored.astype(np.int16) + 128).astype(np.uint8), axis=1)
    return bits[:, :manifest["dim"]] * 2.0 - 1.0


@pytest.mark.parametrize("precision", ["int8", "binary"])
def test_head_on_a_quantized_folder_is_sklearn_on_its_dequantized_vectors(snippets, precision,
                                                                          tmp_path):
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score
    from sklearn.model_selection import train_test_split

    out = embedded(snippets, precision)
    dest = tmp_path / "head"
    result = CliRunner().invoke(main, ["train-head", str(out), "--label-column", "label",
                                       "--C", str(C), "--out", str(dest), "--json"])
    assert result.exit_code == 0, result.output
    card = json.loads(result.output)
    assert card["precision"]["name"] == precision
    assert (card["precision"]["calibration"] is not None) == (precision == "int8")

    table = read_vectors(out)
    labels = table.column("label").to_pylist()
    keep = [i for i, v in enumerate(labels) if v is not None]
    x, y = own_dequantized(out)[keep], [labels[i] for i in keep]
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.2, random_state=0, stratify=y)
    # the head's recipe: standardised (training part's mean and std) float32 features, L-BFGS
    mean, std = x_tr.mean(0), x_tr.std(0)
    std[std < 1e-12] = 1
    ref = LogisticRegression(C=C, max_iter=2000).fit(((x_tr - mean) / std).astype(np.float32),
                                                     y_tr)
    z_te = ((x_te - mean) / std).astype(np.float32)
    m = card["metrics"]
    assert m["accuracy"] == round(accuracy_score(y_te, ref.predict(z_te)), 4)
    assert m["accuracy"] > m["majority_class_accuracy"] + 0.1  # it learns from the read-back
    # The head's weights take raw read-back vectors: the same probabilities.
    head = load_head(str(dest))
    np.testing.assert_allclose(head.predict_proba(x_te.astype(np.float32)),
                               ref.predict_proba(z_te), atol=1e-4)

    # predict: the same texts embedded again, quantized with the folder's precision and read
    # back, score as their stored rows do.
    picks = np.arange(0, table.num_rows, 17)
    inputs = tmp_path / "texts.parquet"
    pq.write_table(pa.table({"id": table.column("id").take(pa.array(picks)),
                             "text": table.column("text").take(pa.array(picks))}), inputs)
    result = CliRunner().invoke(main, ["predict", str(dest), str(inputs), "--out",
                                       str(tmp_path / "pred.parquet")])
    assert result.exit_code == 0, result.output
    pred = pq.read_table(tmp_path / "pred.parquet")
    got = np.stack([pred.column(f"proba_{c}").to_numpy() for c in head.classes], 1)
    from_stored = head.predict_proba(own_dequantized(out)[picks].astype(np.float32))
    # a re-embedded value may land across a bucket (or sign) edge: rare, and small
    agree = np.mean(got.argmax(1) == from_stored.argmax(1))
    assert agree >= 0.95 and np.median(np.abs(got - from_stored)) < 1e-3
    if precision == "binary":  # the floats themselves score otherwise: the check tells apart
        floats = TextEmbedder(EmbeddingRecord(**card["embedding"])).embed(
            table.column("text").take(pa.array(picks)).to_pylist())
        assert np.median(np.abs(head.predict_proba(floats) - from_stored)) > 1e-2


def test_a_quantized_head_card_without_ranges_is_refused(snippets, tmp_path):
    out = embedded(snippets, "int8") if not (snippets / "int8").exists() else snippets / "int8"
    dest = tmp_path / "head"
    assert CliRunner().invoke(main, ["train-head", str(out), "--label-column", "label", "--C",
                                     str(C), "--out", str(dest)]).exit_code == 0
    card = json.loads((dest / "head.json").read_text())
    card["precision"]["calibration"] = None
    (dest / "head.json").write_text(json.dumps(card))
    inputs = tmp_path / "in.parquet"
    pq.write_table(pa.table({"text": ["fine"]}), inputs)
    result = CliRunner().invoke(main, ["predict", str(dest), str(inputs), "--out",
                                       str(tmp_path / "p.parquet")])
    assert result.exit_code == 2 and "int8 without its calibration ranges" in result.output


def test_pooled_windows_of_a_quantized_folder_are_refused_in_one_line(snippets, tmp_path):
    out = tmp_path / "windows"
    job = make_job(snippets / "snippets.parquet", out, encode={"long_text": "chunk", "chunk_overlap": 4},
                   output={"keep_columns": ["label"], "precision": "binary", "chunks": "rows"},
                   index={"enabled": False})
    job["model"]["max_length"] = 16
    run(job)
    result = CliRunner().invoke(main, ["train-head", str(out), "--label-column", "label",
                                       "--pool", "--out", str(tmp_path / "head")])
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1
    assert "stores binary token windows" in result.output
    assert not (tmp_path / "head").exists()
