"""The runtime: where and how the model runs, resolved once per job from its config, the model
and this machine, then carried as it is by the embed plan, the query embedder, the bench and Ray
workers. `resolve_runtime` is the one place each choice is made; a worker that cannot honour a
runtime resolved elsewhere fails with a message saying why (`check_here`).
"""
from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Any

import torch

from ..config import ConfigError, JobConfig, ModelConfig
from . import compile_cache, cpu_attention, fused_forward, hardware
from ..models.model_files import ModelSource

log = logging.getLogger(__name__)

# int8: int8 weight products inside the fused forward, float32 activations between them
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
                "int8": torch.float32}
# `compile = "auto"` compiles bf16 on CPU from this many input rows: the compiled model runs
# ~1.5x faster there (docs/performance/), so 15-30 s of compiling is repaid after ~25k rows.
AUTO_COMPILE_ROWS = 50_000
# ... and from this many when the compile cache holds this model, dtype and attention already
# (compile_cache.py): a warm compile costs a few seconds (docs/performance/amd-zen5.md, "The compile cache").
WARM_COMPILE_ROWS = 10_000


@dataclass(frozen=True)
class Runtime:
    device: str  # cpu | cuda | cuda:N
    dtype: str  # float32 | bfloat16 | float16
    dtype_note: str  # the dtype and, when chosen automatically, why: "bfloat16 (auto: CPU has ...)"
    attention: str  # sdpa | eager | amx | avx512 (embedpipe's kernels) | flash_attention_2
    compile: bool  # torch.compile
    max_length: int  # tokens per text, special tokens included
    compile_note: str = ""  # why compile is on or off: "auto: warm compile cache, 12,000 rows ..."
    # compiled through the persistent compile cache under this entry key (no freezing: the cache
    # refuses frozen graphs); None: not compiled, or compiled with frozen weights, uncached
    compile_cache: str | None = None
    # fused: embedpipe's forward for BERT-family models on CPU (fused_forward.py); transformers:
    # the model's own forward (every other case, and compiled models)
    forward: str = "transformers"

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.device)

    @property
    def attn_implementation(self) -> str:
        """What transformers loads the model with: embedpipe's kernels by their registered names."""
        return cpu_attention.transformers_name(self.attention)

    @property
    def on_cuda(self) -> bool:
        return self.device.startswith("cuda")

    @property
    def pad_multiple(self) -> int:
        """Batches are padded to a multiple of 8 tokens on CUDA (tensor-core shapes), 1 on CPU."""
        return 8 if self.on_cuda else 1

    @property
    def pin_memory(self) -> bool:
        return self.on_cuda


def resolve_runtime(model: ModelConfig, source: ModelSource, input_rows: int = 0,
                    cpu: hardware.Cpu | None = None) -> Runtime:
    """Every runtime choice for `model` on this machine. `input_rows` is the whole input's row
    count (done or not, so a rerun after a crash decides as the first run did); 0 for queries,
    which never repay compiling. `cpu`: this machine's (the default) or one made by hand to
    plan for another kind (a made-up CPU never builds the attention kernel)."""
    cpu = cpu or hardware.this_cpu()
    if model.max_length is not None and model.max_length > source.position_limit:
        raise ConfigError(
            f"model.max_length = {model.max_length} is above what model {source.name!r} can read: "
            f"{source.position_limit} tokens (its position embeddings); longer texts are "
            f"truncated and flagged, so set max_length to {source.position_limit} or less")
    device = _device(model.device)
    dtype = _dtype(model.dtype, device, cpu)
    attention = _attention(model.attention, device, dtype, source, cpu)
    key = compile_cache.entry_key(source.fingerprint, dtype, attention, str(device))
    fused_reason = ("model.forward = 'transformers'" if model.forward == "transformers"
                    else _fused_unavailable(device, dtype, attention, source, cpu))
    compiled, note = _compile(model.compile, device, dtype, input_rows, compile_cache.is_warm(key),
                              fused_reason is None)
    forward = _forward(model.forward, compiled, fused_reason)
    if dtype == "int8" and forward != "fused":
        raise ConfigError(f"model.dtype = 'int8' runs in embedpipe's fused forward only, which "
                          f"cannot run here: {fused_reason or 'model.compile = true'}; use "
                          f"dtype = 'float32'")
    return Runtime(device=str(device), dtype=dtype, dtype_note=_dtype_note(model.dtype, device, dtype, cpu),
                   attention=attention, compile=compiled, forward=forward,
                   max_length=model.max_length or source.max_length, compile_note=note,
                   compile_cache=key if compiled and _cacheable() else None)


