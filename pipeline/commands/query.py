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
import pyarrow.compute as pc

from ..config import ConfigError, JobConfig, config_from_dict, settings_differences, settings_hash
from ..io.manifest import Manifest
from ..models.model_files import resolve_model
from ..models.recipe import resolve_recipe
from ..runtime.runtime import resolve_runtime, vector_settings
from ..io.reader import list_input_files, open_parquet
from ..io.rejects import blank_texts, readable_texts


@dataclasses.dataclass(frozen=True)
class EmbeddingRecord:
    """What made a set of vectors: the job config and the resolved vector settings."""
    config: dict[str, Any]
    vector_settings: dict[str, Any]
    settings_hash: str

    @classmethod
    def from_manifest(cls, manifest: Manifest, where: str = "manifest") -> "EmbeddingRecord":
        missing = [k for k, v in (("config", manifest.config),
                                  ("vector_settings", manifest.vector_settings)) if not v]
        if missing:
            raise ConfigError(f"{where} records no {missing[0]}; was it written by embedpipe run?")
        settings = manifest.vector_settings
        return cls(manifest.config, settings, manifest.settings_hash or settings_hash(settings))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def columns(self, text_column: str | None, id_column: str | None,
                pair_column: str | None = None) -> "TextColumns":
        """The columns to read new texts from: those given, else those the recorded job read
        (a job that embedded sentence pairs needs its pairs' second texts too)."""
        recorded = self.config.get("input", {})
        return TextColumns(text_column or recorded.get("text_column", "text"),
                           id_column or recorded.get("id_column", "id"),
                           id_required=id_column is not None,
                           defaulted=[name for name, given in (("text", text_column),
                                                               ("id", id_column)) if not given],
                           pair=pair_column or recorded.get("text_pair_column"))


@dataclasses.dataclass(frozen=True)
class TextColumns:
    text: str
    id: str
    id_required: bool  # given by the user: its absence is an error, not row numbers
    defaulted: list[str]  # which of the two came from the recorded job
    pair: str | None = None  # the second text of each pair, when the job embedded pairs

    def describe(self) -> str:
        return (f"text column {self.text!r}"
                + (f", pair column {self.pair!r}" if self.pair else "")
                + f", ids from {self.id!r} (else row numbers)"
                + (f"; {' and '.join(self.defaulted)} as the folder's job read them"
                   if self.defaulted else ""))


