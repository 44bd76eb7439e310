"""Learned sparse vectors (SPLADE) from a sentence-transformers SparseEncoder folder.

The document side is the folder's own masked-language model (transformers'
AutoModelForMaskedLM on the MLMTransformer's weights: the head is the model's, not re-written
here) through SpladePooling's arithmetic: the logits of the real tokens, relu, log1p, then max or
sum over the tokens; with max_active_dims, each row's largest values only (sentence-transformers'
`select_max_active_dims`). An inference-free folder's query side is its SparseStaticEmbedding:
each distinct token of the query (no special tokens) weighs its static weight. Rows leave as
scipy CSR matrices [rows, vocabulary], indices ascending within a row.
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch

from ..config import ConfigError
from ..models.model_files import ModelSource
from ..runtime.runtime import TORCH_DTYPES, Runtime, check_here
from .batching import Batch, collate, plan_batches
from .encoder import _trim

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SparseSettings:
    pooling: str  # max | sum
    max_active_dims: int | None

    @classmethod
    def for_job(cls, job) -> "SparseSettings":
        return cls(job.encode.pooling.removeprefix("splade-"), job.encode.max_active_dims)


_MODELS: dict[tuple, torch.nn.Module] = {}
_LOCK = threading.Lock()


def _load(source: ModelSource, runtime: Runtime) -> torch.nn.Module:
    from transformers import AutoModelForMaskedLM

    key = (f"{source.path}:{source.fingerprint}", runtime.device, runtime.dtype)
    with _LOCK:
        if key in _MODELS:
            return _MODELS[key]
        dtype = TORCH_DTYPES[runtime.dtype] if runtime.torch_device.type == "cuda" else torch.float32
        try:
            model, info = AutoModelForMaskedLM.from_pretrained(
                source.path, config=source.config, dtype=dtype, attn_implementation="sdpa",
                output_loading_info=True)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot load the masked-language model of {source.path}: {exc}") \
                from exc
        missing = sorted(info.get("missing_keys") or ())
        if missing:
            raise ConfigError(f"model folder {source.path} lacks weights of its masked-language "
                              f"head or body ({', '.join(missing[:4])}); transformers would "
                              f"initialise them at random, so every run would give other vectors")
        model = model.to(runtime.torch_device).eval().requires_grad_(False)
        _MODELS.clear()  # one sparse model a process
        _MODELS[key] = model
        return model


def top_dims(pooled: torch.Tensor, k: int | None) -> torch.Tensor:
    """sentence-transformers' select_max_active_dims: each row's k largest |values| kept."""
    if k is None or k >= pooled.shape[-1]:
        return pooled
    _, top = torch.topk(pooled.abs(), k=k, dim=-1)
    return torch.zeros_like(pooled).scatter_(-1, top, pooled.gather(-1, top))


def to_csr(dense: torch.Tensor) -> sp.csr_matrix:
    """[rows, vocabulary] float32 CSR of a dense tensor's non-zero values, indices ascending."""
    dense = dense.float().cpu()
    rows, cols = dense.nonzero(as_tuple=True)
    indptr = np.zeros(dense.shape[0] + 1, np.int64)
    np.cumsum(np.bincount(rows.numpy(), minlength=dense.shape[0]), out=indptr[1:])
    return sp.csr_matrix((dense[rows, cols].numpy(), cols.numpy().astype(np.int32), indptr),
                         shape=tuple(dense.shape))


HEAD_TOKENS = 1024  # real tokens projected at once: large enough a product to amortise reading
# the [vocabulary, hidden] weight (64 ran 4x slower), 125 MB of float32 logits at 30,522 entries


def _head_split(model: torch.nn.Module):
    """(body, transform, decoder) of a BERT-style masked-language model (transformers'
    BertForMaskedLM and its kin: `cls.predictions.transform` then the `decoder` projection onto
    the vocabulary), or None: then the whole forward runs."""
    predictions = getattr(getattr(model, "cls", None), "predictions", None)
    transform = getattr(predictions, "transform", None)
    decoder = getattr(predictions, "decoder", None)
    if transform is None or not isinstance(decoder, torch.nn.Linear):
        return None
    return model.base_model, transform, decoder


