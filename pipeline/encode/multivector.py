"""Multi-vector (ColBERT-style) rows from a sentence-transformers MultiVectorEncoder folder.

Documents: the transformer's last hidden state of every real token (the run's forward: fused
or transformers'), the folder's Dense projections, its token-level Normalize, the skiplist's
tokens dropped (MultiVectorMask, documents), the folder's HierarchicalTokenPooling on each row's
kept tokens (pipeline/encode/token_pooling.py), truncate_dim (first N, re-normalized), as
encode_document makes them. A row leaves as a float32 [tokens, dim] array.

Queries (`QueryEncoder`): encode_query's preprocessing (the query prompt, query_length, query
expansion: pads up to the expansion length swapped for the mask token and scored, attended to or
not), then the same head, through transformers' forward (expansion positions the encoder does not
attend to are still read out, which the fused forward does not promise).
"""
from __future__ import annotations

import numpy as np
import torch

from ..config import ConfigError
from ..models.model_files import ModelSource
from ..models.multivector_folder import MultiVectorSpec
from ..runtime.runtime import Runtime
from .batching import Batch
from .encoder import Encoder, EncoderSettings, cached_model
from .token_pooling import pool_row

LAST_LAYER = EncoderSettings((-1,), "concat", "mean", False)


class TokenHead:
    """The folder's Dense layers, Normalize and truncate_dim over token states [N, hidden]."""

    def __init__(self, spec: MultiVectorSpec, device: torch.device):
        from safetensors.torch import load_file

        self.spec, self.layers = spec, []
        for dense in spec.dense:
            weights = dense.path / "model.safetensors"
            if not weights.is_file():
                raise ConfigError(f"{dense.path}: embedpipe reads a Dense's model.safetensors")
            state = load_file(weights)
            linear = torch.nn.Linear(dense.in_features, dense.out_features, bias=dense.bias)
            try:
                linear.load_state_dict({k.removeprefix("linear."): v for k, v in state.items()})
            except RuntimeError as exc:
                raise ConfigError(f"{dense.path}: its weights do not match its config: "
                                  f"{str(exc).splitlines()[0]}") from None
            self.layers.append((linear.float().to(device).eval().requires_grad_(False),
                                dense.activation))

    def __call__(self, states: torch.Tensor) -> torch.Tensor:
        return self.tail(self.project(states))

    def project(self, states: torch.Tensor) -> torch.Tensor:
        """The Dense layers and a Normalize before any token pooling."""
        x = states.float()
        for linear, activation in self.layers:
            x = linear(x)
            if activation == "tanh":
                x = torch.tanh(x)
        pooling = self.spec.pooling
        if self.spec.normalize and (pooling is None or pooling.normalize_before):
            x = torch.nn.functional.normalize(x, p=2, dim=-1)
        return x

    def tail(self, x: torch.Tensor) -> torch.Tensor:
        """A Normalize after the token pooling, then truncate_dim."""
        if self.spec.pooling is not None and self.spec.pooling.normalize_after:
            x = torch.nn.functional.normalize(x, p=2, dim=-1)
        if self.spec.truncate_dim:
            x = torch.nn.functional.normalize(x[..., :self.spec.truncate_dim], p=2, dim=-1)
        return x

    def rows(self, rows: list[torch.Tensor], task: str) -> list[torch.Tensor]:
        """Each row's kept tokens (projected) pooled where the pooling covers `task`, then tail."""
        pooling = self.spec.pooling
        if pooling is not None and task in pooling.tasks:
            rows = [pool_row(r, pooling) for r in rows]
        return [self.tail(r) for r in rows]


def skiplist_ids(path, words) -> torch.Tensor | None:
    """The skiplist's words as token ids, as MultiVectorMask resolves them (words the vocabulary
    lacks as one token are dropped)."""
    if not words:
        return None
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    unk = tokenizer.unk_token_id
    ids = [i for w in words if (i := tokenizer.convert_tokens_to_ids(w)) is not None
           and not (unk is not None and i == unk and w != tokenizer.unk_token)]
    return torch.tensor(ids, dtype=torch.long) if ids else None


