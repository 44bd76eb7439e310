"""BGE-M3 folders (issue #28 item 3): dense, sparse and multivector rows from one forward of the
body, against BGEM3FlagModel's arithmetic written out with transformers' AutoModel and the head
files (tests/m3_build.py), texts past the position limit included; the heads refused by name."""
from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from helpers import embedpipe, film_texts, make_job, run, small_job
from m3_build import MAX_LENGTH, build_m3, reference
from pipeline.io.output import open_output

LONG = " ".join(["a warm funny film with a great cast"] * 30)  # past the position limit
TEXTS = film_texts(30) + [LONG, "a warm film", "film film film film", "<unk> x"]


@pytest.fixture(scope="module")
def m3_folder(tmp_path_factory):
    return build_m3(tmp_path_factory.mktemp("m3") / "tiny-m3")


@pytest.fixture(scope="module")
def m3_input(tmp_path_factory):
    path = tmp_path_factory.mktemp("m3_in") / "in.parquet"
    pq.write_table(pa.table({"id": np.arange(len(TEXTS)), "text": TEXTS}), path)
    return path


def _job(m3_input, out, folder, representations, **sections):
    output = {"representations": representations, "rows_per_file": 10, **sections.pop(
        "output", {})}
    return make_job(m3_input, out, folder, model={"dtype": "float32"},
                    encode={"batch_tokens": 256, "max_batch_size": 8}, output=output,
                    **sections)


@pytest.fixture(scope="module")
def m3_run(m3_folder, m3_input, tmp_path_factory):
    """dense + sparse + multivector, the body's forwards and M3Encoder's batches counted."""
    import torch
    from transformers import XLMRobertaModel

    from pipeline.encode.m3_heads import M3Encoder

    out = tmp_path_factory.mktemp("m3_runs") / "all-three"
    counts = {"body": 0, "batches": 0}
    original = M3Encoder.encode_batch

    def counted(self, batch):
        counts["batches"] += 1
        return original(self, batch)

    def hook(module, args, output):
        if isinstance(module, XLMRobertaModel):
            counts["body"] += 1

    handle = torch.nn.modules.module.register_module_forward_hook(hook)
    M3Encoder.encode_batch = counted
    try:
        summary = run(_job(m3_input, out, m3_folder, ["dense", "sparse", "multivector"],
                           output={"keep_columns": ["text"]}))
    finally:
        M3Encoder.encode_batch = original
        handle.remove()
    assert not summary.failures
    return out, counts, summary


def _assert_sparse_equal(rows, expected: list[dict]):
    for row, weights in enumerate(expected):
        start, end = rows.indptr[row], rows.indptr[row + 1]
        assert rows.indices[start:end].tolist() == sorted(weights)
        np.testing.assert_allclose(rows.data[start:end], [weights[i] for i in sorted(weights)],
                                   atol=1e-4, rtol=0)


def test_stored_rows_equal_the_direct_computation(m3_folder, m3_run):
    out, counts, _ = m3_run
    dense, sparse, colbert = reference(m3_folder, TEXTS)
    folder = open_output(str(out))
    assert folder.representations == ("dense", "sparse", "multivector")
    multi = folder.multivectors()
    assert [len(v) for v in multi] == [len(v) for v in colbert]
    for mine, theirs in zip(multi, colbert):
        np.testing.assert_allclose(mine, theirs, atol=1e-4, rtol=0)
    assert (out / "index").is_dir()  # over the dense vectors
    from pipeline.commands.reindex import rebuild_index
    infos = rebuild_index(str(out), {"type": "flat"})  # `embedpipe index` on the dense vectors
    assert infos["count"] == len(TEXTS)
    np.testing.assert_allclose(folder.vectors(), dense, atol=1e-5, rtol=0)
    rows = folder.sparse()
    from transformers import AutoTokenizer
    assert rows.shape[1] == len(AutoTokenizer.from_pretrained(m3_folder))  # the vocabulary
    _assert_sparse_equal(rows, sparse)
    assert sum(map(len, sparse)) > len(TEXTS)  # the heads really weigh tokens
    table = folder.table(["id", "truncated"])
    assert table.column("id").to_pylist() == list(range(len(TEXTS)))
    assert table.column("truncated").to_pylist()[len(TEXTS) - 4] is True  # LONG
    # one forward of the body a batch, and several batches
    assert counts["batches"] > 1 and counts["body"] == counts["batches"]


