"""Classification heads on stored vectors: logistic regression (scikit-learn), saved with a card.

A head folder holds `head.npz` (the weights, as plain arrays: no pickle) and `head.json` (the
card: the embedding record of the vectors it was trained on, the label names, the split and the
held-out metrics). `predict` embeds new texts with the recorded settings and refuses a head whose
embedding record differs from what this machine would produce.

On a quantized folder (output.precision int8 / uint8 / binary / ubinary) the head trains on
the stored values read back as floats (`Precision.dequantize`); the card records the precision
and its ranges, and `predict` quantizes and reads back new texts' vectors the same way.
"""
from __future__ import annotations

import io
import logging
import posixpath
import time
import warnings
import zipfile
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from ..config import STORED_COLUMNS, ConfigError
from ..io.ledger import Ledger
from ..io.manifest import MANIFEST, read_manifest
from ..io.precision import CALIBRATED, Calibration, Precision, stored_precision
from ..io.reader import list_input_files, open_parquet
from ..io.storage import Store
from ..io.vectors import VectorParts, to_matrix
from ..io.writer import ResultFile
from ..encode.chunking import pool_windows
from ..version import __version__
from .query import EmbeddingRecord, TextEmbedder, read_text_batches

log = logging.getLogger(__name__)

CARD = "head.json"
WEIGHTS = "head.npz"
HEADS_DIR = "heads"
PREDICT_BATCH = 4096
C_GRID = (0.001, 0.01, 0.1, 1.0)  # inverse regularisation strengths tried by cross-validation


@dataclass(frozen=True)
class HeadOptions:
    label_column: str
    labels: str | None = None  # Parquet file or folder with id + label; None: a kept column
    id_column: str = "id"
    test_fraction: float = 0.2
    seed: int = 0
    C: float | None = None  # inverse regularisation (standardised features); None: by CV
    pool: bool = False  # a folder of one row a token window: train on documents' pooled windows


@dataclass
class TrainingSet:
    vectors: np.ndarray
    labels: list[str]
    rows: dict[str, int]  # vectors, labelled, null_label (left out), no_label_row (left out)
    precision: Precision = Precision()  # what the folder stores; vectors are its floats


def _read_labels(path: str, id_column: str, label_column: str) -> dict:
    fs, files = list_input_files(path)
    labels: dict = {}
    for file in files:
        parquet = open_parquet(fs, file)
        missing = [c for c in (id_column, label_column) if c not in parquet.schema_arrow.names]
        if missing:
            raise ConfigError(f"{file}: no column {missing[0]!r}; it has: "
                              f"{', '.join(parquet.schema_arrow.names)}")
        table = parquet.read(columns=[id_column, label_column])
        before = len(labels)
        labels.update(zip(table.column(id_column).to_pylist(), table.column(label_column).to_pylist()))
        if len(labels) - before != table.num_rows:
            raise ConfigError(f"{path}: the id column {id_column!r} repeats ids; one label per id")
    return labels


def load_training_set(out: str, opts: HeadOptions) -> TrainingSet:
    """The stored vectors joined by id to their labels; rows without a label are counted out."""
    store = Store(out)
    manifest = read_manifest(store)
    precision = stored_precision(manifest)
    parts = VectorParts(store, Ledger(store).vector_files())
    if not parts.files:
        raise ConfigError(f"{out} holds no vectors")
    stored = parts.metadata(parts.files[0]).schema.to_arrow_schema().names
    if opts.labels is None:
        if opts.label_column not in stored:
            raise ConfigError(
                f"{out}: no kept column {opts.label_column!r} (kept: "
                f"{', '.join(c for c in stored if c not in STORED_COLUMNS) or 'none'}); give --labels PATH, or keep the column with "
                f"[output] keep_columns")
        columns, lookup = ["id", "vector", opts.label_column], None
    else:
        columns, lookup = ["id", "vector"], _read_labels(opts.labels, opts.id_column,
                                                         opts.label_column)
    windows = "chunk" in stored  # one row a token window: pooled per document, on request
    if windows and not opts.pool:
        raise ConfigError(
            f"{out} holds one row a token window (output.chunks = 'rows'); a head classifies "
            f"documents: give --pool to train on each document's windows averaged by their "
            f"tokens (predict then embeds new texts the same way)")
    if windows and precision.quantized:
        raise ConfigError(
            f"{out} stores {precision.name} token windows; --pool averages float windows, which "
            f"predict could not reproduce from quantized ones: run the job with output.chunks = "
            f"'pool' (one quantized vector a document) or precision float32")
    if windows:
        columns.append("n_tokens")
    ids, blocks, values, weights = [], [], [], []
    for table in parts.read(columns):
        ids += table.column("id").to_pylist()
        blocks.append(to_matrix(table.column("vector")))
        values += (table.column(opts.label_column).to_pylist() if lookup is None else
                   [lookup.get(i, _MISSING) for i in table.column("id").to_pylist()])
        if windows:
            weights.append(table.column("n_tokens").to_numpy())
    vectors = np.concatenate(blocks)
    if precision.quantized:  # a head takes floats: the stored values read back
        vectors = precision.dequantize(vectors, manifest.dim or 0)
    if windows:  # a document's windows are consecutive rows
        owner = np.cumsum([0] + [a != b for a, b in zip(ids, ids[1:])])
        first = np.flatnonzero(np.r_[True, owner[1:] != owner[:-1]])
        normalize = bool((manifest.vector_settings or {}).get("encode.normalize"))
        vectors = pool_windows(vectors, owner, np.concatenate(weights), normalize)
        ids, values = [ids[i] for i in first], [values[i] for i in first]
    rows = {"vectors": len(ids), "labelled": 0,
            "no_label_row": sum(v is _MISSING for v in values),
            "null_label": sum(v is None for v in values)}
    keep = [i for i, v in enumerate(values) if v is not None and v is not _MISSING]
    labels = [str(values[i]) for i in keep]
    rows["labelled"] = len(labels)
    if not labels:
        raise ConfigError(
            f"no stored vector has a label: {rows['no_label_row']} ids found no label row and "
            f"{rows['null_label']} labels are null (are the id columns of the same kind?)")
    return TrainingSet(vectors[keep], labels, rows, precision)


