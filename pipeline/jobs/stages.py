"""The three stages of embedding units, each on its own thread, joined by bounded queues.

    prepare (read -> reject -> tokenize -> sort -> batch)  ->  encode (model)  ->  write
    thread                                                     caller's thread     thread

Reading, tokenizing and writing hide behind the forward pass (the infinity pattern). Messages
flow one way; a unit's rows are sorted by token count inside a window of `sort_window` rows and
put back in input order by the writer before they are written.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import numpy as np
import pyarrow as pa

from ..config import JobConfig
from ..encode.batching import Batch, collate, plan_batches
from ..encode.chunking import (TOO_LONG, ChunkPolicy, TokenWindows, cut_windows, pool_windows,
                               too_long)
from ..runtime.runtime import Runtime
from ..encode.token_output import TokenPolicy, TokenRows, gather, token_rows
from ..encode.tokenizer import TextTokenizer, Tokenized, pair_too_long
from ..faults import checkpoint
from ..io.checks import check_file
from ..io.content_hash import text_hashes
from ..io.ledger import UnitRecord
from ..io.reader import Unit, read_unit
from ..io.rejects import plain_texts, reasons_for_window
from ..io.writer import TOKENS_DIR, UnitWriter, rejects_schema, write_rejects
from .reuse import Assemble, HeldRows, ReusePlanner, RunMemory, merge_rows

log = logging.getLogger(__name__)


@dataclass
class Stats:
    """Token counts and stage timings; each stage thread updates only its own fields.

    Row counts are not kept here: they come from the committed unit records, so a unit that
    fails half-way counts nowhere."""
    real_tokens: int = 0
    padded_tokens: int = 0
    seconds: Counter = field(default_factory=Counter)  # read, tokenize, encode, write, index

    def merge(self, other: "Stats") -> None:
        """Add another worker's counts (stage seconds then add up across workers)."""
        self.real_tokens += other.real_tokens
        self.padded_tokens += other.padded_tokens
        self.seconds.update(other.seconds)


@dataclass
class UnitStart:
    unit: Unit
    unit_id: int


@dataclass
class Window:
    """Rows of one unit that go through the model together, in input order."""
    ids: pa.Array
    n_tokens: np.ndarray
    truncated: np.ndarray
    keep: pa.Table | None
    rejects: pa.Table
    n_batches: int
    windows: TokenWindows | None = None  # long_text = "chunk": what goes through the model
    tokens: TokenRows | None = None  # output.granularity = subword | word: the token table's rows
    text_hash: pa.Array | None = None  # each text's content hash (io/content_hash.py)
    # when some rows of the sort window skip the model: where this Window's texts go among its
    # good rows; the writer holds them until the window's Assemble (jobs/reuse.py)
    rows_at: np.ndarray | None = None

    @property
    def n_vectors(self) -> int:
        """Vectors the model returns for this window: one a text, or one a token window."""
        return len(self.ids) if self.windows is None else len(self.windows.ids)


@dataclass
class Encoded:
    positions: np.ndarray
    vectors: np.ndarray
    tokens: list[np.ndarray] | None = None  # token-level output: each row's per-token vectors


@dataclass
class UnitEnd:
    unit: Unit
    rows_in: int
    seconds: float


@dataclass
class UnitFailed:
    unit: Unit
    error: str
    rows_in: int = 0  # its rows, when it failed once read (0: refused before reading)


class Stop(Exception):
    """Raised in a stage when another stage failed and the run is being torn down."""


class Channel:
    """A bounded queue whose waits give up when the run is stopping."""

    def __init__(self, stop: threading.Event, size: int):
        self.stop, self.queue = stop, queue.Queue(size)

    def put(self, item: Any) -> None:
        while True:
            if self.stop.is_set():
                raise Stop
            try:
                self.queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def get(self) -> Any:
        while True:
            if self.stop.is_set():
                raise Stop
            try:
                return self.queue.get(timeout=0.1)
            except queue.Empty:
                continue


DONE = object()
NO_ROWS = np.zeros(0, np.int64)
# Token-level output: tokens a Window holds at most (one long text excepted), so the per-token
# vectors waiting for a Window's last batch stay under ~100 MB even 4 x 384 wide
TOKEN_WINDOW = 16_384
STOP_SECONDS = 30  # how long an interrupted run waits for a stage to finish its current step


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

    def run(self, units: Iterable[tuple[Unit, int]], out: "Channel | BatchCollector") -> None:
        for unit, unit_id in units:
            if unit.error:
                out.put(UnitFailed(unit, unit.error))
                continue
            out.put(UnitStart(unit, unit_id))
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


class BatchCollector:
    """A PrepareStage's output kept whole, for encoding the runner's own batches elsewhere (the
    bench's encode-only contender): batch positions become row positions over all windows."""

    def __init__(self):
        self.batches: list[Batch] = []
        self.rows = 0  # rows embedded: the windows' rows, rejects left out
        self._window_start = 0

    def put(self, item: Any) -> None:
        if isinstance(item, Window):
            self._window_start = self.rows
            self.rows += len(item.ids)
        elif isinstance(item, Batch):
            item.positions = item.positions + self._window_start
            self.batches.append(item)
        elif isinstance(item, UnitFailed):
            raise RuntimeError(f"{item.unit.path}: {item.error}")


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


