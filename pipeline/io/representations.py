"""What a folder's rows are stored as (dense, sparse, multivector: a BGE-M3 folder may keep
several, docs/multi-representation.md) and what each costs a row, counted from the parts'
Parquet metadata (no values read): dense its fixed width; sparse 8 bytes a stored non-zero
dimension (an int32 index and a float32 value); multivector its token vectors' values. A
list column's metadata counts an empty list as one value: a row of no sparse entries (a text
of special and unknown tokens only) adds 8 bytes it does not store."""
from __future__ import annotations

from ..config.sections import REPRESENTATIONS
from .ledger import Ledger
from .precision import stored_row_bytes
from .storage import Store
from .vectors import VectorParts



def _leaf_values(parts: VectorParts, column: str) -> int:
    """The values stored in a column's leaf over every part (a list's elements)."""
    total = 0
    for name in parts.files:
        meta = parts.metadata(name)
        paths = [meta.schema.column(i).path for i in range(meta.num_columns)]
        leaf = next(i for i, p in enumerate(paths) if p.split(".")[0] == column)
        total += sum(meta.row_group(g).column(leaf).num_values
                     for g in range(meta.num_row_groups))
    return total


def stored_representations(store: Store, ledger: Ledger | None = None) -> tuple[str, ...]:
    ledger = ledger or Ledger(store)
    files = ledger.vector_files()
    names = VectorParts(store, files[:1]).metadata(files[0]).schema.to_arrow_schema().names \
        if files else ["vector"]
    present = {"dense": "vector" in names, "sparse": "sparse_indices" in names,
               "multivector": bool(ledger.multivector_files())}
    return tuple(r for r in REPRESENTATIONS if present[r])


def bytes_by_representation(store: Store, ledger: Ledger | None = None
                            ) -> dict[str, float]:
    """Mean stored bytes a row of each representation (no Parquet overhead counted)."""
    ledger = ledger or Ledger(store)
    files = ledger.vector_files()
    parts = VectorParts(store, files)
    rows = sum(parts.rows()) if files else 0
    out: dict[str, float] = {}
    for name in stored_representations(store, ledger):
        if name == "dense":
            out[name] = float(stored_row_bytes(ledger.manifest))
        elif not rows:
            out[name] = 0.0
        elif name == "sparse":
            out[name] = 8 * _leaf_values(parts, "sparse_indices") / rows
        else:
            mv = VectorParts(store, ledger.multivector_files())
            field = mv.metadata(mv.files[0]).schema.to_arrow_schema().field("vectors")
            width = field.type.value_type.value_type.bit_width // 8
            out[name] = width * _leaf_values(mv, "vectors") / rows
    return out
