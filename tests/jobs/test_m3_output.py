"""BGE-M3 folders (issue #28 item 3): dense, sparse and multivector rows from one forward of the
body, against BGEM3FlagModel's arithmetic written out with transformers' AutoModel and the head
files (tests/m3_build.py), texts past the position limit included; the heads refused by name."""
from __future__ import annotations

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
    """dense + sparse, the body's forwards and M3Encoder's batches counted."""
    import torch
    from transformers import XLMRobertaModel

    from pipeline.encode.m3_heads import M3Encoder

    out = tmp_path_factory.mktemp("m3_runs") / "dense-sparse"
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
        summary = run(_job(m3_input, out, m3_folder, ["dense", "sparse"]))
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


def test_dense_and_sparse_equal_the_direct_computation(m3_folder, m3_run):
    out, counts, _ = m3_run
    dense, sparse, _ = reference(m3_folder, TEXTS)
    folder = open_output(str(out))
    assert folder.representations == ("dense", "sparse")
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
