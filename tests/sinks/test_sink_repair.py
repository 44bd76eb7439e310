"""A sink changed behind embedpipe's back (a row updated by SQL, an id swapped for a foreign one
with the count unchanged, a LanceDB row updated): `verify` fails and names `embedpipe sync`,
`sync` compares every row's content and repairs it, `verify` then passes, and the tables equal
an untouched run's, row for row."""
from __future__ import annotations

import pytest

from helpers import embedpipe, run
from test_sinks import (DSN_ENV, assert_same_rows, corpus, job_dict, lance_rows,  # noqa: F401
                        pg_rows, sinks_for, table_name, write_job_file)

pytestmark = pytest.mark.sinks


def _pg(dsn: str, *statements: str) -> None:
    import psycopg
    with psycopg.connect(dsn, autocommit=True) as conn:
        for statement in statements:
            conn.execute(statement)


def _damage(how: str, dsn: str, table: str, lance_uri: str) -> str:
    """Change the table in place; returns what verify must say."""
    if how == "pg row changed":  # one row's vector negated by SQL, everything else as it was
        _pg(dsn, f"UPDATE {table} SET vector = (SELECT array_agg(-x ORDER BY i)::vector FROM "
                 f"unnest((SELECT vector::real[] FROM {table} WHERE id = 1005)) "
                 f"WITH ORDINALITY AS u(x, i)) WHERE id = 1005")
        return "1 of 360 vectors differ from the folder's (e.g. id 1005)"
    if how == "pg id swapped":  # an id deleted, a foreign id inserted: the count unchanged
        _pg(dsn, f"INSERT INTO {table} SELECT 99999, vector, n_tokens, truncated, text "
                 f"FROM {table} WHERE id = 2003",
            f"DELETE FROM {table} WHERE id = 2003")
        return "1 of the folder's ids missing (e.g. 2003), 1 ids not in the folder (e.g. 99999)"
    if how == "lance row changed":
        import lancedb
        t = lancedb.connect(lance_uri).open_table(table)
        vector = t.search().where("id = 7").limit(1).to_arrow().column("vector")[0].as_py()
        t.update(where="id = 7", values={"vector": [-x for x in vector]})
        return "1 of 360 vectors differ from the folder's (e.g. id 7)"
    raise AssertionError(how)


@pytest.mark.parametrize("how", ["pg row changed", "pg id swapped", "lance row changed"])
def test_a_sink_changed_in_place_fails_verify_and_sync_repairs_it(
        tmp_path, corpus, tiny_model, pg_dsn, table_name, monkeypatch, how):  # noqa: F811
    monkeypatch.setenv(DSN_ENV, pg_dsn)
    folder, _ = corpus
    out = tmp_path / "out"
    raw = job_dict(folder, out, tiny_model, sinks_for(tmp_path, table_name))
    assert run(raw).failures == []
    lance_uri = str(tmp_path / "db.lance")
    clean = pg_rows(pg_dsn, table_name), lance_rows(lance_uri, table_name)
    env = {DSN_ENV: pg_dsn}
    assert embedpipe("verify", out, env=env).returncode == 0

    needle = _damage(how, pg_dsn, table_name, lance_uri)
    check = embedpipe("verify", out, env=env)
    assert check.returncode == 1, check.stdout
    assert needle in check.stdout, check.stdout
    assert "sampled vector" not in check.stdout  # a missing id is missing, not a vector
    assert f"`embedpipe sync {out}`" in check.stdout.splitlines()[-1]
    # the next run (cheap: no content comparison) is not what the message names; sync is
    synced = embedpipe("sync", out, env=env)
    assert synced.returncode == 0, synced.stderr
    assert "rows differed from the folder (rewritten)" in synced.stdout, synced.stdout
    again = embedpipe("verify", out, env=env)
    assert again.returncode == 0, again.stdout
    assert_same_rows(pg_rows(pg_dsn, table_name), clean[0])
    assert_same_rows(lance_rows(lance_uri, table_name), clean[1])
    # and a second sync finds nothing to do
    quiet = embedpipe("sync", out, env=env)
    assert "0 upserted, 0 deleted" in quiet.stdout and "compared: as the folder's" in quiet.stdout


def test_verify_quick_reports_a_missing_id_as_missing(tmp_path, corpus, tiny_model, pg_dsn,  # noqa: F811
                                                      table_name, monkeypatch):
    """--quick samples vectors; an id the sink lacks is reported once, as missing."""
    monkeypatch.setenv(DSN_ENV, pg_dsn)
    folder, _ = corpus
    out = tmp_path / "out"
    assert run(job_dict(folder, out, tiny_model,
                        sinks_for(tmp_path, table_name, lance=False))).failures == []
    ids = list(range(0, 120)) + list(range(1000, 1120)) + list(range(2000, 2120))
    _pg(pg_dsn, f"DELETE FROM {table_name} WHERE id = ANY(ARRAY{ids[::2]})")
    check = embedpipe("verify", out, "--quick", env={DSN_ENV: pg_dsn})
    assert check.returncode == 1
    assert "180 of the folder's ids missing" in check.stdout, check.stdout
    assert "vectors differ" not in check.stdout, check.stdout
    assert all(line.startswith("problem:") for line in check.stdout.splitlines()[:-1])
