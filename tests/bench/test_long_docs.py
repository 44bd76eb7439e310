"""Tests for bench.long_docs: HTML / man-page stripping, query picking and removal,
recall over collapsed window hits. No network: the corpus test runs only when the pinned .debs
are already in the download cache (``python -m bench.long_docs fetch ...`` puts them
there), and the CLI test embeds three small texts with the bundled model."""
from __future__ import annotations

import json
import random
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.tools.artifacts import cached
from bench.long_docs import (
    MANPAGES_DEBS,
    MANPAGES_DEV_DEBS,
    PYDOC_DEBS,
    Block,
    blocks_to_text,
    collapse_ids,
    evaluate,
    fetch_long_docs,
    html_to_blocks,
    is_prose_sentence,
    man_to_blocks,
    markdown_table,
    pick_query,
    ranked_ids,
    recall_at,
    split_sentences,
)

PAGE = """<!DOCTYPE html>
<html><head><title>json — JSON encoder — Python 3.11.2 documentation</title>
<style>body { color: red }</style><script>var x = "script text";</script></head>
<body>
<div class="mobile-nav"><a href="#">Menu link</a></div>
<div class="related" role="navigation"><ul><li><a href="index.html">index</a></li></ul></div>
<div class="document"><div class="documentwrapper"><div class="bodywrapper">
<div class="body" role="main">
<section id="json"><h1><code>json</code> — JSON encoder<a class="headerlink" href="#json">¶</a></h1>
<p>JSON is a   lightweight
data interchange format.</p>
<div class="highlight"><pre><span class="gp">&gt;&gt;&gt; </span>import json
<span class="gp">&gt;&gt;&gt; </span>json.dumps([1, 2])
'[1, 2]'
</pre></div>
<ul><li><p>First item &amp; more.</p></li><li><p>Second item.</p></li></ul>
<table><tr><th>Key</th><th>Value</th></tr><tr><td>a</td><td>1</td></tr></table>
<aside class="sidebar"><p>Sidebar box text.</p></aside>
<aside class="footnote brackets" role="note"><p>A footnote stays.</p></aside>
</section></div></div></div>
<div class="sphinxsidebar" role="navigation"><h3>Previous topic</h3><p>marshal</p></div>
</div>
<div class="footer">Copyright footer.</div>
</body></html>
"""


def test_html_to_blocks_keeps_the_body_and_drops_navigation():
    title, blocks = html_to_blocks(PAGE)
    assert title == "json — JSON encoder"
    text = blocks_to_text(blocks)
    for gone in ("Menu link", "index", "script text", "color: red", "¶", "Previous topic",
                 "marshal", "Copyright footer", "Sidebar box text", "documentation"):
        assert gone not in text
    assert text.startswith("json — JSON encoder\n\nJSON is a lightweight data interchange "
                           "format.\n\n>>> import json\n>>> json.dumps([1, 2])\n'[1, 2]'\n\n")
    assert "First item & more.\n\nSecond item." in text
    assert "Key | Value\n\na | 1" in text
    assert text.endswith("A footnote stays.")
    kinds = {b.text.split("\n")[0]: b.kind for b in blocks}
    assert kinds["json — JSON encoder"] == "heading"
    assert kinds[">>> import json"] == "code"
    assert kinds["JSON is a lightweight data interchange format."] == "prose"
    assert kinds["Key | Value"] == "table"


def test_html_without_a_main_body_keeps_everything_but_the_chrome():
    _, blocks = html_to_blocks("<html><body><nav>Nav</nav><p>Plain page.</p>"
                               "<script>x()</script></body></html>")
    assert blocks_to_text(blocks) == "Plain page."


MAN = ("epoll(7)" + " " * 40 + "Miscellaneous Information Manual" + " " * 40 + "epoll(7)\n\n\n\n"
       "NAME\n       epoll - I/O event notification facility\n\n"
       "SYNOPSIS\n       #include <sys/epoll.h>\n\n"
       "DESCRIPTION\n"
       "       The epoll API performs a similar task to poll(2): monitoring multiple file "
       "descriptors.  It scales well to large numbers of watched file descriptors.\n\n"
       "   Level-triggered and edge-triggered\n"
       "       The epoll event distribution interface is able to behave both as edge-triggered "
       "and as level-triggered.\n\n"
       "           int fd = epoll_create1(0);\n"
       "               if (fd == -1)\n"
       "                   exit(EXIT_FAILURE);\n\n"
       "Linux man-pages 6.03" + " " * 60 + "2023-02-05" + " " * 60 + "epoll(7)\n")


def test_man_to_blocks():
    title, blocks = man_to_blocks(MAN)
    assert title == "epoll - I/O event notification facility"
    assert [b.kind for b in blocks] == ["heading", "item", "heading", "item", "heading", "prose",
                                        "heading", "prose", "code"]
    text = blocks_to_text(blocks)
    assert "Miscellaneous Information Manual" not in text and "2023-02-05" not in text
    assert blocks[3].text == "#include <sys/epoll.h>"
    assert blocks[-1].text == "int fd = epoll_create1(0);\n    if (fd == -1)\n        exit(EXIT_FAILURE);"
    assert blocks[5].text.endswith("descriptors. It scales well to large numbers of watched "
                                   "file descriptors.")


