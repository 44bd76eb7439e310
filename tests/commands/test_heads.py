"""`embedpipe train-head` / `predict`: a logistic-regression head on real snippet vectors."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from helpers import matrix, read_vectors
from pipeline.cli import main
from pipeline.config import ConfigError
from pipeline.commands.heads import HeadOptions, load_head, predict_file, train_head


@pytest.fixture(scope="module")
def stored(snippets_out) -> pa.Table:
    return read_vectors(snippets_out)


@pytest.fixture(scope="module")
def head(snippets_out, tmp_path_factory):
    dest = tmp_path_factory.mktemp("head") / "sentiment"
    card = train_head(str(snippets_out), HeadOptions("label"), str(dest))
    return dest, card


def test_head_learns_and_reports_held_out_metrics(head, stored, snippets_out):
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score, f1_score
    from sklearn.model_selection import train_test_split
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    dest, card = head
    labels = stored.column("label").to_pylist()
    nulls = labels.count(None)
    assert card["rows"] == {"vectors": stored.num_rows, "labelled": stored.num_rows - nulls,
                            "null_label": nulls, "no_label_row": 0}
    assert nulls > 0  # this shard has snippets rated exactly 0: left out and counted
    m = card["metrics"]
    assert card["classes"] == ["negative", "positive"]
    assert m["accuracy"] > m["majority_class_accuracy"] + 0.15  # it learns
    assert m["accuracy"] > 0.7
    assert set(m["per_class"]) == {"negative", "positive"}
    assert sum(c["support"] for c in m["per_class"].values()) == card["split"]["test"]

    # Independent reference: a plain scikit-learn pipeline on the same stratified split.
    keep = [i for i, v in enumerate(labels) if v is not None]
    x, y = matrix(stored)[keep], [labels[i] for i in keep]
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.2, random_state=0, stratify=y)
    assert card["split"]["train"] == len(y_tr) and card["split"]["test"] == len(y_te)
    assert card["model"]["C"] in (0.001, 0.01, 0.1, 1.0)  # chosen by CV on the training part
    ref = make_pipeline(StandardScaler(), LogisticRegression(C=card["model"]["C"], max_iter=2000))
    ref_pred = ref.fit(x_tr, y_tr).predict(x_te)
    # (equal up to the L-BFGS tolerance: a few near-0.5 rows may fall either way)
    assert abs(m["accuracy"] - accuracy_score(y_te, ref_pred)) <= 0.01
    assert abs(m["macro_f1"] - f1_score(y_te, ref_pred, average="macro")) <= 0.01
    # The saved head (plain arrays, scaling folded in) agrees with the reference.
    loaded = load_head(str(dest))
    assert np.mean(loaded.model.predict(x_te) == ref_pred) >= 0.98
    assert np.abs(loaded.predict_proba(x_te) - ref.predict_proba(x_te)).mean() < 0.01
    pred = loaded.model.predict(x_te)
    assert m["accuracy"] == round(float(np.mean(pred == np.array(y_te))), 4)

    saved = json.loads((dest / "head.json").read_text())
    manifest = json.loads((snippets_out / "manifest.json").read_text())
    assert saved["settings_hash"] == manifest["settings_hash"]
    assert saved["embedding"]["vector_settings"] == manifest["vector_settings"]
    assert saved["classes"] == ["negative", "positive"] and saved["metrics"] == m


def test_labels_from_a_parquet_folder_equal_the_kept_column(snippets_out, head, movie_dir,
                                                            tmp_path):
    _, kept_card = head
    card = train_head(str(snippets_out), HeadOptions("label", labels=str(movie_dir),
                                                     C=kept_card["model"]["C"]),
                      str(tmp_path / "h"))
    assert card["metrics"] == kept_card["metrics"]
    assert card["rows"] == kept_card["rows"]
    assert card["model"]["C_from"] == "given"


def test_predict_round_trips(snippets_out, head, stored, tmp_path):
    dest, card = head
    picks = np.arange(0, stored.num_rows, 53)[:40]
    texts = [stored.column("text")[int(i)].as_py() for i in picks]
    ids = [stored.column("id")[int(i)].as_py() for i in picks]
    inputs = tmp_path / "new.parquet"
    pq.write_table(pa.table({"id": ids, "text": texts[:-1] + ["   "]}), inputs)
    result = CliRunner().invoke(main, ["predict", str(dest), str(inputs), "--out",
                                       str(tmp_path / "pred.parquet")])
    assert result.exit_code == 0, result.output
    assert "39 texts classified (1 blank skipped)" in result.output
    pred = pq.read_table(tmp_path / "pred.parquet")
    assert pred.column_names == ["id", "predicted", "proba_negative", "proba_positive"]
    assert pred.column("id").to_pylist() == ids[:-1]
    # Embedding the texts again gives the stored vectors' predictions.
    from_stored = load_head(str(dest)).predict_proba(matrix(stored.take(pa.array(picks[:-1]))))
    got = np.stack([pred.column("proba_negative").to_numpy(),
                    pred.column("proba_positive").to_numpy()], 1)
    np.testing.assert_allclose(got, from_stored, atol=1e-3)
    assert pred.column("predicted").to_pylist() == [card["classes"][i]
                                                    for i in from_stored.argmax(1)]


def test_predict_refuses_other_embedding_settings(head, tmp_path):
    dest, _ = head
    other = tmp_path / "other"
    shutil.copytree(dest, other)
    card = json.loads((other / "head.json").read_text())
    card["embedding"]["vector_settings"]["encode.pooling"] = "cls"
    (other / "head.json").write_text(json.dumps(card))
    inputs = tmp_path / "in.parquet"
    pq.write_table(pa.table({"text": ["fine"]}), inputs)
    with pytest.raises(ConfigError, match="encode.pooling"):
        predict_file(str(other), str(inputs), str(tmp_path / "p.parquet"))
    card = json.loads((dest / "head.json").read_text())
    card["settings_hash"] = "0" * 16
    (other / "head.json").write_text(json.dumps(card))
    result = CliRunner().invoke(main, ["predict", str(other), str(inputs), "--out",
                                       str(tmp_path / "p.parquet")])
    assert result.exit_code == 2 and "refusing" in result.output
    assert not (tmp_path / "p.parquet").exists()


def test_null_labels_left_out_and_one_class_refused(snippets_out, stored, tmp_path):
    ids = stored.column("id").to_pylist()
    labels = tmp_path / "labels.parquet"
    # every third id null, a tenth of the ids missing, the rest from the real labels
    real = stored.column("label").to_pylist()
    rows = [(i, None if k % 3 == 0 else (real[k] or "negative")) for k, i in enumerate(ids)
            if k % 10 != 1]
    pq.write_table(pa.table({"review": [r[0] for r in rows], "sentiment": [r[1] for r in rows]}),
                   labels)
    card = train_head(str(snippets_out), HeadOptions("sentiment", str(labels), "review"),
                      str(tmp_path / "h"))
    nulls = sum(r[1] is None for r in rows)
    assert card["rows"] == {"vectors": len(ids), "labelled": len(rows) - nulls,
                            "null_label": nulls, "no_label_row": len(ids) - len(rows)}
    assert card["split"]["train"] + card["split"]["test"] == len(rows) - nulls

    pq.write_table(pa.table({"id": ids, "label": ["positive"] * len(ids)}), labels)
    with pytest.raises(ConfigError, match="one class"):
        train_head(str(snippets_out), HeadOptions("label", str(labels)), str(tmp_path / "h1"))
    result = CliRunner().invoke(main, ["train-head", str(snippets_out), "--labels", str(labels),
                                       "--label-column", "label"])
    assert result.exit_code == 2 and "one class" in result.output


def test_train_head_cli_reports_and_errors(snippets_out, tmp_path):
    result = CliRunner().invoke(main, ["train-head", str(snippets_out), "--label-column", "label",
                                       "--out", str(tmp_path / "h"), "--json"])
    assert result.exit_code == 0, result.output
    card = json.loads(result.output)
    assert card["metrics"]["accuracy"] > 0.7 and (tmp_path / "h" / "head.npz").exists()
    text = CliRunner().invoke(main, ["train-head", str(snippets_out), "--label-column", "label",
                                     "--C", "0.01", "--out", str(tmp_path / "h2")]).output
    assert "held out: accuracy" in text and "negative" in text and "positive" in text
    missing = CliRunner().invoke(main, ["train-head", str(snippets_out), "--label-column", "mood"])
    assert missing.exit_code == 2 and "no kept column 'mood'" in missing.output
