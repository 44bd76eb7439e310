"""`embedpipe sync OUT`: bring OUT's sinks in step with its committed parts, without the model.

The sinks are those the folder's last run recorded (its job's [[sink]] tables), or with
`--job FILE` those of FILE (or of them, those given with --sink), which are then recorded too:
how a sink is added to a finished folder (a job file naming it keeps it in step on later runs;
a run of a job that no longer names it forgets its record). Used after a table was wiped or
dropped, after a sink failed at the end of a run, or with `--full` to rewrite every row.
"""
from __future__ import annotations

import dataclasses

from ..config import ConfigError, load_job
from ..io.folder_check import unit_damage
from ..io.ledger import Ledger, acquire_lock, release_lock
from ..io.manifest import read_manifest
from ..io.storage import Store
from ..sinks.base import SinkError, SinkLoad, close_all, preflight, sync_sink
from ..sinks.make import sinks_of


@dataclasses.dataclass
class SyncResult:
    folder: str
    loads: list[SinkLoad]
    failures: list[str]

    def to_dict(self) -> dict:
        return {"folder": self.folder, "ok": not self.failures,
                "sinks": [s.to_dict() for s in self.loads], "failures": self.failures}

    def render(self) -> str:
        lines = []
        for s in self.loads:
            if s.error:
                continue
            lines.append(f"synced {s.name} ({s.target}): {s.upserted:,} upserted, "
                         f"{s.deleted:,} deleted" + (" (full sync)" if s.full else "")
                         + f", {s.rows:,} rows, {s.seconds:.2f} s"
                         + (f", {s.rows_per_second:,.0f} rows/s" if s.upserted else "")
                         + (f"; {s.index}" if s.index else "")
                         + (f"; {s.rewritten:,} rows differed from the folder (rewritten), "
                            f"{s.removed:,} not in it (deleted)" if s.rewritten or s.removed
                            else "; every row's vector compared: as the folder's"
                            if s.compared else ""))
        lines += [f"FAILED {f}" for f in self.failures]
        return "\n".join(lines)


def sync_folder(url: str, job_file: str | None = None, names: tuple[str, ...] = (),
                full: bool = False) -> SyncResult:
    store = Store(url)
    manifest = read_manifest(store)
    config = dict(manifest.config or {})
    recorded = list(config.get("sink") or [])
    if job_file:
        added = [dataclasses.asdict(s) for s in load_job(job_file).sink]
        if not added:
            raise ConfigError(f"{job_file} names no [[sink]]")
        if names:  # only the chosen ones are synced and recorded
            missing = [n for n in names if n not in {s["name"] for s in added}]
            if missing:
                raise ConfigError(f"{job_file} has no sink named {missing[0]!r}; it has: "
                                  f"{', '.join(s['name'] for s in added)}")
            added = [s for s in added if s["name"] in names]
        new = {s["name"] for s in added}
        recorded = [s for s in recorded if s.get("name") not in new] + added
    config["sink"] = recorded
    if not recorded:
        raise ConfigError(f"{url}: its job names no [[sink]]; add [[sink]] tables to the job "
                          f"file and give it with --job FILE")
    have = [s.get("name") for s in recorded]
    unknown = [n for n in names if n not in have]
    if unknown:
        raise ConfigError(f"{url} has no sink named {unknown[0]!r}; it has: {', '.join(have)}")
    # only the chosen sinks are made: another's missing extra or DSN does not stop this one
    sinks = sinks_of(config, list(names) or None)
    try:
        preflight(sinks, manifest.settings_hash or "")
        acquire_lock(store)
        try:
            ledger = Ledger(store)
            # a sink is never loaded from a part that is not what was committed (every byte read)
            damaged = [why for whys in unit_damage(ledger, full=True).values() for why in whys]
            if damaged:
                raise ConfigError(f"{url}: {len(damaged)} committed files are missing or "
                                  f"altered (e.g. {damaged[0]}); `embedpipe run` on the same "
                                  f"job repairs the folder and then its sinks")
            if job_file:
                ledger.update(config={**(ledger.manifest.config or {}), "sink": recorded})
            result = SyncResult(url, [], [])
            for sink in sinks:
                try:
                    result.loads.append(sync_sink(sink, ledger, full=full, compare=True))
                except (SinkError, ConfigError) as exc:
                    why = str(exc)
                    why = why if why.startswith('sink "') else f'sink "{sink.name}": {why}'
                    result.loads.append(SinkLoad(sink.name, sink.kind, sink.target(), error=why))
                    result.failures.append(why)
        finally:
            release_lock(store)
    finally:
        close_all(sinks)
    return result
