"""Id and content lookups that scale: numpy arrays of 64-bit keys, never a Python object a row.

Two registries, both rebuilt from the folder and the input at the start of a run:

- `scan_input` finds, before any unit is embedded, the rows whose id an earlier row (or the
  folder) already holds (the duplicate-id rule of rejects.py), the texts that occur more than
  once among the rows to embed (so each is encoded once), and how many stored ids the input no
  longer has. It holds 8-byte id keys and 4-byte row offsets a row, then sorts: at most ~28
  bytes a row at its peak, freed before embedding starts.
- `StoredRows` says where a stored vector for a (id, text hash), or a text hash alone, lies in
  the folder's parts: sorted uint64 keys and packed (part, row) locations, 16 bytes a stored
  row (32 while it is being sorted). A hit is confirmed on the row itself (the id and all 16
  bytes of its hash) when it is fetched, so a key collision can only cost an encode.
"""
from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .checks import PAGE_CHECKSUMS, reading
from .content_hash import hash_bytes, hash_keys, id_keys, pair_keys, text_hashes
from .reader import Unit, read_unit
from .rejects import plain_texts, row_reasons
from .storage import Store
from .multivectors import MULTIVECTOR_COLUMN, ROW_KEY, multivector_files
from .vectors import LABEL_COLUMN
from .writer import NEW_LABEL

log = logging.getLogger(__name__)

REUSE_MODES = ("id+content", "content", "off")
_ROW_BITS = 40  # a location is (part number << 40) | row in the part
_ROW_MASK = np.uint64((1 << _ROW_BITS) - 1)
SCAN_ROWS = 65_536


@dataclass
class InputScan:
    duplicates: dict[str, np.ndarray]  # unit key -> sorted row numbers: "duplicate id"
    repeated: np.ndarray  # sorted uint64 text keys occurring more than once among valid rows
    ids_gone: int = 0  # ids stored in the `gone` parts that no input row (nor kept part) has
    rows_scanned: int = 0
    key_bytes: int = 0  # the scan's largest array allocation, for the memory-per-id check


def _parquet(store: Store, name: str) -> pq.ParquetFile:
    """A stored part, read natively from a local disk (no Python buffers a column chunk), its
    pages' checksums verified on every read."""
    return pq.ParquetFile(store.open_input(name), **PAGE_CHECKSUMS)


def _part_ids(store: Store | None, files: list[str]) -> Iterator[pa.Array]:
    for name in files:
        with reading(name):
            for batch in _parquet(store, name).iter_batches(SCAN_ROWS, columns=["id"]):
                yield batch.column(0)


@dataclass
class _UnitRows:
    unit: Unit
    start: int  # position of the unit's first valid row among all keys
    offsets: np.ndarray  # uint32: row - unit.first_row of each valid row


def valid_rows(unit: Unit, columns: list[str], pair: bool) -> Iterator[tuple[pa.Array, np.ndarray, pa.Array, pa.Array | None]]:
    """(ids, row numbers, texts, pairs) of the rows that pass the per-row reject rules."""
    for batch, first_row in read_unit(unit, columns, SCAN_ROWS):
        ids, texts = batch.column(0), batch.column(1)
        pairs = batch.column(2) if pair else None
        reasons = row_reasons(ids, texts, pairs)
        good = np.fromiter((r is None for r in reasons), bool, count=len(reasons))
        take = pa.array(np.flatnonzero(good), pa.int64())
        yield (ids.take(take), first_row + np.flatnonzero(good),
               texts.take(take), pairs.take(take) if pairs is not None else None)


