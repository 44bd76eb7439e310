"""A model folder's weights against its config.json: real checkpoint layouts (base models, masked-LM
and classifier checkpoints with their prefixes and heads, safetensors and .bin, the bundled
sentence-transformers folder) all pass; folders whose weights and config disagree are refused in
one line naming the key, exit 2, whichever forward runs, before the output folder is touched."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from helpers import embedpipe, matrix, read_vectors, small_job, write_shards

SMALL = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64)


def _configs():
    import transformers as tf

    positions = dict(max_position_embeddings=66, pad_token_id=1)
    return {
        "bert": tf.BertConfig(vocab_size=120, max_position_embeddings=66, **SMALL),
        "roberta": tf.RobertaConfig(vocab_size=120, **positions, **SMALL),
        "xlm-roberta": tf.XLMRobertaConfig(vocab_size=120, **positions, **SMALL),
        "camembert": tf.CamembertConfig(vocab_size=120, **positions, **SMALL),
        "distilbert": tf.DistilBertConfig(vocab_size=120, dim=32, n_layers=3, n_heads=2,
                                          hidden_dim=64, max_position_embeddings=66),
        "mpnet": tf.MPNetConfig(vocab_size=120, **positions, **SMALL),
        "electra": tf.ElectraConfig(vocab_size=120, embedding_size=16, max_position_embeddings=66,
                                    **SMALL),
        "deberta-v2": tf.DebertaV2Config(vocab_size=120, **positions, **SMALL),
        "albert": tf.AlbertConfig(vocab_size=120, embedding_size=16, **SMALL),
        "modernbert": tf.ModernBertConfig(vocab_size=120, max_position_embeddings=66,
                                          pad_token_id=0, bos_token_id=2, eos_token_id=3,
                                          cls_token_id=2, sep_token_id=3, **SMALL),
    }


def _save(model, folder: Path, form: str) -> Path:
    """As transformers saves it; "bin": the state dict as pytorch_model.bin, as older
    transformers saved it (tied weights and all); "legacy bin": in torch's pre-1.6 format."""
    model.save_pretrained(folder)
    if form != "safetensors":
        for file in folder.glob("*.safetensors"):
            file.unlink()
        torch.save(model.state_dict(), folder / "pytorch_model.bin",
                   _use_new_zipfile_serialization=form == "bin")
    return folder


@pytest.mark.parametrize("kind", list(_configs()))
def test_real_checkpoint_layouts_are_accepted(kind, tmp_path, caplog):
    """Base model, masked-LM and sequence-classifier checkpoints of each family, safetensors and
    .bin: accepted; the heads (and only heads, buffers) are left aside and logged."""
    import logging

    import transformers as tf

    from pipeline.models.model_files import resolve_model
    from pipeline.models.weight_check import expected_weights

    config = _configs()[kind]
    encoder_roots = expected_weights(config).roots
    for cls in (tf.AutoModel, tf.AutoModelForMaskedLM, tf.AutoModelForSequenceClassification):
        for form in ("safetensors", "bin", "legacy bin"):
            torch.manual_seed(0)
            folder = _save(cls.from_config(config), tmp_path / f"{cls.__name__}-{form}", form)
            caplog.clear()
            with caplog.at_level(logging.INFO, logger="pipeline.models.weight_check"):
                source = resolve_model(str(folder))
            assert source.model_type == kind
            aside = [r.getMessage() for r in caplog.records if "left aside" in r.getMessage()]
            if cls is tf.AutoModel:
                assert aside == [] or form != "safetensors"  # a .bin may hold the buffers
            else:  # a head's weights, none of the encoder's
                assert len(aside) == 1
                names = aside[0].split(": ", 1)[1].split(", ")
                prefix = f"{getattr(cls.from_config(config), 'base_model_prefix')}."
                assert not any(n.startswith(prefix) for n in names), names
                assert not any(n.split(".")[0] in encoder_roots - {"pooler"} for n in names
                               if not n.endswith(("position_ids", "token_type_ids"))), names


def test_the_bundled_sentence_transformers_folder_is_accepted(bundled_model):
    from transformers import AutoConfig

    from pipeline.models.weight_check import check_weights

    path = bundled_model.path
    assert check_weights(path, AutoConfig.from_pretrained(path)) == ["embeddings.position_ids"]


@pytest.fixture(scope="module")
def bert_folders(tmp_path_factory, bundled_model) -> dict[str, Path]:
    """A 3-layer BERT with the bundled tokenizer saved as a base model and, the same weights, as
    a masked-LM checkpoint (`bert.` names, `cls.predictions` head, no pooler)."""
    from transformers import AutoTokenizer, BertConfig, BertForMaskedLM

    root = tmp_path_factory.mktemp("weights")
    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, max_position_embeddings=128, **SMALL)
    mlm = BertForMaskedLM(config).eval()
    tokenizer = AutoTokenizer.from_pretrained(bundled_model.path)
    folders = {"mlm": root / "mlm", "base": root / "base"}
    mlm.save_pretrained(folders["mlm"])
    mlm.bert.save_pretrained(folders["base"])
    for folder in folders.values():
        tokenizer.save_pretrained(folder)
    return folders


