"""A throwaway PostgreSQL server with pgvector for the sink tests (and docs/sinks.md's load
figures): Debian's PostgreSQL binaries with the pgvector extension that
tests/sinks/setup_pgvector.sh builds for baseline x86-64 and installs into Debian's PostgreSQL
tree (`make pgvector`), started on 127.0.0.1 at a free port with its data and socket in a
temporary folder. As root, PostgreSQL refuses to run, so the server runs as the unprivileged
user `nobody`."""
from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

SETUP = ("make pgvector (tests/sinks/setup_pgvector.sh, as root: apt-installs PostgreSQL 15, "
         "builds pgvector)")


@dataclass(frozen=True)
class Install:
    """One Debian PostgreSQL major version whose extension folder has pgvector."""
    major: int
    bin: Path  # postgres, initdb
    vector_so: Path  # the library the server loads for CREATE EXTENSION vector


def find_install(root: Path = Path("/usr")) -> Install | None:
    """The newest Debian PostgreSQL (/usr/lib/postgresql/N) with pgvector installed, or None."""
    majors = sorted((int(p.name) for p in (root / "lib" / "postgresql").glob("*")
                     if re.fullmatch(r"\d+", p.name)), reverse=True)
    for major in majors:
        bin_dir = root / "lib" / "postgresql" / str(major) / "bin"
        control = root / "share" / "postgresql" / str(major) / "extension" / "vector.control"
        vector_so = root / "lib" / "postgresql" / str(major) / "lib" / "vector.so"
        if (bin_dir / "postgres").exists() and control.exists() and vector_so.exists():
            return Install(major, bin_dir, vector_so)
    return None


def missing_reason() -> str:
    return ("no Debian PostgreSQL with pgvector (/usr/lib/postgresql/N/lib/vector.so and "
            f"/usr/share/postgresql/N/extension/vector.control): run {SETUP}")


def server_user() -> int | None:
    """PostgreSQL refuses to run as root: then it runs as `nobody`."""
    if os.geteuid() != 0:
        return None
    import pwd
    return pwd.getpwnam("nobody").pw_uid


def new_cluster(install: Install, user: int | None) -> tuple[Path, Path]:
    """A fresh database cluster in a new temporary folder: (the folder, its data directory)."""
    root = Path(tempfile.mkdtemp(prefix="embedpipe-pg-"))
    if user is not None:
        os.chmod(root, 0o755)
        os.chown(root, user, -1)
    try:
        subprocess.run([str(install.bin / "initdb"), "-D", str(root / "data"), "-U", "postgres",
                        "-A", "trust", "-E", "UTF8", "--no-sync"],
                       check=True, capture_output=True, user=user)
    except BaseException:
        shutil.rmtree(root, ignore_errors=True)
        raise
    return root, root / "data"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PostgresServer:
    def __init__(self, install: Install | None = None):
        self.install = install or find_install()
        if self.install is None:
            raise RuntimeError(missing_reason())
        self.bin = self.install.bin
        self.user = server_user()
        self.root, data = new_cluster(self.install, self.user)
        self.proc = None
        try:
            self._start(data)
        except BaseException:
            self.stop()
            raise

    def _start(self, data: Path) -> None:
        self.port = _free_port()
        self.log = open(self.root / "log", "wb")
        self.proc = subprocess.Popen(
            [str(self.bin / "postgres"), "-D", str(data), "-p", str(self.port),
             "-k", str(self.root), "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off",
             "-c", "max_connections=50"],
            stdout=self.log, stderr=subprocess.STDOUT, user=self.user)
        self.dsn = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
        deadline = time.time() + 60
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError("postgres did not start: " + (self.root / "log").read_text())
            try:
                import psycopg
                with psycopg.connect(self.dsn, autocommit=True) as conn:
                    conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
                break
            except Exception:
                if time.time() > deadline:
                    raise
                time.sleep(0.2)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.log.close()
        shutil.rmtree(self.root, ignore_errors=True)
