"""The model on its device: forward pass, pooling, normalisation, and out-of-memory back-off.

Precision and kernels, as measured on all-MiniLM-L6-v2 (docs/performance/):

* CPU, BERT-family models: embedpipe's fused forward (fused_forward.py; runtime.forward), in
  float32 or bfloat16, attention in embedpipe's kernel (cpu_attention.py: AMX, or AVX-512 bf16)
  where the CPU has one, SDPA otherwise.
* CPU bfloat16, other models (and compiled ones): the Linear weights are stored in bfloat16 once,
  and transformers' forward runs under autocast, so every matrix product runs in bfloat16 while
  layer norms, softmax and the residual stream stay in float32. Both hold cosine >= 0.999 to
  the float32 vectors on every row.
* CUDA float16 / bfloat16: the whole model in half precision (the GPU's norms accumulate in
  float32), SDPA attention, or FlashAttention-2 when the flash_attn package is installed.
"""
from __future__ import annotations

import contextlib
import inspect
import logging
import threading
import time
from dataclasses import dataclass

import numpy as np
import torch

from ..config import ConfigError
from ..runtime import compile_cache
from .batching import Batch
from ..runtime.fused_forward import FusedForward
from ..runtime.hardware import process_age
from ..models.model_files import ModelSource, read_safetensors
from .pooling import combine_layers, output_width, pool
from ..runtime.runtime import TORCH_DTYPES, Runtime, check_here

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EncoderSettings:
    layers: tuple[int, ...] | None  # None: use the model's pooler_output
    layer_combine: str | None
    token_pooling: str | None
    normalize: bool
    dimensions: int | None = None  # Matryoshka: the first N dimensions, then normalised

    @classmethod
    def for_job(cls, job, windows_pooled: bool = False) -> "EncoderSettings":
        """A resolved job's pooling (its preset or general form; all None for the pooler): the one
        place it is made, for the run, its workers and `search`'s queries alike. windows_pooled:
        each window's vector is pooled with its text's other windows and normalised after that,
        not alone."""
        layers, combine, token = job.encode.pooling_spec() or (None, None, None)
        normalize = bool(job.encode.normalize) and not windows_pooled
        return cls(layers, combine, token, normalize, job.output.dimensions)

    def width(self, hidden_size: int) -> int:
        return self.dimensions or output_width(hidden_size, self.layers, self.layer_combine)


def _load_model(source: ModelSource, runtime: Runtime):
    from transformers import AutoModel

    from ..runtime import cpu_attention

    device, dtype = runtime.torch_device, runtime.dtype
    attn = runtime.attn_implementation
    if runtime.attention in cpu_attention.KINDS:
        cpu_attention.register_with_transformers()
    # Always name the dtype: transformers 5 loads a folder saved in float16 as a float16 model
    # unless told otherwise. On CPU the model loads in float32 (bf16 casts only the Linear
    # weights, below).
    kwargs = {"dtype": TORCH_DTYPES[dtype] if device.type == "cuda" else torch.float32}
    kwargs["output_loading_info"] = True  # which weights were missing from the files
    try:
        try:
            model, info = AutoModel.from_pretrained(source.path, config=source.config,
                                                    attn_implementation=attn, **kwargs)
        except (ImportError, ValueError):
            if attn == "sdpa":
                raise
            log.warning("model %s does not take attention %r; using SDPA", source.name, attn)
            model, info = AutoModel.from_pretrained(source.path, config=source.config,
                                                    attn_implementation="sdpa",
                                                    **kwargs)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot load model from {source.path}: {exc}") from exc
    # transformers initialises missing weights at random and only logs it; Encoder refuses a
    # model whose pooling would use any of them.
    model.embedpipe_missing_weights = sorted(info.get("missing_keys") or ())
    if device.type == "cuda":
        model = model.to(TORCH_DTYPES[dtype])
    elif dtype != "float32":
        # Only the matrix products' weights go to bf16: autocast then finds them already cast
        # (no per-batch copy of the weights) and keeps norms and the residual stream in float32.
        for module in model.modules():
            if isinstance(module, torch.nn.Linear):
                module.to(TORCH_DTYPES[dtype])
    return model.to(device).eval().requires_grad_(False)


def _load_fused(source: ModelSource, runtime: Runtime) -> FusedForward:
    """The fused forward, built from the folder's safetensors without importing transformers'
    model classes (whose imports are most of a run's start-up: docs/performance/amd-zen5.md, "Start-up"); a folder
    with .bin weights only goes through a loaded transformers model's tensors."""
    state = read_safetensors(source.path)
    if state is None:
        state = _load_model(source, runtime).state_dict()
    try:
        return FusedForward(state, source.config,
                            TORCH_DTYPES[runtime.dtype], runtime.attention,
                            int8=runtime.dtype == "int8")
    except ConfigError as exc:
        raise ConfigError(f"model folder {source.path}: {exc}") from None


