"""One benchmark run and its check: the stand-in model, the job file, `embedpipe run` as a
subprocess with its peak RSS, and a maintained folder compared with a fresh one."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from bench import REPO_ROOT
from pipeline.io.precision import Precision

# The stand-in model: (layers, hidden, heads, intermediate). "tiniest" is for --scale.
# tiny: 20,000 rows in ~7.6 s of run time on a quiet 2-core AMD EPYC (FFN 512: ~8.8 s), 200,000
# in 56 s, so a 1M-row full run should take ~5-6 minutes there.
# "wide": one layer as wide as all-MiniLM-L6-v2, so what a night copies a row is the default's.
TINY_SIZES = {"tiny": (2, 128, 2, 256), "tiniest": (1, 32, 2, 64), "wide": (1, 384, 6, 384)}
INDEX_TYPES = {"flat": "flat", "ivf": "ivf-flat", "hnsw": "hnsw"}
VECTOR_TOLERANCE = 1e-5
RECALL_TOLERANCE = 0.01


class BenchError(RuntimeError):
    """A run or a step of the benchmark failed."""


def build_tiny_model(dest: Path, size: str = "tiny", max_positions: int = 128) -> dict[str, int]:
    """A random BERT of TINY_SIZES[size] with all-MiniLM-L6-v2's WordPiece tokenizer, seeded."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    from pipeline.models.model_files import resolve_model

    layers, hidden, heads, intermediate = TINY_SIZES[size]
    sizes = {"layers": layers, "hidden": hidden, "heads": heads, "intermediate": intermediate}
    if (dest / "config.json").is_file() and json.loads((dest / "config.json").read_text()).get(
            "hidden_size") == hidden and (dest / "tokenizer.json").is_file():
        return sizes
    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, hidden_size=hidden, num_hidden_layers=layers,
                        num_attention_heads=heads, intermediate_size=intermediate,
                        max_position_embeddings=max_positions)
    BertModel(config).eval().save_pretrained(dest)
    AutoTokenizer.from_pretrained(resolve_model("all-MiniLM-L6-v2").path).save_pretrained(dest)
    return sizes


def write_job(path: Path, input_dir: Path, out: Path, model: str, max_length: int,
              index_type: str | None, precision: str = "float32") -> Path:
    """The job file of every run: mean pooling, unit vectors stored at `precision`, index by
    index_type (None: no index)."""
    index = (f'enabled = true\ntype = "{INDEX_TYPES[index_type]}"\nmetric = "ip"\n'
             if index_type else "enabled = false\n")
    path.write_text(
        f'name = "nightly-bench"\n[input]\npath = {json.dumps(str(input_dir))}\n'
        f'text_column = "text"\nid_column = "id"\n'
        f'[model]\nname = {json.dumps(model)}\nmax_length = {max_length}\ndevice = "cpu"\n'
        f'dtype = "float32"\ncompile = false\n'
        f'[encode]\npooling = "mean"\nnormalize = true\n'
        f'[output]\npath = {json.dumps(str(out))}\nprecision = "{precision}"\n'
        f'[index]\n{index}')
    return path


@dataclass
class RunResult:
    label: str
    seconds: float
    peak_rss_mb: float | None
    summary: dict[str, Any]
    expected_encoded: int | None = None  # changed + added rows: what a run needs to encode
    target_ratio: float | None = None
    ratio: float | None = None
    checks: dict[str, bool | None] = field(default_factory=dict)
    load_before: float | None = None  # 1-minute load average as the run started: other work
    load_after: float | None = None
    cpu_seconds: float | None = None  # the child's user + system CPU seconds
    involuntary_switches: int | None = None  # the child preempted: other work on the cores

    def get(self, key: str) -> Any:
        return self.summary.get(key)


