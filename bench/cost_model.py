"""What a billion rows cost: the per-row figures of a cost model, measured here, and the model.

    .venv/bin/python -m bench.cost_model --rows 4000 --markdown

Measured on this machine, with the default model (all-MiniLM-L6-v2) on synthetic rows (spans of
real English words with the bench corpus' length spread, bench.synthetic):
- the object-storage bytes a row of each `output.precision` (the committed vector parts' bytes,
  bookkeeping columns included, no kept columns, no index) and of the vector column alone;
- tokens a row and the encoder's FLOPs a token (tools.measure.encoder_flops), which turn a GPU's
  dense rate into rows/s (an estimate until a GPU measures it);
- a first run's rows/s on this CPU, and a re-export night (every file renamed, 1% of the texts
  changed) against it: the night's seconds that are not the model's, per row. These are the
  reading, hashing, confirming and copying of stored rows that a night does for every row.

The model then prices a 1B-row full run and a 1%-change re-export night on N GPUs (or CPU
nodes). Rates per CPU kind come from the performance pages (each measured on that CPU); GPU
rates are FLOP estimates at the utilisation range docs/performance/gpu.md explains.
"""
from __future__ import annotations

import argparse
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

PRECISIONS = (("float32", None), ("float16", None), ("int8", None), ("binary", None),
              ("binary", "int8"))
# Dense bf16/fp16 tensor rates (TFLOP/s, no sparsity) from the vendors' data sheets.
GPU_TFLOPS = {"T4": 65, "L4": 121, "A10G": 125, "A100": 312, "H100 SXM": 989}
UTILISATION = (0.25, 0.40)  # a 384-wide model on a GPU: see docs/performance/gpu.md
# Rows/s of the movie-snippets job (float32, defaults, 2 cores), each measured on that CPU kind:
# docs/performance/amd-zen3-avx2.md, amd-zen5.md (quiet machine).
CPU_ROWS_PER_S = {"AMD Zen 3 (AVX2), 2 cores": 147, "AMD Zen 5 (AVX-512 bf16), 2 cores": 585}
BILLION = 1_000_000_000


@dataclass
class Storage:
    label: str
    bytes_per_row: float  # every committed vector-part byte, per row
    vector_bytes_per_row: float  # the vector (and rescore copy) columns' compressed bytes


def _job(rows_dir: Path, out: Path, precision: str, rescore: str | None, max_length: int,
         model: str = "all-MiniLM-L6-v2") -> dict:
    output = {"path": str(out), "precision": precision}
    if rescore:
        output["rescore_precision"] = rescore
    return {"name": "cost-model", "input": {"path": str(rows_dir)},
            "model": {"name": model, "max_length": max_length, "dtype": "float32",
                      "compile": False},
            "encode": {"normalize": True}, "output": output, "index": {"enabled": False}}


def _run(job: dict, mode: str = "overwrite") -> tuple[dict, float]:
    from pipeline.config import config_from_dict
    from pipeline.jobs.runner import RunOptions, run_job

    start = time.perf_counter()
    summary = run_job(config_from_dict(job), RunOptions(mode=mode, progress=False))
    return summary.to_dict(), time.perf_counter() - start


def _part_bytes(out: Path) -> tuple[int, int, int]:
    """(all bytes, vector-column bytes, rows) of a folder's committed vector parts."""
    from pipeline.io.output import open_output

    total = vector = rows = 0
    for name in open_output(str(out)).parts.files:
        path = out / name
        total += path.stat().st_size
        meta = pq.ParquetFile(path).metadata
        rows += meta.num_rows
        for g in range(meta.num_row_groups):
            group = meta.row_group(g)
            for c in range(group.num_columns):
                column = group.column(c)
                if column.path_in_schema.split(".")[0] in ("vector", "rescore_vector"):
                    vector += column.total_compressed_size
    return total, vector, rows


