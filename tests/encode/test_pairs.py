"""Sentence pairs (premise / hypothesis, question / passage): each row encoded as
`tokenizer(a, b)` with segment ids, checked against a direct `AutoModel` computation on each pair
alone, for CLS, mean and concat-last-four, under both truncation strategies."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch

from helpers import make_job, matrix, read_vectors, run, write_shards

MAX_LENGTH = 48


@pytest.fixture(scope="module")
def pairs_dir(tmp_path_factory, mixed_texts) -> tuple:
    folder = tmp_path_factory.mktemp("pairs")
    firsts = mixed_texts[:30] + ["a short premise", "another one", "a third"]
    seconds = mixed_texts[30:60] + [None, "   ", "fine hypothesis"]
    write_shards(folder, [pa.table({"id": np.arange(len(firsts)), "premise": firsts,
                                    "hypothesis": seconds})])
    return folder, firsts, seconds


def _run(pairs_dir, out, **encode):
    folder, _, _ = pairs_dir
    job = make_job(folder, out, None, model={"max_length": MAX_LENGTH},
                   input={"text_column": "premise", "text_pair_column": "hypothesis",
                          "pair_truncation": encode.pop("truncation", "longest_first")},
                   encode=encode)
    summary = run(job)
    assert summary.exit_code == 0
    return summary, read_vectors(out)


def _alone(bundled_model, a, b, truncation):
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(bundled_model.path)
    model = AutoModel.from_pretrained(bundled_model.path).eval()
    enc = tokenizer(a, b, truncation=truncation, max_length=MAX_LENGTH, return_tensors="pt")
    with torch.inference_mode():
        states = model(**enc, output_hidden_states=True).hidden_states
    return enc, states


@pytest.mark.parametrize("truncation", ["longest_first", "only_second"])
def test_pair_vectors_equal_tokenizer_pairs_through_automodel(pairs_dir, tmp_path, bundled_model,
                                                              truncation):
    _, firsts, seconds = pairs_dir
    got = {}
    for pooling in ("cls", "mean", "concat-last-four"):
        summary, table = _run(pairs_dir, tmp_path / pooling, pooling=pooling, truncation=truncation)
        got[pooling] = (table.column("id").to_pylist(), matrix(table),
                        table.column("n_tokens").to_pylist())
    assert summary.rejects == {"null pair text": 1, "empty pair text": 1}
    assert summary.truncated >= 1
    ids, _, n_tokens = got["cls"]
    for row, i in enumerate(ids[::4]):
        enc, states = _alone(bundled_model, firsts[i], seconds[i], truncation)
        assert enc["token_type_ids"][0].max() == 1  # the second segment is really there
        mask = enc["attention_mask"][0].bool()
        expected = {"cls": states[-1][0, 0],
                    "mean": states[-1][0][mask].mean(0),
                    "concat-last-four": torch.cat(list(states[-4:]), -1)[0][mask].mean(0)}
        for pooling, vector in expected.items():
            np.testing.assert_allclose(got[pooling][1][4 * row], vector.numpy(), atol=1e-4)
    whole = _alone(bundled_model, firsts[0], seconds[0], False)[0]["input_ids"].shape[1]
    assert n_tokens[0] == whole  # counted before truncation


def test_segment_ids_matter_and_pairs_are_guarded(pairs_dir, tmp_path):
    from pipeline.io.ledger import SettingsMismatch

    folder, firsts, seconds = pairs_dir
    _, paired = _run(pairs_dir, tmp_path / "pairs", pooling="mean")
    joined = [f"{a} {b}" if b and b.strip() else a for a, b in zip(firsts, seconds)]
    write_shards(tmp_path / "joined", [pa.table({"id": np.arange(len(joined)), "premise": joined})])
    job = make_job(tmp_path / "joined", tmp_path / "single", None, model={"max_length": MAX_LENGTH},
                   input={"text_column": "premise"}, encode={"pooling": "mean"})
    assert run(job).exit_code == 0
    single = read_vectors(tmp_path / "single")
    same = paired.column("id").to_pylist()
    assert not np.allclose(matrix(paired), matrix(single.take(pa.array(same))), atol=1e-3)
    job = make_job(tmp_path / "joined", tmp_path / "pairs", None, model={"max_length": MAX_LENGTH},
                   input={"text_column": "premise"}, encode={"pooling": "mean"})
    with pytest.raises(SettingsMismatch, match="input.text_pair"):
        run(job)


def test_predict_and_search_take_the_pair_column(pairs_dir, tmp_path):
    """A head on pair vectors classifies new pairs; search takes pairs as queries; a folder of
    pair vectors refuses single-text queries in one line."""
    from click.testing import CliRunner

    import pyarrow.parquet as pq
    from pipeline.cli import main

    folder, firsts, seconds = pairs_dir
    labels = ["yes" if i % 2 else "no" for i in range(len(firsts))]
    write_shards(tmp_path / "in", [pa.table({"id": np.arange(len(firsts)), "premise": firsts,
                                             "hypothesis": seconds, "label": labels})])
    job = make_job(tmp_path / "in", tmp_path / "out", None, model={"max_length": MAX_LENGTH},
                   input={"text_column": "premise", "text_pair_column": "hypothesis"},
                   encode={"pooling": "mean"}, output={"keep_columns": ["label"]})
    assert run(job).exit_code == 0
    runner = CliRunner()
    trained = runner.invoke(main, ["train-head", str(tmp_path / "out"), "--label-column", "label",
                                   "--out", str(tmp_path / "head"), "--test-fraction", "0.5"])
    assert trained.exit_code == 0, trained.output
    pq.write_table(pa.table({"premise": ["a film", "a book"], "hypothesis": ["it is good", "bad"]}),
                   tmp_path / "new.parquet")
    predicted = runner.invoke(main, ["predict", str(tmp_path / "head"), str(tmp_path / "new.parquet"),
                                     "--out", str(tmp_path / "p.parquet")])
    assert predicted.exit_code == 0, predicted.output
    assert "pair column 'hypothesis'" in predicted.output
    assert pq.read_table(tmp_path / "p.parquet").num_rows == 2
    searched = runner.invoke(main, ["search", str(tmp_path / "out"), "--queries",
                                    str(tmp_path / "new.parquet"), "--out",
                                    str(tmp_path / "hits.parquet"), "-k", "3"])
    assert searched.exit_code == 0, searched.output
    assert pq.read_table(tmp_path / "hits.parquet").num_rows == 6
    single = runner.invoke(main, ["search", str(tmp_path / "out"), "a film"])
    assert single.exit_code == 2 and "sentence pairs" in single.output


def test_a_pair_only_second_cannot_fit_is_a_reject_and_the_rest_is_embedded(tmp_path, mixed_texts):
    """pair_truncation = "only_second" cannot fit a pair whose first text alone is over
    max_length: that row (and its repeat) is a reject naming why, the unit's other rows are
    embedded as a run without those rows embeds them, and the rerun has nothing to do."""
    import json

    import pyarrow.parquet as pq

    from helpers import embedpipe, write_job

    firsts = [t[:120] for t in mixed_texts[:40]]
    seconds = [f"second text {i}: " + t[:200] for i, t in enumerate(mixed_texts[40:80])]
    long_first = "a very long first text " * 40  # ~200 tokens: over max_length alone
    for row in (7, 21):  # the same pair twice: a repeated text refused once tokenized
        firsts[row], seconds[row] = long_first, "its short second"
    table = pa.table({"id": np.arange(40), "premise": firsts, "hypothesis": seconds})
    write_shards(tmp_path / "in", [table])
    good = np.array([i not in (7, 21) for i in range(40)])
    write_shards(tmp_path / "clean", [table.filter(pa.array(good))])
    pair = {"text_column": "premise", "text_pair_column": "hypothesis",
            "pair_truncation": "only_second"}
    job = write_job(tmp_path / "job.toml", tmp_path / "in", tmp_path / "out", None,
                    model={"max_length": MAX_LENGTH}, input=pair)
    result = embedpipe("run", job, "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["rows_read"] == 40 and summary["vectors_written"] == 38
    assert summary["rejects"] == {"pair too long for only_second": 2} and summary["accounted"]
    rejects = pq.read_table(next((tmp_path / "out" / "rejects").glob("*.parquet")))
    assert sorted(zip(rejects.column("row_number").to_pylist(),
                      rejects.column("reason").to_pylist())) == [
        (7, "pair too long for only_second"), (21, "pair too long for only_second")]
    clean = write_job(tmp_path / "clean.toml", tmp_path / "clean", tmp_path / "clean-out", None,
                      model={"max_length": MAX_LENGTH}, input=pair)
    assert embedpipe("run", clean).returncode == 0
    ours, theirs = read_vectors(tmp_path / "out"), read_vectors(tmp_path / "clean-out")
    assert ours.column("id").to_pylist() == theirs.column("id").to_pylist()
    np.testing.assert_array_equal(matrix(ours), matrix(theirs))
    again = embedpipe("run", job, "--json")
    assert again.returncode == 0 and json.loads(again.stdout)["units_skipped"] == 1
    # a query pair that cannot fit is refused in one line, naming it
    pq.write_table(pa.table({"premise": ["a film", long_first], "hypothesis": ["good", "bad"]}),
                   tmp_path / "queries.parquet")
    searched = embedpipe("search", tmp_path / "out", "--queries", tmp_path / "queries.parquet",
                         "--out", tmp_path / "hits.parquet")
    assert searched.returncode == 2
    assert searched.stderr.strip().splitlines() == [
        f"error: text pair 1 (0-based) cannot be embedded as the run did: "
        f"input.pair_truncation = 'only_second' cannot fit it into {MAX_LENGTH} tokens (its "
        f"first text alone is longer)"]
