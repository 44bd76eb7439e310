"""`[[sink]]` tables are checked at load, one line naming the key; no engine is needed."""
from __future__ import annotations

import json

import pytest

from pipeline.config import ConfigError, config_from_dict, load_job

LANCE = {"kind": "lancedb", "uri": "out/x.lance", "table": "movie_reviews"}
PG = {"kind": "pgvector", "table": "public.movie_reviews", "name": "pg", "vector_type": "halfvec",
      "index": "hnsw"}


def test_sinks_load_with_their_defaults_and_survive_the_manifest_round_trip(tmp_path):
    path = tmp_path / "job.toml"
    path.write_text('name = "j"\n[[sink]]\nkind = "lancedb"\nuri = "db.lance"\ntable = "t"\n'
                    '[[sink]]\nkind = "pgvector"\ntable = "t"\nname = "pg"\n')
    job = load_job(path)
    lance, pg = job.sink
    assert (lance.name, lance.uri) == ("t", "db.lance")
    assert (pg.dsn_env, pg.vector_type, pg.index) == ("EMBEDPIPE_PG_DSN", "auto", "none")
    # the manifest records job.to_dict(); commands rebuild the job from it
    assert config_from_dict(json.loads(json.dumps(job.to_dict()))) == job
    plain = config_from_dict({"name": "j"})
    assert plain.sink == () and plain.vector_settings() == job.vector_settings()  # no vector changes


@pytest.mark.parametrize("sink, message", [
    ({"kind": "faiss", "table": "t"}, "sink[0].kind: 'faiss' is not one of lancedb, pgvector"),
    ({"kind": "lancedb", "table": "t"}, "sink[0].uri: a lancedb sink needs uri"),
    ({**LANCE, "index": "hnsw"}, "sink[0].index: not a lancedb sink's key"),
    ({**PG, "dsn": "postgresql://u:secret@h/db"}, "unknown key sink[0].dsn; a pgvector sink accepts"),
    ({**PG, "vector_type": "bits"}, "sink[0].vector_type: 'bits' is not one of auto, vector, halfvec, bit"),
    ({**PG, "index": "diskann"}, "sink[0].index: 'diskann' is not one of none, hnsw, ivfflat"),
    ({**PG, "table": "t; DROP TABLE x"}, "sink[0].table: 't; DROP TABLE x' is not a table name"),
    ({**PG, "table": ""}, "sink[0].table: a value is required"),
    ({**PG, "dsn_env": "postgresql://h/db"}, "sink[0].dsn_env: 'postgresql://h/db' is not an "
                                             "environment variable's name"),
    ({**PG, "index": 3}, "sink[0].index: expected a string, got 3"),
])
def test_a_bad_sink_is_one_line_naming_the_key(sink, message):
    with pytest.raises(ConfigError) as caught:
        config_from_dict({"sink": [sink]})
    assert str(caught.value).startswith(message)
    assert "\n" not in str(caught.value)


def test_two_sinks_need_two_names():
    with pytest.raises(ConfigError, match="two sinks are named 'movie_reviews'"):
        config_from_dict({"sink": [LANCE, {**PG, "name": ""}]})
    assert len(config_from_dict({"sink": [LANCE, PG]}).sink) == 2
