"""Does the folder's index hold exactly the stored vectors, under their labels? The cheap checks
(index_infos.json, the files it names, the id map's row count) run before a run skips the index
and at its end; the files' sizes and digests as the infos record them (`index_damage`, every
byte read) before it skips, and in `verify` unless --quick; `embedpipe verify` adds the index
itself, the id map's ids and labels, and a sample of vectors reconstructed by label. An index of row positions where the ledger knows
the rows' labels is stale: the next run rebuilds it."""
from __future__ import annotations

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..io.checks import PAGE_CHECKSUMS, DamagedFile, check_file, file_digest, reading
from ..io.storage import Store
from ..io.vectors import LABEL_COLUMN, READ_ROWS, VectorParts
from .files import INFOS_FILE, LABELLED, ids_file, index_file, read_tombstones
from .family import SQ8, downcast, eight_bit, ivf_of, unwrapped
from .tuning import even_positions

SAMPLE = 200  # stored vectors compared with the index's own copies
REPAIR = "the job's next `embedpipe run`, or `embedpipe index OUT`, rebuilds the index"


def index_damage(store: Store) -> list[str]:
    """The index files whose size or sha256 is not what the infos recorded when they were
    written (every byte read; infos written before digests were kept: nothing to compare)."""
    try:
        files = store.read_json(INFOS_FILE).get("files") or {}
        recorded = {rel: (int(f["bytes"]), str(f["digest"])) for rel, f in files.items()}
    except FileNotFoundError:
        return []
    except (ValueError, TypeError, KeyError, AttributeError, UnicodeDecodeError) as exc:
        return [f"index: {INFOS_FILE} is unreadable ({exc})"]
    problems = []
    for rel, (size, digest) in recorded.items():
        try:
            found = store.size(rel)
            if found != size:
                problems.append(f"index: {rel}: {found} bytes, {size} recorded when it was "
                                f"written (truncated or replaced)")
            elif file_digest(store, rel) != digest:
                problems.append(f"index: {rel}: its bytes changed since it was written (same "
                                f"size, another sha256)")
        except FileNotFoundError:
            problems.append(f"index: {rel} missing")
        except OSError as exc:
            problems.append(f"index: {rel} cannot be read ({exc.strerror or exc})")
    return problems


def index_problems(store: Store, parts: VectorParts, full: bool = False,
                   digests: bool = False) -> list[str]:
    """One line per way the index differs from the stored vectors ([] when it matches);
    `digests`: the index files' bytes too (index_damage); `full`: the index's content."""
    if not store.exists(INFOS_FILE):
        return [f"index: no {INFOS_FILE}"]
    try:
        infos = store.read_json(INFOS_FILE)
        recorded = [(p["file"], int(p["rows"])) for p in infos.get("parts", [])]
        labels = [p.get("label") for p in infos.get("parts", [])]
        count = int(infos.get("count", -1))
    except (ValueError, TypeError, KeyError, AttributeError, UnicodeDecodeError) as exc:
        return [f"index: {INFOS_FILE} is unreadable ({exc})"]
    rows = parts.rows()
    n = sum(rows)
    problems = []
    # an empty index over a folder with no vectors (every unit failed, or rejected every row)
    # matches it: there are no labels to compare
    if count != n:
        problems.append(f"index: built over {count} vectors, the folder stores {n}")
    elif recorded != list(zip(parts.files, rows)):
        problems.append("index: built over other vector parts than the manifest names")
    elif n and parts.labels is not None and (infos.get("labels") not in LABELLED
                                             or labels != list(parts.labels)):
        problems.append("index: built over row positions or other labels than the parts' "
                        "stored labels")
    if n == 0 or problems:
        return problems
    layout_files = [s["file"] for s in infos.get("shards", [])] + [
        infos[k] for k in ("ivfdata", "tombstones_file") if infos.get(k)]
    for rel in [index_file(infos), *layout_files]:
        if not store.exists(rel):
            problems.append(f"index: {rel} missing")
    if digests:
        problems += [p for p in index_damage(store) if p not in problems]
    try:
        if check_file(store, ids_file(infos)).rows != n:
            problems.append(f"index: {ids_file(infos)} does not map {n} ids")
    except DamagedFile as exc:
        problems.append(f"index: {exc}")
    if full and not problems:
        problems += _content_problems(store, parts, n, infos)
    return problems


