"""encode/sparse.py's SparseEncoder on its own: the vocabulary projection on the real tokens only
(max taken before relu + log1p) equals sentence-transformers' SparseEncoder and the whole-logits
forward, for max and sum pooling and rows of mixed length; an out-of-memory error halves the batch
as the dense encoder does, keeping every row."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from helpers import film_texts, runtime_for
from pipeline.encode.sparse import SparseEncoder, SparseSettings

TEXTS = film_texts(30) + [" ".join(["a slow and warm ending to a long film"] * 9), "ok"]


@pytest.fixture(scope="module")
def splade_folder(tmp_path_factory, bundled_model):
    from sentence_transformers import SparseEncoder as STSparse
    from sentence_transformers.sparse_encoder.modules import MLMTransformer, SpladePooling
    from transformers import AutoTokenizer, BertConfig, BertForMaskedLM

    torch.manual_seed(3)
    root = tmp_path_factory.mktemp("sparse_encoder")
    BertForMaskedLM(BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2,
                               num_attention_heads=2, intermediate_size=64,
                               max_position_embeddings=128)).eval().save_pretrained(root / "mlm")
    AutoTokenizer.from_pretrained(bundled_model.path).save_pretrained(root / "mlm")
    folders = {}
    for pooling in ("max", "sum"):
        STSparse(modules=[MLMTransformer(str(root / "mlm"), max_seq_length=64),
                          SpladePooling(pooling)]).save(str(root / pooling))
        folders[pooling] = root / pooling
    return folders


def _batch(folder):
    from transformers import AutoTokenizer
    enc = AutoTokenizer.from_pretrained(folder)(TEXTS, padding=True, truncation=True,
                                                max_length=64, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


def _encoder(folder, pooling, dims=None):
    from pipeline.models.model_files import resolve_model
    source = resolve_model(str(folder))
    return SparseEncoder(source, runtime_for(source), SparseSettings(pooling, dims))


@pytest.mark.parametrize("pooling", ["max", "sum"])
@pytest.mark.parametrize("group", [None, 40])  # 40: many groups, some of one (long) row
def test_real_token_projection_equals_sentence_transformers(splade_folder, pooling, group,
                                                            monkeypatch):
    from sentence_transformers import SparseEncoder as STSparse

    if group:
        monkeypatch.setattr("pipeline.encode.sparse.HEAD_TOKENS", group)

    encoder = _encoder(splade_folder[pooling], pooling)
    assert encoder.split is not None  # BertForMaskedLM: the real-token path
    ids, mask = _batch(splade_folder[pooling])
    got = encoder.encode(ids, mask).numpy()
    expected = STSparse(str(splade_folder[pooling]), device="cpu").encode_document(
        TEXTS, batch_size=8).coalesce().to_dense().numpy()
    np.testing.assert_array_equal(got != 0, expected != 0)
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)
    encoder.split = None  # the whole [batch, tokens, vocabulary] logits, as before
    np.testing.assert_allclose(encoder.encode(ids, mask).numpy(), got, atol=1e-5, rtol=0)


def test_out_of_memory_halves_the_sparse_batch_and_keeps_every_row(splade_folder, monkeypatch):
    encoder = _encoder(splade_folder["max"], "max", dims=40)
    ids, mask = _batch(splade_folder["max"])
    reference = encoder.encode(ids, mask).numpy()
    limit = 6 * ids.shape[1]  # the device "holds" 6 rows of the full width
    real_forward, seen = encoder._forward, []

    def forward(input_ids, attention_mask, *types):
        seen.append(tuple(input_ids.shape))
        if input_ids.numel() > limit:
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return real_forward(input_ids, attention_mask, *types)

    monkeypatch.setattr(encoder, "_forward", forward)
    rows = encoder.encode(ids, mask).numpy()
    np.testing.assert_allclose(rows, reference, atol=1e-5, rtol=0)  # same rows, same order
    first = encoder.oom_splits
    assert first >= 2 and min(w for _, w in seen) < ids.shape[1]  # halves trimmed
    seen[:] = []
    np.testing.assert_allclose(encoder.encode(ids, mask).numpy(), reference, atol=1e-5, rtol=0)
    assert encoder.oom_splits - first < first  # later batches split before the device
    assert all(r * w <= encoder.token_cap or r == 1 for r, w in seen)


def test_out_of_memory_on_one_sparse_row_is_raised(splade_folder, monkeypatch):
    encoder = _encoder(splade_folder["max"], "max")

    def forward(*args):
        raise torch.OutOfMemoryError("CUDA out of memory (injected)")

    monkeypatch.setattr(encoder, "_forward", forward)
    ids, mask = _batch(splade_folder["max"])
    with pytest.raises(torch.OutOfMemoryError):
        encoder.encode(ids[:1], mask[:1])
