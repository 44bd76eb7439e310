"""Token spans from the tokenizer (the same ids as the fast path, offsets into the original text
whatever the prompt and lower-casing), token-table rows, and gathering their vectors."""
from __future__ import annotations

import numpy as np
import pytest

from pipeline.encode.token_output import TokenPolicy, gather, token_rows
from pipeline.encode.tokenizer import TextTokenizer

TEXTS = ["Tokenization isn't trivial!", "İstanbul İİ naïve CAFÉ", "plain ascii words here",
         "", "a " * 100, "x@y.org -- 3.5%"]


@pytest.mark.parametrize("prompt, lowercase", [("", False), ("query: ", False),
                                               ("query: ", True)])
def test_spans_keep_the_fast_paths_ids_and_slice_the_original_text(bundled_model, prompt,
                                                                   lowercase):
    tokenizer = TextTokenizer(bundled_model.path, 32, lowercase=lowercase, prompt=prompt)
    fast, spans = tokenizer(TEXTS), tokenizer.with_spans(TEXTS)
    assert spans.ids == fast.ids
    np.testing.assert_array_equal(spans.n_tokens, fast.n_tokens)
    np.testing.assert_array_equal(spans.truncated, fast.truncated)
    n_prompt = len(tokenizer.prompt_ids)
    for text, span, ids in zip(TEXTS, spans.spans, spans.ids):
        assert len(span.tokens) == len(ids)
        # the prompt's tokens and the specials are not the text's own
        assert int(span.own.sum()) == len(ids) - tokenizer.n_fixed
        assert not span.own[:1 + n_prompt].any() and span.special[0] and span.special[-1]
        for (a, b), token, own in zip(span.offsets.tolist(), span.tokens, span.own):
            if not own:
                assert (a, b) == (0, 0)
                continue
            assert 0 <= a < b <= len(text)
            piece = text[a:b]
            if piece.isascii():
                assert piece.lower() == token.removeprefix("##")
    # 'İ' lower-cases to two characters: spans still index the original text
    words = token_rows([TEXTS[1]], [spans.spans[1]], TokenPolicy("word", "first", False))
    assert words.token == ["İstanbul", "İİ", "naïve", "CAFÉ"]


def test_token_rows_and_gather_first_and_mean(bundled_model):
    tokenizer = TextTokenizer(bundled_model.path, 64)
    spans = tokenizer.with_spans(["unbelievably good", "ok"]).spans
    states = [np.arange(len(s.tokens) * 2, dtype=np.float32).reshape(-1, 2) for s in spans]
    sub = token_rows(["unbelievably good", "ok"], spans, TokenPolicy("subword", "first", True))
    assert sub.token[0] == "[CLS]" and sub.owner.tolist().count(1) == 3
    np.testing.assert_array_equal(gather(states, sub, False),
                                  np.concatenate(states))  # every token, specials included
    for pooling in ("first", "mean"):
        policy = TokenPolicy("word", pooling, False)
        rows = token_rows(["unbelievably good", "ok"], spans, policy)
        assert rows.token == ["unbelievably", "good", "ok"]
        assert rows.position.tolist() == [0, 1, 0]
        got = gather(states, rows, policy.mean)
        pieces = [i for i, w in enumerate(spans[0].word_ids) if w == 0]
        first = states[0][pieces].mean(0) if pooling == "mean" else states[0][pieces[0]]
        np.testing.assert_array_equal(got[0], first)
        np.testing.assert_array_equal(got[2], states[1][1])


@pytest.mark.parametrize("kind", ["roberta", "deberta-v2"])
def test_words_of_byte_level_and_metaspace_tokenizers_are_trimmed(kind, bundled_model, tmp_path,
                                                                  mixed_texts):
    """Byte-level BPE has tokens of white space alone, and Metaspace offsets take in the space
    before a word: words are never blank, and their text has no white space at either end."""
    from test_model_families import _family

    _, tokenizer = _family(kind, mixed_texts, bundled_model.path)
    tokenizer.save_pretrained(tmp_path)
    probe = ["  Hello,  world!  It's fine. ", "naïve café", "emoji 😀🚀 here", "tab\there"]
    ours = TextTokenizer(tmp_path, 64)
    spans = ours.with_spans(probe)
    assert spans.ids == ours(probe).ids
    for text, span in zip(probe, spans.spans):
        for pooling in ("first", "mean"):
            rows = token_rows([text], [span], TokenPolicy("word", pooling, False))
            assert rows.token == [text[a:b] for a, b in zip(rows.char_start, rows.char_end)]
            assert all(w and w == w.strip() for w in rows.token)
            assert np.diff(rows.piece_start).min() >= 1
    words = token_rows(probe[:1], spans.spans[:1], TokenPolicy("word", "first", False)).token
    assert "".join(words) == "Hello,world!It'sfine."