def test_encoder_multivectors_equal_the_direct_computation(m3_folder):
    """The colbert head through M3Encoder on padded batches against one text at a time."""
    from pipeline.encode.batching import collate
    from pipeline.encode.m3_heads import M3Encoder
    from pipeline.encode.tokenizer import tokenizer_for
    from pipeline.config.load import config_from_dict
    from pipeline.models.model_files import resolve_model
    from pipeline.models.recipe import resolve_recipe
    from pipeline.runtime.runtime import resolve_runtime

    source = resolve_model(str(m3_folder))
    job = config_from_dict(make_job("x", "y", m3_folder, model={"dtype": "float32"},
                                 output={"representations": ["multivector"]}))
    job, _ = resolve_recipe(job, source)
    runtime = resolve_runtime(job.model, source)
    tokenizer = tokenizer_for(source, runtime, job)
    encoder = M3Encoder(source, runtime, ("dense", "sparse", "multivector"))
    ids = tokenizer(TEXTS).ids
    got = encoder.encode_batch(collate(ids, np.arange(len(TEXTS)), tokenizer.pad_id, 1))
    dense, sparse, colbert = reference(m3_folder, TEXTS)
    np.testing.assert_allclose(got.dense, dense, atol=1e-5, rtol=0)
    _assert_sparse_equal(got.sparse, sparse)
    assert [len(v) for v in got.multivectors] == [len(v) for v in colbert]
    assert len(got.multivectors[len(TEXTS) - 4]) == MAX_LENGTH - 1  # LONG, truncated
    for mine, theirs in zip(got.multivectors, colbert):
        assert mine.shape[1] == 24
        np.testing.assert_allclose(mine, theirs, atol=1e-4, rtol=0)


def _brute_force_rrf(m3_folder, out, queries, k=10, rrf_k=60, depth=100):
    """RRF computed with numpy on the stored rows (read by pyarrow) and the queries' direct
    computation: every row scored per representation, ranked (ties: lower row), fused."""
    from pipeline.io.ledger import Ledger
    from pipeline.io.multivectors import read_multivectors
    from pipeline.io.storage import Store

    folder = open_output(str(out))
    q_dense, q_sparse, q_colbert = reference(m3_folder, queries)
    n = folder.count
    rankings = []
    if "dense" in folder.representations:
        rankings.append(q_dense @ folder.vectors().T)
    if "sparse" in folder.representations:
        stored = folder.sparse().toarray()
        q = np.zeros((len(queries), stored.shape[1]))
        for row, weights in enumerate(q_sparse):
            q[row, list(weights)] = list(weights.values())
        rankings.append(q @ stored.T)
    if "multivector" in folder.representations:
        rows = read_multivectors(Store(str(out)), Ledger(Store(str(out))).multivector_files())
        rankings.append(np.array([[(qc @ d.T).max(1).sum() for d in rows] for qc in q_colbert]))
    expected = []
    for q in range(len(queries)):
        fused = np.zeros(n)
        for scores in rankings:
            order = np.lexsort((np.arange(n), -scores[q]))[:depth]
            fused[order] += 1.0 / (rrf_k + np.arange(1, len(order) + 1))
        top = np.lexsort((np.arange(n), -fused))[:k]
        expected.append((top, fused[top]))
    return expected


QUERIES = ["warm funny film", "the slow plot", "great music and cast"]


@pytest.fixture(scope="module")
def dense_sparse_run(m3_folder, m3_input, tmp_path_factory):
    out = tmp_path_factory.mktemp("m3_runs") / "dense-sparse"
    assert not run(_job(m3_input, out, m3_folder, ["sparse", "dense"])).failures
    return out


