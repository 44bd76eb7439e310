"""A word-level tagger head: logistic regression on the stored word vectors of a token-level run
(`output.granularity = "word"`), trained on CoNLL-style tag lists, evaluated by entities.

Labels are a Parquet file with an id and a list of tags per row, one tag a word, aligned to the
words the tokenizer's pre-tokenizer splits (the rows of the folder's token table). The split is by
row (a document's words are all on one side), C is chosen by cross-validation grouped by row, and
the held-out rows are scored by entity-level precision / recall / F1 with conlleval's (and
seqeval's default) chunking: an entity is a B-X I-X* span, an I-X after O or after another type
starts a new one; micro-averaged over types. The head is saved like a sentence head (head.npz +
head.json, no pickle) with `"level": "word"` on its card; `predict` embeds new texts through the
run's token-level path (the same tokenizer spans, the same word vectors) and tags each word.
"""
from __future__ import annotations

import posixpath
import re
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from ..config import ConfigError
from ..io.manifest import MANIFEST, read_manifest
from ..io.output import open_output
from ..io.storage import Store
from ..io.vectors import to_matrix
from ..io.writer import ResultFile
from .heads import (C_GRID, HEADS_DIR, PREDICT_BATCH, _read_labels, fit_logistic, head_card,
                    load_head, save_head, score_table)
from .query import EmbeddingRecord, TextEmbedder, read_text_batches

TAG = re.compile(r"^(O|[BI]-.+)$")


# ---- entity-level scoring (conlleval / seqeval default mode, BIO tags) ----

def _split(tag: str) -> tuple[str, str]:
    return ("O", "") if tag == "O" else (tag[0], tag[2:])


def entities(tags: list[str]) -> set[tuple[str, int, int]]:
    """The entities of one sentence's tags: (type, first word, last word), conlleval chunking.

    >>> sorted(entities(["B-PER", "I-PER", "O", "I-LOC", "B-LOC", "I-ORG"]))
    [('LOC', 3, 3), ('LOC', 4, 4), ('ORG', 5, 5), ('PER', 0, 1)]
    """
    found, start = set(), None
    prev_prefix, prev_kind = "O", ""
    for i, tag in enumerate(list(tags) + ["O"]):
        prefix, kind_i = _split(tag)
        ends = prev_prefix != "O" and (prefix in ("B", "O") or kind_i != prev_kind)
        if ends and start is not None:
            found.add((prev_kind, start, i - 1))
            start = None
        starts = prefix == "B" or (prefix == "I" and (prev_prefix == "O" or kind_i != prev_kind))
        if starts:
            start = i
        prev_prefix, prev_kind = prefix, kind_i
    return found


def _prf(correct: int, guessed: int, true: int) -> dict[str, float]:
    p = correct / guessed if guessed else 0.0
    r = correct / true if true else 0.0
    f = 2 * p * r / (p + r) if p + r else 0.0
    return {"precision": round(p, 4), "recall": round(r, 4), "f1": round(f, 4), "support": true}


def entity_scores(y_true: list[list[str]], y_pred: list[list[str]]) -> dict[str, Any]:
    """Entity precision / recall / F1 micro-averaged over types, per type, and token accuracy,
    as seqeval's classification_report (default mode) and accuracy_score give them."""
    if len(y_true) != len(y_pred) or any(len(a) != len(b) for a, b in zip(y_true, y_pred)):
        raise ValueError("true and predicted tag lists differ in length")
    per: dict[str, list[int]] = {}  # type -> [correct, guessed, true]
    for true, pred in zip(y_true, y_pred):
        t, p = entities(true), entities(pred)
        for kind, *_ in t:
            per.setdefault(kind, [0, 0, 0])[2] += 1
        for kind, *_ in p:
            per.setdefault(kind, [0, 0, 0])[1] += 1
        for kind, *_ in t & p:
            per[kind][0] += 1
    total = [sum(v[i] for v in per.values()) for i in range(3)]
    words = sum(map(len, y_true))
    right = sum(a == b for ta, pa_ in zip(y_true, y_pred) for a, b in zip(ta, pa_))
    return {**_prf(*total), "per_type": {k: _prf(*per[k]) for k in sorted(per)},
            "token_accuracy": round(right / words, 4) if words else 0.0}


