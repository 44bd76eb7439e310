"""The nightly benchmark's table (text or markdown) and its verdict."""

from __future__ import annotations

from typing import Any

from .nights import SCALE_RSS_TARGET


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
