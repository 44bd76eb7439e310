"""The pgvector the sink tests load runs on every x86-64 CPU (an AVX2-only AMD Zen 3 among
them): its machine code goes beyond baseline x86-64 (SSE2) only in the functions that pgvector
picks at run time after asking the CPU (gcc's target_clones `.fma` / `.popcnt`, chosen by their
resolvers; `*F16c` and `*Avx512Popcount`, chosen by pgvector's cpuid checks); a build with
-march=native has AVX-512 in its plain distance functions and dies with SIGILL elsewhere. And
every distance pgvector computes, at dimensions that take its vector loops, equals numpy's."""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.sinks

# Functions pgvector runs only where the CPU has what they use.
DISPATCHED = re.compile(r".*\.(fma|popcnt)|.*(F16c|Avx512Popcount)")
# Beyond baseline x86-64: AVX/AVX-512 registers, VEX/EVEX-encoded instructions (v...), AVX-512
# mask registers, and the SSE3..SSE4.2, POPCNT, LZCNT, BMI and MOVBE instructions gcc emits.
WIDE_REG = re.compile(r"%[yz]mm\d+|%k[0-7]\b")
LATER_OPS = re.compile(
    r"v(?!err|erw)[a-z0-9]+|(popcnt|lzcnt|tzcnt|andn|bextr|bls(i|r|msk)|bzhi|pdep|pext|rorx|"
    r"sarx|shlx|shrx|movbe|crc32[bwl]?)[wlq]?|pshufb|palignr|ph(add|sub)[dsw]+|pmaddubsw|pmulhrsw|"
    r"psign[bwd]|pabs[bwd]|pmulld|pmuldq|pmin[su][bdw]|pmax[su][bdw]|pblend(w|vb)|blendv?p[sd]|"
    r"ptest|round[ps][sd]|dpp[sd]|insertps|extractps|pextr[bdq]|pinsr[bdq]|pmov[sz]x[bwd][wdq]|"
    r"pcmp(eq|gt)q|pcmp[ei]str[im]|packusdw|mpsadbw|phminposuw|movntdqa|h(add|sub)p[sd]|"
    r"addsubp[sd]|movddup|movs[hl]dup|lddqu")
HEADER = re.compile(r"^[0-9a-f]+ <(.+)>:$")


def beyond_baseline(library: Path) -> dict[str, set[str]]:
    """Per function of `library`, the instructions and registers it uses beyond x86-64."""
    listing = subprocess.run(["objdump", "-d", "--no-show-raw-insn", str(library)],
                             capture_output=True, text=True, check=True).stdout
    found: dict[str, set[str]] = {}
    function = None
    for line in listing.splitlines():
        header = HEADER.match(line)
        if header:
            function = header.group(1)
            continue
        parts = line.split("\t")
        if function is None or len(parts) < 2 or not parts[1].strip():
            continue
        fields = parts[1].split(None, 1)
        mnemonic = fields[0]
        if mnemonic in ("rep", "repz", "repnz", "lock", "notrack", "bnd") and len(fields) > 1:
            fields = fields[1].split(None, 1)
            mnemonic = fields[0]
        operands = fields[1] if len(fields) > 1 else ""
        hits = set(WIDE_REG.findall(operands))
        if LATER_OPS.fullmatch(mnemonic):
            hits.add(mnemonic)
        if hits:
            found.setdefault(function, set()).update(hits)
    return found


needs_objdump = pytest.mark.skipif(shutil.which("objdump") is None,
                                   reason="objdump is not installed (binutils)")


