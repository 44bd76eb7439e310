"""The persistent compile cache: a second process compiles from it, `compile = "auto"` counts it,
and a cached graph never carries one model's weights into another's vectors.

Each run is a fresh process (the cache's point), on a tiny random BERT so compiling stays short.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from pipeline.runtime.runtime import AUTO_COMPILE_ROWS, WARM_COMPILE_ROWS

RUN = r"""
import json, sys
from torch._dynamo.utils import counters
from pipeline.config import ModelConfig
from pipeline.encode.batching import encode_texts
from pipeline.encode.encoder import Encoder, EncoderSettings
from pipeline.models.model_files import resolve_model
from pipeline.runtime.runtime import resolve_runtime
from pipeline.encode.tokenizer import TextTokenizer

path, rows, compile_ = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
source = resolve_model(path)
# transformers' forward: what compiles (the fused forward, auto's choice for BERT, runs eagerly)
runtime = resolve_runtime(ModelConfig(name=path, dtype="bfloat16", compile=compile_, max_length=64,
                                      forward="transformers"), source, input_rows=rows)
encoder = Encoder(source, runtime, EncoderSettings((-1,), "concat", "mean", True))
texts = ["a short one", "a somewhat longer text about a film and its cast", "three words here",
         "and one more text, of middling length, for a second batch shape"] * 3
vectors = encode_texts(TextTokenizer(source.path, 64), encoder, texts, 64, 4)
print(json.dumps({"compile": runtime.compile, "note": runtime.compile_note,
                  "hits": counters["inductor"]["fxgraph_cache_hit"],
                  "misses": counters["inductor"]["fxgraph_cache_miss"],
                  "vectors": vectors.tolist()}))
"""


def _run(model, rows, compile_, cache) -> dict:
    env = {**os.environ, "EMBEDPIPE_CACHE": str(cache)}
    env.pop("TORCHINDUCTOR_CACHE_DIR", None)
    done = subprocess.run([sys.executable, "-c", RUN, str(model), str(rows), json.dumps(compile_)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    out["vectors"] = np.array(out["vectors"])
    return out


@pytest.fixture(scope="module")
def other_tiny_model(tmp_path_factory, tiny_model):
    """The tiny BERT's config and tokenizer with other random weights."""
    import shutil

    import torch
    from transformers import BertModel

    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("tiny_bert_other")
    model = BertModel.from_pretrained(tiny_model)
    for p in model.parameters():
        p.data.normal_(0, 0.05)
    model.save_pretrained(path)
    for f in tiny_model.iterdir():
        if f.name.startswith(("tokenizer", "vocab", "special")):
            shutil.copy(f, path / f.name)
    return path


def _cos(a, b):
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def test_a_second_process_compiles_from_the_cache(tmp_path, tiny_model, other_tiny_model):
    cache = tmp_path / "cache"
    eager = _run(tiny_model, 0, False, cache)
    assert not eager["compile"] and not (cache / "inductor").exists()

    cold = _run(tiny_model, AUTO_COMPILE_ROWS, "auto", cache)
    assert cold["compile"] and "no warm compile cache" in cold["note"]
    assert cold["misses"] >= 1 and cold["hits"] == 0
    assert len(list((cache / "inductor" / "embedpipe-entries").glob("*.json"))) == 1

    # warm: auto compiles from fewer rows, and Inductor serves every graph from the cache
    warm = _run(tiny_model, WARM_COMPILE_ROWS, "auto", cache)
    assert warm["compile"] and "warm compile cache" in warm["note"]
    assert warm["hits"] >= 1 and warm["misses"] == 0
    assert _cos(warm["vectors"], eager["vectors"]).min() >= 0.999
    assert np.allclose(warm["vectors"], cold["vectors"], atol=1e-6)

    # the same architecture with other weights: not warm for auto (its own key), and the graphs
    # the cache holds give this model's vectors, not the first one's
    other_auto = _run(other_tiny_model, WARM_COMPILE_ROWS, "auto", cache)
    assert not other_auto["compile"] and "no warm compile cache" in other_auto["note"]
    other = _run(other_tiny_model, 0, True, cache)
    assert other["hits"] >= 1  # same shapes, weights are inputs: the cached graphs are reused
    assert _cos(other["vectors"], other_auto["vectors"]).min() >= 0.999
    assert _cos(other["vectors"], eager["vectors"]).min() < 0.99