def _content_problems(store: Store, parts: VectorParts, n: int, infos: dict) -> list[str]:
    from .build import load_index

    try:
        index, _ = load_index(store)
        tombstones = read_tombstones(store, infos)
    except (RuntimeError, ValueError, OSError) as exc:
        return [f"index: cannot be loaded ({exc})"]
    if index.ntotal - len(tombstones) != n:
        return [f"index: holds {index.ntotal - len(tombstones)} live vectors, the folder "
                f"stores {n}"]
    positions = even_positions(n, SAMPLE)
    try:
        problem, sampled = _check_id_map(store, ids_file(infos), parts, tombstones, positions)
    except DamagedFile as exc:
        return [f"index: {exc}"]
    if problem:
        return [problem]
    whole = _keeps_vectors_whole(index, infos.get("codes") == SQ8)
    copies = _reconstruct(index, sampled) if whole else None
    if copies is not None:
        expected = parts.sample(positions)
        if not np.allclose(copies, expected, atol=1e-5):
            worst = int(np.abs(copies - expected).max(1).argmax())
            return [f"index: vector {int(positions[worst])} differs from the stored one"]
    return []


def _check_id_map(store: Store, rel: str, parts: VectorParts, tombstones: np.ndarray,
                  positions: np.ndarray) -> tuple[str | None, np.ndarray]:
    """The id map against the stored rows, a block at a time (a billion rows' keys and labels
    are never in memory at once): (the line that says how they differ, else None; the labels
    at the sampled row `positions`)."""
    none = np.zeros(0, np.int64)
    differs = (f"index: {rel} does not list the stored {' and '.join(parts.key_columns())}s "
               f"in order, under their labels")
    with reading(rel, REPAIR), store.open_input(rel) as handle:
        mapped = pq.ParquetFile(handle, **PAGE_CHECKSUMS)
        columns = [LABEL_COLUMN, *parts.key_columns()]
        if any(name not in mapped.schema_arrow.names for name in columns):
            return differs, none
        mapped_rows = _Blocks(mapped.iter_batches(READ_ROWS, columns=columns))
        sampled, row = [], 0
        for stored in parts.id_map():
            if stored.num_rows == 0:
                continue
            got = mapped_rows.take(stored.num_rows)
            labels = stored.column(LABEL_COLUMN).to_numpy()
            if got is None or not all(got.column(name).equals(
                    stored.column(name).cast(got.schema.field(name).type)) for name in columns):
                return differs, none
            if np.isin(labels, tombstones).any():
                return "index: a stored row's label is among the tombstones", none
            inside = positions[(positions >= row) & (positions < row + len(labels))]
            sampled.append(labels[inside - row])
            row += len(labels)
        if mapped_rows.take(1) is not None:
            return differs, none
    return None, np.concatenate(sampled) if sampled else none


class _Blocks:
    """Record batches handed out as tables of the row counts asked for."""

    def __init__(self, batches):
        self.batches, self.held = iter(batches), []

    def take(self, rows: int) -> pa.Table | None:
        """The next `rows` rows (None: fewer are left)."""
        have = sum(len(b) for b in self.held)
        while have < rows:
            batch = next(self.batches, None)
            if batch is None:
                return None
            self.held.append(batch)
            have += len(batch)
        table = pa.Table.from_batches(self.held).combine_chunks() if self.held else None
        if table is None:
            return None
        self.held = table.slice(rows).to_batches()
        return table.slice(0, rows)


def _keeps_vectors_whole(index: faiss.Index, folder_ranges: bool) -> bool:
    """Flat, HNSW over flat storage and IVF-Flat in one index keep each vector exactly, as do
    the binary flat and HNSW kinds their codes; an 8-bit scalar quantizer with the folder's
    ranges (`folder_ranges`: an int8 / uint8 folder, index/family.py) keeps the dequantized
    values; other quantizers keep approximations, and shards cannot reconstruct."""
    inner = unwrapped(index)
    if isinstance(inner, faiss.IndexBinaryHNSW):
        return isinstance(downcast(inner.storage), faiss.IndexBinaryFlat)
    if isinstance(inner, faiss.IndexHNSW):
        inner = downcast(inner.storage)
    whole = (faiss.IndexFlat, faiss.IndexIVFFlat, faiss.IndexBinaryFlat, faiss.IndexBinaryIVF)
    if folder_ranges and isinstance(inner, faiss.IndexIVFScalarQuantizer):
        return not inner.by_residual and eight_bit(inner.sq)
    if folder_ranges and isinstance(inner, faiss.IndexScalarQuantizer):
        return eight_bit(inner.sq)
    return isinstance(inner, whole)


def _reconstruct(index: faiss.Index, labels: np.ndarray) -> np.ndarray | None:
    """The index's own copies of the vectors under these labels, where its kind keeps them
    whole (IVF through a hash table from label to list entry)."""
    try:
        ivf = ivf_of(index)
        if ivf is not None:
            ivf.set_direct_map_type(faiss.DirectMap.Hashtable)
        return np.stack([index.reconstruct(int(label)) for label in labels])
    except RuntimeError:
        return None
