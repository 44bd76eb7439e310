"""Long texts cut into token windows, and windows' vectors pooled back into one vector a text.

A text whose tokens fit in one window goes through the model exactly as under `truncate`.
A longer one is tokenized whole once, with character offsets, and cut into windows of
`chunk_tokens` of its own tokens, consecutive windows sharing `chunk_overlap`; each window gets
the model's special tokens and the prompt, as a text of its own would. At most `max_chunks`
windows a text: past them the text is flagged truncated.

Pooling (`output.chunks = "pool"`): a text's vector is the mean of its windows' vectors, each
weighted by the tokens the model saw in it (special tokens and prompt included), computed in
float32 on the windows' vectors before normalisation; then normalised if the job normalises.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np

from ..config import ConfigError, JobConfig
from .tokenizer import TextTokenizer, Tokenized

TOO_LONG = "too long"  # the reject reason under long_text = "reject"


@dataclass(frozen=True)
class ChunkPolicy:
    mode: str  # truncate | chunk | reject
    tokens: int  # a window's own tokens (besides specials and prompt)
    overlap: int
    max_chunks: int
    rows: bool  # one output row per window (else one pooled row per text)

    @classmethod
    def for_job(cls, job: JobConfig, tokenizer: TextTokenizer) -> "ChunkPolicy":
        enc = job.encode
        room = tokenizer.max_length - tokenizer.n_fixed
        tokens = room if enc.chunk_tokens is None else enc.chunk_tokens
        if tokens > room:
            raise ConfigError(
                f"encode.chunk_tokens = {tokens} does not fit the model's {tokenizer.max_length} "
                f"tokens with its {tokenizer.n_fixed} special and prompt tokens; use at most {room}")
        if enc.long_text == "chunk" and enc.chunk_overlap >= tokens:
            raise ConfigError(f"encode.chunk_overlap = {enc.chunk_overlap} must be less than the "
                              f"{tokens} tokens of a window")
        return cls(enc.long_text, tokens, enc.chunk_overlap, enc.max_chunks,
                   job.output.chunks == "rows")

    @property
    def pools(self) -> bool:
        return self.mode == "chunk" and not self.rows

    def fits(self, tokens: Tokenized, fixed: int) -> np.ndarray:
        """bool per text: its tokens fit in one window."""
        return tokens.n_tokens - fixed <= self.tokens

    def n_windows(self, tokens: Tokenized, fixed: int) -> np.ndarray:
        """int32 per text: the windows it is cut into (capped at max_chunks)."""
        own = np.maximum(tokens.n_tokens.astype(np.int64) - fixed, 0)
        stride = self.tokens - self.overlap
        over = np.maximum(own - self.tokens, 0)
        return np.minimum(1 + (over + stride - 1) // stride, self.max_chunks).astype(np.int32)


@dataclass
class TokenWindows:
    """The windows of a list of texts, text after text (a text's windows are consecutive)."""
    ids: list[list[int]]  # each window's token ids as the model takes them
    owner: np.ndarray  # int64: the text of each window
    chunk: np.ndarray  # int32: 0-based within its text
    token_start: np.ndarray  # int32: the window's first and past-last token in the text's own
    token_end: np.ndarray  # tokens (no specials, no prompt)
    char_start: np.ndarray  # int32: text[char_start:char_end] is the window's text
    char_end: np.ndarray
    n_chunks: np.ndarray  # int32 per text
    truncated: np.ndarray  # bool per text: more than max_chunks windows were needed

    @property
    def weights(self) -> np.ndarray:
        return np.fromiter(map(len, self.ids), np.float32, count=len(self.ids))


def cut_windows(tokenizer: TextTokenizer, texts: list[str], tokens: Tokenized,
                policy: ChunkPolicy) -> TokenWindows:
    """Every text's windows. A text that fits keeps its ids from `tokens` (so it is embedded
    exactly as under truncate); a longer one is tokenized again whole, with offsets."""
    fixed = tokenizer.n_fixed
    fits = policy.fits(tokens, fixed)
    stride = policy.tokens - policy.overlap
    ids: list[list[int]] = []
    columns: dict[str, list] = {k: [] for k in ("owner", "chunk", "token_start", "token_end",
                                                 "char_start", "char_end")}
    n_chunks = np.ones(len(texts), np.int32)
    truncated = np.zeros(len(texts), bool)

    def add(row: int, chunk: int, tokens_span: tuple[int, int], chars: tuple[int, int]) -> None:
        for key, value in zip(columns, (row, chunk, *tokens_span, *chars)):
            columns[key].append(value)

    for row, text in enumerate(texts):
        if fits[row]:
            ids.append(tokens.ids[row])
            add(row, 0, (0, int(tokens.n_tokens[row]) - fixed), (0, len(text)))
            continue
        content, offsets = tokenizer.content(text)
        needed = 1 + math.ceil(max(len(content) - policy.tokens, 0) / stride)
        count = min(needed, policy.max_chunks)
        n_chunks[row], truncated[row] = count, needed > count
        for chunk in range(count):
            start = chunk * stride
            end = min(start + policy.tokens, len(content))
            ids.append(tokenizer.window(content[start:end]))
            last = chunk == needed - 1
            add(row, chunk, (start, end),
                (0 if chunk == 0 else int(offsets[start, 0]),
                 len(text) if last else int(offsets[end - 1, 1])))
    arrays = {k: np.asarray(v, np.int64 if k == "owner" else np.int32) for k, v in columns.items()}
    return TokenWindows(ids=ids, n_chunks=n_chunks, truncated=truncated, **arrays)


def pool_windows(vectors: np.ndarray, owner: np.ndarray, weights: np.ndarray,
                 normalize: bool) -> np.ndarray:
    """float32 [texts, dim]: each text's windows' vectors averaged, weighted by their tokens
    (windows of a text consecutive in `owner`), then L2-normalised if asked."""
    if len(owner) == 0:
        return np.zeros((0, vectors.shape[1]), np.float32)
    starts = np.flatnonzero(np.r_[True, owner[1:] != owner[:-1]])
    weights = weights.astype(np.float32)
    sums = np.add.reduceat(vectors.astype(np.float32) * weights[:, None], starts, axis=0)
    pooled = sums / np.add.reduceat(weights, starts)[:, None]
    alone = np.diff(np.r_[starts, len(owner)]) == 1  # one window: its vector as it is, exactly
    pooled[alone] = vectors[starts[alone]]
    if normalize:
        norms = np.linalg.norm(pooled, axis=1, keepdims=True)
        pooled /= np.maximum(norms, 1e-12)
    return pooled.astype(np.float32, copy=False)


def too_long(tokenizer: TextTokenizer, tokens: Tokenized, policy: ChunkPolicy) -> np.ndarray:
    """bool per text: more than one window (long_text = "reject"); a sentence pair, past
    max_length."""
    if tokens.type_ids is not None:
        return tokens.truncated.copy()
    return ~policy.fits(tokens, tokenizer.n_fixed)


def resolve_chunking(job: JobConfig, source, runtime) -> JobConfig:
    """The job with encode.chunk_tokens made concrete (its default depends on the model's
    special tokens and the prompt's), so the manifest and the config guard record the value."""
    if job.encode.long_text == "truncate":
        return job
    from .tokenizer import tokenizer_for

    policy = ChunkPolicy.for_job(job, tokenizer_for(source, runtime, job))
    return dataclasses.replace(job, encode=dataclasses.replace(job.encode,
                                                                chunk_tokens=policy.tokens))
