"""The long-document evaluation: truncate / chunk+pool / chunk+rows run through the real CLI,
recall@1/@10 against the document ids, windows per document and cost, the table."""

from __future__ import annotations

import json
import logging
import os
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from bench import REPO_ROOT

from .corpus import quantile_summary, token_counts

log = logging.getLogger(__name__)


def collapse_ids(ids: Iterable[object]) -> list[object]:
    """Distinct ids in first-seen (rank) order: several window hits of one document count once."""
    seen: set[object] = set()
    out = []
    for i in ids:
        if i not in seen:
            seen.add(i)
            out.append(i)
    return out


def recall_at(ranked: Mapping[object, Sequence[object]], truth: Mapping[object, object],
              k: int) -> float:
    """Share of queries in ``truth`` whose document is among the first ``k`` distinct ids of
    ``ranked[query]`` (ids in rank order; a query without hits is a miss)."""
    if not truth:
        return float("nan")
    hits = sum(truth[q] in collapse_ids(ranked.get(q, ()))[:k] for q in truth)
    return hits / len(truth)


def ranked_ids(hits: pa.Table, id_column: str | None = None) -> dict[object, list[object]]:
    """``query_id -> [document id, ...]`` in rank order from a search ``--out`` file.

    The document id is ``doc_id`` when the hits carry one (window rows resolved to their
    document), else ``id``.
    """
    col = id_column or ("doc_id" if "doc_id" in hits.column_names else "id")
    d = hits.select(["query_id", "rank", col]).to_pydict()
    rows = sorted(zip(d["query_id"], d["rank"], d[col], strict=True), key=lambda r: (r[0], r[1]))
    out: dict[object, list[object]] = {}
    for q, _, doc in rows:
        out.setdefault(q, []).append(doc)
    return out


@dataclass(frozen=True)
class Setting:
    name: str
    overrides: tuple[str, ...]


SETTINGS = {
    "truncate": Setting("truncate", ()),
    "chunk-pool": Setting("chunk-pool", ("encode.long_text=chunk", "output.chunks=pool")),
    "chunk-rows": Setting("chunk-rows", ("encode.long_text=chunk", "output.chunks=rows")),
}


def _job_toml(name: str, input_path: Path, output_path: Path, max_length: int) -> str:
    return "\n".join([
        f"# written by bench.long_docs eval ({name})",
        f'name = "long-docs-{name}"',
        "", "[input]", f"path = {json.dumps(str(input_path))}",
        'text_column = "text"', 'id_column = "id"',
        "", "[model]", 'name = "all-MiniLM-L6-v2"', f"max_length = {max_length}",
        "", "[encode]", 'pooling = "mean"', "normalize = true",
        "", "[output]", f"path = {json.dumps(str(output_path))}",
        "", "[index]", "enabled = true", 'type = "flat"', 'metric = "ip"', "",
    ])


def _manifest_counts(out: Path) -> dict:
    """Rows in/out, windows (if recorded) and truncated rows, from the manifest's units."""
    manifest = json.loads((out / "manifest.json").read_text())
    units = list(manifest.get("units", {}).values())
    total = {"rows_in": 0, "vectors_out": 0, "truncated": 0, "windows": None}
    windows = [u.get("windows") for u in units]
    for u in units:
        total["rows_in"] += u.get("rows_in") or 0
        total["vectors_out"] += u.get("vectors_out") or 0
        total["truncated"] += u.get("truncated") or 0
    if units and all(isinstance(w, int) for w in windows):
        total["windows"] = sum(windows)
    return total


def _run_summary(output: str) -> dict:
    """The JSON summary `embedpipe run --json` printed (its last top-level JSON object), or {}."""
    for m in re.finditer(r"(?m)^\{", output):
        try:
            value, _ = json.JSONDecoder().raw_decode(output[m.start():])
        except ValueError:
            continue
        if isinstance(value, dict) and "seconds" in value:
            return value
    return {}


def _run(cmd: Sequence[str], env: Mapping[str, str], log_path: Path,
         cwd: str | None = None) -> tuple[int, str, float]:
    t0 = time.perf_counter()
    proc = subprocess.run(list(cmd), capture_output=True, text=True, env=dict(env), cwd=cwd)
    seconds = time.perf_counter() - t0
    log_path.write_text(f"$ {shlex.join(cmd)}\n# exit {proc.returncode}, {seconds:.1f}s\n"
                        f"--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}")
    return proc.returncode, proc.stdout + proc.stderr, seconds


