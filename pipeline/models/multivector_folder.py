"""A sentence-transformers MultiVectorEncoder folder (ColBERT-style late interaction), read as
sentence-transformers 6.3 reads it: the Transformer (its document_length, query_length and
query_expansion), Dense projections on the token vectors, a MultiVectorMask (skiplist words and
the tasks they apply to), a token-level Normalize, the folder's truncate_dim and prompts.

PyLate v3 folders (`model_type` "ColBERT": [Transformer, Dense], query_prefix / document_prefix,
query_length, attend_to_expansion_tokens, skiplist_words) are read as MultiVectorEncoder loads
them: the prefixes become the query / document prompts, the punctuation skiplist and a Normalize
are implied, queries are expanded to query_length. A HierarchicalTokenPooling after the Dense
layers and the mask is read with its settings (pipeline/encode/token_pooling.py computes it).
What sentence-transformers would do that embedpipe does not compute is refused by name (other
token pooling, keep_only_token_ids, a prefix the tokenizer holds as one token but splits, other
modules)."""
from __future__ import annotations

import dataclasses
import json
import math
import string
from dataclasses import dataclass
from pathlib import Path

from ..config import ConfigError

_ACTIVATIONS = {"torch.nn.modules.linear.Identity": "identity",
                "torch.nn.modules.activation.Tanh": "tanh"}
_PYLATE_DENSE = ("Dense",)


@dataclass(frozen=True)
class DenseSpec:
    path: Path  # the folder holding the Dense's weights
    in_features: int
    out_features: int
    bias: bool
    activation: str  # identity | tanh


@dataclass(frozen=True)
class QueryExpansion:
    """ColBERT's query expansion (sentence-transformers' QueryExpansionConfig)."""
    strategy: str  # fixed | min
    length: int
    attend: bool = False
    token: str | None = None  # None: the tokenizer's mask token (else its eos token)


@dataclass(frozen=True)
class TokenPooling:
    """HierarchicalTokenPooling's settings (its config.json) and where the folder's Normalize
    modules sit around it."""
    pool_factor: float = 1.0
    max_tokens: int | None = None
    distance_threshold: float | None = None
    protected: int = 1  # num_protected_tokens
    normalize_embeddings: bool = False  # a saved config without the key loads False
    tasks: tuple[str, ...] = ("document",)
    normalize_before: bool = False  # a Normalize module before the pooling
    normalize_after: bool = False  # a Normalize module after it (every task)


@dataclass(frozen=True)
class MultiVectorSpec:
    dense: tuple[DenseSpec, ...]
    normalize: bool  # a token-level Normalize (after the mask: the order does not matter)
    skiplist: tuple[str, ...]  # words whose tokens leave the rows of the skiplist tasks
    skiplist_tasks: tuple[str, ...]  # document, and query if listed
    document_length: int | None
    query_length: int | None
    expansion: QueryExpansion | None
    truncate_dim: int | None
    similarity: str  # maxsim | meanmaxsim (the same ranking for one query)
    prompts: tuple[tuple[str, str], ...] = ()  # PyLate's prefixes as prompts (native: st prompts)
    pooling: TokenPooling | None = None  # a HierarchicalTokenPooling module

    @property
    def dim(self) -> int:
        return self.truncate_dim or self.dense[-1].out_features

    @property
    def unit_tokens(self) -> bool:
        """Every stored token of unit length (what a sink ranking by cosine needs): a Normalize
        last (after any token pooling, whose cluster means are not unit vectors unless it
        normalizes them), and no truncate_dim cutting the vectors after it."""
        pooled = self.pooling
        unit = self.normalize if pooled is None else (pooled.normalize_after
                                                     or pooled.normalize_embeddings)
        cut = bool(self.truncate_dim) and (not self.dense
                                           or self.truncate_dim < self.dense[-1].out_features)
        return unit and not cut


def _json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path} cannot be read as JSON: {exc}") from None
    return data if isinstance(data, dict) else {}


def is_multivector(path: Path) -> bool:
    st_config = path / "config_sentence_transformers.json"
    return st_config.is_file() and _json(st_config).get("model_type") in (
        "MultiVectorEncoder", "ColBERT")


