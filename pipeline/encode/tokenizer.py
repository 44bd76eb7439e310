"""The model's tokenizer: token ids per text, truncated as Hugging Face truncates, with a fast
path for BERT-uncased ASCII text (normalised in Python, ids cached per word)."""
from __future__ import annotations

import json
import unicodedata
from dataclasses import dataclass
from itertools import chain
from pathlib import Path

import numpy as np

from ..config import ConfigError


@dataclass(frozen=True)
class Tokenized:
    ids: list[list[int]]  # truncated to max_length, special tokens included
    n_tokens: np.ndarray  # int32, before truncation
    truncated: np.ndarray  # bool
    type_ids: list[list[int]] | None = None  # segment ids, for sentence pairs
    spans: list["TokenSpans"] | None = None  # per text, of the kept ids: token-level output
    unfit: np.ndarray | None = None  # bool, pairs only: the pair truncation cannot fit the pair
    # (only_second with a first text alone over max_length); its ids are empty


@dataclass(frozen=True)
class TokenSpans:
    """One text's kept tokens (as in Tokenized.ids, specials and prompt included), each with its
    string, its character span in the original text (before prompt and lower-casing), its word
    (Encoding.word_ids: the pre-tokenizer's words) and whether it is the text's own token."""
    tokens: list[str]
    offsets: np.ndarray  # int32 [n, 2]; (0, 0) for special and prompt tokens
    word_ids: np.ndarray  # int32 [n]; -1 for special tokens
    own: np.ndarray  # bool [n]: neither a special token nor the prompt's
    special: np.ndarray  # bool [n]: a special token of the template ([CLS], [SEP])


