"""torch.compile's persistent cache, so that a nightly job pays the compile once.

Inductor keeps compiled graphs across processes in two caches: the FX-graph cache (generated code
and built kernels) and the AOT-autograd cache (the traced forward). Both live under
`TORCHINDUCTOR_CACHE_DIR`, which embedpipe points at `$EMBEDPIPE_CACHE/inductor` (default
`~/.cache/embedpipe/inductor`) before it compiles. The FX-graph cache takes a frozen graph (the
weights as constants) as long as its weights are not prepacked for oneDNN ("mkldnn tensors
unpickleable"), so a compile through the cache freezes without prepacking (encoder.py); its key
holds the weights' shapes, not their values, which the compiled code reads from the model it
runs. The AOT-autograd cache refuses frozen graphs, so the forward is traced again each process
(a few seconds); Inductor's code generation and C++ builds are what the cache saves.

Which compiles are warm is embedpipe's own record: after a compiled model's first batch, a marker
named by `entry_key` (weights fingerprint, dtype, attention, torch version, device) is written
under `inductor/embedpipe-entries/`. `compile = "auto"` reads it in `resolve_runtime` (runtime.py);
nothing else decides from it. The cache itself is Inductor's and checks its own keys: a stale
marker (the folder emptied by hand) costs one cold compile, never a wrong graph.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

ENV = "EMBEDPIPE_CACHE"
ENTRIES = "embedpipe-entries"
_USER_DIR = os.environ.get("TORCHINDUCTOR_CACHE_DIR")  # set before embedpipe ran: it wins


def cache_root() -> Path:
    return Path(os.environ.get(ENV) or "~/.cache/embedpipe").expanduser()


def inductor_dir() -> Path:
    return cache_root() / "inductor"


def entry_key(fingerprint: str, dtype: str, attention: str, device: str) -> str:
    """One compiled model's name in the record: what changes the graph Inductor builds."""
    import torch

    from .hardware import cpu_flags, cpu_model

    where = (device if device.startswith("cuda") else
             f"{cpu_model()} {hashlib.sha256(' '.join(sorted(cpu_flags())).encode()).hexdigest()[:8]}")
    text = json.dumps([fingerprint, dtype, attention, torch.__version__, where])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _marker(key: str) -> Path:
    return inductor_dir() / ENTRIES / f"{key}.json"


def is_warm(key: str) -> bool:
    return _marker(key).is_file()


def mark_warm(key: str, info: dict) -> None:
    """Record that `key` compiled here (written whole: temporary name, then rename)."""
    path = _marker(key)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(info, indent=2))
        os.replace(tmp, path)
    except OSError:  # a read-only home: the next run compiles cold again, nothing else changes
        pass


def use_cache() -> Path:
    """Point Inductor's caches at embedpipe's folder and switch them on (before compiling). A
    TORCHINDUCTOR_CACHE_DIR set by the user wins."""
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config

    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    # torch writes its default into TORCHINDUCTOR_CACHE_DIR the first time anything asks for
    # the folder (even before embedpipe is imported): that value is torch's, not the user's.
    user = _USER_DIR if _USER_DIR and (os.path.abspath(_USER_DIR)
                                       != os.path.abspath(default_cache_dir())) else None
    folder = Path(user or inductor_dir())
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(folder)
    folder.mkdir(parents=True, exist_ok=True)
    inductor_config.fx_graph_cache = True
    functorch_config.enable_autograd_cache = True
    return folder