# A fresh process per run, so RUSAGE_CHILDREN holds this one run's child only.
_RUSAGE_WRAPPER = (
    "import resource, subprocess, sys\n"
    "rc = subprocess.call(sys.argv[2:])\n"
    "u = resource.getrusage(resource.RUSAGE_CHILDREN)\n"
    "open(sys.argv[1], 'w').write(f'{u.ru_maxrss} {u.ru_nivcsw} {u.ru_utime} {u.ru_stime}')\n"
    "sys.exit(rc)\n")


def run_embedpipe(job: Path, label: str, mode: str = "incremental",
                  threads: int | None = None) -> RunResult:
    """`embedpipe run JOB --json` as a subprocess: wall seconds, peak RSS, the summary.
    threads: OMP_NUM_THREADS for the child (torch's intra-op threads); None: its default."""
    cmd = [sys.executable, "-m", "pipeline.cli", "run", str(job), "--json", "--no-progress",
           "--mode", mode]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(REPO_ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]),
        "TOKENIZERS_PARALLELISM": os.environ.get("TOKENIZERS_PARALLELISM", "false")}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="nightly-rss-") as tmp:
        rss_file = Path(tmp) / "rss"
        if Path("/usr/bin/time").is_file():
            cmd = ["/usr/bin/time", "-f", "%M %c %U %S", "-o", str(rss_file)] + cmd
        else:
            cmd = [sys.executable, "-c", _RUSAGE_WRAPPER, str(rss_file)] + cmd
        start = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        seconds = time.perf_counter() - start
        text = rss_file.read_text() if rss_file.is_file() else ""
    # "maxrss_KiB nivcsw user_s system_s" (GNU time's %M %c %U %S, or the wrapper's rusage)
    found = re.findall(r"^(\d+) (\d+) ([\d.]+) ([\d.]+)$", text, re.M)
    rss = int(found[-1][0]) / 1024 if found else None  # KiB in both
    switches = int(found[-1][1]) if found else None
    cpu = float(found[-1][2]) + float(found[-1][3]) if found else None
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
        raise BenchError(f"{label}: embedpipe run exited {proc.returncode}:\n{tail}")
    return RunResult(label, seconds, rss, json.loads(proc.stdout), load_before=load,
                     load_after=os.getloadavg()[0], cpu_seconds=cpu,
                     involuntary_switches=switches)


# --------------------------------------------------------------------------- equivalence


def read_folder(out: Path) -> tuple[pa.Array, np.ndarray]:
    """Ids and vectors of an output folder, in the manifest's unit order."""
    from pipeline.io.ledger import Ledger
    from pipeline.io.storage import Store
    from pipeline.io.vectors import to_matrix

    store = Store(str(out))
    files = Ledger(store).vector_files()
    tables = [pq.read_table(store.path(f), columns=["id", "vector"]) for f in files]
    if not tables:
        return pa.array([], pa.int64()), np.zeros((0, 0), np.float32)
    ids = pa.concat_arrays([t.column("id").combine_chunks() for t in tables])
    vectors = np.concatenate([to_matrix(t.column("vector")) for t in tables])
    return ids, vectors


def _search(out: Path, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, dict]:
    """(scores, ids as int positions into the folder's id map -> ids) of the folder's index."""
    from pipeline.index.build import load_index
    from pipeline.index.files import ids_file, read_tombstones
    from pipeline.index.live import LiveIndex
    from pipeline.io.storage import Store

    store = Store(str(out))
    index, infos = load_index(store)
    id_map = pq.read_table(store.path(ids_file(infos)))
    live = LiveIndex(index, id_map.column("faiss_id").to_numpy(), read_tombstones(store, infos))
    ids = id_map.column("id").to_numpy()
    scores, pos = live.search(queries, k)  # labels -> rows
    return scores, np.where(pos >= 0, ids[np.maximum(pos, 0)], -1), infos


