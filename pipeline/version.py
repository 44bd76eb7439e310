"""embedpipe's version, and the versions of the libraries that shape its output."""
from __future__ import annotations

__version__ = "0.1.0"


def package_versions() -> dict[str, str]:
    import faiss
    import pyarrow
    import torch
    import transformers
    return {"embedpipe": __version__, "torch": torch.__version__,
            "transformers": transformers.__version__, "pyarrow": pyarrow.__version__,
            "faiss": faiss.__version__}
