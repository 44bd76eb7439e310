"""`embedpipe bench --peers`: the peers' venv, their contenders as real processes on a tiny model.

The peers' venv is several GB of pip installs, so `make test` never builds it: the end-to-end
case runs where it is already built (`embedpipe bench --peers` once) or with
EMBEDPIPE_TEST_PEERS=1, and skips saying so otherwise."""
from __future__ import annotations

import os
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.tools import bench_peers
from pipeline.tools.bench_peers import (PEERS, PeerOptions, PeersUnavailable, int8_config,
                                        peers_venv, render_peers, run_peers, venv_dir, venv_ready)


def test_int8_export_follows_the_cpus_features():
    zen4 = frozenset({"avx2", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16"})
    zen3 = frozenset({"avx", "avx2", "fma"})
    assert int8_config(zen4) == "avx512_vnni"
    assert int8_config(zen3) == "avx2"
    assert int8_config(frozenset({"avx512f", "avx2"})) == "avx2"  # AVX-512 without VNNI
    assert int8_config(frozenset()) is None  # Arm, or no /proc/cpuinfo


def test_an_unknown_peer_is_refused_before_any_venv(tmp_path):
    with pytest.raises(ValueError, match="unknown peer 'onnx'"):
        run_peers(PeerOptions(peers=("onnx",), venv=str(tmp_path / "never")))
    assert not (tmp_path / "never").exists()


def test_a_venv_that_cannot_be_made_is_one_line(tmp_path, monkeypatch):
    """No index and no wheels: pip fails, the error names the folder and pip's last line, and a
    half-made venv is not taken for a ready one."""
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "no-wheels"))
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    folder = tmp_path / "venv"
    with pytest.raises(PeersUnavailable, match=f"could not make the peers' venv in {folder}") as err:
        peers_venv(folder)
    assert "\n" not in str(err.value)
    assert not venv_ready(folder)


def test_a_folder_embedpipe_did_not_make_is_never_removed(tmp_path):
    mine = tmp_path / "project"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(PeersUnavailable, match="not a peers' venv embedpipe made"):
        peers_venv(mine)
    assert (mine / "notes.txt").read_text() == "keep me"
    with pytest.raises(PeersUnavailable, match="is a file"):
        peers_venv(mine / "notes.txt")


@pytest.fixture(scope="module")
def peers_python():
    if not venv_ready() and os.environ.get("EMBEDPIPE_TEST_PEERS") != "1":
        pytest.skip(f"the peers' venv is not built ({venv_dir()}): several GB of pip installs; "
                    f"`embedpipe bench --peers` or EMBEDPIPE_TEST_PEERS=1 builds it")
    try:
        return peers_venv()
    except PeersUnavailable as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def tiny_model_512(tmp_path_factory, bundled_model):
    """A 2-layer, 32-wide random BERT with the real tokenizer and 512 positions (the OpenVINO
    calibration pads its texts to 384 tokens)."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny_bert_512")
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=64, max_position_embeddings=512)
    BertModel(config).eval().save_pretrained(path)
    AutoTokenizer.from_pretrained(bundled_model.path).save_pretrained(path)
    return path


@pytest.mark.slow
def test_peers_bench_on_a_tiny_model(peers_python, tiny_model_512, mixed_texts, tmp_path,
                                     monkeypatch):
    tiny_model = tiny_model_512
    folder = tmp_path / "in"
    folder.mkdir()
    texts = mixed_texts[:40]
    pq.write_table(pa.table({"id": np.arange(40), "text": texts}), folder / "a.parquet")
    monkeypatch.setenv("EMBEDPIPE_CACHE", str(tmp_path / "cache"))  # the exports, not the venv
    report = run_peers(PeerOptions(input=str(folder), model=str(tiny_model), dtypes=("float32",),
                                   rounds=1, warmup=4, venv=str(peers_python.parents[1]),
                                   workdir=str(tmp_path / "work")))
    by = {r["name"]: r for r in report["results"]}
    assert set(by) == set(PEERS) | {"embedpipe float32"}
    assert by["st-torch"]["x_vs_st_torch_float32"] == 1.0
    # float32 backends compute the same function; OpenVINO's default is bf16 on a bf16 CPU;
    # int8 ones differ by their quantization
    for name in ("st-onnx", "st-onnx-o3", "st-openvino-f32", "embedpipe float32"):
        assert by[name]["min_cosine"] >= 0.9999, name
    assert by["st-openvino"]["min_cosine"] >= 0.99
    for name in ("st-onnx-int8", "st-openvino-int8"):
        assert 0.5 < by[name]["min_cosine"] <= 1.0, name
    for row in by.values():
        assert row["seconds_median"] > 0 and 0 < row["fraction_of_matmul"]
    assert report["texts"] == 40 and report["int8_config"] == int8_config(
        bench_peers.cpu_flags())
    assert (tmp_path / "cache" / "bench-peers").is_dir()  # exports cached for the next bench
    text = render_peers(report)
    assert report["cpu_model"] in text and "ST onnx dynamic int8" in text