def test_split_and_filter_sentences():
    assert split_sentences("One two three. Four five, e.g. Six seven! \"Eight\" nine? Ten") == [
        "One two three.", "Four five, e.g. Six seven!", "\"Eight\" nine?", "Ten"]
    assert is_prose_sentence("The quick brown fox jumps over the lazy dog today.")
    assert not is_prose_sentence("Too short to count here.")                # < 8 words
    assert not is_prose_sentence(" ".join(["word"] * 41) + ".")             # > 40 words
    assert not is_prose_sentence("the quick brown fox jumps over the lazy dog.")  # lower case
    assert not is_prose_sentence("The quick brown fox jumps over the lazy dog")   # no stop
    assert not is_prose_sentence("Set x = 1 and then call the function again please.")
    assert not is_prose_sentence("Call os.path.join(a, b) with json.dumps(obj) and sys.argv[1] "
                                 "at 0x1f2e and 12.5 and 3.11.")            # identifiers
    assert not is_prose_sentence(">>> print the quick brown fox jumps over it.")


def _doc(n_paragraphs: int = 12) -> list[Block]:
    rng = random.Random(7)
    words = "apple river stone cloud window garden silver morning quiet letter".split()
    blocks = [Block("heading", "A title")]
    for p in range(n_paragraphs):
        sentences = [f"Paragraph {chr(65 + p)} sentence {chr(97 + s)} says "
                     + " ".join(rng.choice(words) for _ in range(8)) + "."
                     for s in range(3)]
        blocks.append(Block("prose", " ".join(sentences)))
        if p % 4 == 3:
            blocks.append(Block("code", "for x in range(3):\n    print(x)  # Code words here."))
    return blocks


def test_pick_query_takes_a_last_third_sentence_out():
    blocks = _doc()
    original = blocks_to_text(blocks)
    seen = set()
    for seed in range(20):
        picked = pick_query(blocks, random.Random(seed))
        assert picked is not None
        s = picked.sentence
        assert is_prose_sentence(s)
        assert original.count(s) == 1 and original.index(s) == picked.start
        assert picked.start >= 2 / 3 * len(original) and picked.position >= 2 / 3
        assert s not in picked.text
        # Nothing else changed: putting the sentence back gives the original (modulo spaces).
        assert picked.text.replace("\n\n", " ").split() == \
            (original[:picked.start] + original[picked.start + len(s):]).replace("\n\n", " ").split()
        assert picked.text.count("\n\n") == original.count("\n\n")  # no block emptied here
        seen.add(s)
    assert len(seen) > 3  # the seed matters
    # Deterministic for a given seed.
    assert pick_query(blocks, random.Random(3)) == pick_query(blocks, random.Random(3))


def test_pick_query_respects_avoid_and_can_empty_a_block():
    blocks = [Block("prose", "Early words in the opening paragraph are never a query here."),
              Block("code", "x = 1\n" * 20),
              Block("heading", "Later"),
              Block("prose", "This single sentence is the only candidate in the last third."),
              Block("code", "x = 1")]
    picked = pick_query(blocks, random.Random(0))
    assert picked.sentence == "This single sentence is the only candidate in the last third."
    assert picked.text == blocks_to_text(blocks[:3] + blocks[4:])
    assert pick_query(blocks, random.Random(0), avoid={picked.sentence}) is None
    assert pick_query([Block("prose", "Too short.")], random.Random(0)) is None


def test_recall_over_collapsed_window_hits():
    assert collapse_ids([5, 5, 3, 5, 2, 3, 9]) == [5, 3, 2, 9]
    ranked = {1: [7, 7, 7, 4, 9], 2: [8, 8, 2], 3: [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 3]}
    truth = {1: 7, 2: 2, 3: 11, 4: 4}  # query 4 has no hits: a miss
    assert recall_at(ranked, truth, 1) == 1 / 4
    assert recall_at(ranked, truth, 2) == 2 / 4   # query 2's doc is 2nd once 8's windows collapse
    assert recall_at(ranked, truth, 10) == 2 / 4  # query 3's doc is 11th distinct
    assert recall_at(ranked, truth, 11) == 3 / 4

    hits = pa.table({"query_id": [2, 1, 1, 2, 1], "rank": [2, 2, 1, 1, 3], "id": [9, 7, 7, 8, 4]})
    assert ranked_ids(hits) == {1: [7, 7, 4], 2: [8, 9]}
    with_doc = hits.append_column("doc_id", pa.array([90, 70, 70, 80, 40]))
    assert ranked_ids(with_doc) == {1: [70, 70, 40], 2: [80, 90]}


def test_run_summary_is_found_in_the_output():
    from bench.long_docs.evaluate import _run_summary

    out = 'some log line {not json}\n{\n  "job": "x",\n  "seconds": {"total": 1.5}\n}\nwarning\n'
    assert _run_summary(out) == {"job": "x", "seconds": {"total": 1.5}}
    assert _run_summary("error: unknown key") == {}