def read_multivector(path: Path, kinds: list[tuple[str, Path]]) -> MultiVectorSpec:
    """The spec of a MultiVectorEncoder (or PyLate v3 ColBERT) folder whose modules are kinds."""
    data = _json(path / "config_sentence_transformers.json")
    pylate = data.get("model_type") == "ColBERT"
    names = [k for k, _ in kinds]
    if not names or names[0] != "Transformer":
        raise ConfigError(f"{path}: a multi-vector folder of modules {names}; embedpipe runs a "
                          f"Transformer first")
    dense, normalize, skiplist, tasks = [], pylate, None, ("document",)
    pooling, after = None, False
    for kind, where in kinds[1:]:
        if kind in _PYLATE_DENSE:
            if pooling is not None:
                raise ConfigError(f"{where}: a Dense after the token pooling; embedpipe pools the "
                                  f"last Dense's token vectors (the pooling after every Dense)")
            dense.append(_dense(where))
        elif kind == "Normalize" and not pylate:
            normalize, after = True, pooling is not None
        elif kind == "HierarchicalTokenPooling" and not pylate and pooling is None:
            pooling = _pooling(where, normalize)
        elif kind == "MultiVectorMask" and not pylate:
            config = _json(where / "config.json")
            if config.get("keep_only_token_ids"):
                raise ConfigError(f"{where}: keep_only_token_ids (image-patch documents) is not "
                                  f"one embedpipe computes")
            if pooling is not None:
                raise ConfigError(f"{where}: a MultiVectorMask after the token pooling; embedpipe "
                                  f"pools the tokens the mask keeps (the mask first)")
            skiplist = tuple(config.get("skiplist_words") or ())
            value = config.get("skiplist_tasks") or ["document"]
            tasks = tuple([value] if isinstance(value, str) else value)
        else:
            raise ConfigError(
                f"{path}: module {kind!r} is not one embedpipe runs in a multi-vector folder "
                f"(it runs Transformer, Dense, MultiVectorMask, Normalize and one "
                f"HierarchicalTokenPooling after the Dense layers); its vectors would differ from "
                f"sentence-transformers'")
    if not dense:
        raise ConfigError(f"{path}: a multi-vector folder without a Dense projection; embedpipe "
                          f"runs ColBERT-style folders (Transformer + Dense)")
    for first, second in zip(dense, dense[1:]):
        if first.out_features != second.in_features:
            raise ConfigError(f"{second.path}: its Dense takes {second.in_features} features, "
                              f"the one before gives {first.out_features}")
    transformer = _transformer_settings(kinds[0][1])
    prompts: dict[str, str] = {}
    if pylate:
        skiplist = tuple(string.punctuation if data.get("skiplist_words") is None
                         else data["skiplist_words"])
        for key, name in (("query_prefix", "query"), ("document_prefix", "document")):
            if data.get(key):
                prompts[name] = data[key] + ((data.get("prompts") or {}).get(name) or "").removeprefix(
                    data[key])
        transformer = {**_pylate_transformer(data), **{k: v for k, v in transformer.items()
                                                       if v is not None}}
    truncate = data.get("truncate_dim")
    if truncate is not None and (not isinstance(truncate, int) or truncate <= 0
                                 or truncate > dense[-1].out_features):
        raise ConfigError(f"{path}: truncate_dim {truncate!r} must be a positive integer at most "
                          f"the Dense's {dense[-1].out_features} features")
    if pooling is not None:
        pooling = dataclasses.replace(pooling, normalize_after=after)
    similarity = data.get("similarity_fn_name") or "maxsim"
    if similarity not in ("maxsim", "meanmaxsim"):
        similarity = "maxsim"
    return MultiVectorSpec(dense=tuple(dense), normalize=normalize,
                           skiplist=tuple(skiplist or ()), skiplist_tasks=tasks,
                           document_length=transformer.get("document_length"),
                           query_length=transformer.get("query_length"),
                           expansion=transformer.get("expansion"), truncate_dim=truncate,
                           similarity=similarity, prompts=tuple(sorted(prompts.items())),
                           pooling=pooling)


