"""The runnable examples of README.md and docs/**/*.md (tests/docs_harness.py has the
convention): one test a page, its blocks run in order in a fresh sandbox. Then the harness
itself against the synthetic pages in tests/docs_fixtures/: it passes what passes, fails what
fails, skips what it cannot provide, and catches a command example left unmarked."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

import docs_harness as harness

FIXTURES = Path(__file__).resolve().parent / "docs_fixtures"


def is_slow(path: Path) -> bool:
    """Past ~30 s on 2 cores, by what the page runs: a model-loading command (run, predict,
    bench) took ~15-25 s on the 400-row subset here, so two of them, or a Ray start, is slow."""
    blocks = harness.parse_page(path, path.name).runnable
    text = "".join(b.text for b in blocks)
    heavy = len(re.findall(r"\bembedpipe\s+(?:-\S+\s+)*(?:run|predict|bench)\b", text))
    return heavy >= 2 or any("ray" in b.needs for b in blocks) or "--runner ray" in text


@pytest.fixture(scope="session")
def docs_movie_subset(movie_dir, tmp_path_factory) -> Path:
    """400 of the real snippets, spread over the file (it is ordered by valence, so both labels
    are in), as 2 shards of the same schema."""
    table = pq.read_table(movie_dir)
    subset = table.take(np.linspace(0, table.num_rows - 1, 400).astype(int))
    folder = tmp_path_factory.mktemp("docs_movie_reviews")
    for i in range(2):
        pq.write_table(subset.slice(200 * i, 200), folder / f"part-{i:05d}.parquet")
    return folder


@pytest.fixture(scope="session")
def docs_services(tmp_path_factory):
    services = harness.Services(tmp_path_factory.mktemp("docs_services"))
    try:
        yield services
    finally:
        services.stop()


def check_page(path: Path, name: str, tmp_path: Path, request) -> harness.Page:
    page = harness.parse_page(path, name)
    harness.check_static(page)
    if page.runnable:
        sandbox = harness.make_sandbox(tmp_path / "sandbox",
                                       request.getfixturevalue("docs_movie_subset"))
        harness.run_page(page, sandbox, request.getfixturevalue("docs_services"))
    return page


@pytest.mark.parametrize("page", [
    pytest.param(p, id=p, marks=[pytest.mark.docs]
                 + ([pytest.mark.slow] if is_slow(harness.ROOT / p) else []))
    for p in harness.pages()])
def test_page_examples(page, tmp_path, request):
    check_page(harness.ROOT / page, page, tmp_path, request)


# --- the harness on synthetic pages --------------------------------------------------------


def fixture_page(name: str) -> harness.Page:
    return harness.parse_page(FIXTURES / name, name)


def line_of(name: str, text: str, after: int = 0) -> int:
    """The 1-based line of the first fence after `after` whose next line starts with text."""
    lines = (FIXTURES / name).read_text().splitlines()
    return next(i + 1 for i in range(after, len(lines) - 1)
                if lines[i].startswith("```") and lines[i + 1].startswith(text))


def test_collector_classifies_blocks():
    page = fixture_page("passing.md")
    assert page.problems == []
    kinds = [(b.lang, b.marker, b.file, b.runnable) for b in page.blocks]
    assert kinds == [("toml", "example", "jobs/tiny.toml", False),
                     ("bash", "example", None, True), ("python", "example", None, True),
                     ("bash", "example", None, True), ("bash", None, None, False),
                     ("toml", None, None, False), ("bash", "not-run", None, False)]
    assert page.blocks[-1].reason == "needs a GPU"
    assert page.blocks[0].line == line_of("passing.md", 'name = "tiny"')
    assert page.blocks[2].text.startswith("from pathlib import Path\n")
    needs = fixture_page("services.md").blocks
    assert [b.needs for b in needs] == [("pgvector",), ("s3", "lancedb")]


def test_passing_page_runs_in_order_in_its_sandbox(tmp_path, request):
    page = check_page(FIXTURES / "passing.md", "passing.md", tmp_path, request)
    sandbox = tmp_path / "sandbox"
    assert (sandbox / "note.txt").read_text() == "hello\n"
    assert (sandbox / "jobs" / "tiny.toml").read_text().startswith('name = "tiny"')
    assert len(page.runnable) == 3


def test_a_failing_block_fails_the_page_with_where_what_and_output(tmp_path, request):
    with pytest.raises(pytest.fail.Exception) as failed:
        check_page(FIXTURES / "failing.md", "failing.md", tmp_path, request)
    message = str(failed.value)
    line = line_of("failing.md", 'echo "to stdout')
    assert message.startswith(f"failing.md:{line}: the bash block exited 3")
    assert 'echo "to stderr before failing" >&2\nexit 3' in message
    assert "to stdout before failing" in message.split("--- stdout (tail) ---")[1]
    assert "to stderr before failing" in message.split("--- stderr (tail) ---")[1]
    sandbox = tmp_path / "sandbox"
    assert (sandbox / "first.txt").exists() and not (sandbox / "after.txt").exists()


def test_unmarked_commands_and_bad_markers_fail_statically():
    page = fixture_page("unmarked.md")
    found = [p.split(": ", 1) for p in page.problems]
    name = "unmarked.md"
    expected_lines = [
        (line_of(name, "embedpipe run"), "a bash block runs embedpipe with no marker"),
        (line_of(name, "from pipeline.config"), "a python block imports pipeline"),
        (line_of(name, "[encode]"), "this job file does not load: encode.pooling"),
        (line_of(name, "true"), "unknown marker option 'need=s3'"),
        (line_of(name, "true", line_of(name, "true")), "needs=redis: no such service"),
        (line_of(name, "embedpipe verify") - 2, "this marker is not on the line right before"),
        (line_of(name, "embedpipe verify"), "a bash block runs embedpipe with no marker"),
        (line_of(name, "true", line_of(name, "embedpipe verify")),
         "file= writes a ```toml block"),
    ]
    assert len(found) == len(expected_lines), page.problems
    for (where, text), (line, start) in zip(found, expected_lines):
        assert where == f"{name}:{line}" and text.startswith(start), (where, text)
    with pytest.raises(pytest.fail.Exception, match="8 example problem"):
        harness.check_static(page)


def test_a_service_not_provided_skips_the_rest_of_the_page(tmp_path, request):
    with pytest.raises(pytest.skip.Exception) as skipped:
        check_page(FIXTURES / "needs.md", "needs.md", tmp_path, request)
    line = line_of("needs.md", "touch during")
    assert str(skipped.value).startswith(f"needs.md:{line}: needs long_docs, not provided here")
    assert "the 1 after it were not run" in str(skipped.value)
    sandbox = tmp_path / "sandbox"
    assert (sandbox / "before.txt").exists()
    assert not (sandbox / "during.txt").exists() and not (sandbox / "after.txt").exists()


@pytest.mark.sinks
def test_services_pgvector_s3_lancedb(tmp_path, request):
    """The services are real: a database with pgvector, an empty bucket on moto's server."""
    check_page(FIXTURES / "services.md", "services.md", tmp_path, request)


def test_slow_marks_pages_that_load_the_model_twice(tmp_path):
    assert not is_slow(FIXTURES / "passing.md")  # one `embedpipe run`, refused at once
    page = tmp_path / "p.md"
    page.write_text("<!-- example -->\n```bash\nembedpipe run a.toml\nembedpipe -v run b.toml\n```\n"
                    "```bash\nembedpipe run c.toml\n```\n")
    assert is_slow(page)
    page.write_text(page.read_text().replace("embedpipe -v run b.toml", "embedpipe verify out"))
    assert not is_slow(page)  # the unmarked block's run is not run, so it does not count
