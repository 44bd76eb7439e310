"""The model on its device: forward pass, pooling, normalisation, and CUDA OOM back-off."""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from .config import ConfigError
from .models import ModelSource
from .pooling import output_width, pool

log = logging.getLogger(__name__)

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def cpu_has_fast_bf16() -> bool:
    """AMX or AVX-512 bf16: bf16 matrix products run several times faster than float32."""
    try:
        with open("/proc/cpuinfo") as handle:
            flags = next((line for line in handle if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"model.device = {device!r} but no CUDA device is available")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> str:
    """`auto` picks the fastest dtype that keeps cosine >= 0.999 to float32 on this hardware."""
    if dtype == "auto":
        if device.type == "cuda":
            return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
        return "bfloat16" if cpu_has_fast_bf16() else "float32"
    if dtype == "float16" and device.type != "cuda":
        raise ConfigError("model.dtype = 'float16' runs on cuda only; use bfloat16 or float32 on cpu")
    return dtype


@dataclass(frozen=True)
class EncoderSettings:
    layers: tuple[int, ...] | None  # None: use the model's pooler_output
    layer_combine: str | None
    token_pooling: str | None
    normalize: bool


class Encoder:
    """Turns padded token batches into float32 sentence vectors (numpy, one row per text)."""

    def __init__(self, source: ModelSource, device: str, dtype: str, settings: EncoderSettings):
        from transformers import AutoModel

        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.settings = settings
        try:
            model = AutoModel.from_pretrained(source.path, attn_implementation="sdpa")
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot load model from {source.path}: {exc}") from exc
        if settings.layers is None and getattr(model, "pooler", None) is None:
            raise ConfigError(f"encode.pooling = 'pooler' but model {source.name!r} has no pooler")
        n_states = model.config.num_hidden_layers + 1
        for layer in settings.layers or ():
            if not -n_states <= layer < n_states:
                raise ConfigError(
                    f"encode.layers: {layer} is out of range for a model with {n_states} hidden "
                    f"states (0 = embeddings .. {n_states - 1}, or -1 .. -{n_states})")
        if self.device.type == "cuda":
            # On a GPU the weights themselves go to half precision; on CPU autocast keeps
            # layer norms and softmax in float32, which is what holds cosine >= 0.999.
            model = model.to(TORCH_DTYPES[self.dtype])
        self.model = model.to(self.device).eval()
        self.hidden_size = model.config.hidden_size
        self.width = output_width(self.hidden_size, settings.layers, settings.layer_combine)
        self.oom_splits = 0
        log.info("encoder: %s on %s in %s, width %d", source.name, self.device, self.dtype, self.width)

    def _autocast(self):
        enabled = self.dtype != "float32"
        return torch.autocast(self.device.type, dtype=TORCH_DTYPES[self.dtype], enabled=enabled)

    def _forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        s = self.settings
        need_states = s.layers is not None and tuple(s.layers) != (-1,)
        ids = input_ids.to(self.device, non_blocking=True)
        mask = attention_mask.to(self.device, non_blocking=True)
        with torch.inference_mode(), self._autocast():
            out = self.model(input_ids=ids, attention_mask=mask, output_hidden_states=need_states)
            if s.layers is None:
                vectors = out.pooler_output.float()
            else:
                states = out.hidden_states if need_states else (out.last_hidden_state,)
                layers = s.layers if need_states else (0,)
                vectors = pool(states, mask, layers, s.layer_combine, s.token_pooling)
            if s.normalize:
                vectors = torch.nn.functional.normalize(vectors, p=2, dim=1)
        return vectors

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> np.ndarray:
        """Encode one batch; on device out-of-memory halve it and retry, never dropping a row."""
        try:
            vectors = self._forward(input_ids, attention_mask)
        except torch.OutOfMemoryError:
            if len(input_ids) == 1:
                raise
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            self.oom_splits += 1
            half = len(input_ids) // 2
            log.warning("out of memory on a batch of %d rows; retrying as two halves", len(input_ids))
            return np.concatenate([
                self.encode(*_trim(input_ids[:half], attention_mask[:half])),
                self.encode(*_trim(input_ids[half:], attention_mask[half:])),
            ])
        return vectors.cpu().numpy()


def _trim(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop the padding columns no row of this (smaller) batch needs."""
    longest = int(attention_mask.sum(1).max())
    return input_ids[:, :longest], attention_mask[:, :longest]
