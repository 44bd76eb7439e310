"""What the stages send each other (jobs/stages.py), and the bounded queue they send it on.

Per unit, in order: UnitStart, then for each sort window a Window followed by its Batches (the
encoder turns each into an Encoded) and, where rows skip the model, an Assemble (jobs/reuse.py);
then UnitEnd, or UnitFailed at any point. DONE ends the stream.
"""
from __future__ import annotations

import queue
import threading
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from ..encode.chunking import TokenWindows
from ..encode.token_output import TokenRows
from ..io.reader import Unit


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
