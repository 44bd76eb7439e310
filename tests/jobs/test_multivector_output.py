"""Multi-vector (ColBERT) output (issue #28): tiny random MultiVectorEncoder folders saved by
sentence-transformers itself (and a PyLate v3 layout it loads); the stored token vectors against
its encode_document, queries against its encode_query, search against a numpy brute-force MaxSim,
and reuse, resume, verify, the config guard and the refusals on multi-vector folders."""
from __future__ import annotations

import json
import shutil
import string

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from helpers import (embedpipe, film_texts, make_job, read_vectors, run, run_and_kill,
                     small_job, write_shards)
from pipeline.io.output import open_output

POSITIONS = 64  # the tiny BERT's position limit: the colbert folder's max_seq_length
LONG = " ".join(["the warm film, has a slow ending."] * 12)  # past 64 tokens
TEXTS = film_texts(24) + [LONG, "a warm film", "A Warm Film!", "a warm film"]


def _folders(base, root):
    import torch
    from sentence_transformers import MultiVectorEncoder
    from sentence_transformers.base.modules import Dense, Normalize, Transformer
    from sentence_transformers.multi_vector_encoder.modules import MultiVectorMask

    torch.manual_seed(1)
    colbert = MultiVectorEncoder(modules=[
        Transformer(str(base), max_seq_length=POSITIONS,
                    query_expansion={"strategy": "fixed", "length": 16}),
        Dense(32, 16, bias=False, activation_function=torch.nn.Identity(),
              module_input_name="token_embeddings"),
        MultiVectorMask(skiplist_words=list(string.punctuation)),
        Normalize(module_input_name="token_embeddings")],
        prompts={"query": "[Q] ", "document": "[D] "})
    colbert.save(str(root / "colbert"))
    # two Dense layers (tanh, bias), a document_length, truncate_dim, the skiplist on queries
    # too, expansion "min" attended to, no Normalize module
    plain = MultiVectorEncoder(modules=[
        Transformer(str(base), max_seq_length=POSITIONS, document_length=24,
                    query_expansion={"strategy": "min", "length": 12, "attend": True}),
        Dense(32, 24, activation_function=torch.nn.Tanh(), module_input_name="token_embeddings"),
        Dense(24, 12, activation_function=torch.nn.Identity(),
              module_input_name="token_embeddings"),
        MultiVectorMask(skiplist_words=[",", "."], skiplist_tasks=["query", "document"])],
        truncate_dim=8)
    plain.save(str(root / "plain"))
    # PyLate v3's layout: [Transformer, Dense], the prefixes and knobs at the top level
    pylate = shutil.copytree(root / "colbert", root / "pylate")
    shutil.rmtree(pylate / "2_MultiVectorMask")
    shutil.rmtree(pylate / "3_Normalize")
    modules = json.loads((pylate / "modules.json").read_text())[:2]
    modules[1]["type"] = "pylate.models.Dense.Dense"
    (pylate / "modules.json").write_text(json.dumps(modules))
    (pylate / "config_sentence_transformers.json").write_text(json.dumps({
        "model_type": "ColBERT", "query_prefix": "[Q] ", "document_prefix": "[D] ",
        "query_length": 16, "document_length": 40, "attend_to_expansion_tokens": False,
        "similarity_fn_name": "maxsim"}))
    settings = json.loads((pylate / "sentence_bert_config.json").read_text())
    settings.pop("query_expansion")
    (pylate / "sentence_bert_config.json").write_text(json.dumps(settings))
    return {kind: root / kind for kind in KINDS}


KINDS = ("colbert", "plain", "pylate")


@pytest.fixture(scope="module")
def mv_folders(tmp_path_factory, bundled_model):
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("mv_models")
    base = root / "bert"
    BertModel(BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2,
                         num_attention_heads=2, intermediate_size=64,
                         max_position_embeddings=POSITIONS)).eval().save_pretrained(base)
    AutoTokenizer.from_pretrained(bundled_model.path).save_pretrained(base)
    return _folders(base, root)


