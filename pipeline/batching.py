"""Tokenize, sort by token count, cut batches by a token budget, pad each batch to its own longest row."""
from __future__ import annotations

import json
from dataclasses import dataclass
from itertools import chain
from pathlib import Path

import numpy as np
import torch


@dataclass(frozen=True)
class Tokenized:
    ids: list[list[int]]  # truncated to max_length, special tokens included
    n_tokens: np.ndarray  # int32, before truncation
    truncated: np.ndarray  # bool


@dataclass
class Batch:
    positions: np.ndarray  # row positions inside the window, in batch order
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    real_tokens: int
    padded_tokens: int


class TextTokenizer:
    """The model's fast tokenizer, truncating as Hugging Face does for single texts."""

    def __init__(self, model_path: Path, max_length: int):
        from transformers import AutoTokenizer

        hf = AutoTokenizer.from_pretrained(model_path, use_fast=True)
        if not hf.is_fast:
            raise ValueError(f"model at {model_path} has no fast tokenizer (tokenizer.json)")
        self.backend = hf.backend_tokenizer
        self.backend.no_truncation()
        self.backend.no_padding()
        self.pad_id = hf.pad_token_id if hf.pad_token_id is not None else 0
        self.max_length = max_length
        # Special tokens the template adds after the text ([SEP] for BERT): truncation keeps them.
        probe = self.backend.encode("a", add_special_tokens=True).special_tokens_mask
        self.n_suffix = len(probe) - len("".join(map(str, probe)).rstrip("1"))
        self.ascii_backend = _ascii_backend(self.backend)

    def _encode(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text; encode_batch_fast skips the character offsets we never use."""
        if self.ascii_backend is None:
            return [e.ids for e in self.backend.encode_batch_fast(texts)]
        plain = [text.isascii() for text in texts]  # O(1) per str in CPython
        fast = iter(self.ascii_backend.encode_batch_fast(
            [text.translate(BERT_ASCII_CLEAN).lower() for text, p in zip(texts, plain) if p]))
        full = iter(self.backend.encode_batch_fast([t for t, p in zip(texts, plain) if not p]))
        return [next(fast).ids if p else next(full).ids for p in plain]

    def __call__(self, texts: list[str]) -> Tokenized:
        ids = self._encode(texts)
        n_tokens = np.fromiter((len(x) for x in ids), dtype=np.int32, count=len(ids))
        truncated = n_tokens > self.max_length
        keep_head = self.max_length - self.n_suffix
        for i in np.flatnonzero(truncated):
            row = ids[i]
            ids[i] = row[:keep_head] + row[len(row) - self.n_suffix:] if self.n_suffix else row[:keep_head]
        return Tokenized(ids=ids, n_tokens=n_tokens, truncated=truncated)


# What BertNormalizer(clean_text, lowercase) does to ASCII text: control characters go,
# tab / newline / carriage return become spaces; accents and CJK spacing never apply to ASCII.
BERT_ASCII_CLEAN = {**{c: None for c in range(32)}, 9: 32, 10: 32, 13: 32, 127: None}
BERT_ASCII_NORMALIZER = {"type": "BertNormalizer", "clean_text": True, "handle_chinese_chars": True,
                         "strip_accents": None, "lowercase": True}


def _ascii_backend(backend):
    """A copy of a BERT-uncased tokenizer without its normalizer, for ASCII text normalised in
    Python (str.translate + lower run in C). The normalizer is ~70 % of the tokenizer's CPU time,
    and on a CPU every core it takes is taken from the model. None for any other normalizer."""
    from tokenizers import Tokenizer

    serialized = backend.to_str()
    if json.loads(serialized).get("normalizer") != BERT_ASCII_NORMALIZER:
        return None
    raw = Tokenizer.from_str(serialized)
    raw.normalizer = None
    return raw


def plan_batches(lengths: np.ndarray, batch_tokens: int, max_batch_size: int) -> list[np.ndarray]:
    """Longest first (an OOM shows on the first batch), each batch rows x longest <= batch_tokens."""
    order = np.argsort(-lengths, kind="stable")
    batches, start = [], 0
    while start < len(order):
        longest = int(lengths[order[start]])
        size = max(1, min(max_batch_size, batch_tokens // max(longest, 1)))
        batches.append(order[start:start + size])
        start += size
    return batches


def collate(ids: list[list[int]], positions: np.ndarray, pad_id: int,
            pad_to_multiple_of: int = 1, pin_memory: bool = False) -> Batch:
    """Pad the rows at `positions` to the batch's longest (rounded up to `pad_to_multiple_of`)."""
    rows = [ids[p] for p in positions]
    lengths = np.fromiter(map(len, rows), dtype=np.int64, count=len(rows))
    width = int(lengths.max())
    width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
    # Pinned host memory on CUDA, so the copy to the device can run asynchronously.
    ids_t = torch.full((len(rows), width), pad_id, dtype=torch.int64, pin_memory=pin_memory)
    mask_t = torch.empty((len(rows), width), dtype=torch.int64, pin_memory=pin_memory)
    mask = np.arange(width)[None, :] < lengths[:, None]
    # One vectorised scatter of all the batch's tokens, row-major, instead of a loop over rows.
    ids_t.numpy()[mask] = np.fromiter(chain.from_iterable(rows), dtype=np.int64,
                                      count=int(lengths.sum()))
    mask_t.numpy()[:] = mask
    return Batch(positions=positions, input_ids=ids_t, attention_mask=mask_t,
                 real_tokens=int(lengths.sum()), padded_tokens=len(rows) * width)
