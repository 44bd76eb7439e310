"""embedpipe's own attention kernel for bfloat16 on CPUs with AMX or AVX-512 BF16
(csrc/cpu_attention.cpp).

PyTorch's CPU flash attention pays a fixed cost per block of 32 queries, which with BERT's
32-wide heads and ~100-token texts is ~40 % of a bf16 forward pass. The kernel here does one
(sequence, head) per step with a float32 softmax and its two products in one of two KINDS: "amx"
(AMX tiles, op embedpipe::padded_attention) or "avx512" (AVX-512 VDPBF16PS, for CPUs without
AMX, op embedpipe::padded_attention_avx512); 2-3x SDPA's speed on those shapes (README, "The AMX
attention kernel"). It is built from source the first time it is needed (~20 s with the C++
compiler that torch.compile also uses; cached by torch afterwards; one build holds both kinds)
and plugs into transformers' attention interface under the names transformers_name(kind), for
bidirectional (encoder) self-attention with a key-padding mask, which is what BERT-family
embedders run.
"""
from __future__ import annotations

import functools
import logging
import os
import shutil
from pathlib import Path

import torch

from . import hardware

log = logging.getLogger(__name__)

ATTENTION = "embedpipe_amx"  # the "amx" kind's name in transformers' attention interface
KINDS = ("amx", "avx512")
_NAMES = {"amx": ATTENTION, "avx512": "embedpipe_avx512"}
SOURCE = Path(__file__).parent / "csrc" / "cpu_attention.cpp"
CFLAGS = ["-O3", "-fopenmp", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq",
          "-mavx512bf16", "-mamx-tile", "-mamx-bf16"]


def transformers_name(attention: str) -> str:
    """The attn_implementation transformers gets for a runtime's attention: embedpipe's kernel
    kinds ("amx", "avx512") by their registered names, anything else ("sdpa", ...) as it is."""
    return _NAMES.get(attention, attention)


def op(kind: str):
    """The torch op computing `kind` (after build()): (query, key, value, key_mask, scale)."""
    return getattr(torch.ops.embedpipe, {"amx": "padded_attention",
                                         "avx512": "padded_attention_avx512"}[kind])


def unsupported_reason(device: torch.device, dtype: str, model_config,
                       kind: str = "amx") -> str | None:
    """Why the kernel `kind` cannot run this model here, or None when it can (before building it)."""
    if kind not in KINDS:
        raise ValueError(f"attention kernel kind {kind!r}; one of {KINDS}")
    if device.type != "cpu" or dtype != "bfloat16":
        return "it runs bfloat16 on CPU only"
    if kind == "amx" and not hardware.cpu_has_amx_bf16():
        return "this CPU has no AMX bf16"
    if kind == "avx512" and not hardware.cpu_has_avx512_bf16():
        return "this CPU has no AVX-512 BF16 (avx512_bf16 with avx512f/bw/vl)"
    if getattr(model_config, "is_decoder", False) or getattr(model_config, "is_encoder_decoder", False):
        return "it computes bidirectional encoder attention only"
    heads = getattr(model_config, "num_attention_heads", None)
    hidden = getattr(model_config, "hidden_size", None)
    head_dim = getattr(model_config, "head_dim", None) or (hidden // heads if heads and hidden else None)
    if not head_dim or head_dim % 32:
        return f"head width {head_dim} is not a multiple of 32"
    return None


@functools.cache
def build() -> None:
    """Compile (or find the cached build of) the kernel and register it with torch; raises
    RuntimeError saying why when it cannot."""
    # Importing cpp_extension warns "No CUDA runtime is found" on every CPU machine: a line on
    # every run that says nothing about the CPU kernel built here.
    quiet = logging.getLogger("torch.utils.cpp_extension")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        from torch.utils import cpp_extension
    finally:
        quiet.setLevel(level)

    if shutil.which(os.environ.get("CXX", "c++")) is None:
        raise RuntimeError("no C++ compiler (c++) on PATH")
    try:
        import ninja

        os.environ["PATH"] = f"{ninja.BIN_DIR}{os.pathsep}{os.environ.get('PATH', '')}"
    except ImportError:
        pass
    try:
        cpp_extension.load(name="embedpipe_cpu_attention", sources=[str(SOURCE)],
                           extra_cflags=CFLAGS, extra_ldflags=["-fopenmp"],
                           is_python_module=False, verbose=False)
    except Exception as exc:  # compiler errors, missing ninja: reported, then sdpa is used
        raise RuntimeError(f"building {SOURCE.name} failed: {exc}") from exc

    def fake(query, key, value, key_mask, scale):
        batch, heads, length, dim = query.shape
        return query.new_empty((batch, length, heads, dim))

    torch.library.register_fake("embedpipe::padded_attention", fake)
    torch.library.register_fake("embedpipe::padded_attention_avx512", fake)


@functools.cache
def register_with_transformers() -> None:
    """The kernels as attention functions of transformers' models (after build()). Apart from
    build(): the fused forward calls the ops itself, and transformers' masking module imports
    torch._dynamo (~0.5 s of start-up)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTENTION, attention_forward)
    AttentionInterface.register(_NAMES["avx512"], avx512_attention_forward)
    for name in _NAMES.values():
        AttentionMaskInterface.register(name, key_padding_mask)


def key_padding_mask(batch_size: int, q_length: int, kv_length: int,
                     attention_mask: torch.Tensor | None = None, **kwargs) -> torch.Tensor | None:
    """The mask the kernel takes: the 2D (batch, keys) boolean padding mask, as it is."""
    return attention_mask


def attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                      kind: str = "amx", **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention-function contract: (batch, heads, length, dim) in, (batch, length,
    heads, dim) out. Anything the kernel does not compute goes to SDPA with the same mask."""
    batch, heads, length, dim = query.shape
    if scaling is None:
        scaling = dim ** -0.5
    if attention_mask is None:
        attention_mask = torch.ones((batch, length), dtype=torch.bool, device=query.device)
    fits = (query.dtype == key.dtype == value.dtype == torch.bfloat16 and key.shape == query.shape
            and attention_mask.dim() == 2 and not (module.training and dropout))
    if not fits:
        mask = attention_mask[:, None, None, :].bool() if attention_mask.dim() == 2 else attention_mask
        out = torch.nn.functional.scaled_dot_product_attention(
            query, key, value, attn_mask=mask, dropout_p=dropout if module.training else 0.0,
            scale=scaling)
        return out.transpose(1, 2).contiguous(), None
    return op(kind)(query, key, value, attention_mask, scaling), None


def avx512_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                             **kwargs) -> tuple[torch.Tensor, None]:
    """attention_forward with the "avx512" kind."""
    return attention_forward(module, query, key, value, attention_mask, scaling, dropout,
                             kind="avx512", **kwargs)
