"""embedpipe's own attention kernel for bfloat16 on CPUs with AMX (csrc/cpu_attention.cpp).

PyTorch's CPU flash attention pays a fixed cost per block of 32 queries, which with BERT's
32-wide heads and ~100-token texts is ~40 % of a bf16 forward pass. The kernel here does one
(sequence, head) per step with AMX tile products and a float32 softmax, 2-3x faster on those
shapes (`embedpipe bench`, README "Performance"). It is built from source the first time it is
needed (~20 s with the C++ compiler that torch.compile also uses; cached by torch afterwards)
and plugs into transformers' attention interface under the name ATTENTION, for bidirectional
(encoder) self-attention with a key-padding mask, which is what BERT-family embedders run.
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

ATTENTION = "embedpipe_amx"
SOURCE = Path(__file__).parent / "csrc" / "cpu_attention.cpp"
CFLAGS = ["-O3", "-fopenmp", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq",
          "-mavx512bf16", "-mamx-tile", "-mamx-bf16"]


def unsupported_reason(device: torch.device, dtype: str, model_config) -> str | None:
    """Why the kernel cannot run this model here, or None when it can (before building it)."""
    if device.type != "cpu" or dtype != "bfloat16":
        return "it runs bfloat16 on CPU only"
    if not hardware.cpu_has_amx_bf16():
        return "this CPU has no AMX bf16"
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
    """Compile (or find the cached build of) the kernel and register it with torch and
    transformers; raises RuntimeError saying why when it cannot."""
    from torch.utils import cpp_extension

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

    @torch.library.register_fake("embedpipe::padded_attention")
    def _(query, key, value, key_mask, scale):
        batch, heads, length, dim = query.shape
        return query.new_empty((batch, length, heads, dim))

    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTENTION, attention_forward)
    AttentionMaskInterface.register(ATTENTION, key_padding_mask)


def key_padding_mask(batch_size: int, q_length: int, kv_length: int,
                     attention_mask: torch.Tensor | None = None, **kwargs) -> torch.Tensor | None:
    """The mask the kernel takes: the 2D (batch, keys) boolean padding mask, as it is."""
    return attention_mask


def attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                      **kwargs) -> tuple[torch.Tensor, None]:
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
    return torch.ops.embedpipe.padded_attention(query, key, value, attention_mask, scaling), None