@needs_objdump
@pytest.mark.skipif(shutil.which("gcc") is None, reason="gcc is not installed")
def test_the_check_finds_avx512_and_avx2_in_a_library_built_for_them(tmp_path):
    source = tmp_path / "dist.c"
    source.write_text("float l2(const float *a, const float *b, int n) {\n"
                      "  float s = 0; for (int i = 0; i < n; i++) { float d = a[i] - b[i];"
                      " s += d * d; } return s; }\n")
    found = {}
    for flags in ("-march=x86-64", "-march=x86-64-v3", "-march=x86-64-v4"):
        library = tmp_path / f"lib{flags[7:]}.so"
        subprocess.run(["gcc", "-O3", "-ffast-math", "-shared", "-fPIC", flags, "-o",
                        str(library), str(source)], check=True)
        found[flags] = beyond_baseline(library).get("l2", set())
    assert found["-march=x86-64"] == set()
    assert any(r.startswith("%ymm") for r in found["-march=x86-64-v3"])
    assert not any(r.startswith("%zmm") for r in found["-march=x86-64-v3"])
    assert any(r.startswith("%zmm") for r in found["-march=x86-64-v4"])


@needs_objdump
def test_the_loaded_pgvector_goes_beyond_x86_64_only_where_it_dispatches(pg_install):
    found = beyond_baseline(pg_install.vector_so)
    plain = {f: sorted(ops) for f, ops in found.items() if not DISPATCHED.fullmatch(f)}
    assert plain == {}, f"{pg_install.vector_so} was not built for baseline x86-64: {plain}"
    zmm = {f for f, ops in found.items() if any(op.startswith("%zmm") for op in ops)}
    assert all("Avx512" in f for f in zmm), zmm
    # the default versions the dispatch falls back to are there, clean
    symbols = subprocess.run(["objdump", "-t", str(pg_install.vector_so)], capture_output=True,
                             text=True, check=True).stdout
    for default in ("VectorL2SquaredDistance.default", "VectorInnerProduct.default",
                    "HalfvecL2SquaredDistanceDefault", "BitHammingDistanceDefault.default"):
        assert re.search(rf"\s{re.escape(default)}$", symbols, re.M), default
        assert default not in found


def _literal(v: np.ndarray) -> str:
    return "[" + ",".join(repr(float(x)) for x in v) + "]"


@pytest.mark.parametrize("dim", [3, 16, 384])
def test_every_distance_equals_numpy(pg_dsn, dim):
    """On this CPU each dispatched function runs: the server must answer, and answer right."""
    import psycopg
    rng = np.random.default_rng(dim)
    a = rng.standard_normal(dim).astype(np.float32)
    b = rng.standard_normal(dim).astype(np.float32)
    bits_a, bits_b = rng.integers(0, 2, dim * 8), rng.integers(0, 2, dim * 8)
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        for kind, x, y in (("vector", a, b),
                           ("halfvec", a.astype(np.float16), b.astype(np.float16))):
            x64, y64 = x.astype(np.float64), y.astype(np.float64)
            got = conn.execute(
                f"SELECT %s::{kind} <-> %s::{kind}, %s::{kind} <#> %s::{kind}, "
                f"%s::{kind} <=> %s::{kind}, %s::{kind} <+> %s::{kind}",
                [_literal(x), _literal(y)] * 4).fetchone()
            want = (np.linalg.norm(x64 - y64), -(x64 @ y64),
                    1 - x64 @ y64 / (np.linalg.norm(x64) * np.linalg.norm(y64)),
                    np.abs(x64 - y64).sum())
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4, err_msg=kind)
        sa, sb = "".join(map(str, bits_a)), "".join(map(str, bits_b))
        n = dim * 8
        hamming, jaccard = conn.execute(f"SELECT %s::bit({n}) <~> %s::bit({n}), "
                                        f"%s::bit({n}) <%%> %s::bit({n})", [sa, sb] * 2).fetchone()
        both = np.sum(bits_a & bits_b)
        assert hamming == np.sum(bits_a != bits_b)
        assert jaccard == pytest.approx(1 - both / np.sum(bits_a | bits_b))


