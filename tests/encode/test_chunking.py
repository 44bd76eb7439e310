"""Long texts in token windows: window boundaries and character offsets against the fast
tokenizer's own offsets (WordPiece and a sentencepiece-style Unigram, multilingual text), and
pooled vectors against a direct computation: each window through `AutoModel` alone, then the
token-weighted mean."""
from __future__ import annotations

import unicodedata

import numpy as np
import pyarrow as pa
import pytest
import torch

from helpers import make_job, matrix, read_vectors, run, write_shards
from pipeline.config import config_from_dict
from pipeline.encode.chunking import ChunkPolicy, cut_windows, pool_windows
from pipeline.encode.tokenizer import TextTokenizer

MULTILINGUAL = [
    "Ünïcödé wörds, İstanbul cafés and naïve façades — 東京 and 北京 in one sentence. " * 9,
    "Привет, мир! Это длинный текст на русском языке, с запятыми и точками. " * 8,
    "   leading spaces, then\ttabs\nand new lines; émigrés in São Paulo.   " * 10,
    "short enough",
]


@pytest.fixture(scope="module")
def unigram_folder(tmp_path_factory, mixed_texts):
    """A sentencepiece-style tokenizer (Metaspace + Unigram, <s> ... </s>), trained here."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import XLMRobertaTokenizerFast

    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    tok.train_from_iterator(mixed_texts + MULTILINGUAL, trainers.UnigramTrainer(
        vocab_size=700, special_tokens=specials, unk_token="<unk>"))
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>",
        special_tokens=[("<s>", tok.token_to_id("<s>")), ("</s>", tok.token_to_id("</s>"))])
    folder = tmp_path_factory.mktemp("unigram")
    XLMRobertaTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                            unk_token="<unk>", pad_token="<pad>", cls_token="<s>",
                            sep_token="</s>", mask_token="<mask>").save_pretrained(folder)
    return folder


@pytest.mark.parametrize("kind", ["wordpiece", "unigram"])
@pytest.mark.parametrize("tokens, overlap", [(20, 5), (9, 0), (30, 29)])
def test_windows_follow_the_fast_tokenizers_own_tokens_and_offsets(kind, tokens, overlap,
                                                                   bundled_model, unigram_folder):
    from transformers import AutoTokenizer

    folder = bundled_model.path if kind == "wordpiece" else unigram_folder
    hf = AutoTokenizer.from_pretrained(folder)
    ours = TextTokenizer(folder, max_length=tokens + 2)
    policy = ChunkPolicy("chunk", tokens, overlap, max_chunks=1000, rows=True)
    windows = cut_windows(ours, MULTILINGUAL, ours(MULTILINGUAL), policy)
    stride = tokens - overlap
    for row, text in enumerate(MULTILINGUAL):
        own = hf(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = own["input_ids"], own["offset_mapping"]
        mine = np.flatnonzero(windows.owner == row)
        assert windows.n_chunks[row] == len(mine)
        assert hf(text)["input_ids"] == [hf.cls_token_id, *ids, hf.sep_token_id]  # the template
        if len(ids) <= tokens:  # fits: the same ids as truncate, the whole text
            assert len(mine) == 1 and windows.ids[mine[0]] == hf(text)["input_ids"]
            assert (windows.char_start[mine[0]], windows.char_end[mine[0]]) == (0, len(text))
            continue
        assert len(mine) == 1 + -(-(len(ids) - tokens) // stride)
        for k, w in enumerate(mine):
            start, end = int(windows.token_start[w]), int(windows.token_end[w])
            assert windows.chunk[w] == k and start == k * stride
            assert end == min(start + tokens, len(ids))
            assert windows.ids[w] == [hf.cls_token_id, *ids[start:end], hf.sep_token_id]
            # the tokenizer's own offsets; the first window starts the text, the last ends it
            char_start = 0 if k == 0 else offsets[start][0]
            char_end = len(text) if k == len(mine) - 1 else offsets[end - 1][1]
            assert (windows.char_start[w], windows.char_end[w]) == (char_start, char_end)
            # the window's slice holds the text of every token in it
            piece = text[windows.char_start[w]:windows.char_end[w]]
            for a, b in offsets[start:end]:
                assert text[a:b] in piece
        assert windows.token_end[mine[-1]] == len(ids)  # every token is in some window


def test_max_chunks_caps_the_windows_and_flags_the_text():
    policy = ChunkPolicy("chunk", 10, 2, max_chunks=3, rows=False)
    from pipeline.encode.tokenizer import Tokenized
    tokens = Tokenized(ids=[], n_tokens=np.array([12, 40, 200], np.int32),
                       truncated=np.zeros(3, bool))
    assert policy.n_windows(tokens, fixed=2).tolist() == [1, 3, 3]


def test_pool_windows_is_the_token_weighted_mean():
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(5, 4)).astype(np.float32)
    owner = np.array([0, 0, 0, 1, 2])
    weights = np.array([10, 10, 3, 7, 1], np.float32)
    pooled = pool_windows(vectors, owner, weights, normalize=False)
    expected0 = (vectors[0] * 10 + vectors[1] * 10 + vectors[2] * 3) / 23
    np.testing.assert_allclose(pooled[0], expected0, rtol=1e-6)
    np.testing.assert_array_equal(pooled[1:], vectors[3:])
    unit = pool_windows(vectors, owner, weights, normalize=True)
    np.testing.assert_allclose(np.linalg.norm(unit, axis=1), 1.0, rtol=1e-6)


MAX_LENGTH = 40


@pytest.fixture(scope="module")
def long_dir(tmp_path_factory, mixed_texts):
    folder = tmp_path_factory.mktemp("long")
    texts = mixed_texts[200:] + mixed_texts[:20] + MULTILINGUAL  # joined snippets and short ones
    write_shards(folder, [pa.table({"id": np.arange(len(texts)), "text": texts})])
    return folder, texts


def _direct(bundled_model, texts, tokens, overlap, normalize=True):
    """Each window through AutoModel alone, mean-pooled, then the token-weighted mean."""
    from transformers import AutoModel, AutoTokenizer

    hf = AutoTokenizer.from_pretrained(bundled_model.path)
    model = AutoModel.from_pretrained(bundled_model.path).eval()
    stride, out = tokens - overlap, []
    for text in texts:
        ids = hf(text, add_special_tokens=False)["input_ids"]
        starts = [0] + list(range(stride, max(len(ids) - overlap, 1), stride))
        starts = [s for s in starts if s == 0 or s + overlap < len(ids)]
        vectors, weights = [], []
        for s in starts:
            window = torch.tensor([[hf.cls_token_id, *ids[s:s + tokens], hf.sep_token_id]])
            with torch.inference_mode():
                state = model(input_ids=window).last_hidden_state[0]
            vectors.append(state.mean(0).numpy())
            weights.append(window.shape[1])
        pooled = np.average(np.stack(vectors), axis=0, weights=weights)
        out.append(pooled / np.linalg.norm(pooled) if normalize else pooled)
    return np.stack(out).astype(np.float32)


@pytest.mark.slow
def test_pooled_vectors_equal_windows_through_automodel_alone(long_dir, tmp_path, bundled_model):
    folder, texts = long_dir
    summary = run(make_job(folder, tmp_path / "out", None, model={"max_length": MAX_LENGTH},
                           encode={"long_text": "chunk", "chunk_overlap": 6,
                                   "sort_window": 64, "batch_tokens": 1024}))
    assert summary.exit_code == 0
    table = read_vectors(tmp_path / "out")
    assert table.column("id").to_pylist() == list(range(len(texts)))
    expected = _direct(bundled_model, texts, MAX_LENGTH - 2, 6)
    np.testing.assert_allclose(matrix(table), expected, atol=2e-5)
    n_chunks = table.column("n_chunks").to_numpy()
    assert summary.texts_chunked == int((n_chunks > 1).sum()) > 20
    assert summary.windows == int(n_chunks.sum())


@pytest.mark.slow
def test_a_text_in_one_window_gets_the_truncate_vector(long_dir, tmp_path):
    folder, texts = long_dir
    vectors = {}
    for mode in ("truncate", "chunk"):
        run(make_job(folder, tmp_path / mode, None, model={"max_length": MAX_LENGTH},
                     encode={"long_text": mode}))
        vectors[mode] = read_vectors(tmp_path / mode)
    n_chunks = vectors["chunk"].column("n_chunks").to_numpy()
    one = n_chunks == 1
    assert one.sum() >= 20 and (~one).sum() >= 20  # both kinds present
    np.testing.assert_allclose(matrix(vectors["chunk"])[one], matrix(vectors["truncate"])[one],
                               atol=1e-6)
    # the long ones differ from their truncated vectors: the rest of the text counts
    far = np.abs(matrix(vectors["chunk"])[~one] - matrix(vectors["truncate"])[~one]).max(1)
    assert (far > 1e-3).all()


def test_chunk_tokens_that_do_not_fit_the_model_are_refused(bundled_model):
    from pipeline.config import ConfigError

    tokenizer = TextTokenizer(bundled_model.path, max_length=64, prompt="query: ")
    job = config_from_dict(make_job("in", "out", None, encode={"long_text": "chunk",
                                                               "chunk_tokens": 62}))
    with pytest.raises(ConfigError, match="use at most 60"):  # [CLS] query : [SEP]
        ChunkPolicy.for_job(job, tokenizer)
    job = config_from_dict(make_job("in", "out", None, encode={"long_text": "chunk"}))
    assert ChunkPolicy.for_job(job, tokenizer).tokens == 60


def test_reject_judges_a_sentence_pair_by_max_length(bundled_model):
    from pipeline.encode.chunking import too_long

    tokenizer = TextTokenizer(bundled_model.path, max_length=12)
    policy = ChunkPolicy("reject", 10, 0, 1, rows=False)
    pairs = tokenizer(["a b c", "one two three four five six seven"], ["d e", "eight nine ten"])
    # [CLS] a b c [SEP] d e [SEP] = 8 tokens fits; the second pair (10 words + 3) does not
    assert too_long(tokenizer, pairs, policy).tolist() == [False, True]
    single = tokenizer(["a b c d e f g h i j", "a b c d e f g h i j k"])
    assert too_long(tokenizer, single, policy).tolist() == [False, True]


def test_every_window_gets_the_prompt_after_the_opening_special_token(bundled_model):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(bundled_model.path)
    ours = TextTokenizer(bundled_model.path, max_length=24, prompt="passage: ")
    prompt = hf("passage: ", add_special_tokens=False)["input_ids"]
    policy = ChunkPolicy("chunk", 24 - ours.n_fixed, 4, max_chunks=100, rows=True)
    text = MULTILINGUAL[1]
    windows = cut_windows(ours, [text], ours([text]), policy)
    own = hf(text, add_special_tokens=False)["input_ids"]
    assert len(windows.ids) > 3
    for ids, start, end in zip(windows.ids, windows.token_start, windows.token_end):
        assert ids == [hf.cls_token_id, *prompt, *own[start:end], hf.sep_token_id]
        assert len(ids) <= 24


def test_offsets_of_lowercased_text_point_into_the_original(bundled_model):
    """sentence-transformers' do_lower_case lower-cases before the tokenizer; 'İ' lower-cases to
    two characters, so offsets into the lowered text are mapped back to the original's."""
    ours = TextTokenizer(bundled_model.path, max_length=16, lowercase=True)
    text = "İSTANBUL and İzmir are CITIES in Türkiye, İ İ İ and more words after them"
    ids, offsets = ours.content(text)
    lowered = ours.backend.encode(text.lower(), add_special_tokens=False)
    assert ids.tolist() == lowered.ids
    for (a, b), token in zip(offsets, lowered.tokens):
        piece = "".join(c for c in unicodedata.normalize("NFD", text[a:b].lower())
                        if not unicodedata.combining(c))  # as the tokenizer strips accents
        assert token.removeprefix("##") in piece or token == "[UNK]", (token, text[a:b])
    assert offsets[-1][1] == len(text)
