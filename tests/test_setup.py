"""``setup.py``: when the optional ``sn_fused._C`` is built, and what a build without it does.

A successful compile is what ``tests/run.sh`` itself does first (``.ci/env.sh``:
``SN_FUSED_BUILD_CPP=1 setup.py build_ext --inplace``, and ``test_cpp_read`` then requires the
extension to load). Here, each in a copy of the build's inputs (the checkout's ``_C`` is never
touched), the modes of ``SN_FUSED_BUILD_CPP`` where ``_C`` cannot be built:

* a compiler that passes torch's compiler check (``--version``) and fails every compile, as a
  broken toolchain does (~2 s: nothing compiles);
* an environment where torch does not import, as in pip's isolated build.

And ``python -m sn_fused.build_cpp``, which builds ``_C`` into such an install from the source
``build_py`` packs in it: one real compile (~1 min), a failing one, a package it cannot write.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from unittest import mock
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


# ``python -m sn_fused.build_cpp``: ``_C`` for an install built without it (pip's isolated build).

def _install_without_cpp(source_copy, site):
    """The package as a pure-Python install lays it out (``build_py``, what a wheel packs)."""
    env = {k: v for k, v in os.environ.items() if k != "SN_FUSED_BUILD_CPP"}
    result = subprocess.run([sys.executable, "setup.py", "-q", "build_py", "-d", str(site)], cwd=source_copy,
                            env={**env, "SN_FUSED_BUILD_CPP": "0"}, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    return site / "sn_fused"


def _build_cpp(site, compiler=None):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "SN_FUSED_CPP")}
    env["PYTHONPATH"] = str(site)
    if compiler is not None:
        env.update(CC=compiler, CXX=compiler)
    return subprocess.run([sys.executable, "-m", "sn_fused.build_cpp"], cwd=site.parent, env=env,
                          capture_output=True, text=True, timeout=600)


def test_install_carries_the_source_of_the_extension(source_copy, tmp_path):
    package = _install_without_cpp(source_copy, tmp_path / "site")
    assert (package / "csrc" / "spectral_norm_read.cpp").read_bytes() == \
        (ROOT / "csrc" / "spectral_norm_read.cpp").read_bytes()
    assert not (package / EXT).exists()


def _import_in_a_new_process(site):
    """``CPP_READS`` and ``_C``'s file as a user's process sees them, and its warnings."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "SN_FUSED_CPP")}
    env["PYTHONPATH"] = str(site)
    check = subprocess.run([sys.executable, "-c", "import sn_fused.ops.spectral_norm as s; "
                            "print(s.CPP_READS, s._cpp and s._cpp.__file__)"], cwd=site.parent, env=env,
                           capture_output=True, text=True, timeout=300)
    assert check.returncode == 0, check.stderr
    return check.stdout.split(), check.stderr


def test_build_cpp_builds_the_extension_into_an_install_without_it(source_copy, tmp_path):
    site = tmp_path / "site"
    package = _install_without_cpp(source_copy, site)
    # An _C that does not load (another torch's, say) is not used, and the warning says what to run.
    (package / EXT).write_bytes(b"an _C built for another torch")
    (cpp_reads, _), warned = _import_in_a_new_process(site)
    assert cpp_reads == "False"
    assert "the compiled read sn_fused._C does not load" in warned
    assert "rebuild it: python -m sn_fused.build_cpp" in warned
    result = _build_cpp(site)  # ~1 min: a real compile
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"sn_fused: built {package.resolve() / EXT}; new processes read layers through it" in result.stdout
    assert [p.name for p in package.iterdir() if p.name.startswith("_C")] == [EXT]  # (no partial copy left)
    loaded, warned = _import_in_a_new_process(site)
    assert loaded == ["True", str(package / EXT)]
    assert "sn_fused" not in warned


def test_build_cpp_fails_loudly(source_copy, tmp_path, failing_compiler):
    site = tmp_path / "site"
    package = _install_without_cpp(source_copy, site)
    result = _build_cpp(site, compiler=failing_compiler)
    assert result.returncode == 1
    assert "fake compiler: error: this compile fails" in result.stdout + result.stderr
    assert "sn_fused: building sn_fused._C failed: " in result.stderr
    assert [p.name for p in package.iterdir() if p.name.startswith("_C")] == []


def test_build_cpp_refuses_a_package_it_cannot_write(capsys):
    from sn_fused import build_cpp

    real_access = os.access

    def access(path, mode, *args, **kwargs):  # (torch's cpp_extension asks os.access too: nvcc's path)
        return False if path == build_cpp.PACKAGE_DIR else real_access(path, mode, *args, **kwargs)

    with mock.patch.object(build_cpp.os, "access", side_effect=access) as patched:
        assert build_cpp.main([]) == 1
    assert patched.call_args_list.count(mock.call(build_cpp.PACKAGE_DIR, os.W_OK)) == 1
    assert f"sn_fused: building sn_fused._C failed: cannot write {build_cpp.PACKAGE_DIR} (the installed " \
           "package)" in capsys.readouterr().err