def _reference(folder):
    from sentence_transformers import MultiVectorEncoder
    return MultiVectorEncoder(str(folder), device="cpu")


@pytest.fixture(scope="module")
def mv_runs(mv_folders, tmp_path_factory):
    """Each kind run once with the defaults (pooling auto)."""
    root = tmp_path_factory.mktemp("mv_runs")
    pq.write_table(pa.table({"id": np.arange(len(TEXTS)), "text": TEXTS}), root / "in.parquet")
    outs = {}
    for kind, folder in mv_folders.items():
        outs[kind] = root / kind
        summary = run(make_job(root / "in.parquet", outs[kind], folder,
                               model={"dtype": "float32"}, output={"keep_columns": ["text"]}))
        assert not summary.failures and summary.stored_tokens > len(TEXTS)
        assert summary.rows_copied == 1  # "a warm film" twice
    return outs


def _assert_same(got: list[np.ndarray], expected: list[np.ndarray]):
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        assert g.shape == e.shape
        np.testing.assert_allclose(g, e, atol=1e-4, rtol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_stored_token_vectors_equal_encode_document(mv_folders, mv_runs, kind):
    out = mv_runs[kind]
    table = read_vectors(out)
    assert "vector" not in table.column_names
    assert table.column("id").to_pylist() == list(range(len(TEXTS)))
    assert table.column("truncated").to_pylist()[24] is True  # LONG
    part = pq.read_table(next((out / "multivectors").glob("*.parquet")))
    assert part.column_names == ["id", "faiss_id", "vectors"]
    assert pa.types.is_fixed_size_list(part.schema.field("vectors").type.value_type)
    rows = open_output(str(out)).multivectors()
    expected = _reference(mv_folders[kind]).encode_document(TEXTS, convert_to_numpy=True)
    _assert_same(rows, expected)
    if kind != "plain":  # punctuation skipped: "A Warm Film!" keeps fewer tokens than it read
        assert len(rows[26]) < table.column("n_tokens").to_pylist()[26]
    assert not (out / "index").exists()
    with pytest.raises(Exception, match="multivectors"):
        open_output(str(out)).vectors()


@pytest.mark.parametrize("forward", ["fused", "transformers"])
def test_both_forwards_give_encode_document(mv_folders, tmp_path, forward):
    pq.write_table(pa.table({"id": np.arange(len(TEXTS)), "text": TEXTS}), tmp_path / "in.parquet")
    summary = run(make_job(tmp_path / "in.parquet", tmp_path / "out", mv_folders["colbert"],
                           model={"dtype": "float32", "forward": forward}))
    assert summary.runtime.forward == forward
    expected = _reference(mv_folders["colbert"]).encode_document(TEXTS, convert_to_numpy=True)
    _assert_same(open_output(str(tmp_path / "out")).multivectors(), expected)


@pytest.mark.parametrize("kind", KINDS)
def test_queries_equal_encode_query(mv_folders, mv_runs, kind):
    from pipeline.commands.multivector_search import MultiVectorQueries
    from pipeline.commands.query import EmbeddingRecord
    from pipeline.io.manifest import read_manifest
    from pipeline.io.storage import Store

    queries = ["warm funny film", LONG, "the plot, again.", "Cast!"]
    record = EmbeddingRecord.from_manifest(read_manifest(Store(str(mv_runs[kind]))))
    got = MultiVectorQueries(record, purpose="query").embed(queries)
    expected = _reference(mv_folders[kind]).encode_query(queries, convert_to_numpy=True)
    _assert_same(got, expected)
    if kind == "colbert":  # expanded to the query length, [MASK]s scored
        assert all(len(q) == 16 for q in got[:1])


def _brute_force(out, queries, folder):
    """MaxSim over the parts as pyarrow reads them, queries from sentence-transformers."""
    table = pq.read_table(out / "multivectors")
    rows = [np.array(r, np.float32).reshape(len(r), -1) for r in
            table.column("vectors").to_pylist()]
    encoded = _reference(folder).encode_query(queries, convert_to_numpy=True)
    return np.array([[(r @ q.T).max(0).sum() for r in rows] for q in encoded])


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["exact", "candidates"])
def test_search_returns_the_brute_force_top_10(mv_folders, mv_runs, mode):
    out = mv_runs["colbert"]
    queries = ["warm funny film", "slow story ending", "the music"]
    scores = _brute_force(out, queries, mv_folders["colbert"])
    for q, query in enumerate(queries):
        result = embedpipe("search", out, query, "-k", "10", "--json", "--maxsim", mode)
        assert result.returncode == 0, result.stderr
        hits = json.loads(result.stdout)
        expected = np.lexsort((np.arange(scores.shape[1]), -scores[q]))[:10]
        assert [h["id"] for h in hits] == expected.tolist()
        np.testing.assert_allclose([h["score"] for h in hits], scores[q, expected], rtol=1e-4)
        assert all("text" in h for h in hits)
    for args in (("search", out, "warm", "--rescore", "2"), ("index", out)):
        refused = embedpipe(*args)
        assert refused.returncode == 2 and len(refused.stderr.strip().splitlines()) == 1
        assert "multi-vector" in refused.stderr


