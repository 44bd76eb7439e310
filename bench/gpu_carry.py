"""What the GPU check needs on a machine without network, in the git-ignored `gpu_carry/`
(`make gpu-carry` fills it): a faiss-cpu wheel, the bundled model's folder in float16 and rows of
the bench corpus."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from pipeline.tools.artifacts import FetchError, Pinned, Pip, fetch_pinned

CARRY = Path("gpu_carry")
CARRY_MODEL = "all-MiniLM-L6-v2-fp16"
CARRY_CORPUS = "corpus"
CARRY_CORPUS_ROWS = 2000
# faiss-cpu for the GPU machine (abi3: any CPython >= 3.10, manylinux x86-64), pinned.
FAISS_WHEEL = Pinned(
    "faiss_cpu-1.15.1-cp310-abi3-manylinux_2_27_x86_64.manylinux_2_28_x86_64.whl",
    "f2c31b7f2f6647eb76829a5cfe3c398fb9346df9f26b1d4db35269c91eb58c33",
    Pip("faiss-cpu==1.15.1", ("--only-binary=:all:", "--python-version", "3.12", "--implementation",
                              "cp", "--platform", "manylinux_2_28_x86_64", "--platform",
                              "manylinux_2_27_x86_64", "--platform", "manylinux2014_x86_64")))
# Files of a sentence-transformers folder that loading never reads (left out of the carry).
UNREAD = {"README.md", "data_config.json", ".gitattributes"}


class EnvironmentProblem(Exception):
    """The check cannot run here (no CUDA device, carry missing); exit 2."""


def fp16_copy(src: Path, dst: Path) -> Path:
    """A copy of a model folder whose safetensors weights are float16 (integer tensors as they
    are), without the files loading never reads."""
    import torch
    from safetensors.torch import load_file, save_file

    dst.mkdir(parents=True, exist_ok=True)
    for item in src.iterdir():
        if item.name in UNREAD:
            continue
        if item.is_dir():
            shutil.copytree(item, dst / item.name, dirs_exist_ok=True)
        elif item.suffix == ".safetensors":
            tensors = load_file(item)
            save_file({k: (v.half() if v.is_floating_point() else v).contiguous()
                       for k, v in tensors.items()}, dst / item.name, metadata={"format": "pt"})
        elif item.suffix not in (".bin", ".pt", ".onnx", ".h5", ".msgpack"):
            shutil.copy2(item, dst / item.name)
    if not any(dst.glob("*.safetensors")):
        raise ValueError(f"{src} holds no safetensors weights to copy")
    return dst


def prepare_carry(dest: Path = CARRY, rows: int = CARRY_CORPUS_ROWS) -> dict[str, int]:
    """What the GPU machine needs besides the tree: the faiss-cpu wheel, the bundled model's folder
    in float16, and `rows` rows of the bench corpus (one zstd Parquet file). Returns bytes per
    entry."""
    import pyarrow.parquet as pq

    from pipeline.models.model_files import bundled_model_path
    from pipeline.tools.datasets import fetch_bench_corpus

    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    try:
        shutil.copy2(fetch_pinned(FAISS_WHEEL), dest / FAISS_WHEEL.filename)
    except FetchError as exc:
        raise EnvironmentProblem(f"the faiss-cpu wheel cannot be fetched: {exc}") from None
    model = dest / CARRY_MODEL
    if model.exists():
        shutil.rmtree(model)
    fp16_copy(bundled_model_path(), model)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            paths = fetch_bench_corpus(Path(tmp), n_rows=rows, shards=1)
        except FetchError as exc:
            raise EnvironmentProblem(f"the bench corpus cannot be fetched: {exc}") from None
        corpus = dest / CARRY_CORPUS
        corpus.mkdir(parents=True, exist_ok=True)
        pq.write_table(pq.read_table(paths[0], columns=["id", "text"]),
                       corpus / "part-00000.parquet", compression="zstd", compression_level=19)
    sizes = {p.name: sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.is_dir()
             else p.stat().st_size for p in dest.iterdir()}
    return sizes
