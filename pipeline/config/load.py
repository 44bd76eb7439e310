"""Loading a job: TOML parsed, `--set` overrides applied, every value checked against its
key's type and choices (sections.py), the cross-key rules, and the settings hash."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import tomllib
from pathlib import Path
from typing import Any

from .sections import (CHOICES, POSITIVE, PRECISION_BYTES, REPRESENTATIONS, RESCORE_PRECISIONS,
                       SECTIONS,
                       SINK_CHOICES, SINK_KEYS, JobConfig, SinkConfig)


class ConfigError(ValueError):
    """The job file (or an override) is not valid; the message names the key."""


def _check_value(key: str, value: Any, annotation: Any) -> Any:
    """Coerce/validate one value against its dataclass annotation (as a string under PEP 563)."""
    text = str(annotation)
    optional = "None" in text
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{key}: a value is required")
    if "tuple[int" in text:
        if not isinstance(value, (list, tuple)) or not value or not all(
            isinstance(v, int) and not isinstance(v, bool) for v in value
        ):
            raise ConfigError(f"{key}: expected a non-empty list of integers, got {value!r}")
        return tuple(value)
    if "tuple[str" in text:
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{key}: expected a list of strings, got {value!r}")
        return tuple(value)
    if text.startswith("bool | str"):  # a switch with named modes (model.compile = "auto")
        if isinstance(value, bool) or value in CHOICES[key]:
            return value
        raise ConfigError(f"{key}: expected true, false or {', '.join(map(repr, CHOICES[key]))}, "
                          f"got {value!r}")
    if text.startswith("bool"):
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if text.startswith("int"):
        if not isinstance(value, int) or isinstance(value, bool):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        if key in POSITIVE and value <= 0:
            raise ConfigError(f"{key}: must be positive, got {value}")
        return value
    if not isinstance(value, str):
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    if key in CHOICES and value not in CHOICES[key]:
        raise ConfigError(f"{key}: {value!r} is not one of {', '.join(CHOICES[key])}")
    return value


def _build_section(name: str, raw: Any) -> Any:
    cls = SECTIONS[name]
    if not isinstance(raw, dict):
        raise ConfigError(f"[{name}] must be a table, got {raw!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ConfigError(
            f"unknown key {name}.{unknown[0]}; [{name}] accepts: {', '.join(fields)}"
        )
    values = {k: _check_value(f"{name}.{k}", v, fields[k].type) for k, v in raw.items()}
    return cls(**values)


def _validate(job: JobConfig) -> None:
    device = job.model.device
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", device):
        raise ConfigError(f"model.device: {device!r} is not one of auto, cpu, cuda, cuda:N")
    enc = job.encode
    if enc.pooling == "pooler" and (enc.layers or enc.layer_combine or enc.token_pooling):
        raise ConfigError("encode.pooling = 'pooler' takes no layers / layer_combine / token_pooling")
    if enc.prompt is not None and enc.prompt_name is not None:
        raise ConfigError("encode.prompt and encode.prompt_name: give one of them")
    if enc.batch_tokens is not None and enc.max_batch_size > enc.batch_tokens:
        raise ConfigError("encode.max_batch_size must not exceed encode.batch_tokens")
    if job.index.type == "factory" and not job.index.factory:
        raise ConfigError("index.type = 'factory' needs index.factory (a FAISS index_factory string)")
    if job.index.layout != "single" and job.index.type in ("flat", "hnsw"):
        raise ConfigError(f"index.layout = {job.index.layout!r} needs an IVF index (index.type "
                          f"ivf-flat, ivf-pq, or an IVF factory); got {job.index.type!r}")
    if not job.input.path:
        raise ConfigError("input.path: a value is required")
    if job.input.text_pair_column in (job.input.text_column, job.input.id_column):
        raise ConfigError(f"input.text_pair_column = {job.input.text_pair_column!r} names the "
                          f"text or id column; it names the second text of each pair")
    if enc.chunk_overlap < 0:
        raise ConfigError(f"encode.chunk_overlap: must be 0 or more, got {enc.chunk_overlap}")
    if enc.chunk_tokens is not None and enc.chunk_overlap >= enc.chunk_tokens:
        raise ConfigError(f"encode.chunk_overlap = {enc.chunk_overlap} must be less than "
                          f"encode.chunk_tokens = {enc.chunk_tokens}: windows must move forward")
    if enc.long_text == "chunk" and job.input.text_pair_column:
        raise ConfigError("encode.long_text = 'chunk' cuts single texts into windows; it does not "
                          "take sentence pairs (input.text_pair_column): use 'truncate' or 'reject'")
    if job.output.chunks == "rows" and enc.long_text != "chunk":
        raise ConfigError("output.chunks = 'rows' writes one row per window: it needs "
                          "encode.long_text = 'chunk'")
    _validate_tokens(job)
    _validate_precision(job)
    _validate_representations(job.output.representations)
    parse_memory(job.index.max_memory)
    reserved = [c for c in job.output.keep_columns if c in STORED_COLUMNS]
    repeated = sorted({c for c in job.output.keep_columns if job.output.keep_columns.count(c) > 1})
    if reserved or repeated:
        raise ConfigError(
            "output.keep_columns: " + "; ".join(
                ([f"{', '.join(map(repr, reserved))} would clash with the stored column of that "
                  f"name ({', '.join(STORED_COLUMNS)} are embedpipe's own)"] if reserved else [])
                + ([f"{', '.join(map(repr, repeated))} named twice"] if repeated else [])))


def _validate_representations(names: tuple[str, ...] | None) -> None:
    if names is None:
        return
    unknown = [n for n in names if n not in REPRESENTATIONS]
    if not names or unknown or len(set(names)) != len(names):
        raise ConfigError(f"output.representations: expected a non-empty list of distinct "
                          f"{', '.join(REPRESENTATIONS)}, got {list(names)!r}")


def _resolve_precision(out: Any, raw: Any) -> Any:
    """output.precision made concrete: unset, vector_dtype's value; vector_dtype then follows
    it (float32 under a quantized precision, whose vectors are quantized from float32)."""
    given_dtype = isinstance(raw, dict) and "vector_dtype" in raw
    if out.precision is None:
        return dataclasses.replace(out, precision=out.vector_dtype)
    if given_dtype and out.precision != out.vector_dtype and not (
            out.precision not in ("float32", "float16") and out.vector_dtype == "float32"):
        raise ConfigError(f"output.precision = {out.precision!r} and output.vector_dtype = "
                          f"{out.vector_dtype!r} disagree; vector_dtype is precision's older "
                          f"name: set only precision")
    dtype = out.precision if out.precision in ("float32", "float16") else "float32"
    return dataclasses.replace(out, vector_dtype=dtype)


def _validate_precision(job: JobConfig) -> None:
    """Quantized vectors (output.precision int8 / uint8 / binary / ubinary) are text vectors
    in parts, indexed by the kinds that take their codes (index/family.py) and loaded into
    sinks as their stores take them (sinks/precision.py); the token table takes floats only."""
    precision, rescore = job.output.precision, job.output.rescore_precision
    if rescore and PRECISION_BYTES[rescore] <= PRECISION_BYTES[precision]:
        finer = [k for k in RESCORE_PRECISIONS if PRECISION_BYTES[k] > PRECISION_BYTES[precision]]
        raise ConfigError(f"output.rescore_precision = {rescore!r} keeps no more than "
                          f"output.precision = {precision!r} does: choose a finer one "
                          f"({', '.join(finer)}) or unset it")
    if precision in ("float32", "float16"):
        return
    if job.output.granularity != "text":
        raise ConfigError(f"output.precision = {precision!r} with output.granularity = "
                          f"{job.output.granularity!r}: the token table stores floats only")


def _validate_tokens(job: JobConfig) -> None:
    out = job.output
    if out.granularity == "text":
        if out.special_tokens or out.word_pooling != "first":
            key = "special_tokens" if out.special_tokens else "word_pooling"
            raise ConfigError(f"output.{key} shapes the token table: it needs output.granularity "
                              f"= 'subword' or 'word'")
        return
    if out.granularity == "word" and out.special_tokens:
        raise ConfigError("output.special_tokens = true: special tokens are no word; it applies "
                          "to output.granularity = 'subword'")
    if out.granularity == "subword" and out.word_pooling != "first":
        raise ConfigError("output.word_pooling pools a word's sub-tokens; it applies to "
                          "output.granularity = 'word'")
    if job.encode.long_text == "chunk":
        raise ConfigError(f"output.granularity = {out.granularity!r} takes a text's tokens from "
                          f"one pass of the model; it does not take encode.long_text = 'chunk' "
                          f"(use 'truncate' or 'reject')")
    if job.input.text_pair_column:
        raise ConfigError(f"output.granularity = {out.granularity!r} is for single texts; it "
                          f"does not take sentence pairs (input.text_pair_column)")
    if job.encode.pooling == "pooler":
        raise ConfigError(f"output.granularity = {out.granularity!r} takes token vectors from "
                          f"hidden states; encode.pooling = 'pooler' has none: choose cls, mean, "
                          f"max or concat-last-four")


# The columns of a vector part (besides any kept column), window columns included.
STORED_COLUMNS = ("id", "vector", "n_tokens", "truncated", "text_hash", "faiss_id", "n_chunks",
                  "chunk", "token_start", "token_end", "char_start", "char_end")


_SINK_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")


def _build_sinks(raw: Any) -> tuple[SinkConfig, ...]:
    """`[[sink]]` tables, each checked against its kind's keys (a manifest's recorded config
    lists every field, so a key of another kind is accepted when it holds its default)."""
    if isinstance(raw, dict):
        raw = [raw]
    if not isinstance(raw, list) or not all(isinstance(t, dict) for t in raw):
        raise ConfigError("sink: expected [[sink]] tables")
    defaults = {f.name: f.default for f in dataclasses.fields(SinkConfig)}
    sinks: list[SinkConfig] = []
    for i, table in enumerate(raw):
        where = f"sink[{i}]"
        kind = table.get("kind")
        if kind not in SINK_KEYS:
            raise ConfigError(f"{where}.kind: {kind!r} is not one of {', '.join(SINK_KEYS)}")
        allowed = SINK_KEYS[kind]
        for key, value in table.items():
            if key not in defaults:
                raise ConfigError(f"unknown key {where}.{key}; a {kind} sink accepts: "
                                  f"{', '.join(allowed)}")
            if key not in allowed and value != defaults[key]:
                raise ConfigError(f"{where}.{key}: not a {kind} sink's key; it accepts: "
                                  f"{', '.join(allowed)}")
            if not isinstance(value, str) and not (value is None and key == "uri"):
                raise ConfigError(f"{where}.{key}: expected a string, got {value!r}")
            if key in SINK_CHOICES and value not in SINK_CHOICES[key]:
                raise ConfigError(f"{where}.{key}: {value!r} is not one of "
                                  f"{', '.join(SINK_CHOICES[key])}")
        if not table.get("table"):
            raise ConfigError(f"{where}.table: a value is required (the table to keep in step)")
        sink = SinkConfig(**table)
        sink = dataclasses.replace(sink, name=sink.name or sink.table.rpartition(".")[2])
        if not sink.table or not re.fullmatch(rf"({_SINK_NAME.pattern}\.)?{_SINK_NAME.pattern}",
                                              sink.table):
            raise ConfigError(f"{where}.table: {sink.table!r} is not a table name (letters, "
                              f"digits and _, optionally schema.table)")
        if not _SINK_NAME.fullmatch(sink.name):
            raise ConfigError(f"{where}.name: {sink.name!r}: letters, digits and _ only")
        if kind == "lancedb" and not sink.uri:
            raise ConfigError(f"{where}.uri: a lancedb sink needs uri (a folder or object-store "
                              f"URI for the database)")
        if kind == "pgvector" and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", sink.dsn_env):
            raise ConfigError(f"{where}.dsn_env: {sink.dsn_env!r} is not an environment "
                              f"variable's name; the connection string itself never goes in "
                              f"the job file")
        sinks.append(sink)
    names = [s.name for s in sinks]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ConfigError(f"sink: two sinks are named {twice[0]!r}; give each a distinct name")
    return tuple(sinks)


def parse_memory(text: str) -> int:
    """A size such as 512MB, 4GB or 1.5GiB, in bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)i?B?\s*", text.upper())
    if not match or float(match[1]) <= 0:
        raise ConfigError(f"index.max_memory: {text!r} is not a size like 512MB or 4GB")
    return int(float(match[1]) * 1024 ** " KMGT".index(match[2] or " "))


