"""`embedpipe verify OUT`: check a finished folder end to end, without the model.

Every part the manifest names exists with its recorded size, rows, footer and (unless --quick)
the sha256 of every byte; the counts add up (rows read = vectors + rejects, per unit); ids are
unique across the parts; the index files are as written (size and sha256, unless --quick) and
the index holds exactly the stored vectors in order (its count, its id map, and a sample of
vectors where the index keeps them whole); each sink holds the folder's ids and vectors (every
row's vector digest, or a sample with --quick). One line per problem; the closing line names
the command that repairs each kind.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..index.check import index_problems
from ..io.multivectors import multivector_problems
from ..io.sparse_rows import sparse_problems
from ..io.checks import DamagedFile
from ..io.folder_check import duplicate_ids, unit_damage, unit_problems
from ..io.ledger import Ledger
from ..io.manifest import read_manifest
from ..io.precision import stored_precision, stored_row_bytes
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
    quick: bool = False  # sizes and footers only, no digests
    undigested: int = 0  # committed files whose record predates digests: not read whole
    precision: str = "float32"  # what the vector parts store (output.precision)
    bytes_per_row: int = 0  # one stored vector's bytes
    indexed: bool = True  # the folder keeps an index (a sparse folder never does)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict:
        return {"folder": self.folder, "ok": self.ok, "complete": self.complete,
                "units": self.units, "vectors": self.vectors, "sinks": self.sinks,
                "quick": self.quick, "undigested_files": self.undigested,
                "precision": self.precision, "bytes_per_row": self.bytes_per_row,
                "problems": self.problems}

    def render(self) -> str:
        if self.ok:
            files = ("every file's size and footer as recorded" if self.quick else
                     f"every file as recorded ({self.undigested} from before digests: size, "
                     f"footer and page checksums only)" if self.undigested else
                     "every byte as recorded")
            return (f"ok: {self.folder}: {self.units} units, {self.vectors:,} vectors "
                    + (f"({self.precision}, {self.bytes_per_row:,} bytes a row)"
                       if self.bytes_per_row and self.precision != "sparse"
                       else f"({self.precision})")
                    + f", {files}, counts add up, ids unique"
                    + (", the index matches" if self.indexed else ", no index")
                    + (f"; sinks {', '.join(self.sinks)} hold the same ids and vectors"
                       if self.sinks else ""))
        sinks = [p for p in self.problems if p.startswith('sink "')]
        folder = len(self.problems) - len(sinks)
        repairs = []
        if folder:
            repairs.append("`embedpipe run` on the same job re-embeds damaged units and "
                           "rebuilds a damaged or stale index (`embedpipe index "
                           f"{self.folder}` rebuilds the index alone), or start afresh with "
                           "--mode overwrite")
        if sinks:
            repairs.append(f"`embedpipe sync {self.folder}` compares each sink's rows with the "
                           f"folder and rewrites those that differ"
                           + (" (after the run)" if folder else ""))
        return "\n".join(f"problem: {p}" for p in self.problems) + (
            f"\n{len(self.problems)} problem(s) in {self.folder}; " + "; ".join(repairs))


def verify_folder(url: str, quick: bool = False) -> Verdict:
    """Every check (quick: sizes and footers, no file read whole; a sample of sink vectors)."""
    store = Store(url)
    manifest = read_manifest(store)  # ConfigError when there is none, or unreadable or foreign
    ledger = Ledger(store, manifest)  # read once: a malformed sink record warns once
    precision = stored_precision(manifest)
    verdict = Verdict(url, units=len(ledger.units), complete=bool(ledger.manifest.complete),
                      quick=quick, precision=precision.name,
                      bytes_per_row=stored_row_bytes(manifest))
    failed = [r for r in ledger.units.values() if not r.complete]
    if not verdict.complete:
        verdict.problems.append("the manifest does not say complete: the last run failed or was "
                                "interrupted")
    verdict.problems += [f"unit {r.path} failed: {r.error}" for r in failed]
    # a stat and a footer read per file, and unless quick every byte against its digest
    damage = unit_damage(ledger, full=not quick)
    verdict.undigested = 0 if quick else sum(r.undigested() for r in ledger.complete_units())
    verdict.problems += unit_problems(ledger, damage)
    parts = ledger.vector_parts()
    verdict.vectors = sum(r.stored_rows for r in ledger.complete_units())
    if not any(damage.values()):  # the parts can be read
        try:  # a page failing its checksum (found with --quick, which reads no file whole)
            verdict.problems += duplicate_ids(parts)
            verdict.indexed = ledger.manifest.index_config.get("enabled", True)
            if verdict.indexed:
                verdict.problems += index_problems(store, parts, full=True, digests=not quick)
            names = parts.metadata(parts.files[0]).schema.to_arrow_schema().names \
                if parts.files else []
            if "sparse_indices" in names:  # a BGE-M3 folder may keep dense vectors beside
                verdict.precision = "sparse" if "vector" not in names else \
                    f"{verdict.precision} + sparse"
                if not quick:
                    verdict.problems += sparse_problems(parts)
            mv_files = ledger.multivector_files()
            if mv_files and "vector" in names:  # a BGE-M3 folder's colbert vectors beside
                verdict.precision += " + multivector"
            elif mv_files:
                verdict.precision += " multi-vector"
                verdict.bytes_per_row = 0
                if not quick:
                    verdict.problems += multivector_problems(store, parts.files, mv_files,
                                                             parts.rows())
            verdict.problems += sink_problems(ledger, verdict.sinks, full=not quick)
        except DamagedFile as exc:
            verdict.problems.append(str(exc))
    return verdict