def storage(rows_dir: Path, work: Path, max_length: int) -> dict:
    """Bytes a row of each precision, and the default model's encode rate and tokens a row on
    this CPU (from the float32 run)."""
    found, here = [], {}
    for precision, rescore in PRECISIONS:
        out = work / f"out-{precision}-{rescore or 'none'}"
        summary, _ = _run(_job(rows_dir, out, precision, rescore, max_length))
        total, vector, rows = _part_bytes(out)
        label = precision + (f" + {rescore} kept for rescoring" if rescore else "")
        found.append(Storage(label, total / rows, vector / rows).__dict__)
        if precision == "float32":
            here = {"encode_rows_per_s": summary["rows_encoded"] / summary["seconds"]["encode"],
                    "tokens_per_row": summary["real_tokens"] / summary["rows_encoded"]}
    return {"storage": found, "here": here}


def _cached(work: Path, name: str, compute) -> dict:
    """A stage's result, kept in the work folder so a second call only redoes what is missing."""
    path = work / f"{name}.json"
    if path.is_file():
        return json.loads(path.read_text())
    result = compute()
    path.write_text(json.dumps(result, indent=1))
    return result


def _re_export(src: Path, dest: Path, share: float, seed: int = 1) -> int:
    """Every file under a new name, `share` of the texts changed; returns the rows changed."""
    import pyarrow as pa

    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    changed = 0
    for i, path in enumerate(sorted(src.glob("*.parquet"))):
        table = pq.read_table(path)
        texts = table.column("text").to_pylist()
        for pos in rng.choice(len(texts), int(round(len(texts) * share)), replace=False):
            texts[pos] = f"{texts[pos]} (revised {seed})"
            changed += 1
        table = table.set_column(table.schema.get_field_index("text"), "text",
                                 pa.array(texts, pa.string()))
        pq.write_table(table, dest / f"export-{seed}-{i:05d}.parquet")
    return changed


