"""embedpipe: batch embedding of Parquet text shards into Parquet vectors and a FAISS index."""
__version__ = "0.1.0"
