"""What the wheel and the sdist carry (setup.py, MANIFEST.in), built from a copy of this tree so the
repository gains no build folders: the paper's configs inside the package, and an sdist whose tests
run (their fixtures, the C harness, the configs and benchmarks they read)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SKIP = shutil.ignore_patterns(".*", "*.so", "__pycache__", "build", "*.egg-info", "runs", "data")


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    if not (ROOT / "setup.py").is_file():
        pytest.skip("needs the source tree (setup.py)")
    copy = tmp_path_factory.mktemp("pkg") / "reste"
    shutil.copytree(ROOT, copy, ignore=SKIP)
    return copy


def setup_py(tree, *args):
    proc = subprocess.run([sys.executable, "setup.py", "-q", *args], cwd=tree, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_the_wheel_ships_every_config_inside_the_package(tree, tmp_path):
    setup_py(tree, "build_py", "--build-lib", str(tmp_path))
    shipped = sorted(
        p.relative_to(tmp_path / "reste" / "configs") for p in (tmp_path / "reste/configs").rglob("*.yaml")
    )
    assert shipped == sorted(p.relative_to(ROOT / "configs") for p in (ROOT / "configs").rglob("*.yaml"))
    assert len(shipped) > 40 and Path("cifar10/resnet20_1w1a.yaml") in shipped
    # the PEP 561 marker: users' type checkers read reste's (mypy-checked) annotations
    assert (tmp_path / "reste" / "py.typed").is_file()


def test_the_sdist_has_what_its_tests_and_make_need(tree, tmp_path):
    proc = subprocess.run(
        [sys.executable, "setup.py", "sdist", "--dist-dir", str(tmp_path)], cwd=tree, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "no files found matching" not in proc.stdout + proc.stderr  # MANIFEST.in names only what exists
    (archive,) = tmp_path.glob("reste-*.tar.gz")
    with tarfile.open(archive) as tar:
        names = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    wanted = {
        "Makefile",
        "tests/data_fixtures.py",
        "tests/deploy_helpers.py",
        "tests/csrc/kernel_harness.c",
        "configs/cifar10/resnet20_1w1a.yaml",
        "benchmarks/bench_infer.py",
        "docs/data.md",
        "src/reste/csrc/estimators.c",
        "src/reste/py.typed",
        "LICENSE",
    }
    assert wanted <= names, sorted(wanted - names)
    # the development machines' benchmark results stay in the repository (most of the sdist's size)
    assert not [n for n in names if n.startswith("benchmarks/results/")]
    assert {p.relative_to(ROOT).as_posix() for p in (ROOT / "tests").glob("test_*.py")} <= names


def test_a_failed_kernel_build_fails_the_install_only_when_asked(tree, tmp_path):
    """No compiler: the build succeeds without kernels (reste falls back, and says so), unless
    RESTE_REQUIRE_EXT=1 asks for a failure instead (CI, packagers: no kernel-less wheel)."""
    import os

    env = dict(os.environ, CC="/bin/false", LDSHARED="/bin/false")
    env.pop("RESTE_REQUIRE_EXT", None)  # .ci/run sets it for its own install
    build = ["build_ext", "--build-lib", str(tmp_path / "lib"), "--build-temp", str(tmp_path / "tmp")]
    lenient = subprocess.run(
        [sys.executable, "setup.py", "-q", *build], cwd=tree, env=env, capture_output=True, text=True
    )
    assert lenient.returncode == 0, lenient.stderr[-2000:]
    assert "WARNING: could not build reste._kernels" in lenient.stderr
    assert not list((tmp_path / "lib").rglob("*.so"))
    strict = subprocess.run(
        [sys.executable, "setup.py", "-q", *build],
        cwd=tree,
        env=dict(env, RESTE_REQUIRE_EXT="1"),
        capture_output=True,
        text=True,
    )
    assert strict.returncode != 0 and "RESTE_REQUIRE_EXT is set" in strict.stderr
