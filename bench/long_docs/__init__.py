"""Long real documents, with one "needle" query each, for evaluating long-text handling (#15).

The corpus is the Python 3.11 documentation as Debian ships it (``python3.11-doc``): about
530 Sphinx HTML pages, of which ~400 run past 1,500 words, i.e. far beyond the model's
256-token window. The .deb is fetched with ``apt-get download`` (the machines reach the Debian
mirror, not the internet), pinned by sha256 and cached next to the PyPI artifacts of
:mod:`pipeline.tools.datasets`; it is unpacked with ``dpkg -x`` into a temporary folder and
only the HTML is read. Tags are stripped with the stdlib ``html.parser``: only the page's
main body is kept (navigation, sidebars, scripts, styles, footers and the pilcrow header
links are dropped; footnotes and topic boxes stay), one block (paragraph, list item, code block, heading, table row) per
paragraph, blocks separated by blank lines.

For every kept document one query is taken from its last third: a real prose sentence of
8-40 words (not code, not a heading, unique across the corpus), chosen with a seeded RNG,
and *removed* from the indexed text. A retriever that only sees a document's first 256
tokens can then find it only by topic; one that embeds every window can match the passage
around the missing sentence. :func:`evaluate` runs the real CLI for truncate / chunk+pool /
chunk+rows and reports recall@1/@10 against the document ids, windows per document and cost.

    python -m bench.long_docs fetch data/long_docs data/long_docs_queries
    python -m bench.long_docs eval data/long_docs data/long_docs_queries \
        --work out/long-docs-eval --limit 40
"""

from .corpus import MANPAGES_DEBS, MANPAGES_DEV_DEBS, PYDOC_DEBS, fetch_long_docs, token_counts
from .evaluate import collapse_ids, evaluate, markdown_table, ranked_ids, recall_at
from .pages import Block, blocks_to_text, html_to_blocks, html_to_text, man_to_blocks
from .queries import PickedQuery, is_prose_sentence, pick_query, split_sentences

__all__ = [
    "MANPAGES_DEBS", "MANPAGES_DEV_DEBS", "PYDOC_DEBS", "Block", "PickedQuery",
    "blocks_to_text", "collapse_ids", "evaluate", "fetch_long_docs", "html_to_blocks",
    "html_to_text", "is_prose_sentence", "man_to_blocks", "markdown_table", "pick_query",
    "ranked_ids", "recall_at", "split_sentences", "token_counts",
]
