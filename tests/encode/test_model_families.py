"""Any encoder a user brings: tiny random models of each family, with each family's own kind of
tokenizer built offline (WordPiece, byte-level BPE, Unigram), saved as sentence-transformers
folders with different pooling configs. embedpipe's vectors must equal
`SentenceTransformer(folder).encode` row for row, and cls / concat-last-four a direct `AutoModel`
computation on each text alone."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from helpers import make_job, matrix, read_vectors, run, write_shards

POSITIONS = 64  # every tiny model reads at most 64 tokens: longer texts are truncated and flagged
SPECIALS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
EXTRA = ["Ελληνικά κείμενα εδώ", "русский текст тоже", "中文文本在这里", "emoji 😀🚀 here",
         "naïve café déjà vu", "word " * 200]  # non-ASCII, and one text past every limit


def _corpus(mixed_texts) -> list[str]:
    return mixed_texts[::8] + EXTRA


def _bpe(texts):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=600, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.post_processor = processors.RobertaProcessing(("</s>", tok.token_to_id("</s>")),
                                                      ("<s>", tok.token_to_id("<s>")))
    return tok


def _unigram(texts, specials=SPECIALS, template=("<s>", "</s>")):
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator(texts, trainers.UnigramTrainer(vocab_size=400, special_tokens=specials,
                                                            unk_token=specials[3]))
    first, last = template
    tok.post_processor = processors.TemplateProcessing(
        single=f"{first} $A {last}", pair=f"{first} $A {last} $B {last}",
        special_tokens=[(first, tok.token_to_id(first)), (last, tok.token_to_id(last))])
    return tok


def _family(kind: str, texts: list[str], wordpiece: Path):
    """(config, tokenizer) of a tiny model of this family."""
    import transformers as tf

    small = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64)
    if kind in ("bert", "electra", "distilbert", "mpnet", "modernbert"):
        tokenizer = tf.AutoTokenizer.from_pretrained(wordpiece)  # WordPiece, [CLS] ... [SEP]
        if kind == "mpnet":
            tokenizer = tf.MPNetTokenizerFast(
                tokenizer_object=tokenizer.backend_tokenizer, bos_token="[CLS]", eos_token="[SEP]",
                cls_token="[CLS]", sep_token="[SEP]", pad_token="[PAD]", unk_token="[UNK]",
                mask_token="[MASK]")
        vocab = len(tokenizer)
        if kind == "bert":
            config = tf.BertConfig(vocab_size=vocab, max_position_embeddings=POSITIONS, **small)
        elif kind == "electra":
            config = tf.ElectraConfig(vocab_size=vocab, embedding_size=32,
                                      max_position_embeddings=POSITIONS, **small)
        elif kind == "modernbert":
            config = tf.ModernBertConfig(
                vocab_size=vocab, hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                intermediate_size=64, max_position_embeddings=POSITIONS,
                pad_token_id=tokenizer.pad_token_id, cls_token_id=tokenizer.cls_token_id,
                sep_token_id=tokenizer.sep_token_id, bos_token_id=tokenizer.cls_token_id,
                eos_token_id=tokenizer.sep_token_id, global_attn_every_n_layers=2,
                local_attention=16)
        elif kind == "distilbert":
            config = tf.DistilBertConfig(vocab_size=vocab, dim=32, n_layers=3, n_heads=2,
                                         hidden_dim=64, max_position_embeddings=POSITIONS)
        else:  # positions start after the padding index (fixed at 1 in MPNet), as in RoBERTa
            config = tf.MPNetConfig(vocab_size=vocab, max_position_embeddings=POSITIONS + 2,
                                    pad_token_id=tokenizer.pad_token_id, **small)
        return config, tokenizer
    if kind == "roberta":
        tok = _bpe(texts)
        tokenizer = tf.RobertaTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                            unk_token="<unk>", pad_token="<pad>", mask_token="<mask>",
                                            cls_token="<s>", sep_token="</s>")
        return tf.RobertaConfig(vocab_size=len(tokenizer), pad_token_id=1,
                                max_position_embeddings=POSITIONS + 2, **small), tokenizer
    if kind == "xlm-roberta":
        tokenizer = tf.XLMRobertaTokenizerFast(
            tokenizer_object=_unigram(texts), bos_token="<s>", eos_token="</s>", unk_token="<unk>",
            pad_token="<pad>", mask_token="<mask>", cls_token="<s>", sep_token="</s>")
        return tf.XLMRobertaConfig(vocab_size=len(tokenizer), pad_token_id=1,
                                   max_position_embeddings=POSITIONS + 2, **small), tokenizer
    if kind == "deberta-v2":
        specials = ["[CLS]", "[PAD]", "[SEP]", "[UNK]", "[MASK]"]
        tokenizer = tf.PreTrainedTokenizerFast(
            tokenizer_object=_unigram(texts, specials, ("[CLS]", "[SEP]")), cls_token="[CLS]",
            sep_token="[SEP]", pad_token="[PAD]", unk_token="[UNK]", mask_token="[MASK]",
            model_max_length=POSITIONS)
        return tf.DebertaV2Config(vocab_size=len(tokenizer), pad_token_id=1,
                                  max_position_embeddings=POSITIONS, **small), tokenizer
    raise AssertionError(kind)


FAMILIES = {  # family -> (pooling in 1_Pooling, Normalize module)
    "bert": ("mean", True), "distilbert": ("cls", False), "roberta": ("mean", False),
    "xlm-roberta": ("max", True), "mpnet": ("mean", True), "deberta-v2": ("cls", True),
    "electra": ("max", False), "modernbert": ("mean", True),
}


@pytest.fixture(scope="module")
def family_folders(tmp_path_factory, mixed_texts, bundled_model) -> dict[str, Path]:
    """Each family as a sentence-transformers folder (written by sentence-transformers itself)."""
    from sentence_transformers import SentenceTransformer, models
    from transformers import AutoModel

    root = tmp_path_factory.mktemp("families")
    folders = {}
    for kind, (pooling, normalize) in FAMILIES.items():
        torch.manual_seed(0)
        config, tokenizer = _family(kind, mixed_texts, bundled_model.path)
        hf = root / f"{kind}-hf"
        AutoModel.from_config(config).eval().save_pretrained(hf)
        tokenizer.model_max_length = POSITIONS
        tokenizer.save_pretrained(hf)
        transformer = models.Transformer(str(hf), max_seq_length=POSITIONS)
        modules = [transformer, models.Pooling(transformer.get_word_embedding_dimension(), pooling)]
        if normalize:
            modules.append(models.Normalize())
        prompts = {"query": "query: ", "document": "passage: "} if kind == "bert" else None
        SentenceTransformer(modules=modules, prompts=prompts,
                            default_prompt_name="document" if prompts else None).save(str(root / kind))
        folders[kind] = root / kind
    return folders


@pytest.fixture(scope="module")
def texts_dir(tmp_path_factory, mixed_texts) -> Path:
    folder = tmp_path_factory.mktemp("family_texts")
    texts = _corpus(mixed_texts)
    write_shards(folder, [pa.table({"id": np.arange(len(texts)), "text": texts})])
    return folder


def _embed(texts_dir: Path, out: Path, model: Path, **encode) -> tuple[np.ndarray, object]:
    job = make_job(texts_dir, out, model, encode=encode)
    summary = run(job)
    assert summary.exit_code == 0 and summary.rows_read == summary.vectors_written
    return matrix(read_vectors(out)), summary


def _cos(a, b):
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


@pytest.mark.parametrize("kind", list(FAMILIES))
def test_family_equals_sentence_transformers(kind, family_folders, texts_dir, tmp_path,
                                             mixed_texts):
    from sentence_transformers import SentenceTransformer

    folder = family_folders[kind]
    ours, summary = _embed(texts_dir, tmp_path / "out", folder)  # pooling auto: the folder's own
    st = SentenceTransformer(str(folder), device="cpu")
    theirs = st.encode(_corpus(mixed_texts), batch_size=16, convert_to_numpy=True,
                       prompt_name=None if kind != "bert" else "document")
    cos = _cos(ours, theirs)
    print(f"{kind}: min cosine {cos.min():.7f}, max |diff| {np.abs(ours - theirs).max():.2e}")
    assert cos.min() >= 0.99999
    pooling, normalize = FAMILIES[kind]
    assert np.allclose(np.linalg.norm(ours, axis=1), 1, atol=1e-5) == normalize
    assert summary.truncated >= 1  # the long text: truncated at the position limit, flagged
    assert any(f"pooling {pooling} (the model folder's" in note for note in summary.recipe)
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["vector_settings"]["encode.pooling"] == pooling
    assert manifest["vector_settings"]["encode.normalize"] is normalize


@pytest.mark.parametrize("kind", ["roberta", "mpnet", "deberta-v2", "distilbert", "modernbert"])
def test_cls_and_concat_last_four_equal_autmodel_alone(kind, family_folders, texts_dir, tmp_path,
                                                       mixed_texts):
    from transformers import AutoModel, AutoTokenizer

    folder = family_folders[kind]
    cls, _ = _embed(texts_dir, tmp_path / "cls", folder, pooling="cls")
    c4, _ = _embed(texts_dir, tmp_path / "c4", folder, pooling="concat-last-four")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModel.from_pretrained(folder, attn_implementation="eager").eval()
    for i, text in enumerate(_corpus(mixed_texts)[::3]):
        enc = tokenizer(text, truncation=True, max_length=POSITIONS, return_tensors="pt")
        with torch.inference_mode():
            states = model(**enc, output_hidden_states=True).hidden_states
        np.testing.assert_allclose(cls[3 * i], states[-1][0, 0].numpy(), atol=1e-5)
        per_token = torch.cat(list(states[-4:]), dim=-1)[0].mean(0).numpy()
        np.testing.assert_allclose(c4[3 * i], per_token, atol=1e-5)


def test_prompts_equal_sentence_transformers(family_folders, texts_dir, tmp_path, mixed_texts):
    from sentence_transformers import SentenceTransformer

    from pipeline.commands.query import EmbeddingRecord, TextEmbedder
    from pipeline.io.manifest import Manifest

    folder = family_folders["bert"]
    st = SentenceTransformer(str(folder), device="cpu")
    texts = _corpus(mixed_texts)
    explicit, summary = _embed(texts_dir, tmp_path / "topic", folder, prompt="topic: ")
    assert _cos(explicit, st.encode(texts, prompt="topic: ")).min() >= 0.99999
    named, summary = _embed(texts_dir, tmp_path / "query", folder, prompt_name="query")
    assert _cos(named, st.encode(texts, prompt_name="query")).min() >= 0.99999
    default, _ = _embed(texts_dir, tmp_path / "default", folder)  # the folder's default: document
    assert _cos(default, st.encode(texts, prompt_name="document")).min() >= 0.99999
    assert not np.allclose(default, named)
    # n_tokens counts what the model saw: the prompt's tokens too
    plain = read_vectors(tmp_path / "topic").column("n_tokens").to_numpy()
    none, _ = _embed(texts_dir, tmp_path / "none", folder, prompt="")
    assert (plain > read_vectors(tmp_path / "none").column("n_tokens").to_numpy()).all()
    # search embeds queries with the folder's query prompt, stored vectors with the document one
    manifest = json.loads((tmp_path / "default" / "manifest.json").read_text())
    record = EmbeddingRecord.from_manifest(Manifest.from_json(manifest))
    query = TextEmbedder(record, purpose="query").embed(["a warm film"])
    assert _cos(query, st.encode(["a warm film"], prompt_name="query")).min() >= 0.99999
    assert manifest["vector_settings"]["encode.prompt"] == "passage: "


@pytest.mark.parametrize("kind, dims", [("bert", 16), ("roberta", 8)])
def test_matryoshka_dimensions_equal_truncate_dim(kind, dims, family_folders, texts_dir, tmp_path,
                                                  mixed_texts):
    from sentence_transformers import SentenceTransformer

    folder = family_folders[kind]
    normalize = FAMILIES[kind][1]
    job = make_job(texts_dir, tmp_path / "out", folder, output={"dimensions": dims})
    assert run(job).exit_code == 0
    ours = matrix(read_vectors(tmp_path / "out"))
    st = SentenceTransformer(str(folder), device="cpu", truncate_dim=dims)
    theirs = st.encode(_corpus(mixed_texts), prompt_name="document" if kind == "bert" else None,
                       normalize_embeddings=normalize)
    assert ours.shape == (len(theirs), dims)
    assert _cos(ours, theirs).min() >= 0.99999
    if normalize:
        assert np.allclose(np.linalg.norm(ours, axis=1), 1, atol=1e-5)


def test_attention_falls_back_to_eager_where_a_family_has_no_sdpa(family_folders):
    from helpers import runtime_for
    from pipeline.config import ConfigError
    from pipeline.models.model_files import resolve_model

    mpnet = resolve_model(str(family_folders["mpnet"]))
    assert runtime_for(mpnet).attention == "eager"
    with pytest.raises(ConfigError, match="no SDPA"):
        runtime_for(mpnet, attention="sdpa")
    assert runtime_for(resolve_model(str(family_folders["bert"]))).attention == "sdpa"
    assert runtime_for(resolve_model(str(family_folders["bert"])), attention="eager").attention == "eager"


def test_position_limits_by_family(family_folders):
    from pipeline.models.model_files import resolve_model

    for kind in FAMILIES:
        source = resolve_model(str(family_folders[kind]))
        assert source.position_limit == POSITIONS and source.max_length == POSITIONS, kind


def test_a_hub_name_is_one_line_about_local_folders(tmp_path):
    from pipeline.config import ConfigError
    from pipeline.models.model_files import resolve_model

    with pytest.raises(ConfigError, match="never downloads") as caught:
        resolve_model("BAAI/bge-small-en-v1.5")
    assert "must be local folders" in str(caught.value)


def test_do_lower_case_equals_sentence_transformers(family_folders, texts_dir, tmp_path,
                                                    mixed_texts):
    """A cased tokenizer (byte-level BPE) in folders that lower-case: the older layout says so in
    sentence_bert_config.json (embedpipe lower-cases the texts); sentence-transformers 5+ folds
    it into the tokenizer it saves. Either way embedpipe equals SentenceTransformer.encode."""
    import shutil

    from sentence_transformers import SentenceTransformer, models

    from pipeline.models.model_files import resolve_model

    old = shutil.copytree(family_folders["roberta"], tmp_path / "old")
    settings = json.loads((old / "sentence_bert_config.json").read_text())
    (old / "sentence_bert_config.json").write_text(json.dumps({**settings, "do_lower_case": True}))
    hf = family_folders["roberta"].parent / "roberta-hf"
    new = tmp_path / "new"
    SentenceTransformer(modules=[models.Transformer(str(hf), max_seq_length=POSITIONS,
                                                    do_lower_case=True),
                                 models.Pooling(32, "mean")]).save(str(new))
    assert resolve_model(str(old)).lowercase
    texts = [t.title() if i % 2 else t.upper() for i, t in enumerate(_corpus(mixed_texts))]
    write_shards(tmp_path / "in", [pa.table({"id": np.arange(len(texts)), "text": texts})])
    cased, _ = _embed(tmp_path / "in", tmp_path / "cased", family_folders["roberta"])
    for folder in (old, new):
        ours, _ = _embed(tmp_path / "in", tmp_path / f"out-{folder.name}", folder)
        theirs = SentenceTransformer(str(folder), device="cpu").encode(texts)
        assert _cos(ours, theirs).min() >= 0.99999, folder.name
    assert not np.allclose(ours_old := matrix(read_vectors(tmp_path / "out-old")), cased,
                           atol=1e-4)  # the older layout really lower-cased
    assert ours_old.shape == cased.shape


def test_folders_embedpipe_cannot_match_are_refused_in_one_line(family_folders, tmp_path):
    """Modules it does not run, pooling modes it does not compute, prompts it would pool wrongly:
    refused by name instead of vectors that differ from sentence-transformers'."""
    import shutil

    from pipeline.config import ConfigError, config_from_dict
    from pipeline.models.model_files import resolve_model
    from pipeline.models.recipe import resolve_recipe

    dense = shutil.copytree(family_folders["bert"], tmp_path / "dense")
    modules = json.loads((dense / "modules.json").read_text())
    modules.append({"idx": 3, "name": "3", "path": "3_Dense",
                    "type": "sentence_transformers.models.Dense"})
    (dense / "modules.json").write_text(json.dumps(modules))
    with pytest.raises(ConfigError, match="'Dense' is not one embedpipe runs"):
        resolve_model(str(dense))
    weighted = shutil.copytree(family_folders["bert"], tmp_path / "weighted")
    (weighted / "1_Pooling" / "config.json").write_text(json.dumps(
        {"embedding_dimension": 32, "pooling_mode": "weightedmean"}))
    with pytest.raises(ConfigError, match="'weightedmean' is not one embedpipe computes"):
        resolve_model(str(weighted))
    instructor = shutil.copytree(family_folders["bert"], tmp_path / "instructor")
    (instructor / "1_Pooling" / "config.json").write_text(json.dumps(
        {"embedding_dimension": 32, "pooling_mode": "mean", "include_prompt": False}))
    with pytest.raises(ConfigError, match="include_prompt"):
        resolve_recipe(config_from_dict({}), resolve_model(str(instructor)))
    with pytest.raises(ConfigError, match="prompts are 'document', 'query'"):
        resolve_recipe(config_from_dict({"encode": {"prompt_name": "passage"}}),
                       resolve_model(str(family_folders["bert"])))


def test_a_changed_prompt_or_dimensions_is_refused_by_the_config_guard(family_folders, texts_dir,
                                                                       tmp_path):
    from pipeline.io.ledger import SettingsMismatch

    folder = family_folders["bert"]
    assert run(make_job(texts_dir, tmp_path / "out", folder)).exit_code == 0
    for change in ({"encode": {"prompt": "topic: "}}, {"output": {"dimensions": 8}}):
        with pytest.raises(SettingsMismatch, match="encode.prompt|output.dimensions"):
            run(make_job(texts_dir, tmp_path / "out", folder, **change))
