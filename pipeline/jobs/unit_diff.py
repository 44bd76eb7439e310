"""Which units of work a run embeds, keeps, redoes and removes: the input against the ledger."""
from __future__ import annotations

from dataclasses import dataclass

from ..io.ledger import UnitRecord
from ..io.reader import Unit


@dataclass(frozen=True)
class UnitDiff:
    kept: list[str]  # complete, and the input unit is unchanged: skipped
    changed: list[str]  # complete, but the input unit changed: embedded again
    redo: list[str]  # recorded units still in the input that are embedded again (changed, failed)
    removed: list[str]  # recorded, but gone from the input
    todo: list[Unit]  # input units to embed: new, changed or failed before, in input order


def diff_units(recorded: dict[str, UnitRecord], units: list[Unit]) -> UnitDiff:
    current = {u.key: u for u in units}
    kept = [k for k, r in recorded.items()
            if r.complete and k in current and r.fingerprint == current[k].fingerprint]
    kept_set = set(kept)
    return UnitDiff(
        kept=kept,
        changed=[k for k, r in recorded.items() if r.complete and k in current and k not in kept_set],
        redo=[k for k in recorded if k in current and k not in kept_set],
        removed=[k for k in recorded if k not in current],
        todo=[u for u in units if u.key not in kept_set])