def test_a_flat_token_index_finds_the_exact_top_10(mv_runs):
    from pipeline.commands.multivector_search import MultiVectorSearcher

    exact = MultiVectorSearcher(str(mv_runs["plain"]), mode="exact")
    flat = MultiVectorSearcher(str(mv_runs["plain"]), mode="candidates", index_kind="flat")
    queries = ["warm funny film", "slow story ending", "the music", LONG]
    assert exact.search(queries, 10).equals(flat.search(queries, 10))


def _shards(folder, changed: bool = False):
    tables = [pa.table({"id": np.arange(i * 20, i * 20 + 20), "text": film_texts(20, i)})
              for i in range(3)]
    if changed:  # one row's text changed, a fourth shard added
        texts = tables[1].column("text").to_pylist()
        texts[5] = LONG
        tables[1] = tables[1].set_column(1, "text", pa.array(texts))
        tables.append(pa.table({"id": np.arange(60, 75), "text": film_texts(15, 9)}))
    if changed:  # only the changed file and the new one are written again
        write_shards(folder, [tables[1], tables[3]], ["part-00001.parquet", "part-00003.parquet"])
    else:
        write_shards(folder, tables)
    return folder


def _same_folder(got, expected):
    a, b = read_vectors(got), read_vectors(expected)
    for name in ("id", "n_tokens", "truncated", "text_hash"):
        assert a.column(name).equals(b.column(name)), name
    _assert_same(open_output(str(got)).multivectors(), open_output(str(expected)).multivectors())


@pytest.mark.slow
def test_incremental_run_reuses_rows_and_equals_a_clean_run(mv_folders, tmp_path):
    folder = mv_folders["colbert"]
    _shards(tmp_path / "in")
    first = run(make_job(tmp_path / "in", tmp_path / "out", folder, model={"dtype": "float32"}))
    assert first.rows_encoded == 60
    again = run(make_job(tmp_path / "in", tmp_path / "out", folder, model={"dtype": "float32"}))
    assert (again.units_skipped, again.rows_encoded) == (3, 0)  # nothing changed: nothing redone
    _shards(tmp_path / "in", changed=True)
    night = run(make_job(tmp_path / "in", tmp_path / "out", folder, model={"dtype": "float32"}))
    assert night.rows_encoded == 1 + 15 and night.rows_reused == 19
    assert (night.units_skipped, night.units_changed) == (2, 1)  # only the changed file redone
    clean = run(make_job(tmp_path / "in", tmp_path / "clean", folder, model={"dtype": "float32"},
                         encode={"reuse": "off"}))
    assert clean.rows_encoded == 75
    _same_folder(tmp_path / "out", tmp_path / "clean")
    assert embedpipe("verify", tmp_path / "out").returncode == 0


