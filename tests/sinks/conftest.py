"""Fixtures of the sink tests: one real PostgreSQL server with pgvector for the session."""
from __future__ import annotations

import pytest

from pg_server import PostgresServer, find_install, missing_reason


@pytest.fixture(scope="session")
def pg_install():
    install = find_install()
    if install is None:
        pytest.skip(missing_reason())
    return install


@pytest.fixture(scope="session")
def pg_dsn(pg_install):
    server = PostgresServer(pg_install)
    try:
        yield server.dsn
    finally:
        server.stop()
