"""Token-level output (`output.granularity = "subword" | "word"`): a vector per token or per word,
beside each text's vector.

A token's vector is its hidden states with the text vector's layer selection and combination
(`encode.layers`, `layer_combine`, or the pooling preset's), in float32, neither pooled over
tokens, cut to `output.dimensions` nor normalised. A word (Encoding.word_ids: the words the
tokenizer's pre-tokenizer splits) gets its first sub-token's vector, or the mean of its
sub-tokens' vectors. Tokens past max_length are cut off as for the text vector; a word cut
there keeps the sub-tokens the model saw.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from ..config import ConfigError, JobConfig
from .batching import Batch
from .tokenizer import TokenSpans

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TokenPolicy:
    granularity: str  # subword | word
    word_pooling: str  # first | mean
    special_tokens: bool  # subword: rows for [CLS] / [SEP]

    @classmethod
    def for_job(cls, job: JobConfig) -> "TokenPolicy | None":
        out = job.output
        if out.granularity == "text":
            return None
        return cls(out.granularity, out.word_pooling, out.special_tokens)

    @property
    def mean(self) -> bool:
        """A row's vector is the mean of several sub-tokens' (word_pooling = "mean")."""
        return self.granularity == "word" and self.word_pooling == "mean"


@dataclass
class TokenRows:
    """The token table's rows for a list of texts, text after text (a text's rows consecutive)."""
    owner: np.ndarray  # int64 [m]: the text of each row
    position: np.ndarray  # int32 [m]: 0-based within its text
    token: list[str]  # the token's string, or the word's text
    char_start: np.ndarray  # int32 [m]: text[char_start:char_end] is the token's (word's) text
    char_end: np.ndarray
    pieces: np.ndarray  # int32: the sub-token positions (in the model's ids) each row takes,
    piece_start: np.ndarray  # int64 [m + 1]: row i takes pieces[piece_start[i]:piece_start[i+1]]

    def __len__(self) -> int:
        return len(self.owner)


def token_rows(texts: list[str], spans: list[TokenSpans], policy: TokenPolicy) -> TokenRows:
    owner, position, token, starts, ends, pieces, counts = [], [], [], [], [], [], []
    for row, (text, span) in enumerate(zip(texts, spans)):
        if policy.granularity == "subword":
            chosen = np.flatnonzero(span.own | (span.special if policy.special_tokens else False))
            owner.append(np.full(len(chosen), row, np.int64))
            token += [span.tokens[i] for i in chosen]
            starts.append(span.offsets[chosen, 0])
            ends.append(span.offsets[chosen, 1])
            pieces.append(chosen)
            counts.append(np.ones(len(chosen), np.int64))
            position.append(np.arange(len(chosen), dtype=np.int32))
            continue
        own = np.flatnonzero(span.own)
        words = span.word_ids[own]
        # a word's sub-tokens are consecutive: a row starts where the word id changes
        first = np.flatnonzero(np.r_[True, words[1:] != words[:-1]]) if len(own) else own
        n_pieces = np.diff(np.r_[first, len(own)])
        word_start, word_end, texts_of = _trimmed(text, span.offsets[own[first], 0],
                                                  span.offsets[own[first + n_pieces - 1], 1])
        real = np.fromiter(map(bool, texts_of), bool, count=len(texts_of))
        if not real.all():  # a "word" of white space only (byte-level BPE's lone 'Ġ')
            first, n_pieces = first[real], n_pieces[real]
            word_start, word_end = word_start[real], word_end[real]
            texts_of = [w for w, keep in zip(texts_of, real) if keep]
        owner.append(np.full(len(first), row, np.int64))
        token += texts_of
        starts.append(word_start)
        ends.append(word_end)
        position.append(np.arange(len(first), dtype=np.int32))
        if policy.mean:
            pieces.append(own[np.repeat(first, n_pieces) + _ramp(n_pieces)])
            counts.append(n_pieces)
        else:
            pieces.append(own[first])
            counts.append(np.ones(len(first), np.int64))

    def joined(parts, dtype):
        return np.concatenate(parts).astype(dtype, copy=False) if parts else np.zeros(0, dtype)

    return TokenRows(owner=joined(owner, np.int64), position=joined(position, np.int32),
                     token=token, char_start=joined(starts, np.int32),
                     char_end=joined(ends, np.int32), pieces=joined(pieces, np.int32),
                     piece_start=np.r_[0, np.cumsum(joined(counts, np.int64))].astype(np.int64))


def _trimmed(text: str, starts: np.ndarray, ends: np.ndarray):
    """Word spans without the white space some tokenizers' offsets take in (a Metaspace '▁'
    before a word): (starts, ends, the words' texts), '' for a span of white space only."""
    starts, ends, words = starts.copy(), ends.copy(), []
    for i, (a, b) in enumerate(zip(starts.tolist(), ends.tolist())):
        word = text[a:b]
        stripped = word.strip()
        if len(stripped) != len(word):
            if stripped:
                starts[i] = a + len(word) - len(word.lstrip())
                ends[i] = starts[i] + len(stripped)
            else:
                ends[i] = starts[i]
        words.append(stripped)
    return starts, ends, words


def _ramp(counts: np.ndarray) -> np.ndarray:
    """0, 1, .., c - 1 for each count c, concatenated."""
    return np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)


