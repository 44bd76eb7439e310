"""The attention kernel's library never runs an instruction the CPU lacks: it loads in a child
process on any x86-64 CPU, each op either computes (its ISA is there) or refuses in words, and
the process exits normally. Where QEMU's user-mode emulator is installed (Debian: qemu-user;
.ci/run installs it), the same child also runs on an emulated AVX2-only CPU (AMD EPYC Milan, Zen
3: no AVX-512, no bf16), so an AVX-512 or AMX machine checks the AVX2 case too. And the built
library's disassembly shows AVX-512 and AMX instructions only in the ISA files' own functions."""
from __future__ import annotations

import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.runtime import cpu_attention, hardware

x86_only = pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"),
                              reason="the kernel is x86-64 code; elsewhere nothing is built")

# Loads the library whatever the CPU, calls both ops, prints one line per op.
CHILD = """
import torch
from pipeline.runtime import cpu_attention
cpu_attention.load_library()
q = torch.randn(2, 3, 20, 32).to(torch.bfloat16)
keep = torch.ones(2, 20, dtype=torch.bool)
want = torch.nn.functional.scaled_dot_product_attention(q.float(), q.float(), q.float()).transpose(1, 2)
for kind in cpu_attention.KINDS:
    try:
        out = cpu_attention.op(kind)(q, q, q, keep, 32 ** -0.5)
    except RuntimeError as exc:
        print(kind, "refused:", str(exc).splitlines()[0])
    else:
        print(kind, "ran, max error", float((out.float() - want).abs().max()))
"""


def _run_child(prefix: list[str], timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([*prefix, sys.executable, "-c", CHILD], capture_output=True, text=True,
                          timeout=timeout, cwd=Path(__file__).parents[2])


@pytest.fixture(scope="module")
def library() -> Path:
    """Built (or found prebuilt) in a child first, so a crash there is a failed test, not a dead
    test session; then its path."""
    proc = _run_child([], timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return cpu_attention.load_library()


def _outcomes(stdout: str) -> dict[str, str]:
    return {line.split()[0]: line for line in stdout.splitlines() if line.split()[:1] in (["amx"], ["avx512"])}


@x86_only
def test_the_library_loads_on_this_cpu_and_each_op_runs_or_refuses(library):
    proc = _run_child([], timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]  # a SIGILL would be -4
    outcomes = _outcomes(proc.stdout)
    here = hardware.Cpu(hardware._cpuid_flags())  # the ops ask the CPU itself, not a cap
    for kind, present in (("amx", here.amx_bf16), ("avx512", here.avx512_bf16)):
        if present:
            assert "ran" in outcomes[kind] and float(outcomes[kind].split()[-1]) < 0.05, outcomes
        else:
            assert "refused" in outcomes[kind] and "this CPU has no" in outcomes[kind], outcomes


@x86_only
@pytest.mark.skipif(shutil.which("qemu-x86_64") is None,
                    reason="qemu-x86_64 (Debian: qemu-user) is not installed to emulate an AVX2 CPU")
def test_the_library_loads_on_an_emulated_avx2_cpu(library):
    """AMD EPYC Milan as QEMU emulates it: AVX2 and FMA, no AVX-512, no bf16, no AMX. The old
    kernel, compiled whole with -mavx512*, died here with SIGILL while loading."""
    proc = _run_child(["qemu-x86_64", "-cpu", "EPYC-Milan"], timeout=900)
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-2000:])
    outcomes = _outcomes(proc.stdout)
    assert "this CPU has no AMX" in outcomes["amx"], proc.stdout
    assert "this CPU has no AVX-512 BF16" in outcomes["avx512"], proc.stdout


ISA_INSTRUCTION = re.compile(r"%zmm|%k[1-7]\b|%tmm|\btile|vdpbf16ps|vcvtne2?ps2bf16")
ISA_FUNCTION = re.compile(r"^(void |bool |[\w:]+ )?embedpipe::(avx512|amx)::")


@x86_only
@pytest.mark.skipif(shutil.which("objdump") is None, reason="objdump (binutils) is not installed")
def test_only_the_isa_files_functions_hold_avx512_or_amx_instructions(library):
    """The ops' file is baseline x86-64; an inline function (an STL or torch template) that an
    ISA file had compiled with AVX-512 and the linker shared with baseline code would show up
    here as a function outside the ISA namespaces."""
    text = subprocess.run(["objdump", "-d", "-C", "--no-show-raw-insn", str(library)],
                          capture_output=True, text=True, check=True).stdout
    holders, function = set(), None
    for line in text.splitlines():
        head = re.match(r"^[0-9a-f]+ <(.*)>:$", line)
        if head:
            function = head.group(1)
        elif function and ISA_INSTRUCTION.search(line):
            holders.add(function)
    assert any("embedpipe::avx512::" in f for f in holders)  # the check sees the ISA code at all
    strays = sorted(f for f in holders if not ISA_FUNCTION.search(f))
    assert not strays, strays


def test_a_cpu_without_either_kind_loads_nothing(monkeypatch, caplog):
    """Not even a compile: the reason is logged once, and each later call raises it again."""
    monkeypatch.setattr(hardware, "this_cpu", lambda: hardware.cpu_with("avx2", "fma", model="Zen 3"))
    monkeypatch.setattr(cpu_attention, "_LOADED", {})
    monkeypatch.setattr(cpu_attention, "load_library", lambda: pytest.fail("loaded anyway"))
    with caplog.at_level("INFO", logger="pipeline.runtime.cpu_attention"):
        for _ in range(2):
            with pytest.raises(RuntimeError, match="neither AMX nor AVX-512 BF16"):
                cpu_attention.build()
    assert len([r for r in caplog.records if "neither" in r.getMessage()]) == 1
