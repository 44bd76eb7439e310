"""Rows that skip the model: stored vectors reused, and texts repeated within a run.

The prepare stage asks `ReusePlanner.plan` which of a sort window's rows need the model. A row
whose (id, text hash), or text hash alone (`encode.reuse = "content"`), has a stored row takes
that row's vector and columns (confirmed on the id and the whole hash). A text that occurs more
than once among the rows to embed (registry.scan_input found them) is encoded the first time
and copied after, through `RunMemory`, which the writer fills in the order it writes. Only the
rest is tokenized and encoded; the writer puts the three kinds back in input order
(`merge_rows`).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from ..io.content_hash import hash_bytes, hash_keys
from ..io.registry import ReuseSource, confirmed
from ..io.vectors import to_matrix

MEMORY_BYTES = 64 << 20  # vectors kept for texts repeated within the run; past it they re-encode


@dataclass
class RunMemory:
    """A worker's repeated texts: those it has sent to the model (prepare's side, full hashes)
    and their rows once written (the writer's side). Lives as long as the worker's encoder."""
    capacity: int
    sent: set = field(default_factory=set)
    rows: dict = field(default_factory=dict)  # hash bytes -> {column: value}


@dataclass
class Assemble:
    """A sort window's rows that did not go through the model, and what the writer must keep.
    Positions count the window's good rows (rows not rejected), in input order."""
    ids: pa.Array  # every good row's id, in input order
    keep: pa.Table | None  # every good row's kept columns
    hashes: pa.Array  # every good row's text hash
    donor_at: np.ndarray  # rows that take a stored row
    donor: dict[str, np.ndarray]  # those stored rows' columns (vector, n_tokens, ...)
    copy_at: np.ndarray  # rows that repeat a text this worker encoded before
    cache_at: np.ndarray  # encoded rows whose text later rows repeat: kept in RunMemory
    columns: list[str]  # the stored columns besides id, text_hash and kept ones


@dataclass
class RowPlan:
    encode: np.ndarray  # positions (of the good rows) that go through the model
    assemble: Assemble | None  # None: every row is encoded and none is remembered
    remember: list[bytes] = field(default_factory=list)  # hashes to mark sent once emitted


class ReusePlanner:
    def __init__(self, source: ReuseSource, memory: RunMemory, stored_columns: list[str],
                 copies: bool = True):
        """stored_columns: the vector parts' columns a reused row takes (vector, n_tokens, ...);
        copies: whether repeated texts are encoded once (not where a text may still be refused
        after tokenizing, as long_text = "reject" does)."""
        self.source, self.memory, self.columns, self.copies = source, memory, stored_columns, copies

    def plan(self, ids: pa.Array, hashes: pa.Array, keep: pa.Table | None) -> RowPlan:
        n = len(ids)
        taken = np.zeros(n, bool)
        donor_at = np.zeros(0, np.int64)
        donor: dict[str, np.ndarray] = {}
        stored = self.source.stored
        if stored is not None and len(stored) and n:
            found = stored.find(ids, hashes)
            hit = np.flatnonzero(found >= 0)
            if len(hit):
                rows = stored.fetch(found[hit], ["id", "text_hash", *self.columns])
                at = pa.array(hit, pa.int64())
                ok = confirmed(rows, ids.take(at), hashes.take(at), self.source.mode != "content")
                donor_at = hit[ok]
                rows = rows.filter(pa.array(ok))
                donor = {c: _values(rows.column(c)) for c in self.columns}
                taken[donor_at] = True
        copy_at, cache_at, remember = [], [], []
        if self.copies and n:
            candidates = np.flatnonzero(~taken)
            candidates = candidates[self.source.is_repeated(hash_keys(hashes)[candidates])]
            if len(candidates):
                whole = hash_bytes(hashes)
                pending: set = set()
                for position in candidates.tolist():
                    key = whole[position].tobytes()
                    if key in self.memory.sent or key in pending:
                        copy_at.append(position)
                    elif len(self.memory.sent) + len(pending) < self.memory.capacity:
                        pending.add(key)
                        cache_at.append(position)
                        remember.append(key)
                taken[copy_at] = True
        encode = np.flatnonzero(~taken)
        if not (len(donor_at) or copy_at or cache_at):
            return RowPlan(encode=encode, assemble=None)
        return RowPlan(encode=encode, remember=remember, assemble=Assemble(
            ids=ids, keep=keep, hashes=hashes, donor_at=donor_at, donor=donor,
            copy_at=np.array(copy_at, np.int64), cache_at=np.array(cache_at, np.int64),
            columns=self.columns))

    def sent(self, plan: RowPlan) -> None:
        """The plan's Assemble is on its way to the writer: its cached texts may be copied."""
        self.memory.sent.update(plan.remember)


def _values(column: pa.ChunkedArray) -> np.ndarray:
    if pa.types.is_fixed_size_list(column.type):
        return to_matrix(column)
    return column.combine_chunks().to_numpy(zero_copy_only=False)


@dataclass
class HeldRows:
    """An encoded window's rows waiting for its sort window's Assemble."""
    at: np.ndarray  # positions among the sort window's good rows
    rows: dict[str, np.ndarray]


def merge_rows(held: list[HeldRows], plan: Assemble, memory: RunMemory
               ) -> tuple[pa.Array, dict[str, np.ndarray], pa.Table | None, dict[str, np.ndarray]]:
    """Encoded, reused and copied rows of a sort window, in input order: (ids, columns incl.
    text_hash, kept columns, the columns of the rows that skipped the model). Remembers the
    rows later windows will copy."""
    columns = plan.columns
    encoded_at = np.concatenate([h.at for h in held]) if held else np.zeros(0, np.int64)
    encoded = {c: _stack([h.rows[c] for h in held]) for c in columns} if held else {}
    whole = hash_bytes(plan.hashes)
    if len(plan.cache_at):
        index = {p: i for i, p in enumerate(encoded_at.tolist())}
        for position in plan.cache_at.tolist():
            i = index.get(position)
            if i is not None:
                memory.rows[whole[position].tobytes()] = {c: encoded[c][i] for c in columns}
    copies = []
    for position in plan.copy_at.tolist():
        row = memory.rows.get(whole[position].tobytes())
        if row is None:
            raise RuntimeError("internal: a repeated text's vector was not remembered")
        copies.append(row)
    copied = {c: np.stack([r[c] for r in copies]) for c in columns} if copies else {}
    sources = [(at, rows) for at, rows in ((encoded_at, encoded), (plan.donor_at, plan.donor),
                                           (plan.copy_at, copied)) if len(at)]
    skipped = {c: _stack([rows[c] for at, rows in sources[1 if len(encoded_at) else 0:]])
               for c in columns} if len(sources) > (1 if len(encoded_at) else 0) else {}
    if not sources:
        return plan.ids.slice(0, 0), {}, None, {}
    at = np.concatenate([a for a, _ in sources])
    order = np.argsort(at, kind="stable")
    rows = {c: _stack([r[c] for _, r in sources])[order] for c in columns}
    where = pa.array(at[order], pa.int64())
    rows["text_hash"] = plan.hashes.take(where)
    keep = plan.keep.take(where) if plan.keep is not None else None
    return plan.ids.take(where), rows, keep, skipped


def _stack(values: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(values) if values[0].ndim == 1 else np.vstack(values)
