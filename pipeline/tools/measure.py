"""What the benchmarks measure besides time: a block's peak RSS, the machine's matmul rate, an
encoder's FLOPs, the cosines between two sets of vectors."""
from __future__ import annotations

import threading
import time

import numpy as np


# ---- memory -----------------------------------------------------------------------------------

def _status_kb(key: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return 0


class PeakRSS:
    """The process's peak resident set size while the block runs (bytes, in `.peak`)."""

    def __enter__(self) -> "PeakRSS":
        self.peak, self._stop = 0, threading.Event()
        try:
            with open("/proc/self/clear_refs", "w") as handle:
                handle.write("5")  # resets VmHWM to the current RSS
            self._hwm = True
        except OSError:
            self._hwm = False
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, _status_kb("VmRSS"))

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _status_kb("VmRSS"), _status_kb("VmHWM") if self._hwm else 0)


# ---- the machine's matmul rate and the encoder's FLOPs -----------------------------------------

def matmul_rate(dtype: str, device: str = "cpu", m: int = 4096, k: int = 384, n: int = 1536,
                repeats: int = 5, seconds: float = 0.3) -> float:
    """Best FLOP/s of an (m x k) @ (k x n) product in `dtype` (the encoder's feed-forward shape):
    the better of torch's matmul and, on CPU, oneDNN's product on packed weights (the fused
    forward's), so that the encoder is measured against the fastest product this machine runs."""
    import torch

    from ..runtime.fused_forward import onednn_products
    from ..runtime.hardware import this_cpu
    from ..runtime.runtime import TORCH_DTYPES

    torch_dtype = TORCH_DTYPES[dtype]
    a = torch.randn(m, k, device=device).to(torch_dtype)
    b = torch.randn(k, n, device=device).to(torch_dtype)
    products = [lambda: a @ b]
    if device == "cpu" and onednn_products(dtype, this_cpu()):
        packed = torch.ops.mkldnn._reorder_linear_weight(b.t().contiguous(), m)
        products.append(lambda: torch.ops.mkldnn._linear_pointwise(a, packed, None, "none", [], ""))
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    best = 0.0
    for product in products:
        for _ in range(3):
            product()
        for _ in range(repeats):
            count, start = 0, time.perf_counter()
            while True:
                product()
                count += 1
                sync()
                elapsed = time.perf_counter() - start
                if elapsed >= seconds / repeats:
                    break
            best = max(best, 2.0 * m * k * n * count / elapsed)
    return best


def encoder_flops(config, lengths: np.ndarray) -> float:
    """Multiply-adds x 2 of a BERT-style encoder over texts of these token counts (no padding)."""
    h, i, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    lengths = lengths.astype(np.float64)
    linear = 2.0 * layers * (4 * h * h + 2 * h * i) * lengths.sum()
    attention = 4.0 * layers * h * (lengths ** 2).sum()  # scores and the weighted sum
    return linear + attention


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return (a * b).sum(1)
