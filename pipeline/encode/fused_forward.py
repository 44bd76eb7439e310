"""embedpipe's own forward pass for BERT-shaped encoders on CPU: transformers' arithmetic, laid
out for oneDNN.

Why: a narrow encoder (all-MiniLM-L6-v2: hidden 384) spends as long around its matrix products
as in them when transformers runs it eagerly on a CPU: three separate query/key/value products
that each read the hidden states again, a bias copied into every product's output before the
product, GELU and residual adds as passes of their own (README, "Where the forward spends its
time"). Per layer this runs instead
* one query-key-value product (the three weights concatenated);
* every product through oneDNN on weights packed once for it, with the bias, the GELU and the
  residual add folded into the product's epilogue;
* attention through embedpipe's CPU kernel (AMX or AVX-512 bf16) where the runtime chose one,
  SDPA otherwise.
The weights are taken from the loaded transformers model (the embeddings and the pooler run as
its own modules), so a model loads, checks and pools as before. Activations are in the run's
dtype: float32, or bfloat16, where layer norms and softmax accumulate in float32 inside their
kernels and every product accumulates in float32.

Families: those whose transformers layers are BERT's (`FAMILIES`), tested against transformers'
own forward for each (tests/encode/test_fused_forward.py); any other model runs transformers'.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

# model_type -> transformers' layers are BERT's layer for layer (self-attention with absolute
# positions in the embeddings, post-norm, no cross-attention)
FAMILIES = frozenset({"bert", "roberta", "xlm-roberta", "camembert"})
# config.hidden_act -> oneDNN's post-op (name, algorithm)
ACTIVATIONS = {"gelu": ("gelu", "none"), "gelu_new": ("gelu", "tanh"),
               "gelu_pytorch_tanh": ("gelu", "tanh"), "relu": ("relu", "")}
# the row count oneDNN packs weights for (a hint: every batch shape runs)
PACK_ROWS = 4096


def unsupported_reason(config) -> str | None:
    """Why the fused forward cannot run this model, or None when it can."""
    if config.model_type not in FAMILIES:
        return f"model type {config.model_type!r} is not one of {', '.join(sorted(FAMILIES))}"
    if getattr(config, "is_decoder", False) or getattr(config, "add_cross_attention", False):
        return "it computes bidirectional encoder attention only"
    if getattr(config, "hidden_act", None) not in ACTIVATIONS:
        return f"activation {getattr(config, 'hidden_act', None)!r} is not one of {', '.join(ACTIVATIONS)}"
    if getattr(config, "position_embedding_type", "absolute") != "absolute":
        return f"position embeddings {config.position_embedding_type!r} are not absolute"
    return None


def onednn_products(dtype: str) -> bool:
    """Whether this torch has oneDNN's packed linear with fused epilogues in `dtype` (x86 builds
    do; bfloat16 where the CPU has native bf16)."""
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")):
        return False
    return dtype == "float32" or (dtype == "bfloat16" and torch.ops.mkldnn._is_mkldnn_bf16_supported())


@dataclass
class ForwardOutput:
    """The fields of transformers' output that embedpipe reads."""
    last_hidden_state: torch.Tensor
    hidden_states: tuple[torch.Tensor, ...] | None
    pooler_output: torch.Tensor | None


def _pack(weight: torch.Tensor) -> torch.Tensor:
    """A Linear weight [out, in] in the blocked layout oneDNN's products read, packed once."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), PACK_ROWS)


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
            activation: tuple[str, str] = ("none", "")) -> torch.Tensor:
    """activation(x @ weight.T + bias), the bias and activation in the product's epilogue."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, activation[0], [], activation[1])


def _linear_add(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                bias: torch.Tensor) -> torch.Tensor:
    """x @ weight.T + bias + residual, the residual added in the product's epilogue."""
    return torch.ops.mkldnn._linear_pointwise.binary(x, residual, weight, bias, "add")


@dataclass
class _Layer:
    qkv: torch.Tensor
    qkv_bias: torch.Tensor
    out: torch.Tensor
    out_bias: torch.Tensor
    norm1: tuple[torch.Tensor, torch.Tensor, float]
    up: torch.Tensor
    up_bias: torch.Tensor
    down: torch.Tensor
    down_bias: torch.Tensor
    norm2: tuple[torch.Tensor, torch.Tensor, float]