def parse_override(item: str) -> tuple[list[str], Any]:
    """`section.key=value`; the value is read as TOML when it parses, else taken as a string."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected section.key=value")
    dotted, text = item.split("=", 1)
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        value = text
    return dotted.strip().split("."), value


def config_from_dict(raw: dict[str, Any], default_name: str = "job") -> JobConfig:
    raw = dict(raw)
    name = raw.pop("name", default_name)
    if not isinstance(name, str) or not name:
        raise ConfigError(f"name: expected a non-empty string, got {name!r}")
    sinks = _build_sinks(raw.pop("sink", []))
    unknown = sorted(set(raw) - set(SECTIONS))
    if unknown:
        raise ConfigError(
            f"unknown key {unknown[0]!r}; a job accepts: name, {', '.join(SECTIONS)}, sink"
        )
    sections = {k: _build_section(k, raw.get(k, {})) for k in SECTIONS}
    if not sections["output"].path:
        sections["output"] = dataclasses.replace(sections["output"], path=f"out/{name}")
    sections["output"] = _resolve_precision(sections["output"], raw.get("output", {}))
    job = JobConfig(name=name, **sections, sink=sinks)
    _validate(job)
    return job


def load_job(path: str | Path, overrides: list[str] = ()) -> JobConfig:
    """Load a TOML job file, apply `--set section.key=value` overrides, validate."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"job file not found: {path}") from None
    except IsADirectoryError:
        raise ConfigError(f"job file {path} is a folder; give the path of a .toml file") from None
    except OSError as exc:
        raise ConfigError(f"job file {path} cannot be read: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"job file {path} is not UTF-8 text (byte {exc.start}: "
                          f"{exc.reason}); a job file is TOML text") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    for item in overrides:
        keys, value = parse_override(item)
        target = raw
        for key in keys[:-1]:
            target = target.setdefault(key, {})
            if not isinstance(target, dict):
                raise ConfigError(f"--set {item!r}: {key} is not a table")
        target[keys[-1]] = value
    return config_from_dict(raw, default_name=path.stem)


def settings_differences(recorded: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """'key: recorded -> current' for every setting that differs, sorted by key."""
    keys = sorted(set(recorded) | set(current))
    return [f"{k}: {recorded.get(k)!r} -> {current.get(k)!r}"
            for k in keys if recorded.get(k) != current.get(k)]


def settings_hash(settings: dict[str, Any]) -> str:
    canonical = json.dumps(settings, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]
