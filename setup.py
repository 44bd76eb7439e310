"""The attention kernel compiled into the wheel (pipeline/runtime/_attention_kernel*.so), so that
an installed embedpipe needs no compiler. Everything else about the package is in pyproject.toml.

The library is built for baseline x86-64 with runtime dispatch: each instruction set's code is
its own file, compiled for it by a `#pragma GCC target` (pipeline/runtime/csrc/), and the ops
check the CPU before calling it (pipeline/runtime/cpu_attention.py). On other machines (Arm,
macOS on Apple silicon) nothing is compiled and embedpipe runs without the kernel.
"""
import platform

from setuptools import setup

CSRC = "pipeline/runtime/csrc"


def kernel_extension():
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return [], {}
    from torch.utils.cpp_extension import BuildExtension, CppExtension

    extension = CppExtension(
        "pipeline.runtime._attention_kernel",
        sources=[f"{CSRC}/attention_op.cpp", f"{CSRC}/attention_avx512.cpp",
                 f"{CSRC}/attention_amx.cpp"],
        include_dirs=[CSRC], extra_compile_args=["-O3", "-g0", "-fopenmp"],
        extra_link_args=["-fopenmp", "-s"])
    return [extension], {"build_ext": BuildExtension.with_options(use_ninja=False)}


ext_modules, cmdclass = kernel_extension()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