def _norm(module: torch.nn.LayerNorm) -> tuple[torch.Tensor, torch.Tensor, float]:
    return module.weight.float(), module.bias.float(), module.eps


class FusedForward:
    """Called like transformers' model (input_ids, attention_mask, token_type_ids,
    output_hidden_states) and returning the fields embedpipe reads. `attention`: the runtime's
    choice, "sdpa" or an embedpipe kernel ("amx", "avx512")."""

    def __init__(self, model: torch.nn.Module, dtype: torch.dtype, attention: str):
        config = model.config
        reason = unsupported_reason(config)
        if reason is not None:
            raise ValueError(f"the fused forward cannot run this model: {reason}")
        # Only the embeddings and the pooler of the transformers model are kept: its layers'
        # weights live here, packed, and the rest is freed with the model.
        self.config, self.dtype = config, dtype
        self.embeddings, self.pooler = model.embeddings, getattr(model, "pooler", None)
        self.embedpipe_missing_weights = getattr(model, "embedpipe_missing_weights", [])
        self.heads = config.num_attention_heads
        self.head_dim = config.hidden_size // self.heads
        self.activation = ACTIVATIONS[config.hidden_act]
        self.kernel = _kernel(attention, dtype, self.head_dim)
        self.layers = [self._layer(layer) for layer in model.encoder.layer]

    def _layer(self, layer) -> _Layer:
        attention = layer.attention.self
        qkv = self._product(attention.query, attention.key, attention.value)
        out = self._product(layer.attention.output.dense)
        up, down = self._product(layer.intermediate.dense), self._product(layer.output.dense)
        return _Layer(*qkv, *out, _norm(layer.attention.output.LayerNorm), *up, *down,
                      _norm(layer.output.LayerNorm))

    def _product(self, *linears: torch.nn.Linear) -> tuple[torch.Tensor, torch.Tensor]:
        """(packed weight, bias) in the run's dtype; several Linears side by side as one."""
        weight = torch.cat([m.weight for m in linears]).to(self.dtype)
        return _pack(weight), torch.cat([m.bias for m in linears]).to(self.dtype)

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 token_type_ids: torch.Tensor | None = None,
                 output_hidden_states: bool = False) -> ForwardOutput:
        return self.forward(input_ids, attention_mask, token_type_ids, output_hidden_states)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor | None = None,
                output_hidden_states: bool = False) -> ForwardOutput:
        x = self.embeddings(input_ids=input_ids, token_type_ids=token_type_ids).to(self.dtype)
        states = [x] if output_hidden_states else None
        keep = attention_mask.bool()
        for layer in self.layers:
            x = self._layer_forward(layer, x, keep)
            if states is not None:
                states.append(x)
        pooled = self.pooler(x) if self.pooler is not None else None
        return ForwardOutput(x, tuple(states) if states is not None else None, pooled)

    def _layer_forward(self, layer: _Layer, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        batch, length, hidden = x.shape
        qkv = _linear(x, layer.qkv, layer.qkv_bias).view(batch, length, 3, self.heads, self.head_dim)
        q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))  # (batch, heads, length, dim)
        if self.kernel is not None:  # (batch, length, heads, dim) out
            context = self.kernel(q, k, v, keep, self.head_dim ** -0.5)
        else:
            context = F.scaled_dot_product_attention(q, k, v, attn_mask=keep[:, None, None, :])
            context = context.transpose(1, 2)
        context = context.reshape(batch, length, hidden)
        x = F.layer_norm(_linear_add(context, x, layer.out, layer.out_bias), (hidden,),
                         layer.norm1[0], layer.norm1[1], layer.norm1[2])
        up = _linear(x, layer.up, layer.up_bias, self.activation)
        return F.layer_norm(_linear_add(up, x, layer.down, layer.down_bias), (hidden,),
                            layer.norm2[0], layer.norm2[1], layer.norm2[2])


def _kernel(attention: str, dtype: torch.dtype, head_dim: int):
    """embedpipe's attention op for the runtime's choice, or None for SDPA."""
    if attention == "sdpa":
        return None
    if dtype != torch.bfloat16 or head_dim % 32:
        raise ValueError(f"attention {attention!r} runs bfloat16 heads of a multiple of 32 only")
    op = {"amx": "padded_attention", "avx512": "padded_attention_avx512"}.get(attention)
    if op is None:
        raise ValueError(f"the fused forward takes attention sdpa, amx or avx512, not {attention!r}")
    return getattr(torch.ops.embedpipe, op)
