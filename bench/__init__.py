"""Lab tools beside the product: corpus builders, evaluations and benchmarks, run from the
repository root as ``python -m bench.<module>``. They import ``pipeline``; ``pipeline`` never
imports them, and the wheel does not ship them."""

import json
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def print_contenders(med: dict, med_cpu: dict, texts: int, report: dict, json_path: str | None,
                     tail: str = "") -> None:
    """The speed benches' table (median wall, texts/s, median CPU a contender), the
    sentence-transformers / embedpipe ratios (and `tail`), and the report as JSON where asked."""
    print("| contender | median wall s | texts/s | median CPU s |\n| --- | ---: | ---: | ---: |")
    for name, s in med.items():
        print(f"| {name} | {s:.2f} | {texts / s:,.0f} | {med_cpu[name]:.2f} |")
    print(f"ratio sentence-transformers / embedpipe: {report['ratio_st_over_embedpipe']:.2f}x wall, "
          f"{report['ratio_cpu_st_over_embedpipe']:.2f}x CPU time{tail}")
    if json_path:
        Path(json_path).write_text(json.dumps(report, indent=2))
