"""embedpipe's own attention kernel for bfloat16 on CPUs with AMX or AVX-512 BF16 (csrc/).

PyTorch's CPU flash attention pays a fixed cost per block of 32 queries, which with BERT's
32-wide heads and ~100-token texts is ~40 % of a bf16 forward pass. The kernel here does one
(sequence, head) per step with a float32 softmax and its two products in one of two KINDS: "amx"
(AMX tiles, op embedpipe::padded_attention) or "avx512" (AVX-512 VDPBF16PS, for CPUs without
AMX, op embedpipe::padded_attention_avx512); 2-3x SDPA's speed on those shapes (docs,
"The attention kernel").

Each instruction set's code is its own translation unit (attention_amx.cpp, attention_avx512.cpp,
compiled for it by a `#pragma GCC target`); the op file (attention_op.cpp) is baseline x86-64 and
checks the CPU before calling either, so loading the library runs nothing a CPU lacks. A CPU with
neither kind (AVX2 CPUs such as AMD Zen 3, any non-x86 machine) loads nothing at all.

The library comes prebuilt in the wheel (`_attention_kernel*.so` beside this file, built by
setup.py); a source checkout whose sources are newer than that file (or that has none) compiles
it on first use (~30 s, cached by torch). It plugs into transformers' attention interface under
the names transformers_name(kind), for bidirectional (encoder) self-attention with a key-padding
mask, which is what BERT-family embedders run.
"""
from __future__ import annotations

import functools
import importlib.machinery
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
CSRC = Path(__file__).parent / "csrc"
SOURCES = [CSRC / name for name in ("attention_op.cpp", "attention_avx512.cpp", "attention_amx.cpp")]
HEADERS = [CSRC / name for name in ("attention_job.h", "attention_head.h")]
CFLAGS = ["-O3", "-fopenmp"]  # baseline: each ISA file names its own target
PREBUILT = "_attention_kernel"  # the extension module setup.py builds into the wheel


def transformers_name(attention: str) -> str:
    """The attn_implementation transformers gets for a runtime's attention: embedpipe's kernel
    kinds ("amx", "avx512") by their registered names, anything else ("sdpa", ...) as it is."""
    return _NAMES.get(attention, attention)


def op(kind: str):
    """The torch op computing `kind` (after build()): (query, key, value, key_mask, scale)."""
    return getattr(torch.ops.embedpipe, {"amx": "padded_attention",
                                         "avx512": "padded_attention_avx512"}[kind])


def unsupported_reason(device: torch.device, dtype: str, model_config, kind: str,
                       cpu: hardware.Cpu) -> str | None:
    """Why the kernel `kind` cannot run this model on `cpu`, or None when it can (before
    building it)."""
    if kind not in KINDS:
        raise ValueError(f"attention kernel kind {kind!r}; one of {KINDS}")
    if device.type != "cpu" or dtype != "bfloat16":
        return "it runs bfloat16 on CPU only"
    if kind == "amx" and not cpu.amx_bf16:
        return f"this CPU ({cpu.kind}) has no AMX bf16"
    if kind == "avx512" and not cpu.avx512_bf16:
        return f"this CPU ({cpu.kind}) has no AVX-512 BF16 (avx512_bf16 with avx512f/bw/vl/dq)"
    if getattr(model_config, "is_decoder", False) or getattr(model_config, "is_encoder_decoder", False):
        return "it computes bidirectional encoder attention only"
    heads = getattr(model_config, "num_attention_heads", None)
    hidden = getattr(model_config, "hidden_size", None)
    head_dim = getattr(model_config, "head_dim", None) or (hidden // heads if heads and hidden else None)
    if not head_dim or head_dim % 32:
        return f"head width {head_dim} is not a multiple of 32"
    return None


def build() -> None:
    """Load the kernel library on this machine and register its ops with torch; raises
    RuntimeError saying why when it cannot. On a CPU with neither kind nothing is built or
    loaded, and the reason is logged once."""
    if _LOADED.get("error"):
        raise RuntimeError(_LOADED["error"])
    if _LOADED.get("done"):
        return
    cpu = hardware.this_cpu()
    try:
        if not cpu.avx512_bf16:
            raise RuntimeError(f"this CPU ({cpu.model}: {cpu.kind}) has neither AMX nor AVX-512 "
                               f"BF16, so embedpipe's attention kernel is not loaded here")
        log.info("embedpipe's attention kernel: %s", load_library())
    except RuntimeError as exc:
        _LOADED["error"] = str(exc)
        log.info("%s", exc)
        raise
    _LOADED["done"] = True

    def fake(query, key, value, key_mask, scale):
        batch, heads, length, dim = query.shape
        return query.new_empty((batch, length, heads, dim))

    torch.library.register_fake("embedpipe::padded_attention", fake)
    torch.library.register_fake("embedpipe::padded_attention_avx512", fake)


def load_library() -> Path:
    """The library loaded into this process whatever the CPU (the prebuilt one, else compiled
    from csrc/), and its path: safe on any x86-64 CPU, since only the ops' own code, after their
    CPU check, runs an ISA's instructions (tests/runtime/test_kernel_loading.py)."""
    library = _prebuilt()
    try:
        if library is not None:
            torch.ops.load_library(str(library))
        else:
            _compile_and_load()
    except OSError as exc:  # a library the loader refuses
        raise RuntimeError(f"loading the attention kernel failed: {exc}") from exc
    return next(Path(p) for p in torch.ops.loaded_libraries if "attention_kernel" in Path(p).name)


_LOADED: dict = {}  # build()'s outcome in this process: {"done": True} or {"error": why}


def _prebuilt() -> Path | None:
    """The wheel's library (or an editable install's), unless this is a git checkout whose kernel
    sources changed since it was built."""
    checkout = (Path(__file__).parents[2] / ".git").exists()
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = Path(__file__).with_name(PREBUILT + suffix)
        if path.exists():
            built = path.stat().st_mtime
            if checkout and any(src.stat().st_mtime > built for src in SOURCES + HEADERS):
                log.info("%s is older than csrc/: compiling the kernel from source", path.name)
                return None
            return path
    return None


def _compile_and_load() -> None:
    """The development path: compile csrc/ with torch's extension builder (cached by torch)."""
    if not SOURCES[0].exists():
        raise RuntimeError("this installation has no prebuilt attention kernel and no sources")
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
        raise RuntimeError("no prebuilt attention kernel and no C++ compiler (c++) on PATH to "
                           "build it")
    try:
        import ninja

        os.environ["PATH"] = f"{ninja.BIN_DIR}{os.pathsep}{os.environ.get('PATH', '')}"
    except ImportError:
        pass
    try:
        cpp_extension.load(name="embedpipe_attention_kernel", sources=[str(src) for src in SOURCES],
                           extra_include_paths=[str(CSRC)], extra_cflags=CFLAGS,
                           extra_ldflags=["-fopenmp"], is_python_module=False, verbose=False)
    except Exception as exc:  # compiler errors, missing ninja: reported, then sdpa is used
        raise RuntimeError(f"building the attention kernel failed: {exc}") from exc


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