class MultiVectorEncoder:
    """Padded token batches to each row's token vectors (a list of float32 [tokens, dim])."""

    def __init__(self, source: ModelSource, runtime: Runtime, spec: MultiVectorSpec):
        self.base = Encoder(source, runtime, LAST_LAYER)
        self.runtime, self.device, self.dtype = runtime, self.base.device, self.base.dtype
        self.spec, self.width = spec, spec.dim
        self.head = TokenHead(spec, self.device)
        self.skip = skiplist_ids(source.path, spec.skiplist) \
            if "document" in spec.skiplist_tasks else None
        self.oom_splits = 0

    def encode_batch(self, batch: Batch) -> list[np.ndarray]:
        types = batch.token_type_ids
        _, states = self.base._forward(batch.input_ids, batch.attention_mask, types,
                                       per_token=True)
        lengths = [len(s) for s in states]
        pooled = self.spec.pooling is not None
        with torch.inference_mode():
            tokens = torch.from_numpy(np.concatenate(states)).to(self.device)
            tokens = self.head.project(tokens) if pooled else self.head(tokens)
            keep = torch.ones(len(tokens), dtype=torch.bool)
            if self.skip is not None:
                ids = torch.cat([batch.input_ids[i, :n] for i, n in enumerate(lengths)])
                keep = ~torch.isin(ids, self.skip)
            tokens = tokens.cpu()
        ends = np.cumsum(lengths)
        rows = [tokens[a:b][keep[a:b]] for a, b in zip(ends - lengths, ends)]
        if pooled:  # the mask first: the pooling clusters the tokens it keeps
            with torch.inference_mode():
                rows = self.head.rows(rows, "document")
        return [r.numpy() for r in rows]


class QueryEncoder:
    """encode_query: the folder's query side (prompt, query_length, expansion, head)."""

    def __init__(self, source: ModelSource, runtime: Runtime, spec: MultiVectorSpec, prompt: str):
        import dataclasses

        from transformers import AutoTokenizer

        runtime = dataclasses.replace(runtime, forward="transformers", compile=False)
        self.model = cached_model(source, runtime)
        self.device = runtime.torch_device
        self.tokenizer = AutoTokenizer.from_pretrained(source.path)
        self.spec, self.prompt, self.source = spec, prompt, source
        self.head = TokenHead(spec, self.device)
        self.skip = skiplist_ids(source.path, spec.skiplist) \
            if "query" in spec.skiplist_tasks else None

    def encode(self, texts: list[str]) -> list[np.ndarray]:
        spec, tok = self.spec, self.tokenizer
        expansion = spec.expansion
        own = spec.query_length or self.source.max_length
        kwargs = {"truncation": True, "padding": True, "max_length": own}
        if expansion is not None and expansion.strategy == "fixed":
            kwargs.update(max_length=expansion.length, padding="max_length")
        elif expansion is not None:
            kwargs["max_length"] = max(own, expansion.length)
        out = tok([self.prompt + t for t in texts], return_tensors="pt", **kwargs)
        ids, mask = out["input_ids"], out["attention_mask"]
        types = out.get("token_type_ids")
        scored = mask.bool()
        if expansion is not None:
            if ids.shape[1] < expansion.length:
                grow = expansion.length - ids.shape[1]
                ids = torch.nn.functional.pad(ids, (0, grow), value=0)
                mask = torch.nn.functional.pad(mask, (0, grow), value=0)
                types = None if types is None else torch.nn.functional.pad(types, (0, grow))
            positions = (mask == 0) & (torch.arange(ids.shape[1]) < expansion.length)
            token = (tok.convert_tokens_to_ids(expansion.token) if expansion.token is not None
                     else tok.mask_token_id if tok.mask_token_id is not None
                     else tok.eos_token_id)
            if token is not None:
                ids = ids.masked_fill(positions, token)
            scored = mask.bool() | positions
            if expansion.attend:
                mask = mask.masked_fill(positions, 1)
        if self.skip is not None:
            scored = scored & ~torch.isin(ids, self.skip)
        extra = {}
        if types is not None and "token_type_ids" in self.model.forward.__code__.co_varnames:
            extra["token_type_ids"] = types.to(self.device)
        with torch.inference_mode():
            states = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                                **extra).last_hidden_state
            vectors = self.head.project(states).cpu()
            return [r.numpy() for r in self.head.rows([v[s] for v, s in zip(vectors, scored)],
                                                      "query")]
