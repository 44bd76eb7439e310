"""embedpipe's fused forward (fused_forward.py) against transformers' own forward of the same
weights: every hidden state of each family it takes, the pooler, sentence pairs, bf16 against
float32, and when the runtime chooses it."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from helpers import encoder_for, runtime_for
from pipeline.config import ConfigError
from pipeline.runtime import fused_forward, hardware
from pipeline.encode.batching import encode_texts
from pipeline.encode.encoder import EncoderSettings
from pipeline.runtime.fused_forward import FusedForward
from pipeline.models.model_files import resolve_model
from pipeline.encode.tokenizer import TextTokenizer

MEAN = EncoderSettings(layers=(-1,), layer_combine="concat", token_pooling="mean", normalize=True)
LAST_FOUR = EncoderSettings(layers=(-1, -2, -3, -4), layer_combine="concat", token_pooling="cls",
                            normalize=False)
ONEDNN = fused_forward.onednn_products("float32", hardware.this_cpu())
needs_onednn = pytest.mark.skipif(not ONEDNN, reason="this torch has no oneDNN products")
# each family with another activation, so every epilogue the fused forward maps is exercised
FAMILIES = {"bert": "gelu", "roberta": "gelu_new", "xlm-roberta": "relu",
            "camembert": "gelu_pytorch_tanh", "distilbert": "gelu"}


def _tiny(kind: str, activation: str):
    import transformers as tf

    if kind == "distilbert":  # its own config names
        config = tf.DistilBertConfig(vocab_size=120, dim=64, n_layers=3, n_heads=2, hidden_dim=128,
                                     max_position_embeddings=80, activation=activation,
                                     pad_token_id=1, initializer_range=0.3)
    else:
        config = tf.AutoConfig.for_model(
            kind, vocab_size=120, hidden_size=64, num_hidden_layers=3, num_attention_heads=2,
            intermediate_size=128, max_position_embeddings=80, hidden_act=activation,
            pad_token_id=1, type_vocab_size=2, initializer_range=0.3)
    torch.manual_seed(len(kind))
    model = tf.AutoModel.from_config(config, attn_implementation="sdpa").eval()
    with torch.no_grad():  # non-trivial norms and biases, so none of them can be dropped unseen
        for name, param in model.named_parameters():
            if "LayerNorm" in name or name.endswith("bias"):
                param.add_(torch.randn_like(param) * 0.1)
    return model


def _batch(rows: int, length: int, seed: int):
    """Right-padded ids (as collate makes them), lengths 1..length, and segment ids."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, length + 1, (rows,), generator=gen)
    lengths[0] = length
    mask = (torch.arange(length)[None, :] < lengths[:, None]).long()
    ids = torch.randint(3, 120, (rows, length), generator=gen) * mask + (1 - mask)  # pad id 1
    types = (torch.arange(length)[None, :] >= (lengths[:, None] // 2)).long() * mask
    return ids, mask, types


@needs_onednn
@pytest.mark.parametrize("kind", sorted(FAMILIES))
def test_every_hidden_state_equals_transformers_in_float32(kind):
    model = _tiny(kind, FAMILIES[kind])
    ids, mask, types = _batch(6, 37, seed=3)
    segments = {} if kind == "distilbert" else {"token_type_ids": types}  # DistilBERT has none
    with torch.inference_mode():
        want = model(input_ids=ids, attention_mask=mask, output_hidden_states=True, **segments)
        fused = FusedForward(model.state_dict(), model.config, torch.float32, "sdpa")
        got = fused(ids, mask, types, output_hidden_states=True)
    assert len(got.hidden_states) == len(want.hidden_states) == 4
    real = mask.bool()
    for mine, theirs in zip(got.hidden_states, want.hidden_states):
        assert (mine[real] - theirs[real]).abs().max().item() < 2e-5
    assert (got.last_hidden_state[real] - want.last_hidden_state[real]).abs().max().item() < 2e-5
    if getattr(want, "pooler_output", None) is not None:
        assert (got.pooler_output - want.pooler_output).abs().max().item() < 2e-5
    # segment ids matter (a BERT pair's second text): another segment gives other states
    with torch.inference_mode():
        other = fused(ids, mask, torch.zeros_like(types)).last_hidden_state
    moved = (other[real] - got.last_hidden_state[real]).abs().max().item()
    assert moved > 1e-3 if segments else moved == 0


@needs_onednn
@pytest.mark.parametrize("saved", ["safetensors", "bin", "masked-lm safetensors"])
def test_folders_load_as_transformers_loads_them(tmp_path, bundled_model, saved):
    """From a folder: its safetensors read directly (a masked-LM checkpoint's "bert." names
    too), or a .bin-only folder through transformers; vectors equal transformers' forward."""
    import transformers as tf

    model = _tiny("bert", "gelu")
    folder = tmp_path / "model"
    if saved == "masked-lm safetensors":
        head = tf.BertForMaskedLM(model.config).eval()
        head.bert.load_state_dict(model.state_dict(), strict=False)
        head.save_pretrained(folder)
        model = tf.AutoModel.from_pretrained(folder, attn_implementation="sdpa").eval()
    else:
        model.save_pretrained(folder)
        if saved == "bin":  # (transformers 5 writes safetensors only)
            torch.save(model.state_dict(), folder / "pytorch_model.bin")
            (folder / "model.safetensors").unlink()
    tf.AutoTokenizer.from_pretrained(bundled_model.path).save_pretrained(folder)
    assert any(folder.glob("*.safetensors")) == (saved != "bin")
    source = resolve_model(str(folder))
    encoder = encoder_for(source, "cpu", "float32", MEAN)
    assert isinstance(encoder.model, FusedForward)
    ids, mask, types = _batch(5, 21, seed=9)
    with torch.inference_mode():
        want = model(input_ids=ids.clamp(max=119), attention_mask=mask).last_hidden_state
    got = encoder.model(ids.clamp(max=119), mask).last_hidden_state
    real = mask.bool()
    assert (got[real] - want[real]).abs().max().item() < 2e-5
    assert (encoder.model.pooler is None) == (saved == "masked-lm safetensors")  # no pooler saved


def test_weight_files_that_do_not_match_the_config_are_refused(tmp_path, bundled_model):
    from safetensors.torch import load_file, save_file

    model = _tiny("bert", "gelu")
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    tf_tokenizer = __import__("transformers").AutoTokenizer.from_pretrained(bundled_model.path)
    tf_tokenizer.save_pretrained(folder)
    state = load_file(folder / "model.safetensors")
    del state["encoder.layer.2.output.dense.weight"]
    save_file(state, folder / "model.safetensors")
    with pytest.raises(ConfigError, match="encoder.layer.2.output.dense.weight"):
        encoder_for(resolve_model(str(folder)), "cpu", "float32", MEAN)
    (folder / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ConfigError, match="cannot be read"):
        encoder_for(resolve_model(str(folder)), "cpu", "float32", MEAN)


def _kernels() -> list[str]:
    kinds = ["sdpa"]
    if hardware.this_cpu().amx_bf16:
        kinds.append("amx")
    if hardware.this_cpu().avx512_bf16:
        kinds.append("avx512")
    return kinds


@pytest.fixture(scope="module")
def bundled_vectors(bundled_model, mixed_texts):
    """vectors(dtype, forward, attention, settings) of the mixed texts, each computed once."""
    tokenizer = TextTokenizer(bundled_model.path, bundled_model.max_length)
    done = {}

    def vectors(dtype: str, forward: str, attention: str, settings: EncoderSettings) -> np.ndarray:
        key = (dtype, forward, attention, settings)
        if key not in done:
            encoder = encoder_for(bundled_model, "cpu", dtype, settings, attention=attention,
                                  forward=forward)
            assert encoder.runtime.forward == forward
            done[key] = encode_texts(tokenizer, encoder, mixed_texts, 4096, 256)
        return done[key]
    return vectors


@needs_onednn
@pytest.mark.skipif(not fused_forward.onednn_products("bfloat16", hardware.this_cpu()),
                    reason="this CPU has no oneDNN bf16 products (no AVX-512)")
@pytest.mark.parametrize("attention", _kernels())
@pytest.mark.parametrize("settings", [MEAN, LAST_FOUR], ids=["mean", "concat-last-four"])
def test_bundled_model_fused_against_transformers(bundled_vectors, attention, settings):
    """float32: transformers' vectors to 1e-5; bfloat16 (with each attention this CPU runs):
    cosine >= 0.999 to float32 on every row, as the transformers bf16 forward holds."""
    reference = bundled_vectors("float32", "transformers", "sdpa", settings)
    assert np.abs(bundled_vectors("float32", "fused", "sdpa", settings) - reference).max() < 1e-5
    bf16 = bundled_vectors("bfloat16", "fused", attention, settings)
    cos = (bf16 * reference).sum(1) / np.linalg.norm(bf16, axis=1) / np.linalg.norm(reference, axis=1)
    assert cos.min() >= 0.999
    assert not np.allclose(bf16, reference, atol=1e-6)  # it did run in bf16


def test_runtime_chooses_the_fused_forward_where_it_runs(bundled_model, tmp_path):
    auto = runtime_for(bundled_model)
    assert auto.forward == ("fused" if ONEDNN else "transformers")
    assert runtime_for(bundled_model, forward="transformers").forward == "transformers"
    # compiled models run transformers' forward; an explicit fused one is refused, saying why
    assert runtime_for(bundled_model, compile=True).forward == "transformers"
    with pytest.raises(ConfigError, match="compiled"):
        runtime_for(bundled_model, compile=True, forward="fused")
    assert runtime_for(bundled_model, attention="eager").forward == "transformers"
    # a family it does not take: transformers' forward, and an explicit fused one refused
    import transformers as tf

    folder = tmp_path / "electra"
    tf.ElectraModel(tf.ElectraConfig(vocab_size=bundled_model_vocab(bundled_model), hidden_size=32,
                                     embedding_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=64)).save_pretrained(folder)
    tf.AutoTokenizer.from_pretrained(bundled_model.path).save_pretrained(folder)
    other = resolve_model(str(folder))
    assert runtime_for(other).forward == "transformers"
    with pytest.raises(ConfigError, match="electra"):
        runtime_for(other, forward="fused")


def bundled_model_vocab(source) -> int:
    import json

    return json.loads((source.path / "config.json").read_text())["vocab_size"]


def test_without_onednn_the_fallback_is_transformers_forward(bundled_model, mixed_texts,
                                                            monkeypatch):
    """A torch without oneDNN (an Arm build): auto falls back to transformers' forward, whose
    vectors equal sentence-transformers' (test_parity); an explicit fused one is refused."""
    monkeypatch.setattr(fused_forward, "onednn_products", lambda dtype, cpu: False)
    assert runtime_for(bundled_model).forward == "transformers"
    with pytest.raises(ConfigError, match="oneDNN"):
        runtime_for(bundled_model, forward="fused")
    encoder = encoder_for(bundled_model, "cpu", "float32", MEAN)
    assert not isinstance(encoder.model, FusedForward)


def test_a_worker_without_onednn_refuses_a_fused_plan(bundled_model, monkeypatch):
    from pipeline.runtime.runtime import check_here

    planned = runtime_for(bundled_model, forward="auto")
    monkeypatch.setattr(fused_forward, "onednn_products", lambda dtype, cpu: False)
    if planned.forward == "fused":
        with pytest.raises(ConfigError, match="model.forward = 'transformers'"):
            check_here(planned, bundled_model)


def test_unsupported_configs_say_why():
    import transformers as tf

    assert fused_forward.unsupported_reason(tf.BertConfig()) is None
    assert "activation" in fused_forward.unsupported_reason(tf.BertConfig(hidden_act="silu"))
    assert "bidirectional" in fused_forward.unsupported_reason(tf.BertConfig(is_decoder=True))
    assert "electra" in fused_forward.unsupported_reason(tf.ElectraConfig())


@pytest.mark.parametrize("kind", sorted(fused_forward.FAMILIES))
def test_what_the_runtime_knows_of_the_families_is_what_their_classes_declare(kind):
    import transformers as tf
    from transformers.models.auto.modeling_auto import MODEL_MAPPING

    from pipeline.runtime.runtime import KNOWN_FAMILY_FLAGS

    model_class = MODEL_MAPPING[type(tf.AutoConfig.for_model(kind))]
    assert all(getattr(model_class, flag, False) for flag in KNOWN_FAMILY_FLAGS)