class _Missing:
    def __repr__(self) -> str:
        return "<no label row>"


_MISSING = _Missing()


def _check_classes(labels: list[str], test_fraction: float, column: str) -> list[str]:
    classes, counts = np.unique(labels, return_counts=True)
    if len(classes) < 2:
        raise ConfigError(f"label column {column!r} has one class ({classes[0]!r}) among "
                          f"{len(labels)} labelled rows; a classifier needs at least two")
    rare = [f"{c!r} ({n})" for c, n in zip(classes, counts) if n < 2]
    if rare:
        raise ConfigError(f"label column {column!r}: classes with fewer than 2 rows cannot be "
                          f"split stratified: {', '.join(rare)}")
    if not 0 < test_fraction < 1:
        raise ConfigError(f"--test-fraction must be between 0 and 1, got {test_fraction}")
    n_test = int(np.ceil(test_fraction * len(labels)))
    if n_test < len(classes) or len(labels) - n_test < len(classes):
        raise ConfigError(f"{len(labels)} labelled rows with test fraction {test_fraction} leave "
                          f"fewer rows than the {len(classes)} classes in one side of the split")
    return classes.tolist()


def fit_logistic(x: np.ndarray, y: list[str], C: float | None, seed: int,
                 groups: np.ndarray | None = None, max_iter: int = 2000):
    """Standardise, fit (C by 3-fold CV on these rows when not given: stratified, or grouped so
    no group straddles folds, e.g. a text's words), and fold the scaling into the weights: one
    plain LogisticRegression that takes raw vectors."""
    from sklearn.linear_model import LogisticRegression, LogisticRegressionCV
    from sklearn.model_selection import GroupKFold, StratifiedKFold

    mean, scale = x.mean(0, dtype=np.float64), x.std(0, dtype=np.float64)
    scale[scale < 1e-12] = 1.0
    z = ((x - mean) / scale).astype(np.float32)
    if C is None:
        folds = (StratifiedKFold(3, shuffle=True, random_state=seed) if groups is None
                 else list(GroupKFold(3).split(z, y, groups)))
        with warnings.catch_warnings():  # scikit-learn 1.9 announces attribute changes
            warnings.simplefilter("ignore", FutureWarning)
            cv = LogisticRegressionCV(Cs=C_GRID, cv=folds, max_iter=max_iter, random_state=seed,
                                      scoring="accuracy").fit(z, y)
        C = float(np.ravel(cv.C_)[0])
    model = LogisticRegression(C=C, max_iter=max_iter, random_state=seed).fit(z, y)
    model.coef_ = model.coef_ / scale
    model.intercept_ = model.intercept_ - model.coef_ @ mean
    return model, C


def evaluate(y_true: list[str], y_pred: list[str], classes: list[str]) -> dict[str, Any]:
    from sklearn.metrics import accuracy_score, f1_score, precision_recall_fscore_support

    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=classes, zero_division=0)
    majority = max(classes, key=lambda c: sum(t == c for t in y_true))
    return {
        "accuracy": round(float(accuracy_score(y_true, y_pred)), 4),
        "macro_f1": round(float(f1_score(y_true, y_pred, labels=classes, average="macro",
                                         zero_division=0)), 4),
        "majority_class_accuracy": round(sum(t == majority for t in y_true) / len(y_true), 4),
        "per_class": {c: {"precision": round(float(p), 4), "recall": round(float(r), 4),
                          "f1": round(float(f), 4), "support": int(s)}
                      for c, p, r, f, s in zip(classes, precision, recall, f1, support)},
    }


