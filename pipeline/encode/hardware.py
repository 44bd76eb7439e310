"""What this machine's processor offers, read once per process from /proc/cpuinfo."""
from __future__ import annotations

import functools
import os


@functools.cache
def cpu_flags() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo") as handle:
            return frozenset(next((line for line in handle if line.startswith("flags")), "").split())
    except OSError:
        return frozenset()


def cpu_has_amx_bf16() -> bool:
    return {"amx_bf16", "amx_tile", "avx512_bf16"} <= cpu_flags()


def cpu_has_avx512_bf16() -> bool:
    """VDPBF16PS and the AVX-512 it comes with (Cooper Lake, Zen 4 and later): embedpipe's
    attention kernel without AMX."""
    return {"avx512f", "avx512bw", "avx512vl", "avx512_bf16"} <= cpu_flags()


def cpu_has_fast_bf16() -> bool:
    """AMX or AVX-512 bf16: bf16 matrix products run several times faster than float32."""
    flags = cpu_flags()
    return "amx_bf16" in flags or "avx512_bf16" in flags


def cpu_bf16_kind() -> str:
    """The summary's words for why bf16 was or was not chosen on this CPU."""
    flags = cpu_flags()
    return ("CPU has AMX bf16" if "amx_bf16" in flags else "CPU has AVX-512 bf16"
            if "avx512_bf16" in flags else "CPU has no fast bf16")


@functools.cache
def cpu_model() -> str:
    """The processor's name, as `lscpu` shows it; every speed figure names it."""
    try:
        with open("/proc/cpuinfo") as handle:
            line = next((line for line in handle if line.startswith("model name")), "")
    except OSError:
        line = ""
    return line.partition(":")[2].strip() or "unknown CPU"


def process_age() -> float | None:
    """Seconds since this process started (Linux: /proc), or None where that cannot be read."""
    try:
        with open("/proc/self/stat") as handle:
            start_ticks = int(handle.read().rsplit(")", 1)[1].split()[19])  # field 22, starttime
        with open("/proc/uptime") as handle:
            uptime = float(handle.read().split()[0])
        return uptime - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None