def gather(states: list[np.ndarray], rows: TokenRows, mean: bool) -> np.ndarray:
    """float32 [len(rows), width]: each row's vector from its text's per-token vectors
    (states[text]: [tokens, width]), its sub-tokens' mean when `mean`, else its one sub-token's."""
    width = next((s.shape[1] for s in states if s is not None), 0)
    out = np.empty((len(rows), width), np.float32)
    if not len(rows):
        return out
    bounds = np.searchsorted(rows.owner, np.arange(len(states) + 1))
    for text in range(len(states)):
        a, b = int(bounds[text]), int(bounds[text + 1])
        if a == b:
            continue
        p0, p1 = int(rows.piece_start[a]), int(rows.piece_start[b])
        picked = states[text][rows.pieces[p0:p1]]
        if mean:
            local = rows.piece_start[a:b + 1] - p0
            out[a:b] = np.add.reduceat(picked, local[:-1], axis=0) / np.diff(local)[:, None]
        else:
            out[a:b] = picked
    return out


class TokenEncoder:
    """An Encoder's model run once for both outputs: each text's vector (exactly as the Encoder
    makes it) and its per-token vectors [tokens, width] (padding dropped). Only token-level jobs
    use it, so the text path never computes or copies token states."""

    def __init__(self, encoder):
        s = encoder.settings
        if s.layers is None:
            raise ConfigError("token-level output takes token vectors from hidden states; "
                              "encode.pooling = 'pooler' has none")
        self.encoder = encoder

    def __call__(self, batch: Batch) -> tuple[np.ndarray, list[np.ndarray]]:
        return self.encode(batch.input_ids, batch.attention_mask)

    def encode(self, input_ids: torch.Tensor,
               attention_mask: torch.Tensor) -> tuple[np.ndarray, list[np.ndarray]]:
        """On device out-of-memory, halves the batch and retries (as the Encoder does)."""
        try:
            return self._forward(input_ids, attention_mask)
        except torch.OutOfMemoryError:
            if len(input_ids) == 1:
                raise
        enc = self.encoder
        if enc.device.type == "cuda":
            torch.cuda.empty_cache()
        enc.oom_splits += 1
        log.warning("out of memory on a batch of %d rows x %d tokens; retrying as two halves",
                    len(input_ids), input_ids.shape[1])
        half = len(input_ids) // 2
        first = self.encode(input_ids[:half], attention_mask[:half])
        second = self.encode(input_ids[half:], attention_mask[half:])
        return np.concatenate([first[0], second[0]]), first[1] + second[1]

    def _forward(self, input_ids: torch.Tensor,
                 attention_mask: torch.Tensor) -> tuple[np.ndarray, list[np.ndarray]]:
        vectors, tokens = self.encoder._forward(input_ids, attention_mask, per_token=True)
        return vectors.cpu().numpy(), tokens