# CPUs that qemu's user-mode emulator pretends to be (it implements no AVX-512 at all).
EMULATED = {"EPYC-Milan-v1": "AMD Zen 3: AVX2, FMA, F16C, no AVX-512", "Nehalem": "no AVX"}
needs_qemu = pytest.mark.skipif(shutil.which("qemu-x86_64") is None,
                                reason="qemu-x86_64 is not installed (Debian's qemu-user)")


@needs_qemu
@pytest.mark.skipif(shutil.which("gcc") is None, reason="gcc is not installed")
@pytest.mark.parametrize("cpu", sorted(EMULATED))
def test_the_emulated_cpu_refuses_avx512(tmp_path, cpu):
    """Else the test below would prove nothing."""
    source = tmp_path / "zmm.c"
    source.write_text('int main(void) { __asm__ volatile("vpxord %zmm1, %zmm1, %zmm1"); '
                      "return 0; }\n")
    subprocess.run(["gcc", "-o", str(tmp_path / "zmm"), str(source)], check=True)
    run = subprocess.run(["qemu-x86_64", "-cpu", cpu, str(tmp_path / "zmm")], capture_output=True)
    assert run.returncode == -4, run  # SIGILL


@needs_qemu
@pytest.mark.parametrize("cpu", sorted(EMULATED))
def test_pgvector_answers_on_a_cpu_without_avx512(pg_install, cpu):
    """The server's own binaries and vector.so, one single-user backend under the emulator."""
    from pg_server import new_cluster, server_user
    rng = np.random.default_rng(7)
    queries, want = [], {}
    for dim in (16, 384):
        a, b = (rng.standard_normal(dim).astype(np.float32) for _ in range(2))
        for kind, x, y in (("vector", a, b),
                           ("halfvec", a.astype(np.float16), b.astype(np.float16))):
            x64, y64 = x.astype(np.float64), y.astype(np.float64)
            for op, value in (("<->", np.linalg.norm(x64 - y64)), ("<#>", -(x64 @ y64)),
                              ("<=>", 1 - x64 @ y64 / (np.linalg.norm(x64) * np.linalg.norm(y64))),
                              ("<+>", np.abs(x64 - y64).sum())):
                name = f"q{len(want)}"
                queries.append(f"SELECT '{_literal(x)}'::{kind} {op} '{_literal(y)}'::{kind} "
                               f"AS {name};")
                want[name] = value
    # An HNSW index built and searched: its graph is made with the same distance functions.
    queries += ["CREATE TABLE t (id int, v vector(16));",
                "INSERT INTO t SELECT i, (SELECT array_agg(sin(i * 16 + j))::vector(16) "
                "FROM generate_series(1, 16) j) FROM generate_series(1, 300) i;",
                "CREATE INDEX ON t USING hnsw (v vector_l2_ops);",
                "SET enable_seqscan = off; SET jit = off;",
                "SELECT id AS hnsw FROM t ORDER BY v <-> (SELECT v FROM t WHERE id = 42) LIMIT 1;"]
    user = server_user()
    root, data = new_cluster(pg_install, user)
    try:
        run = subprocess.run(
            ["qemu-x86_64", "-cpu", cpu, str(pg_install.bin / "postgres"), "--single",
             "-D", str(data), "postgres"],
            input="CREATE EXTENSION vector;\n" + "\n".join(queries) + "\n",
            capture_output=True, text=True, user=user, timeout=300)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    assert run.returncode == 0, (f"{cpu} ({EMULATED[cpu]}): exit {run.returncode}\n"
                                 f"{run.stderr[-2000:]}")
    got = dict(re.findall(r'\d+: (q\d+|hnsw) = "([^"]*)"', run.stdout))
    assert got.pop("hnsw", None) == "42", run.stdout[-2000:]
    assert set(got) == set(want), run.stdout[-2000:]
    for name, value in want.items():
        assert float(got[name]) == pytest.approx(value, rel=1e-4, abs=1e-4), name
