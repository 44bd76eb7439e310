"""The prepare stage: units read, rejects sorted out, texts tokenized, sorted and cut into
padded batches within windows of `sort_window` rows (jobs/messages.py says what it sends)."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterable

import numpy as np
import pyarrow as pa

from ..config import JobConfig
from ..encode.batching import collate, plan_batches
from ..encode.chunking import TOO_LONG, ChunkPolicy, TokenWindows, cut_windows, too_long
from ..runtime.runtime import Runtime
from ..encode.token_output import TokenPolicy, token_rows
from ..encode.tokenizer import TextTokenizer, Tokenized, pair_too_long
from ..io.content_hash import text_hashes
from ..io.reader import Unit, read_unit
from ..io.rejects import plain_texts, reasons_for_window
from ..io.writer import rejects_schema
from .messages import (DONE, NO_ROWS, Channel, Stats, Stop, UnitEnd, UnitFailed, UnitStart,
                       Window)
from .reuse import ReusePlanner

# Token-level output: tokens a Window holds at most (one long text excepted), so the per-token
# vectors waiting for a Window's last batch stay under ~100 MB even 4 x 384 wide
TOKEN_WINDOW = 16_384


@dataclass
class FlowSettings:
    text_column: str
    id_column: str
    keep_columns: tuple[str, ...]
    sort_window: int
    batch_tokens: int
    max_batch_size: int
    pad_to_multiple_of: int
    pin_memory: bool
    text_pair_column: str | None = None

    @classmethod
    def for_job(cls, job: JobConfig, runtime: Runtime) -> "FlowSettings":
        return cls(text_column=job.input.text_column, id_column=job.input.id_column,
                   text_pair_column=job.input.text_pair_column,
                   keep_columns=job.output.keep_columns, sort_window=job.encode.sort_window,
                   batch_tokens=job.encode.token_budget(runtime.torch_device.type),
                   max_batch_size=job.encode.max_batch_size,
                   pad_to_multiple_of=runtime.pad_multiple, pin_memory=runtime.pin_memory)


class PrepareStage:
    """Reads units, sorts out rejects, tokenizes and cuts padded batches."""

    def __init__(self, settings: FlowSettings, tokenizer: TextTokenizer,
                 duplicates: dict[str, np.ndarray], id_type: pa.DataType, stats: Stats,
                 chunking: ChunkPolicy | None = None, token_policy: TokenPolicy | None = None,
                 planner: ReusePlanner | None = None, prompt: str = ""):
        """planner: rows whose vector is stored or repeats an earlier text skip the model;
        prompt: what the model sees before each text (part of its content hash)."""
        self.s, self.tokenizer, self.duplicates, self.id_type, self.stats = (
            settings, tokenizer, duplicates, id_type, stats)
        self.planner, self.prompt = planner, prompt
        self.token_policy = token_policy
        self.chunking = chunking if chunking is not None and chunking.mode != "truncate" else None

    def run(self, units: Iterable[tuple[Unit, int]], out: Channel) -> None:
        """out: a Channel, or anything with its `put` (the bench keeps the batches whole)."""
        for unit, unit_id in units:
            if unit.error:
                out.put(UnitFailed(unit, unit.error))
                continue
            out.put(UnitStart(unit, unit_id))
            if self.planner is not None:
                self.planner.new_unit()  # repeated texts are copied within a unit only
            started = time.perf_counter()
            try:
                rows = self._unit(unit, out)
            except Stop:
                raise
            except Exception as exc:  # a bad file fails its unit, not the run
                out.put(UnitFailed(unit, f"{type(exc).__name__}: {exc}", unit.num_rows))
                continue
            out.put(UnitEnd(unit, rows, time.perf_counter() - started))
        out.put(DONE)

    def _unit(self, unit: Unit, out: Channel) -> int:
        pair = [self.s.text_pair_column] if self.s.text_pair_column else []
        columns = list(dict.fromkeys([self.s.id_column, self.s.text_column, *pair,
                                      *self.s.keep_columns]))
        rows_in, pending, pending_rows = 0, [], 0
        tick = time.perf_counter()
        for batch, first_row in read_unit(unit, columns, min(self.s.sort_window, 65536)):
            pending.append((batch, first_row))
            pending_rows += batch.num_rows
            rows_in += batch.num_rows
            while pending_rows >= self.s.sort_window:
                window, pending, pending_rows = _take(pending, self.s.sort_window)
                self.stats.seconds["read"] += time.perf_counter() - tick
                self._window(unit, window, out)
                tick = time.perf_counter()
        self.stats.seconds["read"] += time.perf_counter() - tick
        if pending_rows:
            self._window(unit, pending, out)
        return rows_in

    def _window(self, unit: Unit, pieces: list[tuple[pa.RecordBatch, int]], out: Channel) -> None:
        tick = time.perf_counter()
        table = pa.Table.from_batches([b for b, _ in pieces]).combine_chunks()
        row_numbers = np.concatenate([np.arange(r, r + b.num_rows) for b, r in pieces])
        ids = table.column(self.s.id_column).chunk(0) if table.num_rows else pa.array([], self.id_type)
        if pa.types.is_integer(ids.type) != pa.types.is_integer(self.id_type):
            raise ValueError(f"id column {self.s.id_column!r} is {ids.type}, but this output "
                             f"folder holds {self.id_type} ids")
        ids = ids.cast(self.id_type)
        texts = plain_texts(table.column(self.s.text_column).combine_chunks())
        pairs = (plain_texts(table.column(self.s.text_pair_column).combine_chunks())
                 if self.s.text_pair_column else None)
        reasons = reasons_for_window(ids, texts, row_numbers, self.duplicates.get(unit.key, NO_ROWS),
                                     pairs)
        good = np.array([r is None for r in reasons], dtype=bool)
        keep_idx = np.flatnonzero(good)
        good_texts = texts.take(pa.array(keep_idx, pa.int64())).to_pylist()
        good_pairs = (None if pairs is None else
                      pairs.take(pa.array(keep_idx, pa.int64())).to_pylist())
        hashes = text_hashes(good_texts, good_pairs, self.prompt)
        plan = rows_at = None
        if self.planner is not None:
            at = pa.array(keep_idx, pa.int64())
            plan = self.planner.plan(ids.take(at), hashes, table.select(
                list(self.s.keep_columns)).take(at) if self.s.keep_columns else None, good_texts)
            if plan.assemble is not None:  # only the rest goes on: positions among good rows
                rows_at = plan.encode
                keep_idx, hashes = keep_idx[rows_at], hashes.take(pa.array(rows_at, pa.int64()))
                good_texts = [good_texts[i] for i in rows_at.tolist()]
                good_pairs = None if good_pairs is None else [good_pairs[i] for i in rows_at.tolist()]
        if self.token_policy is not None:  # the same ids, with offsets and word ids
            tokens = self.tokenizer.with_spans(good_texts)
        else:
            tokens = self.tokenizer(good_texts, good_pairs)
        # rows refused once tokenized: too long under long_text = "reject", pairs the pair
        # truncation cannot fit (each a reject; the unit's other rows go on)
        refused = np.zeros(len(keep_idx), bool)
        for reason, mask in (
                (TOO_LONG, too_long(self.tokenizer, tokens, self.chunking)
                 if self.chunking is not None and self.chunking.mode == "reject" else None),
                (pair_too_long(self.tokenizer.pair_truncation), tokens.unfit)):
            if mask is not None and mask.any():
                for i in keep_idx[mask & ~refused]:
                    reasons[i] = reason
                refused |= mask
        if refused.any():
            keep_idx = keep_idx[~refused]
            good_texts = [t for t, x in zip(good_texts, refused) if not x]
            hashes = hashes.filter(pa.array(~refused))
            rows_at = None if rows_at is None else rows_at[~refused]
            tokens = _subset(tokens, ~refused)
        bad = np.array([i for i, r in enumerate(reasons) if r is not None], np.int64)
        rejects = pa.table({
            "id": ids.take(pa.array(bad, pa.int64())),
            "input_file": pa.array([unit.path] * len(bad), pa.string()),
            "row_number": pa.array(row_numbers[bad], pa.int64()),
            "reason": pa.array([reasons[i] for i in bad], pa.string()),
        }, schema=rejects_schema(self.id_type))
        keep_idx = pa.array(keep_idx, pa.int64())
        keep = table.select(list(self.s.keep_columns)).take(keep_idx) if self.s.keep_columns else None
        ids = ids.take(keep_idx)
        if self.chunking is not None and self.chunking.mode == "chunk":
            self._chunked(ids, good_texts, tokens, keep, rejects, out, tick, hashes, rows_at)
        elif self.token_policy is not None:
            self._token_level(ids, good_texts, tokens, keep, rejects, out, tick, hashes)
        else:
            self._emit(Window(ids=ids, n_tokens=tokens.n_tokens, truncated=tokens.truncated,
                              keep=keep, rejects=rejects, n_batches=0, text_hash=hashes,
                              rows_at=rows_at), tokens.ids, tokens.type_ids, out, tick)
        if plan is not None and plan.assemble is not None:
            out.put(plan.assemble)
            self.planner.sent(plan)

    def _chunked(self, ids: pa.Array, texts: list[str], tokens: Tokenized, keep: pa.Table | None,
                 rejects: pa.Table, out: Channel, tick: float, hashes: pa.Array,
                 rows_at: np.ndarray | None) -> None:
        """Texts cut into windows, in groups of at most sort_window windows (so a window of long
        texts holds as many vectors as a window of short ones), each its own Window."""
        policy, fixed = self.chunking, self.tokenizer.n_fixed
        counts = np.cumsum(policy.n_windows(tokens, fixed))
        start = 0
        while True:
            # the texts whose windows fit in this group (at least one text)
            before = counts[start - 1] if start else 0
            end = max(start + 1, int(np.searchsorted(counts, before + self.s.sort_window, "right")))
            end = min(end, len(texts))
            rows = np.arange(start, end)
            part = _subset(tokens, rows)
            windows = cut_windows(self.tokenizer, texts[start:end], part, policy)
            part_keep = None if keep is None else keep.slice(start, end - start)
            if policy.rows and part_keep is not None:
                part_keep = _window_columns(part_keep, texts[start:end], windows,
                                            self.s.text_column)
            self._emit(Window(ids=ids.slice(start, end - start), n_tokens=part.n_tokens,
                              truncated=windows.truncated, keep=part_keep,
                              rejects=rejects if start == 0 else rejects.slice(0, 0),
                              n_batches=0, windows=windows,
                              text_hash=hashes.slice(start, end - start),
                              rows_at=None if rows_at is None else rows_at[start:end]),
                       windows.ids, None, out, tick)
            tick = time.perf_counter()
            start = end
            if start >= len(texts):
                break

    def _token_level(self, ids: pa.Array, texts: list[str], tokens: Tokenized,
                     keep: pa.Table | None, rejects: pa.Table, out: Channel, tick: float,
                     hashes: pa.Array) -> None:
        """Texts in groups of at most TOKEN_WINDOW tokens (at least one text), each its own
        Window: the writer holds a group's per-token vectors until its last batch is in, so
        memory stays flat whatever sort_window is."""
        counts = np.cumsum(np.fromiter(map(len, tokens.ids), np.int64, count=len(tokens.ids)))
        start = 0
        while start < len(texts):
            before = counts[start - 1] if start else 0
            end = max(start + 1, int(np.searchsorted(counts, before + TOKEN_WINDOW, "right")))
            end = min(end, len(texts))
            part = _subset(tokens, np.arange(start, end))
            rows = token_rows(texts[start:end], part.spans, self.token_policy)
            self._emit(Window(ids=ids.slice(start, end - start), n_tokens=part.n_tokens,
                              truncated=part.truncated,
                              keep=None if keep is None else keep.slice(start, end - start),
                              rejects=rejects if start == 0 else rejects.slice(0, 0),
                              n_batches=0, tokens=rows,
                              text_hash=hashes.slice(start, end - start)),
                       part.ids, None, out, tick)
            tick = time.perf_counter()
            start = end
        if not texts:  # a window of rejects only
            self._emit(Window(ids=ids, n_tokens=tokens.n_tokens, truncated=tokens.truncated,
                              keep=keep, rejects=rejects, n_batches=0, text_hash=hashes,
                              tokens=token_rows([], [], self.token_policy)), [], None, out, tick)

    def _emit(self, window: Window, ids: list[list[int]], type_ids, out: Channel,
              tick: float) -> None:
        """A window's token rows sorted into batches: the Window first, then its batches."""
        batches = plan_batches(np.fromiter(map(len, ids), np.int64, count=len(ids)),
                               self.s.batch_tokens, self.s.max_batch_size) if ids else []
        window.n_batches = len(batches)
        self.stats.seconds["tokenize"] += time.perf_counter() - tick
        out.put(window)
        for positions in batches:
            out.put(collate(ids, positions, self.tokenizer.pad_id, self.s.pad_to_multiple_of,
                            self.s.pin_memory, type_ids))


