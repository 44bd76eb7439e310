"""What the manifest records of each committed Parquet file, and checking a file against it: its
size, its row count, a hash of its footer (a stat and one small read: the quick check) and a
digest of every byte (sha256 of the whole file: the full check, one sequential read).

The digest is over the file as written, not over decoded column values: it needs no Parquet
reader, covers data pages, page headers and footer alike, and is what `sha256sum` prints. Parts
also carry Parquet page checksums (CRC32, written and verified on every read: `PAGE_CHECKSUMS`),
so a reader that never looks at the manifest still refuses a changed page."""
from __future__ import annotations

import hashlib
import struct
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from .storage import Store

MAGIC = b"PAR1"
TAIL = 8  # a Parquet file ends with its footer's length (4 bytes, little-endian) and PAR1
DIGEST_BLOCK = 8 << 20
# pyarrow options: a CRC per data page written (ParquetWriter), checked on every read (ParquetFile)
WRITE_CHECKSUMS = {"write_page_checksum": True}
PAGE_CHECKSUMS = {"page_checksum_verification": True}


@dataclass(frozen=True)
class FileCheck:
    bytes: int
    rows: int
    footer: str  # sha256 of the footer, first 16 hex digits
    digest: str | None = None  # sha256 of the whole file, first 32 hex digits (None: not known)

    def to_json(self) -> dict:
        data = {"bytes": self.bytes, "rows": self.rows, "footer": self.footer}
        if self.digest is not None:
            data["digest"] = self.digest
        return data

    @classmethod
    def from_json(cls, data: dict) -> "FileCheck":
        digest = data.get("digest")
        return cls(int(data["bytes"]), int(data["rows"]), str(data["footer"]),
                   str(digest) if digest is not None else None)


class DamagedFile(Exception):
    """A committed file is missing, or is not what the manifest recorded."""


REPAIR_PART = "`embedpipe run` on the same job re-embeds its unit"


@contextmanager
def reading(rel: str, repair: str = REPAIR_PART) -> Iterator[None]:
    """Reading a committed file: a page that fails its checksum, or a file that cannot be read,
    is DamagedFile naming the file and the command that repairs it."""
    try:
        yield
    except FileNotFoundError:
        raise DamagedFile(f"{rel}: missing; {repair}") from None
    except (OSError, pa.ArrowInvalid) as exc:
        raise DamagedFile(f"{rel}: damaged, cannot be read ({' '.join(str(exc).split())}); "
                          f"{repair}") from None


def file_digest(store: Store, rel: str) -> str:
    """sha256 of every byte of the file, first 32 hex digits (OSError when it cannot be read)."""
    digest = hashlib.sha256()
    with store.fs.open(store.path(rel), "rb") as handle:
        while block := handle.read(DIGEST_BLOCK):
            digest.update(block)
    return digest.hexdigest()[:32]


def check_file(store: Store, rel: str, full: bool = False) -> FileCheck:
    """The file as it is now (with `full`, its digest too: every byte read); DamagedFile saying
    why when it is missing or not a whole Parquet file."""
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
    footer_hash = hashlib.sha256(footer).hexdigest()[:16]
    if not full:
        return FileCheck(size, rows, footer_hash)
    try:
        return FileCheck(size, rows, footer_hash, file_digest(store, rel))
    except OSError as exc:
        raise DamagedFile(f"{rel}: cannot be read ({exc.strerror or exc})") from None


def damage(store: Store, rel: str, recorded: FileCheck | None, full: bool = False) -> str | None:
    """Why the file does not match its record (None when it does). Without a record (manifests
    written before checks were kept) only its presence and footer are checked; `full` reads
    every byte and compares the digest where the record has one (records written before digests
    were kept: size, rows and footer only)."""
    try:
        found = check_file(store, rel, full=full and recorded is not None
                           and recorded.digest is not None)
    except DamagedFile as exc:
        return str(exc)
    if recorded is None:
        return None
    if full and recorded.digest is None:  # no digest to compare: its pages' checksums, if any
        try:
            with reading(rel), store.open_input(rel) as handle:
                pq.read_table(handle, **PAGE_CHECKSUMS)
        except DamagedFile as exc:
            return str(exc)
    names = ("bytes", "rows", "footer") + (("digest",) if found.digest is not None else ())
    differ = [f"{name} {getattr(recorded, name)} recorded, {getattr(found, name)} found"
              for name in names if getattr(recorded, name) != getattr(found, name)]
    if not differ:
        return None
    if differ == [d for d in differ if d.startswith("digest")]:
        return (f"{rel}: its bytes changed since it was committed (same size and footer, "
                f"another sha256: {recorded.digest} recorded, {found.digest} found)")
    return f"{rel}: altered since it was committed ({'; '.join(differ)})"
