"""Which units of work a run embeds, keeps, redoes and removes: the input against the ledger."""
from __future__ import annotations

from dataclasses import dataclass

from ..io.manifest import UnitRecord
from ..io.reader import Unit


@dataclass(frozen=True)
class UnitDiff:
    kept: list[str]  # complete, its files intact, and the input unit unchanged: skipped
    changed: list[str]  # complete, but the input unit changed: embedded again
    repaired: list[str]  # complete and unchanged, but its files are missing or altered: redone
    redo: list[str]  # recorded units still in the input embedded again (changed, repaired, failed)
    removed: list[str]  # recorded, but gone from the input
    todo: list[Unit]  # input units to embed: new, changed or failed before, in input order


def diff_units(recorded: dict[str, UnitRecord], units: list[Unit],
               damaged: set[str] = frozenset()) -> UnitDiff:
    """`damaged`: recorded units whose committed files no longer match their record."""
    current = {u.key: u for u in units}
    unchanged = [k for k, r in recorded.items()
                 if r.complete and k in current and r.fingerprint == current[k].fingerprint]
    kept = [k for k in unchanged if k not in damaged]
    kept_set, unchanged_set = set(kept), set(unchanged)
    return UnitDiff(
        kept=kept,
        changed=[k for k, r in recorded.items() if r.complete and k in current
                 and k not in unchanged_set],
        repaired=[k for k in unchanged if k in damaged],
        redo=[k for k in recorded if k in current and k not in kept_set],
        removed=[k for k in recorded if k not in current],
        todo=[u for u in units if u.key not in kept_set])
