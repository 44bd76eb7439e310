"""Tools beside the pipeline: the benchmark against sentence-transformers and the public data sets."""
