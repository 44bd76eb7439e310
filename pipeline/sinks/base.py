"""Vector-store sinks kept in step with an output folder: the shared sync logic and the record.

A sink is synchronised from the folder's committed parts, keyed by id, after the units commit:
rows of units the sink does not hold (in the version now committed) are upserted, ids that are
no longer in the folder are deleted, nothing else is touched. The manifest records, per sink,
which unit versions it holds (`sinks[name].units`: unit key -> version), written only after the
sink's own commit. So after a crash at any point the record is either the old one (the same
diff is applied again: upserts by id and deletes of absent ids are safe to repeat) or the new
one. When the record cannot be trusted (none yet, another table, a row count that differs from
the recorded one: a wiped, truncated or half-applied table) the sync is full: every row is
upserted and every id not in the folder deleted.

`embedpipe sync` also compares content (`compare`): every row's vector digest in the table
(sha256 of the vector as the engine stores it, computed by the engine where it can: PostgreSQL's
`sha256(vector_send(vector))`) against the same digest of the folder's rows, keyed by id; rows
missing, differing or not in the folder are rewritten or deleted whatever the record says, so a
row changed or swapped in the table behind embedpipe's back is repaired.

Each table carries a marker (LanceDB: schema metadata; PostgreSQL: a COMMENT on the table) with
the folder's vector-settings hash; a table without one (not made by embedpipe) or with another
hash is refused, like the folder's own config guard.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..config import ConfigError, SinkConfig
from ..faults import checkpoint
from ..io.ledger import Ledger
from ..io.manifest import SinkRecord, UnitRecord
from ..io.storage import Store
from ..io.vectors import LABEL_COLUMN, VectorParts, to_matrix
from .multivector import MULTIVECTOR, is_multivector, multivector_blocks, with_multivectors
from .precision import column_type, to_codes
from .sparse import part_columns, sink_block, sink_schema

MARKER_FORMAT = 1
LOAD_ROWS = 8192  # rows per block streamed from the parts into a sink
SAMPLE = 256  # vectors compared by verify --quick
DIGEST_BYTES = 16  # a row's vector digest: sha256, first 16 bytes


class SinkError(RuntimeError):
    """A sink could not be read or written (the engine's error, as one line)."""


def one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


@dataclass(frozen=True)
class Marker:
    """What a sink table was made for: it must match the folder's, or the table is refused."""
    settings_hash: str
    dim: int | None  # None: not known yet (a check before the first vectors), not compared
    id_type: str | None  # int64 | string
    vector_type: str = "vector"

    def to_json(self) -> str:
        return json.dumps({"embedpipe": MARKER_FORMAT, "settings_hash": self.settings_hash,
                           "dim": self.dim, "id_type": self.id_type,
                           "vector_type": self.vector_type}, sort_keys=True)

    @classmethod
    def of_folder(cls, ledger: Ledger, vector_type: str) -> "Marker":
        m = ledger.manifest
        return cls(m.settings_hash or "", int(m.dim or 0), str(m.id_type or "string"),
                   vector_type)

    @classmethod
    def of_settings(cls, settings_hash: str, vector_type: str) -> "Marker":
        """What is known before a run embeds anything: the settings, not yet dim or id type."""
        return cls(settings_hash, None, None, vector_type)

    def refuse_other(self, sink: "Sink", found: str | None) -> None:
        """ConfigError when the table's marker text `found` is not embedpipe's or not ours."""
        try:
            data = json.loads(found) if found else None
        except ValueError:
            data = None
        if not isinstance(data, dict) or data.get("embedpipe") != MARKER_FORMAT:
            raise ConfigError(
                f'sink "{sink.name}": {sink.describe()} exists and was not made by embedpipe; '
                f"refusing to write into it. Name another table, or drop it")
        differ = [f"{k}: {data.get(k)!r} -> {v!r}" for k, v in
                  (("settings_hash", self.settings_hash), ("dim", self.dim),
                   ("id_type", self.id_type), ("vector_type", self.vector_type))
                  if v is not None and data.get(k) != v]
        if differ:
            raise ConfigError(
                f'sink "{sink.name}": {sink.describe()} holds vectors made with other settings '
                f"({'; '.join(differ)}); refusing to mix them. Drop the table, or name another")


@dataclass
class SinkLoad:
    """What one sync did, for the summary."""
    name: str
    kind: str
    target: str
    full: bool = False  # every row upserted and every id not in the folder deleted
    units: int = 0  # units whose rows were upserted
    upserted: int = 0
    deleted: int = 0
    rows: int = 0  # rows the sink holds afterwards
    seconds: float = 0.0
    index: str = ""  # what was done about the ANN index, if anything
    error: str | None = None
    compared: bool = False  # every row's content compared with the folder (sync's check)
    rewritten: int = 0  # rows found missing or differing by that comparison, written again
    removed: int = 0  # rows found in the table but not in the folder by it, deleted

    @property
    def rows_per_second(self) -> float:
        return self.upserted / self.seconds if self.seconds and self.upserted else 0.0

    def to_dict(self) -> dict:
        return {"name": self.name, "kind": self.kind, "target": self.target, "full": self.full,
                "units": self.units, "upserted": self.upserted, "deleted": self.deleted,
                "rows": self.rows, "seconds": round(self.seconds, 3),
                "rows_per_second": round(self.rows_per_second, 1), "index": self.index,
                "compared": self.compared, "rewritten": self.rewritten, "removed": self.removed,
                "error": self.error}


class Sink:
    """One vector store table. Subclasses talk to the engine; the engine's module is imported
    when the sink is made, so a job without sinks never imports it."""
    kind = ""

    def __init__(self, cfg: SinkConfig, metric: str = "ip", index_cfg: Any = None,
                 precision: str = "float32"):
        self.cfg = cfg
        self.name = cfg.name
        self.precision = precision  # the folder's output.precision (sinks/precision.py)
        self.vector_type = column_type(self.kind, cfg.name, precision, cfg.vector_type)
        self.metric = metric  # the folder's index metric: ip | l2
        self.index_cfg = index_cfg  # the job's [index], for HNSW/IVF parameters

    # -- engine side -----------------------------------------------------------------------
    def describe(self) -> str:
        raise NotImplementedError

    def target(self) -> str:
        """What the record names: where the table is, never a secret."""
        raise NotImplementedError

    def open(self) -> None:
        """Connect; ConfigError (one line) when the store cannot be reached."""

    def close(self) -> None:
        pass

    def marker(self) -> str | None:
        """The table's marker text; None when the table does not exist."""
        raise NotImplementedError

    def count(self) -> int | None:
        """Rows in the table; None when it does not exist."""
        raise NotImplementedError

    def load(self, schema: pa.Schema, blocks: Iterator[pa.Table], keep: pa.Table | None,
             marker: Marker) -> tuple[int, int]:
        """Upsert the blocks by key (`key_columns(schema)`) and, when keep (a table of the key
        columns) is given, delete every key not in it; create the table (with the marker) when
        missing. All or nothing where the engine allows. Returns (rows upserted, deleted)."""
        raise NotImplementedError

    def upsert(self, schema: pa.Schema, blocks: Iterator[pa.Table], marker: Marker) -> int:
        """Upsert the blocks into the existing table, one of several loaders of disjoint units
        at once (sinks/parallel_load.py). Returns the rows upserted."""
        return self.load(schema, blocks, None, marker)[0]

    def ensure_index(self, rows: int) -> str:
        """Build the ANN index after a load if the config asks for one and it is missing."""
        return ""

    def id_difference(self, keys: pa.Table) -> tuple[int, int, list]:
        """(keys of the folder missing from the table, keys in the table not in the folder,
        a few examples of either); keys: a table of the key columns."""
        raise NotImplementedError

    def vectors_of(self, keys: list[tuple]) -> dict:
        """key tuple -> float32 vector, for the given keys that the table holds."""
        raise NotImplementedError

    def vector_bytes(self, codes: np.ndarray) -> np.ndarray:
        """Rows of `to_codes` values as the engine stores them, a row of bytes each (a digest's
        input): packed bits as they are, else little-endian float32, unless the engine differs."""
        return codes if codes.dtype == np.uint8 else np.ascontiguousarray(codes, "<f4").view(np.uint8)

    def block_digests(self, block: pa.Table) -> pa.Array:
        """The digest of each row's `vector` of a block (sink_block's) as the engine stores it."""
        return vector_digests(self.vector_bytes(to_codes(self.precision,
                                                         to_matrix(block.column("vector")))))

    def row_digests(self, keys: list[str]) -> pa.Table:
        """Every row of the table: its key columns `keys` and `digest`, the digest of its
        vector as stored (vector_digests over vector_bytes)."""
        raise NotImplementedError

    def search(self, queries: np.ndarray, k: int, columns: list[str]) -> list[pa.Table]:
        """Per query a table of id, score (FAISS's: inner product, or squared L2) and columns,
        best first."""
        raise NotImplementedError

    @property
    def tolerance(self) -> float:
        return 1e-6

    # -- shared ----------------------------------------------------------------------------
    def check(self, marker: Marker) -> None:
        """Refuse a table not made by embedpipe, or made for other vectors."""
        found = self.marker()
        if found is not None or self.count() is not None:
            marker.refuse_other(self, found)


def preflight(sinks: list[Sink], settings_hash: str) -> None:
    """Before a run does any work: each store reachable, and its table (if any) embedpipe's and
    made with these vector settings; ConfigError (one line) otherwise."""
    try:
        for sink in sinks:
            sink.open()
            sink.check(Marker.of_settings(settings_hash, sink.vector_type))
    except BaseException:
        close_all(sinks)
        raise


def close_all(sinks: list[Sink]) -> None:
    for sink in sinks:
        try:
            sink.close()
        except Exception:  # closing a broken connection has nothing left to report
            pass


def unit_version(record: UnitRecord) -> str:
    """A committed unit's version: its input fingerprint and its vector parts as checked."""
    parts = [(f, record.checks[f].to_json() if f in record.checks else None)
             for f in record.vector_files]
    text = json.dumps([record.fingerprint, parts], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def folder_state(ledger: Ledger) -> dict[str, str]:
    return {r.key: unit_version(r) for r in ledger.complete_units()}


def key_columns(schema: pa.Schema) -> list[str]:
    """A row's key in a sink: its id, or (id, chunk) where a row is one window of a text."""
    return ["id", "chunk"] if "chunk" in schema.names else ["id"]


def folder_keys(store: Store, files: list[str]) -> pa.Table:
    """The key columns of every committed row, in row order."""
    keys = key_columns(_part_schema(store, files))
    tables = list(VectorParts(store, files).read(keys))
    if not tables:
        return pa.table({"id": pa.array([], pa.int64())})
    return pa.concat_tables(t.replace_schema_metadata(None) for t in tables).combine_chunks()


def key_tuples(keys: pa.Table) -> list[tuple]:
    return list(zip(*(keys.column(c).to_pylist() for c in keys.column_names)))


def recorded(ledger: Ledger, sink: Sink) -> SinkRecord | None:
    record = (ledger.manifest.sinks or {}).get(sink.name)
    return record if record is not None and record.target == sink.target() else None


def pending(ledger: Ledger, sink: Sink) -> list[str]:
    """Why the sink is not recorded as holding the folder's committed units ([] when it is)."""
    record = recorded(ledger, sink)
    if record is None:
        return [f'sink "{sink.name}" ({sink.describe()}): the manifest records no sync of the '
                f"folder into it"]
    held, now = record.units, folder_state(ledger)
    behind = sum(1 for k, v in now.items() if held.get(k) != v)
    gone = sum(1 for k in held if k not in now)
    if behind or gone:
        return [f'sink "{sink.name}" ({sink.describe()}) is behind the folder: {behind} units '
                f"not synced, {gone} removed units not deleted"]
    return []


def sync_sink(sink: Sink, ledger: Ledger, full: bool = False, compare: bool = False) -> SinkLoad:
    """Bring the sink in step with the folder's committed parts, then record it (see above);
    `compare`: then every row's content against the folder's, rewriting what differs."""
    store = ledger.store
    report = SinkLoad(sink.name, sink.kind, sink.target())
    tick = time.perf_counter()
    marker = Marker.of_folder(ledger, sink.vector_type)
    sink.check(marker)
    units = ledger.complete_units()
    now = {r.key: unit_version(r) for r in units}
    record = recorded(ledger, sink)
    before = sink.count()
    trusted = (record is not None and not full and before is not None
               and before == record.rows)
    held = record.units if trusted else {}
    todo = [r for r in units if held.get(r.key) != now[r.key]]
    stale = [k for k, v in held.items() if now.get(k) != v]
    report.full = not trusted
    files = [f for r in todo for f in r.vector_files]
    if todo or stale or not trusted:
        keep = folder_keys(store, ledger.vector_files()) if (stale or not trusted) else None
        schema = _part_schema(store, ledger.vector_files())
        blocks = _blocks(VectorParts(store, files), schema)
        report.upserted, report.deleted = sink.load(schema, blocks, keep, marker)
        report.units = len(todo)
    if compare and ledger.vector_files():
        _repair_content(sink, ledger, marker, report)
    report.seconds = time.perf_counter() - tick
    after = sink.count() or 0
    expected = sum(ledger.vector_parts().rows())  # rows, also where a row is a window
    if after != expected:
        raise SinkError(f'sink "{sink.name}": after the sync {sink.describe()} holds '
                        f"{after:,} rows, the folder {expected:,}; was the table written by "
                        f"something else meanwhile?")
    report.rows = after
    report.index = sink.ensure_index(after)
    checkpoint("sink")  # the sink committed, its record not yet written
    sinks = dict(ledger.manifest.sinks or {})
    sinks[sink.name] = SinkRecord(kind=sink.kind, target=sink.target(), units=now, rows=after,
                                  settings_hash=marker.settings_hash,
                                  synced=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    ledger.update(sinks=sinks)
    return report


def _repair_content(sink: Sink, ledger: Ledger, marker: Marker, report: SinkLoad) -> None:
    """Rows the table lacks or holds with another vector are written again from the parts; rows
    it holds that the folder does not are deleted (one load, all or nothing where the engine
    allows)."""
    store, files = ledger.store, ledger.vector_files()
    diff = content_difference(sink, store, files)
    report.compared = True
    if not diff:
        return
    wrong = pa.concat_tables([diff.missing, diff.differ])
    ids = pc.unique(wrong.column("id").combine_chunks()) if wrong.num_rows else pa.array(
        [], diff.missing.schema.field("id").type)
    schema = _part_schema(store, files)
    keep = folder_keys(store, files) if diff.extra.num_rows else None
    upserted, deleted = sink.load(schema, _rows_of(store, files, schema, ids), keep, marker)
    report.rewritten, report.removed = wrong.num_rows, diff.extra.num_rows
    report.upserted += upserted
    report.deleted += deleted


def _part_schema(store: Store, files: list[str]) -> pa.Schema:
    """The columns a sink holds: a part's, less the text hash and the index label (the
    folder's own bookkeeping, absent from parts written before they existed)."""
    if not files:
        return pa.schema([])
    schema = VectorParts(store, files).metadata(files[0]).schema.to_arrow_schema()
    schema = sink_schema(pa.schema([f for f in schema if f.name not in ("text_hash", LABEL_COLUMN)]))
    return with_multivectors(store, files, schema)


def _blocks(parts: VectorParts, schema: pa.Schema) -> Iterator[pa.Table]:
    """Blocks of the parts' rows as the sink takes them (sinks/sparse.py, sinks/multivector.py)."""
    if is_multivector(schema):
        return multivector_blocks(parts, schema, LOAD_ROWS)
    sparse = pa.types.is_struct(schema.field("vector").type) if "vector" in schema.names else False
    return (sink_block(table.replace_schema_metadata(None))
            for table in parts.read(part_columns(schema.names, sparse), LOAD_ROWS))


def vector_digests(payload: np.ndarray) -> pa.Array:
    """Per row of bytes, its sha256 (first DIGEST_BYTES bytes), as fixed-size binary."""
    digests = b"".join(hashlib.sha256(row).digest()[:DIGEST_BYTES] for row in payload)
    return pa.FixedSizeBinaryArray.from_buffers(pa.binary(DIGEST_BYTES), len(payload),
                                                 [None, pa.py_buffer(digests)])


def folder_digests(sink: Sink, store: Store, files: list[str]) -> pa.Table:
    """The folder's key columns and each row's vector digest as `sink` would store the vector,
    every committed row (each part's page checksums verified as it is read)."""
    schema = _part_schema(store, files) if files else pa.schema([])
    keys = key_columns(schema) if files else ["id"]
    blocks = _blocks(VectorParts(store, files), pa.schema([schema.field(k) for k in keys] + (
        [schema.field("vector")] if "vector" in schema.names else [])))
    tables = [pa.table({**{k: t.column(k) for k in keys}, "digest": sink.block_digests(t)})
              for t in blocks]
    if not tables:
        return pa.table({"id": pa.array([], pa.int64()), "digest": pa.array([], pa.binary(DIGEST_BYTES))})
    return pa.concat_tables(t.replace_schema_metadata(None) for t in tables).combine_chunks()


@dataclass
class ContentDiff:
    """Keys of the folder's rows the table lacks, of rows it holds with another vector, and of
    rows it holds that the folder does not."""
    missing: pa.Table
    differ: pa.Table
    extra: pa.Table

    def __bool__(self) -> bool:
        return bool(self.missing.num_rows or self.differ.num_rows or self.extra.num_rows)


def content_difference(sink: Sink, store: Store, files: list[str]) -> ContentDiff:
    """Every row of the table against the folder's, by key and vector digest."""
    mine = folder_digests(sink, store, files)
    keys = [c for c in mine.column_names if c != "digest"]
    held = sink.row_digests(keys)
    held = pa.table({**{k: held.column(k).cast(mine.schema.field(k).type) for k in keys},
                     "stored": held.column("digest").cast(pa.binary(DIGEST_BYTES))})
    both = mine.join(held, keys, join_type="full outer")
    have, stored = both.column("digest"), both.column("stored")
    missing = pc.is_null(stored)
    extra = pc.is_null(have)
    differ = pc.and_(pc.and_(pc.is_valid(have), pc.is_valid(stored)),
                     pc.not_equal(have.cast(pa.binary()), stored.cast(pa.binary())))
    pick = both.select(keys)
    return ContentDiff(pick.filter(missing), pick.filter(differ), pick.filter(extra))


def _rows_of(store: Store, files: list[str], schema: pa.Schema, ids: pa.Array) -> Iterator[pa.Table]:
    """The folder's rows (every column a sink holds) whose id is among `ids`."""
    for table in _blocks(VectorParts(store, files), schema):
        picked = table.filter(pc.is_in(table.column("id"), value_set=ids))
        if picked.num_rows:
            yield picked


def _examples(keys: pa.Table, shown: int = 5) -> str:
    return ", ".join(str(k[0] if len(k) == 1 else k) for k in key_tuples(keys.slice(0, shown)))


def prune_records(ledger: Ledger, names: list[str]) -> None:
    """Forget the records of sinks the job no longer names (their tables are left alone)."""
    sinks = ledger.manifest.sinks or {}
    if any(k not in names for k in sinks):
        ledger.update(sinks={k: v for k, v in sinks.items() if k in names})


def compare_sink(sink: Sink, ledger: Ledger, seed: int = 0, full: bool = True) -> list[str]:
    """Problems between the sink and the folder's committed parts: counts, the id sets, and
    every row's vector by digest (`full`), or a sample of vectors within the sink's tolerance
    (halfvec of a float32 folder: float16 rounding). A missing id is reported as missing, never as a vector that
    differs."""
    store = ledger.store
    where = f'sink "{sink.name}" ({sink.describe()})'
    found = sink.marker()
    if sink.count() is None:
        return [f"{where}: the table does not exist; `embedpipe sync {store.url}` makes it"]
    try:
        Marker.of_folder(ledger, sink.vector_type).refuse_other(sink, found)
    except ConfigError as exc:
        return [str(exc)]
    problems = pending(ledger, sink)
    files = ledger.vector_files()
    keys = folder_keys(store, files)
    count = sink.count()
    if count != keys.num_rows:
        problems.append(f"{where}: holds {count:,} rows, the folder {keys.num_rows:,}")
    if full or sink.vector_type in ("sparsevec", MULTIVECTOR):  # rows of many values: by digest
        diff = content_difference(sink, store, files)
        if diff.missing.num_rows or diff.extra.num_rows:
            problems.append(
                f"{where}: {diff.missing.num_rows:,} of the folder's ids missing (e.g. "
                f"{_examples(diff.missing) or '-'}), {diff.extra.num_rows:,} ids not in the folder "
                f"(e.g. {_examples(diff.extra) or '-'})")
        if diff.differ.num_rows:
            problems.append(f"{where}: {diff.differ.num_rows:,} of {keys.num_rows:,} vectors differ "
                            f"from the folder's (e.g. id {_examples(diff.differ, 1)})")
        return problems
    missing, extra, examples = sink.id_difference(keys)
    if missing or extra:
        shown = ", ".join(str(e[0] if len(e) == 1 else e) for e in examples[:5])
        problems.append(f"{where}: {missing:,} of the folder's ids missing, {extra:,} ids not "
                        f"in the folder (e.g. {shown})")
    if keys.num_rows:
        rng = np.random.default_rng(seed)
        positions = np.sort(rng.choice(keys.num_rows, min(SAMPLE, keys.num_rows), replace=False))
        want = VectorParts(store, files).sample(positions)
        sample = key_tuples(keys.take(pa.array(positions)))
        got = sink.vectors_of(sample)
        held = [(key, v) for key, v in zip(sample, want) if key in got]  # missing: said above
        bad = [key for key, v in held if got[key].shape != v.shape
               or not np.allclose(got[key], v, rtol=sink.tolerance, atol=sink.tolerance)]
        if bad:
            shown = bad[0][0] if len(bad[0]) == 1 else bad[0]
            problems.append(f"{where}: {len(bad)} of {len(held)} sampled vectors differ "
                            f"from the folder's (e.g. id {shown})")
    return problems