def test_repeated_texts_are_copied(mv_folders, tmp_path):
    pq.write_table(pa.table({"id": np.arange(30), "text": film_texts(10) * 3}),
                   tmp_path / "in.parquet")
    summary = run(make_job(tmp_path / "in.parquet", tmp_path / "out", mv_folders["colbert"],
                           model={"dtype": "float32"}))
    assert (summary.rows_encoded, summary.rows_copied) == (10, 20)
    rows = open_output(str(tmp_path / "out")).multivectors()
    for i in range(10):
        np.testing.assert_array_equal(rows[i], rows[i + 10])
        np.testing.assert_array_equal(rows[i], rows[i + 20])


@pytest.mark.slow
def test_killed_run_then_rerun_equals_a_clean_run(mv_folders, tmp_path):
    folder = mv_folders["colbert"]
    _shards(tmp_path / "in")
    sections = {"model": {"dtype": "float32"}}
    clean = small_job(tmp_path / "clean.toml", tmp_path / "in", tmp_path / "clean", folder,
                      **sections)
    assert embedpipe("run", clean).returncode == 0
    job = small_job(tmp_path / "job.toml", tmp_path / "in", tmp_path / "out", folder, **sections)
    for point in ("encode:3", "write"):
        run_and_kill(job, point, tmp_path)
    rerun = embedpipe("run", job)
    assert rerun.returncode == 0, rerun.stderr
    _same_folder(tmp_path / "out", tmp_path / "clean")
    names = sorted(p.name for p in (tmp_path / "out" / "multivectors").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "out" / "vectors").iterdir())
    assert embedpipe("verify", tmp_path / "out").returncode == 0


def test_verify_finds_a_changed_token_vector(mv_runs, tmp_path):
    out = shutil.copytree(mv_runs["colbert"], tmp_path / "out")
    ok = embedpipe("verify", out)
    assert ok.returncode == 0 and "multi-vector" in ok.stdout, ok.stdout
    part = next((out / "multivectors").glob("*.parquet"))
    table = pq.read_table(part)
    rows = table.column("vectors").to_pylist()
    rows[3][1][2] += 0.5
    table = table.set_column(2, "vectors", pa.array(rows, table.schema.field("vectors").type))
    pq.write_table(table, part)
    found = embedpipe("verify", out)
    assert found.returncode == 1 and part.name in found.stdout


def test_verify_finds_a_part_short_of_rows(mv_runs, tmp_path):
    from pipeline.io.ledger import Ledger
    from pipeline.io.multivectors import multivector_problems
    from pipeline.io.storage import Store

    out = shutil.copytree(mv_runs["colbert"], tmp_path / "out")
    part = next((out / "multivectors").glob("*.parquet"))
    pq.write_table(pq.read_table(part).slice(1), part)
    ledger = Ledger(Store(str(out)))
    parts = ledger.vector_parts()
    problems = multivector_problems(ledger.store, parts.files, ledger.multivector_files(),
                                    parts.rows())
    assert len(problems) == 1 and f"{len(TEXTS) - 1} rows" in problems[0]
    assert embedpipe("verify", out).returncode == 1


@pytest.mark.slow
def test_config_guard_refuses_other_settings_on_a_finished_folder(mv_folders, tmp_path):
    _shards(tmp_path / "in")
    base = {"model": {"dtype": "float32"}}
    assert not run(make_job(tmp_path / "in", tmp_path / "out", mv_folders["colbert"],
                            **base)).failures
    for model, extra in ((mv_folders["plain"], {}),
                         (mv_folders["colbert"], {"encode": {"prompt": "[X] "}}),
                         (mv_folders["colbert"], {"output": {"precision": "float16"}})):
        job = small_job(tmp_path / "job.toml", tmp_path / "in", tmp_path / "out", model,
                        model={"dtype": "float32", "max_length": POSITIONS}, **extra)
        result = embedpipe("run", job)
        assert result.returncode == 2, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1


