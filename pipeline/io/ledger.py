"""The ledger: an output folder's manifest (io/manifest.py) held open by a writer, and the lock.

The manifest is the commit point. A unit's record is added only after all its files are in
place, and the manifest is replaced whole (atomically), so after a crash it names only complete
units; files it does not name are strays from the interrupted run and are swept.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any

from ..config import ConfigError, settings_differences
from .manifest import MANIFEST, Manifest, UnitRecord, read_manifest
from .precision import stored_precision
from .storage import ConcurrentWrite, Store
from .vectors import VectorParts

log = logging.getLogger(__name__)

LOCK = ".lock"


class LockedError(RuntimeError):
    """Another live run holds the output folder."""


class SettingsMismatch(RuntimeError):
    """The folder's vectors were made with other settings than this run's."""


@dataclass
class LockInfo:
    took_over: dict | None  # the stale lock's content when it was taken over


class Ledger:
    """The folder's manifest held open by a run (or a command that changes the folder): every
    change is one whole, atomic write of it."""

    def __init__(self, store: Store, manifest: Manifest | None = None):
        """manifest: the folder's, when the caller has just read it (read once: its warnings
        once)."""
        self.store = store
        self._mutex = threading.Lock()
        # On object stores the manifest is written only over the version read here (If-Match),
        # so two writers can never both commit on top of the same manifest.
        self._version = store.version(MANIFEST)
        if manifest is None:
            manifest = read_manifest(store) if store.exists(MANIFEST) else Manifest()
        self.manifest = manifest

    @property
    def units(self) -> dict[str, UnitRecord]:
        return self.manifest.units

    def check_settings(self, settings: dict[str, Any]) -> None:
        """Refuse when the folder was made with settings that change vectors."""
        old = self.manifest.vector_settings
        if old is None or not self.units:
            return
        differ = settings_differences(old, settings)
        if differ:
            details = "; ".join(differ)
            raise SettingsMismatch(
                f"{self.store.url} holds vectors made with other settings ({details}). "
                "Run with --mode overwrite to start the folder afresh, or choose another output.path.")

    def unit_id(self, key: str) -> int:
        """A stable number for a unit: kept across reruns, so part names stay put. A unit to
        embed never has one a stored row's label carries (jobs/write.py labels new rows with
        it): changed, repaired and failed units are forgotten first, and the counter only
        grows."""
        record = self.units.get(key)
        if record is not None and record.unit_id is not None:
            return record.unit_id
        with self._mutex:
            m = self.manifest
            if m.unit_ids is None:
                m.unit_ids = {}
            if key not in m.unit_ids:
                m.unit_ids[key] = m.next_unit_id
                m.next_unit_id += 1
            return m.unit_ids[key]

    def unit_ids_forget(self, keys: list[str]) -> None:
        """Units embedded anew get a fresh number, so their parts never take the names of
        the parts they replace (those may still be read for reuse, and the index tells parts
        apart by name)."""
        for key in keys:
            (self.manifest.unit_ids or {}).pop(key, None)

    @property
    def retired(self) -> list[UnitRecord]:
        """Units replaced or removed by a run that has not completed yet: out of the folder's
        vectors, but their parts kept (and read for reuse) until a run completes."""
        return list(self.manifest.retired or [])

    def retire(self, keys: list[str]) -> None:
        """Take the units out of the folder's vectors in one manifest write; their parts stay
        on disk, named under `retired`, until `clear_retired`."""
        with self._mutex:
            records = [self.units.pop(k) for k in keys if k in self.units]
            self.manifest.retired = self.retired + [r for r in records if r.complete]
            self.unit_ids_forget(keys)
            self.save_locked()

    def clear_retired(self) -> list[str]:
        """Forget the retired units (one manifest write); returns their files to remove."""
        files = [f for r in self.retired for f in r.files]
        if self.manifest.retired:
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
        """Set top-level fields of the manifest (its `Manifest` attributes) in one write."""
        with self._mutex:
            for name, value in fields.items():
                if name in ("units", "extra") or not hasattr(self.manifest, name):
                    raise TypeError(f"the manifest has no field {name!r} to update")
                setattr(self.manifest, name, value)
            self.save_locked()

    def save_locked(self) -> None:
        self.manifest.updated = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        self._version = self.store.write_bytes_if(MANIFEST, self.manifest.to_bytes(),
                                                  self._version)

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
                           tuple(c.footer for c in checks) if all(checks) else None,
                           stored_precision(self.manifest))

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

    def multivector_files(self) -> list[str]:
        """A multi-vector folder's token-vector parts, in row order (io/multivectors.py)."""
        return [f for r in self.complete_units() for f in r.multivector_files]


# What an output folder holds besides its manifest; anything else without a manifest is foreign.
OWN_ENTRIES = {LOCK, "vectors", "rejects", "tokens", "index", "heads", "multivectors", "_scan"}


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