def _subset(tokens: Tokenized, rows: np.ndarray) -> Tokenized:
    """The tokenized texts at `rows` (positions or a boolean mask)."""
    positions = np.flatnonzero(rows) if rows.dtype == bool else rows
    return Tokenized(ids=[tokens.ids[i] for i in positions], n_tokens=tokens.n_tokens[positions],
                     truncated=tokens.truncated[positions],
                     type_ids=None if tokens.type_ids is None else
                     [tokens.type_ids[i] for i in positions],
                     spans=None if tokens.spans is None else [tokens.spans[i] for i in positions])


def _window_columns(keep: pa.Table, texts: list[str], windows: TokenWindows,
                    text_column: str) -> pa.Table:
    """Kept columns for one row a window: each text's values repeated on its windows, except
    the text itself, which becomes each window's own slice of it (a long text is not stored
    again on every window)."""
    owner = pa.array(windows.owner, pa.int64())
    columns = {}
    for name in keep.column_names:  # the whole text is never taken once a window
        columns[name] = (pa.array([texts[o][a:b] for o, a, b in zip(
            windows.owner, windows.char_start, windows.char_end)], keep.schema.field(name).type)
            if name == text_column else keep.column(name).take(owner))
    return pa.table(columns, schema=keep.schema)


def _take(pieces: list[tuple[pa.RecordBatch, int]], n: int):
    """Split the first n rows off a list of (batch, first row) pieces."""
    taken, rest, count = [], [], 0
    for batch, first in pieces:
        if count >= n:
            rest.append((batch, first))
            continue
        need = n - count
        taken.append((batch.slice(0, need), first))
        if batch.num_rows > need:
            rest.append((batch.slice(need), first + need))
        count += min(need, batch.num_rows)
    return taken, rest, sum(b.num_rows for b, _ in rest)