def test_float16_parts(mv_folders, mv_runs, tmp_path):
    pq.write_table(pa.table({"id": np.arange(len(TEXTS)), "text": TEXTS}), tmp_path / "in.parquet")
    summary = run(make_job(tmp_path / "in.parquet", tmp_path / "out", mv_folders["colbert"],
                           model={"dtype": "float32"}, output={"precision": "float16"}))
    rows = open_output(str(tmp_path / "out")).multivectors()
    assert rows[0].dtype == np.float16
    full = open_output(str(mv_runs["colbert"])).multivectors()
    for half, single in zip(rows, full):
        np.testing.assert_allclose(half.astype(np.float32), single, atol=1e-3)
    assert summary.bytes_per_row == round(summary.stored_tokens * 16 * 2 / len(TEXTS))


@pytest.mark.parametrize("sections", [
    {"output": {"precision": "int8"}}, {"encode": {"normalize": True}},
    {"output": {"granularity": "subword"}}, {"encode": {"long_text": "chunk"}},
    {"output": {"dimensions": 8}}, {"encode": {"pooling": "mean"}},
])
def test_settings_that_do_not_apply_are_refused(mv_folders, tmp_path, sections):
    _shards(tmp_path / "in")
    job = small_job(tmp_path / "job.toml", tmp_path / "in", tmp_path / "out",
                    mv_folders["colbert"], **sections)
    result = embedpipe("run", job)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "multi-vector" in result.stderr
    assert not (tmp_path / "out").exists()


POOLINGS = {  # HierarchicalTokenPooling's three cuts, with the Normalize before or after it
    "factor": ({"pool_factor": 2.0}, "before"),
    "max_tokens": ({"max_tokens": 6, "num_protected_tokens": 2, "normalize_embeddings": False,
                    "tasks": ["query", "document"]}, "after"),
    "threshold": ({"distance_threshold": 0.5, "num_protected_tokens": 0}, "before"),
}


@pytest.fixture(scope="module")
def pooled_folders(mv_folders):
    import torch
    from sentence_transformers import MultiVectorEncoder
    from sentence_transformers.base.modules import Dense, Normalize, Transformer
    from sentence_transformers.multi_vector_encoder.modules import (HierarchicalTokenPooling,
                                                                    MultiVectorMask)

    base, folders = mv_folders["colbert"].parent / "bert", {}
    for name, (settings, where) in POOLINGS.items():
        torch.manual_seed(2)
        normalize = [Normalize(module_input_name="token_embeddings")]
        pool = [HierarchicalTokenPooling(**settings)]
        folders[name] = mv_folders["colbert"].parent / f"pooled-{name}"
        MultiVectorEncoder(modules=[
            Transformer(str(base), max_seq_length=POSITIONS,
                        query_expansion={"strategy": "fixed", "length": 16}),
            Dense(32, 16, bias=False, activation_function=torch.nn.Identity(),
                  module_input_name="token_embeddings"),
            MultiVectorMask(skiplist_words=list(string.punctuation)),
            *(normalize + pool if where == "before" else pool + normalize)],
            prompts={"query": "[Q] ", "document": "[D] "}).save(str(folders[name]))
    return folders


