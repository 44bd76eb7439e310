"""The runnable-examples harness for README.md and docs/**/*.md (the convention, in short):

- a ```bash / ```python block right after `<!-- example -->` runs, in page order, in one fresh
  sandbox per page (cwd): jobs/ (a copy of the repo's), data/movie_reviews/ (400 real snippets
  in 2 shards), the venv's bin first on PATH; bash with -euo pipefail, python with the venv's;
- `<!-- example: needs=NAME[,NAME] -->`: a service the harness provides (SERVICES); where it
  cannot, that block and the page's later ones are skipped with the reason (pytest skip);
- `<!-- example: file=PATH -->` before a ```toml block writes it to PATH in the sandbox;
- `<!-- not-run: REASON -->`: never run (a toml block so marked is not validated either);
- any other ```toml block whose first table is a job file's ([input] ... [[sink]]) must load
  with pipeline.config;
- an unmarked bash block naming `embedpipe`, or python block importing `pipeline`, fails.
"""
from __future__ import annotations

import importlib.util
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SERVICES = ("pgvector", "lancedb", "ray", "s3", "long_docs", "bench_corpus")
JOB_TABLES = {"input", "model", "encode", "output", "index", "sink"}
BLOCK_TIMEOUT_S = 600
TAIL = 3000

_FENCE = re.compile(r"^(?P<indent>\s*)(?P<fence>`{3,}|~{3,})\s*(?P<info>[^`\s]*)")
_MARKER = re.compile(r"^<!--\s*(?P<kind>example|not-run)\b(?P<rest>.*?)-->$")
_HEADER = re.compile(r"^\s*\[\[?\s*([A-Za-z0-9_-]+)[\].]")


@dataclass(frozen=True)
class Block:
    line: int  # the opening fence's line, 1-based
    lang: str
    text: str
    marker: str | None  # "example", "not-run" or None
    needs: tuple[str, ...] = ()
    file: str | None = None
    reason: str = ""  # not-run's

    @property
    def runnable(self) -> bool:
        return self.marker == "example" and self.lang in ("bash", "python")


@dataclass
class Page:
    name: str  # as shown: the path relative to the repo root
    blocks: list[Block] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # "page:line: what is wrong"

    @property
    def runnable(self) -> list[Block]:
        return [b for b in self.blocks if b.runnable]


def pages(root: Path = ROOT) -> list[str]:
    """README.md and every docs/**/*.md that exist now, relative to root."""
    found = [root / "README.md"] + sorted((root / "docs").rglob("*.md"))
    return [p.relative_to(root).as_posix() for p in found if p.is_file()]


def _marker(line: str, where: str, problems: list[str]) -> dict | None:
    """The marker comment on `line`, parsed; None when the line is none."""
    match = _MARKER.match(line.strip())
    if not match:
        if re.match(r"^<!--\s*(example|not-run)", line.strip()):
            problems.append(f"{where}: malformed marker {line.strip()!r}")
        return None
    kind, rest = match["kind"], match["rest"].strip()
    if kind == "not-run":
        reason = rest.removeprefix(":").strip()
        if not rest.startswith(":") or not reason:
            problems.append(f"{where}: <!-- not-run: REASON --> needs a reason")
        return {"marker": "not-run", "reason": reason}
    parsed = {"marker": "example"}
    if rest and not rest.startswith(":"):
        problems.append(f"{where}: malformed marker {line.strip()!r}")
        return parsed
    for option in rest.removeprefix(":").split():
        name, _, value = option.partition("=")
        if name == "needs" and value:
            parsed["needs"] = tuple(v for v in value.split(",") if v)
            unknown = [v for v in parsed["needs"] if v not in SERVICES]
            if unknown:
                problems.append(f"{where}: needs={','.join(unknown)}: no such service; the "
                                f"harness provides {', '.join(SERVICES)}")
        elif name == "file" and value:
            parsed["file"] = value
        else:
            problems.append(f"{where}: unknown marker option {option!r} (needs=NAME[,NAME], "
                            f"file=PATH)")
    return parsed


def parse_page(path: Path, name: str) -> Page:
    """Every fenced block with its marker, and what breaks the convention statically."""
    lines = path.read_text(encoding="utf-8").splitlines()
    page = Page(name)
    inside: set[int] = set()  # lines of fenced blocks, fences included
    i = 0
    while i < len(lines):
        opening = _FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        fence, indent = opening["fence"], len(opening["indent"])
        close = re.compile(rf"^\s*{re.escape(fence[0])}{{{len(fence)},}}\s*$")
        end = i + 1
        while end < len(lines) and not close.match(lines[end]):
            end += 1
        body = [ln[indent:] if not ln[:indent].strip() else ln.lstrip() for ln in lines[i + 1:end]]
        where = f"{name}:{i + 1}"
        meta = _marker(lines[i - 1], where, page.problems) if i else None
        block = Block(i + 1, opening["info"].lower(), "\n".join(body) + "\n",
                      **(meta or {"marker": None}))
        page.blocks.append(block)
        page.problems.extend(_static_problems(block, where))
        inside.update(range(i, end + 1))
        i = end + 1
    fences = {b.line - 1 for b in page.blocks}
    for n, line in enumerate(lines):  # a marker not right above a fence marks nothing
        if n not in inside and re.match(r"^\s*<!--\s*(example|not-run)", line) and n + 1 not in fences:
            page.problems.append(f"{name}:{n + 1}: this marker is not on the line right before "
                                 f"a fenced block, so it marks nothing")
    page.problems.sort(key=lambda p: int(p.split(":")[1]))
    return page


