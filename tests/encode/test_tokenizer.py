"""TextTokenizer against the model's own Hugging Face tokenizer, token for token."""
import pytest
from transformers import AutoTokenizer

from pipeline.encode import tokenizer as tokenizer_mod
from pipeline.encode.tokenizer import TextTokenizer, _ascii_backend

ALL_ASCII = "".join(map(chr, range(128)))
TRICKY = [
    ALL_ASCII,  # every control character, tab / newline / CR, DEL, punctuation
    f"Tab\there, new\nline, CR\rLF\r\n, vertical\x0btab, form\x0cfeed, nul\x00, del\x7f end",
    "ALL CAPS, MiXeD cAsE and digits 12345 and a_snake_case-word",
    "\x00\x01\x02",  # nothing left after cleaning
    "   leading and trailing spaces   ",
    "Café naïve résumé — “quotes” ‘single’ … ellipsis",  # not ASCII: the full normalizer
    "中文字符 and ASCII mixed, Ünïcödé",
    "emoji 👍🏽 and ZWJ 👩‍👩‍👧 sequence",
    "special tokens in text: [SEP] [CLS] [MASK] [PAD] [UNK], lower [sep] and half [SE P]",
    "pipes a|b || |edge| and a word|",  # the mark the word cache joins words with
]
# Scripts and the corners of Unicode normalisation: combining marks (and their reordering),
# Hangul (NFD splits syllables), Greek final sigma, dotted I, sharp s, ligatures, full width,
# zero-width and no-break spaces, NEL, the replacement character.
MULTILINGUAL = [
    "Ελληνικά: ΟΔΟΣ and οδός", "Русский текст, ЁЛКА", "हिन्दी भाषा", "한국어 문장입니다",
    "日本語のテキスト、カタカナ", "العربية نص", "עברית", "ภาษาไทย", "İstanbul Straße ﬁne ＡＢＣ",
    "e\u0301\u0327 a\u0327\u0301 o\u0308\u0304 q\u0323\u0307", "zero\u200bwidth no\u00a0break nel\x85x \ufffd",
    "Ǆ ǅ ǆ Ⅻ ⓐ ℌ ㎏ ½ ²",
]


@pytest.fixture(scope="module")
def hf(bundled_model):
    return AutoTokenizer.from_pretrained(bundled_model.path)


@pytest.fixture(scope="module")
def ours(bundled_model):
    return TextTokenizer(bundled_model.path, 256)


def _reference(hf, texts: list[str], max_length: int) -> list[list[int]]:
    return [hf(text, truncation=True, max_length=max_length)["input_ids"] for text in texts]


def test_the_bundled_model_gets_the_ascii_fast_path(ours):
    assert ours.ascii_backend is not None


@pytest.mark.parametrize("max_length", [256, 12])
def test_ids_equal_hugging_face_on_tricky_and_real_texts(hf, ours, bundled_model, mixed_texts,
                                                         max_length):
    texts = TRICKY + MULTILINGUAL + mixed_texts
    assert sum(t.isascii() for t in texts) > 100 and sum(not t.isascii() for t in texts) >= 3
    tokenizer = ours if max_length == 256 else TextTokenizer(bundled_model.path, max_length)
    got = tokenizer(texts)
    assert got.ids == _reference(hf, texts, max_length)
    full = [len(ids) for ids in hf(texts)["input_ids"]]
    assert got.n_tokens.tolist() == full
    assert got.truncated.tolist() == [n > max_length for n in full]


def test_a_bounded_word_cache_gives_the_same_ids(hf, bundled_model, mixed_texts, monkeypatch):
    monkeypatch.setattr(tokenizer_mod, "WORD_CACHE_LIMIT", 50)
    tokenizer = TextTokenizer(bundled_model.path, 256)
    for start in range(0, 240, 40):  # several calls, the cache emptied between them
        texts = mixed_texts[start:start + 40]
        assert tokenizer(texts).ids == _reference(hf, texts, 256)
        assert len(tokenizer._word_ids) < 50 + 40 * 300


def test_every_ascii_character_alone_and_in_a_word(hf, ours):
    texts = [chr(c) for c in range(128)] + [f"ab{chr(c)}CD" for c in range(128)]
    assert ours(texts).ids == _reference(hf, texts, 256)


@pytest.mark.parametrize("normalizer", [
    {"lowercase": False}, {"strip_accents": False}, {"clean_text": False}, None])
def test_other_normalizers_get_no_ascii_shortcut(ours, normalizer):
    """Only the exact BERT-uncased normalizer is reproduced in Python; any other keeps its own."""
    from tokenizers import Tokenizer, normalizers

    backend = Tokenizer.from_str(ours.backend.to_str())
    backend.normalizer = None if normalizer is None else normalizers.BertNormalizer(**normalizer)
    assert _ascii_backend(backend) is None
    backend.normalizer = normalizers.BertNormalizer()  # the defaults are BERT-uncased's
    assert _ascii_backend(backend) is not None


def test_another_pre_tokenizer_gets_no_shortcut(ours):
    """The word cache relies on BertPreTokenizer splitting at white space and punctuation."""
    from tokenizers import Tokenizer, pre_tokenizers

    backend = Tokenizer.from_str(ours.backend.to_str())
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    assert _ascii_backend(backend) is None
