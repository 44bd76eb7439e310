"""Rows that skip the model: stored vectors reused, and texts repeated within a run.

The prepare stage asks `ReusePlanner.plan` which of a sort window's texts need the model. A text
whose (id, text hash), or text hash alone (`encode.reuse = "content"`), has stored rows takes
those rows' vectors and columns (confirmed on the id and the whole hash; in a folder of one row
a token window, all of the text's windows, or none). A text that occurs more than once among the
rows to embed (registry.scan_input found them) takes its vector from its first row and its
repeats in the same unit copy it, through the unit's `RunMemory`: the first row's stored vector
where it has one (filled when planned), else its encoding (filled by the writer, in the order it
writes). Each unit starts with an empty memory, so its vectors depend on its own rows and the
stored folder only: a Ray actor writes the bits the local runner writes, and no unit waits for
another. (A text repeated in two units is encoded once in each.) Only the rest is tokenized
and encoded; the writer puts the three kinds back in input order (`merge_rows`). A reused row
keeps its stored index label (faiss_id) only under its own id; copies and rows taken from another
id carry NEW_LABEL, and the writer gives them new labels.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from ..io.content_hash import hash_bytes, hash_keys
from ..io.multivectors import row_arrays
from ..io.registry import ReuseSource, confirmed
from ..io.vectors import LABEL_COLUMN, to_matrix
from ..io.writer import NEW_LABEL

MEMORY_BYTES = 64 << 20  # vectors kept for texts repeated within a unit; past it they re-encode


@dataclass
class RunMemory:
    """A unit's repeated texts: those sent to the model (prepare's side, full hashes) and their
    rows once written (the writer's side). One a unit (`ReusePlanner.new_unit`), carried to the
    writer by each window's Assemble: a unit's vectors never depend on another unit's batches,
    so a unit embedded anywhere (a Ray actor) is the local runner's, bit for bit."""
    capacity: int
    sent: set = field(default_factory=set)
    rows: dict = field(default_factory=dict)  # hash bytes -> {column: the text's rows}


@dataclass
class Assemble:
    """A sort window's texts that did not go through the model, and what the writer must keep.
    Positions count the window's good texts (rows not rejected), in input order; a stored row
    list holds one row a text, or each text's windows in order."""
    ids: pa.Array  # every good text's id, in input order
    keep: pa.Table | None  # every good text's kept columns
    hashes: pa.Array  # every good text's hash
    donor_at: np.ndarray  # per stored row taken: the text it goes to
    donor: dict[str, np.ndarray]  # those stored rows' columns (vector, n_tokens, ...)
    copy_at: np.ndarray  # texts that repeat a text earlier in the unit
    cache_at: np.ndarray  # encoded texts that later texts repeat: kept in RunMemory
    columns: list[str]  # the stored columns besides id, text_hash and kept ones
    memory: RunMemory  # the unit's: what cache_at fills and copy_at reads
    texts: list[str] | None = None  # one row a window with the text kept: to slice each window's
    text_column: str | None = None


@dataclass
class RowPlan:
    encode: np.ndarray  # positions (of the good texts) that go through the model
    assemble: Assemble | None  # None: every text is encoded and none is remembered
    remember: list[bytes] = field(default_factory=list)  # hashes to mark sent once emitted


class ReusePlanner:
    def __init__(self, source: ReuseSource, memory: RunMemory, stored_columns: list[str],
                 copies: bool = True, text_column: str | None = None):
        """stored_columns: the vector parts' columns a reused row takes (vector, n_tokens, ...;
        chunk and spans in a folder of one row a window); copies: whether repeated texts are
        encoded once (not where a text may still be refused after tokenizing, as long_text =
        "reject" does); text_column: the kept text column, sliced per window."""
        self.source, self.memory, self.columns, self.copies = source, memory, stored_columns, copies
        self.windows = "chunk" in stored_columns
        self.text_column = text_column if self.windows else None

    def plan(self, ids: pa.Array, hashes: pa.Array, keep: pa.Table | None,
             texts: list[str]) -> RowPlan:
        n = len(ids)
        taken = np.zeros(n, bool)
        donor_at, donor = self._stored(ids, hashes)
        taken[donor_at] = True
        copy_at, cache_at, remember = [], [], []
        if self.copies and n:
            repeated = np.flatnonzero(self.source.is_repeated(hash_keys(hashes)))
            whole = hash_bytes(hashes) if len(repeated) else None
            pending: set = set()
            for position in repeated.tolist():  # in input order: a text's first row decides
                key = whole[position].tobytes()
                known = key in self.memory.sent or key in pending
                room = len(self.memory.sent) + len(pending) < self.memory.capacity
                if taken[position]:  # a stored row of its own: its later repeats copy it
                    if not known and room:
                        self.memory.sent.add(key)
                        self.memory.rows[key] = _donated(donor_at, donor, position)
                elif known:
                    copy_at.append(position)
                elif room:
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
            columns=self.columns, memory=self.memory, texts=texts if self.text_column else None,
            text_column=self.text_column))

    def _stored(self, ids: pa.Array, hashes: pa.Array) -> tuple[np.ndarray, dict]:
        """The stored rows of the texts that have them: per row, its text; their columns.
        Rows are confirmed one by one; a text takes one copy of each window (chunk 0 up, none
        missing), or nothing."""
        stored, none = self.source.stored, (np.zeros(0, np.int64), {})
        if stored is None or not len(stored) or not len(ids):
            return none
        owner, found = stored.find_all(ids, hashes)
        if not len(owner):
            return none
        rows = stored.fetch(found, ["id", "text_hash", *self.columns])
        at = pa.array(owner, pa.int64())
        ok = confirmed(rows, ids.take(at), hashes.take(at), self.source.mode != "content")
        owner, rows = owner[ok], rows.filter(pa.array(ok))
        chunk = (rows.column("chunk").to_numpy().astype(np.int64) if self.windows
                 else np.zeros(len(owner), np.int64))
        # a row keeps its label only under its own id (content reuse may take another id's row:
        # a new row, with a label of its own), so the text's own row is taken first
        at = pa.array(owner, pa.int64())
        same_id = confirmed(rows, ids.take(at), hashes.take(at), True)
        order = np.lexsort((~same_id, chunk, owner))
        owner, chunk = owner[order], chunk[order]
        first = np.ones(len(owner), bool)  # one copy of each (text, window)
        first[1:] = (owner[1:] != owner[:-1]) | (chunk[1:] != chunk[:-1])
        order, owner, chunk = order[first], owner[first], chunk[first]
        same_id = same_id[order]
        starts = np.flatnonzero(np.r_[True, owner[1:] != owner[:-1]]) if len(owner) else owner
        rank = np.arange(len(owner)) - np.repeat(starts, np.diff(np.r_[starts, len(owner)]))
        whole = ~np.isin(owner, owner[chunk != rank])  # windows 0..k-1, none missing
        order, owner, same_id = order[whole], owner[whole], same_id[whole]
        rows = rows.take(pa.array(order, pa.int64()))
        donor = {c: _values(rows.column(c)) for c in self.columns}
        if LABEL_COLUMN in donor:
            donor[LABEL_COLUMN] = np.where(same_id, donor[LABEL_COLUMN], NEW_LABEL)
        return owner, donor

    def new_unit(self) -> None:
        """A unit begins: its repeated texts are its own (the last unit's memory goes with the
        windows that still carry it)."""
        self.memory = RunMemory(self.memory.capacity)

    def sent(self, plan: RowPlan) -> None:
        """The plan's Assemble is on its way to the writer: its cached texts may be copied."""
        if plan.assemble is not None:
            plan.assemble.memory.sent.update(plan.remember)


