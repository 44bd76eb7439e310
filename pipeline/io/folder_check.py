"""Checks of a finished output folder against its manifest, without the model: every committed
file whole and as recorded, the counts adding up, ids unique. `embedpipe verify` runs them all;
the end of every run runs the cheap ones (files and counts)."""
from __future__ import annotations

import os
import tempfile

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .content_hash import id_keys, pair_keys, partition_order
from .ledger import Ledger
from .vectors import VectorParts

KEYS_PER_PARTITION = 25_000_000  # row keys verify's duplicate check holds at once (200 MB)


def unit_damage(ledger: Ledger, full: bool = False) -> dict[str, list[str]]:
    """Per complete unit key: why its committed files no longer match the record ([] if none);
    `full` reads every byte against the recorded digests."""
    return {record.key: record.damage(ledger.store, full) for record in ledger.complete_units()}


def unit_problems(ledger: Ledger, damage: dict[str, list[str]] | None = None) -> list[str]:
    """Per complete unit: its files present, whole and as recorded (`damage`, when the caller
    has it from unit_damage); rows read = vectors + rejects; the parts' row counts equal to the
    recorded counts. One line a problem."""
    damage = unit_damage(ledger) if damage is None else damage
    problems = []
    for record in ledger.complete_units():
        where = f"unit {record.path}" + (f" (from row {record.first_row})" if record.first_row else "")
        damaged = damage[record.key]
        problems += [f"{where}: {why}" for why in damaged]
        if damaged:
            continue
        c = record.counts
        if c.rows_in != c.vectors + c.rejects:
            problems.append(f"{where}: {c.rows_in} rows read, but {c.vectors} "
                            f"vectors + {c.rejects} rejects recorded")
        for files, recorded, what in ((record.vector_files, record.stored_rows, "vectors"),
                                      (record.reject_files, c.rejects, "rejects"),
                                      (record.token_files, c.token_rows, "token"),
                                      (record.multivector_files,
                                       record.stored_rows if record.multivector_files else 0,
                                       "multivectors")):
            rows = sum(_rows(ledger, record, f) for f in files)
            if rows != recorded:
                problems.append(f"{where}: its {what} parts hold {rows} rows, {recorded} recorded")
    return problems


def _rows(ledger: Ledger, record, name: str) -> int:
    check = record.checks.get(name)
    return check.rows if check is not None else VectorParts(ledger.store, [name]).rows()[0]


def duplicate_ids(parts: VectorParts, shown: int = 5) -> list[str]:
    """Ids (or (id, chunk) windows, in a folder of window rows) stored more than once across the
    parts (reads those columns only). Memory a partition, not a folder: each row's 64-bit key
    (io/content_hash.py) is spilled by hash into partitions of at most KEYS_PER_PARTITION keys
    in a temporary folder; keys seen twice in a partition are candidates, confirmed on the ids
    themselves in a second read (a string id's key is a hash, two ids may share it)."""
    keys = parts.key_columns()
    rows = sum(parts.rows())
    if not rows:
        return []
    partitions = -(-rows // KEYS_PER_PARTITION)
    with tempfile.TemporaryDirectory(prefix="embedpipe-ids-") as scratch:
        spills = [open(os.path.join(scratch, f"{p:05d}.u64"), "wb") for p in range(partitions)]
        try:
            for table in parts.read(keys):
                row_keys = _row_keys(table, keys)
                order, bounds = partition_order(row_keys, partitions)
                for p in np.flatnonzero(np.diff(bounds)):
                    spills[p].write(row_keys[order[bounds[p]:bounds[p + 1]]].tobytes())
        finally:
            for spill in spills:
                spill.close()
        candidates = []
        for spill in spills:
            seen, counts = np.unique(np.fromfile(spill.name, np.uint64), return_counts=True)
            candidates.append(seen[counts > 1])
    candidates = np.concatenate(candidates)
    if not len(candidates):
        return []
    suspects = [t.filter(pa.array(np.isin(_row_keys(t, keys), candidates)))
                for t in parts.read(keys)]
    counts = pa.concat_tables(suspects).group_by(keys).aggregate([([], "count_all")])
    repeated = counts.filter(pc.greater(counts.column("count_all"), 1))
    if not repeated.num_rows:
        return []
    first = repeated.select(keys).slice(0, shown).to_pylist()
    examples = ", ".join(repr(r["id"]) if len(keys) == 1 else repr(tuple(r.values())) for r in first)
    what = "ids are" if len(keys) == 1 else "(id, chunk) windows are"
    return [f"{repeated.num_rows} {what} stored more than once (e.g. {examples})"]


def _row_keys(table: pa.Table, keys: list[str]) -> np.ndarray:
    """A uint64 key a row for its id, or its (id, chunk) window."""
    ids = id_keys(table.column("id"))
    if len(keys) == 1:
        return ids
    chunks = table.column("chunk").to_numpy(zero_copy_only=False).astype(np.uint64)
    return pair_keys(ids, chunks)
