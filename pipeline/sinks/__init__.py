"""Vector-store sinks (LanceDB, PostgreSQL/pgvector) kept in step with an output folder."""
