"""Token-level output (output.granularity = subword | word) as whole jobs: the token table against
a direct transformers computation on each text alone, a run killed mid-unit, the config guard,
refusals, incremental runs and verify."""
from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from helpers import embedpipe, make_job, matrix, read_vectors, run, small_job, write_shards
from helpers import run_and_kill
from test_reliability import make_corpus

from pipeline.config import ConfigError, config_from_dict
from pipeline.io.ledger import Ledger, SettingsMismatch
from pipeline.io.storage import Store

HARD = ["Tokenization isn't trivial: unbelievably so!", "A naïve café in İstanbul, 2024.",
        "e-mail me at x@y.org -- re: the 3.5% rise", "  leading and  double  spaces\ttab\nline ",
        "ÉCOLE normale supérieure", "über-complicated Straße"]


def read_tokens(out) -> pa.Table:
    files = Ledger(Store(str(out))).token_files()
    return pa.concat_tables([pq.read_table(out / f) for f in files])


@pytest.fixture(scope="module")
def token_input(tmp_path_factory, movie_table):
    """The hard texts above, 24 real snippets and one text past max_length, in one file."""
    folder = tmp_path_factory.mktemp("token_input")
    snippets = movie_table.column("text").to_pylist()[::97][:24]
    texts = HARD + snippets + [" ".join(snippets)]
    write_shards(folder, [pa.table({"id": np.arange(len(texts)), "text": texts})])
    return folder, texts


