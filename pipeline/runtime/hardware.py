"""What a processor offers. `this_cpu()` reads this machine's once per process, from the CPUID
instruction (through torch's cpuinfo; /proc/cpuinfo where that is missing, nothing on a machine
with neither): what the CPU itself reports, which is also what an emulator or a VM shows to the
code. The runtime's choices (dtype, attention kernel, forward, compile) take a `Cpu` as an
argument, so their logic can be tested with any kind of CPU on any machine; only this machine's
own `Cpu` (`here`) ever builds or loads a kernel.
"""
from __future__ import annotations

import functools
import os
import platform
from dataclasses import dataclass

# cpuinfo's names (torch._C._cpu._get_cpu_capability()) -> the Linux flag names used here
_CPUINFO_FLAGS = {"avx2": "avx2", "fma3": "fma", "avx512_f": "avx512f", "avx512_bw": "avx512bw",
                  "avx512_vl": "avx512vl", "avx512_dq": "avx512dq", "avx512_bf16": "avx512_bf16",
                  "avx512_vnni": "avx512_vnni", "avx_vnni": "avx_vnni", "amx_tile": "amx_tile",
                  "amx_bf16": "amx_bf16", "amx_int8": "amx_int8"}
AVX512_BF16 = frozenset({"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_bf16"})
AMX_BF16 = AVX512_BF16 | {"amx_tile", "amx_bf16"}


@dataclass(frozen=True)
class Cpu:
    """A processor's instruction-set flags (Linux's names) and its name. `here`: this machine's
    own, read from the CPU; a Cpu made by hand (tests, planning) never builds or loads a kernel."""
    flags: frozenset[str]
    model: str = "unknown CPU"
    here: bool = False

    @property
    def amx_bf16(self) -> bool:
        """AMX tiles with bf16 products (Sapphire Rapids and later): embedpipe's AMX kernel."""
        return AMX_BF16 <= self.flags

    @property
    def avx512_bf16(self) -> bool:
        """VDPBF16PS and the AVX-512 it comes with (Cooper Lake, Zen 4 and later): embedpipe's
        attention kernel without AMX."""
        return AVX512_BF16 <= self.flags

    @property
    def fast_bf16(self) -> bool:
        """AMX or AVX-512 bf16: bf16 matrix products run several times faster than float32.
        Without either (AVX2 CPUs, Zen 3 and older) bf16 is emulated, ~5x slower than float32."""
        return self.amx_bf16 or self.avx512_bf16

    @property
    def emulates_bf16(self) -> bool:
        """bf16 products here are emulated in float32 (slower than float32 itself)."""
        return not self.fast_bf16

    @property
    def exact_int8(self) -> bool:
        """fbgemm's int8 products are exact integer sums with VNNI (VPDPBUSD, 32-bit sums); its
        AVX2 kernels add pairs of 8-bit products in 16 bits with saturation (VPMADDUBSW), which
        on activations with outlier dimensions (MiniLM's residual stream has them) is wrong by up
        to half an output's range (tests/runtime/test_int8.py)."""
        return "avx512_vnni" in self.flags

    @property
    def onednn_bf16(self) -> bool:
        """oneDNN's bf16 products exist (what torch's mkldnn bf16 check asks on x86: AVX-512
        BW/VL/DQ); on this machine torch itself answers (fused_forward.onednn_products)."""
        return {"avx512bw", "avx512vl", "avx512dq"} <= self.flags

    @property
    def kind(self) -> str:
        """The summary's and the bench's words for this CPU's widest path."""
        return ("AMX bf16" if self.amx_bf16 else "AVX-512 bf16" if self.avx512_bf16
                else "AVX-512" if "avx512f" in self.flags else "AVX2" if "avx2" in self.flags
                else "no AVX2")

    @property
    def bf16_kind(self) -> str:
        """The summary's words for why bf16 was or was not chosen on this CPU."""
        return ("CPU has AMX bf16" if self.amx_bf16 else "CPU has AVX-512 bf16"
                if self.avx512_bf16 else "CPU has no fast bf16")


def cpu_with(*flags: str, model: str = "a CPU made by hand") -> Cpu:
    """A Cpu with these flags, for planning and tests."""
    return Cpu(frozenset(flags), model)


# EMBEDPIPE_CPU_CAP: run as a CPU with at most these features would (a cap only takes away, so
# nothing the CPU lacks is ever run): how the test suite is run as on an AVX2-only CPU (docs,
# "Every CPU"), together with ONEDNN_MAX_CPU_ISA / ATEN_CPU_CAPABILITY for torch's own kernels.
CAPS = {"avx2": frozenset({"avx2", "fma"}),
        "avx512": frozenset({"avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512dq",
                             "avx512_vnni"}),
        "avx512_bf16": AVX512_BF16 | {"avx2", "fma", "avx512_vnni"}}


@functools.cache
def this_cpu() -> Cpu:
    flags, model = _cpuid_flags() or _proc_flags(), _model_name()
    cap = os.environ.get("EMBEDPIPE_CPU_CAP", "")
    if cap in CAPS:
        flags, model = flags & CAPS[cap], f"{model} (capped at {cap})"
    elif cap:
        import logging

        logging.getLogger(__name__).warning("EMBEDPIPE_CPU_CAP=%r is not one of %s; ignored",
                                            cap, ", ".join(CAPS))
    if os.environ.get("FBGEMM_ENABLE_INSTRUCTIONS", "").upper() in ("AVX2", "AVX"):
        flags -= {"avx512_vnni"}  # fbgemm's own cap: its int8 products run as on AVX2
    return Cpu(flags, model, here=True)


def _cpuid_flags() -> frozenset[str]:
    try:
        import torch

        found = torch._C._cpu._get_cpu_capability()
    except (ImportError, AttributeError, RuntimeError):
        return frozenset()
    return frozenset(name for key, name in _CPUINFO_FLAGS.items() if found.get(key) is True)


def _proc_flags() -> frozenset[str]:
    """Linux without torch's cpuinfo; none elsewhere (macOS, no /proc)."""
    try:
        with open("/proc/cpuinfo") as handle:
            line = next((line for line in handle if line.startswith("flags")), "")
    except OSError:
        return frozenset()
    return frozenset(line.partition(":")[2].split())


def _model_name() -> str:
    """The processor's name, as `lscpu` shows it; every speed figure names it."""
    try:
        with open("/proc/cpuinfo") as handle:
            line = next((line for line in handle if line.startswith("model name")), "")
    except OSError:
        line = ""
    return line.partition(":")[2].strip() or platform.processor() or "unknown CPU"


def cpu_flags() -> frozenset[str]:
    return this_cpu().flags


def cpu_model() -> str:
    return this_cpu().model


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