class TextEmbedder:
    """Vectors for texts, made with a record's settings; the model loads on first use."""

    def __init__(self, record: EmbeddingRecord, device: str | None = None,
                 purpose: str = "document"):
        """purpose: "query" puts the recorded query prompt before each text (search), "document"
        the run's own prompt (texts to classify, embedded as the stored vectors were)."""
        job = config_from_dict(record.config)
        # The dtype actually used (recorded resolved), not `auto`, which may resolve otherwise here.
        # The attention kernel is this machine's choice (kernels agree to float rounding), and a
        # few queries never repay compiling.
        model = dataclasses.replace(job.model, dtype=record.vector_settings.get(
            "model.dtype", job.model.dtype), device=device or job.model.device, attention="auto",
            compile=False)
        self.source = resolve_model(model.name)  # ConfigError when the model is not here
        self.job: JobConfig = resolve_recipe(dataclasses.replace(job, model=model), self.source)[0]
        self.prompt = self.job.encode.query_prompt if purpose == "query" else None
        # Documents of a chunked folder are embedded window by window and pooled, as the run
        # pooled them (or as train-head --pool pooled its window rows); queries are truncated.
        self.pools = purpose == "document" and self.job.encode.long_text == "chunk"
        self.runtime = resolve_runtime(model, self.source)  # no input rows: never compiled
        self.settings = vector_settings(self.job, self.source, self.runtime)
        differ = settings_differences(record.vector_settings, self.settings)
        if differ:
            raise ConfigError(
                "the vectors were made with other embedding settings than this machine would use "
                f"({'; '.join(differ)}); refusing to mix them")
        self.settings_hash = settings_hash(self.settings)
        self._loaded = None

    @property
    def width(self) -> int:
        return self._load()[1].width

    def _load(self):
        if self._loaded is None:
            from ..encode.encoder import Encoder, EncoderSettings
            from ..encode.tokenizer import tokenizer_for

            from ..encode.chunking import ChunkPolicy

            tokenizer = tokenizer_for(self.source, self.runtime, self.job, self.prompt)
            self.chunking = ChunkPolicy.for_job(self.job, tokenizer) if self.pools else None
            settings = EncoderSettings.for_job(
                self.job, windows_pooled=self.chunking is not None and self.chunking.pools)
            self._loaded = (tokenizer, Encoder(self.source, self.runtime, settings))
        return self._loaded

    def embed(self, texts: list[str], pairs: list[str] | None = None) -> np.ndarray:
        """float32 [len(texts), width], rounded through the stored vector dtype like the run's.
        pairs: the second texts, for vectors made from sentence pairs (required there)."""
        from ..encode.batching import encode_texts

        if (pairs is None) != (self.job.input.text_pair_column is None):
            raise ConfigError(
                "the vectors were made from sentence pairs (input.text_pair_column); give the "
                "pairs' second texts (--queries FILE with --text-pair-column)"
                if pairs is None else "the vectors were made from single texts, not pairs")
        tokenizer, encoder = self._load()
        enc = self.job.encode
        out = encode_texts(tokenizer, encoder, texts, enc.token_budget(encoder.device.type),
                           enc.max_batch_size, pairs,
                           (self.chunking, bool(enc.normalize)) if self.pools else None)
        vector_dtype = np.dtype(self.job.output.vector_dtype)
        return out.astype(vector_dtype).astype(np.float32) if vector_dtype != out.dtype else out


@dataclasses.dataclass(frozen=True)
class TextBatch:
    texts: list[str]
    ids: pa.Array  # the id column's values for these texts, else their row numbers (0-based)
    skipped: int  # rows left out because their text (or pair text) is null or blank
    pairs: list[str] | None = None  # the second texts, when reading sentence pairs


def read_text_batches(path: str, columns: TextColumns, batch_rows: int = 1024) -> Iterator[TextBatch]:
    """Texts (and ids) of a Parquet file or folder, batch_rows at a time; null, blank or non-UTF-8
    texts are left out and counted. The id column is used when present (an error only when the
    user named it and it is missing)."""
    text_column, id_column = columns.text, columns.id
    fs, files = list_input_files(path)
    first_row = 0
    for file in files:
        parquet = open_parquet(fs, file)
        names = parquet.schema_arrow.names
        for column in [text_column] + ([columns.pair] if columns.pair else []):
            if column not in names:
                raise ConfigError(f"{file}: no text column {column!r}; it has: {', '.join(names)}")
        read = [text_column] + ([id_column] if id_column in names else [])
        read += [columns.pair] if columns.pair else []
        if id_column not in names and columns.id_required:
            raise ConfigError(f"{file}: no id column {id_column!r}; it has: {', '.join(names)}")
        for batch in parquet.iter_batches(batch_size=batch_rows, columns=read):
            texts = readable_texts(batch.column(text_column))
            good = pc.and_(texts.is_valid(), pc.invert(blank_texts(texts)))
            pairs = readable_texts(batch.column(columns.pair)) if columns.pair else None
            if pairs is not None:
                good = pc.and_(good, pc.and_(pairs.is_valid(), pc.invert(blank_texts(pairs))))
            picked = pa.array(np.flatnonzero(good.to_numpy(zero_copy_only=False)), pa.int64())
            ids = (batch.column(id_column).take(picked) if id_column in read
                   else pc.add(picked, pa.scalar(first_row, pa.int64())))
            yield TextBatch(texts.take(picked).to_pylist(), ids, len(texts) - len(picked),
                            None if pairs is None else pairs.take(picked).to_pylist())
            first_row += batch.num_rows