def _hits(searcher, queries, k=10):
    table = searcher.search(list(queries), k)
    return [[(h["id"], h["score"]) for h in table.to_pylist() if h["query"] == q]
            for q in range(len(queries))]


@pytest.mark.parametrize("which", ["all-three", "dense-sparse"])
def test_hybrid_top_10_equals_a_brute_force_rrf(m3_folder, m3_run, dense_sparse_run, which):
    from pipeline.commands.hybrid_search import HybridSearcher

    out = m3_run[0] if which == "all-three" else dense_sparse_run
    expected = _brute_force_rrf(m3_folder, out, QUERIES)
    assert open_output(str(out)).representations == (
        ("dense", "sparse", "multivector") if which == "all-three" else ("dense", "sparse"))
    for hits, (rows, scores) in zip(_hits(HybridSearcher(str(out)), QUERIES), expected):
        assert [h[0] for h in hits] == rows.tolist()  # ids are row numbers here
        np.testing.assert_allclose([h[1] for h in hits], scores, rtol=1e-6)
    # another rrf k fuses otherwise, as the brute force does
    rows, _ = _brute_force_rrf(m3_folder, out, QUERIES[:1], rrf_k=2)[0]
    hits = _hits(HybridSearcher(str(out), rrf_k=2), QUERIES[:1])[0]
    assert [h[0] for h in hits] == rows.tolist()


@pytest.mark.slow  # a CLI search loads the model: ~20 s on a shared CPU
def test_search_commands(m3_folder, m3_run):
    """The CLI: --hybrid prints the fused hits; without it, the dense vectors rank."""
    out = m3_run[0]
    rows, scores = _brute_force_rrf(m3_folder, out, QUERIES[:1])[0]
    result = embedpipe("search", out, QUERIES[0], "--hybrid", "-k", "10", "--json")
    assert result.returncode == 0, result.stderr
    hits = json.loads(result.stdout)
    assert [h["id"] for h in hits] == rows.tolist()
    assert hits[0]["text"] == TEXTS[rows[0]]  # kept columns come with the hits
    from pipeline.commands.search import Searcher
    q_dense, _, _ = reference(m3_folder, QUERIES[:1])
    dense = open_output(str(out)).vectors() @ q_dense[0]
    hits = _hits(Searcher(str(out)), QUERIES[:1], 5)[0]
    assert [h[0] for h in hits] == np.argsort(-dense)[:5].tolist()
    np.testing.assert_allclose([h[1] for h in hits], np.sort(dense)[::-1][:5], atol=1e-5)


def test_refusals(m3_folder, m3_input, tmp_path, bundled_model):
    import shutil
    import torch

    from pipeline.config import ConfigError

    def refused(folder, representations, needle, **sections):
        with pytest.raises(ConfigError, match=needle):
            run(_job(m3_input, tmp_path / "out", folder, representations, **sections))
        assert not (tmp_path / "out" / "vectors").exists()

    no_colbert = shutil.copytree(m3_folder, tmp_path / "no-colbert")
    (no_colbert / "colbert_linear.pt").unlink()
    refused(no_colbert, ["dense", "multivector"], "colbert_linear.pt")
    wrong = shutil.copytree(m3_folder, tmp_path / "wrong-shape")
    torch.save(torch.nn.Linear(16, 1).state_dict(), wrong / "sparse_linear.pt")
    refused(wrong, ["dense", "sparse"], "sparse_linear.pt: expected an nn.Linear")
    torch.save({"weight": torch.zeros(1, 32)}, wrong / "sparse_linear.pt")  # no bias
    refused(wrong, ["sparse"], "sparse_linear.pt")
    class Code:  # a pickle that would run code when loaded without weights_only
        def __reduce__(self):
            return (print, ("loaded",))

    torch.save({"weight": torch.zeros(1, 32), "bias": torch.zeros(1), "x": Code()},
               wrong / "sparse_linear.pt")
    refused(wrong, ["dense", "sparse"], "weights_only=True")
    with pytest.raises(ConfigError) as caught:
        run(_job(m3_input, tmp_path / "out", wrong, ["sparse"]))
    assert "\n" not in str(caught.value)  # one line
    refused(bundled_model.path, ["dense", "sparse"], "dense vectors only")
    refused(m3_folder, ["dense", "bag-of-words"], "representations")
    refused(m3_folder, ["dense", "dense"], "distinct")
    refused(m3_folder, [], "non-empty")
    refused(m3_folder, ["dense", "sparse"], "output.dimensions", output={"dimensions": 8})


