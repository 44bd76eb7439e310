"""The int8 / uint8 ranges of a folder (`output.precision`), computed once, before its first run
embeds anything: an even sample of the run's input rows encoded as the run encodes them (pooled
windows with long_text = "chunk", output.dimensions), each dimension's min and max recorded in
the manifest. Every later run of the folder quantizes with those ranges, so nights compare."""
from __future__ import annotations

import numpy as np
import pyarrow as pa

from ..config import ConfigError
from ..encode.batching import encode_texts
from ..io.precision import CALIBRATION_ROWS, Calibration
from ..io.reader import Unit, read_unit
from ..io.rejects import row_reasons

READ_ROWS = 65_536


def even_positions(total: int, wanted: int) -> np.ndarray:
    """`wanted` row positions spread evenly over [0, total), first and last included."""
    if total <= wanted:
        return np.arange(total, dtype=np.int64)
    return np.unique(np.linspace(0, total - 1, wanted).round().astype(np.int64))


def sample_texts(units: list[Unit], text_column: str, id_column: str, pair_column: str | None,
                 rows: int = CALIBRATION_ROWS) -> tuple[list[str], list[str] | None]:
    """The texts (and pairs) at even positions over the units' rows, in input order, less the
    rows the run rejects on their own (null id, null or blank text)."""
    healthy = [u for u in units if not u.error]
    wanted = even_positions(sum(u.num_rows for u in healthy), rows)
    columns = [id_column, text_column] + ([pair_column] if pair_column else [])
    texts: list[str] = []
    pairs: list[str] | None = [] if pair_column else None
    start = 0
    for unit in healthy:
        for batch, _ in read_unit(unit, columns, READ_ROWS):
            inside = wanted[(wanted >= start) & (wanted < start + batch.num_rows)] - start
            start += batch.num_rows
            if not len(inside):
                continue
            picked = batch.take(pa.array(inside, pa.int64()))
            second = picked.column(2) if pair_column else None
            good = [r is None for r in row_reasons(picked.column(0), picked.column(1), second)]
            texts += [t for t, ok in zip(picked.column(1).to_pylist(), good) if ok]
            if pairs is not None:
                pairs += [t for t, ok in zip(second.to_pylist(), good) if ok]
    return texts, pairs


def calibrate(embedder, units: list[Unit], precision: str,
              rows: int = CALIBRATION_ROWS) -> Calibration:
    """The ranges of `precision` (the job's int8 / uint8 precision or rescore_precision) from
    an even sample of `units`' rows."""
    job = embedder.plan.job
    texts, pairs = sample_texts(units, job.input.text_column, job.input.id_column,
                                job.input.text_pair_column, rows)
    if len(texts) < 2:
        raise ConfigError(f"precision {precision!r} calibrates its ranges on "
                         f"the first run's rows; this input has {len(texts)} row(s) to embed")
    enc, chunking = job.encode, embedder.chunking
    vectors = encode_texts(embedder.tokenizer, embedder.encoder, texts,
                           enc.token_budget(embedder.encoder.device.type), enc.max_batch_size,
                           pairs, (chunking, bool(enc.normalize)) if chunking.pools else None)
    return Calibration.of(precision, vectors)