def scan_input(units: list[Unit], id_column: str, text_column: str, store: Store | None,
               kept_files: list[str], pair_column: str | None = None, prompt: str = "",
               gone_files: list[str] = ()) -> InputScan:
    """One pass over the units to embed (ids and texts) and the kept parts' ids.

    An id belongs to the first row, in input order, that has it and can be embedded; ids kept in
    the folder come before all of them. A unit that cannot be read to its end claims nothing
    (it fails later, when embedded)."""
    columns = [id_column, text_column] + ([pair_column] if pair_column else [])
    # One array each, allocated at its largest size (stored rows + input rows) and filled in
    # place: no list of pieces concatenated into a second copy.
    n_kept = sum(_parquet(store, f).metadata.num_rows for f in kept_files)
    room = n_kept + sum(u.num_rows for u in units if not u.error)
    keys = np.empty(room, np.uint64)
    text_keys = np.empty(room - n_kept, np.uint64)
    string_ids, position = False, 0
    for ids in _part_ids(store, kept_files):
        keys[position:position + len(ids)] = id_keys(ids)
        string_ids |= not pa.types.is_integer(ids.type)
        position += len(ids)
    scanned: list[_UnitRows] = []
    for unit in units:
        if unit.error:
            continue
        end, offsets = position, []
        try:
            for ids, rows, texts, pairs in valid_rows(unit, columns, pair_column is not None):
                keys[end:end + len(ids)] = id_keys(ids)
                string_ids |= not pa.types.is_integer(ids.type)
                offsets.append((rows - unit.first_row).astype(np.uint32))
                plain = plain_texts(texts).to_pylist()
                text_keys[end - n_kept:end - n_kept + len(ids)] = hash_keys(text_hashes(
                    plain, plain_texts(pairs).to_pylist() if pairs is not None else None, prompt))
                end += len(ids)
        except Exception:  # a unit that breaks mid-file fails when embedded; it claims nothing
            continue
        scanned.append(_UnitRows(unit, position, np.concatenate(offsets) if offsets
                                 else np.zeros(0, np.uint32)))
        position = end

    # texts seen more than once: sorted in place, no copy kept
    texts_sorted = text_keys[:position - n_kept]
    texts_sorted.sort()
    repeated = np.unique(texts_sorted[1:][texts_sorted[1:] == texts_sorted[:-1]])
    del texts_sorted, text_keys

    keys = keys[:position]  # a view: the unused tail is never touched
    order = np.argsort(keys, kind="stable")  # equal keys keep input order
    sorted_keys = keys[order]
    del keys
    key_bytes = order.nbytes + sorted_keys.nbytes + sum(s.offsets.nbytes for s in scanned)
    same = sorted_keys[1:] == sorted_keys[:-1]
    later = order[1:][same]  # positions whose key an earlier position has
    if string_ids and len(later):  # keys of string ids can collide: confirm on the ids
        later = _confirm_string_duplicates(np.unique(sorted_keys[1:][same]), scanned, columns,
                                           pair_column is not None, store, kept_files)
    duplicates = _by_unit(later, scanned)
    ids_gone = _count_gone(sorted_keys, store, list(gone_files))
    return InputScan(duplicates=duplicates, repeated=repeated, ids_gone=ids_gone,
                     rows_scanned=len(sorted_keys) - n_kept, key_bytes=key_bytes)


def _by_unit(positions: np.ndarray, scanned: list[_UnitRows]) -> dict[str, np.ndarray]:
    """Positions among all keys as row numbers per unit (positions of kept parts never repeat)."""
    duplicates = {s.unit.key: np.zeros(0, np.int64) for s in scanned}
    if not len(positions) or not scanned:
        return duplicates
    starts = np.array([s.start for s in scanned], np.int64)
    owner = np.searchsorted(starts, positions, "right") - 1
    for index in np.unique(owner):
        if index < 0:
            continue
        unit = scanned[index]
        at = positions[owner == index] - unit.start
        duplicates[unit.unit.key] = np.sort(unit.offsets[at].astype(np.int64) + unit.unit.first_row)
    return duplicates


def _confirm_string_duplicates(candidates: np.ndarray, scanned: list[_UnitRows], columns, pair: bool,
                               store: Store, kept_files: list[str]) -> np.ndarray:
    """Positions whose id an earlier position holds, decided on the ids themselves, for the
    few keys that repeat (read a second time: only their rows are kept)."""
    seen: set = set()
    later: list[int] = []
    position = 0
    for ids in _part_ids(store, kept_files):
        hit = np.flatnonzero(np.isin(id_keys(ids), candidates))
        seen.update(ids.take(pa.array(hit, pa.int64())).to_pylist())
        position += len(ids)
    for unit in scanned:
        position = unit.start
        for ids, _, _, _ in valid_rows(unit.unit, columns, pair):
            hit = np.flatnonzero(np.isin(id_keys(ids), candidates))
            for offset, value in zip(hit.tolist(), ids.take(pa.array(hit, pa.int64())).to_pylist()):
                if value in seen:
                    later.append(position + offset)
                else:
                    seen.add(value)
            position += len(ids)
    return np.array(later, np.int64)