def night(work: Path, rows: int, max_length: int) -> dict:
    """A first run, an unchanged rerun (the fixed cost of any run) and a re-export night (every
    file renamed, 1% changed) on one folder, with a stand-in model as wide as the default (one
    random layer, 384 wide, bench.nightly's "wide"): the night's reading, hashing, confirming
    and copying a row do not depend on the model's depth, and a cheap model lets the rows be many.
    """
    from bench.nightly.runs import build_tiny_model
    from bench.synthetic import generate_rows

    model, rows_dir = work / "stand-in-384", work / "night-first"
    build_tiny_model(model, "wide", max_positions=max(128, max_length))
    generate_rows(rows_dir, rows, rows_per_file=max(1, rows // 10), seed=7)
    out, night_dir = work / "out-night", work / "night-input"
    first, first_wall = _run(_job(rows_dir, out, "float32", None, max_length, str(model)))
    _, fixed_wall = _run(_job(rows_dir, out, "float32", None, max_length, str(model)),
                         mode="incremental")
    changed = _re_export(rows_dir, night_dir, 0.01)
    again, night_wall = _run(_job(night_dir, out, "float32", None, max_length, str(model)),
                             mode="incremental")
    encode_seconds = again["rows_encoded"] / first["rows_per_second"]
    return {"rows": first["rows_read"], "changed": changed, "first_seconds": first_wall,
            "fixed_seconds": fixed_wall, "night_seconds": night_wall,
            "night_encoded": again["rows_encoded"], "night_reused": again["rows_reused"],
            "night_other_us_per_row":
                1e6 * max(0.0, night_wall - fixed_wall - encode_seconds) / first["rows_read"]}


def flops_per_token(rows_dir: Path, max_length: int) -> float:
    from transformers import AutoConfig, AutoTokenizer

    from pipeline.models.model_files import resolve_model

    source = resolve_model("all-MiniLM-L6-v2")
    tokenizer = AutoTokenizer.from_pretrained(source.path)
    texts = pq.read_table(sorted(rows_dir.glob("*.parquet"))[0]).column("text").to_pylist()
    lengths = np.array([len(ids) for ids in tokenizer(texts, truncation=True,
                                                      max_length=max_length)["input_ids"]])
    from pipeline.tools.measure import encoder_flops

    return encoder_flops(AutoConfig.from_pretrained(source.path), lengths) / lengths.sum()


def cost_table(tokens_per_row: float, flop_per_token: float, other_us_per_row: float,
               nodes: tuple[int, ...] = (1, 8, 64)) -> list[dict]:
    """Hours for 1B rows, full and a 1%-change re-export night, per device kind and count."""
    kinds = {f"GPU {name} (estimate)": tuple(t * 1e12 * u / (flop_per_token * tokens_per_row)
                                             for u in UTILISATION)
             for name, t in GPU_TFLOPS.items()}
    kinds.update({f"CPU {name} (measured)": (r, r) for name, r in CPU_ROWS_PER_S.items()})
    table = []
    for kind, (low, high) in kinds.items():
        for n in nodes:
            full = [BILLION / (n * rate) / 3600 for rate in (high, low)]
            # a night encodes 1% and reads, hashes and copies every row; the copying runs on the
            # workers' CPUs (2 cores a worker measured here), in parallel across the N workers
            other = BILLION * other_us_per_row * 1e-6 / n / 3600
            nights = [0.01 * f + other for f in full]
            table.append({"kind": kind, "workers": n, "rows_per_s_each": (low, high),
                          "full_hours": full, "night_hours": nights})
    return table


def _span(values: tuple[float, float], fmt: str) -> str:
    low, high = values
    return format(low, fmt) if abs(high - low) < 1e-9 * max(1.0, abs(high)) else \
        f"{format(low, fmt)}-{format(high, fmt)}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=4000, help="rows for the storage runs")
    parser.add_argument("--night-rows", type=int, default=50_000,
                        help="rows for the night's per-row cost (stand-in model)")
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--workdir", default="out/cost-model")
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument("--night-us-per-row", type=float,
                        help="price nights with this per-row cost (e.g. bench.nightly's on a quiet "
                             "machine) instead of the one measured here")
    args = parser.parse_args()
    from bench.synthetic import generate_rows
    from pipeline.runtime.hardware import this_cpu

    work = Path(args.workdir)
    rows_dir = work / "input"
    generate_rows(rows_dir, args.rows, rows_per_file=max(1, args.rows // 4))
    measured = _cached(work, "storage", lambda: storage(rows_dir, work, args.max_length))
    stored, here = measured["storage"], measured["here"]
    nightly = _cached(work, "night", lambda: night(work, args.night_rows, args.max_length))
    flop = flops_per_token(rows_dir, args.max_length)
    night_us = args.night_us_per_row or nightly["night_other_us_per_row"]
    table = cost_table(here["tokens_per_row"], flop, night_us)
    result = {"cpu": this_cpu().model, "storage": stored, "here": here, "night": nightly,
              "night_us_per_row_priced": night_us, "flop_per_token": flop, "table": table}
    if not args.markdown:
        print(json.dumps(result, indent=1))
        return
    print(f"CPU: {result['cpu']}; {args.rows:,} synthetic rows, max_length {args.max_length}\n")
    print("| output.precision | bytes a row (parts) | of which the vector | 1B rows |")
    print("| --- | ---: | ---: | ---: |")
    for s in stored:
        print(f"| {s['label']} | {s['bytes_per_row']:,.0f} | {s['vector_bytes_per_row']:,.0f} | "
              f"{s['bytes_per_row'] * BILLION / 1e12:,.2f} TB |")
    n = nightly
    print(f"\nall-MiniLM-L6-v2 here: {here['encode_rows_per_s']:,.1f} rows/s encoding (float32, "
          f"this machine as loaded), {here['tokens_per_row']:.1f} tokens a row, {flop / 1e6:.1f} MFLOP a token.\n"
          f"Stand-in night ({n['rows']:,} rows): first run {n['first_seconds']:.1f} s, unchanged "
          f"rerun {n['fixed_seconds']:.1f} s, re-export night {n['night_seconds']:.1f} s "
          f"({n['night_encoded']:,} encoded, {n['night_reused']:,} reused): "
          f"{n['night_other_us_per_row']:.1f} us a row besides the encoding and the fixed cost; "
          f"nights priced at {night_us:.1f} us a row\n")
    print("| workers | kind | rows/s each | 1B-row full run (hours) | 1%-change re-export night (hours) |")
    print("| ---: | --- | ---: | ---: | ---: |")
    for row in table:
        print(f"| {row['workers']} | {row['kind']} | {_span(row['rows_per_s_each'], ',.0f')} | "
              f"{_span(tuple(row['full_hours']), ',.1f')} | "
              f"{_span(tuple(row['night_hours']), ',.2f')} |")


if __name__ == "__main__":
    main()
