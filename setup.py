"""Compiled parts of reste; everything else is declared in pyproject.toml.

The extensions are plain C against the CPython API (no torch or numpy headers,
so build isolation needs nothing big). They are optional: if a build fails,
reste falls back to pure PyTorch code paths and says so once.
"""

import os
import shutil
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.command.build_py import build_py

# -g0: Python's CFLAGS add -g, 3.4 of _bitops' 3.8 MB; the code is the same without it (.text compared)
COMMON_FLAGS = ["-O3", "-std=gnu11", "-g0"]
# -ffast-math lets gcc vectorise log2f/exp2f with glibc's libmvec. Compile flag only: linking
# with it would switch the whole process to flush-denormals-to-zero. The kernels are written
# not to depend on what it relaxes (sign works on the bits; no NaN tests).
KERNEL_FLAGS = COMMON_FLAGS + ["-ffast-math"] if sys.platform != "win32" else ["/O2"]

EXTENSIONS = [
    Extension(
        "reste._kernels",
        sources=["src/reste/csrc/estimators.c"],
        extra_compile_args=KERNEL_FLAGS + (["-fopenmp"] if sys.platform != "win32" else []),
        extra_link_args=["-fopenmp", "-lmvec", "-lm"] if sys.platform != "win32" else [],
    ),
    # XNOR-popcount inference kernels of reste.deploy. No -ffast-math: the epilogue must round
    # like PyTorch (-ffp-contract=off keeps multiply-then-add two roundings). OpenMP threads run
    # on torch's own libgomp (same soname, loaded once); without OpenMP the build is retried serial.
    Extension(
        "reste.deploy._bitops",
        sources=["src/reste/deploy/csrc/bitops.c"],
        depends=sorted(str(p) for p in Path("src/reste/deploy/csrc").glob("*.h")),
        extra_compile_args=COMMON_FLAGS + ["-ffp-contract=off", "-fopenmp"]
        if sys.platform != "win32"
        else ["/O2", "/openmp"],
        extra_link_args=["-fopenmp", "-lm"] if sys.platform != "win32" else [],
    ),
]


class OptionalBuildExt(build_ext):
    """Build what compiles; a missing compiler must not make the install fail."""

    def build_extension(self, ext):
        try:
            try:
                super().build_extension(ext)
            except Exception:  # noqa: BLE001 - e.g. a compiler without OpenMP: build single-threaded
                if not any("openmp" in flag for flag in ext.extra_compile_args):
                    raise
                ext.extra_compile_args = [f for f in ext.extra_compile_args if "openmp" not in f]
                ext.extra_link_args = [f for f in ext.extra_link_args if "openmp" not in f]
                super().build_extension(ext)
        except Exception as err:  # noqa: BLE001 - any compiler failure
            if os.environ.get("RESTE_REQUIRE_EXT", "") not in ("", "0"):  # CI and packagers: no kernel-less wheel
                raise RuntimeError(f"could not build {ext.name} ({err}) and RESTE_REQUIRE_EXT is set") from err
            print(
                f"WARNING: could not build {ext.name} ({err}); reste will use its pure PyTorch path.", file=sys.stderr
            )


class BuildPyWithConfigs(build_py):
    """Ship the paper's configs/ inside the package (reste/configs): an installed reste then finds
    `reste train cifar10/resnet20_1w1a` by name (reste.train.config.find_config)."""

    def run(self):
        super().run()
        source = Path("configs")
        if not source.is_dir():
            return
        target = Path(self.build_lib) / "reste" / "configs"
        for path in sorted(source.rglob("*.yaml")):
            dest = target / path.relative_to(source)
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, dest)


setup(ext_modules=EXTENSIONS, cmdclass={"build_ext": OptionalBuildExt, "build_py": BuildPyWithConfigs})
