"""The PostgreSQL + pgvector sink.

A load is one transaction: the rows go by binary COPY (built with numpy, pg_copy.py) into a
temporary staging table, then one `INSERT ... ON CONFLICT (id) DO UPDATE` moves them in (rows
whose values are unchanged are not rewritten); ids not in the folder go by one `DELETE` against
a temporary table of the folder's ids. A crash anywhere before COMMIT leaves the table as it
was. The table's COMMENT carries the marker. The vector column's type follows the folder's
precision (sinks/precision.py: vector, halfvec, or bit(dim) searched by hamming distance; a
sparse folder's rows: sparsevec(vocabulary), sinks/sparse.py, ranked by inner product). The
ANN index (HNSW or IVFFlat, with the folder's metric; bit: hamming) is built after the load
when missing. The connection string comes from the environment
variable the sink names and is never written anywhere.
"""
from __future__ import annotations

import json
import math
import os
import time
from typing import Iterator

import numpy as np
import pyarrow as pa

from ..config import ConfigError, SinkConfig
from ..faults import checkpoint
from .base import DIGEST_BYTES, Marker, Sink, SinkError, key_columns, one_line
from .pg_copy import HEADER, TRAILER, encode, pg_type, sparsevec_payload, vector_payload
from .precision import codes_block, from_codes, query_codes
from .sparse import over_limit, query_text

HALFVEC_SINCE = (0, 7, 0)  # halfvec, and bit's hamming distance <~> and its index ops


def _import_psycopg(name: str):
    try:
        import psycopg
        from psycopg import sql
    except ImportError as exc:
        raise ConfigError(f'sink "{name}": psycopg is not installed ({one_line(exc)}): '
                          f"pip install 'embedpipe[pgvector]'") from None
    return psycopg, sql