def _donated(donor_at: np.ndarray, donor: dict[str, np.ndarray], position: int) -> dict:
    """A text's stored rows as its repeats copy them: under a new label (a copy is a new row)."""
    rows = {c: v[donor_at == position] for c, v in donor.items()}
    if LABEL_COLUMN in rows:
        rows[LABEL_COLUMN] = np.full(len(rows[LABEL_COLUMN]), NEW_LABEL, rows[LABEL_COLUMN].dtype)
    return rows


def _values(column: pa.ChunkedArray) -> np.ndarray:
    if pa.types.is_list(column.type) and pa.types.is_fixed_size_list(column.type.value_type):
        rows = np.empty(len(column), object)  # multi-vector rows: one [tokens, dim] array each
        rows[:] = row_arrays(column) if len(column) else []
        return rows
    if pa.types.is_fixed_size_list(column.type):
        return to_matrix(column)
    return column.combine_chunks().to_numpy(zero_copy_only=False)


@dataclass
class HeldRows:
    """An encoded window's rows waiting for its sort window's Assemble."""
    at: np.ndarray  # per row: its text's position among the sort window's good texts
    rows: dict[str, np.ndarray]


@dataclass
class Skipped:
    """What the texts that skipped the model add to the unit's counts."""
    texts: int = 0
    rows: int = 0
    reused: int = 0
    truncated: int = 0
    chunked: int = 0  # texts of more than one window


