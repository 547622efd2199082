"""``setup.py``: when the optional ``sn_fused._C`` is built, and what a build without it says.

A successful compile is what ``tests/run.sh`` itself does first (``.ci/env.sh``:
``SN_FUSED_BUILD_CPP=1 setup.py build_ext --inplace``, and ``test_cpp_read`` then requires the
extension to load). Here: the three modes of ``SN_FUSED_BUILD_CPP`` where the compile cannot
work (a compiler that fails at once), each in a copy of the build's inputs, so the checkout's
``_C`` is never touched.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def source_copy(tmp_path):
    for name in ("setup.py", "pyproject.toml", "README.md", "MANIFEST.in", "csrc", "sn_fused"):
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, tmp_path / name, ignore=shutil.ignore_patterns("*.so", "__pycache__"))
        else:
            shutil.copy(src, tmp_path / name)
    return tmp_path


def _build(cwd, mode):
    env = {k: v for k, v in os.environ.items() if k != "SN_FUSED_BUILD_CPP"}
    if mode is not None:
        env["SN_FUSED_BUILD_CPP"] = mode
    env.update(CC="false", CXX="false")  # a compiler that fails at once: the build's error path, in ~2 s
    return subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def _built(cwd):
    return sorted(p.name for p in (cwd / "sn_fused").glob("_C*"))


def test_default_build_installs_without_the_extension_when_its_compile_fails(source_copy):
    result = _build(source_copy, None)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "sn_fused: building without sn_fused._C (the C++ eager read): its compile failed" in result.stderr
    assert _built(source_copy) == []


def test_required_build_fails_loudly(source_copy):
    result = _build(source_copy, "1")
    assert result.returncode != 0
    assert "building without" not in result.stderr
    assert _built(source_copy) == []


def test_build_switched_off_compiles_nothing(source_copy):
    result = _build(source_copy, "0")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "sn_fused:" not in result.stderr  # off on purpose: nothing to explain
    assert _built(source_copy) == []


def test_unknown_mode_is_refused(source_copy):
    result = _build(source_copy, "yes")
    assert result.returncode != 0
    assert "SN_FUSED_BUILD_CPP must be 0, 1 or unset, got 'yes'" in result.stderr