def _device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"model.device = {device!r} but no CUDA device is available")
    return torch.device(device)


# bfloat16 on a CPU without AMX or AVX-512 BF16 is emulated: encode time on an AMD EPYC Zen 3
# (AVX2 only), 300 movie snippets, bfloat16 16.07 s vs float32 2.97 s (issue 25)
EMULATED_BF16_SLOWDOWN = 5.4


def _dtype(dtype: str, device: torch.device, cpu: hardware.Cpu) -> str:
    """`auto` picks the fastest dtype that keeps cosine >= 0.999 to float32 on this hardware:
    never an emulated half precision. An explicit bfloat16 on a CPU without native bf16 runs,
    with one warning saying what it costs."""
    if dtype == "auto":
        if device.type == "cuda":
            return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
        return "bfloat16" if cpu.fast_bf16 else "float32"
    if dtype == "float16" and device.type != "cuda":
        raise ConfigError("model.dtype = 'float16' runs on cuda only; use bfloat16 or float32 on cpu")
    if dtype == "int8" and device.type != "cpu":
        raise ConfigError("model.dtype = 'int8' runs on cpu only; use bfloat16 or float16 on cuda")
    if dtype == "int8" and not cpu.exact_int8:
        raise ConfigError(
            f"model.dtype = 'int8' needs AVX-512 VNNI, which this CPU ({cpu.model}: {cpu.kind}) "
            f"lacks or FBGEMM_ENABLE_INSTRUCTIONS caps away: without it fbgemm's 8-bit products "
            f"saturate in 16 bits (outputs off by up to half their range, measured), which would "
            f"give wrong vectors; use dtype = 'float32'")
    if _emulated_bf16(dtype, device, cpu):
        _warn_emulated_bf16(cpu)
    return dtype


def _emulated_bf16(dtype: str, device: torch.device, cpu: hardware.Cpu) -> bool:
    return dtype == "bfloat16" and device.type == "cpu" and cpu.emulates_bf16


@functools.cache
def _warn_emulated_bf16(cpu: hardware.Cpu) -> None:
    log.warning("model.dtype = 'bfloat16' is emulated on this CPU (%s: %s, no AVX-512 BF16 or "
                "AMX): about %.1fx slower than float32 as measured on an AMD EPYC Zen 3; use "
                "dtype = 'float32' (or 'auto', which picks it here)", cpu.model, cpu.kind,
                EMULATED_BF16_SLOWDOWN)


def _dtype_note(requested: str, device: torch.device, dtype: str, cpu: hardware.Cpu) -> str:
    """The dtype and, when chosen automatically, why: "bfloat16 (auto: CPU has AMX bf16)"; an
    emulated bfloat16 says so."""
    if requested != "auto":
        if _emulated_bf16(dtype, device, cpu):
            return f"bfloat16 (emulated on this CPU: ~{EMULATED_BF16_SLOWDOWN:.0f}x slower than float32)"
        return dtype
    if device.type == "cuda":
        why = "GPU supports bf16" if dtype == "bfloat16" else "GPU lacks bf16"
    else:
        why = cpu.bf16_kind
    return f"{dtype} (auto: {why})"


