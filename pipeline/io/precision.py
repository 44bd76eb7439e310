"""What the vector parts store (`output.precision`): float32, float16, or vectors quantized with
sentence-transformers' `quantize_embeddings` arithmetic (int8 / uint8 with per-dimension
ranges, binary / ubinary one bit a dimension, packed, set where the value is > 0).

The int8 / uint8 ranges are the folder's `Calibration`, computed once from an even sample of
the first run's rows and recorded in the manifest; every later run quantizes with them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..config import PRECISIONS
FLOATS = ("float32", "float16")
CALIBRATED = ("int8", "uint8")
CALIBRATION_ROWS = 10_000  # the even sample of the first run the ranges come from


@dataclass(frozen=True)
class Calibration:
    """Per-dimension [min, max] ranges for int8 / uint8, as `quantize_embeddings(ranges=)` takes
    them (`ranges`: float32 (2, dim), min row then max row)."""
    precision: str
    rows: int  # the sampled rows they came from
    low: tuple[float, ...]
    high: tuple[float, ...]

    @property
    def ranges(self) -> np.ndarray:
        return np.array([self.low, self.high], np.float32)

    @classmethod
    def of(cls, precision: str, sample: np.ndarray) -> "Calibration":
        sample = np.asarray(sample, np.float32)
        return cls(precision, len(sample), tuple(sample.min(axis=0).tolist()),
                   tuple(sample.max(axis=0).tolist()))

    def to_json(self) -> dict[str, Any]:
        return {"precision": self.precision, "rows": self.rows, "min": list(self.low),
                "max": list(self.high)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Calibration":
        low, high = data["min"], data["max"]
        if not (isinstance(low, list) and isinstance(high, list) and len(low) == len(high)):
            raise TypeError("calibration min and max are not two lists of one length")
        return cls(str(data["precision"]), int(data["rows"]), tuple(map(float, low)),
                   tuple(map(float, high)))


@dataclass(frozen=True)
class Precision:
    """How float vectors become stored values and back."""
    name: str = "float32"
    calibration: Calibration | None = None  # int8 / uint8

    def __post_init__(self) -> None:
        if self.name not in PRECISIONS:
            raise ValueError(f"unknown precision {self.name!r}")
        if self.calibration is not None and self.name not in CALIBRATED:
            raise ValueError(f"precision {self.name} takes no calibration")

    @property
    def quantized(self) -> bool:
        return self.name not in FLOATS

    @property
    def storage(self) -> str:
        """The parts' value type: float32, float16, int8 or uint8."""
        return {"binary": "int8", "ubinary": "uint8"}.get(self.name, self.name)

    def width(self, dim: int) -> int:
        """Stored values a row: dim, or dim / 8 rounded up for the packed binary kinds."""
        return (dim + 7) // 8 if self.name.endswith("binary") else dim

    def bytes_per_row(self, dim: int) -> int:
        return self.width(dim) * np.dtype(self.storage).itemsize

    def store(self, vectors: np.ndarray) -> np.ndarray:
        """float32 [rows, dim] -> the stored values, exactly `quantize_embeddings(vectors,
        precision, ranges=calibration.ranges)` (floats: cast to the stored type)."""
        x = np.asarray(vectors, np.float32)
        if self.name in FLOATS:
            return x.astype(self.storage)
        if self.name.endswith("binary"):
            packed = np.packbits(x > 0, axis=-1)
            return packed if self.name == "ubinary" else (packed.astype(np.int16) - 128).astype(np.int8)
        ranges = self._ranges()
        starts = ranges[0]
        steps = (ranges[1] - starts) / 255
        steps = np.where(steps == 0, 1, steps)
        buckets = np.clip(np.floor((x - starts) / steps), 0, 255)
        return buckets.astype(np.uint8) if self.name == "uint8" else (buckets - 128).astype(np.int8)

    def _ranges(self) -> np.ndarray:
        if self.calibration is None:
            raise ValueError(f"precision {self.name} needs the folder's calibration ranges")
        return self.calibration.ranges

    def index_values(self, stored: np.ndarray) -> np.ndarray:
        """Stored values (widened to float32 as io/vectors.py reads them) as the folder's index
        takes them (index/family.py): floats as they are, int8 / uint8 dequantized, binary
        kinds' packed bits as uint8 codes (ubinary's bytes)."""
        if self.name.endswith("binary"):
            return (np.asarray(stored).astype(np.int16)
                    + (128 if self.name == "binary" else 0)).astype(np.uint8)
        if self.name in CALIBRATED:
            return self.dequantize(stored, stored.shape[1])
        return np.asarray(stored, np.float32)

    def dequantize(self, stored: np.ndarray, dim: int) -> np.ndarray:
        """float32 [rows, dim] back from stored values: floats widened; int8 / uint8 the middle
        of each value's bucket (min + (bucket + 0.5) * step); binary / ubinary +1.0 where the
        bit is set and -1.0 where not."""
        if self.name in FLOATS:
            return np.asarray(stored, np.float32)
        if self.name.endswith("binary"):
            # stored values may arrive widened to float (io/vectors.py: to_matrix)
            raw = np.asarray(stored).astype(np.int16) + (128 if self.name == "binary" else 0)
            raw = raw.astype(np.uint8)
            bits = np.unpackbits(raw, axis=-1, count=dim)
            return np.where(bits == 1, np.float32(1), np.float32(-1))
        ranges = self._ranges()
        steps = (ranges[1] - ranges[0]) / 255
        steps = np.where(steps == 0, 1, steps)
        buckets = np.asarray(stored, np.float32) + (128 if self.name == "int8" else 0)
        return (ranges[0] + (buckets + np.float32(0.5)) * steps).astype(np.float32)