def test_hybrid_on_one_representation_exits_2(m3_folder, m3_input, tmp_path):
    """The default, dense alone: BGE-M3's normalized CLS, a dense folder's layout."""
    summary = run(make_job(m3_input, tmp_path / "dense", m3_folder, model={"dtype": "float32"}))
    assert not summary.failures and not summary.representation_bytes
    folder = open_output(str(tmp_path / "dense"))
    assert folder.representations == ("dense",) and "output.representations" not in \
        folder.manifest.vector_settings
    np.testing.assert_allclose(folder.vectors(), reference(m3_folder, TEXTS)[0], atol=1e-5)
    result = embedpipe("search", tmp_path / "dense", "warm", "--hybrid")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "stores dense only" in lines[0], result.stderr


ALL = ["dense", "sparse", "multivector"]


def _shards(folder, changed: bool = False):
    from helpers import write_shards

    tables = [pa.table({"id": np.arange(i * 12, i * 12 + 12), "text": film_texts(12, i)})
              for i in range(3)]
    if changed:  # one row's text changed, a fourth shard added
        texts = tables[1].column("text").to_pylist()
        texts[5] = LONG
        tables[1] = tables[1].set_column(1, "text", pa.array(texts))
        tables.append(pa.table({"id": np.arange(36, 44), "text": film_texts(8, 9)}))
    write_shards(folder, tables)
    return folder


def _same_folder(got_out, expected_out):
    """Equal rows in every representation (faiss_id aside: labels differ by history)."""
    from helpers import read_vectors
    from pipeline.io.ledger import Ledger
    from pipeline.io.multivectors import read_multivectors

    got, expected = read_vectors(got_out), read_vectors(expected_out)
    for name in ("id", "sparse_indices", "n_tokens", "truncated", "text_hash"):
        assert got.column(name).equals(expected.column(name)), name
    a, b = open_output(str(got_out)), open_output(str(expected_out))
    np.testing.assert_allclose(a.vectors(), b.vectors(), atol=1e-6)
    np.testing.assert_allclose(a.sparse().toarray(), b.sparse().toarray(), atol=1e-6)
    mine = read_multivectors(a.store, Ledger(a.store).multivector_files())
    theirs = read_multivectors(b.store, Ledger(b.store).multivector_files())
    assert [len(m) for m in mine] == [len(t) for t in theirs]
    for m, t in zip(mine, theirs):
        np.testing.assert_allclose(m, t, atol=1e-6)


def test_incremental_run_reuses_rows_and_equals_a_clean_run(m3_folder, tmp_path):
    def job(out, **encode):
        return make_job(tmp_path / "in", tmp_path / out, m3_folder, model={"dtype": "float32"},
                        encode=encode, output={"representations": ALL, "rows_per_file": 10})

    _shards(tmp_path / "in")
    assert run(job("out")).rows_encoded == 36
    _shards(tmp_path / "in", changed=True)
    night = run(job("out"))
    assert night.rows_encoded == 1 + 8 and night.rows_reused == 35
    assert set(night.representation_bytes) == set(ALL)
    clean = run(job("clean", reuse="off"))
    assert clean.rows_encoded == 44
    _same_folder(tmp_path / "out", tmp_path / "clean")
    assert embedpipe("verify", tmp_path / "out").returncode == 0


