"""Lab tools beside the product: corpus builders, evaluations and benchmarks, run from the
repository root as ``python -m bench.<module>``. They import ``pipeline``; ``pipeline`` never
imports them, and the wheel does not ship them."""

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
