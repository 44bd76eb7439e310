"""The run summary: one screen for people, the same facts as JSON for schedulers."""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field

from ..runtime.runtime import Runtime
from ..io.manifest import UnitCounts, UnitRecord


# The JSON's keys, in their order: the run's own fields, the runtime's (as they were named when
# the summary copied them), then the counts' under their summary names
_RUNTIME_KEYS = {"device": "device", "dtype": "dtype", "dtype_note": "dtype_note",
                 "attention": "attention", "forward": "forward", "compiled": "compile",
                 "compile_note": "compile_note"}
_COUNT_KEYS = ("rows_read", "vectors_written", "rows_reused", "rows_copied", "rejects",
               "truncated", "windows", "texts_chunked", "token_rows")  # RunSummary's _count()s
_ORDER = ("job", "output", "model", *_RUNTIME_KEYS, "recipe", "units_total", "units_done",
          "units_skipped", "units_changed", "units_failed", "units_removed", "units_removed_kept",
          "units_repaired", "repairs", "rows_read", "rows_failed", "vectors_written", "reuse",
          "rows_reused", "rows_copied", "rows_removed", "registry_bytes", "rejects", "truncated",
          "long_text", "windows", "texts_chunked", "granularity", "token_rows", "real_tokens",
          "padded_tokens", "oom_splits", "stray_files_removed", "folder_vectors", "precision", "rescore_precision",
          "bytes_per_row", "stored_tokens",
          "failures",
          "index", "lock_taken_over", "sinks", "seconds")


def _count(name: str, doc: str | None = None) -> property:
    """One of the summed UnitCounts, read-only (a dict copied: the sum stays as it is)."""
    return property(lambda self: copy.copy(getattr(self.counts, name)), doc=doc)


