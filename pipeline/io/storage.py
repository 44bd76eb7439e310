"""Output folder access through fsspec: local paths or object-store URLs, files that appear whole.

On a local disk a file is written under a temporary name and renamed into place (atomic). Object
stores have no atomic rename, so there a file is written straight to its name and the manifest is
the commit point: a part counts only once the manifest names it, and strays are swept on resume.
"""
from __future__ import annotations

import json
import os
import posixpath
import uuid
from contextlib import contextmanager
from typing import Any, BinaryIO, Iterator

import fsspec
import pyarrow as pa
from fsspec.implementations.local import LocalFileSystem

TMP_MARK = ".tmp-"


class ConcurrentWrite(RuntimeError):
    """A conditional write found the object changed since it was read."""


def filesystem(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path) for a local path or any fsspec URL; credentials come from the environment."""
    fs, path = fsspec.core.url_to_fs(url)
    if isinstance(fs, LocalFileSystem):
        path = os.path.abspath(path)
    return fs, path


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return isinstance(fs, LocalFileSystem)


class Store:
    """A folder of outputs addressed by relative POSIX paths."""

    def __init__(self, url: str):
        self.url = url
        self.fs, self.root = filesystem(url)
        self.local = is_local(self.fs)

    def path(self, rel: str) -> str:
        return posixpath.join(self.root, rel)

    def uri(self, rel: str = "") -> str:
        """A path other libraries (pyarrow, faiss) can open: local path or protocol URL."""
        full = self.path(rel) if rel else self.root
        return full if self.local else self.fs.unstrip_protocol(full)

    def exists(self, rel: str) -> bool:
        return self.fs.exists(self.path(rel))

    def makedirs(self, rel: str) -> None:
        self.fs.makedirs(self.path(rel), exist_ok=True)

    def listdir(self, rel: str) -> list[str]:
        """Names directly inside rel (files only), sorted; [] when it does not exist."""
        try:
            entries = self.fs.ls(self.path(rel), detail=True)
        except FileNotFoundError:
            return []
        return sorted(posixpath.basename(e["name"]) for e in entries if e["type"] == "file")

    def entries(self, rel: str = "") -> list[str]:
        """Names directly inside rel, files and folders alike; [] when it does not exist."""
        try:
            return sorted(posixpath.basename(e.rstrip("/")) for e in self.fs.ls(self.path(rel),
                                                                               detail=False))
        except (FileNotFoundError, NotADirectoryError):
            return []

    def remove(self, rel: str) -> None:
        try:
            self.fs.rm_file(self.path(rel))
        except FileNotFoundError:
            pass

    def size(self, rel: str) -> int:
        return int(self.fs.size(self.path(rel)))

    @contextmanager
    def open_atomic(self, rel: str) -> Iterator[BinaryIO]:
        """Open rel for writing; it appears under its name only if the block completes."""
        final = self.path(rel)
        self.fs.makedirs(posixpath.dirname(final), exist_ok=True)
        if not self.local:
            with self.fs.open(final, "wb") as handle:
                yield handle
            return
        directory, name = posixpath.split(final)
        tmp = posixpath.join(directory, f".{name}{TMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}")
        try:
            with open(tmp, "wb") as handle:
                yield handle
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, final)
            _fsync_dir(directory)
        except BaseException as exc:
            if os.path.exists(tmp):
                os.remove(tmp)
            if isinstance(exc, OSError):
                raise with_filename(exc, final) from exc
            raise

    def write_bytes(self, rel: str, data: bytes) -> None:
        with self.open_atomic(rel) as handle:
            handle.write(data)

    @property
    def conditional_writes(self) -> bool:
        """S3 (and S3-compatible servers) accept If-Match / If-None-Match on PUT."""
        protocols = self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,)
        return not self.local and bool({"s3", "s3a"} & set(protocols))

    def version(self, rel: str) -> str | None:
        """The object's ETag where writes can be conditional on it; None if absent or unsupported."""
        if not self.conditional_writes:
            return None
        self.fs.invalidate_cache(self.path(rel))
        try:
            return self.fs.info(self.path(rel)).get("ETag")
        except FileNotFoundError:
            return None

    def write_bytes_if(self, rel: str, data: bytes, expected: str | None) -> str | None:
        """Write only if the object is still at version `expected` (None: only if it is absent).

        Raises ConcurrentWrite when someone else wrote it meanwhile. On a local disk (one host,
        guarded by the lock file) and on stores without conditional writes, a plain atomic write.
        """
        if not self.conditional_writes:
            self.write_bytes(rel, data)
            return None
        path = self.path(rel)
        try:
            if expected is None:
                self.fs.pipe_file(path, data, mode="create")
            else:
                self.fs.pipe_file(path, data, IfMatch=expected)
        except (FileExistsError, OSError) as exc:
            raise ConcurrentWrite(f"{self.uri(rel)} was changed by another writer: {exc}") from exc
        return self.version(rel)

    def open_input(self, rel: str) -> BinaryIO:
        """The file opened for pyarrow to read: a native file where the folder is local, else
        the filesystem's handle. Native reads need no GIL: through a Python handle, Arrow's
        decoding threads free the bytes they read under the GIL, and one still doing so when
        the interpreter exits aborts the process ("terminate called without an active
        exception") after the command has done its work."""
        return pa.OSFile(self.path(rel)) if self.local else self.fs.open(self.path(rel), "rb")

    def read_bytes(self, rel: str) -> bytes:
        with self.fs.open(self.path(rel), "rb") as handle:
            return handle.read()

    def write_json(self, rel: str, obj: Any) -> None:
        self.write_bytes(rel, json.dumps(obj, indent=2, sort_keys=False, default=str).encode() + b"\n")

    def read_json(self, rel: str) -> Any:
        return json.loads(self.read_bytes(rel))

    def sweep_temporaries(self, rel: str) -> list[str]:
        """Remove files a killed writer left under temporary names; returns their names."""
        stale = [n for n in self.listdir(rel) if TMP_MARK in n]
        for name in stale:
            self.remove(posixpath.join(rel, name))
        return stale


def with_filename(exc: OSError, path: str) -> OSError:
    """A full disk or a dropped mount says so without naming the file: name it."""
    if exc.filename or not exc.errno:
        return exc
    return OSError(exc.errno, exc.strerror, path)


def _fsync_dir(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