@pytest.fixture(scope="module")
def direct(bundled_model, token_input):
    """Each text alone through AutoModel(output_hidden_states=True): its fast tokenizer's ids,
    tokens, offsets and word ids, and its per-token concat-last-four vectors."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(bundled_model.path)
    model = AutoModel.from_pretrained(bundled_model.path).eval()
    results = []
    for text in token_input[1]:
        enc = tokenizer(text, truncation=True, max_length=64, return_offsets_mapping=True,
                        return_tensors="pt")
        with torch.inference_mode():
            out = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                        output_hidden_states=True)
        states = torch.cat(out.hidden_states[-4:], dim=-1)[0].numpy()
        ids = enc["input_ids"][0].tolist()
        results.append({"tokens": tokenizer.convert_ids_to_tokens(ids),
                        "offsets": enc["offset_mapping"][0].tolist(), "words": enc.word_ids(),
                        "special": [i in tokenizer.all_special_ids for i in ids],
                        "states": states})
    return results


def token_job(folder, out, model=None, **output):
    return make_job(folder, out, model, model={"max_length": 64},
                    encode={"pooling": "concat-last-four", "batch_tokens": 1024},
                    output={"rows_per_file": 100, **output})


def per_id(table: pa.Table, n: int) -> list[pa.Table]:
    ids = table.column("id").to_numpy()
    assert (np.diff(ids) >= 0).all()  # input order
    return [table.filter(pa.array(ids == i)) for i in range(n)]


def test_subword_vectors_equal_a_direct_computation(token_input, direct, tmp_path):
    folder, texts = token_input
    out = tmp_path / "subword"
    summary = run(token_job(folder, out, granularity="subword", special_tokens=True))
    assert summary.exit_code == 0 and summary.truncated == 1
    table = read_tokens(out)
    assert table.schema.field("vector").type.list_size == 4 * 384
    assert summary.token_rows == table.num_rows
    for text, mine, ref in zip(texts, per_id(table, len(texts)), direct):
        assert mine.column("position").to_pylist() == list(range(len(ref["tokens"])))
        assert mine.column("token").to_pylist() == ref["tokens"]
        spans = list(zip(mine.column("char_start").to_pylist(), mine.column("char_end").to_pylist()))
        assert spans == [tuple(o) for o in ref["offsets"]]
        for (a, b), token, special in zip(spans, ref["tokens"], ref["special"]):
            if not special and text[a:b].isascii():  # uncased, no accents: the token's text
                assert text[a:b].lower() == token.removeprefix("##")
        np.testing.assert_allclose(matrix(mine), ref["states"], rtol=1e-4, atol=2e-5)
    # the text vectors are still written, as a text-only run writes them
    text_out = tmp_path / "text"
    run(token_job(folder, text_out))
    assert not (text_out / "tokens").exists()
    np.testing.assert_array_equal(matrix(read_vectors(out)), matrix(read_vectors(text_out)))
    assert read_vectors(out).drop_columns(["vector"]).equals(
        read_vectors(text_out).drop_columns(["vector"]))
    # without special tokens: the same rows less [CLS] / [SEP], numbered from 0
    plain = tmp_path / "plain"
    run(token_job(folder, plain, granularity="subword"))
    got = read_tokens(plain)
    expected = table.filter(pa.array([t not in ("[CLS]", "[SEP]")
                                      for t in table.column("token").to_pylist()]))
    assert got.column("token").equals(expected.column("token"))
    np.testing.assert_array_equal(matrix(got), matrix(expected))
    assert all(m.column("position").to_pylist() == list(range(m.num_rows))
               for m in per_id(got, len(texts)))
    # rows_per_file counts the token table's rows
    parts = Ledger(Store(str(plain))).token_files()
    assert len(parts) > 1 and all(pq.read_metadata(plain / f).num_rows <= 100 for f in parts)
    assert embedpipe("verify", plain).returncode == 0


@pytest.mark.parametrize("pooling", ["first", "mean"])
def test_word_vectors_equal_a_direct_computation(token_input, direct, tmp_path, pooling):
    folder, texts = token_input
    out = tmp_path / "words"
    assert run(token_job(folder, out, granularity="word", word_pooling=pooling)).exit_code == 0
    table = read_tokens(out)
    for text, mine, ref in zip(texts, per_id(table, len(texts)), direct):
        words: dict[int, list[int]] = {}
        for position, word in enumerate(ref["words"]):
            if word is not None:
                words.setdefault(word, []).append(position)
        groups = list(words.values())
        starts = [ref["offsets"][g[0]][0] for g in groups]
        ends = [ref["offsets"][g[-1]][1] for g in groups]
        assert mine.column("position").to_pylist() == list(range(len(groups)))
        assert mine.column("char_start").to_pylist() == starts
        assert mine.column("char_end").to_pylist() == ends
        assert mine.column("token").to_pylist() == [text[a:b] for a, b in zip(starts, ends)]
        states = ref["states"]
        expected = np.stack([states[g[0]] if pooling == "first" else states[g].mean(0)
                             for g in groups])
        np.testing.assert_allclose(matrix(mine), expected, rtol=1e-4, atol=2e-5)
    words = read_tokens(out).column("token").to_pylist()
    assert "İstanbul" in words and "Tokenization" in words and "naïve" in words
    assert embedpipe("verify", out).returncode == 0


WORDS = {"granularity": "word", "word_pooling": "mean"}


@pytest.fixture(scope="module")
def crash_input(tmp_path_factory, movie_table):
    return make_corpus(tmp_path_factory.mktemp("crash_input"), movie_table)[0]


@pytest.fixture(scope="module")
def clean_tokens(tmp_path_factory, crash_input, tiny_model):
    tmp = tmp_path_factory.mktemp("clean_tokens")
    clean = tmp / "out"
    assert embedpipe("run", small_job(tmp / "clean.toml", crash_input, clean, tiny_model,
                                      output=WORDS)).returncode == 0
    return clean


@pytest.mark.parametrize("point", ["encode:3", "write:7"])
def test_killed_token_run_resumes_to_a_clean_runs_output(tmp_path, crash_input, clean_tokens,
                                                         tiny_model, point):
    clean, out = clean_tokens, tmp_path / "out"
    job = small_job(tmp_path / "job.toml", crash_input, out, tiny_model, output=WORDS)
    run_and_kill(job, point, tmp_path)
    if point.startswith("write"):  # a part caught under its temporary name
        assert [p for d in ("vectors", "tokens") for p in (out / d).iterdir() if ".tmp-" in p.name]
    rerun = embedpipe("run", job, "--json")
    assert rerun.returncode == 0, rerun.stderr
    got, expected = read_tokens(out), read_tokens(clean)
    assert got.num_rows > 1000 and got.drop_columns(["vector"]).equals(
        expected.drop_columns(["vector"]))
    np.testing.assert_array_equal(matrix(got), matrix(expected))  # bit for bit
    np.testing.assert_array_equal(matrix(read_vectors(out)), matrix(read_vectors(clean)))
    assert sorted(p.name for p in (out / "tokens").iterdir()) == sorted(
        p.name for p in (clean / "tokens").iterdir())  # no temporaries, no strays
    assert embedpipe("verify", out).returncode == 0
    if point.startswith("write"):
        return

    # a damaged token part: verify names it, and the next run redoes its unit
    victim = sorted((out / "tokens").iterdir())[0]
    victim.write_bytes(victim.read_bytes()[:-100])
    verdict = embedpipe("verify", out)
    assert verdict.returncode != 0 and victim.name in verdict.stdout
    assert embedpipe("run", job).returncode == 0
    np.testing.assert_array_equal(matrix(read_tokens(out)), matrix(expected))
    assert embedpipe("verify", out).returncode == 0


def test_config_guard_refuses_a_changed_word_pooling(tmp_path, movie_table, tiny_model):
    folder = tmp_path / "input"
    texts = movie_table.column("text").to_pylist()[:40]
    write_shards(folder, [pa.table({"id": np.arange(40), "text": texts})])
    out = tmp_path / "out"

    def job(**output):
        return make_job(folder, out, tiny_model, model={"max_length": 64}, output=output)

    run(job(granularity="word"))
    settings = json.loads((out / "manifest.json").read_text())["vector_settings"]
    assert settings["output.granularity"] == "word" and settings["output.word_pooling"] == "first"
    for changed, key in ((job(granularity="word", word_pooling="mean"), "output.word_pooling"),
                         (job(granularity="subword"), "output.granularity"),
                         (job(), "output.granularity")):  # back to text only: refused too
        with pytest.raises(SettingsMismatch, match=key):
            run(changed)
    summary = run(job(granularity="word", word_pooling="first"))  # the same: nothing to do
    assert summary.units_skipped == 1 and summary.units_done == 0
    # a text-only folder made before token output existed records none of these settings
    text_out = tmp_path / "text"
    run(make_job(folder, text_out, tiny_model, model={"max_length": 64}))
    text_settings = json.loads((text_out / "manifest.json").read_text())["vector_settings"]
    assert not [k for k in text_settings if "granularity" in k or "word" in k or "special" in k]
    assert "token_files" not in (text_out / "manifest.json").read_text()


def test_incremental_run_adds_a_files_tokens(tmp_path, movie_table, tiny_model):
    texts = movie_table.column("text").to_pylist()
    folder = tmp_path / "input"
    write_shards(folder, [pa.table({"id": np.arange(30), "text": texts[:30]})], ["a.parquet"])
    out = tmp_path / "out"
    job = make_job(folder, out, tiny_model, model={"max_length": 64},
                   output={"granularity": "subword"})
    run(job)
    before = read_tokens(out)
    write_shards(folder, [pa.table({"id": np.arange(30, 50), "text": texts[30:50]})],
                 ["b.parquet"])
    summary = run(job)
    assert summary.units_skipped == 1 and summary.units_done == 1
    after = read_tokens(out)
    assert summary.token_rows == after.num_rows - before.num_rows > 0
    assert after.slice(0, before.num_rows).equals(before)
    assert sorted(set(after.column("id").to_pylist())) == list(range(50))
    assert embedpipe("verify", out).returncode == 0


@pytest.mark.parametrize("change, message", [
    ({"encode": {"long_text": "chunk"}}, "long_text = 'chunk'"),
    ({"input": {"text_pair_column": "other"}}, "sentence pairs"),
    ({"encode": {"pooling": "pooler"}}, "pooler"),
    ({"output": {"special_tokens": True}}, "special tokens are no word"),
])
def test_nonsense_combinations_are_refused_in_one_line(tmp_path, change, message):
    raw = make_job(tmp_path, tmp_path / "out", output={"granularity": "word"})
    for section, values in change.items():
        raw.setdefault(section, {}).update(values)
    with pytest.raises(ConfigError, match=message) as caught:
        config_from_dict(raw)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("output, key", [
    ({"special_tokens": True}, "special_tokens"), ({"word_pooling": "mean"}, "word_pooling"),
    ({"granularity": "subword", "word_pooling": "mean"}, "word_pooling"),
    ({"granularity": "sentence"}, "granularity")])
def test_token_keys_without_a_token_table_are_refused(tmp_path, output, key):
    with pytest.raises(ConfigError, match=f"output.{key}"):
        config_from_dict(make_job(tmp_path, tmp_path / "out", output=output))


def test_token_windows_hold_a_bounded_number_of_tokens(tmp_path, movie_table, bundled_model,
                                                       monkeypatch):
    """However large sort_window is, a Window of a token-level job holds at most TOKEN_WINDOW
    tokens (one longer text alone), so the writer's per-token vectors stay bounded."""
    from pipeline.config import InputConfig
    from pipeline.encode.batching import Batch
    from pipeline.encode.token_output import TokenPolicy
    from pipeline.encode.tokenizer import TextTokenizer
    from pipeline.io.reader import plan_units
    from pipeline.jobs import prepare as stages

    monkeypatch.setattr(stages, "TOKEN_WINDOW", 300)
    texts = movie_table.column("text").to_pylist()[:150]
    texts[7] = " ".join(texts[:20])  # one text past the budget on its own
    texts[9] = None  # a reject, reported once
    write_shards(tmp_path, [pa.table({"id": np.arange(150), "text": texts})])
    settings = stages.FlowSettings("text", "id", (), sort_window=4096, batch_tokens=512,
                                   max_batch_size=16, pad_to_multiple_of=1, pin_memory=False)
    items = []

    class Collect:
        put = items.append

    prepare = stages.PrepareStage(settings, TextTokenizer(bundled_model.path, 128), {},
                                  pa.int64(), stages.Stats(),
                                  token_policy=TokenPolicy("word", "first", False))
    prepare.run([(unit, 0) for unit in plan_units(InputConfig(path=str(tmp_path)))], Collect())
    windows = [i for i in items if isinstance(i, stages.Window)]
    assert len(windows) > 5
    ids = []
    for window in windows:
        tokens = int(window.n_tokens.clip(max=128).sum())
        assert tokens <= 300 or len(window.ids) == 1
        assert window.tokens is not None and set(window.tokens.owner) <= set(range(len(window.ids)))
        ids += window.ids.to_pylist()
    assert ids == [i for i in range(150) if i != 9]
    assert sum(w.rejects.num_rows for w in windows) == 1
    assert sum(isinstance(i, Batch) for i in items) == sum(w.n_batches for w in windows)