def calibrated(precision: str, rescore: str | None) -> str | None:
    """Which of a folder's precisions takes calibration ranges: precision or rescore_precision
    (at most one of them is int8 / uint8: the rescore copy is the finer one), else None."""
    return next((p for p in (precision, rescore) if p in CALIBRATED), None)


def row_bytes(output: Any, dim: int) -> int:
    """Bytes of one row's stored vectors (OutputConfig, or a manifest's recorded output table):
    the vector at its precision, plus its rescore copy where one is kept."""
    get = output.get if isinstance(output, dict) else lambda key: getattr(output, key, None)
    names = [get("precision") or get("vector_dtype") or "float32", get("rescore_precision")]
    return sum(Precision(name).bytes_per_row(dim) for name in names if name)


def _recorded_output(manifest: Any) -> dict:
    return (manifest.config or {}).get("output") or {}


def _with_ranges(name: str, manifest: Any) -> Precision:
    return Precision(name, manifest.calibration if name in CALIBRATED else None)


def stored_precision(manifest: Any) -> Precision:
    """A folder's precision, as its manifest records it (folders made before output.precision
    existed: their vector_dtype)."""
    output = _recorded_output(manifest)
    return _with_ranges(output.get("precision") or output.get("vector_dtype") or "float32",
                        manifest)


def rescore_precision(manifest: Any) -> Precision | None:
    """The precision of the parts' rescore_vector column (output.rescore_precision), with the
    folder's ranges where it is int8 / uint8; None where the folder keeps no such column."""
    name = _recorded_output(manifest).get("rescore_precision")
    return _with_ranges(name, manifest) if name else None


def stored_row_bytes(manifest: Any) -> int:
    """Bytes of one stored row's vectors in a folder, as its manifest records them (row_bytes)."""
    return row_bytes(_recorded_output(manifest), manifest.dim or 0)


__all__ = ["CALIBRATED", "CALIBRATION_ROWS", "Calibration", "FLOATS", "PRECISIONS", "Precision",
           "calibrated", "rescore_precision", "row_bytes", "stored_precision", "stored_row_bytes"]
