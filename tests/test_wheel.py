"""The wheel needs no compiler: `python -m build` makes a wheel with the attention kernel compiled
inside (x86-64, runtime dispatch), and embedpipe installed from it runs a job with no C++
compiler on PATH, using that library and compiling nothing. (A clean venv with the wheel and its
dependencies was checked by hand too: docs/, "Install"; here the wheel is installed with
--no-deps beside this venv's dependencies, to keep CI's time.)"""
from __future__ import annotations

import json
import platform
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from helpers import SMALL, write_job, write_shards
from pipeline.runtime import hardware

ROOT = Path(__file__).parents[1]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    proc = subprocess.run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "-o", str(out),
                           str(ROOT)], capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (path,) = out.glob("embedpipe-*.whl")
    return path


def test_the_wheel_carries_the_compiled_kernel(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    kernels = [n for n in names if n.startswith("pipeline/runtime/_attention_kernel") and n.endswith(".so")]
    if platform.machine().lower() in ("x86_64", "amd64"):
        assert len(kernels) == 1, names
        assert "linux_x86_64" in wheel.name
    else:
        assert not kernels


def test_installed_from_the_wheel_a_job_runs_without_a_compiler(wheel, tmp_path, movie_table):
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site),
                    str(wheel)], check=True, capture_output=True, timeout=600)
    rows = movie_table.slice(0, 200).select(["id", "text"])
    write_shards(tmp_path / "in", [rows])
    out = tmp_path / "out"
    job = write_job(tmp_path / "job.toml", tmp_path / "in", out,
                    model={**SMALL["model"], "dtype": "bfloat16" if hardware.this_cpu().fast_bf16
                           else "float32"})
    # PATH: an empty folder (no c++, no ninja; this venv's Python by its full path); torch's JIT
    # cache: a fresh folder that must stay empty; cwd: away from the checkout, so the wheel's
    # package is the one imported
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    env = {"PATH": str(bin_dir), "HOME": str(tmp_path), "PYTHONPATH": str(site),
           "TORCH_EXTENSIONS_DIR": str(tmp_path / "jit"), "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "-v", "run", str(job),
                           "--json"], capture_output=True, text=True, cwd=tmp_path, env=env,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout)
    assert summary["rows_read"] == summary["vectors_written"] == 200
    where = subprocess.run([sys.executable, "-c", "import pipeline; print(pipeline.__file__)"],
                           capture_output=True, text=True, cwd=tmp_path, env=env, check=True).stdout
    assert where.startswith(str(site))  # the installed package ran, not the checkout
    assert not (tmp_path / "jit").exists() or not any((tmp_path / "jit").iterdir())
    here = hardware.this_cpu()
    if here.avx512_bf16:
        assert f"embedpipe's attention kernel: {site}" in proc.stderr
        assert summary["attention"] in ("amx", "avx512")
    else:
        assert summary["attention"] == "sdpa"