@pytest.fixture(scope="module")
def words_local(tmp_path_factory, crash_input, tiny_model):
    """The crash tests' input as word rows, run locally (the reference for Ray and S3)."""
    tmp = tmp_path_factory.mktemp("words_local")
    assert embedpipe("run", small_job(tmp / "job.toml", crash_input, tmp / "out", tiny_model,
                                      output=WORDS)).returncode == 0
    return read_tokens(tmp / "out")


@pytest.mark.ray
def test_ray_writes_the_token_table_as_the_local_runner_does(tmp_path, crash_input, tiny_model,
                                                            words_local):
    job = small_job(tmp_path / "job.toml", crash_input, tmp_path / "out", tiny_model,
                    output=WORDS)
    result = embedpipe("run", job, "--runner", "ray", "--workers", "2",
                       env={"RAY_AUTH_MODE": "disabled"})
    assert result.returncode == 0, result.stderr[-3000:]
    got = read_tokens(tmp_path / "out")
    assert got.drop_columns(["vector"]).equals(words_local.drop_columns(["vector"]))
    assert np.abs(matrix(got) - matrix(words_local)).max() <= 1e-6
    assert embedpipe("verify", tmp_path / "out").returncode == 0


@pytest.mark.s3
def test_s3_token_table_equals_local(tmp_path, s3, crash_input, tiny_model, words_local):
    fs, bucket = s3
    out = f"s3://{bucket}/words"
    job = small_job(tmp_path / "job.toml", crash_input, out, tiny_model, output=WORDS)
    result = embedpipe("run", job)
    assert result.returncode == 0, result.stderr[-3000:]
    assert embedpipe("verify", out).returncode == 0
    fs.invalidate_cache()
    fs.get(f"{bucket}/words", str(tmp_path / "copy"), recursive=True)
    got = read_tokens(tmp_path / "copy")
    assert got.drop_columns(["vector"]).equals(words_local.drop_columns(["vector"]))
    np.testing.assert_array_equal(matrix(got), matrix(words_local))
