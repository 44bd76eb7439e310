"""`embedpipe train-head --level word` / `predict` with a word tagger: entity scoring against
seqeval's known results, a tiny labelled set end to end, and the refusals."""
from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from helpers import embedpipe, make_job, run
from pipeline.commands.tagger import (TaggerOptions, WordEmbedder, entities, entity_scores,
                                      train_tagger)
from pipeline.config import ConfigError
from pipeline.io.output import open_output


# ---- entity scoring: conlleval chunking, seqeval's default mode ----

def test_entities_follow_conlleval_chunking():
    # seqeval's get_entities docstring: ['B-PER', 'I-PER', 'O', 'B-LOC'] -> PER 0-1, LOC 3-3
    assert entities(["B-PER", "I-PER", "O", "B-LOC"]) == {("PER", 0, 1), ("LOC", 3, 3)}
    # an I- after O starts an entity (IOB1 / conlleval's default, not seqeval's strict mode)
    assert entities(["O", "I-PER", "I-PER", "O"]) == {("PER", 1, 2)}
    assert entities(["I-PER"]) == {("PER", 0, 0)}
    # a type change ends one entity and starts another, B- or not
    assert entities(["B-PER", "I-LOC", "I-LOC"]) == {("PER", 0, 0), ("LOC", 1, 2)}
    # B- after B- of the same type: two entities
    assert entities(["B-PER", "B-PER", "I-PER"]) == {("PER", 0, 0), ("PER", 1, 2)}
    # an entity running to the end of the sentence
    assert entities(["O", "B-MISC", "I-MISC"]) == {("MISC", 1, 2)}
    assert entities(["O", "O"]) == set() and entities([]) == set()


