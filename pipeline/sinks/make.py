"""Sinks made from their config. The engine's module is imported here, when a job names a sink
of its kind: a job without sinks never imports LanceDB or psycopg, and one whose extra is
missing fails before any work with one line naming the extra to install."""
from __future__ import annotations

from typing import Any

from ..config import IndexConfig, SinkConfig
from .base import Sink
from .multivector import MULTIVECTOR
from .precision import column_type, precision_of
from .sparse import check_index


def make_sink(cfg: SinkConfig, metric: str = "ip", index_cfg: IndexConfig | None = None,
              precision: str = "float32", max_active_dims: int | None = None) -> Sink:
    """The sink for a folder of `precision` (output.precision; "sparse": a SPLADE folder, whose
    max_active_dims decides whether pgvector can index it; "multivector": a ColBERT folder),
    its engine imported and its environment read (not yet connected); refused (ConfigError)
    where the store has no column for that precision (sinks/precision.py)."""
    column_type(cfg.kind, cfg.name, precision, cfg.vector_type)  # before the engine or DSN
    if precision == "sparse":
        check_index(cfg, max_active_dims)
    if cfg.kind == "lancedb" and precision == MULTIVECTOR:
        from .lancedb_multivector import LanceMultiSink
        return LanceMultiSink(cfg, metric, index_cfg, precision)
    if cfg.kind == "lancedb":
        from .lancedb_sink import LanceSink
        return LanceSink(cfg, metric, index_cfg, precision)
    from .pgvector_sink import PgSink
    return PgSink(cfg, metric, index_cfg, precision)


def sinks_of(config: dict[str, Any], names: list[str] | None = None) -> list[Sink]:
    """The sinks a recorded job config (a manifest's `config`) names, or those of `names`."""
    from ..config import config_from_dict

    job = config_from_dict({k: v for k, v in config.items() if k in ("index", "sink")})
    chosen = [s for s in job.sink if names is None or s.name in names]
    dims = (config.get("encode") or {}).get("max_active_dims")
    return [make_sink(s, job.index.metric, job.index, precision_of(config), dims)
            for s in chosen]