def _static_problems(block: Block, where: str) -> list[str]:
    if block.marker is None and block.lang == "bash" and re.search(r"\bembedpipe\b", block.text):
        return [f"{where}: a bash block runs embedpipe with no marker: mark it <!-- example --> "
                f"(or <!-- not-run: REASON -->)"]
    if block.marker is None and block.lang == "python" and re.search(
            r"^\s*(import pipeline\b|from pipeline\b)", block.text, re.M):
        return [f"{where}: a python block imports pipeline with no marker: mark it "
                f"<!-- example --> (or <!-- not-run: REASON -->)"]
    if block.marker == "example" and block.file and block.lang != "toml":
        return [f"{where}: file= writes a ```toml block; this one is {block.lang or 'untagged'}"]
    if block.lang == "toml" and block.marker != "not-run" and not block.file:
        return _job_problems(block, where)
    return []


def _job_problems(block: Block, where: str) -> list[str]:
    """A shown job file (its first table one of a job's) must load as one."""
    headers = [m[1] for m in map(_HEADER.match, block.text.splitlines()) if m]
    if not headers or headers[0] not in JOB_TABLES:
        return []
    from pipeline.config import ConfigError, config_from_dict

    try:
        config_from_dict(tomllib.loads(block.text))
    except (tomllib.TOMLDecodeError, ConfigError) as exc:
        return [f"{where}: this job file does not load: {exc}"]
    return []


def check_static(page: Page) -> None:
    if page.problems:
        pytest.fail(f"{page.name}: {len(page.problems)} example problem(s):\n"
                    + "\n".join(page.problems), pytrace=False)


class Unavailable(Exception):
    """A service the harness cannot provide here; the message says why."""


def sandbox_env(extra: dict[str, str]) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"PATH": os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", ""),
                "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                "TOKENIZERS_PARALLELISM": "false", **extra})
    return env


def make_sandbox(folder: Path, movie_subset: Path) -> Path:
    """A fresh sandbox: jobs/ and data/movie_reviews/ copied in."""
    folder.mkdir(parents=True)
    (folder / "jobs").mkdir()
    for job in (ROOT / "jobs").glob("*.toml"):
        shutil.copy(job, folder / "jobs" / job.name)
    shutil.copytree(movie_subset, folder / "data" / "movie_reviews")
    return folder


def _tail(text: str) -> str:
    return text if len(text) <= TAIL else "..." + text[-TAIL:]


def run_block(block: Block, page: Page, sandbox: Path, scripts: Path, env: dict) -> None:
    """Run one block in the sandbox; a non-zero exit (or a timeout) fails the page."""
    script = scripts / f"block_{block.line}.{'sh' if block.lang == 'bash' else 'py'}"
    script.write_text(block.text)
    argv = (["bash", "-euo", "pipefail", str(script)] if block.lang == "bash"
            else [sys.executable, str(script)])
    proc = subprocess.Popen(argv, cwd=sandbox, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=BLOCK_TIMEOUT_S)
        what = f"the {block.lang} block exited {proc.returncode}"
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        what = f"the {block.lang} block ran past {BLOCK_TIMEOUT_S} s and was killed"
    if proc.returncode != 0:
        pytest.fail(f"{page.name}:{block.line}: {what}\n--- block ---\n{block.text}"
                    f"--- stdout (tail) ---\n{_tail(out)}\n--- stderr (tail) ---\n{_tail(err)}",
                    pytrace=False)


def run_page(page: Page, sandbox: Path, services: "Services") -> None:
    """The page's blocks in order: toml files written, runnable blocks run; at a block whose
    service cannot be provided, it and every later block are skipped (they may build on it)."""
    scripts = sandbox.parent / f"{sandbox.name}-scripts"
    scripts.mkdir(exist_ok=True)
    page_env: dict[str, str] = {}
    for block in page.blocks:
        if block.marker == "example" and block.file and block.lang == "toml":
            target = sandbox / block.file
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(block.text)
        if not block.runnable:
            continue
        try:
            for name in block.needs:
                page_env.update(services.provide(name, sandbox))
        except Unavailable as exc:
            later = sum(1 for b in page.runnable if b.line > block.line)
            pytest.skip(f"{page.name}:{block.line}: needs {name}, not provided here: {exc} "
                        f"(this block and the {later} after it were not run)")
        run_block(block, page, sandbox, scripts, sandbox_env(page_env))


