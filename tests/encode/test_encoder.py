"""The encoder's fast paths: bf16 on CPU, dtype auto, OOM back-off, vectorised collate, model cache.

References are independent: sentence-transformers' own vectors, and the float32 encoder.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from helpers import encoder_for, runtime_for
from pipeline.config import ConfigError, ModelConfig
from pipeline.runtime import hardware, runtime as runtime_mod
from pipeline.encode.batching import collate, encode_texts, plan_batches
from pipeline.encode.encoder import Encoder, EncoderSettings, _trim
from pipeline.runtime.runtime import AUTO_COMPILE_ROWS, WARM_COMPILE_ROWS
from pipeline.encode.tokenizer import TextTokenizer

MEAN = EncoderSettings(layers=(-1,), layer_combine="concat", token_pooling="mean", normalize=True)


def _encode_all(encoder: Encoder, tokenizer: TextTokenizer, texts: list[str],
                batch_tokens: int = 8192) -> np.ndarray:
    return encode_texts(tokenizer, encoder, texts, batch_tokens, 256)


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


@pytest.fixture(scope="module")
def tokenizer(bundled_model):
    return TextTokenizer(bundled_model.path, bundled_model.max_length)


@pytest.fixture(scope="module")
def st_vectors(bundled_model, mixed_texts):
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(bundled_model.path), device="cpu")
    return model.encode(mixed_texts, batch_size=32, convert_to_numpy=True)


@pytest.fixture(scope="module")
def fp32_vectors(bundled_model, tokenizer, mixed_texts):
    return _encode_all(encoder_for(bundled_model, "cpu", "float32", MEAN), tokenizer, mixed_texts)


def test_float32_equals_sentence_transformers(fp32_vectors, st_vectors):
    assert _cos(fp32_vectors, st_vectors).min() >= 0.99999


def test_bfloat16_on_cpu_keeps_every_row_within_cosine_0999(bundled_model, tokenizer, mixed_texts,
                                                          fp32_vectors, st_vectors):
    bf16 = _encode_all(encoder_for(bundled_model, "cpu", "bfloat16", MEAN), tokenizer, mixed_texts)
    assert _cos(bf16, st_vectors).min() >= 0.999
    assert _cos(bf16, fp32_vectors).min() >= 0.999
    # and it really ran in lower precision: not bit-equal to float32
    assert not np.allclose(bf16, fp32_vectors, atol=1e-6)


@pytest.mark.parametrize("cache", ["1", "0"])
def test_compiled_bfloat16_keeps_every_row_within_cosine_0999(bundled_model, tokenizer, mixed_texts,
                                                            st_vectors, cache, tmp_path,
                                                            monkeypatch):
    """model.compile: Inductor with frozen weights, through the persistent compile cache (the
    default: no oneDNN weight prepacking), or uncached with prepacked weights, must give the
    vectors the eager model gives, within the bf16 bar."""
    import torch._inductor.config as inductor_config

    monkeypatch.setenv("EMBEDPIPE_CACHE", str(tmp_path))
    monkeypatch.setenv("EMBEDPIPE_COMPILE_CACHE", cache)
    encoder = encoder_for(bundled_model, "cpu", "bfloat16", MEAN, compile=True)
    assert isinstance(encoder.model, torch._dynamo.eval_frame.OptimizedModule)
    assert (encoder.runtime.compile_cache is not None) == (cache == "1")
    seen = []
    real_forward = encoder.model.forward

    def forward(*args, **kwargs):
        seen.append((inductor_config.freezing, inductor_config.cpp.weight_prepack))
        return real_forward(*args, **kwargs)

    monkeypatch.setattr(encoder.model, "forward", forward)
    compiled = _encode_all(encoder, tokenizer, mixed_texts, batch_tokens=4096)
    assert set(seen) == {(True, cache == "0")}  # always frozen; prepacked only when uncached
    assert _cos(compiled, st_vectors).min() >= 0.999
    entries = list((tmp_path / "inductor" / "embedpipe-entries").glob("*.json"))
    assert len(entries) == (cache == "1")


@pytest.mark.parametrize("requested, device, dtype, rows, warm, expected", [
    ("auto", "cpu", "bfloat16", AUTO_COMPILE_ROWS, False, True),
    ("auto", "cpu", "bfloat16", AUTO_COMPILE_ROWS - 1, False, False),
    ("auto", "cpu", "bfloat16", WARM_COMPILE_ROWS, True, True),  # a warm cache repays sooner
    ("auto", "cpu", "bfloat16", WARM_COMPILE_ROWS - 1, True, False),
    ("auto", "cpu", "bfloat16", WARM_COMPILE_ROWS, False, False),
    ("auto", "cpu", "float32", 10 * AUTO_COMPILE_ROWS, True, False),  # no gain measured in fp32
    ("auto", "cuda", "bfloat16", 10 * AUTO_COMPILE_ROWS, True, False),  # not measured on a GPU
    (True, "cpu", "float32", 1, False, True),
    (False, "cpu", "bfloat16", 10 * AUTO_COMPILE_ROWS, True, False),
])
def test_compile_auto_goes_by_the_inputs_rows_and_the_cache(requested, device, dtype, rows, warm,
                                                            expected):
    compiled, why = runtime_mod._compile(requested, torch.device(device), dtype, rows, warm)
    assert compiled is expected
    assert why.startswith("auto: " if requested == "auto" else "compile = ")
    if requested == "auto" and device == "cpu" and dtype == "bfloat16":
        assert ("warm compile cache" in why and "no warm" not in why) == warm


def test_compile_auto_leaves_the_fused_forward_eager(bundled_model):
    """The fused forward runs faster eagerly than transformers' compiled (docs/performance/amd-zen5.md): auto never
    compiles where it runs, however long the input; an explicit compile takes transformers'."""
    compiled, why = runtime_mod._compile("auto", torch.device("cpu"), "bfloat16",
                                         10 * AUTO_COMPILE_ROWS, True, fused=True)
    assert not compiled and "fused forward" in why
    for cpu in (AMX_CPU, AVX512_CPU):  # CPUs with oneDNN bf16 products, made by hand
        runtime = runtime_mod.resolve_runtime(ModelConfig(dtype="bfloat16"), bundled_model,
                                              10 * AUTO_COMPILE_ROWS, cpu=cpu)
        assert (runtime.compile, runtime.forward) == (False, "fused")
        assert runtime_for(bundled_model, dtype="bfloat16", compile=True,
                           cpu=cpu).forward == "transformers"
    # an AVX2 CPU has no oneDNN bf16 products: bf16 there is transformers' forward, compiled
    runtime = runtime_mod.resolve_runtime(ModelConfig(dtype="bfloat16"), bundled_model,
                                          10 * AUTO_COMPILE_ROWS, cpu=AVX2_CPU)
    assert (runtime.compile, runtime.forward) == (True, "transformers")
    float32 = runtime_mod.resolve_runtime(ModelConfig(dtype="float32"), bundled_model,
                                          10 * AUTO_COMPILE_ROWS, cpu=AVX2_CPU)
    assert (float32.compile, float32.forward) == (False, "fused")