# ---- training ----

@dataclass(frozen=True)
class TaggerOptions:
    labels: str  # Parquet file or folder: id + a list of tags per row
    label_column: str = "tags"
    id_column: str = "id"
    test_fraction: float = 0.2
    seed: int = 0
    C: float | None = None
    skip_misaligned: bool = False  # leave out rows whose tag count differs from their word count


@dataclass
class WordSet:
    vectors: np.ndarray  # [words, width], row after row
    tags: list[list[str]]  # per labelled row
    ids: list  # per labelled row
    offsets: np.ndarray  # int64 [rows + 1]: row r's words are vectors[offsets[r]:offsets[r+1]]
    rows: dict[str, int]


def load_word_set(out: str, opts: TaggerOptions) -> WordSet:
    """The token table's word vectors, grouped by row, joined by id to their tag lists."""
    output = open_output(out)
    if output.token_parts is None or \
            (output.manifest.vector_settings or {}).get("output.granularity") != "word":
        raise ConfigError(f"{out} holds no word token table; run the job with [output] "
                          f"granularity = \"word\" first")
    lookup = _read_labels(opts.labels, opts.id_column, opts.label_column)
    ids, blocks = [], []
    for table in output.token_batches(["id", "vector"]):
        ids += table.column("id").to_pylist()
        blocks.append(to_matrix(table.column("vector")))
    vectors = np.concatenate(blocks) if blocks else np.zeros((0, 0), np.float32)
    bounds = np.flatnonzero(np.r_[True, [a != b for a, b in zip(ids, ids[1:])], True]) \
        if ids else np.zeros(1, np.int64)
    rows = {"rows": len(bounds) - 1, "labelled": 0, "no_label_row": 0, "null_tags": 0,
            "misaligned": 0, "words": 0}
    keep, tags, kept_ids, misaligned = [], [], [], []
    for r in range(len(bounds) - 1):
        row_id, n_words = ids[bounds[r]], int(bounds[r + 1] - bounds[r])
        value = lookup.get(row_id, _NONE)
        if value is _NONE:
            rows["no_label_row"] += 1
            continue
        if value is None:
            rows["null_tags"] += 1
            continue
        if not isinstance(value, list):
            raise ConfigError(f"{opts.labels}: column {opts.label_column!r} is not a list of tags "
                              f"per row (id {row_id!r} has {type(value).__name__})")
        if len(value) != n_words:
            misaligned.append((row_id, n_words, len(value)))
            continue
        bad = [t for t in value if not isinstance(t, str) or not TAG.match(t)]
        if bad:
            raise ConfigError(f"{opts.labels}: id {row_id!r} has tag {bad[0]!r}; tags are BIO "
                              f"(O, B-TYPE, I-TYPE)")
        keep.append(r)
        tags.append(value)
        kept_ids.append(row_id)
    rows["misaligned"] = len(misaligned)
    if misaligned and not opts.skip_misaligned:
        first = misaligned[0]
        raise ConfigError(
            f"{len(misaligned)} of {len(misaligned) + len(keep)} labelled rows have a tag list "
            f"whose length differs from their word count (first: id {first[0]!r}, {first[1]} "
            f"words, {first[2]} tags); tags must align to the tokenizer's words (texts past "
            f"max_length lose words); pass --skip-misaligned to leave those rows out")
    if len(keep) < 2:
        raise ConfigError(f"{len(keep)} rows have aligned tags (of {rows['rows']} rows in the "
                          f"token table; {rows['no_label_row']} without a label row); a tagger "
                          f"needs more (are the id columns of the same kind?)")
    offsets = np.r_[0, np.cumsum([bounds[r + 1] - bounds[r] for r in keep])].astype(np.int64)
    picked = np.concatenate([np.arange(bounds[r], bounds[r + 1]) for r in keep])
    rows["labelled"], rows["words"] = len(keep), int(offsets[-1])
    return WordSet(vectors[picked], tags, kept_ids, offsets, rows)