class SparseEncoder:
    """Padded token batches to SPLADE rows (CSR), the folder's MLM on the run's device.

    For a BERT-style MLM the vocabulary projection (most of a small model's work) runs on the
    real tokens only, 1,024 at a time, so [tokens, vocabulary] logits never exist whole;
    max pooling takes the max of the logits first, then relu and log1p on [rows, vocabulary]
    (log1p(relu(x)) never decreases, so the max commutes with it: the same values)."""

    def __init__(self, source: ModelSource, runtime: Runtime, settings: SparseSettings):
        check_here(runtime, source)
        self.runtime, self.settings = runtime, settings
        self.device, self.dtype = runtime.torch_device, runtime.dtype
        self.model = _load(source, runtime)
        self.vocabulary = int(self.model.config.vocab_size)
        self.width = self.vocabulary
        self.split = _head_split(self.model)
        self.oom_splits = 0
        self.token_cap: int | None = None  # after an out-of-memory error: larger batches split
        self.takes_token_types = "token_type_ids" in self.model.forward.__code__.co_varnames

    def encode_batch(self, batch: Batch) -> sp.csr_matrix:
        types = () if batch.token_type_ids is None else (batch.token_type_ids,)
        return to_csr(self.encode(batch.input_ids, batch.attention_mask, *types))

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
               *token_type_ids: torch.Tensor) -> torch.Tensor:
        """Pooled rows [batch, vocabulary] (max_active_dims applied); on device out-of-memory
        halve the batch and retry, as the dense encoder does, never dropping a row."""
        rows = len(input_ids)
        if rows > 1 and self.token_cap is not None and input_ids.numel() > self.token_cap:
            return self._split(input_ids, attention_mask, *token_type_ids)
        try:
            return self._forward(input_ids, attention_mask, *token_type_ids)
        except torch.OutOfMemoryError:
            if rows == 1:
                raise
        if self.device.type == "cuda":  # out of the except block: its frames are gone
            torch.cuda.empty_cache()
        self.oom_splits += 1
        cap = input_ids.numel() // 2
        self.token_cap = cap if self.token_cap is None else min(self.token_cap, cap)
        log.warning("out of memory on a sparse batch of %d rows x %d tokens; retrying as two "
                    "halves", rows, input_ids.shape[1])
        return self._split(input_ids, attention_mask, *token_type_ids)

    def _split(self, input_ids, attention_mask, *token_type_ids) -> torch.Tensor:
        half = len(input_ids) // 2
        types = token_type_ids[0] if token_type_ids else None
        return torch.cat([self.encode(*_trim(input_ids[part], attention_mask[part],
                                             self.runtime.pad_multiple,
                                             None if types is None else types[part]))
                          for part in (slice(None, half), slice(half, None))])

    def _forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        ids = input_ids.to(self.device)
        mask = attention_mask.to(self.device)
        extra = {}
        if token_type_ids is not None and self.takes_token_types:
            extra["token_type_ids"] = token_type_ids.to(self.device)
        autocast = self.dtype != "float32" and self.device.type == "cpu"
        with torch.inference_mode(), torch.autocast(self.device.type, enabled=autocast,
                                                    dtype=TORCH_DTYPES[self.dtype]):
            if self.split is None:
                logits = self.model(input_ids=ids, attention_mask=mask, **extra).logits.float()
                # SpladePooling: padding's logits zeroed, relu, log1p, pooled over the tokens
                weights = logits.mul_(mask.unsqueeze(-1).to(logits.dtype)).relu_().log1p_()
                pooled = weights.amax(1) if self.settings.pooling == "max" else weights.sum(1)
            else:
                pooled = self._pooled(ids, mask, extra)
            return top_dims(pooled, self.settings.max_active_dims).float()

    def _pooled(self, ids: torch.Tensor, mask: torch.Tensor, extra: dict) -> torch.Tensor:
        """SpladePooling over the real tokens' logits, made HEAD_TOKENS at a time (a row's
        tokens never split between two groups)."""
        body, transform, decoder = self.split
        states = body(input_ids=ids, attention_mask=mask, **extra).last_hidden_state
        real = mask.bool()
        hidden = transform(states[real])  # [real tokens, hidden]
        lengths = real.sum(1)
        counts = lengths.tolist()
        pooled = torch.zeros(len(counts), self.vocabulary, device=ids.device)
        use_max = self.settings.pooling == "max"
        row = start = 0
        while row < len(counts):
            end, size = row + 1, counts[row]
            while end < len(counts) and size + counts[end] <= HEAD_TOKENS:
                size, end = size + counts[end], end + 1
            logits = decoder(hidden[start:start + size]).float()  # [size, vocabulary]
            if not use_max:
                logits = logits.relu_().log1p_()
            reduce = "max" if use_max else "sum"
            if end - row == 1:
                pooled[row] = logits.amax(0) if use_max else logits.sum(0)
            elif size:
                pooled[row:end] = torch.segment_reduce(logits, reduce, lengths=lengths[row:end],
                                                       axis=0)
            row, start = end, start + size
        return pooled.relu_().log1p_() if use_max else pooled


def encode_sparse_texts(tokenizer, encoder: SparseEncoder, texts: list[str], batch_tokens: int,
                        max_batch_size: int) -> sp.csr_matrix:
    """CSR [len(texts), vocabulary] in text order: tokenized, batched, encoded, unsorted."""
    if not texts:
        return sp.csr_matrix((0, encoder.vocabulary), dtype=np.float32)
    ids = tokenizer(list(texts)).ids
    lengths = np.fromiter(map(len, ids), np.int64, count=len(ids))
    parts, order = [], []
    for positions in plan_batches(lengths, batch_tokens, max_batch_size):
        parts.append(encoder.encode_batch(collate(ids, positions, tokenizer.pad_id,
                                                  encoder.runtime.pad_multiple)))
        order.append(positions)
    stacked = sp.vstack(parts, format="csr")
    back = np.empty(len(texts), np.int64)
    back[np.concatenate(order)] = np.arange(len(texts))
    return stacked[back]


class StaticQueries:
    """An inference-free folder's query side: SparseStaticEmbedding (its tokenizer without
    special tokens, truncated at the tokenizer's model_max_length; each distinct token's
    static weight), then max_active_dims as sentence-transformers applies it."""

    def __init__(self, folder: Path, prompt: str, max_active_dims: int | None):
        from safetensors.torch import load_file
        from transformers import AutoTokenizer

        weights = folder / "model.safetensors"
        if not weights.is_file():
            raise ConfigError(f"{folder}: the SparseStaticEmbedding has no model.safetensors")
        self.weight = load_file(weights)["weight"].float()
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.prompt, self.max_active_dims = prompt, max_active_dims
        self.vocabulary = len(self.weight)

    def encode(self, texts: list[str]) -> sp.csr_matrix:
        out = torch.zeros(len(texts), self.vocabulary)
        for row, text in enumerate(texts):
            ids = self.tokenizer(self.prompt + text, truncation=True,
                                 add_special_tokens=False)["input_ids"]
            present = torch.tensor(sorted(set(ids)), dtype=torch.int64)
            out[row, present] = self.weight[present]
        return to_csr(top_dims(out, self.max_active_dims))
