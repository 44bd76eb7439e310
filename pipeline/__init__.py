"""embedpipe: batch embedding of Parquet text shards into Parquet vectors and a FAISS index.

The package by stage (ARCHITECTURE.md has the map): io/ reads inputs and writes the output
folder, encode/ tokenizes and runs the model, index/ builds FAISS indexes, jobs/ runs a job,
commands/ works on finished folders, tools/ holds the bench and the data sets, cli.py is the
`embedpipe` command. `open_output` reads a finished folder back.
"""
from .version import __version__


def open_output(path: str):
    """A finished output folder, read back: its vectors in order, ids, kept columns, manifest."""
    from .io.output import open_output as _open

    return _open(path)


__all__ = ["__version__", "open_output"]