def test_bfloat16_on_cpu_casts_only_the_linear_weights(bundled_model):
    model = encoder_for(bundled_model, "cpu", "bfloat16", MEAN, forward="transformers").model
    linear = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    norms = [m for m in model.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert linear and norms
    assert all(m.weight.dtype == torch.bfloat16 for m in linear)
    assert all(m.weight.dtype == torch.float32 for m in norms)
    assert model.embeddings.word_embeddings.weight.dtype == torch.float32


def test_models_are_loaded_once_per_device_and_dtype(bundled_model):
    a = encoder_for(bundled_model, "cpu", "float32", MEAN)
    b = encoder_for(bundled_model, "cpu", "float32", EncoderSettings((-1,), "concat", "cls", False))
    c = encoder_for(bundled_model, "cpu", "bfloat16", MEAN)
    assert a.model is b.model
    assert c.model is not a.model
    d = encoder_for(bundled_model, "cpu", "float32", MEAN, forward="transformers")
    assert d.model is not a.model  # the forward is part of the key too
    assert next(d.model.parameters()).dtype == torch.float32


AMX_CPU = hardware.cpu_with("amx_bf16", "amx_tile", "avx512_bf16", "avx512f", "avx512bw",
                            "avx512vl", "avx512dq")
AVX512_CPU = hardware.cpu_with("avx512_bf16", "avx512f", "avx512bw", "avx512vl", "avx512dq")
AVX2_CPU = hardware.cpu_with("avx2", "fma")


@pytest.mark.parametrize("cpu, expected", [(AMX_CPU, "bfloat16"), (AVX512_CPU, "bfloat16"),
                                           (AVX2_CPU, "float32"), (hardware.cpu_with(), "float32")])
def test_auto_dtype_on_cpu_follows_the_cpu(cpu, expected):
    device = torch.device("cpu")
    assert runtime_mod._dtype("auto", device, cpu) == expected
    assert runtime_mod._dtype_note("auto", device, expected, cpu).startswith(f"{expected} (auto: CPU ")
    assert runtime_mod._dtype("float32", device, cpu) == "float32"


def test_explicit_bfloat16_on_a_cpu_without_it_warns_once_and_says_so(caplog):
    """Emulated bf16 runs (the user asked for it) with one warning naming the cost and the fix;
    the summary's dtype note says it too. A CPU with native bf16 gets no warning."""
    device = torch.device("cpu")
    runtime_mod._warn_emulated_bf16.cache_clear()
    with caplog.at_level("WARNING", logger="pipeline.runtime.runtime"):
        assert runtime_mod._dtype("bfloat16", device, AVX512_CPU) == "bfloat16"
        assert not caplog.records
        for _ in range(2):
            assert runtime_mod._dtype("bfloat16", device, AVX2_CPU) == "bfloat16"
    assert len(caplog.records) == 1
    message = caplog.records[0].getMessage()
    assert "emulated" in message and "slower than float32" in message and "'float32'" in message
    assert "emulated" in runtime_mod._dtype_note("bfloat16", device, "bfloat16", AVX2_CPU)
    assert runtime_mod._dtype_note("bfloat16", device, "bfloat16", AVX512_CPU) == "bfloat16"


@pytest.mark.parametrize("bf16_ok, expected", [(True, "bfloat16"), (False, "float16")])
def test_auto_dtype_on_cuda_is_half(monkeypatch, bf16_ok, expected):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16_ok)
    assert runtime_mod._dtype("auto", torch.device("cuda"), AVX2_CPU) == expected
    assert runtime_mod._dtype_note("auto", torch.device("cuda"), expected, AVX2_CPU).startswith(
        f"{expected} (auto: GPU")