class WriteStage:
    """Puts each window back in input order, writes parts, commits units through on_unit_done."""

    def __init__(self, store, schema: pa.Schema, rows_per_file: int,
                 vector_dtype: str, stats: Stats, on_unit_done: Callable[[UnitRecord], None],
                 progress: Callable[[int], None], normalize: bool = False,
                 token_schema: pa.Schema | None = None, token_mean: bool = False,
                 memory: RunMemory | None = None):
        """normalize: L2-normalise texts' pooled windows (long_text = "chunk", chunks = "pool");
        token_schema: the token table's (output.granularity = subword | word), whose rows are
        their sub-tokens' mean when token_mean (word_pooling = "mean")."""
        self.token_schema, self.token_mean = token_schema, token_mean
        self.store, self.schema = store, schema
        self.rows_per_file, self.vector_dtype = rows_per_file, vector_dtype
        self.stats, self.on_unit_done, self.progress = stats, on_unit_done, progress
        self.normalize = normalize
        self.window_rows = "chunk" in schema.names  # one row a token window, not a text
        self.memory = memory if memory is not None else RunMemory(capacity=0)
        self.held: list[HeldRows] = []  # encoded rows waiting for their window's Assemble

    def run(self, inbox: Channel) -> None:
        writer: UnitWriter | None = None
        token_writer: UnitWriter | None = None
        window: Window | None = None
        unit_stats: Counter = Counter()
        rejects: list[pa.Table] = []
        vectors = token_states = None
        filled = 0
        while (item := inbox.get()) is not DONE:
            tick = time.perf_counter()
            if isinstance(item, UnitStart):
                unit_id = item.unit_id
                writer = UnitWriter(self.store, unit_id, self.schema, self.rows_per_file,
                                    self.vector_dtype)
                if self.token_schema is not None:
                    token_writer = UnitWriter(self.store, unit_id, self.token_schema,
                                              self.rows_per_file, self.vector_dtype, TOKENS_DIR)
                unit_stats, rejects = Counter(), []
            elif isinstance(item, Window):
                window, filled = item, 0
                vectors = None
                token_states = None if item.tokens is None else [None] * item.n_vectors
                rejects.append(item.rejects)
            elif isinstance(item, Assemble):
                self._assemble(writer, item, unit_stats)
            elif isinstance(item, Encoded):
                if vectors is None:
                    vectors = np.empty((window.n_vectors, item.vectors.shape[1]), np.float32)
                vectors[item.positions] = item.vectors
                if token_states is not None:
                    for position, states in zip(item.positions.tolist(), item.tokens):
                        token_states[position] = states
                filled += 1
            elif isinstance(item, UnitEnd):
                if self.held:
                    raise RuntimeError("internal: encoded rows left without their Assemble")
                files = writer.close()
                token_files = token_writer.close() if token_writer is not None else []
                reject_table = pa.concat_tables(rejects) if rejects else None
                reject_files = write_rejects(self.store, unit_id, reject_table) if reject_table else []
                reasons = Counter(reject_table.column("reason").to_pylist()) if reject_table else {}
                self.on_unit_done(UnitRecord.for_unit(
                    item.unit, "complete", unit_id=unit_id, rows_in=item.rows_in,
                    vectors_out=unit_stats["vectors"], rejects=sum(reasons.values()),
                    reject_reasons=dict(reasons), truncated=unit_stats["truncated"],
                    windows=unit_stats["windows"], chunked=unit_stats["chunked"],
                    reused=unit_stats["reused"], copied=unit_stats["copied"],
                    part_rows=unit_stats["rows"] if self.window_rows else None,
                    vector_files=files, reject_files=reject_files, token_files=token_files,
                    token_rows=unit_stats["token_rows"], seconds=round(item.seconds, 3),
                    checks={f: check_file(self.store, f, full=True)
                            for f in files + reject_files + token_files}))
                writer = token_writer = None
            elif isinstance(item, UnitFailed):
                for open_writer in (writer, token_writer):
                    if open_writer is not None:
                        open_writer.abort()
                writer = token_writer = None
                self.held = []
                self.on_unit_done(UnitRecord.for_unit(item.unit, "failed", error=item.error,
                                                      rows_in=item.rows_in))
            if window is not None and filled == window.n_batches:
                self._write_window(writer, window, vectors, unit_stats)
                if token_writer is not None:
                    self._write_tokens(token_writer, window, token_states, unit_stats)
                window = token_states = None
            self.stats.seconds["write"] += time.perf_counter() - tick

    def _write_window(self, writer: UnitWriter, window: Window, vectors, unit_stats: Counter) -> None:
        n, windows = len(window.ids), window.windows
        if not n:  # every text of the window rejected, or taken from stored rows
            self.progress(window.rejects.num_rows)
            return
        if windows is None:
            rows = {"vector": vectors, "n_tokens": window.n_tokens, "truncated": window.truncated}
        elif not self.window_rows:  # one row a text: its windows pooled
            rows = {"vector": pool_windows(vectors, windows.owner, windows.weights, self.normalize),
                    "n_tokens": window.n_tokens, "truncated": window.truncated,
                    "n_chunks": windows.n_chunks}
        else:  # one row a window
            rows = {"vector": vectors, "n_tokens": windows.weights.astype(np.int32),
                    "truncated": window.truncated[windows.owner], "chunk": windows.chunk,
                    "token_start": windows.token_start, "token_end": windows.token_end,
                    "char_start": windows.char_start, "char_end": windows.char_end}
        owner = pa.array(windows.owner, pa.int64()) if self.window_rows else None
        ids = window.ids.take(owner) if self.window_rows else window.ids
        rows["text_hash"] = window.text_hash.take(owner) if self.window_rows else window.text_hash
        if window.rows_at is not None:  # written with the window's reused rows
            if len(ids):  # each row's text, among the sort window's good texts
                self.held.append(HeldRows(window.rows_at[windows.owner] if self.window_rows
                                          else window.rows_at, rows))
        elif len(ids):
            writer.write(ids, rows, window.keep)
        unit_stats["vectors"] += n
        unit_stats["rows"] += len(ids)
        unit_stats["truncated"] += int(window.truncated.sum())
        if windows is not None:
            unit_stats["windows"] += len(windows.ids)
            unit_stats["chunked"] += int((windows.n_chunks > 1).sum())
        self.progress(n + window.rejects.num_rows)

    def _assemble(self, writer: UnitWriter, plan: Assemble, unit_stats: Counter) -> None:
        """A sort window's encoded rows (held) with its reused and copied rows, in input order."""
        ids, rows, keep, skipped = merge_rows(self.held, plan, self.memory)
        self.held = []
        if len(ids):
            writer.write(ids, rows, keep)
        checkpoint("reuse")  # reused rows written into the unit's open part
        unit_stats["vectors"] += skipped.texts
        unit_stats["rows"] += skipped.rows
        unit_stats["truncated"] += skipped.truncated
        unit_stats["chunked"] += skipped.chunked
        unit_stats["reused"] += skipped.reused
        unit_stats["copied"] += skipped.texts - skipped.reused
        self.progress(skipped.texts)

    def _write_tokens(self, writer: UnitWriter, window: Window, states: list[np.ndarray],
                      unit_stats: Counter) -> None:
        """The window's token-table rows, in input order, written before the next window's."""
        rows = window.tokens
        if not len(rows):
            return
        columns = {"vector": gather(states, rows, self.token_mean), "position": rows.position,
                   "token": rows.token, "char_start": rows.char_start, "char_end": rows.char_end}
        writer.write(window.ids.take(pa.array(rows.owner, pa.int64())), columns)
        unit_stats["token_rows"] += len(rows)