def _load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = sys.modules[name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Services:
    """The services of needs=, started on first use and kept for the session; each page gets
    its own database, its own empty bucket."""

    def __init__(self, scratch: Path):
        self.scratch = scratch
        self.pg = self.moto = None
        self.bench: Path | None = None
        self.failed: dict[str, str] = {}
        self.pages = 0

    def provide(self, name: str, sandbox: Path) -> dict[str, str]:
        if name in self.failed:
            raise Unavailable(self.failed[name])
        try:
            return getattr(self, f"_{name}")(sandbox)
        except Unavailable as exc:
            self.failed[name] = str(exc)
            raise

    def _lancedb(self, sandbox: Path) -> dict[str, str]:
        if importlib.util.find_spec("lancedb") is None:
            raise Unavailable("lancedb is not installed: pip install 'embedpipe[lancedb]'")
        return {}

    def _ray(self, sandbox: Path) -> dict[str, str]:
        if importlib.util.find_spec("ray") is None:
            raise Unavailable("ray is not installed: pip install 'embedpipe[ray]'")
        return {}

    def _pgvector(self, sandbox: Path) -> dict[str, str]:
        """A local PostgreSQL with pgvector (tests/sinks/pg_server.py), a new database a page."""
        pg_server = _load(ROOT / "tests" / "sinks" / "pg_server.py", "docs_pg_server")
        if self.pg is None:
            install = pg_server.find_install()
            if install is None:
                raise Unavailable(pg_server.missing_reason())
            if importlib.util.find_spec("psycopg") is None:
                raise Unavailable("psycopg is not installed: pip install 'embedpipe[pgvector]'")
            try:
                self.pg = pg_server.PostgresServer(install)
            except Exception as exc:  # e.g. no `nobody` user, no shared memory: say so, skip
                raise Unavailable(f"the local PostgreSQL did not start: "
                                  f"{str(exc).splitlines()[-1] if str(exc) else exc!r}") from exc
        import psycopg

        self.pages += 1
        database = f"page_{self.pages}_{sandbox.name}".lower().replace("-", "_")[:60]
        with psycopg.connect(self.pg.dsn, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{database}"')
        with psycopg.connect(self.pg.dsn.rsplit("/", 1)[0] + f"/{database}",
                             autocommit=True) as conn:
            conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
        url = self.pg.dsn.rsplit("/", 1)[0] + f"/{database}"
        return {"EMBEDPIPE_PG_URL": url, "EMBEDPIPE_PG_DSN": url}

    def _s3(self, sandbox: Path) -> dict[str, str]:
        """moto's S3 server on loopback; each page starts from an empty store holding one
        bucket, $EMBEDPIPE_S3_BUCKET."""
        if importlib.util.find_spec("moto") is None or importlib.util.find_spec("s3fs") is None:
            raise Unavailable("moto[server] and s3fs are not installed: pip install -e '.[test]'")
        import boto3
        import requests

        if self.moto is None:
            import logging

            from moto.server import ThreadedMotoServer

            logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line a request else

            with socket.socket() as sock:
                sock.bind(("127.0.0.1", 0))
                port = sock.getsockname()[1]
            server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
            try:
                server.start()
            except Exception as exc:
                raise Unavailable(f"moto's S3 server did not start: {exc}") from exc
            self.moto = server
            self.s3_env = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
                           "AWS_DEFAULT_REGION": "us-east-1",
                           "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
        endpoint = self.s3_env["AWS_ENDPOINT_URL"]
        requests.post(f"{endpoint}/moto-api/reset", timeout=30).raise_for_status()
        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                     aws_access_key_id="test", aws_secret_access_key="test"
                     ).create_bucket(Bucket="embedpipe-examples")
        return {**self.s3_env, "EMBEDPIPE_S3_BUCKET": "embedpipe-examples"}

    def _bench_corpus(self, sandbox: Path) -> dict[str, str]:
        """The mixed-length benchmark corpus (embedpipe fetch-data --bench) at data/bench."""
        if self.bench is None:
            from pipeline.tools.datasets import fetch_bench_corpus

            folder = self.scratch / "bench"
            try:
                fetch_bench_corpus(folder)
            except Exception as exc:  # no network and no cached download: say so, skip
                raise Unavailable(f"the bench corpus could not be made: {exc}") from exc
            self.bench = folder
        if not (sandbox / "data" / "bench").exists():
            shutil.copytree(self.bench, sandbox / "data" / "bench")
        return {}

    def _long_docs(self, sandbox: Path) -> dict[str, str]:
        raise Unavailable("the long-documents corpus is built from Debian packages by the bench "
                          "tool (minutes, a large download); the examples harness does not "
                          "build it")

    def stop(self) -> None:
        if self.pg is not None:
            self.pg.stop()
        if self.moto is not None:
            self.moto.stop()