@pytest.fixture(scope="module")
def texts(tmp_path_factory, mixed_texts) -> Path:
    folder = tmp_path_factory.mktemp("weight_texts")
    write_shards(folder, [pa.table({"id": np.arange(40), "text": mixed_texts[:40]})])
    return folder


def _run(tmp_path: Path, texts: Path, model: Path, forward: str, *flags: str):
    tmp_path.mkdir(parents=True, exist_ok=True)
    out = tmp_path / f"out-{forward}"
    job = small_job(tmp_path / f"job-{forward}.toml", texts, out, model,
                    model={"forward": forward, "dtype": "float32"})
    return embedpipe(*flags, "run", job), out


@pytest.mark.parametrize("forward", ["fused", "transformers"])
def test_a_masked_lm_checkpoint_embeds_as_its_encoder(forward, bert_folders, texts, tmp_path):
    """The masked-LM checkpoint runs (its head listed at -v) and its vectors are those of the
    encoder saved on its own."""
    mlm, mlm_out = _run(tmp_path / "mlm", texts, bert_folders["mlm"], forward, "-v")
    assert mlm.returncode == 0, mlm.stderr
    assert "left aside: cls.predictions.bias" in mlm.stderr
    base, base_out = _run(tmp_path / "base", texts, bert_folders["base"], forward)
    assert base.returncode == 0, base.stderr
    assert "left aside" not in base.stderr
    np.testing.assert_allclose(matrix(read_vectors(mlm_out)), matrix(read_vectors(base_out)),
                               atol=1e-6)


def _rewrite(folder: Path, change) -> None:
    """change(state) edits the folder's tensors in place, then they are saved back."""
    from safetensors.torch import load_file, save_file

    state = load_file(folder / "model.safetensors")
    change(state)
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})


def _set_config(folder: Path, **values) -> None:
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **values}))


DAMAGE = {
    # config.json says 2 layers, the weights hold 3: layer 2 would be silently dropped
    "extra layer": (lambda f: _set_config(f, num_hidden_layers=2),
                    "bert.encoder.layer.2.attention.output.LayerNorm.bias is layer 2, beyond "
                    "config.json's num_hidden_layers = 2"),
    # config.json says 4 layers: transformers would initialise layer 3 at random
    "missing layer": (lambda f: _set_config(f, num_hidden_layers=4),
                      "encoder.layer.3.attention.self.query.weight is missing"),
    "wrong shape": (lambda f: _rewrite(f, lambda s: s.update({
                        "bert.encoder.layer.1.intermediate.dense.weight": torch.zeros(48, 32)})),
                    "bert.encoder.layer.1.intermediate.dense.weight has shape [48, 32] where "
                    "config.json makes it [64, 32]"),
    "unknown tensor": (lambda f: _rewrite(f, lambda s: s.update({
                           "bert.encoder.layer.0.attention.self.rotary.weight": torch.zeros(32)})),
                       "bert.encoder.layer.0.attention.self.rotary.weight is an encoder weight "
                       "config.json does not account for"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
@pytest.mark.parametrize("forward", ["fused", "transformers"])
def test_weights_that_do_not_match_the_config_are_refused(damage, forward, bert_folders, texts,
                                                          tmp_path):
    folder = shutil.copytree(bert_folders["mlm"], tmp_path / "model")
    change, named = DAMAGE[damage]
    change(folder)
    result, out = _run(tmp_path, texts, folder, forward)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: model folder {folder}: its weights "
                                                   f"do not match its config.json: "), lines
    assert named in lines[0]
    assert not out.exists()  # refused before any work


def test_a_family_without_the_fused_forward_is_checked_too(tmp_path, texts, bundled_model):
    """MPNet runs transformers' forward only: an extra layer is refused the same way."""
    import transformers as tf

    torch.manual_seed(0)
    config = tf.MPNetConfig(vocab_size=30527, max_position_embeddings=130, pad_token_id=0, **SMALL)
    folder = tmp_path / "mpnet"
    tf.MPNetModel(config).save_pretrained(folder)
    tf.AutoTokenizer.from_pretrained(bundled_model.path).save_pretrained(folder)
    result, _ = _run(tmp_path / "ok", texts, folder, "auto")
    assert result.returncode == 0, result.stderr
    _set_config(folder, num_hidden_layers=2)
    result, out = _run(tmp_path / "damaged", texts, folder, "auto")
    assert result.returncode == 2
    assert ("encoder.layer.2.attention.LayerNorm.bias is layer 2, beyond config.json's "
            "num_hidden_layers = 2") in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not out.exists()
