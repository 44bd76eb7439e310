"""Job configuration: a frozen dataclass tree loaded from TOML and validated at load.

Every key has a type and, where it is an enumeration, a closed set of values; an unknown
key or a bad value raises ConfigError naming the key and what is allowed.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_MODEL = "all-MiniLM-L6-v2"


class ConfigError(ValueError):
    """The job file (or an override) is not valid; the message names the key."""


# Named pooling modes are presets of the general (layers, layer_combine, token_pooling) form.
POOLING_PRESETS: dict[str, tuple[tuple[int, ...], str, str]] = {
    "cls": ((-1,), "concat", "cls"),
    "mean": ((-1,), "concat", "mean"),
    "max": ((-1,), "concat", "max"),
    "concat-last-four": ((-4, -3, -2, -1), "concat", "mean"),
}


@dataclass(frozen=True)
class InputConfig:
    path: str = "data/movie_reviews"
    text_column: str = "text"
    id_column: str = "id"
    # Sentence pairs: each row is encoded as (text, text pair), [CLS] a [SEP] b [SEP] with
    # segment ids 0 / 1 (or the family's own pair template)
    text_pair_column: str | None = None
    pair_truncation: str = "longest_first"  # longest_first | only_second
    # A Parquet file larger than this many rows is split into row-group ranges (units of work).
    unit_rows: int = 1_000_000


@dataclass(frozen=True)
class ModelConfig:
    name: str = DEFAULT_MODEL
    max_length: int | None = None  # None: the model's own limit
    device: str = "auto"
    dtype: str = "float32"
    # torch.compile the model: ~1.5x on CPU bf16, ~15-30 s to compile first. auto: when the input
    # (all its rows, done or not, so a rerun decides alike) is long enough to repay that
    compile: bool | str = "auto"
    # auto: embedpipe's kernel for bf16 on CPU (amx on AMX CPUs, avx512 on AVX-512 BF16 ones),
    # FA2 on CUDA if installed, else SDPA, or eager for model classes without SDPA (MPNet, DeBERTa)
    attention: str = "auto"
    # auto: embedpipe's fused forward (fused_forward.py) for BERT-family models run eagerly on a
    # CPU with oneDNN, transformers' forward otherwise
    forward: str = "auto"


@dataclass(frozen=True)
class EncodeConfig:
    # auto: the pooling a sentence-transformers folder was trained with (1_Pooling), else mean
    pooling: str = "auto"
    layers: tuple[int, ...] | None = None
    layer_combine: str | None = None
    token_pooling: str | None = None
    normalize: bool | None = None  # None: as the model folder says (a Normalize module), else no
    prompt: str | None = None  # put before every text, e.g. "passage: "
    prompt_name: str | None = None  # or one of the model folder's prompts, by name
    query_prompt: str | None = None  # for search queries; None: the folder's "query" prompt
    batch_tokens: int | None = None  # None: by device, see token_budget
    max_batch_size: int = 256
    sort_window: int = 4096
    # Texts longer than one window: truncate (embed the first max_length tokens, flag truncated),
    # chunk (embed every window of chunk_tokens tokens, chunk_overlap shared), reject ("too long")
    long_text: str = "truncate"
    chunk_tokens: int | None = None  # content tokens a window; None: max_length less specials, prompt
    chunk_overlap: int = 32
    max_chunks: int = 1024  # windows a text at most; past them the text is flagged truncated
    # Rows of new, changed or renamed input whose (id, text hash) - or text hash alone, with
    # "content" - already has a vector in the folder take it instead of being encoded; "off"
    # encodes every such row. Vectors do not depend on it, so it is not a vector setting.
    reuse: str = "id+content"

    def token_budget(self, device_type: str) -> int:
        """batch_tokens, or by device: 4,096 on CPU, where a batch's activations then stay in
        cache (float32 ran 20% faster than at 8,192 here; bfloat16 the same), 8,192 on CUDA."""
        if self.batch_tokens is not None:
            return self.batch_tokens
        return 8192 if device_type == "cuda" else 4096

    def pooling_spec(self) -> tuple[tuple[int, ...], str, str] | None:
        """The effective (layers, layer_combine, token_pooling); None for the model's pooler."""
        if self.pooling == "auto":
            raise ValueError("pooling 'auto' is resolved against the model first (resolve_recipe)")
        if self.pooling == "pooler":
            return None
        layers, combine, token = POOLING_PRESETS[self.pooling]
        return (self.layers or layers, self.layer_combine or combine, self.token_pooling or token)


