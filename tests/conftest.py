"""Shared fixtures: the real movie snippets, the bundled model, a tiny random BERT, job helpers."""
from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pipeline.tools.datasets import fetch_movie_reviews  # noqa: E402
from pipeline.models.model_files import resolve_model  # noqa: E402


@pytest.fixture(scope="session")
def movie_dir(tmp_path_factory) -> Path:
    """The public movie-review snippets as 4 Parquet shards (download cached across runs)."""
    dest = tmp_path_factory.mktemp("movie_reviews")
    fetch_movie_reviews(dest)
    return dest


@pytest.fixture(scope="session")
def movie_table(movie_dir) -> pa.Table:
    return pq.read_table(movie_dir)


@pytest.fixture(scope="session")
def mixed_texts(movie_table) -> list[str]:
    """240 real texts of mixed length: short snippets, and joined snippets past 256 tokens."""
    texts = movie_table.column("text").to_pylist()
    rng = np.random.default_rng(0)
    picks = [texts[i] for i in rng.choice(len(texts), 200, replace=False)]
    longer = [" ".join(texts[j] for j in rng.choice(len(texts), k, replace=False))
              for k in (2, 4, 8, 16) for _ in range(10)]
    return picks + longer


@pytest.fixture(scope="session")
def bundled_model():
    return resolve_model("all-MiniLM-L6-v2")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, bundled_model) -> Path:
    """A 2-layer, 32-wide random BERT with the real tokenizer: fast for reliability tests."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny_bert")
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=64, max_position_embeddings=128)
    BertModel(config).eval().save_pretrained(path)
    AutoTokenizer.from_pretrained(bundled_model.path).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def snippets_out(tmp_path_factory, movie_table) -> Path:
    """Every 4th real snippet (2,652; the source file is ordered by valence, so a stride keeps
    both labels) embedded once: mean pooling, unit vectors, a flat index, text and label kept,
    parts of 1,000 rows. For the search, index and head tests."""
    from helpers import make_job, run

    folder = tmp_path_factory.mktemp("snippets")
    pq.write_table(movie_table.take(np.arange(0, movie_table.num_rows, 4)),
                   folder / "snippets.parquet")
    out = folder / "out"
    job = make_job(folder / "snippets.parquet", out,
                   encode={"pooling": "mean", "normalize": True},
                   output={"keep_columns": ["text", "label"], "rows_per_file": 1000},
                   index={"type": "flat", "metric": "ip"})
    job["model"]["max_length"] = 128
    run(job)
    return out


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def s3_server():
    """moto's S3 server on loopback for a test module; credentials and endpoint through the
    usual AWS variables. s3fs caches its clients, which would still point at an earlier
    module's (stopped) server: the cache is cleared as the server starts."""
    import s3fs
    from moto.server import ThreadedMotoServer

    s3fs.S3FileSystem.clear_instance_cache()
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield env
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        server.stop()


@pytest.fixture
def s3(s3_server):
    import s3fs

    fs = s3fs.S3FileSystem()
    bucket = f"b{time.time_ns()}"
    fs.mkdir(bucket)
    return fs, bucket
