"""`embedpipe verify OUT`: check a finished folder end to end, without the model.

Every part the manifest names exists with its recorded size, rows and footer; the counts add up
(rows read = vectors + rejects, per unit); ids are unique across the parts; the index holds
exactly the stored vectors in order (its count, its id map, and a sample of vectors where the
index keeps them whole). One line per problem.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..index.check import index_problems
from ..io.folder_check import duplicate_ids, unit_damage, unit_problems
from ..io.ledger import Ledger, read_manifest
from ..io.storage import Store
from .sink_check import sink_problems


@dataclass
class Verdict:
    folder: str
    units: int = 0
    vectors: int = 0
    complete: bool = False
    sinks: list[str] = field(default_factory=list)  # the sinks compared with the folder
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict:
        return {"folder": self.folder, "ok": self.ok, "complete": self.complete,
                "units": self.units, "vectors": self.vectors, "sinks": self.sinks,
                "problems": self.problems}

    def render(self) -> str:
        if self.ok:
            return (f"ok: {self.folder}: {self.units} units, {self.vectors:,} vectors, every file "
                    f"as recorded, counts add up, ids unique, the index matches"
                    + (f"; sinks {', '.join(self.sinks)} hold the same ids and vectors"
                       if self.sinks else ""))
        return "\n".join(f"problem: {p}" for p in self.problems) + (
            f"\n{len(self.problems)} problem(s) in {self.folder}; `embedpipe run` on the same job "
            f"redoes damaged units and rebuilds the index, or start afresh with --mode overwrite"
            + (f"; `embedpipe sync {self.folder}` brings the sinks in step"
               if any(p.startswith('sink "') for p in self.problems) else ""))


def verify_folder(url: str) -> Verdict:
    store = Store(url)
    read_manifest(store)  # ConfigError when there is none, or it is unreadable or foreign
    ledger = Ledger(store)
    verdict = Verdict(url, units=len(ledger.units), complete=bool(ledger.data.get("complete")))
    failed = [r for r in ledger.units.values() if not r.complete]
    if not verdict.complete:
        verdict.problems.append("the manifest does not say complete: the last run failed or was "
                                "interrupted")
    verdict.problems += [f"unit {r.path} failed: {r.error}" for r in failed]
    damage = unit_damage(ledger)  # a stat and a footer read per file, once
    verdict.problems += unit_problems(ledger, damage)
    parts = ledger.vector_parts()
    verdict.vectors = sum(r.stored_rows for r in ledger.complete_units())
    if not any(damage.values()):  # the parts can be read
        verdict.problems += duplicate_ids(parts)
        if (ledger.data.get("config") or {}).get("index", {}).get("enabled", True):
            verdict.problems += index_problems(store, parts, full=True)
        verdict.problems += sink_problems(ledger, verdict.sinks)
    return verdict
