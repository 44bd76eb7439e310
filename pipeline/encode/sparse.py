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


class SparseEncoder:
    """Padded token batches to SPLADE rows (CSR), the folder's MLM forward on the run's device."""

    def __init__(self, source: ModelSource, runtime: Runtime, settings: SparseSettings):
        check_here(runtime, source)
        self.runtime, self.settings = runtime, settings
        self.device, self.dtype = runtime.torch_device, runtime.dtype
        self.model = _load(source, runtime)
        self.vocabulary = int(self.model.config.vocab_size)
        self.width = self.vocabulary
        self.oom_splits = 0  # no out-of-memory back-off here: a batch that does not fit fails
        self.takes_token_types = "token_type_ids" in self.model.forward.__code__.co_varnames

    def encode_batch(self, batch: Batch) -> sp.csr_matrix:
        ids = batch.input_ids.to(self.device)
        mask = batch.attention_mask.to(self.device)
        extra = {}
        if batch.token_type_ids is not None and self.takes_token_types:
            extra["token_type_ids"] = batch.token_type_ids.to(self.device)
        autocast = self.dtype != "float32" and self.device.type == "cpu"
        with torch.inference_mode(), torch.autocast(self.device.type, enabled=autocast,
                                                    dtype=TORCH_DTYPES[self.dtype]):
            logits = self.model(input_ids=ids, attention_mask=mask, **extra).logits.float()
            # SpladePooling: padding's logits zeroed, relu, log1p, pooled over the tokens
            weights = logits.mul_(mask.unsqueeze(-1).to(logits.dtype)).relu_().log1p_()
            pooled = weights.amax(1) if self.settings.pooling == "max" else weights.sum(1)
            return to_csr(top_dims(pooled, self.settings.max_active_dims))


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
