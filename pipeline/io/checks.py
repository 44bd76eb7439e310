"""What the manifest records of each committed Parquet file, and checking a file against it: its
size, its row count and a hash of its footer (a stat and one small read, never the data)."""
from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq

from .storage import Store

MAGIC = b"PAR1"
TAIL = 8  # a Parquet file ends with its footer's length (4 bytes, little-endian) and PAR1


@dataclass(frozen=True)
class FileCheck:
    bytes: int
    rows: int
    footer: str  # sha256 of the footer, first 16 hex digits

    def to_json(self) -> dict:
        return {"bytes": self.bytes, "rows": self.rows, "footer": self.footer}

    @classmethod
    def from_json(cls, data: dict) -> "FileCheck":
        return cls(int(data["bytes"]), int(data["rows"]), str(data["footer"]))


class DamagedFile(Exception):
    """A committed file is missing, or is not what the manifest recorded."""


def check_file(store: Store, rel: str) -> FileCheck:
    """The file as it is now; DamagedFile saying why when it is missing or not a whole Parquet
    file."""
    try:
        size = store.size(rel)
        if size < len(MAGIC) + TAIL:
            raise DamagedFile(f"{rel}: {size} bytes, too short for a Parquet file")
        with store.fs.open(store.path(rel), "rb") as handle:
            handle.seek(size - TAIL)
            tail = handle.read(TAIL)
            length = struct.unpack("<I", tail[:4])[0]
            if tail[4:] != MAGIC or length + TAIL + len(MAGIC) > size:
                raise DamagedFile(f"{rel}: no whole Parquet footer at its end (truncated or "
                                  f"overwritten)")
            handle.seek(size - TAIL - length)
            footer = handle.read(length)
    except FileNotFoundError:
        raise DamagedFile(f"{rel}: missing") from None
    except OSError as exc:
        raise DamagedFile(f"{rel}: cannot be read ({exc.strerror or exc})") from None
    try:
        rows = pq.read_metadata(pa.BufferReader(MAGIC + footer + tail)).num_rows
    except (pa.ArrowException, OSError) as exc:
        raise DamagedFile(f"{rel}: its footer cannot be parsed ({exc})") from None
    return FileCheck(size, rows, hashlib.sha256(footer).hexdigest()[:16])


def damage(store: Store, rel: str, recorded: FileCheck | None) -> str | None:
    """Why the file does not match its record (None when it does). Without a record (manifests
    written before checks were kept) only its presence and footer are checked."""
    try:
        found = check_file(store, rel)
    except DamagedFile as exc:
        return str(exc)
    if recorded is None or found == recorded:
        return None
    differ = [f"{name} {getattr(recorded, name)} recorded, {getattr(found, name)} found"
              for name in ("bytes", "rows", "footer") if getattr(recorded, name) != getattr(found, name)]
    return f"{rel}: altered since it was committed ({'; '.join(differ)})"
