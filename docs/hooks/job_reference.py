"""MkDocs hook: the page reference/job-file.md is generated at build time from pipeline.config,
so the reference can never drift from the code: every key of every job-file table with its
type, its default, its allowed values (the code's own choice sets) and its description (the
field's metadata in pipeline/config/sections.py).

mkdocs.yml: `hooks: [docs/hooks/job_reference.py]`. `render()` is the generator; the tests call
it directly.
"""
from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # document this checkout's pipeline, not an installed one
    sys.path.insert(0, str(ROOT))

from pipeline.config import POSITIVE, SECTIONS, SINK_KEYS, JobConfig, SinkConfig  # noqa: E402

PAGE = "reference/job-file.md"

INTRO = """\
# The job file

A job file is TOML. This page is generated from the code (`pipeline/config/sections.py`), so
it lists every key the current version accepts, with its default. An unknown key or a bad value
is refused at load (exit 2) with one line naming the key and what is allowed. Relative paths
resolve against the current directory. `embedpipe run JOB --set section.key=value` overrides
one key (the value is read as TOML when it parses, else as a string). A key left out takes its
default; *unset* means the key has no value unless given, and the description says what
happens then.
"""

_TYPES = {"str": "string", "int": "integer", "bool": "boolean", "tuple[int, ...]":
          "list of integers", "tuple[str, ...]": "list of strings", "bool | str": "boolean or string"}


def type_text(annotation: str, dotted: str) -> str:
    """The annotation in words: `int | None` -> integer; a positive-only integer says so."""
    base = annotation.removesuffix(" | None")
    words = _TYPES.get(base, base)
    return f"positive {words}" if dotted in POSITIVE else words


def toml_value(value: object) -> str:
    """A default as it would be written in the job file."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    return str(value)


def default_text(f: dataclasses.Field) -> str:
    if f.default is dataclasses.MISSING:
        return f.metadata.get("shown", "required")
    if f.default is None:
        return "unset"
    return f"`{toml_value(f.default)}`"


def allowed_text(f: dataclasses.Field) -> str:
    choices = f.metadata.get("choices", ())
    values = [toml_value(c) for c in choices]
    if choices and str(f.type).startswith("bool |"):
        values = ["true", "false", *values]
    return ", ".join(f"`{v}`" for v in values)


def _text(text: str) -> str:
    """Prose kept literal in Markdown: angle brackets and stars."""
    return text.replace("<", "&lt;").replace(">", "&gt;").replace("*", "\\*")


def table(cls: type, prefix: str, skip: tuple[str, ...] = ()) -> list[str]:
    """One Markdown table: key, type, default, allowed values, description."""
    rows = ["| key | type | default | allowed values | description |",
            "| --- | --- | --- | --- | --- |"]
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        cells = [f"`{f.name}`", type_text(str(f.type), f"{prefix}{f.name}"), default_text(f),
                 allowed_text(f), _text(f.metadata.get("doc", ""))]
        rows.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return rows


def render() -> str:
    """The whole page: the top-level key, one section per table, then `[[sink]]`."""
    out = [INTRO, "## Top level", ""]
    out += table(JobConfig, "", skip=tuple(SECTIONS) + ("sink",))
    for name, cls in SECTIONS.items():
        out += ["", f"## `[{name}]`", "", (cls.__doc__ or "").strip(), ""]
        out += table(cls, f"{name}.")
    kinds = "; ".join(f"a `{kind}` sink takes {', '.join(f'`{k}`' for k in keys)}"
                      for kind, keys in SINK_KEYS.items())
    out += ["", "## `[[sink]]`", "", (SinkConfig.__doc__ or "").strip() + " A job may have "
            f"several `[[sink]]` tables, each with a distinct name; {kinds}.", ""]
    out += table(SinkConfig, "sink.")
    return "\n".join(out) + "\n"


def on_files(files, config):
    """MkDocs event: the hooks folder sits in docs/, but its code is no page of the site."""
    for file in [f for f in files if f.src_uri.startswith("hooks/")]:
        files.remove(file)
    return files


def on_page_markdown(markdown: str, page, config, files) -> str:
    """MkDocs event: the placeholder page's markdown is replaced by the generated reference."""
    if page.file.src_uri == PAGE:
        return render()
    return markdown
