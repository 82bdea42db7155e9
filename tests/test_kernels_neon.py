"""Bit-exactness of the deploy kernels through the plain-C harness tests/csrc/kernel_harness.c.

The harness runs random convolutions and packings through every kernel path the CPU supports
and compares each with the portable kernel byte for byte (and the portable kernel with direct
per-tap sums). Built natively, it checks this machine's paths (AVX-512, AVX2, ...); cross-compiled
for aarch64 and run under qemu user-mode emulation, it checks the NEON kernel, which no machine
here runs natively. Emulation checks exactness only, not speed.
"""

import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HARNESS = ROOT / "tests" / "csrc" / "kernel_harness.c"
CSRC = ROOT / "src" / "reste" / "deploy" / "csrc"
# The flags setup.py builds reste.deploy._bitops with: -ffp-contract=off keeps the epilogue's
# multiply-then-add two roundings (aarch64 gcc would otherwise fuse them in the portable kernel).
# The native build, a cheap extra (the Python tests run every native path against PyTorch too),
# takes -O2: its AVX-512 code makes -O3 compile ~50% longer. The NEON build takes -O2 in the
# default suite and -O3, the optimisation it ships with, in the slow one: since the kernels'
# widths became compile-time constants, -O3 cross-compiles in ~45 s of CPU against ~9 s.
FLAGS = ["-std=gnu11", "-ffp-contract=off", "-Wall", "-Wno-unknown-pragmas"]
NATIVE_CASES = "600"  # random cases on top of the harness's ~180 fixed ones: ~1 s natively
EMULATED_CASES = "400"  # ~4 s under qemu
# libc6-dev-arm64-cross is only a Recommends of the compiler: name it for --no-install-recommends
CROSS_PACKAGES = "gcc-aarch64-linux-gnu libc6-dev-arm64-cross qemu-user"


def _build_and_run(compiler, out, runner, cases, extra_flags=()):
    build = subprocess.run(
        [compiler, *FLAGS, *extra_flags, f"-I{CSRC}", str(HARNESS), "-o", str(out), "-lm"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert build.returncode == 0, f"building the harness with {compiler} failed:\n{build.stderr}"
    run = subprocess.run([*runner, str(out), cases, "12345"], capture_output=True, text=True, timeout=300)
    report = f"{run.stdout}\n{run.stderr}"
    assert run.returncode == 0, f"kernel harness (exit {run.returncode}):\n{report}"
    assert "OK: bit-exact" in run.stdout, report
    return run.stdout


def test_native_paths_bit_exact(tmp_path):
    compiler = (
        shutil.which((sysconfig.get_config_var("CC") or "cc").split()[0]) or shutil.which("gcc") or shutil.which("cc")
    )
    if compiler is None:
        pytest.skip("no C compiler found (install gcc)")
    _build_and_run(compiler, tmp_path / "kernel_harness", [], NATIVE_CASES, ["-O2"])


@pytest.mark.parametrize("opt", ["-O2", pytest.param("-O3", marks=pytest.mark.slow)])
def test_neon_bit_exact_under_qemu(tmp_path, opt):
    cross = shutil.which("aarch64-linux-gnu-gcc")
    qemu = shutil.which("qemu-aarch64") or shutil.which("qemu-aarch64-static")
    missing = [name for name, found in (("aarch64-linux-gnu-gcc", cross), ("qemu-aarch64", qemu)) if not found]
    if missing:
        pytest.skip(
            f"{' and '.join(missing)} not found: to test the NEON kernel, install the Debian packages "
            f"{CROSS_PACKAGES} (apt-get install {CROSS_PACKAGES})"
        )
    probe = tmp_path / "probe.c"
    probe.write_text("#include <stdio.h>\nint main(void) { return 0; }\n")
    if subprocess.run([cross, "-static", str(probe), "-o", str(tmp_path / "probe")], capture_output=True).returncode:
        pytest.skip(
            f"aarch64-linux-gnu-gcc cannot build a static C program (no aarch64 C library): install the Debian "
            f"package libc6-dev-arm64-cross (apt-get install {CROSS_PACKAGES})"
        )
    # static: qemu then needs no aarch64 libc or loader on this machine
    stdout = _build_and_run(cross, tmp_path / "kernel_harness_aarch64", [qemu], EMULATED_CASES, [opt, "-static"])
    assert "paths compared with the portable kernel: neon" in stdout, stdout