@pytest.mark.parametrize("name", sorted(POOLINGS))
def test_token_pooling_equals_encode_document(pooled_folders, mv_runs, tmp_path, name):
    """The folder's HierarchicalTokenPooling as sentence-transformers computes it, the text past
    the position limit included; queries pooled too where its tasks list them."""
    folder = pooled_folders[name]
    pq.write_table(pa.table({"id": np.arange(len(TEXTS)), "text": TEXTS}), tmp_path / "in.parquet")
    summary = run(make_job(tmp_path / "in.parquet", tmp_path / "out", folder,
                           model={"dtype": "float32"}))
    assert not summary.failures
    rows = open_output(str(tmp_path / "out")).multivectors()
    reference = _reference(folder)
    _assert_same(rows, reference.encode_document(TEXTS, convert_to_numpy=True))
    unpooled = open_output(str(mv_runs["colbert"])).multivectors()
    assert sum(map(len, rows)) < 0.8 * sum(map(len, unpooled))  # it pooled
    if name == "max_tokens":
        assert max(map(len, rows)) == 6
    from pipeline.commands.multivector_search import MultiVectorQueries
    from pipeline.commands.query import EmbeddingRecord
    from pipeline.io.manifest import read_manifest
    from pipeline.io.storage import Store

    queries = ["warm funny film", LONG, "Cast!"]
    record = EmbeddingRecord.from_manifest(read_manifest(Store(str(tmp_path / "out"))))
    got = MultiVectorQueries(record, purpose="query").embed(queries)
    _assert_same(got, reference.encode_query(queries, convert_to_numpy=True))
    assert (max(map(len, got)) <= 6) == (name == "max_tokens")


def _with_module(folder, tmp_path, kind, config, at=None):
    folder = shutil.copytree(folder, tmp_path / "model")
    modules = json.loads((folder / "modules.json").read_text())
    entry = {"idx": len(modules), "name": "pool", "path": "9_Pool", "type": "sentence_transformers."
             f"multi_vector_encoder.modules.token_pooling.{kind}"}
    modules.insert(len(modules) if at is None else at, entry)
    (folder / "modules.json").write_text(json.dumps(modules))
    (folder / "9_Pool").mkdir()
    (folder / "9_Pool" / "config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize("kind,config,at,named", [
    ("MyTokenPooling", {}, None, "MyTokenPooling"),
    ("HierarchicalTokenPooling", {"pool_factor": 2.0}, 2, "MultiVectorMask after"),
    ("HierarchicalTokenPooling", {"pool_factor": 2.0}, 1, "Dense after"),
    ("HierarchicalTokenPooling", {"pool_factor": 2.0, "max_tokens": 4}, None, "pool_factor"),
    ("HierarchicalTokenPooling", {"pool_factor": 0.5}, None, "pool_factor"),
])
def test_token_pooling_it_does_not_compute_is_refused(mv_folders, tmp_path, kind, config, at,
                                                      named):
    folder = _with_module(mv_folders["colbert"], tmp_path, kind, config, at)
    pq.write_table(pa.table({"id": [1], "text": ["a warm film"]}), tmp_path / "in.parquet")
    job = small_job(tmp_path / "job.toml", tmp_path / "in.parquet", tmp_path / "out", folder)
    result = embedpipe("run", job)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert named in result.stderr and not (tmp_path / "out").exists()


def test_the_config_guard_records_the_pooling(pooled_folders, tmp_path):
    from pipeline.models.multivector_folder import head_fingerprint
    from pipeline.models.st_folder import read_st_folder

    folder = shutil.copytree(pooled_folders["factor"], tmp_path / "model")
    before = head_fingerprint(read_st_folder(folder).multivector)
    config = next(folder.glob("*_HierarchicalTokenPooling")) / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "pool_factor": 3.0}))
    spec = read_st_folder(folder).multivector
    assert spec.pooling.pool_factor == 3.0 and head_fingerprint(spec) != before


@pytest.mark.slow
def test_a_sink_on_a_folder_without_normalize_is_refused(mv_folders, tmp_path):
    """LanceDB ranks multi-vector rows by cosine: only unit-length tokens (tests/sinks/)."""
    _shards(tmp_path / "in")
    job = small_job(tmp_path / "job.toml", tmp_path / "in", tmp_path / "out",
                    mv_folders["plain"])
    job.write_text(job.read_text() + f'[[sink]]\nkind = "lancedb"\nuri = "{tmp_path}/db.lance"\n'
                   'table = "t"\n')
    result = embedpipe("run", job)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "sink" in result.stderr and "not of unit length" in result.stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / "db.lance").exists()