def test_entity_scores_match_seqevals_readme_example():
    # seqeval README: f1_score 0.50, accuracy_score 0.80; classification_report
    # MISC 0.00/0.00/0.00 (1), PER 1.00/1.00/1.00 (1), micro avg 0.50/0.50/0.50 (2)
    y_true = [["O", "O", "O", "B-MISC", "I-MISC", "I-MISC", "O"], ["B-PER", "I-PER", "O"]]
    y_pred = [["O", "O", "B-MISC", "I-MISC", "I-MISC", "I-MISC", "O"], ["B-PER", "I-PER", "O"]]
    s = entity_scores(y_true, y_pred)
    assert (s["precision"], s["recall"], s["f1"], s["support"]) == (0.5, 0.5, 0.5, 2)
    assert s["token_accuracy"] == 0.8
    assert s["per_type"]["MISC"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    assert s["per_type"]["PER"] == {"precision": 1.0, "recall": 1.0, "f1": 1.0, "support": 1}


def test_entity_scores_micro_average_over_types():
    # 3 true (PER, LOC, ORG), 4 guessed of which 2 right: P 2/4, R 2/3, F1 4/7
    y_true = [["B-PER", "I-PER", "O", "B-LOC"], ["B-ORG", "O"]]
    y_pred = [["B-PER", "I-PER", "O", "B-LOC"], ["B-LOC", "B-PER"]]
    s = entity_scores(y_true, y_pred)
    assert (s["precision"], s["recall"], s["f1"]) == (0.5, round(2 / 3, 4), round(4 / 7, 4))
    assert s["per_type"]["ORG"]["recall"] == 0.0 and s["per_type"]["ORG"]["precision"] == 0.0
    assert s["per_type"]["LOC"] == {"precision": 0.5, "recall": 1.0, "f1": round(2 / 3, 4),
                                    "support": 1}
    with pytest.raises(ValueError):
        entity_scores([["O"]], [["O", "O"]])


# ---- a tiny labelled set, end to end ----

NAMES = [("John Smith", ["B-PER", "I-PER"]), ("Mary", ["B-PER"]),
         ("O'Neil", ["B-PER", "I-PER", "I-PER"]),  # the pre-tokenizer splits O ' Neil
         ("Ana Lopez", ["B-PER", "I-PER"])]
PLACES = [("Paris", ["B-LOC"]), ("New York", ["B-LOC", "I-LOC"]), ("Oslo", ["B-LOC"])]
TEMPLATES = [
    [("Yesterday", ["O"]), "N", ("visited", ["O"]), "P", (".", ["O"])],
    ["N", ("lives", ["O"]), ("in", ["O"]), "P", (",", ["O"]), ("says", ["O"]), "N"],
    [("The", ["O"]), ("train", ["O"]), ("to", ["O"]), "P", ("was", ["O"]), ("late", ["O"])],
]


def tiny_set(n: int = 36):
    rng = np.random.default_rng(0)
    texts, tags = [], []
    for i in range(n):
        parts, row = [], []
        for unit in TEMPLATES[i % len(TEMPLATES)]:
            pool = NAMES if unit == "N" else PLACES if unit == "P" else None
            surface, t = pool[rng.integers(len(pool))] if pool else unit
            parts.append(surface)
            row += t
        texts.append(" ".join(parts))
        tags.append(row)
    return texts, tags


@pytest.fixture(scope="module")
def word_run(tmp_path_factory, tiny_model):
    folder = tmp_path_factory.mktemp("tagger")
    texts, tags = tiny_set()
    ids = [f"s{i:03d}" for i in range(len(texts))]
    pq.write_table(pa.table({"id": ids, "text": texts}), folder / "texts.parquet")
    pq.write_table(pa.table({"id": ids, "tags": tags}), folder / "labels.parquet")
    out = folder / "out"
    run(make_job(folder / "texts.parquet", out, tiny_model, model={"max_length": 32},
                 encode={"pooling": "mean", "layers": [-2, -1], "layer_combine": "concat",
                         "batch_tokens": 256},
                 output={"granularity": "word", "rows_per_file": 200}))
    return folder, out, texts, tags


@pytest.mark.slow
def test_train_and_predict_tags_words(word_run):
    folder, out, texts, tags = word_run
    head = folder / "head"
    done = embedpipe("train-head", out, "--level", "word", "--labels", folder / "labels.parquet",
                     "--label-column", "tags", "--C", "1", "--out", head, "--json")
    assert done.returncode == 0, done.stderr
    card = json.loads(done.stdout)
    assert card["level"] == "word" and set(card["classes"]) == {"O", "B-PER", "I-PER", "B-LOC",
                                                                 "I-LOC"}
    assert card["rows"]["labelled"] == len(texts) and card["rows"]["misaligned"] == 0
    assert card["split"]["by"] == "row"
    assert card["split"]["train_rows"] + card["split"]["test_rows"] == len(texts)
    assert card["rows"]["words"] == sum(map(len, tags))
    assert 0 <= card["metrics"]["f1"] <= 1 and "PER" in card["metrics"]["per_type"]
    assert (head / "head.json").exists() and (head / "head.npz").exists()
    assert "level" in (head / "head.json").read_text()

    pred = folder / "pred.parquet"
    done = embedpipe("predict", head, folder / "texts.parquet", "--out", pred)
    assert done.returncode == 0, done.stderr
    table = pq.read_table(pred)
    assert table.num_rows == sum(map(len, tags))  # one row a word
    assert table.column_names == ["id", "position", "word", "char_start", "char_end",
                                  "predicted", "probability"]
    assert set(table.column("predicted").to_pylist()) <= set(card["classes"])
    stored = open_output(str(out)).tokens(["id", "position", "token", "char_start", "char_end"])
    for column, theirs in (("id", "id"), ("position", "position"), ("word", "token"),
                           ("char_start", "char_start"), ("char_end", "char_end")):
        assert table.column(column).to_pylist() == stored.column(theirs).to_pylist()
    words = table.column("word").to_pylist()
    assert "O" in words and "'" in words and "Neil" in words  # O'Neil as the tokenizer splits it


@pytest.mark.slow
def test_predicts_word_vectors_equal_the_stored_ones(word_run):
    from pipeline.commands.query import EmbeddingRecord

    _, out, texts, _ = word_run
    output = open_output(str(out))
    embedder = WordEmbedder(EmbeddingRecord.from_manifest(output.manifest))
    rows, vectors = embedder.embed(texts[::-1])  # another order: other batches, same vectors
    stored = output.tokens(["id", "token"])
    stored_vectors = output.token_vectors()
    n = len(texts)
    back = np.argsort(np.arange(n)[::-1][rows.owner], kind="stable")
    assert vectors.shape == stored_vectors.shape
    np.testing.assert_allclose(vectors[back], stored_vectors, atol=1e-5)
    assert [rows.token[i] for i in back] == stored.column("token").to_pylist()


@pytest.mark.slow
def test_refusals(word_run, tmp_path, tiny_model):
    folder, out, texts, tags = word_run
    labels = folder / "labels.parquet"
    # a folder without a word token table
    text_out = tmp_path / "text-level"
    run(make_job(folder / "texts.parquet", text_out, tiny_model, model={"max_length": 32}))
    done = embedpipe("train-head", text_out, "--level", "word", "--labels", labels,
                     "--label-column", "tags")
    assert done.returncode == 2 and "no word token table" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    with pytest.raises(ConfigError, match="no word token table"):
        train_tagger(str(text_out), TaggerOptions(str(labels)))

    # tag lists whose length differs from the word count: refused, counted; skipped on request
    bad = [t + ["O"] if i in (3, 7) else t for i, t in enumerate(tags)]
    ids = pq.read_table(labels).column("id")
    pq.write_table(pa.table({"id": ids, "tags": bad}), tmp_path / "bad.parquet")
    done = embedpipe("train-head", out, "--level", "word", "--labels", tmp_path / "bad.parquet",
                     "--label-column", "tags", "--C", "1", "--out", tmp_path / "h1")
    assert done.returncode == 2 and "2 of 36 labelled rows" in done.stderr
    assert "--skip-misaligned" in done.stderr and not (tmp_path / "h1").exists()
    card = train_tagger(str(out), TaggerOptions(str(tmp_path / "bad.parquet"), C=1.0,
                                                skip_misaligned=True), str(tmp_path / "h2"))
    assert card["rows"]["misaligned"] == 2 and card["rows"]["labelled"] == 34

    # tags that are not BIO; a label column that is not a list
    odd = [["X"] + t[1:] for t in tags]
    pq.write_table(pa.table({"id": ids, "tags": odd}), tmp_path / "odd.parquet")
    with pytest.raises(ConfigError, match="tags are BIO"):
        train_tagger(str(out), TaggerOptions(str(tmp_path / "odd.parquet")))
    pq.write_table(pa.table({"id": ids, "tags": ["O"] * len(ids)}), tmp_path / "flat.parquet")
    with pytest.raises(ConfigError, match="not a list of tags"):
        train_tagger(str(out), TaggerOptions(str(tmp_path / "flat.parquet")))

    # a word head is not a text classifier, and --level word wants --labels
    from pipeline.commands.heads import predict_file
    with pytest.raises(ConfigError, match="word-level head"):
        predict_file(str(tmp_path / "h2"), str(folder / "texts.parquet"), str(tmp_path / "p"))
    done = embedpipe("train-head", out, "--level", "word", "--label-column", "tags")
    assert done.returncode == 2 and "--labels" in done.stderr


@pytest.mark.slow
def test_c_by_cross_validation_grouped_by_row(word_run, tmp_path):
    folder, out, texts, _ = word_run
    card = train_tagger(str(out), TaggerOptions(str(folder / "labels.parquet")),
                        str(tmp_path / "cv"))
    assert card["model"]["C_from"].startswith("3-fold CV grouped by row")
    assert card["model"]["C"] in (0.001, 0.01, 0.1, 1.0)
    assert card["split"]["test_rows"] == int(np.ceil(0.2 * len(texts)))
    with pytest.raises(ConfigError, match="too few"):
        train_tagger(str(out), TaggerOptions(str(folder / "labels.parquet"), test_fraction=0.95))
