"""OUT/manifest.json: what made an output folder, and which units of work it holds.

The manifest is the commit point. A unit's record is added only after all its files are in
place, and the manifest is replaced whole (atomically), so after a crash it names only complete
units; files it does not name are strays from the interrupted run and are swept.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from ..config import ConfigError, settings_differences
from .checks import FileCheck, damage
from .reader import Unit
from .storage import ConcurrentWrite, Store
from .vectors import VectorParts

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
LOCK = ".lock"
FORMAT = 1


class LockedError(RuntimeError):
    """Another live run holds the output folder."""


class SettingsMismatch(RuntimeError):
    """The folder's vectors were made with other settings than this run's."""


@dataclass
class LockInfo:
    took_over: dict | None  # the stale lock's content when it was taken over


# manifest key -> UnitRecord field, where they differ (the manifest's keys predate the record)
_KEY_TO_FIELD = {"vectors": "vector_files", "rejects_files": "reject_files"}
_FIELD_TO_KEY = {v: k for k, v in _KEY_TO_FIELD.items()}


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
    rows_in: int = 0
    vectors_out: int = 0
    rejects: int = 0
    reject_reasons: dict[str, int] = field(default_factory=dict)
    truncated: int = 0
    windows: int = 0  # long_text = "chunk": token windows embedded
    chunked: int = 0  # long_text = "chunk": texts cut into more than one window
    part_rows: int | None = None  # rows in the vector parts, when not one a text (a window each)
    reused: int = 0  # rows that took a vector already stored in the folder (encode.reuse)
    copied: int = 0  # rows that repeat a text encoded earlier in the run: encoded once
    vector_files: list[str] = field(default_factory=list)
    reject_files: list[str] = field(default_factory=list)
    token_files: list[str] = field(default_factory=list)  # the token table's parts (tokens/)
    token_rows: int = 0  # rows in them: a token (or word) each
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
        return self.vectors_out if self.part_rows is None else self.part_rows

    @property
    def files(self) -> list[str]:
        return self.vector_files + self.reject_files + self.token_files

    def damage(self, store: Store, full: bool = False) -> list[str]:
        """Why the unit's committed files no longer match the record: one line a bad file
        (`full`: every byte against the recorded digest, else size, rows and footer)."""
        return [why for f in self.files if (why := damage(store, f, self.checks.get(f), full))]

    def undigested(self) -> int:
        """Files whose record has no digest (committed before digests were kept)."""
        return sum(1 for f in self.files if (c := self.checks.get(f)) is None or c.digest is None)

    def to_json(self) -> dict[str, Any]:
        data = {_FIELD_TO_KEY.get(k, k): v for k, v in dataclasses.asdict(self).items()}
        data["checks"] = {f: c.to_json() for f, c in self.checks.items()}
        if not self.token_files:  # a text-only unit's record as before token-level output
            del data["token_files"], data["token_rows"]
        for name in ("reused", "copied"):
            if not data[name]:
                del data[name]
        if not self.complete:  # a failed unit records where and why, nothing it produced
            data = {k: data[k] for k in ("key", "path", "first_row", "row_groups", "fingerprint",
                                         "status", "error")}
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "UnitRecord":
        known = {f.name for f in dataclasses.fields(cls)}
        fields = {_KEY_TO_FIELD.get(k, k): v for k, v in data.items() if _KEY_TO_FIELD.get(k, k) in known}
        fields["checks"] = {f: FileCheck.from_json(c) for f, c in (fields.get("checks") or {}).items()}
        return cls(**fields)


class ManifestError(ConfigError):
    """The folder's manifest cannot be read, or is not embedpipe's."""


class Ledger:
    def __init__(self, store: Store):
        self.store = store
        self._mutex = threading.Lock()
        # On object stores the manifest is written only over the version read here (If-Match),
        # so two writers can never both commit on top of the same manifest.
        self._version = store.version(MANIFEST)
        self.data: dict[str, Any] = read_manifest(store) if store.exists(MANIFEST) else {}
        self.data.setdefault("format", FORMAT)
        self.data.setdefault("next_unit_id", 0)
        try:
            self.units: dict[str, UnitRecord] = {
                key: UnitRecord.from_json(record)
                for key, record in self.data.pop("units", {}).items()}
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise _unreadable(store, f"a unit record is malformed: {type(exc).__name__} {exc}")
        try:
            if not isinstance(self.data.get("retired", []), list):
                raise TypeError("retired is not a list")
            self.retired  # parsed once here, so a malformed record is refused at open
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise _unreadable(store, f"a retired unit record is malformed: "
                                     f"{type(exc).__name__} {exc}")

    def check_settings(self, settings: dict[str, Any]) -> None:
        """Refuse when the folder was made with settings that change vectors."""
        old = self.data.get("vector_settings")
        if old is None or not self.units:
            return
        differ = settings_differences(old, settings)
        if differ:
            details = "; ".join(differ)
            raise SettingsMismatch(
                f"{self.store.url} holds vectors made with other settings ({details}). "
                "Run with --mode overwrite to start the folder afresh, or choose another output.path.")

    def unit_id(self, key: str) -> int:
        """A stable number for a unit: kept across reruns, so part names stay put."""
        record = self.units.get(key)
        if record is not None and record.unit_id is not None:
            return record.unit_id
        with self._mutex:
            self.data.setdefault("unit_ids", {})
            if key not in self.data["unit_ids"]:
                self.data["unit_ids"][key] = self.data["next_unit_id"]
                self.data["next_unit_id"] += 1
            return self.data["unit_ids"][key]

    def unit_ids_forget(self, keys: list[str]) -> None:
        """Units embedded anew get a fresh number, so their parts never take the names of
        the parts they replace (those may still be read for reuse, and the index tells parts
        apart by name)."""
        for key in keys:
            self.data.get("unit_ids", {}).pop(key, None)

    @property
    def retired(self) -> list[UnitRecord]:
        """Units replaced or removed by a run that has not completed yet: out of the folder's
        vectors, but their parts kept (and read for reuse) until a run completes."""
        return [UnitRecord.from_json(r) for r in self.data.get("retired", [])]

    def retire(self, keys: list[str]) -> None:
        """Take the units out of the folder's vectors in one manifest write; their parts stay
        on disk, named under `retired`, until `clear_retired`."""
        with self._mutex:
            records = [self.units.pop(k) for k in keys if k in self.units]
            self.data["retired"] = self.data.get("retired", []) + [
                r.to_json() for r in records if r.complete]
            self.unit_ids_forget(keys)
            self.save_locked()

    def clear_retired(self) -> list[str]:
        """Forget the retired units (one manifest write); returns their files to remove."""
        files = [f for r in self.retired for f in r.files]
        if self.data.get("retired"):
            self.update(retired=[])
        return files

    def commit_unit(self, record: UnitRecord) -> None:
        with self._mutex:
            self.units[record.key] = record
            self.save_locked()

    def drop_units(self, keys: list[str]) -> None:
        with self._mutex:
            for key in keys:
                self.units.pop(key, None)
            self.unit_ids_forget(keys)
            self.save_locked()

    def update(self, **fields: Any) -> None:
        with self._mutex:
            self.data.update(fields)
            self.save_locked()

    def save_locked(self) -> None:
        self.data["updated"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        data = {**self.data, "units": {k: r.to_json() for k, r in self.units.items()}}
        body = json.dumps(data, indent=2, default=str).encode() + b"\n"
        self._version = self.store.write_bytes_if(MANIFEST, body, self._version)

    def complete_units(self) -> list[UnitRecord]:
        """Complete units in input order: by path, then first row (the order of the vectors)."""
        return sorted((r for r in self.units.values() if r.complete),
                      key=lambda r: (r.path, r.first_row))

    def vector_files(self) -> list[str]:
        return [f for r in self.complete_units() for f in r.vector_files]

    def vector_parts(self) -> VectorParts:
        """The committed vector parts, their row counts taken from the file checks recorded
        here (read from the footers where a manifest predates them). Only for files already
        checked against their records, as every run and `verify` does first."""
        checks = [r.checks.get(f) for r in self.complete_units() for f in r.vector_files]
        known = tuple(c.rows for c in checks) if all(checks) else None
        return VectorParts(self.store, self.vector_files(), known, self._labels(),
                           tuple(c.footer for c in checks) if all(checks) else None)

    def _labels(self) -> tuple[int, ...] | None:
        """Each vector part's first FAISS label, (unit_id << 32) | its first row in the unit
        (index/maintain.py); None where a unit lacks its id or its files' recorded rows."""
        labels = []
        for record in self.complete_units():
            row = 0
            for name in record.vector_files:
                check = record.checks.get(name)
                if record.unit_id is None or check is None:
                    return None
                labels.append((record.unit_id << 32) | row)
                row += check.rows
        return tuple(labels)

    def reject_files(self) -> list[str]:
        return [f for r in self.complete_units() for f in r.reject_files]

    def token_files(self) -> list[str]:
        """The token table's committed parts, in row order (input order)."""
        return [f for r in self.complete_units() for f in r.token_files]


