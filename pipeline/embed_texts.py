"""Embed a list of texts exactly as a recorded run did (search queries, texts to classify).

The record is an output folder's manifest (its `config` and `vector_settings`): the model,
max_length, dtype, pooling and normalisation are taken from it, the model is found on this
machine with `resolve_model`, and the settings it would produce are compared with the record;
any difference (other weights, a dtype this device lacks) is refused rather than silently giving
vectors that do not match the stored ones.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)

from .config import ConfigError, JobConfig, config_from_dict, settings_differences, settings_hash
from .models import resolve_model


@dataclasses.dataclass(frozen=True)
class EmbeddingRecord:
    """What made a set of vectors: the job config and the resolved vector settings."""
    config: dict[str, Any]
    vector_settings: dict[str, Any]
    settings_hash: str

    @classmethod
    def from_manifest(cls, manifest: dict[str, Any], where: str = "manifest") -> "EmbeddingRecord":
        missing = [k for k in ("config", "vector_settings") if not manifest.get(k)]
        if missing:
            raise ConfigError(f"{where} records no {missing[0]}; was it written by embedpipe run?")
        settings = manifest["vector_settings"]
        return cls(manifest["config"], settings,
                   manifest.get("settings_hash") or settings_hash(settings))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class TextEmbedder:
    """Vectors for texts, made with a record's settings; the model loads on first use."""

    def __init__(self, record: EmbeddingRecord, device: str | None = None):
        from .encoder import resolve_device, resolve_dtype
        from .runner import vector_settings

        job = config_from_dict(record.config)
        # The dtype actually used (recorded resolved), not `auto`, which may resolve otherwise here.
        # The attention kernel is this machine's choice (kernels agree to float rounding), and a
        # few queries never repay compiling.
        model = dataclasses.replace(job.model, dtype=record.vector_settings.get(
            "model.dtype", job.model.dtype), device=device or job.model.device, attention="auto",
            compile=False)
        self.job: JobConfig = dataclasses.replace(job, model=model)
        self.source = resolve_model(model.name)  # ConfigError when the model is not here
        self.dtype = resolve_dtype(model.dtype, resolve_device(model.device))
        self.settings = vector_settings(self.job, self.source, self.dtype)
        differ = settings_differences(record.vector_settings, self.settings)
        if differ:
            raise ConfigError(
                "the vectors were made with other embedding settings than this machine would use "
                f"({'; '.join(differ)}); refusing to mix them")
        self.settings_hash = settings_hash(self.settings)
        self._tokenizer = None
        self._encoder = None

    @property
    def width(self) -> int:
        return self._load()[1].width

    def _load(self):
        if self._encoder is None:
            from .embedder import EmbedPlan, UnitEmbedder

            loaded = UnitEmbedder(EmbedPlan(self.job, self.source, self.dtype, "int64", None))
            self._tokenizer, self._encoder = loaded.tokenizer, loaded.encoder
        return self._tokenizer, self._encoder

    def embed(self, texts: list[str]) -> np.ndarray:
        """float32 [len(texts), width], rounded through the stored vector dtype like the run's."""
        from .batching import collate, plan_batches

        tokenizer, encoder = self._load()
        out = np.zeros((len(texts), encoder.width), np.float32)
        if not texts:
            return out
        tokens = tokenizer(list(texts))
        lengths = np.fromiter((len(x) for x in tokens.ids), np.int64, count=len(texts))
        enc = self.job.encode
        for positions in plan_batches(lengths, enc.token_budget(encoder.device.type),
                                      enc.max_batch_size):
            batch = collate(tokens.ids, positions, tokenizer.pad_id)
            out[positions] = encoder.encode(batch.input_ids, batch.attention_mask)
        vector_dtype = np.dtype(self.job.output.vector_dtype)
        return out.astype(vector_dtype).astype(np.float32) if vector_dtype != out.dtype else out


@dataclasses.dataclass(frozen=True)
class TextBatch:
    texts: list[str]
    ids: pa.Array  # the id column's values for these texts, else their row numbers (0-based)
    skipped: int  # rows left out because their text is null or blank


def read_text_batches(path: str, text_column: str = "text", id_column: str | None = "id",
                      batch_rows: int = 1024) -> Iterator[TextBatch]:
    """Texts (and ids) of a Parquet file or folder, batch_rows at a time; null or blank texts are
    left out and counted. The id column is used when present (an error only if asked for by a
    name other than the default and missing)."""
    from .reader import list_input_files, open_parquet

    fs, files = list_input_files(path)
    first_row = 0
    for file in files:
        parquet = open_parquet(fs, file)
        names = parquet.schema_arrow.names
        if text_column not in names:
            raise ConfigError(f"{file}: no text column {text_column!r}; it has: {', '.join(names)}")
        columns = [text_column] + ([id_column] if id_column and id_column in names else [])
        if id_column and id_column not in names and id_column != "id":
            raise ConfigError(f"{file}: no id column {id_column!r}; it has: {', '.join(names)}")
        for batch in parquet.iter_batches(batch_size=batch_rows, columns=columns):
            texts = batch.column(text_column).to_pylist()
            good = [i for i, t in enumerate(texts) if t is not None and t.strip()]
            picked = pa.array(good, pa.int64())
            ids = (batch.column(id_column).take(picked) if len(columns) > 1
                   else pa.compute.add(picked, pa.scalar(first_row, pa.int64())))
            yield TextBatch([texts[i] for i in good], ids, len(texts) - len(good))
            first_row += batch.num_rows
