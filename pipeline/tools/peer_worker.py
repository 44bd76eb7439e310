"""One peer contender of `embedpipe bench --peers`, run as a whole process in the peers' venv.

This file is run by path with the peers' own Python (sentence-transformers and its exporters,
which pin other library versions than embedpipe's), so it imports nothing from embedpipe.

    python peer_worker.py prepare --model DIR --exports DIR --texts T.parquet --int8 avx2
    python peer_worker.py encode --contender NAME --exports DIR --texts T.parquet --out V.npy ...

`prepare` writes every export once into the exports folder (a copy of the model folder):
ONNX (`onnx/model.onnx`), ONNX O3, ONNX dynamic int8 for the CPU's instruction set, OpenVINO,
OpenVINO static int8 calibrated on the first texts of T.parquet (a local dataset; no hub).
`encode` loads one contender, warms it up, times `encode` over every text and writes the vectors;
its one line of JSON on stdout says how long. Nothing here reaches a hub: HF_HUB_OFFLINE is set.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

# run by path, this folder heads sys.path, where embedpipe's datasets.py would hide the library's
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

# contender -> (backend, file under the exports folder or None for the backend's default)
CONTENDERS = {
    "st-torch": ("torch", None),
    "st-onnx": ("onnx", None),
    "st-onnx-o3": ("onnx", "onnx/model_O3.onnx"),
    "st-onnx-int8": ("onnx", "onnx/model_qint8_{int8}.onnx"),
    "st-openvino": ("openvino", None),
    "st-openvino-f32": ("openvino", None),  # its default precision is bf16 on bf16 CPUs
    "st-openvino-int8": ("openvino", "openvino/openvino_model_qint8_quantized.xml"),
    "fastembed": ("fastembed", "onnx/model.onnx"),
}
CALIBRATION_TEXTS = 300
DONE = "embedpipe-exports-done"


def read_texts(path: str) -> list[str]:
    import pyarrow.parquet as pq

    return pq.read_table(path, columns=["text"])["text"].to_pylist()


def prepare(model: str, exports: Path, texts: list[str], int8: str) -> None:
    """Every export of the model into `exports` (skipped when an earlier prepare finished)."""
    if (exports / DONE).exists():
        return
    from sentence_transformers import SentenceTransformer, export_dynamic_quantized_onnx_model
    from sentence_transformers import export_optimized_onnx_model

    if exports.exists():
        shutil.rmtree(exports)
    shutil.copytree(model, exports)
    onnx = SentenceTransformer(str(exports), device="cpu", backend="onnx")
    onnx.save_pretrained(str(exports))  # onnx/model.onnx
    export_optimized_onnx_model(onnx, "O3", str(exports))
    export_dynamic_quantized_onnx_model(onnx, int8, str(exports))
    openvino = SentenceTransformer(str(exports), device="cpu", backend="openvino")
    openvino.save_pretrained(str(exports))  # openvino/openvino_model.xml
    _static_openvino_int8(openvino, exports, texts[:CALIBRATION_TEXTS])
    (exports / DONE).write_text(json.dumps({"int8": int8}))


def _static_openvino_int8(model, exports: Path, texts: list[str]) -> None:
    """sentence-transformers' `export_static_quantized_openvino_model`, calibrated on a local
    dataset: the texts as a Parquet folder the `datasets` library loads by path."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from sentence_transformers import export_static_quantized_openvino_model
    from optimum.intel import OVQuantizationConfig

    folder = exports / "calibration"
    folder.mkdir(exist_ok=True)
    pq.write_table(pa.table({"text": texts}), folder / "train-00000.parquet")
    export_static_quantized_openvino_model(
        model, OVQuantizationConfig(num_samples=len(texts)), str(exports),
        dataset_name=str(folder), dataset_config_name="default", dataset_split="train",
        column_name="text")


def load(contender: str, exports: Path, int8: str, max_length: int):
    backend, file_name = CONTENDERS[contender]
    if file_name:
        file_name = file_name.format(int8=int8)
    if backend == "fastembed":
        from fastembed import TextEmbedding

        model = TextEmbedding("sentence-transformers/all-MiniLM-L6-v2",
                              specific_model_path=str(exports / "onnx"), threads=os.cpu_count())
        return lambda texts, batch_size: np.stack(list(model.embed(texts, batch_size=batch_size)))
    from sentence_transformers import SentenceTransformer

    model_kwargs = {"file_name": file_name} if file_name else {}
    if contender == "st-openvino-f32":
        model_kwargs["ov_config"] = {"INFERENCE_PRECISION_HINT": "f32"}
    kwargs = {"model_kwargs": model_kwargs} if model_kwargs else {}
    model = SentenceTransformer(str(exports), device="cpu", backend=backend, **kwargs)
    model.max_seq_length = max_length
    return lambda texts, batch_size: model.encode(texts, batch_size=batch_size,
                                                  convert_to_numpy=True)


def encode(args) -> dict:
    texts = read_texts(args.texts)
    start = time.perf_counter()
    run = load(args.contender, Path(args.exports), args.int8, args.max_length)
    loaded = time.perf_counter() - start
    run(texts[:args.warmup], args.batch_size)
    start = time.perf_counter()
    vectors = run(texts, args.batch_size)
    seconds = time.perf_counter() - start
    np.save(args.out, np.asarray(vectors, dtype=np.float32))
    return {"contender": args.contender, "seconds": seconds, "load_seconds": loaded,
            "rows": len(texts)}


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("sentence-transformers", "transformers", "torch", "onnxruntime", "openvino",
                 "optimum", "optimum-onnx", "optimum-intel", "fastembed"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("step", choices=["prepare", "encode", "versions"])
    ap.add_argument("--model")
    ap.add_argument("--exports")
    ap.add_argument("--texts")
    ap.add_argument("--int8", default="avx2", choices=["avx2", "avx512", "avx512_vnni", "arm64"])
    ap.add_argument("--contender", choices=list(CONTENDERS))
    ap.add_argument("--out")
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--warmup", type=int, default=64)
    args = ap.parse_args()
    if args.step == "versions":
        print(json.dumps(versions()))
    elif args.step == "prepare":
        prepare(args.model, Path(args.exports), read_texts(args.texts), args.int8)
        print(json.dumps({"prepared": args.exports}))
    else:
        print(json.dumps(encode(args)))


if __name__ == "__main__":
    import numpy as np

    try:
        main()
    except Exception as exc:  # the traceback, then one line for the parent to show
        import traceback

        traceback.print_exc()
        words = " ".join(str(exc).split())  # OpenVINO's messages span lines
        print(f"{type(exc).__name__}: {words[:400]}", file=sys.stderr)
        sys.exit(1)
