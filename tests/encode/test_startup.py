"""Start-up: the process's age the first-batch log line reports, and that line, once."""
from __future__ import annotations

import logging
import subprocess
import sys
import threading

import numpy as np

from pipeline.encode import encoder as encoder_mod


def test_process_age_counts_from_the_process_start():
    code = ("import time; time.sleep(0.6); from pipeline.runtime.hardware import process_age; "
            "print(process_age())")
    age = float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                               check=True).stdout)
    assert 0.6 <= age < 60


def test_the_first_batch_is_logged_once_with_the_process_age(tiny_model, monkeypatch, caplog):
    from helpers import encoder_for
    from pipeline.encode.batching import collate
    from pipeline.encode.encoder import EncoderSettings
    from pipeline.models.model_files import resolve_model
    from pipeline.encode.tokenizer import TextTokenizer

    monkeypatch.setattr(encoder_mod, "_FIRST_BATCH_LOGGED", threading.Event())
    source = resolve_model(str(tiny_model))
    encoder = encoder_for(source, "cpu", "float32", EncoderSettings((-1,), "concat", "mean", True))
    tokenizer = TextTokenizer(source.path, 64)
    batch = collate(tokenizer(["one text", "and another"]).ids, np.arange(2), tokenizer.pad_id)
    with caplog.at_level(logging.INFO, logger="pipeline.encode.encoder"):
        encoder.encode_batch(batch)
        encoder.encode_batch(batch)
    lines = [r.getMessage() for r in caplog.records if "first batch" in r.getMessage()]
    assert len(lines) == 1 and "after the process started" in lines[0]


def test_a_run_imports_none_of_what_it_does_not_use(tmp_path, tiny_model):
    """`embedpipe run` loads no Ray, S3, scikit-learn or sentence-transformers: start-up is
    torch, transformers and what the run itself needs (docs/performance/amd-zen5.md, "Start-up"). A BERT-family model
    on CPU runs the fused forward, built without transformers' model classes, whose imports
    (torch._dynamo, torch.distributed, scipy) are most of a run's start-up."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from helpers import write_job

    pq.write_table(pa.table({"id": [1, 2, 3], "text": ["one text", "two", "and three"]}),
                   tmp_path / "in.parquet")
    job = write_job(tmp_path / "job.toml", tmp_path / "in.parquet", tmp_path / "out", tiny_model)
    code = ("import sys; from pipeline.cli import main\n"
            "try:\n    main(['run', sys.argv[1]])\nexcept SystemExit as exit:\n"
            "    assert exit.code == 0, exit.code\n"
            "print(sorted({m.split('.')[0] for m in sys.modules}))\n"
            "print(sorted(m for m in sys.modules if m.startswith(('transformers.', 'torch.'))))")
    done = subprocess.run([sys.executable, "-c", code, str(job)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    loaded = set(eval(done.stdout.strip().splitlines()[-2]))
    submodules = set(eval(done.stdout.strip().splitlines()[-1]))
    assert not {"transformers.modeling_utils", "torch._dynamo", "torch.distributed.tensor",
                "transformers.models.bert.modeling_bert"} & submodules
    assert {"torch", "transformers", "pyarrow", "faiss"} <= loaded  # the run really ran
    assert loaded.isdisjoint({"ray", "s3fs", "sklearn", "sentence_transformers", "boto3",
                              "botocore", "aiobotocore", "pandas"})