def test_results_are_tabled_with_failures_named():
    results = {"documents": 2, "queries": 2, "k": 10, "max_length": 256,
               "documents_over_max_length": 2,
               "tokens_per_document": {"min": 300, "median": 400, "max": 500},
               "settings": {
                   "truncate": {"status": "ok", "recall@1": 0.5, "recall@10": 1.0,
                                "windows_per_document": 1.0, "seconds_per_document": 2.0,
                                "tokens_per_document": 256.0,
                                "seconds_ratio_to_truncate": 1.0,
                                "encode_seconds_per_document": 0.1,
                                "encode_ratio_to_truncate": 1.0},
                   "chunk-pool": {"status": "failed", "message": "embedpipe run exited 1"}}}
    table = markdown_table(results)
    assert "| truncate | 0.500 | 1.000 | 1.00 | 256 | 2.000 | 1.00 | 0.100 | 1.00 | ok |" in table
    assert "| chunk-pool | - | - | - | - | - | - | - | - | failed: embedpipe run exited 1 |" in table


@pytest.mark.slow
def test_evaluate_runs_the_cli_end_to_end(tmp_path):
    """Three real texts through `embedpipe run` and `search`, truncated and chunked: the needle
    at the end of a long text is found when its window is searched."""
    lead = "Background material about an unrelated subject fills the start. " * 60
    texts = [lead + "The volcano erupted and lava flowed toward the fishing village at night.",
             lead + "The orchestra rehearsed the symphony in the old concert hall all week.",
             "A short note about gardening and planting tomatoes in early spring."]
    docs = tmp_path / "docs"
    docs.mkdir()
    pq.write_table(pa.table({"id": pa.array([0, 1, 2], pa.int64()), "text": texts}),
                   docs / "part-00000.parquet")  # no title / tokens: eval fills them in
    queries = tmp_path / "queries.parquet"
    pq.write_table(pa.table({"query_id": pa.array([0, 1, 2], pa.int64()),
                             "text": ["lava flowing toward a village", "orchestra rehearsal",
                                      "planting tomatoes in spring"],
                             "doc_id": pa.array([0, 1, 2], pa.int64())}), queries)
    work = tmp_path / "work"
    res = evaluate(docs, queries, work, settings=("truncate", "chunk-rows"), k=2)
    t = res["settings"]["truncate"]
    assert t["status"] == "ok", t
    assert t["rows_in"] == 3 and t["truncated"] == 2 and t["windows_per_document"] == 1.0
    assert 0 <= t["recall@1"] <= t["recall@2"] <= 1
    assert t["seconds_ratio_to_truncate"] == 1.0 and t["encode_seconds"] > 0
    assert t["real_tokens"] <= 256 + 256 + 20  # two truncated texts and a short one
    chunked = res["settings"]["chunk-rows"]  # the needle's own window is searched
    assert chunked["status"] == "ok", chunked
    assert chunked["recall@1"] == 1.0 and chunked["windows_per_document"] > 1
    saved = json.loads((work / "results.json").read_text())
    assert saved["settings"]["truncate"]["recall@2"] == t["recall@2"]
    assert (work / "results.md").read_text().startswith("3 documents")
    assert 'path = "' + str(work / "input") + '"' in (work / "jobs" / "truncate.toml").read_text()


_CACHED = all(any(cached(pin) for pin in pins)
              for pins in (PYDOC_DEBS, MANPAGES_DEBS, MANPAGES_DEV_DEBS))


@pytest.mark.slow
@pytest.mark.skipif(not _CACHED, reason="the pinned .debs are not in the download cache "
                    "(python -m bench.long_docs fetch DEST QUERIES downloads them)")
def test_corpus_from_the_cached_debs(tmp_path):
    stats = fetch_long_docs(tmp_path / "docs", tmp_path / "queries")
    assert 300 <= stats["documents"] <= 600 and stats["queries"] == stats["documents"]
    assert stats["tokens"]["min"] > 1000 and stats["over_256_tokens"] == stats["documents"]
    docs = pq.read_table(tmp_path / "docs").sort_by("id")
    queries = pq.read_table(tmp_path / "queries")
    assert docs.column("id").to_pylist() == list(range(docs.num_rows))
    assert set(docs.column("source").to_pylist()) == {"python-doc", "man-pages"}
    text = dict(zip(docs.column("id").to_pylist(), docs.column("text").to_pylist(), strict=True))
    for q in queries.to_pylist():
        assert q["query_id"] == q["doc_id"] and q["position"] >= 2 / 3
        assert is_prose_sentence(q["text"]) and q["text"] not in text[q["doc_id"]]
    # No markup or terminal formatting left (HTML inside code examples is content, so look
    # for what Sphinx and grotty add, not for tags as such).
    assert not any(re.search(r"¶|class=\"|\x08|\x1b\[", t) for t in text.values())
    # Rerun: nothing rewritten.
    mtimes = [p.stat().st_mtime_ns for p in (tmp_path / "docs").glob("*.parquet")]
    assert fetch_long_docs(tmp_path / "docs", tmp_path / "queries") == stats
    assert [p.stat().st_mtime_ns for p in (tmp_path / "docs").glob("*.parquet")] == mtimes