class _None:
    def __repr__(self) -> str:
        return "<no label row>"


_NONE = _None()


def _rows_of(data: WordSet, rows: np.ndarray) -> np.ndarray:
    return np.concatenate([np.arange(data.offsets[r], data.offsets[r + 1]) for r in rows])


def train_tagger(out: str, opts: TaggerOptions, dest: str | None = None) -> dict[str, Any]:
    """Train on OUT's word vectors, score the held-out rows by entities, save; returns the card
    (also DEST/head.json; DEST defaults to OUT/heads/<label column>)."""
    started = time.perf_counter()
    if not 0 < opts.test_fraction < 1:
        raise ConfigError(f"--test-fraction must be between 0 and 1, got {opts.test_fraction}")
    record = EmbeddingRecord.from_manifest(read_manifest(Store(out)), f"{out}/{MANIFEST}")
    data = load_word_set(out, opts)
    n = len(data.tags)
    order = np.random.default_rng(opts.seed).permutation(n)
    n_test = int(np.ceil(opts.test_fraction * n))
    if n_test >= n:
        raise ConfigError(f"{n} labelled rows with test fraction {opts.test_fraction} leave none "
                          f"to train on")
    test, train = np.sort(order[:n_test]), np.sort(order[n_test:])
    flat = [t for row in data.tags for t in row]
    train_words = _rows_of(data, train)
    y_train = [flat[i] for i in train_words]
    classes = sorted(set(y_train))
    if len(classes) < 2:
        raise ConfigError(f"the training rows hold one tag ({classes[0]!r}); a tagger needs at "
                          f"least two")
    if opts.C is None and len(train) < 3:
        raise ConfigError(f"{len(train)} training rows are too few to choose C by 3-fold "
                          f"cross-validation; give --C")
    groups = np.repeat(np.arange(n), np.diff(data.offsets))[train_words]
    model, C = fit_logistic(data.vectors[train_words], y_train, opts.C, opts.seed, groups,
                            max_iter=1000)
    predicted = model.predict(data.vectors[_rows_of(data, test)]).tolist()
    lengths = np.diff(data.offsets)[test]
    y_pred = np.split(np.array(predicted, dtype=object), np.cumsum(lengths)[:-1])
    metrics = entity_scores([data.tags[r] for r in test], [list(p) for p in y_pred])
    card = head_card(out, opts, record, model, data, metrics, started, {
        "level": "word", "labels": opts.labels,
        "split": {"by": "row", "test_fraction": opts.test_fraction, "seed": opts.seed,
                  "train_rows": len(train), "test_rows": len(test),
                  "train_words": len(train_words), "test_words": len(predicted)},
        "model": {"C": C, "C_from": "given" if opts.C else
                  f"3-fold CV grouped by row over {list(C_GRID)}", "standardized": True,
                  "multinomial": True, "max_iter": 1000}})
    save_head(dest or posixpath.join(out, HEADS_DIR, opts.label_column), model, card)
    return card


def render_tagger_card(card: dict[str, Any]) -> str:
    m, rows, split = card["metrics"], card["rows"], card["split"]
    lines = [
        f"tagger: logistic regression per word on {card['label_column']!r}, "
        f"{len(card['classes'])} tags, {card['dimension']}-d word vectors "
        f"(settings {card['settings_hash']})",
        f"  rows: {rows['labelled']:,} labelled ({rows['words']:,} words) of {rows['rows']:,}; "
        f"left out: {rows['misaligned']:,} misaligned, {rows['null_tags']:,} null, "
        f"{rows['no_label_row']:,} without a label row",
        f"  split by row: {split['train_rows']:,} train / {split['test_rows']:,} held out "
        f"({split['test_words']:,} words, seed {split['seed']}); C {card['model']['C']} "
        f"({card['model']['C_from']})",
        f"  held out: entity precision {m['precision']:.4f}, recall {m['recall']:.4f}, "
        f"F1 {m['f1']:.4f} (micro, conlleval chunks); token accuracy {m['token_accuracy']:.4f}",
    ]
    return "\n".join(lines + score_table("type", m["per_type"]))


# ---- prediction ----