def test_float16_on_cpu_is_a_config_error():
    with pytest.raises(ConfigError, match="float16"):
        runtime_mod._dtype("float16", torch.device("cpu"), AMX_CPU)


def test_device_auto_picks_cuda_when_present(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert runtime_mod._device("auto").type == "cuda"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert runtime_mod._device("auto").type == "cpu"
    with pytest.raises(ConfigError, match="no CUDA"):
        runtime_mod._device("cuda")


def test_out_of_memory_halves_the_batch_and_keeps_every_row(bundled_model, tokenizer, mixed_texts,
                                                            monkeypatch):
    encoder = encoder_for(bundled_model, "cpu", "float32", MEAN)
    texts = mixed_texts[:40] + mixed_texts[-8:]  # short and long rows in one batch
    tokens = tokenizer(texts)
    batch = collate(tokens.ids, np.arange(len(texts)), tokenizer.pad_id)
    reference = encoder.encode(batch.input_ids, batch.attention_mask)

    limit = 6 * batch.input_ids.shape[1]  # the device "holds" 6 rows of the full width
    real_forward, seen = encoder._forward, []

    def forward(input_ids, attention_mask):
        seen.append(tuple(input_ids.shape))
        if input_ids.numel() > limit:
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return real_forward(input_ids, attention_mask)

    monkeypatch.setattr(encoder, "_forward", forward)
    vectors = encoder.encode(batch.input_ids, batch.attention_mask)
    assert vectors.shape == reference.shape
    assert _cos(vectors, reference).min() >= 0.99999  # same rows, same order, none dropped
    first_splits = encoder.oom_splits
    assert first_splits >= 2  # 48 rows -> 24 -> 12 (-> 6) before the batches fit
    # Halves were trimmed to their own longest row: a half of short rows is narrower.
    assert min(width for _, width in seen) < batch.input_ids.shape[1]

    # Later batches are split before they reach the device: the errors do not all repeat.
    seen[:], cap = [], encoder.token_cap
    again = encoder.encode(batch.input_ids, batch.attention_mask)
    assert encoder.oom_splits - first_splits < first_splits
    assert all(rows * width <= cap or rows == 1 for rows, width in seen)
    assert _cos(again, reference).min() >= 0.99999


def test_out_of_memory_on_a_single_row_is_raised(bundled_model, tokenizer, monkeypatch):
    encoder = encoder_for(bundled_model, "cpu", "float32", MEAN)

    def forward(input_ids, attention_mask):
        raise torch.OutOfMemoryError("CUDA out of memory (injected)")

    monkeypatch.setattr(encoder, "_forward", forward)
    batch = collate(tokenizer(["a single row"]).ids, np.array([0]), tokenizer.pad_id)
    with pytest.raises(torch.OutOfMemoryError):
        encoder.encode(batch.input_ids, batch.attention_mask)


def test_trim_keeps_the_cuda_alignment():
    mask = torch.tensor([[1] * 11 + [0] * 13, [1] * 3 + [0] * 21])
    ids = torch.arange(48).reshape(2, 24)
    assert _trim(ids, mask)[0].shape == (2, 11)
    assert _trim(ids, mask, 8)[0].shape == (2, 16)
    assert _trim(ids[1:], mask[1:], 8)[1].shape == (1, 8)


def test_collate_pads_each_batch_to_its_longest_row():
    ids = [[101, 7, 8, 102], [101, 102], [101, 5, 6, 7, 8, 9, 102]]
    positions = np.array([2, 0, 1])
    batch = collate(ids, positions, pad_id=0, pad_to_multiple_of=8)
    assert batch.input_ids.shape == (3, 8) and batch.input_ids.dtype == torch.int64
    for row, p in enumerate(positions):
        n = len(ids[p])
        assert batch.input_ids[row, :n].tolist() == ids[p]
        assert batch.input_ids[row, n:].eq(0).all()
        assert batch.attention_mask[row].tolist() == [1] * n + [0] * (8 - n)
    assert (batch.real_tokens, batch.padded_tokens) == (13, 24)
    assert collate(ids, positions, pad_id=0).input_ids.shape == (3, 7)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_half_precision_within_cosine_0999(bundled_model, tokenizer, mixed_texts, fp32_vectors):
    encoder = encoder_for(bundled_model, "cuda", "auto", MEAN)
    assert encoder.dtype in ("bfloat16", "float16") and encoder.pad_multiple == 8
    tokens = tokenizer(mixed_texts)
    lengths = np.array([len(x) for x in tokens.ids])
    out = np.zeros_like(fp32_vectors)
    for positions in plan_batches(lengths, 8192, 256):
        batch = collate(tokens.ids, positions, tokenizer.pad_id, 8, pin_memory=True)
        assert batch.input_ids.is_pinned()
        out[positions] = encoder.encode(batch.input_ids, batch.attention_mask)
    assert _cos(out, fp32_vectors).min() >= 0.999
