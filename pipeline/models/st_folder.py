"""A sentence-transformers model folder, read as sentence-transformers reads it: which module
holds the transformer, the pooling it was trained with, a Normalize module, lower-casing, and its
prompts. Both the current layout (`pooling_mode`, sentence-transformers 5+) and the older one
(`pooling_mode_mean_tokens` ...) are read. Modules embedpipe does not run (Dense, ...) are refused
by name rather than silently skipped."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from ..config import ConfigError
from .multivector_folder import MultiVectorSpec, is_multivector, read_multivector

# sentence-transformers' pooling modes embedpipe computes, as token poolings of the last layer
POOLINGS = {"cls": "cls", "mean": "mean", "max": "max"}
_LEGACY_MODES = {"pooling_mode_cls_token": "cls", "pooling_mode_max_tokens": "max",
                 "pooling_mode_mean_tokens": "mean",
                 "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
                 "pooling_mode_weightedmean_tokens": "weightedmean",
                 "pooling_mode_lasttoken": "lasttoken"}


@dataclass(frozen=True)
class StFolder:
    transformer: Path  # the folder holding config.json, the weights and the tokenizer
    pooling: str | None = None  # cls | mean | max; None without a Pooling module
    include_prompt: bool = True  # prompt tokens count in pooling (sentence-transformers' default)
    normalize: bool = False  # a Normalize module follows the pooling
    lowercase: bool = False  # do_lower_case: texts are lower-cased before tokenizing
    max_seq_length: int | None = None
    prompts: dict[str, str] = field(default_factory=dict)
    default_prompt_name: str | None = None
    similarity: str | None = None  # cosine | dot | euclidean | manhattan
    sparse: "SparseSpec | None" = None  # a SparseEncoder folder (SPLADE): its head and query side
    multivector: MultiVectorSpec | None = None  # a MultiVectorEncoder folder (ColBERT)


@dataclass(frozen=True)
class SparseSpec:
    """A sentence-transformers SparseEncoder folder: the document side is the MLM Transformer's
    logits through SpladePooling; the query side the same, or (inference-free SPLADE) a
    SparseStaticEmbedding behind a Router."""
    pooling: str  # max | sum (SpladePooling's pooling_strategy)
    max_active_dims: int | None = None  # config_sentence_transformers.json's, if set
    query_static: Path | None = None  # the query side's SparseStaticEmbedding folder


def _json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path} cannot be read as JSON: {exc}") from None
    if not isinstance(data, (dict, list)):
        raise ConfigError(f"{path}: expected a JSON object or list")
    return data


def _kind(module_type: str) -> str:
    """The module's class name: 'sentence_transformers.models.Pooling' -> 'Pooling'."""
    return module_type.rsplit(".", 1)[-1]


def read_st_folder(path: Path) -> StFolder | None:
    """The folder's sentence-transformers configuration; None when it has no modules.json."""
    modules_file = path / "modules.json"
    if not modules_file.is_file():
        return None
    modules = _json(modules_file)
    if not isinstance(modules, list) or not modules:
        raise ConfigError(f"{modules_file}: expected a list of modules")
    kinds = [(_kind(str(m.get("type", ""))), path / str(m.get("path", ""))) for m in modules]
    if is_multivector(path):
        spec = read_multivector(path, kinds)
        st = _with_settings(path, {"transformer": kinds[0][1], "multivector": spec})
        return dataclasses.replace(st, prompts={**st.prompts, **dict(spec.prompts)}) \
            if spec.prompts else st
    sparse = _sparse(path, kinds)
    if sparse is not None:
        return _with_settings(path, {"transformer": sparse[0], "sparse": sparse[1]})
    if kinds[0][0] != "Transformer":
        raise ConfigError(f"{modules_file}: the first module is {kinds[0][0]!r}; embedpipe runs "
                          f"folders whose first module is a Transformer")
    transformer = kinds[0][1]
    found: dict = {"transformer": transformer}
    for kind, where in kinds[1:]:
        if kind == "Pooling":
            found.update(_pooling(where / "config.json"))
        elif kind == "Normalize":
            found["normalize"] = True
        else:
            raise ConfigError(
                f"{modules_file}: module {kind!r} is not one embedpipe runs (it runs Transformer, "
                f"Pooling and Normalize); its vectors would differ from sentence-transformers'")
    return _with_settings(path, found)


