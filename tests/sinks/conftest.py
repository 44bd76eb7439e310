"""Fixtures of the sink tests: one real PostgreSQL server with pgvector for the session."""
from __future__ import annotations

import pytest

from pg_server import PostgresServer


@pytest.fixture(scope="session")
def pg_dsn():
    server = PostgresServer()
    try:
        yield server.dsn
    finally:
        server.stop()