@dataclass
class RunSummary:
    job: str
    output: str
    model: str
    runtime: Runtime  # device, dtype and why, attention, forward, compile and why
    recipe: list[str] = field(default_factory=list)  # pooling, normalize, prompt: where from
    units_total: int = 0
    units_done: int = 0
    units_skipped: int = 0
    units_changed: int = 0
    units_failed: int = 0
    units_removed: int = 0
    units_removed_kept: int = 0
    units_repaired: int = 0  # complete before, but their files were missing or altered: redone
    repairs: list[str] = field(default_factory=list)  # one line a repaired unit: what was wrong
    counts: UnitCounts = UnitCounts()  # every unit this run embedded (failed ones: rows read)
    rows_failed: int = 0  # rows read in units that failed: neither vector nor reject, retried
    reuse: str = "off"  # encode.reuse as it applied (off where the output layout cannot reuse)
    rows_removed: int = 0  # ids stored before that the input no longer has
    registry_bytes: int = 0  # the largest id / hash lookup arrays this run held
    long_text: str = "truncate"  # truncate | chunk | reject: what became of texts over a window
    granularity: str = "text"  # subword | word: a token table is written beside the vectors
    real_tokens: int = 0
    padded_tokens: int = 0
    oom_splits: int = 0
    stray_files_removed: int = 0
    folder_vectors: int = 0
    precision: str = "float32"  # output.precision: what the vector parts store
    rescore_precision: str | None = None  # output.rescore_precision: the kept copy's
    bytes_per_row: int = 0  # one row's stored vectors' bytes (with the rescore copy)
    # a BGE-M3 folder's mean stored bytes a row of each representation (io/representations.py)
    representation_bytes: dict = field(default_factory=dict)
    stored_tokens: int = 0  # a multi-vector folder's token vectors (its rows' mean makes bytes)
    failures: list[str] = field(default_factory=list)
    index: dict = field(default_factory=dict)
    lock_taken_over: dict | None = None
    sinks: list[dict] = field(default_factory=list)  # per [[sink]]: what its sync did
    seconds: dict[str, float] = field(default_factory=dict)

    def add(self, record: UnitRecord) -> None:
        """A unit committed: its counts; a failed one's rows are read but neither vector nor
        reject (the rerun retries them)."""
        self.counts += record.counts
        if record.complete:
            self.units_done += 1
        else:
            self.units_failed += 1
            self.rows_failed += record.counts.rows_in

    # the counts under the names the summary has always had (its JSON keys)
    rows_read = _count("rows_in")
    vectors_written = _count("vectors")
    rows_reused = _count("reused", "Rows that took a vector already stored in the folder.")
    rows_copied = _count("copied", "Rows that repeated a text encoded earlier in this run.")
    rejects = _count("reject_reasons")
    truncated = _count("truncated")
    windows = _count("windows", 'long_text = "chunk": token windows through the model.')
    texts_chunked = _count("chunked", 'long_text = "chunk": texts cut into more than one window.')
    token_rows = _count("token_rows", "Rows this run wrote to the token table.")

    @property
    def rows_encoded(self) -> int:
        """Rows whose vector came from the model in this run."""
        return self.vectors_written - self.rows_reused - self.rows_copied

    @property
    def rejected(self) -> int:
        return sum(self.rejects.values())

    @property
    def accounted(self) -> bool:
        """Every row read is a vector, a reject, or in a unit that failed (retried next run)."""
        return self.rows_read == self.vectors_written + self.rejected + self.rows_failed

    @property
    def padding_overhead(self) -> float:
        """Padded tokens the model computed beyond the real ones, as a % of the real ones."""
        return 100.0 * (self.padded_tokens - self.real_tokens) / self.real_tokens if self.real_tokens else 0.0

    @property
    def exit_code(self) -> int:
        return 1 if self.failures else 0

    def rate(self, count: int) -> float:
        total = self.seconds.get("total", 0.0)
        return count / total if total else 0.0

    def to_dict(self) -> dict:
        own = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        values = {**own, **{k: getattr(self.runtime, a) for k, a in _RUNTIME_KEYS.items()},
                  **{k: getattr(self, k) for k in _COUNT_KEYS}}
        data = copy.deepcopy({k: values[k] for k in _ORDER})
        data.update(rejected=self.rejected, rows_encoded=self.rows_encoded, padding_overhead_pct=round(self.padding_overhead, 2),
                    rows_per_second=round(self.rate(self.rows_read), 1),
                    tokens_per_second=round(self.rate(self.real_tokens), 1),
                    accounted=self.accounted,
                    seconds={k: round(v, 3) for k, v in self.seconds.items()})
        if self.representation_bytes:  # a BGE-M3 folder's only: other folders' keys stay
            data["representation_bytes"] = {k: round(v, 1)
                                            for k, v in self.representation_bytes.items()}
        return data

    def render(self) -> str:
        s, r = self.seconds, self.runtime
        reasons = ", ".join(f"{k} {v:,}" for k, v in sorted(self.rejects.items())) or "none"
        check = "ok" if self.accounted else "MISMATCH"
        lines = [
            f"embedpipe run {self.job} -> {self.output}",
            f"  model      {self.model} on {r.device} in {r.dtype_note or r.dtype}"
            + (f", attention {r.attention}" if r.attention else "")
            + (", fused forward" if r.forward == "fused" else "")
            + (", compiled" if r.compile else "")
            + (f" ({r.compile_note})" if r.compile and r.compile_note.startswith("auto")
               else ""),
            *([f"  encoding   {'; '.join(self.recipe)}"] if self.recipe else []),
            f"  units      {self.units_total} in input: {self.units_done} embedded, "
            f"{self.units_skipped} already done, {self.units_changed} changed, "
            f"{self.units_failed} failed, {self.units_removed} removed"
            + (f", {self.units_removed_kept} gone from input but kept" if self.units_removed_kept else ""),
            f"  rows       {self.rows_read:,} read = {self.vectors_written:,} vectors + "
            f"{self.rejected:,} rejected"
            + (f" + {self.rows_failed:,} in failed units" if self.rows_failed else "") + f" ({check})",
            f"  rejects    {reasons}",
            *([f"  reuse      {self.rows_encoded:,} rows encoded, {self.rows_reused:,} took a "
               f"stored vector, {self.rows_copied:,} repeated a text of this run; "
               f"{self.rows_removed:,} stored ids removed ({self.reuse})"]
              if self.reuse != "off" or self.rows_removed else []),
            (f"  windows    {self.windows:,} token windows embedded; {self.texts_chunked:,} texts "
             f"cut into more than one, {self.truncated:,} past max_chunks (flagged truncated)"
             if self.long_text == "chunk" else
             f"  truncated  {self.truncated:,} rows longer than max_length (embedded truncated)"),
            *([f"  token rows {self.token_rows:,} {self.granularity} rows written to the token "
               f"table (tokens/)"] if self.granularity != "text" else []),
            f"  tokens     {self.real_tokens:,} real, padding overhead {self.padding_overhead:.1f}%",
            f"  speed      {self.rate(self.rows_read):,.1f} rows/s, {self.rate(self.real_tokens):,.0f} tokens/s",
            "  seconds    " + ", ".join(f"{k} {s.get(k, 0.0):.2f}" for k in
                                        ("scan", "read", "tokenize", "encode", "write", "index",
                                         "total")),
            f"  folder     {self.folder_vectors:,} vectors; index: "
            + (f"{self.index.get('factory')} with {self.index.get('count', 0):,} vectors, "
               f"recall@10 {self.index.get('recall_at_10')}" if self.index.get("count") else "none"),
        ]
        kept = f" + {self.rescore_precision} kept for rescoring" if self.rescore_precision else ""
        if self.representation_bytes:  # a BGE-M3 folder: each representation's, measured
            lines.append("  stored     " + ", ".join(
                f"{name} {size:,.1f} bytes" for name, size in self.representation_bytes.items())
                + " a row (mean)")
        elif self.stored_tokens:  # a multi-vector folder: bytes follow each row's tokens
            lines.append(f"  stored     {self.precision} multi-vector: {self.stored_tokens:,} "
                         f"token vectors, {self.stored_tokens / max(1, self.folder_vectors):,.1f} "
                         f"a row, {self.bytes_per_row:,} bytes a row (measured)")
        elif self.precision == "sparse":  # bytes follow each row's non-zero count
            lines.append("  stored     sparse: int32 index + float32 value, 8 bytes a non-zero "
                         "dimension")
        else:
            lines.append(f"  stored     {self.precision}{kept}, {self.bytes_per_row:,} bytes a row")
        for sink in self.sinks:
            lines.append(f"  sink       {sink['name']} ({sink['target']}): " + (
                "not synced" if sink.get("error") else
                f"{sink['upserted']:,} upserted, {sink['deleted']:,} deleted"
                + (" (full sync)" if sink["full"] else "")
                + f", {sink['rows']:,} rows, {sink['seconds']:.2f} s"
                + (f", {sink['rows_per_second']:,.0f} rows/s" if sink["upserted"] else "")
                + (f"; {sink['index']}" if sink.get("index") else "")))
        if self.oom_splits:
            lines.append(f"  memory     {self.oom_splits} batches split after running out of device memory")
        for repair in self.repairs:
            lines.append(f"  repaired   {repair} (unit redone)")
        if self.stray_files_removed:
            lines.append(f"  recovered  {self.stray_files_removed} files of an interrupted run removed")
        if self.lock_taken_over:
            lines.append(f"  lock       took over a stale lock of pid {self.lock_taken_over.get('pid')} "
                         f"on {self.lock_taken_over.get('host')}")
        for failure in self.failures:
            lines.append(f"  FAILED     {failure}")
        return "\n".join(lines)