class TextTokenizer:
    """The model's fast tokenizer, truncating as Hugging Face does for single texts."""

    def __init__(self, model_path: Path, max_length: int, lowercase: bool = False,
                 prompt: str = "", pair_truncation: str = "longest_first"):
        """lowercase: sentence-transformers' do_lower_case; prompt: put before every text (its
        tokens count in pooling and in n_tokens, as in sentence-transformers); pair_truncation:
        how a sentence pair over max_length is cut (Hugging Face's strategies)."""
        from transformers import AutoTokenizer

        self.lowercase, self.prompt, self.pair_truncation = lowercase, prompt, pair_truncation
        try:
            hf = AutoTokenizer.from_pretrained(model_path, use_fast=True)
        except (OSError, ValueError, TypeError) as exc:
            raise ConfigError(f"model folder {model_path}: its tokenizer cannot be loaded ({exc}); "
                              f"{_tokenizer_files(model_path)}") from None
        if not hf.is_fast:
            raise ConfigError(f"model folder {model_path} has no fast tokenizer (tokenizer.json); "
                              f"{_tokenizer_files(model_path)}")
        self.backend = hf.backend_tokenizer
        self.backend.no_truncation()
        self.backend.no_padding()
        self.pad_id = hf.pad_token_id if hf.pad_token_id is not None else 0
        self.max_length = max_length
        # The special tokens the template puts around a text ([CLS] .. [SEP] for BERT); truncation
        # keeps those after it.
        self._template = _special_tokens(self.backend)
        self.n_suffix = len(self._template[1])
        # The prompt's own tokens: every window of a long text starts with them (after [CLS]).
        prompt_text = prompt.lower() if lowercase else prompt
        self.prompt_ids = (self.backend.encode(prompt_text, add_special_tokens=False).ids
                           if prompt else [])
        self.ascii_backend = _ascii_backend(self.backend)
        if self.ascii_backend is not None:
            # Characters met so far: what the normalizer makes of each one alone.
            upper_to_lower = {c: chr(c + 32) for c in range(ord("A"), ord("Z") + 1)}
            self._char_table: dict[int, str] = {**BERT_ASCII_CLEAN, **upper_to_lower}
            self._chars_known: set[str] = set(map(chr, range(128)))
            self._chars_unsafe: set[str] = set()
            self._word_ids: dict[str, list[int]] = {}
            self._separator_id = self.ascii_backend.encode(SEPARATOR, add_special_tokens=False).ids[0]
            # Added tokens matched in the original text (not normalised): a text with one of them
            # keeps the tokenizer's own path.
            added = self.backend.get_added_tokens_decoder()
            self._verbatim = [t.content for t in added.values() if not t.normalized]
        self._check(model_path, hf.unk_token_id)

    def _check(self, model_path: Path, unk_id: int | None) -> None:
        """Refuse a tokenizer that would make every text the same: one that turns plain words
        into the unknown token (a folder without its vocabulary: transformers then builds an
        empty one), or a max_length with no room for a single token between the specials."""
        words = self.backend.encode(PROBE, add_special_tokens=False).ids
        if not words or sum(i == unk_id for i in words) > len(words) // 2:
            raise ConfigError(
                f"model folder {model_path}: its tokenizer turns plain English words into the "
                f"unknown token, so every text would get the same vector; "
                f"{_tokenizer_files(model_path)}")
        specials = len(self._template[0]) + len(self._template[1])
        if self.max_length < specials + 1:
            raise ConfigError(
                f"model.max_length = {self.max_length} leaves no room for text: the model adds "
                f"{specials} special tokens to each text; use at least {specials + 1}")

    def _encode(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text; encode_batch_fast skips the character offsets we never use."""
        if self.ascii_backend is None:
            return [e.ids for e in self.backend.encode_batch_fast(texts)]
        normalized = [self._normalize(text) for text in texts]
        by_words = [n is not None and n.isascii() for n in normalized]
        ids = self._encode_by_words([n for n, w in zip(normalized, by_words) if w])
        raw = iter(self.ascii_backend.encode_batch_fast(
            [n for n, w in zip(normalized, by_words) if n is not None and not w]))
        full = iter(self.backend.encode_batch_fast(
            [t for t, n in zip(texts, normalized) if n is None]))
        return [next(ids) if w else next(raw).ids if n is not None else next(full).ids
                for n, w in zip(normalized, by_words)]

    def _encode_by_words(self, texts: list[str]):
        """Normalised ASCII texts, whose only white space is ' ': BertPreTokenizer splits at
        white space first and WordPiece never looks past a word, so a text's ids are its
        space-separated words' ids in turn, between the template's special tokens. Words repeat
        (Zipf), so their ids are kept: the tokenizer then sees each new word once."""
        words = [text.split() for text in texts]
        cache = self._word_ids
        if len(cache) > WORD_CACHE_LIMIT:  # bounded: memory stays flat on endless inputs
            cache.clear()
        new = list({w for ws in words for w in ws if w not in cache})
        cache.update(zip(new, self._word_pieces(new)))
        head, tail = self._template
        return iter([head + list(chain.from_iterable(map(cache.__getitem__, ws))) + tail
                     for ws in words])

    def _word_pieces(self, words: list[str]) -> list[list[int]]:
        """Each word's ids, from encodings of many words joined by a punctuation mark (an
        Encoding per word costs ~8 us). BertPreTokenizer splits punctuation off as a word of
        its own, so the mark's id falls between the words' ids; the few words that contain the
        mark themselves are encoded alone."""
        plain = [w for w in words if SEPARATOR not in w]
        # in groups of 1,000 words, which the tokenizer encodes in parallel
        groups = [plain[i:i + 1000] for i in range(0, len(plain), 1000)]
        pieces = {}
        encoded = self.ascii_backend.encode_batch_fast(
            [f" {SEPARATOR} ".join(group) for group in groups], add_special_tokens=False)
        for group, enc in zip(groups, encoded):
            ids, start = enc.ids, 0
            cuts = [i for i, t in enumerate(ids) if t == self._separator_id] + [len(ids)]
            if len(cuts) == len(group):
                for word, end in zip(group, cuts):
                    pieces[word] = ids[start:end]
                    start = end + 1
        rest = [w for w in words if w not in pieces]
        alone = self.ascii_backend.encode_batch_fast(rest, add_special_tokens=False)
        pieces.update(zip(rest, (e.ids for e in alone)))
        return [pieces[w] for w in words]

    def _normalize(self, text: str) -> str | None:
        """The BERT-uncased normalizer's output, made in Python (str.translate runs in C); None
        when the text needs the tokenizer's own normalizer. Every step of that normalizer (clean,
        pad CJK, NFD and drop accents, lower-case) maps one character at a time, except that NFD
        reorders runs of combining marks: so each character's mapping is asked of the normalizer
        itself, once, and kept unless what it leaves has a combining mark in it."""
        if any(token in text for token in self._verbatim):
            return None
        if text.isascii():  # O(1) per str in CPython
            return text.translate(BERT_ASCII_CLEAN).lower()
        chars = set(text)
        for char in chars - self._chars_known:
            mapped = self.backend.normalizer.normalize_str(char)
            if any(unicodedata.combining(c) for c in mapped):
                self._chars_unsafe.add(char)
            elif mapped != char:
                self._char_table[ord(char)] = mapped
            self._chars_known.add(char)
        if not self._chars_unsafe.isdisjoint(chars):
            return None
        return text.translate(self._char_table)

    def __call__(self, texts: list[str], pairs: list[str] | None = None) -> Tokenized:
        """Token ids of each text (with its pair's, when pairs are given)."""
        if self.prompt:
            texts = [self.prompt + text for text in texts]
        if self.lowercase:
            texts = [text.lower() for text in texts]
            pairs = None if pairs is None else [text.lower() for text in pairs]
        if pairs is not None:
            return self._pairs(texts, pairs)
        ids = self._encode(texts)
        n_tokens = np.fromiter((len(x) for x in ids), dtype=np.int32, count=len(ids))
        truncated = n_tokens > self.max_length
        keep_head = self.max_length - self.n_suffix
        for i in np.flatnonzero(truncated):
            row = ids[i]
            ids[i] = row[:keep_head] + row[len(row) - self.n_suffix:] if self.n_suffix else row[:keep_head]
        return Tokenized(ids=ids, n_tokens=n_tokens, truncated=truncated)

    def with_spans(self, texts: list[str]) -> Tokenized:
        """As calling the tokenizer on single texts (the same ids, truncated alike), through the
        tokenizer's own encode_batch with offsets and word ids: each text's TokenSpans."""
        prompted = [self.prompt + text for text in texts] if self.prompt else list(texts)
        lowered = [text.lower() for text in prompted] if self.lowercase else prompted
        n_prompt = len(self.prompt)
        keep_head = self.max_length - self.n_suffix
        ids, spans, n_tokens = [], [], np.zeros(len(texts), np.int32)
        for row, (text, low, enc) in enumerate(zip(prompted, lowered,
                                                   self.backend.encode_batch(lowered))):
            n = n_tokens[row] = len(enc.ids)
            keep = (np.r_[np.arange(keep_head), np.arange(n - self.n_suffix, n)]
                    if n > self.max_length else np.arange(n))
            offsets = np.asarray(enc.offsets, np.int32).reshape(-1, 2)[keep]
            special = np.asarray(enc.special_tokens_mask, bool)[keep]
            if len(low) != len(text):
                offsets = _original_offsets(text, offsets)
            own = ~special & (offsets[:, 0] >= n_prompt)
            offsets = np.where(own[:, None], offsets - n_prompt, 0).astype(np.int32)
            words = np.fromiter((-1 if w is None else w for w in enc.word_ids), np.int32, count=n)
            all_ids, all_tokens = enc.ids, enc.tokens
            ids.append([all_ids[i] for i in keep])
            spans.append(TokenSpans(tokens=[all_tokens[i] for i in keep], offsets=offsets,
                                    word_ids=words[keep], own=own, special=special))
        return Tokenized(ids=ids, n_tokens=n_tokens, truncated=n_tokens > self.max_length,
                         spans=spans)

    @property
    def n_fixed(self) -> int:
        """Tokens every text gets besides its own: special tokens and the prompt's."""
        return len(self._template[0]) + len(self.prompt_ids) + len(self._template[1])

    def content(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        """A whole text's own tokens (no special tokens, no prompt) and each one's character span
        in `text`: (ids int32 [n], offsets int32 [n, 2]), so text[start:end] is the token's text."""
        lowered = text.lower() if self.lowercase else text
        encoding = self.backend.encode(lowered, add_special_tokens=False)
        ids = np.asarray(encoding.ids, dtype=np.int32)
        offsets = np.asarray(encoding.offsets, dtype=np.int32).reshape(-1, 2)
        if len(lowered) != len(text):  # a character whose lower case is longer ('İ' -> 'i̇')
            offsets = _original_offsets(text, offsets)
        return ids, offsets

    def window(self, content_ids: np.ndarray) -> list[int]:
        """Some of a text's own tokens as the model takes them: the template's special tokens
        around the prompt's tokens and these."""
        head, tail = self._template
        return head + self.prompt_ids + content_ids.tolist() + tail

    def _pairs(self, texts: list[str], pairs: list[str]) -> Tokenized:
        """Pairs through the tokenizer's own pair template (segment ids 0 / 1 for BERT); those
        over max_length are encoded again with its truncation (longest_first: tokens come off
        the longer text one at a time; only_second: off the second text only)."""
        whole = self.backend.encode_batch_fast(list(zip(texts, pairs)))
        ids, types = [e.ids for e in whole], [e.type_ids for e in whole]
        n_tokens = np.fromiter(map(len, ids), dtype=np.int32, count=len(ids))
        truncated = n_tokens > self.max_length
        over = np.flatnonzero(truncated).tolist()
        strategy = self.pair_truncation
        unfit = np.zeros(len(ids), bool)
        if over:
            self.backend.enable_truncation(self.max_length, strategy=strategy)
            try:
                cut = self._truncated_pairs([(texts[i], pairs[i]) for i in over])
            finally:
                self.backend.no_truncation()
            for i, encoding in zip(over, cut):
                if encoding is None:
                    unfit[i], ids[i], types[i] = True, [], []
                else:
                    ids[i], types[i] = encoding.ids, encoding.type_ids
        return Tokenized(ids=ids, n_tokens=n_tokens, truncated=truncated, type_ids=types,
                         unfit=unfit)

    def _truncated_pairs(self, pairs: list[tuple[str, str]]) -> list:
        """Encodings under the truncation set; None for a pair it cannot fit (the batch fails
        as a whole, so then each pair on its own)."""
        try:
            return self.backend.encode_batch_fast(pairs)
        except Exception:  # noqa: BLE001 (the tokenizers library raises a bare Exception)
            cut = []
            for pair in pairs:
                try:
                    cut.append(self.backend.encode_batch_fast([pair])[0])
                except Exception:  # noqa: BLE001
                    cut.append(None)
            return cut


def pair_too_long(strategy: str) -> str:
    """The reject reason of a pair `strategy` cannot fit into max_length (only_second: the first
    text alone is longer)."""
    return f"pair too long for {strategy}"


# What BertNormalizer(clean_text, lowercase) does to ASCII text: control characters go,
# tab / newline / carriage return become spaces; accents and CJK spacing never apply to ASCII.
BERT_ASCII_CLEAN = {**{c: None for c in range(32)}, 9: 32, 10: 32, 13: 32, 127: None}
BERT_ASCII_NORMALIZER = {"type": "BertNormalizer", "clean_text": True, "handle_chinese_chars": True,
                         "strip_accents": None, "lowercase": True}


WORD_CACHE_LIMIT = 100_000  # words' ids kept: ~20 MB at most, so memory stays flat
SEPARATOR = "|"  # punctuation: a word of its own to BertPreTokenizer, one id in the vocabulary


PROBE = "The quick brown fox jumps over the lazy dog near the river bank."
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json",
                   "merges.txt", "sentencepiece.bpe.model", "spiece.model", "special_tokens_map.json")


def tokenizer_for(source, runtime, job, prompt: str | None = None) -> "TextTokenizer":
    """The tokenizer a resolved job's texts go through: the model's, its max_length, its
    lower-casing, the job's prompt (or another one, for search queries) and pair truncation."""
    return TextTokenizer(source.path, runtime.max_length, lowercase=source.lowercase,
                         prompt=job.encode.prompt or "" if prompt is None else prompt,
                         pair_truncation=job.input.pair_truncation)


def _tokenizer_files(model_path: Path) -> str:
    present = [f for f in TOKENIZER_FILES if (Path(model_path) / f).is_file()]
    return (f"tokenizer files present: {', '.join(present) or 'none'}; a fast tokenizer needs "
            f"tokenizer.json (or the vocabulary files it is built from: vocab.txt for WordPiece, "
            f"vocab.json + merges.txt for BPE, a sentencepiece model)")


def _original_offsets(text: str, offsets: np.ndarray) -> np.ndarray:
    """Offsets into text.lower(), back to text's characters (a character whose lower case is
    longer: 'İ' -> 'i̇')."""
    lengths = np.fromiter((len(c.lower()) for c in text), np.int32, count=len(text))
    original = np.repeat(np.arange(len(text), dtype=np.int32), lengths)
    original = np.append(original, len(text))
    return np.stack([original[offsets[:, 0]],
                     original[np.maximum(offsets[:, 1] - 1, offsets[:, 0])] + 1], 1).astype(np.int32)


def _special_tokens(backend) -> tuple[list[int], list[int]]:
    """The ids the post-processor puts before and after a text ([CLS] and [SEP] for BERT)."""
    probe = "probe words"
    inner = backend.encode(probe, add_special_tokens=False).ids
    whole = backend.encode(probe, add_special_tokens=True).ids
    head = next(i for i in range(len(whole) + 1) if whole[i:i + len(inner)] == inner)
    return whole[:head], whole[head + len(inner):]


def _ascii_backend(backend):
    """A copy of a BERT-uncased tokenizer without its normalizer, for text normalised in Python
    (str.translate runs in C). The normalizer is ~70 % of the tokenizer's CPU time, and on a CPU
    every core it takes is taken from the model. None for any other normalizer."""
    from tokenizers import Tokenizer

    serialized = backend.to_str()
    spec = json.loads(serialized)
    if spec.get("normalizer") != BERT_ASCII_NORMALIZER or spec.get("pre_tokenizer") != {
            "type": "BertPreTokenizer"}:
        return None
    raw = Tokenizer.from_str(serialized)
    raw.normalizer = None
    return raw