def test_repeated_texts_are_copied_and_rejects_counted(m3_folder, tmp_path):
    from pipeline.io.ledger import Ledger
    from pipeline.io.multivectors import read_multivectors

    texts = film_texts(6) * 3 + ["   ", None]
    pq.write_table(pa.table({"id": np.arange(20), "text": texts}), tmp_path / "in.parquet")
    summary = run(make_job(tmp_path / "in.parquet", tmp_path / "out", m3_folder,
                           model={"dtype": "float32"}, output={"representations": ALL}))
    assert (summary.rows_encoded, summary.rows_copied) == (6, 12)
    assert summary.rejects == {"empty text": 1, "null text": 1}
    folder = open_output(str(tmp_path / "out"))
    dense, rows = folder.vectors(), folder.sparse().toarray()
    multi = read_multivectors(folder.store, Ledger(folder.store).multivector_files())
    for copy in (6, 12):
        np.testing.assert_array_equal(dense[:6], dense[copy:copy + 6])
        np.testing.assert_array_equal(rows[:6], rows[copy:copy + 6])
        for a, b in zip(multi[:6], multi[copy:copy + 6]):
            np.testing.assert_array_equal(a, b)


@pytest.mark.slow  # three CLI runs and a verify: about a minute on a shared CPU
def test_killed_run_then_rerun_equals_a_clean_run(m3_folder, tmp_path):
    _shards(tmp_path / "in")
    sections = {"model": {"dtype": "float32"}, "output": {"representations": ALL}}
    clean = small_job(tmp_path / "clean.toml", tmp_path / "in", tmp_path / "clean", m3_folder,
                      **sections)
    assert embedpipe("run", clean).returncode == 0
    job = small_job(tmp_path / "job.toml", tmp_path / "in", tmp_path / "out", m3_folder,
                    **sections)
    from helpers import run_and_kill
    run_and_kill(job, "write", tmp_path)
    rerun = embedpipe("run", job)
    assert rerun.returncode == 0, rerun.stderr
    _same_folder(tmp_path / "out", tmp_path / "clean")
    verified = embedpipe("verify", tmp_path / "out")
    assert verified.returncode == 0 and "+ sparse + multivector" in verified.stdout, verified.stdout
    # the config guard: representations is a vector setting
    changed = small_job(tmp_path / "changed.toml", tmp_path / "in", tmp_path / "out", m3_folder,
                        model={"dtype": "float32"},
                        output={"representations": ["dense", "sparse"]})
    refused = embedpipe("run", changed)
    assert refused.returncode == 2 and "representations" in refused.stderr, refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1


def test_a_folder_without_dense_vectors_ranks_by_its_one_representation(m3_folder, m3_input,
                                                                         tmp_path):
    from pipeline.commands.hybrid_search import HybridSearcher

    summary = run(_job(m3_input, tmp_path / "sparse", m3_folder, ["sparse"]))
    assert "no FAISS index: no dense vectors stored" in summary.recipe
    assert not (tmp_path / "sparse" / "index").exists()
    folder = open_output(str(tmp_path / "sparse"))
    assert folder.representations == ("sparse",)
    _, q_sparse, _ = reference(m3_folder, QUERIES[:1])
    stored = folder.sparse().toarray()
    scores = stored[:, list(q_sparse[0])] @ np.array(list(q_sparse[0].values()))
    hits = _hits(HybridSearcher(str(tmp_path / "sparse"), fuse=False), QUERIES[:1], 5)[0]
    assert [h[0] for h in hits] == np.lexsort((np.arange(len(scores)), -scores))[:5].tolist()
    np.testing.assert_allclose([h[1] for h in hits], np.sort(scores)[::-1][:5], rtol=1e-5)


def test_a_changed_head_is_refused_by_the_config_guard(m3_folder, m3_input, tmp_path):
    import shutil
    import torch

    from pipeline.io.ledger import SettingsMismatch

    folder = shutil.copytree(m3_folder, tmp_path / "m3")
    job = _job(m3_input, tmp_path / "out", folder, ["dense", "sparse"])
    assert not run(job).failures
    torch.manual_seed(7)
    torch.save(torch.nn.Linear(32, 1).state_dict(), folder / "sparse_linear.pt")
    with pytest.raises(SettingsMismatch, match="model.fingerprint"):
        run(job)