class PgSink(Sink):
    kind = "pgvector"

    def __init__(self, cfg: SinkConfig, metric: str = "ip", index_cfg=None,
                 precision: str = "float32"):
        super().__init__(cfg, metric, index_cfg, precision)
        self.psycopg, self.sql = _import_psycopg(cfg.name)
        self.dsn = os.environ.get(cfg.dsn_env, "").strip()
        if not self.dsn:
            raise ConfigError(
                f'sink "{cfg.name}": environment variable {cfg.dsn_env} is not set; export '
                f"{cfg.dsn_env}=postgresql://USER@HOST:PORT/DB (the connection string is read "
                f"from the environment, never from the job file)")
        self.conn = None
        self.where = ""  # host:port/db once connected (no password)
        parts = cfg.table.split(".")
        self.ident = self.sql.Identifier(*parts)
        self.index_name = self.sql.Identifier(
            *parts[:-1], f"{parts[-1][:40]}_embedpipe_ann")

    # -- connection ------------------------------------------------------------------------
    def describe(self) -> str:
        return f"PostgreSQL table {self.cfg.table}" + (f" at {self.where}" if self.where
                                                       else f" (${self.cfg.dsn_env})")

    def target(self) -> str:
        return f"pgvector:{self.where or '$' + self.cfg.dsn_env}#{self.cfg.table}"

    def open(self) -> None:
        if self.conn is not None:
            return
        try:
            self.conn = self.psycopg.connect(self.dsn, autocommit=True, connect_timeout=15)
        except self.psycopg.Error as exc:
            raise ConfigError(f'sink "{self.name}": cannot connect to PostgreSQL '
                              f"(${self.cfg.dsn_env}): {one_line(exc)}") from None
        info = self.conn.info
        self.where = f"{info.host}:{info.port}/{info.dbname}"
        version = self._scalar("SELECT extversion FROM pg_extension WHERE extname = 'vector'")
        if version is None:
            try:
                self._execute("CREATE EXTENSION IF NOT EXISTS vector")
            except SinkError as exc:
                raise ConfigError(
                    f'sink "{self.name}": the pgvector extension is not enabled in {self.where} '
                    f"and could not be ({exc}); run `CREATE EXTENSION vector;` there as a "
                    f"superuser") from None
            version = self._scalar("SELECT extversion FROM pg_extension WHERE extname = 'vector'")
        have = tuple(int(x) for x in str(version).split(".")[:3] if x.isdigit())
        if self.vector_type in ("halfvec", "bit", "sparsevec") and have < HALFVEC_SINCE:
            raise ConfigError(f'sink "{self.name}": a {self.vector_type} column (for the '
                              f"folder's {self.precision} vectors) needs pgvector 0.7.0 or later; "
                              f"{self.where} has {version}")

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None

    def _execute(self, query, params=None) -> list[tuple]:
        try:
            with self.conn.cursor() as cur:
                cur.execute(query, params)
                return cur.fetchall() if cur.description else []
        except self.psycopg.Error as exc:
            raise SinkError(one_line(exc)) from None

    def _scalar(self, query, params=None):
        rows = self._execute(query, params)
        return rows[0][0] if rows else None

    def _quoted(self) -> str:
        return self.ident.as_string(self.conn)

    # -- state -----------------------------------------------------------------------------
    def marker(self) -> str | None:
        return self._scalar("SELECT obj_description(to_regclass(%s), 'pg_class')",
                            (self._quoted(),))

    def count(self) -> int | None:
        if self._scalar("SELECT to_regclass(%s) IS NOT NULL", (self._quoted(),)) is not True:
            return None
        return int(self._scalar(self.sql.SQL("SELECT count(*) FROM {}").format(self.ident)))

    # -- load ------------------------------------------------------------------------------
    def _create(self, cur, schema: pa.Schema, marker: Marker) -> None:
        sql = self.sql
        columns = []
        for field in schema:
            kind = pg_type(field, self.vector_type, marker.dim)
            extra = " NOT NULL" if field.name == "vector" else ""
            columns.append(sql.SQL("{} {}{}").format(sql.Identifier(field.name), sql.SQL(kind),
                                                     sql.SQL(extra)))
        columns.append(sql.SQL("PRIMARY KEY ({})").format(
            sql.SQL(", ").join(map(sql.Identifier, key_columns(schema)))))
        cur.execute(sql.SQL("CREATE TABLE {} ({})").format(self.ident, sql.SQL(", ").join(columns)))
        cur.execute(sql.SQL("COMMENT ON TABLE {} IS {}").format(self.ident,
                                                                sql.Literal(marker.to_json())))

    def _copy(self, cur, table, names: list[str], blocks: Iterator[pa.Table], point: str,
              dim: int = 0) -> int:
        sql = self.sql
        query = sql.SQL("COPY {} ({}) FROM STDIN (FORMAT BINARY)").format(
            table, sql.SQL(", ").join(map(sql.Identifier, names)))
        rows = 0
        with cur.copy(query) as copy:
            copy.write(HEADER)
            for i, block in enumerate(blocks):
                sparse = self.vector_type == "sparsevec" and "vector" in block.column_names
                why = over_limit(block) if sparse else None
                if why:
                    raise SinkError(f'sink "{self.name}": {why}')
                copy.write(encode(codes_block(block.select(names), self.precision),
                                  self.vector_type, dim))
                rows += block.num_rows
                if i == 0:
                    checkpoint(point)  # mid-COPY: nothing is committed
            copy.write(TRAILER)
        return rows

    def _keep_table(self, cur, keep: pa.Table) -> None:
        """The folder's keys in a temporary table, by binary COPY."""
        sql = self.sql
        names = keep.column_names
        cur.execute(sql.SQL("CREATE TEMP TABLE embedpipe_keep ({}, PRIMARY KEY ({})) "
                            "ON COMMIT DROP").format(
            sql.SQL(", ").join(sql.SQL("{} {}").format(sql.Identifier(f.name),
                                                       sql.SQL(pg_type(f, "", 0)))
                               for f in keep.schema),
            sql.SQL(", ").join(map(sql.Identifier, names))))
        blocks = (keep.slice(s, 65536) for s in range(0, keep.num_rows, 65536))
        self._copy(cur, sql.Identifier("embedpipe_keep"), names, blocks, "sink-keep")
        cur.execute("ANALYZE embedpipe_keep")

    def _same_key(self, names: list[str]):
        sql = self.sql
        return sql.SQL(" AND ").join(sql.SQL("k.{0} = t.{0}").format(sql.Identifier(n))
                                     for n in names)

    def load(self, schema: pa.Schema, blocks: Iterator[pa.Table], keep: pa.Table | None,
             marker: Marker, lock: bool = True) -> tuple[int, int]:
        sql = self.sql
        names = schema.names
        upserted = deleted = 0
        try:
            with self.conn.transaction(), self.conn.cursor() as cur:
                exists = self.count() is not None
                if not exists:
                    if not names:
                        return 0, 0
                    self._create(cur, schema, marker)
                # One sync at a time per table; readers go on reading the old rows until COMMIT.
                if lock:
                    cur.execute(sql.SQL("LOCK TABLE {} IN SHARE ROW EXCLUSIVE MODE").format(
                        self.ident))
                if names:
                    cur.execute(sql.SQL("CREATE TEMP TABLE embedpipe_stage (LIKE {}) "
                                        "ON COMMIT DROP").format(self.ident))
                    upserted = self._copy(cur, sql.Identifier("embedpipe_stage"), names, blocks,
                                          "sink-copy", marker.dim or 0)
                    cols = sql.SQL(", ").join(map(sql.Identifier, names))
                    keys = key_columns(schema)
                    rest = [n for n in names if n not in keys]
                    cur.execute(sql.SQL(
                        "INSERT INTO {t} AS t ({cols}) SELECT {cols} FROM embedpipe_stage "
                        "ON CONFLICT ({keys}) DO UPDATE SET {sets} "
                        "WHERE ({old}) IS DISTINCT FROM ({new})").format(
                        t=self.ident, cols=cols,
                        keys=sql.SQL(", ").join(map(sql.Identifier, keys)),
                        sets=sql.SQL(", ").join(sql.SQL("{0} = EXCLUDED.{0}").format(
                            sql.Identifier(n)) for n in rest),
                        old=sql.SQL(", ").join(sql.SQL("t.{}").format(sql.Identifier(n))
                                               for n in rest),
                        new=sql.SQL(", ").join(sql.SQL("EXCLUDED.{}").format(sql.Identifier(n))
                                               for n in rest)))
                if keep is not None:
                    self._keep_table(cur, keep)
                    cur.execute(sql.SQL(
                        "DELETE FROM {} AS t WHERE NOT EXISTS "
                        "(SELECT 1 FROM embedpipe_keep k WHERE {})").format(
                        self.ident, self._same_key(keep.column_names)))
                    deleted = cur.rowcount
        except self.psycopg.Error as exc:
            raise SinkError(f'sink "{self.name}": {self.describe()}: {one_line(exc)}') from None
        return upserted, deleted

    def upsert(self, schema: pa.Schema, blocks: Iterator[pa.Table], marker: Marker) -> int:
        """One of several loaders of disjoint units at once: load's COPY and INSERT ... ON
        CONFLICT in its own transaction, without its table lock (each row's lock only)."""
        return self.load(schema, blocks, None, marker, lock=False)[0]

    def block_digests(self, block: pa.Table):
        if self.vector_type != "sparsevec":
            return super().block_digests(block)
        from .base import vector_digests
        return vector_digests(sparsevec_payload(block.column("vector"), self.dim_of()))

    def dim_of(self) -> int:
        """The sparsevec column's dimensions (the vocabulary), from the table's marker."""
        return int(json.loads(self.marker() or "{}").get("dim") or 0)

    def ensure_index(self, rows: int) -> str:
        """The ANN index the config asks for, built after the load when missing (or made with
        other settings); with index = "none" an index embedpipe built is dropped, so that
        search is exact."""
        sql = self.sql
        schema = self.cfg.table.split(".")[0] if "." in self.cfg.table else None
        name = self.index_name.as_string(self.conn).split(".")[-1].strip('"')
        found = self._scalar(
            "SELECT indexdef FROM pg_indexes WHERE indexname = %s AND "
            "schemaname = COALESCE(%s, current_schema())", (name, schema))
        if self.cfg.index == "none":
            if found:
                self._execute(sql.SQL("DROP INDEX {}").format(self.index_name))
                return "index dropped (index = none: exact search)"
            return ""
        ops = "bit_hamming_ops" if self.vector_type == "bit" else "sparsevec_ip_ops" \
            if self.vector_type == "sparsevec" else \
            f"{self.vector_type}_{'ip' if self.metric == 'ip' else 'l2'}_ops"
        params = self._index_params(rows)
        if found and f"USING {self.cfg.index} " in found and ops in found:
            return f"{self.cfg.index} present"
        tick = time.perf_counter()
        try:
            with self.conn.transaction():
                if found:
                    self._execute(sql.SQL("DROP INDEX {}").format(self.index_name))
                create = sql.SQL("CREATE INDEX {} ON {} USING {} (vector {}) WITH ({})")
                self._execute(create.format(
                    sql.Identifier(name), self.ident, sql.SQL(self.cfg.index),
                    sql.SQL(ops), sql.SQL(params)))
        except SinkError as exc:
            raise SinkError(f'sink "{self.name}": building the {self.cfg.index} index: '
                            f"{exc}") from None
        return f"{self.cfg.index} built in {time.perf_counter() - tick:.1f} s ({params})"

    def _index_params(self, rows: int) -> str:
        cfg = self.index_cfg
        if self.cfg.index == "hnsw":
            m = min(max(getattr(cfg, "hnsw_m", 16) or 16, 2), 100)
            ef = min(max(getattr(cfg, "ef_construction", 64) or 64, 2 * m), 1000)
            return f"m = {m}, ef_construction = {ef}"
        lists = getattr(cfg, "nlist", None) or max(1, min(32768, int(math.sqrt(max(rows, 1)))))
        return f"lists = {lists}"

    # -- reading back ----------------------------------------------------------------------
    def id_difference(self, keys: pa.Table) -> tuple[int, int, list]:
        sql = self.sql
        cols = sql.SQL(", ").join(sql.SQL("x.{}").format(sql.Identifier(n))
                                  for n in keys.column_names)
        found = {}
        try:
            with self.conn.transaction() as tx, self.conn.cursor() as cur:
                self._keep_table(cur, keys)
                for side, a, b in (("missing", "embedpipe_keep", self.ident),
                                   ("extra", self.ident, "embedpipe_keep")):
                    a = sql.Identifier(a) if isinstance(a, str) else a
                    b = sql.Identifier(b) if isinstance(b, str) else b
                    cur.execute(sql.SQL("SELECT {cols} FROM {a} x WHERE NOT EXISTS (SELECT 1 "
                                        "FROM {b} y WHERE {same})").format(
                        cols=cols, a=a, b=b, same=sql.SQL(" AND ").join(
                            sql.SQL("x.{0} = y.{0}").format(sql.Identifier(n))
                            for n in keys.column_names)))
                    found[side] = cur.fetchall()
                tx.force_rollback = True
        except self.psycopg.Error as exc:
            raise SinkError(f'sink "{self.name}": {one_line(exc)}') from None
        missing, extra = found["missing"], found["extra"]
        return len(missing), len(extra), [tuple(r) for r in missing[:5] + extra[:5]]

    def vectors_of(self, keys: list[tuple]) -> dict:
        names = ["id", "chunk"] if keys and len(keys[0]) == 2 else ["id"]
        rows = self._execute(self.sql.SQL("SELECT {}, vector::text FROM {} WHERE id = ANY(%s)")
                             .format(self.sql.SQL(", ").join(map(self.sql.Identifier, names)),
                                     self.ident), ([k[0] for k in keys],))
        wanted = set(keys)
        return {tuple(r[:-1]): self._values(r[-1]) for r in rows if tuple(r[:-1]) in wanted}

    def _values(self, text: str) -> np.ndarray:
        """A vector's text form as the folder's stored values (bit: '0110...' packed again)."""
        if self.vector_type != "bit":
            return np.asarray(json.loads(text), np.float32)
        bits = np.frombuffer(text.encode(), np.uint8) - ord("0")
        return from_codes(self.precision, np.packbits(bits))

    @property
    def tolerance(self) -> float:
        rounds = self.vector_type == "halfvec" and self.precision != "float16"
        return 2e-3 if rounds else 1e-6

    def vector_bytes(self, codes: np.ndarray) -> np.ndarray:
        """What COPY sent and vector_send returns; bit: the packed bytes, without bit_send's
        length (the column's type fixes it)."""
        return codes if self.vector_type == "bit" else vector_payload(codes, self.vector_type)

    def row_digests(self, keys: list[str]) -> pa.Table:
        """Each row's vector digest computed by the server (sha256 of vector_send): only the key
        and 16 bytes a row travel."""
        sql = self.sql
        send = sql.SQL({"halfvec": "halfvec_send(vector)", "vector": "vector_send(vector)",
                        "sparsevec": "sparsevec_send(vector)",
                        "bit": "substring(bit_send(vector) FROM 5)"}[self.vector_type])
        rows = self._execute(sql.SQL("SELECT {}, substring(sha256({}) FROM 1 FOR {}) "
                                     "FROM {}").format(
            sql.SQL(", ").join(map(sql.Identifier, keys)), send, sql.Literal(DIGEST_BYTES),
            self.ident))
        columns = list(zip(*rows)) if rows else [[] for _ in range(len(keys) + 1)]
        return pa.table({**{k: list(columns[i]) for i, k in enumerate(keys)},
                         "digest": pa.array([bytes(d) for d in columns[-1]],
                                            pa.binary(DIGEST_BYTES))})

    def _query_text(self, vector) -> str:
        """A float query as the column type's text: '[x, ...]', or bit's '0110...'; a sparse
        query (a CSR row) as sparsevec's '{i:x,...}/dim'."""
        if self.vector_type == "sparsevec":
            return query_text(vector)
        if self.vector_type == "bit":
            bits = np.unpackbits(query_codes(self.precision, vector[None])[0], count=len(vector))
            return (bits + ord("0")).astype(np.uint8).tobytes().decode()
        return "[" + ",".join(map(repr, np.asarray(vector, np.float32).tolist())) + "]"

    def search(self, queries: np.ndarray, k: int, columns: list[str]) -> list[pa.Table]:
        """Nearest rows by the folder's metric: exact with index = "none", else through the
        HNSW (ef_search from [index]) or IVFFlat (probes = nprobe) index. bit: the query's
        packed bits (q > 0) by hamming distance, the score; exact ties in id order."""
        sql = self.sql
        if self.count() is None:
            raise ConfigError(f'sink "{self.name}": {self.describe()} does not exist; run '
                              f"`embedpipe sync` on the folder")
        bits, ip = self.vector_type == "bit", self.metric == "ip" or self.vector_type == "sparsevec"
        op = "<~>" if bits else "<#>" if ip else "<->"
        score = "vector <~> q.v" if bits else "-(vector <#> q.v)" if ip else "(vector <-> q.v) ^ 2"
        vt = f"bit({queries.shape[1]})" if bits else self.vector_type
        exact_ties = bits or self.vector_type == "sparsevec"
        tie = ", id" if exact_ties and self.cfg.index == "none" else ""  # an index orders by distance only
        query = sql.SQL("SELECT id, ({score})::real, {cols} FROM {t}, (SELECT %s::{vt} AS v) q "
                        "ORDER BY vector {op} q.v{tie} LIMIT %s").format(
            score=sql.SQL(score), t=self.ident, vt=sql.SQL(vt), op=sql.SQL(op), tie=sql.SQL(tie),
            cols=sql.SQL(", ").join([sql.SQL("NULL")] + [sql.Identifier(c) for c in columns]))
        out = []
        try:
            with self.conn.transaction(), self.conn.cursor() as cur:
                cfg = self.index_cfg
                if self.cfg.index == "hnsw" and getattr(cfg, "ef_search", None):
                    cur.execute(sql.SQL("SET LOCAL hnsw.ef_search = {}").format(
                        sql.Literal(int(cfg.ef_search))))
                if self.cfg.index == "ivfflat" and getattr(cfg, "nprobe", None):
                    cur.execute(sql.SQL("SET LOCAL ivfflat.probes = {}").format(
                        sql.Literal(int(cfg.nprobe))))
                for vector in (queries[i] for i in range(queries.shape[0])):
                    cur.execute(query, (self._query_text(vector), k))
                    rows = cur.fetchall()
                    out.append(pa.table({
                        "id": [r[0] for r in rows],
                        "score": pa.array([r[1] for r in rows], pa.float32()),
                        **{c: [r[3 + i] for r in rows] for i, c in enumerate(columns)}}))
        except self.psycopg.Error as exc:
            raise SinkError(f'sink "{self.name}": {one_line(exc)}') from None
        return out