def _failed(entry: dict, name: str, what: str, output: str) -> None:
    entry["status"] = "failed"
    entry["message"] = f"{what}: " + " | ".join(output.strip().splitlines()[-3:])
    log.warning("%s: %s", name, entry["message"])


def evaluate(docs: str | Path, queries: str | Path, work: str | Path, *,
             settings: Sequence[str] = tuple(SETTINGS), limit: int | None = None,
             k: int = 10, search_k: int | None = None, max_length: int = 256,
             python: str = sys.executable, pythonpath: str | None = None,
             extra_sets: Sequence[str] = ()) -> dict:
    """Embed ``docs`` with the real CLI once per setting, search ``queries`` and score them.

    ``limit`` documents spread evenly over the ids (all when None) and their queries are copied to
    ``work``; for each setting a job file is written to ``work/jobs/``, run with
    ``python -m pipeline.cli run JOB --mode overwrite`` (plus the setting's ``--set``
    overrides) and searched with ``search OUT --queries ... -k search_k``. recall@1 and
    recall@k count a query as found when its ``doc_id`` is among the first 1 / k distinct
    document ids in rank order. Returns the results, also written to
    ``work/results.json``; ``work/results.md`` holds the table.
    """
    work = Path(work).resolve()  # job files hold absolute paths
    (work / "jobs").mkdir(parents=True, exist_ok=True)
    (work / "logs").mkdir(parents=True, exist_ok=True)
    doc_table = pq.read_table(docs).sort_by("id")
    if limit is not None and limit < doc_table.num_rows:  # evenly spread over both sources
        spread = np.unique(np.linspace(0, doc_table.num_rows - 1, limit).round().astype(np.int64))
        doc_table = doc_table.take(pa.array(spread))
    if "tokens" not in doc_table.column_names:
        doc_table = doc_table.append_column(
            "tokens", pa.array(token_counts(doc_table.column("text").to_pylist()), pa.int64()))
    if "title" not in doc_table.column_names:
        doc_table = doc_table.append_column("title", pa.nulls(doc_table.num_rows, pa.string()))
    ids = set(doc_table.column("id").to_pylist())
    q_table = pq.read_table(queries, columns=["query_id", "text", "doc_id"])
    q_table = q_table.filter(pc.is_in(q_table.column("doc_id"),
                                              value_set=pa.array(sorted(ids), pa.int64())))
    input_dir = work / "input"
    input_dir.mkdir(exist_ok=True)
    for stale in input_dir.glob("*.parquet"):
        stale.unlink()
    pq.write_table(doc_table.select(["id", "text", "title"]), input_dir / "docs.parquet")
    q_path = work / "queries.parquet"
    pq.write_table(q_table, q_path)
    truth = dict(zip(q_table.column("query_id").to_pylist(),
                     q_table.column("doc_id").to_pylist(), strict=True))
    tokens = doc_table.column("tokens").to_pylist()
    n_docs = doc_table.num_rows

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    # The CLI runs in ``root`` (``-m`` puts the working folder first on sys.path), so the
    # pipeline it imports is that checkout's, whatever the venv's editable install points at.
    root = str(Path(pythonpath).resolve()) if pythonpath else str(REPO_ROOT)
    env["PYTHONPATH"] = os.pathsep.join([root, env["PYTHONPATH"]]) if env.get("PYTHONPATH") else root
    cli = [python, "-m", "pipeline.cli"]
    search_k = search_k or k

    results: dict = {
        "documents": n_docs, "queries": len(truth), "k": k, "search_k": search_k,
        "max_length": max_length,
        "tokens_per_document": quantile_summary(tokens),
        "documents_over_max_length": sum(t > max_length for t in tokens),
        "settings": {},
    }
    for name in settings:
        setting = SETTINGS[name]
        out = work / "out" / name
        job = work / "jobs" / f"{name}.toml"
        job.write_text(_job_toml(name, input_dir, out, max_length))
        sets = [a for s in (*setting.overrides, *extra_sets) for a in ("--set", s)]
        cmd = [*cli, "run", str(job), "--mode", "overwrite", "--no-progress", "--json", *sets]
        rc, output, seconds = _run(cmd, env, work / "logs" / f"{name}-run.log", root)
        entry: dict = {"overrides": list(setting.overrides), "job": str(job),
                       "command": shlex.join(cmd)}
        results["settings"][name] = entry
        if rc != 0:
            _failed(entry, name, f"embedpipe run exited {rc}", output)
            continue
        counts = _manifest_counts(out)
        summary = _run_summary(output)
        stage = summary.get("seconds") or {}
        hits_path = work / f"hits-{name}.parquet"
        cmd = [*cli, "search", str(out), "--queries", str(q_path), "--out", str(hits_path),
               "-k", str(search_k), "--text-column", "text", "--id-column", "query_id"]
        rc, output, search_seconds = _run(cmd, env, work / "logs" / f"{name}-search.log",
                                          root)
        if rc != 0:
            _failed(entry, name, f"embedpipe search exited {rc}", output)
            continue
        hits = pq.read_table(hits_path)
        ranked = ranked_ids(hits)
        if name == "truncate":  # the manifest records windows only for chunked texts (0 here)
            windows, windows_from = counts["vectors_out"], "one per document"
        elif counts["windows"]:
            windows, windows_from = counts["windows"], "manifest"
        elif name == "chunk-rows":
            windows, windows_from = counts["vectors_out"], "vector rows"
        else:
            windows, windows_from = None, "not recorded"
        short = sum(len(collapse_ids(ranked.get(q, ()))) < k for q in truth)
        entry.update({
            "status": "ok",
            "recall@1": recall_at(ranked, truth, 1),
            f"recall@{k}": recall_at(ranked, truth, k),
            "queries_with_fewer_than_k_documents": short,
            "rows_in": counts["rows_in"], "vectors_out": counts["vectors_out"],
            "truncated": counts["truncated"],
            "windows": windows, "windows_from": windows_from,
            "windows_per_document": None if windows is None else windows / max(n_docs, 1),
            "run_seconds": round(seconds, 2),
            "seconds_per_document": seconds / max(n_docs, 1),
            "job_seconds": stage.get("total"),
            "encode_seconds": stage.get("encode"),
            "encode_seconds_per_document": (None if stage.get("encode") is None
                                            else stage["encode"] / max(n_docs, 1)),
            "real_tokens": summary.get("real_tokens"),
            "padded_tokens": summary.get("padded_tokens"),
            "tokens_per_document": (None if summary.get("real_tokens") is None
                                    else summary["real_tokens"] / max(n_docs, 1)),
            "search_seconds": round(search_seconds, 2),
        })
    base = results["settings"].get("truncate", {})
    for entry in results["settings"].values():
        if entry.get("status") == "ok" and base.get("status") == "ok":
            entry["seconds_ratio_to_truncate"] = (entry["seconds_per_document"]
                                                  / base["seconds_per_document"])
            entry["encode_ratio_to_truncate"] = (
                entry["encode_seconds_per_document"] / base["encode_seconds_per_document"]
                if entry["encode_seconds_per_document"] is not None
                and base["encode_seconds_per_document"] else None)
    table = markdown_table(results)
    (work / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (work / "results.md").write_text(table + "\n")
    results["table"] = table
    return results


def _fmt(v: object, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def markdown_table(results: Mapping) -> str:
    """The results of :func:`evaluate` as a Markdown table, one row per setting."""
    k = results["k"]
    t = results["tokens_per_document"]
    lines = [
        f"{results['documents']} documents ({results['documents_over_max_length']} over "
        f"{results['max_length']} tokens; tokens per document min {t['min']}, median "
        f"{t['median']:.0f}, max {t['max']}), {results['queries']} queries, k={k}",
        "",
        f"| setting | recall@1 | recall@{k} | windows/doc | tokens/doc | s/doc (run) "
        "| x truncate | encode s/doc | x truncate | status |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for name, e in results["settings"].items():
        if e.get("status") != "ok":
            lines.append(f"| {name} | - | - | - | - | - | - | - | - | {e.get('status')}: "
                         f"{e.get('message', '')} |")
            continue
        lines.append(
            f"| {name} | {e['recall@1']:.3f} | {e[f'recall@{k}']:.3f} "
            f"| {_fmt(e['windows_per_document'], '.2f')} | {_fmt(e.get('tokens_per_document'), '.0f')} "
            f"| {e['seconds_per_document']:.3f} "
            f"| {_fmt(e.get('seconds_ratio_to_truncate'), '.2f')} "
            f"| {_fmt(e['encode_seconds_per_document'], '.3f')} "
            f"| {_fmt(e.get('encode_ratio_to_truncate'), '.2f')} | ok |")
    return "\n".join(lines)
