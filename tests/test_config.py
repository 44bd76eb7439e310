"""The job file contract: defaults, validation with messages that name the key, overrides."""
from __future__ import annotations

import pytest

from pipeline.config import ConfigError, config_from_dict, load_job


def write(tmp_path, text: str, name="nightly.toml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_defaults_and_name_from_file_stem(tmp_path):
    job = load_job(write(tmp_path, '[input]\npath = "data/x"\n'))
    assert job.name == "nightly"
    assert job.output.path == "out/nightly"
    assert (job.model.name, job.model.device, job.model.dtype) == ("all-MiniLM-L6-v2", "auto", "float32")
    assert job.model.max_length is None  # the model's own limit, resolved at run time
    assert (job.model.compile, job.model.attention) == ("auto", "auto")
    for value in (True, False, "auto"):
        assert config_from_dict({"model": {"compile": value}}).model.compile == value
    assert (job.encode.pooling, job.encode.batch_tokens, job.encode.max_batch_size,
            job.encode.sort_window, job.encode.normalize) == ("auto", None, 256, 4096, None)
    # auto / None follow the model folder (issue 14): resolved against the model before a run
    # the token budget goes by device unless set: 4,096 on CPU (measured faster), 8,192 on CUDA
    assert (job.encode.token_budget("cpu"), job.encode.token_budget("cuda")) == (4096, 8192)
    assert config_from_dict({"encode": {"batch_tokens": 999}}).encode.token_budget("cpu") == 999
    assert (job.output.vector_dtype, job.output.rows_per_file) == ("float32", 100_000)
    assert (job.index.enabled, job.index.type, job.index.metric) == (True, "flat", "ip")


def test_shipped_job_file_loads():
    job = load_job("jobs/movie_reviews.toml")
    assert job.name == "movie-reviews" and job.input.path == "data/movie_reviews"


@pytest.mark.parametrize("text, words", [
    ('[encode]\npooling = "average"\n', ["encode.pooling", "cls", "mean", "max", "concat-last-four", "pooler"]),
    ('[model]\ndtype = "int4"\n', ["model.dtype", "float32", "bfloat16", "float16", "int8"]),
    ('[model]\ndevice = "tpu"\n', ["model.device", "cuda:N"]),
    ('[encode]\nbatch_tokens = 0\n', ["encode.batch_tokens", "positive"]),
    ('[encode]\nbatch_tokens = "big"\n', ["encode.batch_tokens", "integer"]),
    ('[encode]\nnormalize = "yes"\n', ["encode.normalize", "true or false"]),
    ('[encode]\npoolng = "cls"\n', ["encode.poolng", "pooling"]),
    ('[outputs]\npath = "x"\n', ["outputs", "input, model, encode, output, index"]),
    ('[index]\ntype = "annoy"\n', ["index.type", "flat", "hnsw", "ivf-pq"]),
    ('[index]\nmetric = "cosine"\n', ["index.metric", "ip", "l2"]),
    ('[output]\nvector_dtype = "float64"\n', ["output.vector_dtype", "float16"]),
    ('[encode]\nlayers = []\n', ["encode.layers", "non-empty list"]),
    ('[encode]\nlayer_combine = "max"\n', ["encode.layer_combine", "concat", "sum"]),
    ('[encode]\npooling = "pooler"\nlayers = [-1]\n', ["pooler", "layers"]),
    ('[encode]\nbatch_tokens = 4096\nmax_batch_size = 9000\n', ["max_batch_size", "batch_tokens"]),
    ('input = 3\n', ["[input]", "table"]),
    ('[model]\ncompile = "yes"\n', ["model.compile", "true, false or 'auto'"]),
    ('[model]\ncompile = 1\n', ["model.compile", "true, false or 'auto'"]),
    ('[model]\nattention = "flash"\n', ["model.attention", "sdpa", "amx"]),
])
def test_bad_values_name_the_key_and_what_is_allowed(tmp_path, text, words):
    with pytest.raises(ConfigError) as err:
        load_job(write(tmp_path, text))
    for word in words:
        assert word in str(err.value)


def test_not_toml_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_job(write(tmp_path, "[input\n"))
    with pytest.raises(ConfigError, match="not found"):
        load_job(tmp_path / "nope.toml")


def test_overrides_parse_values_as_toml_else_string(tmp_path):
    path = write(tmp_path, '[encode]\npooling = "mean"\n')
    job = load_job(path, ["encode.pooling=cls", "output.path=/tmp/x", "encode.normalize=true",
                          "encode.batch_tokens=1024", "encode.layers=[-2, -1]", "model.max_length=64"])
    assert job.encode.pooling == "cls" and job.output.path == "/tmp/x"
    assert job.encode.normalize is True and job.encode.batch_tokens == 1024
    assert job.encode.layers == (-2, -1) and job.model.max_length == 64
    with pytest.raises(ConfigError, match="encode.pooling"):
        load_job(path, ["encode.pooling=nope"])
    with pytest.raises(ConfigError, match="section.key=value"):
        load_job(path, ["encode.pooling"])


def test_pooling_presets_are_the_general_form():
    spec = lambda **e: config_from_dict({"encode": e}).encode.pooling_spec()  # noqa: E731
    assert spec(pooling="cls") == ((-1,), "concat", "cls")
    assert spec(pooling="mean") == ((-1,), "concat", "mean")
    assert spec(pooling="concat-last-four") == ((-4, -3, -2, -1), "concat", "mean")
    assert spec(pooling="pooler") is None
    assert spec(pooling="mean", layers=[0, 6], layer_combine="sum") == ((0, 6), "sum", "mean")


def test_vector_settings_ignore_batching_but_not_pooling():
    base = config_from_dict({})
    assert config_from_dict({"encode": {"batch_tokens": 999, "sort_window": 7}}).vector_settings() \
        == base.vector_settings()
    assert config_from_dict({"encode": {"pooling": "cls"}}).vector_settings() != base.vector_settings()
    assert config_from_dict({"output": {"vector_dtype": "float16"}}).vector_settings() \
        != base.vector_settings()


def test_config_is_frozen():
    job = config_from_dict({})
    with pytest.raises(Exception):
        job.encode.pooling = "cls"  # type: ignore[misc]
