"""The GPU check's parts a CPU can run: the float16 carry folder, the smoke run, the verdicts.

What needs a GPU (a real CUDA OOM, float16, the speeds) runs only in bench/gpu_check.sh on one.
"""
from __future__ import annotations

import json
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from bench import gpu_check
from bench.gpu_carry import CARRY_CORPUS, CARRY_MODEL, fp16_copy
from bench.gpu_check import main


def _cos(a, b):
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


@pytest.fixture(scope="module")
def carry(tmp_path_factory, bundled_model, mixed_texts):
    """A carry as `make gpu-carry` makes it, less the faiss wheel (faiss is installed here)."""
    folder = tmp_path_factory.mktemp("gpu_carry")
    fp16_copy(bundled_model.path, folder / CARRY_MODEL)
    (folder / CARRY_CORPUS).mkdir()
    pq.write_table(pa.table({"id": np.arange(len(mixed_texts)), "text": mixed_texts}),
                   folder / CARRY_CORPUS / "part-00000.parquet")
    return folder


def test_the_float16_copy_holds_half_weights_and_gives_the_float32_vectors(carry, bundled_model,
                                                                          mixed_texts):
    from safetensors import safe_open

    from helpers import encoder_for
    from pipeline.encode.batching import encode_texts
    from pipeline.encode.encoder import EncoderSettings
    from pipeline.models.model_files import resolve_model
    from pipeline.encode.tokenizer import TextTokenizer

    folder = carry / CARRY_MODEL
    with safe_open(folder / "model.safetensors", "pt") as f:
        dtypes = {f.get_tensor(k).dtype for k in f.keys()}
    assert torch.float16 in dtypes and torch.float32 not in dtypes
    assert (folder / "model.safetensors").stat().st_size < 0.55 * (
        bundled_model.path / "model.safetensors").stat().st_size
    assert not (folder / "README.md").exists() and (folder / "1_Pooling" / "config.json").exists()

    copy = resolve_model(str(folder))
    settings = EncoderSettings((-1,), "concat", "mean", True)
    encoder = encoder_for(copy, "cpu", "float32", settings, forward="transformers")
    # transformers 5 would load these weights as a float16 model; float32 means float32
    assert {p.dtype for p in encoder.model.parameters()} == {torch.float32}
    texts = mixed_texts[:40] + mixed_texts[-8:]
    tokenizer = TextTokenizer(bundled_model.path, 256)
    ours = encode_texts(tokenizer, encoder, texts, 4096, 256)
    # the fused forward (auto on CPU) reads the float16 file into float32 too
    fused = encode_texts(tokenizer, encoder_for(copy, "cpu", "float32", settings), texts, 4096, 256)
    assert np.abs(fused - ours).max() < 1e-5
    ref = encode_texts(tokenizer, encoder_for(bundled_model, "cpu", "float32", settings), texts,
                       4096, 256)
    cos = _cos(ours, ref)
    assert cos.min() >= 0.9999  # float16 rounding of the weights only
    assert not np.allclose(ours, ref, atol=1e-7)  # and it really is the rounded copy


def test_smoke_run_on_cpu_passes_and_writes_its_report(carry, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["--device", "cpu", "--smoke", "--carry", str(carry), "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 0, printed
    report = json.loads((out / "gpu_check.json").read_text())
    checks = {c["name"]: c for c in report["checks"]}
    assert checks["float32 vs sentence-transformers"]["figures"]["min_cosine"] >= 0.99999
    assert checks["float16 vs float32"]["ok"] is None  # CUDA only
    assert checks["bfloat16 vs float32"]["ok"] is True
    assert 0.999 <= checks["bfloat16 vs float32"]["figures"]["min_cosine"] < 1.0
    oom = checks["out-of-memory back-off"]
    assert oom["ok"] is True and oom["figures"]["oom_splits"] >= 2
    attention = checks["attention"]["figures"]
    # on CPU: embedpipe's kernel where the CPU has AMX or AVX-512 BF16 (run by the fused
    # forward), SDPA otherwise; the check reports the one the model really ran
    from pipeline.runtime import hardware

    kernel = ("amx" if hardware.this_cpu().amx_bf16 else
              "avx512" if hardware.this_cpu().avx512_bf16 else "sdpa")
    assert attention["chosen"] == attention["loaded"] == kernel
    seen = "scaled_dot_product" if kernel == "sdpa" else "padded_attention"
    assert any(seen in k for k in attention["kernels"])
    speed = checks["throughput vs sentence-transformers"]
    assert speed["ok"] is None and speed["figures"]["x_vs_st_same_dtype"] > 0  # no bar in smoke
    assert report["bench"]["results"][0]["rows"] == 48
    assert report["environment"]["device"] == "cpu" and "cpu" in report["environment"]
    for name in checks:
        assert name in printed


def test_the_oom_check_fails_when_the_back_off_loses_rows(carry, mixed_texts, monkeypatch):
    from pipeline.encode.encoder import Encoder
    from pipeline.models.model_files import resolve_model
    from pipeline.encode.tokenizer import TextTokenizer

    real_split = Encoder._split
    monkeypatch.setattr(Encoder, "_split", lambda self, ids, mask, *t: real_split(
        self, ids, mask, *t)[:-1])  # a broken back-off that drops a row
    source = resolve_model(str(carry / CARRY_MODEL))
    check = gpu_check.check_out_of_memory(source, "cpu", "float32", mixed_texts,
                                          TextTokenizer(source.path, 256), 24)
    back = int(re.search(r"(\d+) of 24 rows back", check.detail)[1])
    assert check.ok is False and back < 24


def test_a_failed_check_exits_1_and_a_missing_carry_2(tmp_path, capsys):
    assert gpu_check.exit_code({"checks": [{"ok": True}, {"ok": None}]}) == 0
    assert gpu_check.exit_code({"checks": [{"ok": True}, {"ok": False}]}) == 1
    assert main(["--device", "cpu", "--carry", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: model folder") and "make gpu-carry" in err[0]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal where CUDA is absent")
def test_cuda_without_a_gpu_exits_2(carry, capsys):
    assert main(["--carry", str(carry)]) == 2
    assert "no CUDA device" in capsys.readouterr().err
