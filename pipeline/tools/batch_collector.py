"""The runner's own batches kept whole, for the bench's encode-only contender (tools/bench.py)."""
from __future__ import annotations

from typing import Any

from ..encode.batching import Batch
from ..jobs.messages import UnitFailed, Window


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
