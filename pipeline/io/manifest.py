"""OUT/manifest.json as typed records, read and written only here.

`Manifest` is the top level, `UnitRecord` a unit's record (its counts a `UnitCounts`),
`SinkRecord` a sink's. The JSON keys are the ones earlier versions wrote, so folders they made
still load: a top-level key this version does not know is kept as it was (`extra`) and written
back, a null top-level value reads as absent, and a sink record that is not one is dropped
(the next sync of that sink is then a full one, as before).
"""
from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from typing import Any, Mapping

from ..config import ConfigError
from .checks import FileCheck, damage
from .precision import Calibration
from .reader import Unit
from .storage import Store

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FORMAT = 1


class ManifestError(ConfigError):
    """The folder's manifest cannot be read, or is not embedpipe's."""


class Malformed(ValueError):
    """A record in the manifest is not one (read_manifest says which folder)."""


@dataclass(frozen=True)
class UnitCounts:
    """What became of a unit's rows (or a run's, added up with `+`)."""
    rows_in: int = 0  # rows read
    vectors: int = 0  # texts that got a vector (from the model, a stored row or a repeat)
    rows: int = 0  # rows in the vector parts: a text each, or a token window each
    rejects: int = 0
    reject_reasons: Mapping[str, int] = field(default_factory=dict)
    truncated: int = 0
    windows: int = 0  # long_text = "chunk": token windows embedded
    chunked: int = 0  # long_text = "chunk": texts cut into more than one window
    reused: int = 0  # took a vector already stored in the folder (encode.reuse)
    copied: int = 0  # repeated a text encoded earlier in the run: encoded once
    token_rows: int = 0  # rows in the token table: a token (or word) each

    def __add__(self, other: "UnitCounts") -> "UnitCounts":
        sums = {f.name: getattr(self, f.name) + getattr(other, f.name)
                for f in dataclasses.fields(self) if f.name != "reject_reasons"}
        reasons = dict(self.reject_reasons)
        for reason, count in other.reject_reasons.items():
            reasons[reason] = reasons.get(reason, 0) + count
        return UnitCounts(**sums, reject_reasons=reasons)


# manifest key -> UnitRecord field, where they differ (the manifest's keys predate the record)
_KEY_TO_FIELD = {"vectors": "vector_files", "rejects_files": "reject_files"}
_COUNT_KEYS = ("rows_in", "vectors_out", "rejects", "reject_reasons", "truncated", "windows",
               "chunked", "part_rows", "reused", "copied", "token_rows")


