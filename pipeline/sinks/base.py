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

from ..config import ConfigError, SinkConfig
from ..faults import checkpoint
from ..io.ledger import Ledger, UnitRecord
from ..io.storage import Store
from ..io.vectors import VectorParts

MARKER_FORMAT = 1
LOAD_ROWS = 8192  # rows per block streamed from the parts into a sink
SAMPLE = 256  # vectors compared by verify


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
    def of_folder(cls, ledger: Ledger, cfg: SinkConfig) -> "Marker":
        return cls(ledger.data.get("settings_hash", ""), int(ledger.data.get("dim") or 0),
                   str(ledger.data.get("id_type") or "string"), cfg.vector_type)

    @classmethod
    def of_settings(cls, settings_hash: str, cfg: SinkConfig) -> "Marker":
        """What is known before a run embeds anything: the settings, not yet dim or id type."""
        return cls(settings_hash, None, None, cfg.vector_type)

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

    @property
    def rows_per_second(self) -> float:
        return self.upserted / self.seconds if self.seconds and self.upserted else 0.0

    def to_dict(self) -> dict:
        return {"name": self.name, "kind": self.kind, "target": self.target, "full": self.full,
                "units": self.units, "upserted": self.upserted, "deleted": self.deleted,
                "rows": self.rows, "seconds": round(self.seconds, 3),
                "rows_per_second": round(self.rows_per_second, 1), "index": self.index,
                "error": self.error}


class Sink:
    """One vector store table. Subclasses talk to the engine; the engine's module is imported
    when the sink is made, so a job without sinks never imports it."""
    kind = ""

    def __init__(self, cfg: SinkConfig, metric: str = "ip", index_cfg: Any = None):
        self.cfg = cfg
        self.name = cfg.name
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
            sink.check(Marker.of_settings(settings_hash, sink.cfg))
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


def recorded(ledger: Ledger, sink: Sink) -> dict | None:
    record = (ledger.data.get("sinks") or {}).get(sink.name)
    if not isinstance(record, dict) or record.get("target") != sink.target():
        return None
    return record


def pending(ledger: Ledger, sink: Sink) -> list[str]:
    """Why the sink is not recorded as holding the folder's committed units ([] when it is)."""
    record = recorded(ledger, sink)
    if record is None:
        return [f'sink "{sink.name}" ({sink.describe()}): the manifest records no sync of the '
                f"folder into it"]
    held, now = record.get("units") or {}, folder_state(ledger)
    behind = sum(1 for k, v in now.items() if held.get(k) != v)
    gone = sum(1 for k in held if k not in now)
    if behind or gone:
        return [f'sink "{sink.name}" ({sink.describe()}) is behind the folder: {behind} units '
                f"not synced, {gone} removed units not deleted"]
    return []


def sync_sink(sink: Sink, ledger: Ledger, full: bool = False) -> SinkLoad:
    """Bring the sink in step with the folder's committed parts, then record it (see above)."""
    store = ledger.store
    report = SinkLoad(sink.name, sink.kind, sink.target())
    tick = time.perf_counter()
    marker = Marker.of_folder(ledger, sink.cfg)
    sink.check(marker)
    units = ledger.complete_units()
    now = {r.key: unit_version(r) for r in units}
    record = recorded(ledger, sink)
    before = sink.count()
    trusted = (record is not None and not full and before is not None
               and before == record.get("rows"))
    held = (record.get("units") or {}) if trusted else {}
    todo = [r for r in units if held.get(r.key) != now[r.key]]
    stale = [k for k, v in held.items() if now.get(k) != v]
    report.full = not trusted
    files = [f for r in todo for f in r.vector_files]
    if todo or stale or not trusted:
        keep = folder_keys(store, ledger.vector_files()) if (stale or not trusted) else None
        parts = VectorParts(store, files)
        schema = _part_schema(store, ledger.vector_files())
        blocks = _blocks(parts, schema)
        report.upserted, report.deleted = sink.load(schema, blocks, keep, marker)
        report.units = len(todo)
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
    sinks = {k: v for k, v in (ledger.data.get("sinks") or {}).items()}
    sinks[sink.name] = {"kind": sink.kind, "target": sink.target(), "units": now, "rows": after,
                        "settings_hash": marker.settings_hash,
                        "synced": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    ledger.update(sinks=sinks)
    return report


def _part_schema(store: Store, files: list[str]) -> pa.Schema:
    """The columns a sink holds: a part's, less the text hash (the folder's own bookkeeping,
    absent from parts written before it existed)."""
    if not files:
        return pa.schema([])
    schema = VectorParts(store, files).metadata(files[0]).schema.to_arrow_schema()
    return pa.schema([f for f in schema if f.name != "text_hash"])


def _blocks(parts: VectorParts, schema: pa.Schema) -> Iterator[pa.Table]:
    for table in parts.read(schema.names, LOAD_ROWS):
        yield table.replace_schema_metadata(None)


def prune_records(ledger: Ledger, names: list[str]) -> None:
    """Forget the records of sinks the job no longer names (their tables are left alone)."""
    sinks = ledger.data.get("sinks") or {}
    if any(k not in names for k in sinks):
        ledger.update(sinks={k: v for k, v in sinks.items() if k in names})


def compare_sink(sink: Sink, ledger: Ledger, seed: int = 0) -> list[str]:
    """Problems between the sink and the folder's committed parts: counts, the id sets, and a
    sample of vectors within the sink's tolerance (halfvec: float16 rounding)."""
    store = ledger.store
    where = f'sink "{sink.name}" ({sink.describe()})'
    found = sink.marker()
    if sink.count() is None:
        return [f"{where}: the table does not exist; `embedpipe sync {store.url}` makes it"]
    try:
        Marker.of_folder(ledger, sink.cfg).refuse_other(sink, found)
    except ConfigError as exc:
        return [str(exc)]
    problems = pending(ledger, sink)
    files = ledger.vector_files()
    keys = folder_keys(store, files)
    count = sink.count()
    if count != keys.num_rows:
        problems.append(f"{where}: holds {count:,} rows, the folder {keys.num_rows:,}")
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
        bad = [key for key, v in zip(sample, want)
               if (g := got.get(key)) is None or g.shape != v.shape
               or not np.allclose(g, v, rtol=sink.tolerance, atol=sink.tolerance)]
        if bad:
            shown = bad[0][0] if len(bad[0]) == 1 else bad[0]
            problems.append(f"{where}: {len(bad)} of {len(positions)} sampled vectors differ "
                            f"from the folder's (e.g. id {shown})")
    return problems