@pytest.mark.slow
def test_a_changed_dense_head_is_refused(mv_folders, tmp_path):
    """The Dense weights live beside the transformer's files: a new head is another model."""
    import torch
    from safetensors.torch import load_file, save_file

    folder = shutil.copytree(mv_folders["colbert"], tmp_path / "model")
    _shards(tmp_path / "in")
    job = small_job(tmp_path / "job.toml", tmp_path / "in", tmp_path / "out", folder)
    assert embedpipe("run", job).returncode == 0
    weights = folder / "1_Dense" / "model.safetensors"
    state = load_file(weights)
    save_file({k: v + 0.01 * torch.ones_like(v) for k, v in state.items()}, weights)
    result = embedpipe("run", job)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    refused = embedpipe("search", tmp_path / "out", "warm film")
    assert refused.returncode == 2 and "settings" in refused.stderr


def test_bad_rows_are_rejects_and_the_parts_still_pair(mv_folders, tmp_path):
    texts = ["a warm film", "   ", "a slow plot", None, "a warm film"]
    pq.write_table(pa.table({"id": [1, 2, 3, 4, 1], "text": texts}), tmp_path / "in.parquet")
    summary = run(make_job(tmp_path / "in.parquet", tmp_path / "out", mv_folders["colbert"],
                           model={"dtype": "float32"}))
    assert summary.rows_read == 5 and summary.vectors_written == 2
    reasons = pq.read_table(tmp_path / "out" / "rejects").column("reason").to_pylist()
    assert sorted(reasons) == ["duplicate id", "empty text", "null text"]
    assert read_vectors(tmp_path / "out").column("id").to_pylist() == [1, 3]
    assert len(open_output(str(tmp_path / "out")).multivectors()) == 2
    assert embedpipe("verify", tmp_path / "out").returncode == 0



def test_a_pylate_prefix_the_tokenizer_splits_is_refused(mv_folders, tmp_path):
    """[unused0] is a vocabulary token BERT's tokenizer splits: sentence-transformers registers
    it as a special token at load; embedpipe refuses rather than tokenize it otherwise."""
    folder = shutil.copytree(mv_folders["pylate"], tmp_path / "model")
    config = json.loads((folder / "config_sentence_transformers.json").read_text())
    (folder / "config_sentence_transformers.json").write_text(json.dumps(
        {**config, "query_prefix": "[unused0]", "document_prefix": "[unused1]"}))
    pq.write_table(pa.table({"id": [1], "text": ["a warm film"]}), tmp_path / "in.parquet")
    job = small_job(tmp_path / "job.toml", tmp_path / "in.parquet", tmp_path / "out", folder)
    result = embedpipe("run", job)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "[unused" in result.stderr and not (tmp_path / "out").exists()
    reference = _reference(folder)  # what sentence-transformers does instead: one token
    assert reference.tokenizer.tokenize("[unused0]") == ["[unused0]"]


def test_unit_tokens_follow_the_last_normalize_and_truncate_dim(mv_folders):
    """What decides whether a cosine-ranking sink may hold a folder's tokens."""
    import dataclasses

    from pipeline.models.multivector_folder import TokenPooling
    from pipeline.models.st_folder import read_st_folder

    spec = read_st_folder(mv_folders["colbert"]).multivector
    assert spec.normalize and spec.unit_tokens
    full = spec.dense[-1].out_features
    assert not dataclasses.replace(spec, truncate_dim=full - 1).unit_tokens
    assert dataclasses.replace(spec, truncate_dim=full).unit_tokens
    # a Normalize before the pooling: cluster means are not unit vectors
    assert not dataclasses.replace(spec, pooling=TokenPooling(normalize_before=True)).unit_tokens
    assert dataclasses.replace(spec, pooling=TokenPooling(normalize_embeddings=True)).unit_tokens
    assert dataclasses.replace(spec, pooling=TokenPooling(normalize_after=True)).unit_tokens
    assert not read_st_folder(mv_folders["plain"]).multivector.unit_tokens
