"""OUT/manifest.json: what made an output folder, and which units of work it holds.

The manifest is the commit point. A unit's record is added only after all its files are in
place, and the manifest is replaced whole (atomically), so after a crash it names only complete
units; files it does not name are strays from the interrupted run and are swept.
"""
from __future__ import annotations

import json
import os
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any

from .config import settings_differences
from .storage import ConcurrentWrite, Store

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


class Ledger:
    def __init__(self, store: Store):
        self.store = store
        self._mutex = threading.Lock()
        # On object stores the manifest is written only over the version read here (If-Match),
        # so two writers can never both commit on top of the same manifest.
        self._version = store.version(MANIFEST)
        self.data: dict[str, Any] = store.read_json(MANIFEST) if store.exists(MANIFEST) else {}
        self.data.setdefault("format", FORMAT)
        self.data.setdefault("units", {})
        self.data.setdefault("next_unit_id", 0)

    @property
    def units(self) -> dict[str, dict]:
        return self.data["units"]

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
        if record is not None:
            return record["unit_id"]
        with self._mutex:
            self.data.setdefault("unit_ids", {})
            if key not in self.data["unit_ids"]:
                self.data["unit_ids"][key] = self.data["next_unit_id"]
                self.data["next_unit_id"] += 1
            return self.data["unit_ids"][key]

    def commit_unit(self, key: str, record: dict[str, Any]) -> None:
        with self._mutex:
            self.units[key] = record
            self.save_locked()

    def drop_units(self, keys: list[str]) -> None:
        with self._mutex:
            for key in keys:
                self.units.pop(key, None)
            self.save_locked()

    def update(self, **fields: Any) -> None:
        with self._mutex:
            self.data.update(fields)
            self.save_locked()

    def save_locked(self) -> None:
        self.data["updated"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        body = json.dumps(self.data, indent=2, default=str).encode() + b"\n"
        self._version = self.store.write_bytes_if(MANIFEST, body, self._version)

    def files(self, kind: str) -> list[str]:
        """Committed files of a kind ('vectors' or 'rejects') in unit order."""
        records = sorted(self.units.values(), key=lambda r: (r["path"], r["first_row"]))
        return [f for r in records if r["status"] == "complete" for f in r.get(kind, [])]


def _process_alive(pid: int) -> bool:
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
        holder = store.read_json(LOCK)
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