# Loaded models by (weights, runtime). A process that runs several jobs (the bench's rounds, a
# test session, a notebook) loads the weights once; models are only read, never changed.
_MODELS: dict[tuple[str, tuple], torch.nn.Module] = {}
_MODELS_LOCK = threading.Lock()
_MODELS_KEEP = 2


def cached_model(source: ModelSource, runtime: Runtime) -> torch.nn.Module:
    key = (f"{source.path}:{source.fingerprint}",
           (runtime.device, runtime.dtype, runtime.attention, runtime.compile,
            runtime.compile_cache, runtime.forward))
    with _MODELS_LOCK:
        model = _MODELS.pop(key, None)
        if model is None and runtime.forward == "fused":
            model = _load_fused(source, runtime)
        elif model is None:
            model = _load_model(source, runtime)
            if runtime.compile:
                # Inductor fuses the element-wise work around the matrix products (norms, GELU,
                # casts), which is most of a bf16 forward on CPU. dynamic=True: one compile
                # serves every (rows, length) batch shape; it costs ~15-30 s once per process.
                # freezing: the weights are constants (never trained here), folded into the
                # graph. Through the persistent cache (runtime.compile_cache, the default;
                # compile_cache.py) without oneDNN weight prepacking, which the FX-graph cache
                # cannot store (and which measured slower on an AVX-512 bf16 EPYC: docs/performance/amd-zen5.md, "The
                # compile cache"). Compiling happens lazily at the first calls (and on
                # recompiles), where torch.compile's `options` do not reach these passes:
                # Encoder._forward sets them per call (_freezing).
                if runtime.compile_cache:
                    compile_cache.use_cache()
                model = torch.compile(model, dynamic=True)
        _MODELS[key] = model  # most recently used last
        while len(_MODELS) > _MODELS_KEEP:
            _MODELS.pop(next(iter(_MODELS)))
        return model


_FIRST_BATCH_LOGGED = threading.Event()  # once per process


