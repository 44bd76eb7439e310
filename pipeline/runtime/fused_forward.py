"""embedpipe's own forward pass for BERT-shaped encoders on CPU: transformers' arithmetic, laid
out for oneDNN.

Why: a narrow encoder (all-MiniLM-L6-v2: hidden 384) spends as long around its matrix products
as in them when transformers runs it eagerly on a CPU: three separate query/key/value products
that each read the hidden states again, a bias copied into every product's output before the
product, GELU and residual adds as passes of their own (docs/performance/design-notes.md, "Where the forward spends its
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

Families: those whose transformers layers are BERT's arithmetic, post-norm (`FAMILIES`: BERT,
RoBERTa, XLM-R, CamemBERT by BERT's names, DistilBERT by its own), tested against transformers'
own forward for each (tests/runtime/test_fused_forward.py); any other model runs transformers'.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..config import ConfigError
from . import cpu_attention
from .hardware import Cpu
from ..models.model_files import PADDING_OFFSET_FAMILIES
from ..models.weight_check import LAYOUTS, base_name

# model_type -> where its checkpoint keeps the weights (weight_check.py); transformers' layers of
# these families are BERT's arithmetic
FAMILIES = LAYOUTS
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
    if _activation(config) not in ACTIVATIONS:
        return f"activation {_activation(config)!r} is not one of {', '.join(ACTIVATIONS)}"
    if getattr(config, "position_embedding_type", "absolute") != "absolute":
        return f"position embeddings {config.position_embedding_type!r} are not absolute"
    return None


def _activation(config) -> str | None:
    """config.hidden_act (DistilBERT: config.activation)."""
    return getattr(config, "hidden_act", None) or getattr(config, "activation", None)


def onednn_products(dtype: str, cpu: Cpu) -> bool:
    """Whether this torch has oneDNN's packed linear with fused epilogues in `dtype` on `cpu`
    (x86 builds do; bfloat16 where the CPU has AVX-512: torch answers for this machine's own);
    int8: fbgemm's dynamic int8 linear as well (x86 builds, AVX2 and up)."""
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")):
        return False
    if dtype == "int8":
        return "x86" in torch.backends.quantized.supported_engines
    if dtype != "bfloat16":
        return dtype == "float32"
    return cpu.onednn_bf16 and (not cpu.here or torch.ops.mkldnn._is_mkldnn_bf16_supported())


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


class Int8Product:
    """x @ weight.T + bias through fbgemm's dynamic int8 linear: the weight int8 per output
    channel (symmetric, scale max |w| / 127), packed once; each call quantizes x to uint8 with
    one scale per call (its range, zero included), accumulates in int32 and dequantizes to
    float32. 8-bit activations (reduce_range off): 7-bit ones cost min cosine 0.987 -> 0.958
    (docs/performance/amd-zen5.md, "int8")."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor):
        import warnings

        weight = weight.float()
        scale = (weight.abs().amax(1) / 127).clamp_min(1e-12).double()
        with warnings.catch_warnings():  # torch 2.13 deprecates quantized tensors' creation
            warnings.simplefilter("ignore", UserWarning)
            q = torch.quantize_per_channel(weight, scale, torch.zeros(len(weight), dtype=torch.long),
                                           0, torch.qint8)
        self.packed = torch.ops.quantized.linear_prepack(q, bias.float())

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.quantized.linear_dynamic(x, self.packed, False)


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


class _Weights:
    """A checkpoint's tensors by transformers' base-model names, whatever head it was saved with
    ("bert." / "roberta." / "distilbert." prefixes dropped, old gamma/beta norms renamed)."""

    def __init__(self, state: dict[str, torch.Tensor], eps: float, heads: tuple[str, ...]):
        self.eps = eps
        self.state = {base_name(name, heads): tensor for name, tensor in state.items()}

    def get(self, name: str) -> torch.Tensor:
        """A weight the forward needs: never initialised at random, as transformers would."""
        tensor = self.state.get(name)
        if tensor is None:
            raise ConfigError(f"the model's weight files lack {name!r}, which its config.json "
                              f"needs: the files do not match the config")
        return tensor

    def norm(self, prefix: str) -> tuple[torch.Tensor, torch.Tensor, float]:
        return self.get(f"{prefix}.weight").float(), self.get(f"{prefix}.bias").float(), self.eps

    def product(self, dtype: torch.dtype, *prefixes: str, int8: bool = False) -> tuple:
        """(packed weight, bias) in `dtype`; several Linears side by side as one product.
        int8: (Int8Product, None)."""
        weight = torch.cat([self.get(f"{p}.weight") for p in prefixes])
        bias = torch.cat([self.get(f"{p}.bias") for p in prefixes])
        if int8:
            return Int8Product(weight, bias), None
        return _pack(weight.to(dtype)), bias.to(dtype)


class _Embeddings:
    """Word, position and segment embeddings, summed and normalised in float32 (BERT's), with
    RoBERTa's positions counted from after the padding index in its families."""

    def __init__(self, weights: _Weights, config):
        self.word = weights.get("embeddings.word_embeddings.weight").float()
        self.position = weights.get("embeddings.position_embeddings.weight").float()
        segments = weights.state.get("embeddings.token_type_embeddings.weight")
        self.segment = None if segments is None else segments.float()
        self.norm = weights.norm("embeddings.LayerNorm")
        self.padding_idx = (int(config.pad_token_id) if config.model_type in PADDING_OFFSET_FAMILIES
                            else None)

    def __call__(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None) -> torch.Tensor:
        x = F.embedding(input_ids, self.word)
        if self.segment is not None:
            segments = token_type_ids if token_type_ids is not None else torch.zeros_like(input_ids)
            x = x + F.embedding(segments, self.segment)
        if self.padding_idx is None:
            positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        else:  # transformers' create_position_ids_from_input_ids
            real = input_ids.ne(self.padding_idx).int()
            positions = (torch.cumsum(real, dim=1).type_as(real) * real).long() + self.padding_idx
        x = x + F.embedding(positions, self.position)
        return F.layer_norm(x, (x.shape[-1],), *self.norm)


class FusedForward:
    """Called like transformers' model (input_ids, attention_mask, token_type_ids,
    output_hidden_states) and returning the fields embedpipe reads. Built from a checkpoint's
    tensors (`state`: the folder's safetensors, or a loaded model's state_dict); `attention`: the
    runtime's choice, "sdpa" or an embedpipe kernel ("amx", "avx512"). `int8`: every weight
    product through `Int8Product`, everything else as in float32 (`dtype` float32)."""

    def __init__(self, state: dict[str, torch.Tensor], config, dtype: torch.dtype, attention: str,
                 int8: bool = False):
        reason = unsupported_reason(config)
        if reason is not None:
            raise ValueError(f"the fused forward cannot run this model: {reason}")
        if int8 and dtype != torch.float32:
            raise ValueError("the int8 fused forward keeps float32 activations")
        self.config, self.dtype, self.int8 = config, dtype, int8
        self.heads = config.num_attention_heads
        self.head_dim = config.hidden_size // self.heads
        self.activation = ACTIVATIONS[_activation(config)]
        self.names = FAMILIES[config.model_type]
        self.kernel = _kernel(attention, dtype, self.head_dim)
        # (DistilBERT's norms use 1e-12 without saying so in its config)
        weights = _Weights(state, getattr(config, "layer_norm_eps", 1e-12), self.names.heads)
        self.embeddings = _Embeddings(weights, config)
        self.layers = [self._layer(weights, f"{self.names.layers}.{i}")
                       for i in range(config.num_hidden_layers)]
        # The pooler only matters to pooling = "pooler". Weights a family's pooler lacks are
        # reported as transformers reports them (the encoder refuses that pooling, saying why).
        names = [f"pooler.dense.{n}" for n in ("weight", "bias")] if self.names.pooler else []
        pooler = [weights.state.get(n) for n in names]
        self._pooler = tuple(t.to(dtype) for t in pooler) if names and None not in pooler else None
        self.pooler = self._pool if self._pooler is not None else None
        self.embedpipe_missing_weights = [n for n, t in zip(names, pooler) if t is None]

    def _layer(self, weights: _Weights, prefix: str) -> _Layer:
        n, dtype, q = self.names, self.dtype, self.int8
        return _Layer(
            *weights.product(dtype, f"{prefix}.{n.query}", f"{prefix}.{n.key}", f"{prefix}.{n.value}",
                             int8=q),
            *weights.product(dtype, f"{prefix}.{n.out}", int8=q), weights.norm(f"{prefix}.{n.norm1}"),
            *weights.product(dtype, f"{prefix}.{n.up}", int8=q),
            *weights.product(dtype, f"{prefix}.{n.down}", int8=q), weights.norm(f"{prefix}.{n.norm2}"))

    def _pool(self, hidden: torch.Tensor) -> torch.Tensor:
        """BERT's pooler: tanh(dense(the first token's state))."""
        return torch.tanh(F.linear(hidden[:, 0], *self._pooler))

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 token_type_ids: torch.Tensor | None = None,
                 output_hidden_states: bool = False) -> ForwardOutput:
        return self.forward(input_ids, attention_mask, token_type_ids, output_hidden_states)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor | None = None,
                output_hidden_states: bool = False) -> ForwardOutput:
        x = self.embeddings(input_ids, token_type_ids).to(self.dtype)
        states = [x] if output_hidden_states else None
        keep = attention_mask.bool()
        for layer in self.layers:
            x = self._layer_forward(layer, x, keep)
            if states is not None:
                states.append(x)
        pooled = self.pooler(x) if self.pooler is not None else None
        return ForwardOutput(x, tuple(states) if states is not None else None, pooled)

    def _layer_forward(self, layer: _Layer, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        if self.int8:
            return self._int8_layer_forward(layer, x, keep)
        batch, length, hidden = x.shape
        qkv = _linear(x, layer.qkv, layer.qkv_bias).view(batch, length, 3, self.heads, self.head_dim)
        q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))  # (batch, heads, length, dim)
        if self.kernel is not None:  # (batch, length, heads, dim) out
            context = self.kernel(q, k, v, keep, self.head_dim ** -0.5)
        else:
            context = F.scaled_dot_product_attention(q, k, v, attn_mask=keep[:, None, None, :])
            context = context.transpose(1, 2)
        context = context.reshape(batch, length, hidden)
        x = F.layer_norm(_linear_add(context, x, layer.out, layer.out_bias), (hidden,), *layer.norm1)
        up = _linear(x, layer.up, layer.up_bias, self.activation)
        return F.layer_norm(_linear_add(up, x, layer.down, layer.down_bias), (hidden,), *layer.norm2)

    def _int8_layer_forward(self, layer: _Layer, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """The same layer with int8 products (fbgemm has no epilogues: bias in the product,
        GELU and residual adds after it), SDPA in float32."""
        batch, length, hidden = x.shape
        qkv = layer.qkv(x).view(batch, length, 3, self.heads, self.head_dim)
        q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
        context = F.scaled_dot_product_attention(q, k, v, attn_mask=keep[:, None, None, :])
        context = context.transpose(1, 2).reshape(batch, length, hidden)
        x = F.layer_norm(layer.out(context).add_(x), (hidden,), *layer.norm1)
        up = layer.up(x)
        up = F.relu(up) if self.activation[0] == "relu" else F.gelu(
            up, approximate="tanh" if self.activation[1] == "tanh" else "none")
        return F.layer_norm(layer.down(up).add_(x), (hidden,), *layer.norm2)


def _kernel(attention: str, dtype: torch.dtype, head_dim: int):
    """embedpipe's attention op for the runtime's choice (built by the runtime), None for SDPA."""
    if attention == "sdpa":
        return None
    if attention not in cpu_attention.KINDS:
        raise ValueError(f"the fused forward takes attention sdpa, amx or avx512, not {attention!r}")
    if dtype != torch.bfloat16 or head_dim % 32:
        raise ValueError(f"attention {attention!r} runs bfloat16 heads of a multiple of 32 only")
    return cpu_attention.op(attention)