def read_manifest(store: Store) -> dict[str, Any]:
    """An output folder's manifest, or a ConfigError saying the folder is not one (no manifest,
    an unreadable one, or one that is not embedpipe's)."""
    if not store.exists(MANIFEST):
        raise ConfigError(f"{store.url}: no {MANIFEST}; is this an embedpipe output folder?")
    try:
        data = json.loads(store.read_bytes(MANIFEST))
    except (ValueError, UnicodeDecodeError) as exc:
        raise _unreadable(store, f"not JSON: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("units"), dict) \
            or data.get("format") != FORMAT:
        raise ManifestError(
            f"{store.uri(MANIFEST)} is not an embedpipe manifest (format {FORMAT} with a units "
            f"record); refusing to touch the folder. Choose another output folder, or start "
            f"this one afresh with `embedpipe run --mode overwrite`")
    return data


# What an output folder holds besides its manifest; anything else without a manifest is foreign.
OWN_ENTRIES = {LOCK, "vectors", "rejects", "tokens", "index", "heads"}


def refuse_foreign_folder(store: Store) -> None:
    """Refuse to write into a folder that holds other things and no embedpipe manifest: a run
    sweeps and wipes what it does not recognise in its own folder."""
    if store.fs.isfile(store.root):
        raise ConfigError(f"output.path {store.url} is a file; it must be a folder (new or made "
                          f"by embedpipe)")
    if store.exists(MANIFEST):
        return
    foreign = [name for name in store.entries() if name not in OWN_ENTRIES]
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise ConfigError(f"output.path {store.url} is not empty ({shown}) and holds no embedpipe "
                          f"manifest; refusing to write into it. Choose a new or empty folder")


def _unreadable(store: Store, why: str) -> ManifestError:
    return ManifestError(
        f"{store.uri(MANIFEST)} is unreadable ({why}); it is the folder's record of what it "
        f"holds. Check the folder with `embedpipe verify {store.url}`, or start it afresh with "
        f"`embedpipe run --mode overwrite`")


def _process_alive(pid: int) -> bool:
    if pid <= 0:  # os.kill(0 or -1) would ask about a whole process group
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def acquire_lock(store: Store) -> LockInfo:
    """One writer per folder: a lock file with host and pid; a dead holder's lock is taken over."""
    me = {"host": socket.gethostname(), "pid": os.getpid(),
          "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    store.makedirs("")
    took_over = None
    if store.exists(LOCK):
        try:
            holder = store.read_json(LOCK)
            if not isinstance(holder, dict):
                raise ValueError(f"a JSON {type(holder).__name__}, not an object")
            int(holder.get("pid", -1))
        except (ValueError, TypeError, UnicodeDecodeError) as exc:
            log.warning("%s is unreadable (%s); taking it over as stale", store.uri(LOCK), exc)
            holder = {"host": me["host"], "pid": -1, "note": "unreadable lock"}
        same_host = holder.get("host") == me["host"]
        if not same_host or _process_alive(int(holder.get("pid", -1))):
            raise LockedError(
                f"{store.url} is in use by another embedpipe run (host {holder.get('host')}, "
                f"pid {holder.get('pid')}, since {holder.get('started')}). Wait for it to finish; "
                f"if that run is gone, delete {store.path(LOCK)}.")
        took_over = holder
        store.remove(LOCK)
    # Exclusive create (O_EXCL locally, If-None-Match on S3): of two runs starting together,
    # exactly one gets the lock.
    try:
        if store.local:
            fd = os.open(store.path(LOCK), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            with os.fdopen(fd, "w") as handle:
                json.dump(me, handle)
        else:
            store.write_bytes_if(LOCK, json.dumps(me).encode(), None)
    except (FileExistsError, ConcurrentWrite):
        raise LockedError(f"{store.url} is being locked by another run just now") from None
    return LockInfo(took_over=took_over)


def release_lock(store: Store) -> None:
    store.remove(LOCK)