@dataclass(frozen=True)
class OutputConfig:
    path: str = ""  # default: out/<job name>
    vector_dtype: str = "float32"
    rows_per_file: int = 100_000
    keep_columns: tuple[str, ...] = ()
    dimensions: int | None = None  # Matryoshka: keep the first N dimensions (re-normalised)
    # encode.long_text = "chunk": pool (one row a text: its windows' token-weighted mean) or rows
    # (one row a window, with its token and character offsets)
    chunks: str = "pool"
    # Token-level vectors, in a token table beside the text vectors (tokens/): text (none), subword
    # (a row per token), word (a row per word: its first sub-token's vector, or their mean)
    granularity: str = "text"
    word_pooling: str = "first"  # first | mean
    special_tokens: bool = False  # subword: rows for the model's special tokens ([CLS], [SEP])


@dataclass(frozen=True)
class IndexConfig:
    enabled: bool = True
    type: str = "flat"
    metric: str = "ip"
    hnsw_m: int = 32
    ef_construction: int = 200
    ef_search: int = 128
    nlist: int | None = None
    nprobe: int | None = None
    pq_m: int | None = None
    factory: str | None = None
    max_memory: str = "4GB"
    # IVF kinds only: single (one index in RAM), shards (one IVF index per group of parts,
    # searched together, memory-mapped), ondisk (shards merged into memory-mapped lists)
    layout: str = "single"
    shard_rows: int = 1_000_000  # shards/ondisk: consecutive parts grouped up to this many rows


@dataclass(frozen=True)
class SinkConfig:
    """One `[[sink]]`: a vector store kept in step with the folder (pipeline/sinks/)."""
    kind: str  # lancedb | pgvector
    table: str
    name: str = ""  # how commands and the manifest name it; default: the table
    uri: str | None = None  # lancedb: a local path or object-store URI
    dsn_env: str = "EMBEDPIPE_PG_DSN"  # pgvector: the variable holding the connection string
    vector_type: str = "vector"  # pgvector: vector | halfvec
    index: str = "none"  # pgvector: none | hnsw | ivfflat, built after the load


