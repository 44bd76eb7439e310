"""Does the folder's index hold exactly the stored vectors, in their order? The cheap checks
(index_infos.json, the files, the id map's row count) run before a run skips the index and at
its end; `embedpipe verify` adds the index itself, the id map's ids and a sample of vectors."""
from __future__ import annotations

import faiss
import numpy as np
import pyarrow.parquet as pq

from ..io.checks import DamagedFile, check_file
from ..io.storage import Store
from ..io.vectors import VectorParts
from .files import IDS_FILE, INDEX_FILE, INFOS_FILE
from .tuning import even_positions

SAMPLE = 200  # stored vectors compared with the index's own copies


def index_problems(store: Store, parts: VectorParts, full: bool = False) -> list[str]:
    """One line per way the index differs from the stored vectors ([] when it matches)."""
    if not store.exists(INFOS_FILE):
        return [f"index: no {INFOS_FILE}"]
    try:
        infos = store.read_json(INFOS_FILE)
        recorded = [(p["file"], int(p["rows"])) for p in infos.get("parts", [])]
        count = int(infos.get("count", -1))
    except (ValueError, TypeError, KeyError, AttributeError, UnicodeDecodeError) as exc:
        return [f"index: {INFOS_FILE} is unreadable ({exc})"]
    rows = parts.rows()
    n = sum(rows)
    problems = []
    if count != n:
        problems.append(f"index: built over {count} vectors, the folder stores {n}")
    elif recorded != list(zip(parts.files, rows)):
        problems.append("index: built over other vector parts than the manifest names")
    if n == 0 or problems:
        return problems
    layout_files = [s["file"] for s in infos.get("shards", [])] + (
        [infos["ivfdata"]] if infos.get("ivfdata") else [])
    for rel in [INDEX_FILE, *layout_files]:
        if not store.exists(rel):
            problems.append(f"index: {rel} missing")
    try:
        if check_file(store, IDS_FILE).rows != n:
            problems.append(f"index: {IDS_FILE} does not map {n} ids")
    except DamagedFile as exc:
        problems.append(f"index: {exc}")
    if full and not problems:
        problems += _content_problems(store, parts, n)
    return problems


def _content_problems(store: Store, parts: VectorParts, n: int) -> list[str]:
    from .build import load_index

    try:
        index, _ = load_index(store)
    except (RuntimeError, ValueError, OSError) as exc:
        return [f"index: cannot be loaded ({exc})"]
    if index.ntotal != n:
        return [f"index: holds {index.ntotal} vectors, the folder stores {n}"]
    with store.fs.open(store.path(IDS_FILE), "rb") as handle:
        mapped = pq.read_table(handle)
    stored = parts.keys()
    if mapped.column("faiss_id").to_pylist() != list(range(n)) or any(
            name not in mapped.column_names
            or not mapped.column(name).equals(stored.column(name).cast(mapped.column(name).type))
            for name in stored.column_names):
        return [f"index: {IDS_FILE} does not list the stored "
                f"{' and '.join(stored.column_names)}s in order"]
    positions = even_positions(n, SAMPLE)
    copies = _reconstruct(index, positions) if _keeps_vectors_whole(index) else None
    if copies is not None:
        expected = parts.sample(positions)
        if not np.allclose(copies, expected, atol=1e-5):
            worst = int(np.abs(copies - expected).max(1).argmax())
            return [f"index: vector {int(positions[worst])} differs from the stored one"]
    return []


def _keeps_vectors_whole(index: faiss.Index) -> bool:
    """Flat, HNSW over flat storage and IVF-Flat in one index keep each vector exactly; scalar
    and product quantizers keep approximations, and shards cannot reconstruct."""
    inner = faiss.downcast_index(index)
    if isinstance(inner, faiss.IndexHNSW):
        return isinstance(faiss.downcast_index(inner.storage), faiss.IndexFlat)
    return isinstance(inner, (faiss.IndexFlat, faiss.IndexIVFFlat))


def _reconstruct(index: faiss.Index, positions: np.ndarray) -> np.ndarray | None:
    """The index's own copies of these vectors, where its kind keeps them whole."""
    try:
        ivf = faiss.try_extract_index_ivf(index)
        if ivf is not None:
            ivf.make_direct_map()
        return np.stack([index.reconstruct(int(p)) for p in positions])
    except RuntimeError:
        return None