def _count_gone(sorted_keys: np.ndarray, store: Store, gone_files: list[str]) -> int:
    """Ids of the parts being replaced that no input row or kept part has any more."""
    gone = 0
    for ids in _part_ids(store, gone_files):
        keys = id_keys(ids)
        at = np.searchsorted(sorted_keys, keys)
        found = (at < len(sorted_keys)) & (sorted_keys[np.minimum(at, len(sorted_keys) - 1)] == keys)
        gone += int((~found).sum()) if len(sorted_keys) else len(keys)
    return gone


class StoredRows:
    """Where the folder already holds a vector for a row: by (id, text hash) or by text hash.

    Built from the parts' `id` and `text_hash` columns (parts written before text hashes
    existed are skipped: nothing in them can be reused). Fetched rows are confirmed on their
    id (mode id+content) and their whole hash before they are used."""

    def __init__(self, store: Store, files: list[str], mode: str):
        self.store, self.mode = store, mode
        self.files: list[str] = []
        sizes = []
        for name in files:  # footers first, so the arrays are allocated once, at their size
            parquet = _parquet(store, name)
            if "text_hash" in parquet.schema_arrow.names:
                self.files.append(name)
                sizes.append(parquet.metadata.num_rows)
        keys = np.empty(sum(sizes), np.uint64)
        locs = np.empty(sum(sizes), np.uint64)
        filled = 0
        for number, name in enumerate(self.files):
            high = np.uint64(number) << np.uint64(_ROW_BITS)
            row = 0
            with reading(name):
                for batch in _parquet(store, name).iter_batches(SCAN_ROWS,
                                                                columns=["id", "text_hash"]):
                    end = filled + batch.num_rows
                    keys[filled:end] = self._keys(batch.column(0), hash_keys(batch.column(1)))
                    locs[filled:end] = high | np.arange(row, row + batch.num_rows,
                                                        dtype=np.uint64)
                    filled, row = end, row + batch.num_rows
        # any stored copy of a key will do (a hit is confirmed on its whole hash); quicksort
        # sorts the order in place, where a stable sort would take more memory
        order = np.argsort(keys)
        self.keys = keys[order]
        del keys
        self.locs = locs[order]
        del locs, order
        self._groups: dict[int, np.ndarray] = {}  # part number -> row group starts
        self._cache: OrderedDict = OrderedDict()  # (part, row group) -> table, a few recent

    @classmethod
    def from_arrays(cls, store: Store, files: list[str], mode: str, keys: np.ndarray,
                    locs: np.ndarray) -> "StoredRows":
        """A lookup of just these (key, location) pairs, numbered over `files` (a worker's
        share, found by jobs/partitioned_scan.py): it answers those keys as the whole would."""
        rows = cls.__new__(cls)
        rows.store, rows.mode, rows.files = store, mode, list(files)
        order = np.lexsort((locs, keys))
        rows.keys = keys[order].astype(np.uint64)
        rows.locs = locs[order].astype(np.uint64)
        rows._groups, rows._cache = {}, OrderedDict()
        return rows

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + self.locs.nbytes

    def _keys(self, ids: pa.Array, texts: np.ndarray) -> np.ndarray:
        return texts if self.mode == "content" else pair_keys(id_keys(ids), texts)

    def find_all(self, ids: pa.Array, hashes: pa.Array) -> tuple[np.ndarray, np.ndarray]:
        """Every stored row with a row's key (a text's windows, in a folder of one row a window):
        (row asked, location) pairs."""
        keys = self._keys(ids, hash_keys(hashes))
        if not len(self.keys) or not len(keys):
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        low = np.searchsorted(self.keys, keys, "left")
        counts = np.searchsorted(self.keys, keys, "right") - low
        owner = np.repeat(np.arange(len(keys)), counts)
        starts = np.repeat(low - np.concatenate([[0], np.cumsum(counts)[:-1]]), counts)
        locs = self.locs[starts + np.arange(len(owner))].astype(np.int64)
        order = np.lexsort((locs, owner))  # a key's stored rows by location: the same pick anywhere
        return owner[order], locs[order]

    def fetch(self, locations: np.ndarray, columns: list[str]) -> pa.Table:
        """The stored rows at these locations (as `find` gives them), in that order, read row
        group by row group with a small cache (a re-export reads its rows nearly in order)."""
        parts = (locations.astype(np.uint64) >> np.uint64(_ROW_BITS)).astype(np.int64)
        rows = (locations.astype(np.uint64) & _ROW_MASK).astype(np.int64)
        tables, where = [], []
        for part in np.unique(parts):
            mine = np.flatnonzero(parts == part)
            starts = self._row_groups(int(part))
            groups = np.searchsorted(starts, rows[mine], "right") - 1
            for group in np.unique(groups):
                inside = mine[groups == group]
                table = self._group(int(part), int(group), columns)
                tables.append(table.take(pa.array(rows[inside] - starts[group], pa.int64())))
                where.append(inside)
        if not tables:
            return pa.table({c: [] for c in columns})
        table = pa.concat_tables(tables)
        return table.take(pa.array(np.argsort(np.concatenate(where), kind="stable"), pa.int64()))

    def _multivectors(self, part: int, group: int, rows: int) -> pa.ChunkedArray:
        """The token vectors of a vector part's row group, from its multivectors/ part."""
        name = multivector_files([self.files[part]])[0]
        with reading(name):
            parquet = _parquet(self.store, name)
            # both parts were written batch for batch alike: the same row groups (else: sliced)
            meta = parquet.metadata
            sizes = [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]
            if sizes[:group + 1] == [int(n) for n in np.diff(np.r_[
                    self._row_groups(part)[:group + 1], self._row_groups(part)[group] + rows])]:
                return parquet.read_row_group(group, columns=[MULTIVECTOR_COLUMN]).column(0)
            column = parquet.read(columns=[MULTIVECTOR_COLUMN]).column(0)
        return column.slice(int(self._row_groups(part)[group]), rows)

    def _row_groups(self, part: int) -> np.ndarray:
        if part not in self._groups:
            meta = _parquet(self.store, self.files[part]).metadata
            sizes = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
            self._groups[part] = np.cumsum([0] + sizes[:-1]).astype(np.int64)
        return self._groups[part]

    def _group(self, part: int, group: int, columns: list[str]) -> pa.Table:
        key = (part, group, tuple(columns))
        if key not in self._cache:
            with reading(self.files[part]):
                parquet = _parquet(self.store, self.files[part])
                present = [c for c in columns if c in parquet.schema_arrow.names]
                table = parquet.read_row_group(group, columns=present)
            if ROW_KEY in columns:  # a multi-vector folder: the parallel multivectors/ part
                table = table.append_column(ROW_KEY, self._multivectors(part, group,
                                                                        table.num_rows))
            if LABEL_COLUMN in columns and LABEL_COLUMN not in present:
                # a part written before rows kept their labels: its rows get new ones
                table = table.append_column(LABEL_COLUMN, pa.array(
                    np.full(table.num_rows, NEW_LABEL, np.int64)))
            self._cache[key] = table.select(columns)
            while len(self._cache) > 8:
                self._cache.popitem(last=False)
        self._cache.move_to_end(key)
        return self._cache[key]


def confirmed(stored: pa.Table, ids: pa.Array, hashes: pa.Array, by_id: bool) -> np.ndarray:
    """Which fetched rows really are the rows looked up: the same whole hash (and id)."""
    same = (hash_bytes(stored.column("text_hash")) == hash_bytes(hashes)).all(axis=1)
    if by_id:
        stored_ids = stored.column("id").combine_chunks().cast(ids.type)
        same &= np.asarray(pc.fill_null(pc.equal(stored_ids, ids), False))
    return same


@dataclass
class ReuseSource:
    """What a worker needs to reuse stored vectors and to encode each repeated text once."""
    mode: str = "off"  # id+content | content | off
    stored: StoredRows | None = None
    repeated: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint64))

    def is_repeated(self, keys: np.ndarray) -> np.ndarray:
        if not len(self.repeated):
            return np.zeros(len(keys), bool)
        at = np.minimum(np.searchsorted(self.repeated, keys), len(self.repeated) - 1)
        return self.repeated[at] == keys

