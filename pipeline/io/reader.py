"""Find input Parquet shards, split them into units of work, and stream their rows.

A unit is one file, or a range of a large file's row groups, so that a unit stays bounded. Units
whose file cannot be used (corrupt, missing column, wrong type) carry the error instead of rows.
"""
from __future__ import annotations

import glob as globlib
import hashlib
import posixpath
from dataclasses import dataclass
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from ..config import ConfigError, InputConfig
from .storage import filesystem, is_local


@dataclass(frozen=True)
class Unit:
    key: str  # stable name: the file path, plus #rgA-B when a file is split
    path: str  # as the filesystem names it (URL for object stores)
    row_groups: tuple[int, ...]
    first_row: int  # row number in the file of the unit's first row
    num_rows: int
    fingerprint: str
    error: str | None = None  # set when the unit cannot be read at all


def list_input_files(path: str) -> tuple[object, list[str]]:
    """A folder (every *.parquet below it), one file, or a glob; sorted. Raises if none."""
    fs, root = filesystem(path)
    if globlib.has_magic(root):
        files = [f for f in fs.glob(root) if fs.isfile(f)]
    elif fs.isdir(root):
        files = [f for f in fs.find(root) if f.endswith(".parquet")
                 and not posixpath.basename(f).startswith((".", "_"))]
    elif fs.exists(root):
        files = [root]
    else:
        raise ConfigError(f"input.path: nothing found at {path}")
    if not files:
        raise ConfigError(f"input.path: no *.parquet files under {path}")
    return fs, sorted(files)


def refuse_overlap(input_path: str, output_path: str) -> None:
    """An output folder at, inside or around the input's folder would have later runs read their
    own parts as input (or sweep the input away): refuse it, for paths, globs and URLs alike."""
    in_fs, in_root = filesystem(input_path)
    out_fs, out_root = filesystem(output_path)
    if _protocol(in_fs) != _protocol(out_fs):
        return
    if globlib.has_magic(in_root):
        in_root = posixpath.dirname(in_root[:min(in_root.index(c) for c in "*?[" if c in in_root)])
    elif in_fs.isfile(in_root):  # one file: only an output folder around it overlaps
        if _inside(in_root, out_root):
            raise ConfigError(f"input.path {input_path} lies inside output.path {output_path}; "
                              f"keep inputs out of the output folder")
        return
    if _inside(out_root, in_root) or _inside(in_root, out_root):
        raise ConfigError(
            f"output.path {output_path} and input.path {input_path} overlap: later runs would "
            f"read their own vector parts as input. Put the output folder outside the input folder")


def _protocol(fs) -> str:
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return {"s3a": "s3", "gcs": "gs"}.get(protocol, protocol)


def _inside(path: str, folder: str) -> bool:
    """path is folder or lies below it (POSIX paths, no trailing slash)."""
    path, folder = path.rstrip("/"), folder.rstrip("/")
    return path == folder or path.startswith(folder + "/")


def _fingerprint(info: dict, metadata: pq.FileMetaData | None) -> str:
    digest = hashlib.sha256(f"{info.get('size')}|{info.get('mtime') or info.get('LastModified')}"
                            f"|{info.get('ETag', '')}".encode())
    if metadata is not None:
        digest.update(metadata.schema.to_arrow_schema().to_string().encode())
        for i in range(metadata.num_row_groups):
            group = metadata.row_group(i)
            digest.update(f"{group.num_rows}|{group.total_byte_size}".encode())
            for c in range(group.num_columns):
                chunk = group.column(c)
                digest.update(f"{chunk.file_offset}|{chunk.total_compressed_size}".encode())
    return digest.hexdigest()[:16]


def _schema_error(schema: pa.Schema, cfg: InputConfig, keep_columns: tuple[str, ...]) -> str | None:
    names = schema.names
    texts = [cfg.text_column] + ([cfg.text_pair_column] if cfg.text_pair_column else [])
    for column in (cfg.id_column, *texts, *keep_columns):
        if column not in names:
            return f"no column {column!r}; the file has: {', '.join(names)}"
    for column in texts:
        text_type = schema.field(column).type
        if pa.types.is_dictionary(text_type):
            text_type = text_type.value_type
        if not (pa.types.is_string(text_type) or pa.types.is_large_string(text_type)
                or pa.types.is_string_view(text_type)):
            return f"text column {column!r} is {text_type}, not a string type"
    id_type = schema.field(cfg.id_column).type
    if not (pa.types.is_integer(id_type) or pa.types.is_string(id_type)
            or pa.types.is_large_string(id_type)):
        return f"id column {cfg.id_column!r} is {id_type}; ids must be integers or strings"
    return None


def open_parquet(fs, path: str) -> pq.ParquetFile:
    """The file's footer read; ConfigError naming the file when it is not a whole Parquet file."""
    try:
        return pq.ParquetFile(path if is_local(fs) else fs.open(path, "rb"))
    except (pa.ArrowException, OSError) as exc:
        raise ConfigError(f"{path}: unreadable Parquet file ({exc})") from None


def plan_units(cfg: InputConfig, keep_columns: tuple[str, ...] = ()) -> list[Unit]:
    """Read every footer (not the data) and cut the input into units."""
    fs, files = list_input_files(cfg.path)
    units: list[Unit] = []
    for path in files:
        name = path if is_local(fs) else fs.unstrip_protocol(path)
        info = fs.info(path)
        try:
            metadata = open_parquet(fs, path).metadata
        except ConfigError as exc:
            units.append(Unit(name, name, (), 0, 0, _fingerprint(info, None), error=str(exc)))
            continue
        fingerprint = _fingerprint(info, metadata)
        error = _schema_error(metadata.schema.to_arrow_schema(), cfg, keep_columns)
        if error:
            units.append(Unit(name, name, (), 0, metadata.num_rows, fingerprint, error=error))
            continue
        groups = [metadata.row_group(i).num_rows for i in range(metadata.num_row_groups)]
        if sum(groups) <= cfg.unit_rows:
            units.append(Unit(name, name, tuple(range(len(groups))), 0, sum(groups), fingerprint))
            continue
        start, first_row = 0, 0
        while start < len(groups):
            end, rows = start, 0
            while end < len(groups) and (end == start or rows + groups[end] <= cfg.unit_rows):
                rows += groups[end]
                end += 1
            units.append(Unit(f"{name}#rg{start}-{end - 1}", name, tuple(range(start, end)),
                              first_row, rows, fingerprint))
            start, first_row = end, first_row + rows
    if all(u.error and u.error.startswith("no column") for u in units):
        raise ConfigError(f"no input file has the configured columns: {units[0].error} "
                          f"(first file: {units[0].path})")
    return units


def read_unit(unit: Unit, columns: list[str], batch_rows: int) -> Iterator[tuple[pa.RecordBatch, int]]:
    """Stream (record batch, row number of its first row) over the unit's row groups."""
    fs, _ = filesystem(unit.path)
    path = unit.path if is_local(fs) else fs._strip_protocol(unit.path)
    parquet = open_parquet(fs, path)
    row = unit.first_row
    if not unit.row_groups:
        return
    for batch in parquet.iter_batches(batch_size=batch_rows, row_groups=list(unit.row_groups),
                                      columns=columns):
        yield batch, row
        row += batch.num_rows