def train_head(out: str, opts: HeadOptions, dest: str | None = None) -> dict[str, Any]:
    """Train on the stored vectors of OUT, evaluate on a stratified held-out part, save.

    Returns the card (also written to DEST/head.json); DEST defaults to OUT/heads/<label>."""
    from sklearn.model_selection import train_test_split

    started = time.perf_counter()
    record = EmbeddingRecord.from_manifest(read_manifest(Store(out)), f"{out}/{MANIFEST}")
    data = load_training_set(out, opts)
    classes = _check_classes(data.labels, opts.test_fraction, opts.label_column)
    x_train, x_test, y_train, y_test = train_test_split(
        data.vectors, data.labels, test_size=opts.test_fraction, random_state=opts.seed,
        stratify=data.labels)
    model, C = fit_logistic(x_train, y_train, opts.C, opts.seed)
    metrics = evaluate(y_test, model.predict(x_test).tolist(), classes)
    card = head_card(out, opts, record, model, data, metrics, started, {
        "labels": opts.labels or f"kept column {opts.label_column!r}",
        "pooled_windows": opts.pool,
        "precision": precision_record(data.precision),
        "split": {"stratified": True, "test_fraction": opts.test_fraction, "seed": opts.seed,
                  "train": len(y_train), "test": len(y_test)},
        "model": {"C": C, "C_from": "given" if opts.C else f"3-fold CV over {list(C_GRID)}",
                  "standardized": True, "max_iter": 2000}})
    save_head(dest or posixpath.join(out, HEADS_DIR, opts.label_column), model, card)
    return card


def head_card(out: str, opts, record, model, data, metrics: dict, started: float,
              own: dict[str, Any]) -> dict[str, Any]:
    """head.json: what every head records (its source folder, embedding, classes, metrics,
    versions), with the kind's own entries (`own`: labels, split, model settings)."""
    import sklearn

    return {"format": 1, "kind": "logistic-regression", "source": out,
            "label_column": opts.label_column, "id_column": opts.id_column, **own,
            "classes": [str(c) for c in model.classes_],
            "embedding": record.to_dict(), "settings_hash": record.settings_hash,
            "dimension": int(data.vectors.shape[1]), "rows": data.rows, "metrics": metrics,
            "train_seconds": round(time.perf_counter() - started, 3),
            "versions": {"embedpipe": __version__, "scikit-learn": sklearn.__version__}}


def precision_record(precision: Precision) -> dict[str, Any]:
    """The card's record of what the head's vectors were: the folder's precision and, for int8 /
    uint8, its ranges (predict quantizes new vectors with them)."""
    calibration = precision.calibration
    return {"name": precision.name,
            "calibration": calibration.to_json() if calibration is not None else None}


def save_head(dest: str, model, card: dict[str, Any]) -> None:
    store = Store(dest)
    buffer = io.BytesIO()
    np.savez(buffer, coef=model.coef_, intercept=model.intercept_,
             classes=np.array([str(c) for c in model.classes_]))
    store.write_bytes(WEIGHTS, buffer.getvalue())
    store.write_json(CARD, card)  # last: a folder with a card has its weights


@dataclass
class Head:
    card: dict[str, Any]
    model: Any  # sklearn LogisticRegression

    @property
    def classes(self) -> list[str]:
        return self.card["classes"]

    @property
    def precision(self) -> Precision:
        return card_precision(self.card)

    def as_trained(self, vectors: np.ndarray) -> np.ndarray:
        """New float vectors as the head saw its training vectors: on a quantized folder's head,
        quantized with the folder's precision and read back."""
        precision = self.precision
        if not precision.quantized:
            return vectors
        return precision.dequantize(precision.store(vectors), vectors.shape[1])

    def predict_proba(self, vectors: np.ndarray) -> np.ndarray:
        return self.model.predict_proba(vectors)


def card_precision(card: dict[str, Any]) -> Precision:
    """The precision of the vectors a head was trained on (heads from before: float32)."""
    record = card.get("precision") or {"name": "float32", "calibration": None}
    calibration = record.get("calibration")
    if record["name"] in CALIBRATED and not calibration:
        raise ValueError(f"precision {record['name']} without its calibration ranges")
    return Precision(record["name"], Calibration.from_json(calibration) if calibration else None)