def _with_settings(path: Path, found: dict) -> StFolder:
    transformer = found["transformer"]
    for name in ("sentence_bert_config.json", "sentence_xlnet_config.json"):
        settings = transformer / name
        if settings.is_file():
            data = _json(settings)
            found["lowercase"] = bool(data.get("do_lower_case", False))
            if isinstance(data.get("max_seq_length"), int):
                found["max_seq_length"] = data["max_seq_length"]
    st_config = path / "config_sentence_transformers.json"
    if st_config.is_file():
        data = _json(st_config)
        prompts = data.get("prompts") or {}
        if not isinstance(prompts, dict) or not all(isinstance(v, str) for v in prompts.values()):
            raise ConfigError(f"{st_config}: prompts must map names to strings")
        found.update(prompts=prompts, default_prompt_name=data.get("default_prompt_name") or None,
                     similarity=data.get("similarity_fn_name"))
    return StFolder(**found)


def _pooling(config_file: Path) -> dict:
    config = _json(config_file)
    mode = config.get("pooling_mode")
    if mode is None:
        active = [m for key, m in _LEGACY_MODES.items() if config.get(key)]
        mode = active if len(active) != 1 else active[0]
        mode = mode or "mean"
    if isinstance(mode, list):
        mode = mode[0] if len(mode) == 1 else tuple(mode)
    if mode not in POOLINGS:
        raise ConfigError(f"{config_file}: pooling mode {mode!r} is not one embedpipe computes "
                          f"({', '.join(POOLINGS)})")
    return {"pooling": POOLINGS[mode], "include_prompt": bool(config.get("include_prompt", True))}


_MLM = ("MLMTransformer", "Transformer")


def _sparse(path: Path, kinds: list[tuple[str, Path]]) -> tuple[Path, SparseSpec] | None:
    """(the MLM transformer's folder, the spec) for a SparseEncoder folder, else None."""
    st_config = path / "config_sentence_transformers.json"
    data = _json(st_config) if st_config.is_file() else {}
    if data.get("model_type") != "SparseEncoder":
        if [k for k, _ in kinds][:2] != ["MLMTransformer", "SpladePooling"]:
            return None
    query_static = None
    if len(kinds) == 1 and kinds[0][0] == "Router":
        router = _json(path / "router_config.json")
        types = {name: _kind(kind) for name, kind in (router.get("types") or {}).items()}
        routes = router.get("structure") or {}
        document = [(types.get(n), path / n) for n in routes.get("document") or ()]
        query = [(types.get(n), path / n) for n in routes.get("query") or ()]
        if [k for k, _ in query] == ["SparseStaticEmbedding"]:
            query_static = query[0][1]
        elif [k for k, _ in query] != [k for k, _ in document]:
            raise ConfigError(f"{path}: a Router whose query side is {[k for k, _ in query]}; "
                              f"embedpipe runs the document side's modules or a "
                              f"SparseStaticEmbedding there")
        kinds = document
    if [k for k, _ in kinds] not in ([m, "SpladePooling"] for m in _MLM):
        raise ConfigError(f"{path}: a SparseEncoder of modules {[k for k, _ in kinds]}; embedpipe "
                          f"runs MLMTransformer + SpladePooling (with a SparseStaticEmbedding "
                          f"query side behind a Router)")
    pooling = _json(kinds[1][1] / "config.json")
    strategy = pooling.get("pooling_strategy", "max")
    if strategy not in ("max", "sum") or pooling.get("activation_function", "relu") != "relu":
        raise ConfigError(f"{kinds[1][1]}: SpladePooling {strategy!r} with "
                          f"{pooling.get('activation_function')!r}; embedpipe computes max or sum "
                          f"over relu then log1p")
    dims = data.get("max_active_dims")
    if dims is not None and (not isinstance(dims, int) or isinstance(dims, bool) or dims <= 0):
        raise ConfigError(f"{st_config}: max_active_dims must be a positive integer")
    return kinds[0][1], SparseSpec(strategy, dims, query_static)
