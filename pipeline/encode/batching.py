"""Cut a window of tokenized rows into batches under a token budget, pad each batch to its own
longest row (dynamic padding), and put encoded rows back in input order."""
from __future__ import annotations

from dataclasses import dataclass
from itertools import chain
from typing import Callable

import numpy as np
import torch

from ..config import ConfigError
from .chunking import ChunkPolicy, cut_windows, pool_windows


@dataclass
class Batch:
    positions: np.ndarray  # row positions inside the window, in batch order
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    real_tokens: int
    padded_tokens: int
    token_type_ids: torch.Tensor | None = None  # segment ids, for sentence pairs


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
            pad_to_multiple_of: int = 1, pin_memory: bool = False,
            type_ids: list[list[int]] | None = None) -> Batch:
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
    types_t = None
    if type_ids is not None:
        types_t = torch.zeros((len(rows), width), dtype=torch.int64, pin_memory=pin_memory)
        types_t.numpy()[mask] = np.fromiter(chain.from_iterable(type_ids[p] for p in positions),
                                            dtype=np.int64, count=int(lengths.sum()))
    return Batch(positions=positions, input_ids=ids_t, attention_mask=mask_t,
                 real_tokens=int(lengths.sum()), padded_tokens=len(rows) * width,
                 token_type_ids=types_t)


def encode_in_order(encode: Callable[[Batch], np.ndarray], batches: list[Batch], rows: int,
                    width: int) -> np.ndarray:
    """Encode sorted batches and put every row back at its input position."""
    out = np.zeros((rows, width), np.float32)
    for batch in batches:
        out[batch.positions] = encode(batch)
    return out


def encode_texts(tokenizer, encoder, texts: list[str], batch_tokens: int,
                 max_batch_size: int, pairs: list[str] | None = None,
                 pool_chunks: tuple[ChunkPolicy, bool] | None = None) -> np.ndarray:
    """float32 [len(texts), encoder.width]: tokenize, sort into padded batches, encode, unsort.
    pool_chunks: (policy, normalize): long texts cut into windows whose vectors are pooled into
    one a text (chunking.py), then normalised if asked."""
    if not texts:
        return np.zeros((0, encoder.width), np.float32)
    tokens = tokenizer(list(texts), pairs)
    if tokens.unfit is not None and tokens.unfit.any():
        row = int(np.flatnonzero(tokens.unfit)[0])
        raise ConfigError(f"text pair {row} (0-based) cannot be embedded as the run did: "
                          f"input.pair_truncation = {tokenizer.pair_truncation!r} cannot fit it "
                          f"into {tokenizer.max_length} tokens (its first text alone is longer)")
    ids, type_ids = tokens.ids, tokens.type_ids
    if pool_chunks is not None:
        windows = cut_windows(tokenizer, list(texts), tokens, pool_chunks[0])
        ids = windows.ids
    lengths = np.fromiter(map(len, ids), np.int64, count=len(ids))
    batches = [collate(ids, positions, tokenizer.pad_id, encoder.runtime.pad_multiple,
                       type_ids=type_ids)
               for positions in plan_batches(lengths, batch_tokens, max_batch_size)]
    vectors = encode_in_order(encoder.encode_batch, batches, len(ids), encoder.width)
    if pool_chunks is None:
        return vectors
    return pool_windows(vectors, windows.owner, windows.weights, pool_chunks[1])
