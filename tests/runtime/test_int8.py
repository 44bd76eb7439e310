"""dtype = "int8": the fused forward's weight products through fbgemm's dynamic int8 linear.
Checked against an int8 product computed in numpy from the same scales, and the model against
transformers' float32 forward."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from helpers import encoder_for, runtime_for
from pipeline.config import ConfigError
from pipeline.runtime import fused_forward, hardware
from pipeline.encode.batching import encode_texts
from pipeline.encode.encoder import EncoderSettings
from pipeline.runtime.fused_forward import FusedForward, Int8Product
from pipeline.encode.tokenizer import TextTokenizer


INT8 = fused_forward.onednn_products("int8", hardware.this_cpu()) and hardware.this_cpu().exact_int8
needs_int8 = pytest.mark.skipif(not INT8, reason="int8 runs where fbgemm has exact int8 products "
                                "(AVX-512 VNNI), not on this CPU")
MEAN = EncoderSettings(layers=(-1,), layer_combine="concat", token_pooling="mean", normalize=True)


def _numpy_int8(x: np.ndarray, w: np.ndarray, b: np.ndarray) -> np.ndarray:
    """x @ w.T + b as an int8 product: x to uint8 over its range (zero included), one scale;
    w to int8 per row, symmetric; exact integer sums; then scaled back."""
    lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    sx = np.float32((hi - lo) / 255)
    zx = int(np.clip(np.round(-lo / sx), 0, 255))
    # as fbgemm rounds: x times the float32 inverse of the scale, to nearest even
    qx = np.clip(np.rint(x.astype(np.float32) * (np.float32(1) / sx)) + zx, 0, 255).astype(np.int64)
    sw = np.maximum(np.abs(w).max(1) / np.float32(127), np.float32(1e-12))  # float32, as torch
    qw = np.clip(np.rint(w / sw[:, None]), -127, 127).astype(np.int64)
    step = np.float64(sx) * sw.astype(np.float64)  # one unit of the int32 sum, per column
    return ((qx - zx) @ qw.T) * step[None, :] + b, step


@needs_int8
@pytest.mark.parametrize("rows,inner,outer", [(1, 384, 1152), (37, 384, 1536), (300, 1536, 384),
                                              (5, 64, 3)])
def test_the_int8_product_is_an_int8_product(rows, inner, outer):
    gen = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, inner, generator=gen) * 3
    x[:, 5] *= 20  # an outlier dimension, as the residual stream of MiniLM has
    w = torch.randn(outer, inner, generator=gen) * 0.05
    b = torch.randn(outer, generator=gen)
    got = Int8Product(w, b)(x).numpy()
    want, step = _numpy_int8(x.numpy(), w.numpy(), b.numpy())
    off = np.abs(got - want)
    # the same integers, but for a value exactly halfway between two levels rounded the other
    # way (one activation: <= 127 units of its row; one weight: <= 255 units of its column)
    assert (off > 1e-4 * np.abs(want).max()).mean() <= 0.05
    assert (off <= 255 * step[None, :] + 1e-4 * np.abs(want).max()).all()
    # and it is not the float32 product
    assert np.abs(got - (x @ w.T + b).numpy()).max() > 1e-3


@needs_int8
def test_tiny_models_in_int8_against_transformers_float32():
    import transformers as tf

    for kind, act in (("bert", "gelu"), ("xlm-roberta", "relu"), ("distilbert", "gelu")):
        if kind == "distilbert":
            config = tf.DistilBertConfig(vocab_size=120, dim=64, n_layers=3, n_heads=2,
                                         hidden_dim=128, max_position_embeddings=80,
                                         activation=act, pad_token_id=1)
        else:
            config = tf.AutoConfig.for_model(kind, vocab_size=120, hidden_size=64,
                                             num_hidden_layers=3, num_attention_heads=2,
                                             intermediate_size=128, max_position_embeddings=80,
                                             hidden_act=act, pad_token_id=1)
        torch.manual_seed(len(kind))
        model = tf.AutoModel.from_config(config, attn_implementation="sdpa").eval()
        ids = torch.randint(3, 120, (4, 21))
        mask = torch.ones_like(ids)
        mask[1, 9:] = 0
        with torch.inference_mode():
            want = model(input_ids=ids, attention_mask=mask).last_hidden_state
            got = FusedForward(model.state_dict(), config, torch.float32, "sdpa",
                               int8=True)(ids, mask).last_hidden_state
        real = mask.bool()
        cos = torch.nn.functional.cosine_similarity(got[real], want[real], dim=-1)
        assert cos.min().item() >= 0.99, kind
        assert (got[real] - want[real]).abs().max().item() > 1e-4, kind  # it ran in int8


@needs_int8
def test_the_bundled_model_in_int8_against_transformers_float32(bundled_model, mixed_texts):
    """Every row's cosine to transformers' float32 vector >= 0.97 (measured: 0.987 on 60 bench
    texts; docs/performance/amd-zen5.md, "int8")."""
    tok = TextTokenizer(bundled_model.path, bundled_model.max_length)
    ref = encode_texts(tok, encoder_for(bundled_model, "cpu", "float32", MEAN,
                                        forward="transformers"), mixed_texts, 4096, 256)
    enc = encoder_for(bundled_model, "cpu", "int8", MEAN)
    assert (enc.runtime.dtype, enc.runtime.forward, enc.runtime.attention) == ("int8", "fused", "sdpa")
    got = encode_texts(tok, enc, mixed_texts, 4096, 256)
    cos = (got * ref).sum(1)
    assert cos.min() >= 0.97
    assert cos.min() < 0.9999  # it ran in int8


CPUS = {"amx": hardware.cpu_with("amx_bf16", "amx_tile", "avx512_bf16", "avx512f", "avx512bw",
                                 "avx512vl", "avx512dq", "avx512_vnni", "avx2", "fma"),
        "avx512": hardware.cpu_with("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_bf16",
                                    "avx512_vnni", "avx2", "fma"),
        "avx2": hardware.cpu_with("avx2", "fma")}


def test_int8_is_refused_where_its_products_would_saturate(bundled_model):
    """An AVX2 CPU: fbgemm's VPMADDUBSW saturates (up to half an output's range off, measured
    with FBGEMM_ENABLE_INSTRUCTIONS=AVX2), so int8 there would be wrong vectors: refused."""
    with pytest.raises(ConfigError, match="int8.*needs AVX-512 VNNI.*saturate"):
        runtime_for(bundled_model, dtype="int8", cpu=CPUS["avx2"])
    assert runtime_for(bundled_model, dtype="int8", cpu=CPUS["avx512"]).dtype == "int8"


@pytest.mark.parametrize("cpu", sorted(CPUS))
def test_auto_never_picks_int8(bundled_model, cpu):
    assert runtime_for(bundled_model, dtype="auto", cpu=CPUS[cpu]).dtype != "int8"


@needs_int8
def test_int8_runs_in_the_fused_forward_only(bundled_model):
    with pytest.raises(ConfigError, match="int8.*fused forward only"):
        runtime_for(bundled_model, dtype="int8", forward="transformers")
    with pytest.raises(ConfigError, match="int8.*fused forward only"):
        runtime_for(bundled_model, dtype="int8", compile=True)