def _attention(requested: str, device: torch.device, dtype: str, source: ModelSource,
               cpu: hardware.Cpu) -> str:
    """The attention implementation transformers gets. `auto`: embedpipe's kernel for bf16 on CPU,
    with AMX products on CPUs with AMX, else with AVX-512 BF16 products where the CPU has them
    (2-3x SDPA's speed), FlashAttention-2 on CUDA when flash_attn is installed, SDPA otherwise."""
    if requested == "eager":
        return "eager"
    sdpa = _model_class_supports(source, "_supports_sdpa")
    if requested == "sdpa":
        if not sdpa:
            raise ConfigError(f"model.attention = 'sdpa': model type {source.model_type!r} has no "
                              f"SDPA attention in transformers; use 'eager' or 'auto'")
        return "sdpa"
    fallback = "sdpa" if sdpa else "eager"
    if not sdpa and requested == "auto":
        log.info("model type %r has no SDPA attention in transformers; attention eager",
                 source.model_type)
    if device.type == "cuda" or requested == "flash_attention_2":
        if device.type != "cuda":
            raise ConfigError("model.attention = 'flash_attention_2' runs on cuda only")
        if requested in cpu_attention.KINDS:
            raise ConfigError(f"model.attention = {requested!r} runs on CPU only")
        try:
            import flash_attn  # noqa: F401
            if _model_class_supports(source, "_supports_flash_attn") or requested == "flash_attention_2":
                return "flash_attention_2"
        except ImportError:
            if requested == "flash_attention_2":
                raise ConfigError("model.attention = 'flash_attention_2' needs the flash_attn "
                                  "package") from None
        return fallback
    if requested in cpu_attention.KINDS:
        reason, _ = _kernel_unavailable(device, dtype, source, requested, cpu)
        if reason is not None:
            raise ConfigError(f"model.attention = {requested!r} cannot run here: {reason}")
        return requested
    # auto: AMX products where the CPU has them, else AVX-512 BF16 ones, else SDPA
    kind = "amx" if cpu.amx_bf16 else "avx512"
    reason, build_failed = _kernel_unavailable(device, dtype, source, kind, cpu)
    if reason is None:
        return kind
    if build_failed:
        log.warning("embedpipe's %s attention kernel is unavailable (%s); using %s",
                    _KERNEL_WORDS[kind], reason, fallback.upper())
    return fallback


def _forward(requested: str, compiled: bool, fused_reason: str | None) -> str:
    """`auto`: embedpipe's fused forward where it runs (`fused_reason` None: a BERT-family model,
    on CPU, with SDPA or embedpipe's attention kernel, oneDNN in this torch) and the model is not
    compiled: 1.2-1.7x transformers' eager forward there (docs/performance/amd-zen5.md, "The fused forward");
    transformers' forward otherwise. An explicit "fused" that cannot run is a configuration
    error saying why."""
    if requested == "transformers":
        return "transformers"
    reason = "a compiled model runs transformers' forward (model.compile)" if compiled else fused_reason
    if reason is None:
        return "fused"
    if requested == "fused":
        raise ConfigError(f"model.forward = 'fused' cannot run here: {reason}; use 'auto' or "
                          f"'transformers'")
    return "transformers"


def _fused_unavailable(device: torch.device, dtype: str, attention: str, source: ModelSource,
                       cpu: hardware.Cpu) -> str | None:
    """Why the fused forward cannot run this model eagerly here, or None when it can."""
    if device.type != "cpu":
        return "it runs on CPU only"
    if attention not in ("sdpa", *cpu_attention.KINDS):
        return f"it takes attention sdpa, {' or '.join(cpu_attention.KINDS)}, not {attention!r}"
    if not fused_forward.onednn_products(dtype, cpu):
        return f"this torch has no oneDNN {dtype} products"
    return fused_forward.unsupported_reason(source.config)


# what transformers' classes of fused_forward.FAMILIES declare (tests/runtime/test_fused_forward.py
# checks it against the classes)
KNOWN_FAMILY_FLAGS = ("_supports_sdpa", "_supports_attention_backend")


def _model_class_supports(source: ModelSource, flag: str) -> bool:
    """Whether transformers' class for this model declares an attention implementation. The
    fused forward's families declare SDPA and the attention backend: known without importing
    their class (transformers' model modules cost ~1.5 s of start-up)."""
    if source.model_type in fused_forward.FAMILIES and flag in KNOWN_FAMILY_FLAGS:
        return True
    from transformers.models.auto.modeling_auto import MODEL_MAPPING

    try:
        model_class = MODEL_MAPPING[type(source.config)]
    except (KeyError, ValueError, OSError):
        return False
    return bool(getattr(model_class, flag, False))


_KERNEL_WORDS = {"amx": "AMX", "avx512": "AVX-512 BF16"}