class WordEmbedder:
    """Word vectors for new texts, made as a recorded word-level run made them: the run's
    tokenizer spans (`with_spans`), its words (`token_rows`), its layer mix (`TokenEncoder`),
    first or mean sub-token pooling, rounded through the stored vector dtype."""

    def __init__(self, record: EmbeddingRecord, device: str | None = None):
        self.text = TextEmbedder(record, device)  # refuses other settings before loading
        from ..encode.token_output import TokenPolicy

        self.policy = TokenPolicy.for_job(self.text.job)
        if self.policy is None or self.policy.granularity != "word":
            raise ConfigError("the record is not of a word-level run (output.granularity)")
        self._encode = None

    @property
    def settings_hash(self) -> str:
        return self.text.settings_hash

    def embed(self, texts: list[str]):
        """(TokenRows of the texts' words, float32 [words, width])."""
        from ..encode.batching import collate, plan_batches
        from ..encode.token_output import TokenEncoder, gather, token_rows

        tokenizer, encoder = self.text._load()
        if self._encode is None:
            self._encode = TokenEncoder(encoder)
        tokens = tokenizer.with_spans(list(texts))
        rows = token_rows(list(texts), tokens.spans, self.policy)
        enc = self.text.job.encode
        lengths = np.fromiter(map(len, tokens.ids), np.int64, count=len(tokens.ids))
        states: list = [None] * len(texts)
        for positions in plan_batches(lengths, enc.token_budget(encoder.device.type),
                                      enc.max_batch_size):
            batch = collate(tokens.ids, positions, tokenizer.pad_id, encoder.runtime.pad_multiple)
            for p, s in zip(positions, self._encode(batch)[1]):
                states[p] = s
        vectors = gather(states, rows, self.policy.mean)
        dtype = np.dtype(self.text.job.output.vector_dtype)
        return rows, (vectors.astype(dtype).astype(np.float32) if dtype != vectors.dtype
                      else vectors)


def predict_tags(head_path: str, inputs: str, out: str, text_column: str | None = None,
                 id_column: str | None = None, device: str | None = None) -> dict[str, Any]:
    """Tag the words of INPUTS' texts with a word-level head; OUT has one row a word: id,
    position, word, char_start, char_end, predicted, probability (of the predicted tag)."""
    head = load_head(head_path)
    if head.card.get("level") != "word":
        raise ConfigError(f"{head_path} is a text-level head, not a word tagger")
    record = EmbeddingRecord(**head.card["embedding"])
    embedder = WordEmbedder(record, device)
    if embedder.settings_hash != head.card["settings_hash"]:
        raise ConfigError(
            f"{head_path} was trained on vectors with settings hash {head.card['settings_hash']}, "
            f"but this machine's embedding settings hash to {embedder.settings_hash}; refusing")
    columns = record.columns(text_column, id_column)
    counts: dict[str, Any] = {"texts": 0, "words": 0, "skipped_blank": 0,
                              "columns": columns.describe()}
    with ResultFile(out, f"{inputs}: no texts to tag") as results:
        for batch in read_text_batches(inputs, columns, PREDICT_BATCH):
            counts["skipped_blank"] += batch.skipped
            if not batch.texts:
                continue
            rows, vectors = embedder.embed(batch.texts)
            counts["texts"] += len(batch.texts)
            if not len(rows):
                continue
            proba = head.predict_proba(vectors)
            best = proba.argmax(1)
            results.write(pa.table({
                "id": batch.ids.take(pa.array(rows.owner, pa.int64())),
                "position": pa.array(rows.position, pa.int32()),
                "word": pa.array(rows.token, pa.string()),
                "char_start": pa.array(rows.char_start, pa.int32()),
                "char_end": pa.array(rows.char_end, pa.int32()),
                "predicted": pa.array([head.classes[i] for i in best], pa.string()),
                "probability": pa.array(proba[np.arange(len(best)), best], pa.float32()),
            }))
            counts["words"] += len(rows)
    return counts


__all__ = ["TaggerOptions", "WordEmbedder", "entities", "entity_scores", "predict_tags",
           "render_tagger_card", "train_tagger"]
