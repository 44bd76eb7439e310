"""Embed units of work with one model: the same code in the local runner and in each Ray actor."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import pyarrow as pa

from ..config import JobConfig
from ..encode.chunking import ChunkPolicy
from ..encode.encoder import EncoderSettings
from ..models.model_files import ModelSource
from ..encode.pooling import output_width
from ..runtime.runtime import Runtime
from ..encode.token_output import TokenPolicy
from ..io.precision import CALIBRATED, Calibration, Precision
from ..io.reader import Unit
from ..io.registry import ReuseSource
from ..io.multivectors import ROW_KEY, multivector_schema
from ..io.storage import Store
from ..io.writer import tokens_schema, vectors_schema
from .reuse import MEMORY_BYTES, ReusePlanner, RunMemory
from .messages import Stats
from .prepare import FlowSettings, PrepareStage
from .stages import run_stages
from .write import WriteStage


@dataclass(frozen=True)
class EmbedPlan:
    """Everything a worker needs to embed units into the output folder (picklable)."""
    job: JobConfig
    source: ModelSource
    runtime: Runtime
    id_type: str  # "int64" or "string"
    keep_schema: pa.Schema | None
    # output.precision or rescore_precision int8 / uint8: the folder's ranges
    calibration: Calibration | None = None

    @property
    def sparse(self) -> bool:
        """A sparse (SPLADE) folder: rows over the vocabulary (encode/sparse.py)."""
        return self.job.encode.sparse

    @property
    def multivector(self) -> bool:
        """A multi-vector (ColBERT) folder: each row's token vectors (encode/multivector.py)."""
        return self.job.encode.multivector

    @property
    def representations(self) -> tuple[str, ...]:
        """What each row is stored as: a BGE-M3 folder's asked heads (encode/m3_heads.py), a
        sparse folder's sparse rows, a multi-vector folder's token vectors, else dense."""
        if self.job.output.representations:
            return self.job.output.representations
        return ("sparse",) if self.sparse else ("multivector",) if self.multivector else \
            ("dense",)

    @property
    def multi_head(self) -> bool:
        """Rows from a BGE-M3 folder's heads beyond dense (encode/m3_heads.py)."""
        return bool(self.job.output.representations) and self.representations != ("dense",)

    @property
    def width(self) -> int:
        if self.multivector:
            return self.source.st.multivector.dim
        if self.sparse:
            return int(self.source.config.vocab_size)
        return EncoderSettings.for_job(self.job).width(self.source.hidden_size)

    @property
    def precision(self) -> Precision:
        return self._precision(self.job.output.precision)

    @property
    def rescore(self) -> Precision | None:
        """The rescore_vector column's precision (output.rescore_precision), if any."""
        name = self.job.output.rescore_precision
        return self._precision(name) if name else None

    def _precision(self, name: str) -> Precision:
        return Precision(name, self.calibration if name in CALIBRATED else None)

    def vectors_schema(self) -> pa.Schema:
        chunks = self.job.output.chunks if self.job.encode.long_text == "chunk" else None
        rescore = self.rescore
        # without dense, no vector column (a multi-vector row's vectors go to multivectors/)
        return vectors_schema(pa.type_for_alias(self.id_type), self.precision.width(self.width),
                              self.precision.storage, self.keep_schema, chunks,
                              None if rescore is None else (self.width, rescore.storage),
                              self.width if self.sparse else self._vocabulary(),
                              "dense" in self.representations)

    def _vocabulary(self) -> int | None:
        """A BGE-M3 folder's sparse rows' width: the body's vocabulary."""
        return int(self.source.config.vocab_size) if "sparse" in self.representations else None

    def multivectors_schema(self) -> pa.Schema | None:
        """The multivectors/ parts' schema (a multi-vector folder, or a BGE-M3 folder storing
        its colbert vectors), else None."""
        if "multivector" not in self.representations:
            return None
        dim = self.width if self.multivector else self._colbert_dim()
        return multivector_schema(pa.type_for_alias(self.id_type), dim, self.precision.storage)

    def _colbert_dim(self) -> int:
        from ..models.m3_folder import COLBERT_HEAD, load_head
        return int(load_head(self.source.m3, COLBERT_HEAD, self.source.hidden_size)[
            "weight"].shape[0])

    def tokens_schema(self) -> pa.Schema | None:
        """The token table's schema (output.granularity = subword | word), else None. Token
        vectors are the layers combined, as wide as the text vector before output.dimensions."""
        if TokenPolicy.for_job(self.job) is None:
            return None
        settings = EncoderSettings.for_job(self.job)
        width = output_width(self.source.hidden_size, settings.layers, settings.layer_combine)
        return tokens_schema(pa.type_for_alias(self.id_type), width, self.job.output.vector_dtype)

    @property
    def reusable(self) -> bool:
        """Whether rows can skip the model: reuse not switched off, and no token table (its
        rows would have to be carried too)."""
        return self.job.encode.reuse != "off" and self.job.output.granularity == "text"

    def stored_columns(self) -> list[str]:
        """The columns a reused row takes from its stored row: vector, n_tokens, ... (and a
        window's chunk and spans, in a folder of one row a window)."""
        own = {"id", "text_hash", *self.job.output.keep_columns}
        return [n for n in self.vectors_schema().names if n not in own] + (
            [ROW_KEY] if "multivector" in self.representations else [])