def _kernel_unavailable(device: torch.device, dtype: str, source: ModelSource, kind: str,
                        cpu: hardware.Cpu) -> tuple[str | None, bool]:
    """(why embedpipe's kernel `kind` ("amx", "avx512") cannot run this model on `cpu`, or
    None; whether its build failed). The kernel is built when it could run on this machine's
    own CPU; a CPU made by hand is planned for, never built for."""
    reason = cpu_attention.unsupported_reason(device, dtype, source.config, kind, cpu)
    if reason is None and not _model_class_supports(source, "_supports_attention_backend"):
        reason = f"model type {source.model_type!r} takes no custom attention function"
    if reason is not None or not cpu.here:
        return reason, False
    try:
        cpu_attention.build()
    except RuntimeError as exc:
        return str(exc), True
    return None, False


def _compile(requested: bool | str, device: torch.device, dtype: str, rows: int,
             warm: bool = False, fused: bool = False) -> tuple[bool, str]:
    """(compile or not, why). `auto`: never where the fused forward can run (`fused`), which is
    faster eager than transformers' forward compiled (docs/performance/amd-zen5.md, "The fused forward"); otherwise
    bf16 on CPU, when the input has at least AUTO_COMPILE_ROWS rows, or WARM_COMPILE_ROWS when
    the compile cache is warm for this model, dtype and attention (`warm`); float32 on CPU gains
    nothing measurable, CUDA is not measured here."""
    if requested != "auto":
        return bool(requested), f"compile = {str(bool(requested)).lower()}"
    if fused:
        return False, "auto: the fused forward runs eagerly (faster than compiled transformers)"
    if device.type != "cpu" or dtype != "bfloat16":
        return False, "auto: only bfloat16 on CPU is compiled (no gain measured elsewhere)"
    if rows >= AUTO_COMPILE_ROWS:
        return True, (f"auto: {rows:,} input rows >= {AUTO_COMPILE_ROWS:,}"
                      + ("; warm compile cache" if warm else "; no warm compile cache yet"))
    if warm and rows >= WARM_COMPILE_ROWS:
        return True, f"auto: warm compile cache and {rows:,} input rows >= {WARM_COMPILE_ROWS:,}"
    if warm:
        return False, (f"auto: {rows:,} input rows < {WARM_COMPILE_ROWS:,}, even with a warm "
                       f"compile cache")
    return False, f"auto: {rows:,} input rows < {AUTO_COMPILE_ROWS:,}; no warm compile cache"


def _cacheable() -> bool:
    """Compiles go through the persistent cache unless EMBEDPIPE_COMPILE_CACHE=0 (then with
    frozen weights, uncached)."""
    import os

    return os.environ.get("EMBEDPIPE_COMPILE_CACHE", "1") != "0"


def check_here(runtime: Runtime, source: ModelSource) -> None:
    """Refuse a runtime resolved on another machine (a Ray driver) that this one cannot honour."""
    device = runtime.torch_device
    if runtime.on_cuda and not torch.cuda.is_available():
        raise ConfigError(f"the run was planned for {runtime.device}, but this worker has no CUDA "
                          f"device; set model.device for the cluster's machines")
    cpu = hardware.this_cpu()
    if runtime.forward == "fused" and not fused_forward.onednn_products(runtime.dtype, cpu):
        raise ConfigError(f"the run was planned with the fused forward, which needs oneDNN "
                          f"{runtime.dtype} products that this worker's torch lacks; set "
                          f"model.forward = 'transformers' on mixed clusters")
    if runtime.attention in cpu_attention.KINDS:
        reason, _ = _kernel_unavailable(device, runtime.dtype, source, runtime.attention, cpu)
        if reason is not None:
            raise ConfigError(f"the run was planned with attention {runtime.attention!r}, which "
                              f"cannot run on this worker: {reason}; set model.attention = 'sdpa' "
                              f"on mixed clusters")


def vector_settings(job: JobConfig, source: ModelSource, runtime: Runtime) -> dict[str, Any]:
    """The settings that change a vector, with the model's weights and the runtime resolved."""
    settings = job.vector_settings()
    settings.update({"model.fingerprint": source.fingerprint, "model.dtype": runtime.dtype,
                     "model.max_length": runtime.max_length})
    if source.st is not None and source.st.multivector is not None:  # docs/multivector.md
        from ..models.multivector_folder import head_fingerprint
        settings["model.multivector_head"] = head_fingerprint(source.st.multivector)
    return settings