@dataclass
class UnitRecord:
    """What one unit of work produced, as the manifest records it under `units[key]`."""
    key: str
    path: str
    first_row: int
    row_groups: list[int]
    fingerprint: str  # the input unit's, when it was embedded
    status: str  # complete | failed
    unit_id: int | None = None  # numbers the unit's part files; None for a failed unit
    counts: UnitCounts = UnitCounts()
    window_rows: bool = False  # a part row is a token window (recorded as `part_rows`)
    vector_files: list[str] = field(default_factory=list)
    reject_files: list[str] = field(default_factory=list)
    token_files: list[str] = field(default_factory=list)  # the token table's parts (tokens/)
    # a multi-vector folder's token vectors (multivectors/), a part for each vector part
    multivector_files: list[str] = field(default_factory=list)
    seconds: float = 0.0
    error: str | None = None
    checks: dict[str, FileCheck] = field(default_factory=dict)  # per file: bytes, rows, footer, digest

    @classmethod
    def for_unit(cls, unit: Unit, status: str, **fields: Any) -> "UnitRecord":
        return cls(key=unit.key, path=unit.path, first_row=unit.first_row,
                   row_groups=list(unit.row_groups), fingerprint=unit.fingerprint, status=status,
                   **fields)

    @property
    def complete(self) -> bool:
        return self.status == "complete"

    @property
    def stored_rows(self) -> int:
        """Rows in the unit's vector parts: a text each, or a token window each."""
        return self.counts.rows

    @property
    def files(self) -> list[str]:
        return self.vector_files + self.reject_files + self.token_files + self.multivector_files

    def damage(self, store: Store, full: bool = False) -> list[str]:
        """Why the unit's committed files no longer match the record: one line a bad file
        (`full`: every byte against the recorded digest, else size, rows and footer)."""
        return [why for f in self.files if (why := damage(store, f, self.checks.get(f), full))]

    def undigested(self) -> int:
        """Files whose record has no digest (committed before digests were kept)."""
        return sum(1 for f in self.files if (c := self.checks.get(f)) is None or c.digest is None)

    def to_json(self) -> dict[str, Any]:
        head = {"key": self.key, "path": self.path, "first_row": self.first_row,
                "row_groups": list(self.row_groups), "fingerprint": self.fingerprint,
                "status": self.status}
        if not self.complete:  # a failed unit records where and why, nothing it produced
            return {**head, "error": self.error}
        c = self.counts
        data = {**head, "unit_id": self.unit_id, "rows_in": c.rows_in, "vectors_out": c.vectors,
                "rejects": c.rejects, "reject_reasons": dict(c.reject_reasons),
                "truncated": c.truncated, "windows": c.windows, "chunked": c.chunked,
                "part_rows": c.rows if self.window_rows else None}
        for name in ("reused", "copied"):  # written only when some rows were
            if getattr(c, name):
                data[name] = getattr(c, name)
        data.update(vectors=self.vector_files, rejects_files=self.reject_files)
        if self.token_files:  # a text-only unit's record as before token-level output
            data.update(token_files=self.token_files, token_rows=c.token_rows)
        if self.multivector_files:
            data.update(multivector_files=self.multivector_files)
        data.update(seconds=self.seconds, error=self.error,
                    checks={f: check.to_json() for f, check in self.checks.items()})
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "UnitRecord":
        known = {f.name for f in dataclasses.fields(cls)} - {"counts", "window_rows"}
        fields = {_KEY_TO_FIELD.get(k, k): v for k, v in data.items()
                  if _KEY_TO_FIELD.get(k, k) in known}
        fields["checks"] = {f: FileCheck.from_json(c)
                            for f, c in (fields.get("checks") or {}).items()}
        n = {k: data[k] for k in _COUNT_KEYS if data.get(k) is not None}
        for name, value in n.items():
            if name != "reject_reasons" and not isinstance(value, int):
                raise TypeError(f"{name} is {value!r}, not a count")
        counts = UnitCounts(
            rows_in=n.get("rows_in", 0), vectors=n.get("vectors_out", 0),
            rows=n.get("part_rows", n.get("vectors_out", 0)), rejects=n.get("rejects", 0),
            reject_reasons=dict(n.get("reject_reasons", {})), truncated=n.get("truncated", 0),
            windows=n.get("windows", 0), chunked=n.get("chunked", 0), reused=n.get("reused", 0),
            copied=n.get("copied", 0), token_rows=n.get("token_rows", 0))
        return cls(**fields, counts=counts, window_rows="part_rows" in n)


@dataclass
class SinkRecord:
    """A sink's last sync, under `sinks[name]`: what it holds (unit key -> version)."""
    kind: str
    target: str
    units: dict[str, str]
    rows: int
    settings_hash: str
    synced: str  # when, UTC

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: Any) -> "SinkRecord | None":
        """None for a record that is not one (its sink is then synced in full)."""
        try:
            record = cls(**data)
        except TypeError:
            return None
        if not (isinstance(record.units, dict) and isinstance(record.rows, int)):
            return None
        return record