class UnitEmbedder:
    """A loaded tokenizer and encoder; `embed` runs the three stages over a list of units."""

    def __init__(self, plan: EmbedPlan):
        from ..encode.encoder import Encoder
        from ..encode.tokenizer import tokenizer_for

        job, runtime, self.plan = plan.job, plan.runtime, plan
        self.tokenizer = tokenizer_for(plan.source, runtime, job)
        self.chunking = ChunkPolicy.for_job(job, self.tokenizer)
        if plan.multi_head:
            from ..encode.m3_heads import M3Encoder
            self.encoder = M3Encoder(plan.source, runtime, plan.representations)
        elif plan.multivector:
            from ..encode.multivector import MultiVectorEncoder
            self.encoder = MultiVectorEncoder(plan.source, runtime, plan.source.st.multivector)
        elif plan.sparse:
            from ..encode.sparse import SparseEncoder, SparseSettings
            self.encoder = SparseEncoder(plan.source, runtime, SparseSettings.for_job(job))
        else:
            self.encoder = Encoder(plan.source, runtime,
                                   EncoderSettings.for_job(job, windows_pooled=self.chunking.pools))
        self.token_policy = TokenPolicy.for_job(job)
        self.encode = self.encoder.encode_batch
        if self.token_policy is not None:
            from ..encode.token_output import TokenEncoder
            self.encode = TokenEncoder(self.encoder)
        self.flow = FlowSettings.for_job(job, runtime)
        # the room for a unit's repeated texts (ReusePlanner starts a memory for each unit)
        # (a multi-vector row counted as 128 token vectors)
        self.memory = RunMemory(capacity=MEMORY_BYTES // (4 * plan.width * (
            128 if "multivector" in plan.representations else 1)))

    def embed(self, units: list[tuple[Unit, int]], duplicates: dict[str, set[int]],
              on_unit_done: Callable, progress: Callable[[int], None], stats: Stats,
              reuse: ReuseSource | None = None) -> None:
        job = self.plan.job
        id_type = pa.type_for_alias(self.plan.id_type)
        planner = None
        if reuse is not None and reuse.mode != "off" and self.plan.reusable:
            # a repeated text is copied only where a text cannot be refused once tokenized
            # (long_text = "reject" and only_second pairs may refuse it)
            copies = job.encode.long_text != "reject" and not (
                job.input.text_pair_column and job.input.pair_truncation == "only_second")
            planner = ReusePlanner(reuse, self.memory, self.plan.stored_columns(), copies=copies,
                                   text_column=job.input.text_column
                                   if job.input.text_column in job.output.keep_columns else None)
        preparer = PrepareStage(self.flow, self.tokenizer, duplicates, id_type, stats,
                                self.chunking, self.token_policy, planner,
                                prompt=job.encode.prompt or "")
        writer = WriteStage(Store(job.output.path), self.plan.vectors_schema(),
                            job.output.rows_per_file, self.plan.precision, stats, on_unit_done,
                            progress, normalize=self.chunking.pools and bool(job.encode.normalize),
                            token_schema=self.plan.tokens_schema(),
                            token_mean=self.token_policy is not None and self.token_policy.mean,
                            rescore=self.plan.rescore,
                            sparse=self.plan.sparse, multi_head=self.plan.multi_head,
                            multivectors=self.plan.multivectors_schema())
        run_stages(lambda channel: preparer.run(units, channel), self.encode,
                   writer.run, stats)