def load_head(path: str) -> Head:
    from sklearn.linear_model import LogisticRegression

    store = Store(path)
    if not store.exists(CARD) or not store.exists(WEIGHTS):
        raise ConfigError(f"{path}: not a head folder (needs {CARD} and {WEIGHTS}); "
                          "make one with `embedpipe train-head`")
    try:
        card = store.read_json(CARD)
        if not isinstance(card, dict) or card.get("kind") != "logistic-regression":
            raise ValueError("not a head card")
        for key in ("embedding", "settings_hash", "classes"):
            card[key]  # noqa: B018 (a KeyError names what is missing)
        EmbeddingRecord(**card["embedding"])
        card_precision(card)
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}/{CARD} is unreadable ({type(exc).__name__}: {exc}); train the "
                          f"head again with `embedpipe train-head`") from None
    try:
        arrays = np.load(io.BytesIO(store.read_bytes(WEIGHTS)), allow_pickle=False)
        coef, intercept, classes = arrays["coef"], arrays["intercept"], arrays["classes"]
        if coef.ndim != 2 or len(intercept) != len(coef) or len(classes) != max(2, len(coef)) \
                or (len(classes) == 2 and len(coef) != 1):
            raise ValueError(f"weights of shape {coef.shape} for {len(classes)} classes")
    except (ValueError, KeyError, OSError, EOFError, zipfile.BadZipFile) as exc:
        raise ConfigError(f"{path}/{WEIGHTS} is unreadable ({type(exc).__name__}: {exc}); train "
                          f"the head again with `embedpipe train-head`") from None
    model = LogisticRegression()
    model.classes_ = classes.astype(object)
    model.coef_, model.intercept_ = coef, intercept
    model.n_features_in_ = coef.shape[1]
    return Head(card, model)


def predict_file(head_path: str, inputs: str, out: str, text_column: str | None = None,
                 id_column: str | None = None, device: str | None = None,
                 pair_column: str | None = None) -> dict[str, Any]:
    """Embed the texts of INPUTS with the head's recorded settings, write predictions to OUT.
    Columns not given are those the head's job read.

    Columns: id (the input's id column, else the row number), predicted, proba_<class>..."""
    head = load_head(head_path)
    if head.card.get("level", "text") != "text":
        raise ConfigError(f"{head_path} is a {head.card['level']}-level head: it tags words "
                          f"(pipeline.commands.tagger.predict_tags), not texts")
    record = EmbeddingRecord(**head.card["embedding"])
    embedder = TextEmbedder(record, device)  # refuses other settings before the model loads
    if embedder.settings_hash != head.card["settings_hash"]:
        raise ConfigError(
            f"{head_path} was trained on vectors with settings hash {head.card['settings_hash']}, "
            f"but this machine's embedding settings hash to {embedder.settings_hash}; refusing")
    columns = record.columns(text_column, id_column, pair_column)
    counts: dict[str, Any] = {"predicted": 0, "skipped_blank": 0, "columns": columns.describe()}
    with ResultFile(out, f"{inputs}: no texts to predict") as results:
        for batch in read_text_batches(inputs, columns, PREDICT_BATCH):
            counts["skipped_blank"] += batch.skipped
            if not batch.texts:
                continue
            proba = head.predict_proba(head.as_trained(embedder.embed(batch.texts, batch.pairs)))
            table = {"id": batch.ids,
                     "predicted": pa.array([head.classes[i] for i in proba.argmax(1)])}
            table.update({f"proba_{c}": pa.array(proba[:, j], pa.float32())
                          for j, c in enumerate(head.classes)})
            results.write(pa.table(table))
            counts["predicted"] += len(batch.texts)
    return counts


def render_card(card: dict[str, Any]) -> str:
    m, rows, split = card["metrics"], card["rows"], card["split"]
    precision = card_precision(card)
    lines = [
        f"head: logistic regression on {card['label_column']!r}, {len(card['classes'])} classes, "
        f"{card['dimension']}-d vectors (settings {card['settings_hash']})"
        + (f", {precision.name} read back as floats" if precision.quantized else ""),
        f"  rows: {rows['labelled']:,} labelled of {rows['vectors']:,} vectors; left out: "
        f"{rows['null_label']:,} null labels, {rows['no_label_row']:,} without a label row",
        f"  split: stratified, {split['train']:,} train / {split['test']:,} held out "
        f"(seed {split['seed']}); C {card['model']['C']} ({card['model']['C_from']})",
        f"  held out: accuracy {m['accuracy']:.4f}, macro-F1 {m['macro_f1']:.4f} "
        f"(majority class {m['majority_class_accuracy']:.4f})",
    ]
    return "\n".join(lines + score_table("class", m["per_class"]))


def score_table(what: str, scores: dict[str, dict]) -> list[str]:
    """Precision, recall, F1 and support per class (or entity type), one line each."""
    return [f"  {what:<16} {'precision':>9} {'recall':>7} {'f1':>7} {'support':>8}"] + [
        f"  {name[:16]:<16} {c['precision']:>9.4f} {c['recall']:>7.4f} {c['f1']:>7.4f} "
        f"{c['support']:>8,}" for name, c in scores.items()]