def _pooling(where: Path, normalize_before: bool) -> TokenPooling:
    """HierarchicalTokenPooling's config, checked as its constructor checks it."""
    config = _json(where / "config.json")
    factor, most = config.get("pool_factor", 1.0), config.get("max_tokens")
    threshold, protected = config.get("distance_threshold"), config.get("num_protected_tokens", 1)
    value = config.get("tasks") or ["document"]
    tasks = tuple([value] if isinstance(value, str) else value)
    number = (int, float)
    bad = (not isinstance(factor, number) or not math.isfinite(factor) or factor < 1
           or not isinstance(protected, int) or protected < 0
           or (most is not None and (not isinstance(most, int) or most <= protected))
           or (threshold is not None and (not isinstance(threshold, number)
                                          or not math.isfinite(threshold) or threshold < 0))
           or sum((factor != 1, most is not None, threshold is not None)) > 1)
    if bad:
        raise ConfigError(f"{where}: HierarchicalTokenPooling settings {config!r} are not ones "
                          f"sentence-transformers accepts (pool_factor >= 1, max_tokens > "
                          f"num_protected_tokens, distance_threshold >= 0, one of the three)")
    return TokenPooling(float(factor), most, None if threshold is None else float(threshold),
                        protected, bool(config.get("normalize_embeddings", False)), tasks,
                        normalize_before)


def _dense(where: Path) -> DenseSpec:
    config = _json(where / "config.json")
    activation = _ACTIVATIONS.get(str(config.get("activation_function",
                                                 "torch.nn.modules.activation.Tanh")))
    if activation is None:
        raise ConfigError(f"{where}: Dense activation {config.get('activation_function')!r}; "
                          f"embedpipe computes Identity and Tanh")
    if config.get("module_input_name", "token_embeddings") != "token_embeddings":
        raise ConfigError(f"{where}: a Dense on {config.get('module_input_name')!r}; a "
                          f"multi-vector folder projects token_embeddings")
    if not any((where / n).is_file() for n in ("model.safetensors", "pytorch_model.bin")):
        raise ConfigError(f"{where}: the Dense has no weights (model.safetensors)")
    return DenseSpec(where, int(config["in_features"]), int(config["out_features"]),
                     bool(config.get("bias", True)), activation)


def _transformer_settings(where: Path) -> dict:
    settings = where / "sentence_bert_config.json"
    data = _json(settings) if settings.is_file() else {}
    return {"document_length": _length(data, "document_length", settings),
            "query_length": _length(data, "query_length", settings),
            "expansion": _expansion(data.get("query_expansion"), settings)}


def _pylate_transformer(data: dict) -> dict:
    """PyLate's top-level knobs as MultiVectorEncoder translates them (_parse_model_config)."""
    expansion = None
    if data.get("do_query_expansion", True) is not False:
        attend = data.get("attend_to_expansion_tokens", data.get("attend_to_mask_tokens"))
        expansion = QueryExpansion("fixed", int(data.get("query_length") or 32), bool(attend))
    return {"document_length": data.get("document_length"), "query_length": None,
            "expansion": expansion}


def _length(data: dict, key: str, where: Path) -> int | None:
    value = data.get(key)
    if value is not None and (not isinstance(value, int) or value <= 0):
        raise ConfigError(f"{where}: {key} must be a positive integer")
    return value


def _expansion(value, where: Path) -> QueryExpansion | None:
    if value is None:
        return None
    if not isinstance(value, dict) or value.get("strategy") not in ("fixed", "min") or not \
            isinstance(value.get("length"), int) or value["length"] < 1:
        raise ConfigError(f"{where}: query_expansion {value!r}: embedpipe reads strategy fixed or "
                          f"min with a positive length")
    return QueryExpansion(value["strategy"], value["length"], bool(value.get("attend", False)),
                          value.get("token"))


def head_fingerprint(spec: MultiVectorSpec) -> str:
    """What the model fingerprint (the transformer's files) does not cover: the Dense layers'
    weights and every setting of the head, its token pooling and the query side, hashed (the
    config guard)."""
    import hashlib

    digest = hashlib.sha256()
    for dense in spec.dense:
        for name in ("model.safetensors", "pytorch_model.bin"):
            if (dense.path / name).is_file():
                digest.update((dense.path / name).read_bytes())
    settings = dataclasses.asdict(spec)
    settings["dense"] = [{k: v for k, v in d.items() if k != "path"} for d in settings["dense"]]
    digest.update(json.dumps(settings, sort_keys=True, default=str).encode())
    return digest.hexdigest()[:16]