def compare_folders(maintained: Path, fresh: Path, queries: int = 1000, k: int = 10,
                    index_type: str | None = "flat", seed: int = 0,
                    precision: str = "float32") -> dict[str, Any]:
    """The equivalence checks: ids and order, vectors within 1e-5, search over both indexes.
    Each check: {"pass": bool, ...details}."""
    import faiss

    checks: dict[str, Any] = {}
    ids_m, vec_m = read_folder(maintained)
    ids_f, vec_f = read_folder(fresh)
    same_ids = len(ids_m) == len(ids_f) and ids_m.equals(ids_f)
    first_diff = None
    if not same_ids:
        n = min(len(ids_m), len(ids_f))
        neq = np.flatnonzero(ids_m.slice(0, n).to_numpy(zero_copy_only=False)
                             != ids_f.slice(0, n).to_numpy(zero_copy_only=False))
        first_diff = int(neq[0]) if len(neq) else n
    checks["ids"] = {"pass": same_ids, "rows_maintained": len(ids_m), "rows_fresh": len(ids_f),
                     "first_difference": first_diff}
    if vec_m.shape == vec_f.shape and len(vec_m):
        max_diff = max(float(np.abs(vec_m[i:i + 100_000] - vec_f[i:i + 100_000]).max())
                       for i in range(0, len(vec_m), 100_000))
    else:
        max_diff = float("inf")
    checks["vectors"] = {"pass": bool(max_diff <= VECTOR_TOLERANCE), "max_abs_diff": max_diff,
                         "tolerance": VECTOR_TOLERANCE}
    if index_type is None:
        return checks
    rng = np.random.default_rng(seed)
    binary = precision.endswith("binary")
    if binary:  # the stored bits as the index holds them: Hamming against exact search
        vec_m, vec_f = (Precision(precision).index_values(v) for v in (vec_m, vec_f))
    q = vec_m[np.sort(rng.choice(len(vec_m), min(queries, len(vec_m)), replace=False))]
    kk = min(k, len(vec_m))

    def exact_index():
        exact = faiss.IndexBinaryFlat(vec_f.shape[1] * 8) if binary \
            else faiss.IndexFlatIP(vec_f.shape[1])
        exact.add(vec_f)
        return exact
    scores_m, found_m, _ = _search(maintained, q, kk)
    scores_f, found_f, _ = _search(fresh, q, kk)
    if index_type == "flat":
        # Exactly the same top-k ids; a query whose k-th and (k+1)-th scores tie (duplicate
        # texts) may pick either at the boundary, which is counted apart, not as a failure.
        ref_scores, _ = exact_index().search(q, min(kk + 1, len(vec_f)))
        differ = [i for i in range(len(q)) if set(found_m[i]) != set(found_f[i])]
        ties = [i for i in differ if ref_scores.shape[1] > kk
                and abs(ref_scores[i, kk - 1] - ref_scores[i, kk]) <= VECTOR_TOLERANCE]
        checks["search"] = {"pass": len(differ) == len(ties), "queries": len(q), "k": kk,
                            "queries_differing": len(differ), "of_which_boundary_ties": len(ties)}
    else:
        truth_d, truth_pos = exact_index().search(q, kk)
        truth = ids_f.to_numpy(zero_copy_only=False)[truth_pos]

        def recall(found: np.ndarray, scores: np.ndarray) -> float:
            if binary:  # Hamming distances tie by the dozen: a hit within the k-th distance
                return float(((scores <= truth_d[:, -1:]) & (found >= 0)).mean())
            return float(np.mean([len(set(a) & set(b)) / kk for a, b in zip(found, truth)]))

        r_m, r_f = recall(found_m, scores_m), recall(found_f, scores_f)
        # the maintained index may not answer worse than a fresh build (better is no fault)
        checks["search"] = {"pass": r_m >= r_f - RECALL_TOLERANCE, "queries": len(q), "k": kk,
                            "recall_maintained": r_m, "recall_fresh": r_f,
                            "tolerance": RECALL_TOLERANCE}
    return checks
