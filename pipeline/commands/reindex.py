"""`embedpipe index`: rebuild an output folder's FAISS index from its stored vectors."""
from __future__ import annotations

from ..config import ConfigError, config_from_dict
from ..index.build import build_index
from ..io.checks import DamagedFile
from ..io.folder_check import unit_damage
from ..io.ledger import Ledger, acquire_lock, release_lock
from ..io.storage import Store


def rebuild_index(url: str, overrides: dict) -> dict:
    """`embedpipe index`: rebuild OUT's index from its stored vectors (no encoding), streaming
    them from Parquet, with the manifest's [index] settings updated by `overrides`."""
    store = Store(url)
    from .sparse_search import is_sparse_folder
    if is_sparse_folder(url):
        raise ConfigError(f"{url} holds sparse (SPLADE) vectors, which get no FAISS index: "
                          f"`embedpipe search` ranks them through an inverted index built from "
                          f"the parts (docs/sparse.md)")
    from ..io.representations import stored_representations
    from .multivector_search import is_multivector_folder
    if is_multivector_folder(url) and "dense" not in stored_representations(store):
        raise ConfigError(f"{url} holds multi-vector (ColBERT) rows, which get no row index: "
                          f"`embedpipe search` ranks them by MaxSim, with a token index built "
                          f"from the parts when it opens (docs/multivector.md)")
    acquire_lock(store)
    try:
        ledger = Ledger(store)
        recorded = ledger.manifest.index_config
        merged = {**recorded, **{k: v for k, v in overrides.items() if v is not None}}
        if overrides.get("type") and overrides["type"] != "factory" and not overrides.get("factory"):
            merged["factory"] = None
        if overrides.get("type") in ("flat", "hnsw") and not overrides.get("layout"):
            merged["layout"] = "single"  # a recorded shards/ondisk layout has nothing to shard
        cfg = config_from_dict({"index": merged}).index
        # an index is never built from a part that is not what was committed (every byte read)
        damaged = [why for whys in unit_damage(ledger, full=True).values() for why in whys]
        if damaged:
            more = f" (and {len(damaged) - 1} more)" if len(damaged) > 1 else ""
            raise DamagedFile(f"{url}: {damaged[0]}{more}; the index is not built from damaged "
                              f"parts: `embedpipe run` on the same job re-embeds their units and "
                              f"rebuilds the index")
        infos = build_index(store, ledger.vector_parts(), cfg)  # always whole, with labels
        ledger.update(index=infos)
    finally:
        release_lock(store)
    return infos

def render_infos(infos: dict) -> str:
    if not infos.get("count"):
        return "index: empty (no vectors)"
    params = ", ".join(f"{k} {v}" for k, v in infos.get("search_params", {}).items())
    return (f"index: {infos['factory']} ({infos['kind']}) over {infos['count']:,} x "
            f"{infos['dimension']} vectors, metric {infos['metric']}"
            + (f", {params}" if params else "") + "\n"
            f"  recall@10 {infos['recall_at_10']} on {infos['recall_queries']} stored vectors "
            f"as queries; {infos['size_bytes'] / 2**20:.1f} MiB; built in "
            f"{infos['build_seconds']:.1f} s" + render_layout(infos))

def render_layout(infos: dict) -> str:
    if infos.get("layout") == "shards":
        return (f"\n  layout shards: {len(infos['shards'])} shard files searched together "
                f"(memory-mapped), {infos['shards_bytes'] / 2**20:.1f} MiB")
    if infos.get("layout") == "ondisk":
        return (f"\n  layout ondisk: {infos['merged_shards']} shards merged into "
                f"{infos['ivfdata']} ({infos['ivfdata_bytes'] / 2**20:.1f} MiB, memory-mapped)")
    return ""