def encode_loop(inbox: Channel, outbox: Channel, encode: Callable[[Batch], np.ndarray],
                stats: Stats) -> None:
    """The model's stage: batches in, vectors out; every other message passes straight through."""
    while (item := inbox.get()) is not DONE:
        if isinstance(item, Batch):
            tick = time.perf_counter()
            vectors = encode(item)
            tokens = None
            if isinstance(vectors, tuple):  # token-level output: (vectors, per-token vectors)
                vectors, tokens = vectors
            stats.seconds["encode"] += time.perf_counter() - tick
            stats.real_tokens += item.real_tokens
            stats.padded_tokens += item.padded_tokens
            outbox.put(Encoded(item.positions, vectors, tokens))
            checkpoint("encode")
        else:
            outbox.put(item)
    outbox.put(DONE)


def run_stages(prepare: Callable[[Channel], None], encode: Callable[[Batch], np.ndarray],
               write: Callable[[Channel], None], stats: Stats, depth: int = 16) -> None:
    """Run prepare and write on threads and the encoder here; the first error stops all three."""
    stop = threading.Event()
    to_encoder, to_writer = Channel(stop, depth), Channel(stop, depth)
    errors: list[BaseException] = []

    def guarded(target: Callable[[], None]) -> Callable[[], None]:
        def body() -> None:
            try:
                target()
            except Stop:
                pass
            except BaseException as exc:  # carried to the caller's thread
                errors.append(exc)
                stop.set()
        return body

    threads = [threading.Thread(target=guarded(lambda: prepare(to_encoder)), name="prepare", daemon=True),
               threading.Thread(target=guarded(lambda: write(to_writer)), name="write", daemon=True)]
    for thread in threads:
        thread.start()
    try:
        guarded(lambda: encode_loop(to_encoder, to_writer, encode, stats))()
        for thread in threads:
            while thread.is_alive():
                thread.join(0.1)
                if errors:
                    stop.set()
    except BaseException:  # a signal (Ctrl-C, SIGTERM) while waiting: stop the stages first
        stop.set()
        for thread in threads:
            thread.join(STOP_SECONDS)
        raise
    if errors:
        raise errors[0]