@dataclass
class Manifest:
    """The manifest's top level: what made the folder and what it holds."""
    format: int = FORMAT
    next_unit_id: int = 0
    job: str | None = None
    config: dict[str, Any] | None = None  # the job, as JobConfig.to_dict wrote it
    vector_settings: dict[str, Any] | None = None
    settings_hash: str | None = None
    complete: bool | None = None  # the last run reached its end without failures
    content_hash: str | None = None  # the text hash scheme of the parts (io/content_hash.py)
    model: dict[str, Any] | None = None  # name, path, fingerprint
    versions: dict[str, Any] | None = None
    updated: str | None = None
    id_type: str | None = None  # int64 | string
    dim: int | None = None
    unit_ids: dict[str, int] | None = None  # unit key -> the number its part files carry
    sinks: dict[str, SinkRecord] | None = None
    index: dict[str, Any] | None = None  # the index infos (index/commit.py)
    last_run: dict[str, Any] | None = None  # the last run's summary (jobs/summary.py: to_dict)
    retired: list[UnitRecord] | None = None  # replaced units whose parts are kept for reuse
    # output.precision int8 / uint8: the ranges every run of the folder quantizes with
    calibration: Calibration | None = None
    units: dict[str, UnitRecord] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)  # keys this version does not know

    @property
    def keep_columns(self) -> list[str]:
        return list(((self.config or {}).get("output") or {}).get("keep_columns") or [])

    @property
    def index_config(self) -> dict[str, Any]:
        """The job's [index] section as recorded."""
        return dict((self.config or {}).get("index") or {})

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is None or f.name == "extra":
                continue
            if f.name == "units":
                value = {k: r.to_json() for k, r in value.items()}
            elif f.name == "retired":
                value = [r.to_json() for r in value]
            elif f.name == "sinks":
                value = {k: r.to_json() for k, r in value.items()}
            elif f.name == "calibration":
                value = value.to_json()
            data[f.name] = value
        return {**data, **self.extra}

    def to_bytes(self) -> bytes:
        return json.dumps(self.to_json(), indent=2, default=str).encode() + b"\n"

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Manifest":
        """The typed manifest; Malformed saying which record is not one."""
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        fields = {k: v for k, v in data.items() if k in names and v is not None}
        extra = {k: v for k, v in data.items() if k not in names}
        try:
            fields["units"] = {k: UnitRecord.from_json(r)
                               for k, r in (data.get("units") or {}).items()}
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise Malformed(f"a unit record is malformed: {type(exc).__name__} {exc}")
        try:
            retired = data.get("retired")
            if retired is not None and not isinstance(retired, list):
                raise TypeError("retired is not a list")
            if retired is not None:
                fields["retired"] = [UnitRecord.from_json(r) for r in retired]
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise Malformed(f"a retired unit record is malformed: {type(exc).__name__} {exc}")
        try:
            if data.get("calibration") is not None:
                fields["calibration"] = Calibration.from_json(data["calibration"])
        except (KeyError, TypeError, ValueError) as exc:
            raise Malformed(f"the calibration record is malformed: {type(exc).__name__} {exc}")
        if isinstance(data.get("sinks"), dict):
            sinks = {k: SinkRecord.from_json(v) for k, v in data["sinks"].items()}
            for name in [k for k, v in sinks.items() if v is None]:
                log.warning("the manifest's record of sink %r is malformed; it is synced in "
                            "full next", name)
                del sinks[name]
            fields["sinks"] = sinks
        elif "sinks" in fields:
            del fields["sinks"]
        return cls(**fields, extra=extra)


def read_manifest(store: Store) -> Manifest:
    """An output folder's manifest, or a ConfigError saying the folder is not one (no manifest,
    an unreadable one, or one that is not embedpipe's)."""
    if not store.exists(MANIFEST):
        raise ConfigError(f"{store.url}: no {MANIFEST}; is this an embedpipe output folder?")
    try:
        data = json.loads(store.read_bytes(MANIFEST))
    except (ValueError, UnicodeDecodeError) as exc:
        raise unreadable(store, f"not JSON: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("units"), dict) \
            or data.get("format") != FORMAT:
        raise ManifestError(
            f"{store.uri(MANIFEST)} is not an embedpipe manifest (format {FORMAT} with a units "
            f"record); refusing to touch the folder. Choose another output folder, or start "
            f"this one afresh with `embedpipe run --mode overwrite`")
    try:
        return Manifest.from_json(data)
    except Malformed as exc:
        raise unreadable(store, str(exc)) from None


def unreadable(store: Store, why: str) -> ManifestError:
    return ManifestError(
        f"{store.uri(MANIFEST)} is unreadable ({why}); it is the folder's record of what it "
        f"holds. Check the folder with `embedpipe verify {store.url}`, or start it afresh with "
        f"`embedpipe run --mode overwrite`")