@dataclass(frozen=True)
class JobConfig:
    name: str
    input: InputConfig = field(default_factory=InputConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    encode: EncodeConfig = field(default_factory=EncodeConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    index: IndexConfig = field(default_factory=IndexConfig)
    sink: tuple[SinkConfig, ...] = ()  # [[sink]] tables; they change no vector

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def vector_settings(self) -> dict[str, Any]:
        """Everything that changes a stored row: its vector or its columns (not batch sizes).
        Runs record them resolved against the model (pooling 'auto' made concrete)."""
        spec = None if self.encode.pooling == "auto" else self.encode.pooling_spec()
        return {
            "model.name": self.model.name,
            "model.max_length": self.model.max_length,
            "model.dtype": self.model.dtype,
            "encode.pooling": self.encode.pooling,
            "encode.pooling_spec": None if spec is None else {
                "layers": list(spec[0]), "layer_combine": spec[1], "token_pooling": spec[2]},
            "encode.normalize": self.encode.normalize,
            "output.vector_dtype": self.output.vector_dtype,
            "output.keep_columns": list(self.output.keep_columns),
            # recorded only when set, so folders made before these settings existed still match
            **({"encode.prompt": self.encode.prompt} if self.encode.prompt else {}),
            **({"input.text_pair": True, "input.pair_truncation": self.input.pair_truncation}
               if self.input.text_pair_column else {}),
            **({"output.dimensions": self.output.dimensions} if self.output.dimensions else {}),
            **self.chunk_settings(),
            **self.token_settings(),
        }

    def token_settings(self) -> dict[str, Any]:
        """What the token table holds, recorded only when there is one (folders made before
        token-level output existed still match)."""
        out = self.output
        if out.granularity == "text":
            return {}
        return {"output.granularity": out.granularity,
                **({"output.word_pooling": out.word_pooling} if out.granularity == "word" else
                   {"output.special_tokens": out.special_tokens})}

    def chunk_settings(self) -> dict[str, Any]:
        """How long texts are cut, recorded only when they are not truncated (folders made before
        chunking existed still match)."""
        enc = self.encode
        if enc.long_text == "truncate":
            return {}
        settings = {"encode.long_text": enc.long_text, "encode.chunk_tokens": enc.chunk_tokens}
        if enc.long_text == "chunk":
            settings.update({"encode.chunk_overlap": enc.chunk_overlap,
                             "encode.max_chunks": enc.max_chunks,
                             "output.chunks": self.output.chunks})
        return settings


CHOICES: dict[str, tuple[str, ...]] = {
    "input.pair_truncation": ("longest_first", "only_second"),
    "model.dtype": ("auto", "float32", "bfloat16", "float16", "int8"),
    "model.attention": ("auto", "sdpa", "eager", "amx", "avx512", "flash_attention_2"),
    "model.compile": ("auto",),
    "model.forward": ("auto", "fused", "transformers"),
    "encode.pooling": ("auto", "cls", "mean", "max", "concat-last-four", "pooler"),
    "encode.layer_combine": ("concat", "mean", "sum"),
    "encode.token_pooling": ("mean", "cls", "max"),
    "encode.long_text": ("truncate", "chunk", "reject"),
    "encode.reuse": ("id+content", "content", "off"),
    "output.chunks": ("pool", "rows"),
    "output.granularity": ("text", "subword", "word"),
    "output.word_pooling": ("first", "mean"),
    "output.vector_dtype": ("float32", "float16"),
    "index.type": ("flat", "hnsw", "ivf-flat", "ivf-pq", "auto", "factory"),
    "index.metric": ("ip", "l2"),
    "index.layout": ("single", "shards", "ondisk"),
}
POSITIVE = {
    "input.unit_rows", "model.max_length", "encode.batch_tokens", "encode.max_batch_size",
    "encode.sort_window", "output.rows_per_file", "index.hnsw_m", "index.ef_construction",
    "index.ef_search", "index.nlist", "index.nprobe", "index.pq_m", "index.shard_rows",
    "output.dimensions", "encode.chunk_tokens", "encode.max_chunks",
}
_SECTION_CLASSES = {
    "input": InputConfig, "model": ModelConfig, "encode": EncodeConfig,
    "output": OutputConfig, "index": IndexConfig,
}


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
    cls = _SECTION_CLASSES[name]
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
    parse_memory(job.index.max_memory)
    reserved = [c for c in job.output.keep_columns if c in STORED_COLUMNS]
    repeated = sorted({c for c in job.output.keep_columns if job.output.keep_columns.count(c) > 1})
    if reserved or repeated:
        raise ConfigError(
            "output.keep_columns: " + "; ".join(
                ([f"{', '.join(map(repr, reserved))} would clash with the stored column of that "
                  f"name ({', '.join(STORED_COLUMNS)} are embedpipe's own)"] if reserved else [])
                + ([f"{', '.join(map(repr, repeated))} named twice"] if repeated else [])))


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
STORED_COLUMNS = ("id", "vector", "n_tokens", "truncated", "text_hash", "n_chunks", "chunk",
                  "token_start", "token_end", "char_start", "char_end")


SINK_KEYS = {"lancedb": ("kind", "name", "table", "uri"),
             "pgvector": ("kind", "name", "table", "dsn_env", "vector_type", "index")}
SINK_CHOICES = {"vector_type": ("vector", "halfvec"), "index": ("none", "hnsw", "ivfflat")}
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
    unknown = sorted(set(raw) - set(_SECTION_CLASSES))
    if unknown:
        raise ConfigError(
            f"unknown key {unknown[0]!r}; a job accepts: name, {', '.join(_SECTION_CLASSES)}, sink"
        )
    sections = {k: _build_section(k, raw.get(k, {})) for k in _SECTION_CLASSES}
    if not sections["output"].path:
        sections["output"] = dataclasses.replace(sections["output"], path=f"out/{name}")
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
