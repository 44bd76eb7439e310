"""Vectors equal independent references: sentence-transformers, and hand-pooled hidden states."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch

from helpers import encoder_for, make_job, matrix, read_vectors, run, write_shards
from pipeline.encode.batching import collate
from pipeline.encode.encoder import EncoderSettings
from pipeline.encode.tokenizer import TextTokenizer


@pytest.fixture(scope="module")
def texts_dir(tmp_path_factory, mixed_texts):
    folder = tmp_path_factory.mktemp("parity_input")
    half = len(mixed_texts) // 2
    write_shards(folder, [pa.table({"id": pa.array(range(a, b), pa.int64()),
                                    "text": mixed_texts[a:b]})
                          for a, b in ((0, half), (half, len(mixed_texts)))])
    return folder


def embed(texts_dir, tmp_path, **encode) -> np.ndarray:
    out = tmp_path / "out"
    summary = run(make_job(texts_dir, out, encode=encode, index={"enabled": False}))
    table = read_vectors(out)
    assert table.column("id").to_pylist() == list(range(summary.rows_read))
    return matrix(table)


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def test_mean_normalized_equals_sentence_transformers(texts_dir, tmp_path, mixed_texts, bundled_model):
    from sentence_transformers import SentenceTransformer

    ours = embed(texts_dir, tmp_path, pooling="mean", normalize=True)
    reference = SentenceTransformer(str(bundled_model.path), device="cpu").encode(
        mixed_texts, batch_size=32, convert_to_numpy=True, normalize_embeddings=True)
    assert ours.shape == reference.shape == (len(mixed_texts), 384)
    cos = cosines(ours, reference)
    assert cos.min() >= 0.99999, f"min cosine {cos.min():.7f}"
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)


def hidden_states_alone(model_path, texts, max_length):
    """Each text through AutoModel on its own: no padding anywhere."""
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModel.from_pretrained(model_path).eval()
    with torch.no_grad():
        for text in texts:
            enc = tokenizer(text, truncation=True, max_length=max_length, return_tensors="pt")
            yield model(**enc, output_hidden_states=True).hidden_states


def test_cls_and_concat_last_four_equal_direct_computation(texts_dir, tmp_path, mixed_texts,
                                                           bundled_model):
    cls = embed(texts_dir, tmp_path / "cls", pooling="cls")
    c4 = embed(texts_dir, tmp_path / "c4", pooling="concat-last-four")
    assert c4.shape[1] == 4 * 384
    sample = list(range(0, len(mixed_texts), 6))  # every 6th text keeps the test quick
    for i, states in zip(sample, hidden_states_alone(bundled_model.path,
                                                     [mixed_texts[i] for i in sample], 256)):
        expected_cls = states[-1][0, 0].numpy()
        per_token = torch.cat([states[-4], states[-3], states[-2], states[-1]], dim=-1)[0]
        expected_c4 = per_token.mean(0).numpy()
        np.testing.assert_allclose(cls[i], expected_cls, atol=1e-4, rtol=1e-4)
        np.testing.assert_allclose(c4[i], expected_c4, atol=1e-4, rtol=1e-4)


def test_general_layer_form_matches_hand_pooling(texts_dir, tmp_path, mixed_texts, bundled_model):
    got = embed(texts_dir, tmp_path, layers=[0, 3], layer_combine="sum", token_pooling="max")
    sample = [0, 5, 201, 239]
    for i, states in zip(sample, hidden_states_alone(bundled_model.path,
                                                     [mixed_texts[i] for i in sample], 256)):
        expected = (states[0] + states[3])[0].max(0).values.numpy()
        np.testing.assert_allclose(got[i], expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("pooling", ["mean", "cls", "concat-last-four"])
def test_vector_does_not_depend_on_batch_mates(bundled_model, mixed_texts, pooling):
    from pipeline.config import POOLING_PRESETS

    layers, combine, token = POOLING_PRESETS[pooling]
    encoder = encoder_for(bundled_model, "cpu", "float32", EncoderSettings(layers, combine, token, False))
    tokenizer = TextTokenizer(bundled_model.path, 256)
    short = mixed_texts[3]
    batch_texts = [short] + sorted(mixed_texts[200:], key=len)[-7:]  # 7 much longer texts
    tokens = tokenizer(batch_texts)
    assert tokens.n_tokens[0] * 4 < max(tokens.n_tokens[1:])
    alone = encoder.encode(*_tensors(collate(tokens.ids, np.array([0]), tokenizer.pad_id)))
    together = encoder.encode(*_tensors(collate(tokens.ids, np.arange(len(batch_texts)),
                                                tokenizer.pad_id)))
    assert np.abs(alone[0] - together[0]).max() <= 1e-5


def _tensors(batch):
    return batch.input_ids, batch.attention_mask
