"""What a processor offers: read from CPUID, capped on request, and nothing assumed where it
cannot be read (no /proc/cpuinfo: macOS, some containers; no x86 features: Arm)."""
from __future__ import annotations

import subprocess
import sys

import torch

from helpers import runtime_for
from pipeline.runtime import hardware


def _child_cpu(env_cap: str | None, **more_env: str) -> str:
    env = ({"EMBEDPIPE_CPU_CAP": env_cap} if env_cap else {}) | more_env
    code = ("from pipeline.runtime import hardware; c = hardware.this_cpu(); "
            "print(sorted(c.flags), c.kind, c.here, c.model, sep='|')")
    import os
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          env={**os.environ, **env}).stdout.strip()


def test_the_cpu_is_read_from_cpuid_as_torch_sees_it():
    here = hardware.Cpu(hardware._cpuid_flags())  # uncapped (the suite may run under a cap)
    assert hardware.this_cpu().here and hardware.this_cpu().model
    assert hardware.this_cpu().flags <= here.flags
    found = torch._C._cpu._get_cpu_capability()
    assert ("avx2" in here.flags) == bool(found.get("avx2"))
    assert here.avx512_bf16 == bool(found.get("avx512_bf16") and found.get("avx512_f")
                                    and found.get("avx512_bw") and found.get("avx512_vl")
                                    and found.get("avx512_dq"))


def test_a_cap_only_takes_features_away():
    flags, kind, here, model = _child_cpu("avx2").split("|")
    assert set(eval(flags)) <= {"avx2", "fma"} and here == "True" and "capped at avx2" in model
    assert kind in ("AVX2", "no AVX2")
    real = set(hardware._cpuid_flags())
    capped = set(eval(_child_cpu("avx512_bf16").split("|")[0]))
    assert capped <= real and not {"amx_tile", "amx_bf16"} & capped


def test_fbgemms_own_cap_takes_exact_int8_away():
    """FBGEMM_ENABLE_INSTRUCTIONS=AVX2 makes fbgemm run its AVX2 int8 kernels (which saturate):
    this machine's Cpu then has no VNNI, so int8 is refused as on an AVX2 CPU."""
    flags = set(eval(_child_cpu(None, FBGEMM_ENABLE_INSTRUCTIONS="AVX2").split("|")[0]))
    assert "avx512_vnni" not in flags
    assert flags == set(eval(_child_cpu(None).split("|")[0])) - {"avx512_vnni"}


def test_without_cpuinfo_nothing_is_assumed(monkeypatch, bundled_model):
    """No /proc/cpuinfo and no CPUID answer: no features, a name that says so, and the runtime
    picks float32 and SDPA (never an emulated bf16, never the kernel)."""
    def no_file(*args, **kwargs):
        raise FileNotFoundError("/proc/cpuinfo")

    monkeypatch.setattr("builtins.open", no_file)
    assert hardware._proc_flags() == frozenset()
    assert hardware._model_name()  # platform.processor() or "unknown CPU"
    monkeypatch.undo()
    bare = hardware.Cpu(frozenset(), "unknown CPU")
    assert bare.kind == "no AVX2" and not bare.fast_bf16 and not bare.onednn_bf16
    runtime = runtime_for(bundled_model, dtype="auto", cpu=bare)
    assert (runtime.dtype, runtime.attention) == ("float32", "sdpa")