class Encoder:
    """Turns padded token batches into float32 sentence vectors (numpy, one row per text)."""

    def __init__(self, source: ModelSource, runtime: Runtime, settings: EncoderSettings):
        check_here(runtime, source)
        self.runtime, self.settings = runtime, settings
        self.device, self.dtype, self.attention = runtime.torch_device, runtime.dtype, runtime.attention
        model = cached_model(source, runtime)
        _refuse_random_weights(source, settings, getattr(model, "embedpipe_missing_weights", []))
        if settings.layers is None and getattr(model, "pooler", None) is None:
            raise ConfigError(f"encode.pooling = 'pooler' but model {source.name!r} has no pooler")
        n_states = model.config.num_hidden_layers + 1
        for layer in settings.layers or ():
            if not -n_states <= layer < n_states:
                raise ConfigError(
                    f"encode.layers: {layer} is out of range for a model with {n_states} hidden "
                    f"states (0 = embeddings .. {n_states - 1}, or -1 .. -{n_states})")
        self.model = model
        # segment ids go to models whose forward takes them (BERT: yes; DistilBERT: no)
        self.takes_token_types = "token_type_ids" in inspect.signature(
            getattr(model, "_orig_mod", model).forward).parameters
        self.hidden_size = model.config.hidden_size
        self.width = settings.width(self.hidden_size)
        self.pad_multiple = runtime.pad_multiple
        self.oom_splits = 0
        self.source_name = source.name
        self._cache_marked = False
        # After an out-of-memory error, batches above this many padded tokens are split before
        # they reach the device, so one OOM does not repeat on every later batch.
        self.token_cap: int | None = None
        log.info("encoder: %s on %s in %s, attention %s, width %d", source.name, self.device,
                 self.dtype, self.attention, self.width)

    def _freezing(self):
        """Inductor's settings for this model's (lazy) compiles: freezing (the weights are
        constants: never trained here), with oneDNN weight prepacking only when uncached, since
        Inductor's FX-graph cache cannot store prepacked (mkldnn) weights."""
        if not self.runtime.compile:
            return contextlib.nullcontext()
        import torch._inductor.config as inductor_config

        if self.runtime.compile_cache:
            return inductor_config.patch({"freezing": True, "cpp.weight_prepack": False})
        return inductor_config.patch({"freezing": True, "cpp.weight_prepack": True})

    def _autocast(self):
        # On CUDA the weights are already half; on CPU autocast runs the products in bf16 (the
        # fused forward runs in the run's dtype itself).
        enabled = (self.dtype != "float32" and self.device.type == "cpu"
                   and self.runtime.forward != "fused")
        return torch.autocast(self.device.type, dtype=TORCH_DTYPES[self.dtype], enabled=enabled)

    def _forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 token_type_ids: torch.Tensor | None = None, per_token: bool = False):
        """The batch's text vectors; with per_token also, for token-level output, each row's
        token vectors as numpy [tokens, width]: the pooling's layers combined per token, in
        float32, padding dropped (only then are they computed or copied)."""
        s = self.settings
        need_states = s.layers is not None and tuple(s.layers) != (-1,)
        ids = input_ids.to(self.device, non_blocking=True)
        mask = attention_mask.to(self.device, non_blocking=True)
        extra = {}
        if token_type_ids is not None and self.takes_token_types:
            extra["token_type_ids"] = token_type_ids.to(self.device, non_blocking=True)
        with torch.inference_mode(), self._autocast(), self._freezing():
            out = self.model(input_ids=ids, attention_mask=mask, output_hidden_states=need_states,
                             **extra)
            if s.layers is None:
                vectors = out.pooler_output.float()
            else:
                states = out.hidden_states if need_states else (out.last_hidden_state,)
                layers = s.layers if need_states else (0,)
                vectors = pool(states, mask, layers, s.layer_combine, s.token_pooling)
                if per_token:
                    tokens = combine_layers(states, layers, s.layer_combine).cpu().numpy()
            if s.dimensions:
                vectors = vectors[:, :s.dimensions]
            if s.normalize:
                vectors = torch.nn.functional.normalize(vectors, p=2, dim=1)
        if not per_token:
            return vectors
        lengths = attention_mask.sum(1).tolist()
        return vectors, [tokens[i, :n] for i, n in enumerate(lengths)]

    def encode_batch(self, batch: Batch) -> np.ndarray:
        if batch.token_type_ids is None:
            out = self.encode(batch.input_ids, batch.attention_mask)
        else:
            out = self.encode(batch.input_ids, batch.attention_mask, batch.token_type_ids)
        if self.runtime.compile_cache and not self._cache_marked:
            # compiled and run: later runs of this model, dtype and attention find it warm
            self._cache_marked = True
            compile_cache.mark_warm(self.runtime.compile_cache, {
                "model": str(self.source_name), "dtype": self.dtype, "attention": self.attention,
                "torch": torch.__version__, "device": self.runtime.device})
        if not _FIRST_BATCH_LOGGED.is_set():
            _FIRST_BATCH_LOGGED.set()
            age = process_age()
            if age is not None:  # start-up time: docs/performance/amd-zen5.md, "Start-up"
                log.info("first batch encoded %.2f s after the process started (%.2f s of CPU)",
                         age, time.process_time())
        return out

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
               *token_type_ids: torch.Tensor) -> np.ndarray:
        """Encode one batch (with segment ids for sentence pairs); on device out-of-memory halve
        it and retry, never dropping a row."""
        rows = len(input_ids)
        if rows > 1 and self.token_cap is not None and input_ids.numel() > self.token_cap:
            return self._split(input_ids, attention_mask, *token_type_ids)
        try:
            return self._forward(input_ids, attention_mask, *token_type_ids).cpu().numpy()
        except torch.OutOfMemoryError:
            if rows == 1:
                raise
        # Out of the except block: the traceback's frames (and their tensors) are gone now.
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        self.oom_splits += 1
        cap = input_ids.numel() // 2
        self.token_cap = cap if self.token_cap is None else min(self.token_cap, cap)
        log.warning("out of memory on a batch of %d rows x %d tokens; retrying as two halves",
                    rows, input_ids.shape[1])
        return self._split(input_ids, attention_mask, *token_type_ids)

    def _split(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
               *token_type_ids: torch.Tensor) -> np.ndarray:
        half = len(input_ids) // 2
        types = token_type_ids[0] if token_type_ids else None
        return np.concatenate([
            self.encode(*_trim(input_ids[part], attention_mask[part], self.pad_multiple,
                               None if types is None else types[part]))
            for part in (slice(None, half), slice(half, None))])


def _refuse_random_weights(source: ModelSource, settings: EncoderSettings, missing: list[str]) -> None:
    """Weights absent from the files would be random: refuse when the pooling uses any (the
    pooler's only matter to pooling = 'pooler')."""
    used = missing if settings.layers is None else [k for k in missing if not k.startswith("pooler.")]
    if not used:
        return
    shown = ", ".join(used[:4]) + (f" and {len(used) - 4} more" if len(used) > 4 else "")
    hint = ("the folder was saved without a pooler: use encode.pooling = 'cls' or 'mean'"
            if all(k.startswith("pooler.") for k in used) else
            "the weight files do not match the config")
    raise ConfigError(f"model folder {source.path} lacks weights the chosen pooling uses ({shown}); "
                      f"transformers would initialise them at random, so every run would give "
                      f"other vectors. {hint[0].upper() + hint[1:]}")


def _trim(input_ids: torch.Tensor, attention_mask: torch.Tensor, multiple: int = 1,
          token_type_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
    """Drop the padding columns no row of this (smaller) batch needs, keeping `multiple` alignment
    (segment ids, when given, are trimmed alike and returned third)."""
    longest = int(attention_mask.sum(1).max())
    width = min(-(-longest // multiple) * multiple, input_ids.shape[1])
    trimmed = (input_ids[:, :width], attention_mask[:, :width])
    return trimmed if token_type_ids is None else (*trimmed, token_type_ids[:, :width])