def merge_rows(held: list[HeldRows], plan: Assemble
               ) -> tuple[pa.Array, dict[str, np.ndarray], pa.Table | None, Skipped]:
    """Encoded, reused and copied rows of a sort window, in input order: (ids, columns incl.
    text_hash, kept columns, counts). Remembers the rows later windows will copy."""
    columns, memory = plan.columns, plan.memory
    encoded_at = np.concatenate([h.at for h in held]) if held else np.zeros(0, np.int64)
    encoded = {c: _stack([h.rows[c] for h in held]) for c in columns} if held else {}
    whole = hash_bytes(plan.hashes)
    if len(plan.cache_at) and len(encoded_at):
        order = np.argsort(encoded_at, kind="stable")
        low = np.searchsorted(encoded_at[order], plan.cache_at, "left")
        high = np.searchsorted(encoded_at[order], plan.cache_at, "right")
        for position, a, b in zip(plan.cache_at.tolist(), low.tolist(), high.tolist()):
            if b > a:  # else refused after tokenizing; its repeats are encoded anew
                memory.rows[whole[position].tobytes()] = {c: encoded[c][order[a:b]]
                                                          for c in columns}
    copies = []
    for position in plan.copy_at.tolist():
        rows = memory.rows.get(whole[position].tobytes())
        if rows is None:
            raise RuntimeError("internal: a repeated text's vector was not remembered")
        copies.append(rows)
    copy_at = np.repeat(plan.copy_at, [len(r[columns[0]]) for r in copies]).astype(np.int64)
    copied = {c: _stack([r[c] for r in copies]) for c in columns} if copies else {}
    sources = [(at, rows) for at, rows in ((encoded_at, encoded), (plan.donor_at, plan.donor),
                                           (copy_at, copied)) if len(at)]
    if not sources:  # every good text refused after tokenizing
        return plan.ids.slice(0, 0), {}, None, Skipped()
    at = np.concatenate([a for a, _ in sources])
    order = np.argsort(at, kind="stable")  # a text's rows stay in window order
    rows = {c: _stack([r[c] for _, r in sources])[order] for c in columns}
    where = pa.array(at[order], pa.int64())
    rows["text_hash"] = plan.hashes.take(where)
    keep = plan.keep.take(where) if plan.keep is not None else None
    if keep is not None and plan.texts is not None:  # each window's own slice of its text
        sliced = pa.array([plan.texts[t][a:b] for t, a, b in zip(
            at[order].tolist(), rows["char_start"].tolist(), rows["char_end"].tolist())],
            keep.schema.field(plan.text_column).type)
        keep = keep.set_column(keep.schema.get_field_index(plan.text_column),
                               plan.text_column, sliced)
    return plan.ids.take(where), rows, keep, _skipped(plan, copy_at, copied)


def _skipped(plan: Assemble, copy_at: np.ndarray, copied: dict) -> Skipped:
    skipped = Skipped(reused=len(np.unique(plan.donor_at)))
    for at, rows in ((plan.donor_at, plan.donor), (copy_at, copied)):
        if not len(at):
            continue
        first = np.r_[True, at[1:] != at[:-1]]  # a text's first row
        skipped.texts += int(first.sum())
        skipped.rows += len(at)
        skipped.truncated += int(rows["truncated"][first].sum())
        counts = np.diff(np.r_[np.flatnonzero(first), len(at)])
        skipped.chunked += int(((rows["n_chunks"][first] > 1) if "n_chunks" in rows
                                else counts > 1).sum())
    return skipped


def _stack(values: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(values) if values[0].ndim == 1 else np.vstack(values)
