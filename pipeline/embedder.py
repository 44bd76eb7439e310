"""Embed units of work with one model: the same code in the local runner and in each Ray actor."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import pyarrow as pa

from .config import JobConfig
from .flow import FlowSettings, Preparer, Stats, Writer, run_stages
from .models import ModelSource
from .encoder import EncoderSettings
from .reader import Unit
from .storage import Store
from .writer import vectors_schema


@dataclass(frozen=True)
class EmbedPlan:
    """Everything a worker needs to embed units into the output folder (picklable)."""
    job: JobConfig
    source: ModelSource
    dtype: str
    id_type: str  # "int64" or "string"
    keep_schema: pa.Schema | None

    @property
    def width(self) -> int:
        return EncoderSettings.from_config(self.job.encode).width(self.source.hidden_size)

    def vectors_schema(self) -> pa.Schema:
        return vectors_schema(pa.type_for_alias(self.id_type), self.width,
                              self.job.output.vector_dtype, self.keep_schema)


class UnitEmbedder:
    """A loaded tokenizer and encoder; `embed` runs the three stages over a list of units."""

    def __init__(self, plan: EmbedPlan):
        from .batching import TextTokenizer
        from .encoder import Encoder

        job, self.plan = plan.job, plan
        self.tokenizer = TextTokenizer(plan.source.path, job.model.max_length or plan.source.max_length)
        self.encoder = Encoder(plan.source, job.model.device, plan.dtype,
                               EncoderSettings.from_config(job.encode), compile=job.model.compile,
                               attention=job.model.attention)
        on_cuda = self.encoder.device.type == "cuda"
        self.flow = FlowSettings(
            text_column=job.input.text_column, id_column=job.input.id_column,
            keep_columns=job.output.keep_columns, sort_window=job.encode.sort_window,
            batch_tokens=job.encode.token_budget(self.encoder.device.type),
            max_batch_size=job.encode.max_batch_size,
            pad_to_multiple_of=8 if on_cuda else 1, pin_memory=on_cuda)

    def embed(self, units: list[tuple[Unit, int]], duplicates: dict[str, set[int]],
              on_unit_done: Callable[[dict], None], progress: Callable[[int], None],
              stats: Stats) -> None:
        job = self.plan.job
        id_type = pa.type_for_alias(self.plan.id_type)
        preparer = Preparer(self.flow, self.tokenizer, duplicates, id_type, stats)
        writer = Writer(Store(job.output.path), self.plan.vectors_schema(),
                        job.output.rows_per_file, job.output.vector_dtype, stats, on_unit_done,
                        progress)
        run_stages(lambda channel: preparer.run(units, channel),
                   lambda batch: self.encoder.encode(batch.input_ids, batch.attention_mask),
                   writer.run, stats)
