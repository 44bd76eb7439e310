"""A model folder's weights against its config.json, from the weight files' names and shapes
(safetensors headers; a `.bin` mapped, never read), before anything loads: every encoder tensor
the files hold is one the config accounts for, with the shape it says, and none the encoder
needs is missing. Whichever forward runs then reads the weights the config describes.

Where a family keeps its weights: BERT's layout (BERT, RoBERTa, XLM-R, CamemBERT) and
DistilBERT's, written out here (the fused forward reads them by these names, and a run of these
families imports none of transformers' model classes); any other family by transformers' own
model built on the meta device (no memory, no weights). Tensors outside the encoder (a pooler the
family lacks, masked-LM and task heads, `position_ids` buffers) are left aside, as transformers
does, and listed at -v.
"""
from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

from ..config import ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LayerNames:
    """Where a family's checkpoint keeps each weight of a post-norm encoder layer."""
    layers: str  # the layers' prefix: f"{layers}.{i}.{query}.weight", ...
    query: str
    key: str
    value: str
    out: str
    norm1: str
    up: str
    down: str
    norm2: str
    heads: tuple[str, ...]  # prefixes of checkpoints saved with a task head ("bert." ...)
    pooler: bool  # the family's model has a pooler (transformers builds one, saved or not)


BERT = LayerNames("encoder.layer", "attention.self.query", "attention.self.key",
                  "attention.self.value", "attention.output.dense", "attention.output.LayerNorm",
                  "intermediate.dense", "output.dense", "output.LayerNorm", ("bert.", "roberta."), True)
DISTILBERT = LayerNames("transformer.layer", "attention.q_lin", "attention.k_lin",
                        "attention.v_lin", "attention.out_lin", "sa_layer_norm", "ffn.lin1",
                        "ffn.lin2", "output_layer_norm", ("distilbert.",), False)
# model_type -> where its checkpoints keep the weights
LAYOUTS = {"bert": BERT, "roberta": BERT, "xlm-roberta": BERT, "camembert": BERT,
           "distilbert": DISTILBERT}
# buffers old checkpoints saved with the embeddings; the model makes its own
BUFFERS = {"embeddings.position_ids", "embeddings.token_type_ids"}
LAYER_INDEX = re.compile(r"(?:^|\.)(?:layers?|blocks?)\.(\d+)\.")


@dataclass(frozen=True)
class Expected:
    """What a config says the encoder's weights are."""
    shapes: dict[str, tuple[int, ...]]  # every weight by its base-model name
    optional: frozenset[str]  # weights a file may lack (the pooler: only pooling = "pooler" reads it)
    buffers: frozenset[str]  # buffers the model makes itself, left aside when a file holds them
    prefixes: tuple[str, ...]  # a task model's prefix before the base model's names ("bert.")

    @property
    def roots(self) -> set[str]:
        """The encoder's top-level parts ("embeddings", "encoder"): a name under one of them is
        an encoder weight, anything else a head the run does not use."""
        return {n.split(".", 1)[0] for n in self.shapes if n not in self.optional}


def weight_shapes(path: Path) -> dict[str, tuple[int, ...]] | None:
    """Each weight's shape by name, from the files transformers would load: model.safetensors
    (or its shards), else pytorch_model.bin (or its shards); None when the folder has neither."""
    for single, kind in (("model.safetensors", "safetensors"), ("pytorch_model.bin", "bin")):
        index = path / f"{single}.index.json"
        try:
            if index.is_file():
                files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            elif (path / single).is_file():
                files = [single]
            else:
                continue
            shapes = {}
            for name in files:
                shapes.update(_safetensors_shapes(path / name) if kind == "safetensors"
                              else _bin_shapes(path / name))
            return shapes
        except Exception as exc:  # noqa: BLE001 (safetensors, pickle and zip each raise their own)
            raise ConfigError(f"model folder {path}: its weights cannot be read: {exc}") from None
    return None


def _safetensors_shapes(file: Path) -> dict[str, tuple[int, ...]]:
    from safetensors import safe_open

    with safe_open(file, framework="pt") as handle:
        return {name: tuple(handle.get_slice(name).get_shape()) for name in handle.keys()}


def _bin_shapes(file: Path) -> dict[str, tuple[int, ...]]:
    import zipfile

    import torch

    # mapped, not read; a file in torch's legacy (pre-zip) format cannot be mapped: read
    state = torch.load(file, map_location="meta", weights_only=True,
                       mmap=zipfile.is_zipfile(file))
    return {name: tuple(t.shape) for name, t in state.items() if isinstance(t, torch.Tensor)}


