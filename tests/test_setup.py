"""``setup.py``: when the optional ``sn_fused._C`` is built, and what a build without it does.

A successful compile is what ``tests/run.sh`` itself does first (``.ci/env.sh``:
``SN_FUSED_BUILD_CPP=1 setup.py build_ext --inplace``, and ``test_cpp_read`` then requires the
extension to load). Here, each in a copy of the build's inputs (the checkout's ``_C`` is never
touched), the modes of ``SN_FUSED_BUILD_CPP`` where ``_C`` cannot be built:

* a compiler that passes torch's compiler check (``--version``) and fails every compile, as a
  broken toolchain does (~2 s: nothing compiles);
* an environment where torch does not import, as in pip's isolated build.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXT = "_C" + sysconfig.get_config_var("EXT_SUFFIX")  # the file name of sn_fused._C here
FAILING_COMPILER = """#!/bin/sh
# Answers torch's compiler check like the real one; fails every compile.
for arg in "$@"; do
  case "$arg" in --version|-dumpversion) exec {cxx} "$@" ;; esac
done
echo "fake compiler: error: this compile fails" >&2
exit 1
"""


@pytest.fixture
def source_copy(tmp_path):
    src_dir = tmp_path / "src"
    src_dir.mkdir()
    for name in ("setup.py", "pyproject.toml", "README.md", "MANIFEST.in", "csrc", "sn_fused"):
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, src_dir / name, ignore=shutil.ignore_patterns("*.so", "__pycache__"))
        else:
            shutil.copy(src, src_dir / name)
    return src_dir


@pytest.fixture
def failing_compiler(tmp_path):
    cxx = shutil.which("c++") or shutil.which("g++")
    if cxx is None:
        pytest.skip("no C++ compiler to imitate")
    path = tmp_path / "failing-c++"
    path.write_text(FAILING_COMPILER.format(cxx=cxx))
    path.chmod(0o755)
    return str(path)


def _build(cwd, mode, *, compiler=None, hide_torch=None, inplace=True):
    env = {k: v for k, v in os.environ.items() if k != "SN_FUSED_BUILD_CPP"}
    if mode is not None:
        env["SN_FUSED_BUILD_CPP"] = mode
    if compiler is not None:
        env.update(CC=compiler, CXX=compiler)
    if hide_torch is not None:  # a directory whose torch package fails to import, first on the path
        env["PYTHONPATH"] = str(hide_torch) + os.pathsep + env.get("PYTHONPATH", "")
    where = ["-b", "build_lib", "-t", "build_tmp"] + (["--inplace"] if inplace else [])
    return subprocess.run([sys.executable, "setup.py", "-q", "build_ext", *where], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture
def no_torch(tmp_path):
    d = tmp_path / "no_torch"
    (d / "torch").mkdir(parents=True)
    (d / "torch" / "__init__.py").write_text("raise ImportError('no torch in this build environment')\n")
    return d


def test_default_build_installs_without_the_extension_when_its_compile_fails(source_copy, failing_compiler):
    # An _C an earlier build left, in place and in the build directory a wheel packs: not this
    # source's, so it must go too (else the install would ship it as if just built).
    stale = [source_copy / "sn_fused" / EXT, source_copy / "build_lib" / "sn_fused" / EXT]
    for inplace in (True, False):
        for path in stale:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"an old build")
        result = _build(source_copy, None, compiler=failing_compiler, inplace=inplace)
        assert result.returncode == 0, result.stdout + result.stderr
        assert "sn_fused: building without sn_fused._C (the C++ eager read): its compile failed" in result.stderr
        assert [p for p in stale if p.exists()] == []


def test_required_build_fails_loudly(source_copy, failing_compiler):
    result = _build(source_copy, "1", compiler=failing_compiler)
    assert result.returncode != 0
    assert "fake compiler: error: this compile fails" in result.stdout + result.stderr
    assert "building without" not in result.stderr
    assert not (source_copy / "sn_fused" / EXT).exists()


def test_default_build_without_torch_installs_the_python_package(source_copy, no_torch):
    result = _build(source_copy, None, hide_torch=no_torch)
    assert result.returncode == 0, result.stdout + result.stderr
    assert ("sn_fused: building without sn_fused._C (the C++ eager read): torch does not import here "
            "(no torch in this build environment)") in result.stderr
    assert not (source_copy / "sn_fused" / EXT).exists()


def test_required_build_without_torch_says_how(source_copy, no_torch):
    result = _build(source_copy, "1", hide_torch=no_torch)
    assert result.returncode != 0
    assert "SN_FUSED_BUILD_CPP=1 builds sn_fused._C against the installed torch, which this build " \
           "environment cannot import (no torch in this build environment): use pip's --no-build-isolation" \
           in result.stderr


def test_build_switched_off_compiles_nothing(source_copy, failing_compiler):
    result = _build(source_copy, "0", compiler=failing_compiler)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "sn_fused:" not in result.stderr  # off on purpose: nothing to explain
    assert not (source_copy / "sn_fused" / EXT).exists()


def test_unknown_mode_is_refused(source_copy):
    result = _build(source_copy, "yes")
    assert result.returncode != 0
    assert "SN_FUSED_BUILD_CPP must be 0, 1 or unset, got 'yes'" in result.stderr
