"""A multi-head (BGE-M3) folder's representations, all from one forward of the body.

As FlagEmbedding's BGEM3FlagModel computes them from the last hidden state h:
dense: h of the first token (CLS), L2-normalised; sparse: relu(sparse_linear(h)) a token, a
token id's weight the max over its occurrences, the tokenizer's cls, eos, pad and unk ids
dropped (as CSR over the vocabulary, built from the tokens' own ids, never a [rows, vocabulary]
tensor); multivector: colbert_linear(h[:, 1:]), each vector
L2-normalised, a row's real tokens after the first only (its last, </s>, included). The head
weights are the folder's own sparse_linear.pt / colbert_linear.pt (models/m3_folder.py)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch

from ..config import ConfigError
from ..models.m3_folder import COLBERT_HEAD, SPARSE_HEAD, load_head
from ..models.model_files import ModelSource
from ..runtime.runtime import TORCH_DTYPES, Runtime, check_here
from .batching import Batch
from .encoder import cached_model


@dataclass
class M3Rows:
    """One batch's rows in each representation asked (None: not asked)."""
    dense: np.ndarray | None  # [rows, hidden] float32
    sparse: sp.csr_matrix | None  # [rows, vocabulary] float32
    multivectors: list[np.ndarray] | None  # a [tokens - 1, d] float32 array a row


def _linear(state: dict) -> torch.nn.Linear:
    out, inp = state["weight"].shape
    layer = torch.nn.Linear(inp, out)
    layer.load_state_dict(state)
    return layer.eval().requires_grad_(False)


def unused_ids(path) -> list[int]:
    """The ids FlagEmbedding drops from sparse rows: the tokenizer's cls, eos, pad and unk."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    ids = (tokenizer.cls_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id,
           tokenizer.unk_token_id)
    return sorted({i for i in ids if i is not None})


class M3Encoder:
    """Padded token batches to M3Rows: the body once, then each asked head."""

    def __init__(self, source: ModelSource, runtime: Runtime, representations: tuple[str, ...]):
        check_here(runtime, source)
        if source.m3 is None:
            raise ConfigError(f"model folder {source.path} has no BGE-M3 heads")
        self.runtime, self.representations = runtime, representations
        self.device, self.dtype = runtime.torch_device, runtime.dtype
        self.model = cached_model(source, runtime)
        missing = [k for k in getattr(self.model, "embedpipe_missing_weights", [])
                   if not k.startswith("pooler.")]
        if missing:
            raise ConfigError(f"model folder {source.path} lacks weights of its body "
                              f"({', '.join(missing[:4])}); transformers would initialise them "
                              f"at random, so every run would give other vectors")
        hidden = int(self.model.config.hidden_size)
        self.vocabulary = int(self.model.config.vocab_size)
        self.sparse_head = self.colbert_head = None
        if "sparse" in representations:
            self.sparse_head = _linear(load_head(source.m3, SPARSE_HEAD, hidden)).to(self.device)
            self.unused = np.array(unused_ids(source.path), np.int64)
        if "multivector" in representations:
            self.colbert_head = _linear(load_head(source.m3, COLBERT_HEAD, hidden)).to(
                self.device)
        self.width = hidden  # the dense vector's
        self.multivector_dim = None if self.colbert_head is None else \
            self.colbert_head.out_features
        self.oom_splits = 0  # no out-of-memory back-off here: a batch that does not fit fails
        self.pad_multiple = runtime.pad_multiple

    def encode_batch(self, batch: Batch) -> M3Rows:
        ids = batch.input_ids.to(self.device)
        mask = batch.attention_mask.to(self.device)
        autocast = self.dtype != "float32" and self.device.type == "cpu"
        with torch.inference_mode(), torch.autocast(self.device.type, enabled=autocast,
                                                    dtype=TORCH_DTYPES[self.dtype]):
            hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state.float()
            dense = sparse = multi = None
            if "dense" in self.representations:
                dense = torch.nn.functional.normalize(hidden[:, 0], dim=-1).cpu().numpy()
            if self.sparse_head is not None:
                sparse = self._sparse(hidden, ids)
            if self.colbert_head is not None:
                multi = self._colbert(hidden, mask)
        return M3Rows(dense, sparse, multi)

    def _sparse(self, hidden: torch.Tensor, ids: torch.Tensor) -> sp.csr_matrix:
        """CSR [rows, vocabulary] straight from the (row, id, weight) triples: no [rows,
        vocabulary] tensor (250,002 wide for BGE-M3) is made."""
        weights = torch.relu(self.sparse_head(hidden).float()).squeeze(-1).cpu().numpy()
        ids = ids.cpu().numpy().astype(np.int64)
        keep = (weights > 0) & ~np.isin(ids, self.unused)  # padding's id is among the unused
        rows = np.nonzero(keep)[0]
        keys = rows * self.vocabulary + ids[keep]
        order = np.argsort(keys, kind="stable")
        keys, values = keys[order], weights[keep][order]
        unique, starts = np.unique(keys, return_index=True)
        best = np.maximum.reduceat(values, starts) if len(unique) else values[:0]
        indptr = np.zeros(len(ids) + 1, np.int64)
        np.cumsum(np.bincount(unique // self.vocabulary, minlength=len(ids)), out=indptr[1:])
        return sp.csr_matrix((best.astype(np.float32), (unique % self.vocabulary).astype(
            np.int32), indptr), shape=(len(ids), self.vocabulary))

    def _colbert(self, hidden: torch.Tensor, mask: torch.Tensor) -> list[np.ndarray]:
        vectors = self.colbert_head(hidden[:, 1:]).float() * mask[:, 1:, None].float()
        vectors = torch.nn.functional.normalize(vectors, dim=-1).cpu().numpy()
        lengths = (mask.sum(1) - 1).tolist()
        return [np.ascontiguousarray(vectors[i, :n]) for i, n in enumerate(lengths)]




def encode_m3_texts(tokenizer, encoder: M3Encoder, texts: list[str], batch_tokens: int,
                    max_batch_size: int) -> M3Rows:
    """M3Rows of texts, in text order: tokenized, batched (one forward a batch), put back."""
    from .batching import collate, plan_batches

    ids = tokenizer(list(texts)).ids
    lengths = np.fromiter(map(len, ids), np.int64, count=len(ids))
    got, order = [], []
    for positions in plan_batches(lengths, batch_tokens, max_batch_size):
        got.append(encoder.encode_batch(collate(ids, positions, tokenizer.pad_id,
                                                encoder.pad_multiple)))
        order.append(positions)
    back = np.argsort(np.concatenate(order)) if order else np.zeros(0, np.int64)
    first = got[0] if got else M3Rows(None, None, None)
    dense = None if first.dense is None else np.concatenate([g.dense for g in got])[back]
    sparse = None if first.sparse is None else sp.vstack([g.sparse for g in got],
                                                          format="csr")[back]
    multi = None
    if first.multivectors is not None:
        flat = [v for g in got for v in g.multivectors]
        multi = [flat[i] for i in back]
    return M3Rows(dense, sparse, multi)