def expected_weights(config) -> Expected:
    """The encoder's weights as `config` describes them."""
    names = LAYOUTS.get(config.model_type)
    return _layout(config, names) if names is not None else _from_transformers(config)


def _layout(config, n: LayerNames) -> Expected:
    h, vocab = config.hidden_size, config.vocab_size
    inner = config.hidden_dim if config.model_type == "distilbert" else config.intermediate_size
    shapes = {"embeddings.word_embeddings.weight": (vocab, h),
              "embeddings.position_embeddings.weight": (config.max_position_embeddings, h),
              "embeddings.LayerNorm.weight": (h,), "embeddings.LayerNorm.bias": (h,)}
    optional = set()
    if n is BERT:
        shapes["embeddings.token_type_embeddings.weight"] = (config.type_vocab_size, h)
    if n.pooler:
        optional = {"pooler.dense.weight", "pooler.dense.bias"}
        shapes.update({"pooler.dense.weight": (h, h), "pooler.dense.bias": (h,)})
    for i in range(config.num_hidden_layers):
        for part, rows, cols in ((n.query, h, h), (n.key, h, h), (n.value, h, h), (n.out, h, h),
                                 (n.up, inner, h), (n.down, h, inner)):
            shapes[f"{n.layers}.{i}.{part}.weight"] = (rows, cols)
            shapes[f"{n.layers}.{i}.{part}.bias"] = (rows,)
        for norm in (n.norm1, n.norm2):
            shapes[f"{n.layers}.{i}.{norm}.weight"] = shapes[f"{n.layers}.{i}.{norm}.bias"] = (h,)
    return Expected(shapes, frozenset(optional), frozenset(BUFFERS), n.heads)


def _from_transformers(config) -> Expected:
    """transformers' base model for `config`, built on the meta device: its state dict's names
    and shapes, its buffers, its prefix."""
    import torch
    from transformers import AutoModel

    try:
        with torch.device("meta"):
            model = AutoModel.from_config(config)
    except (ValueError, ImportError, OSError, TypeError) as exc:
        raise ConfigError(f"transformers cannot build model type {config.model_type!r}: "
                          f"{exc}") from None
    state = model.state_dict()
    shapes = {name: tuple(t.shape) for name, t in state.items()}
    buffers = {name for name, _ in model.named_buffers()} - set(shapes)
    optional = {name for name in shapes if name.startswith("pooler.")}
    prefix = f"{model.base_model_prefix}." if model.base_model_prefix else ""
    prefixed = prefix and not any(name.startswith(prefix) for name in shapes)
    return Expected(shapes, frozenset(optional), frozenset(buffers | BUFFERS),
                    (prefix,) if prefixed else ())


def base_name(name: str, prefixes: tuple[str, ...]) -> str:
    """A checkpoint's name as the base model names it: a task model's prefix dropped, old
    gamma/beta layer-norm names renamed."""
    for prefix in prefixes:
        name = name.removeprefix(prefix)
    return name.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta",
                                                                       "LayerNorm.bias")


def check_weights(path: Path, config) -> list[str]:
    """Refuse, naming the first key, weights that do not match the config; return the names left
    aside (heads, buffers), also logged at info."""
    shapes = weight_shapes(path)
    if shapes is None:  # no weights transformers reads (refused when it loads)
        return []
    expected = expected_weights(config)
    found = {base_name(name, expected.prefixes): (name, shape) for name, shape in shapes.items()}
    roots, layers = expected.roots, getattr(config, "num_hidden_layers", None)
    problems, aside = [], []
    for name, (stored, shape) in sorted(found.items()):
        want = expected.shapes.get(name)
        if want is not None:
            if tuple(shape) != want:
                problems.append(f"{stored} has shape {list(shape)} where config.json makes it "
                                f"{list(want)}")
        elif name in expected.buffers or name.split(".", 1)[0] not in roots:
            aside.append(stored)
        elif (layer := LAYER_INDEX.search(name)) and layers is not None and int(layer[1]) >= layers:
            problems.append(f"{stored} is layer {layer[1]}, beyond config.json's "
                            f"num_hidden_layers = {layers}")
        else:
            problems.append(f"{stored} is an encoder weight config.json does not account for")
    problems += [f"{name} is missing, which config.json needs" for name in expected.shapes
                 if name not in found and name not in expected.optional]
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise ConfigError(f"model folder {path}: its weights do not match its config.json: "
                          f"{problems[0]}{more}")
    if aside:
        log.info("model folder %s: %d weights no forward uses are left aside: %s", path,
                 len(aside), ", ".join(aside))
    return aside
