"""Build ``sn_fused._C``, the C++ eager read (``csrc/``), for an install that lacks it.

::

    python -m sn_fused.build_cpp [--verbose]

A torch C++ extension must be compiled against the torch it runs with, and pip's isolated
build (a plain ``pip install .``, or an install from an index's source archive) has no torch
to compile against: such an install reads layers through the Python path, 20-30 us more
host time per eager read on an H100's host (``csrc/README.md``). This command compiles
``_C`` against the torch this Python imports, from the source the package carries
(``sn_fused/csrc/``, which ``setup.py`` packs; in a checkout, ``csrc/``), into the
installed package's directory -- where ``pip install --no-build-isolation .`` would have put
it -- and then checks in a new process that ``import sn_fused`` loads it. Processes started
afterwards read layers through it; one already running keeps the path it imported with.

It needs a C++ compiler, not a CUDA toolkit (``_C`` launches through sn_fused's Python
runners). Run it again after changing torch: an ``_C`` built for another torch is not
used (``import sn_fused`` warns and reads through the Python path). pip does not know of the
file (it is not in the install's RECORD): ``pip uninstall sn_fused`` leaves it, and the
directory, behind.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

__all__ = ["build", "source_path"]

PACKAGE_DIR = Path(__file__).resolve().parent
_SOURCE = "spectral_norm_read.cpp"


def source_path() -> Path:
    """``_C``'s C++ source: the copy an installed package carries, else a checkout's."""
    for path in (PACKAGE_DIR / "csrc" / _SOURCE, PACKAGE_DIR.parent / "csrc" / _SOURCE):
        if path.is_file():
            return path
    raise FileNotFoundError(f"no {_SOURCE} in {PACKAGE_DIR / 'csrc'} (an install packs it there) "
                            f"nor in {PACKAGE_DIR.parent / 'csrc'} (a checkout)")


def build(verbose: bool = False) -> Path:
    """Compile ``sn_fused._C`` into the package's directory; returns the extension's path.

    The same extension as ``setup.py``'s (torch's ``CppExtension`` with ``-O2``), compiled in a
    temporary directory and moved into place. Raises ``RuntimeError`` where the directory is not writable
    (before compiling) and whatever the build raises where the compile fails.
    """
    from setuptools import Distribution
    from torch.utils.cpp_extension import BuildExtension, CppExtension

    source = source_path()
    if not os.access(PACKAGE_DIR, os.W_OK):
        raise RuntimeError(f"cannot write {PACKAGE_DIR} (the installed package): run this as its "
                           f"owner, or reinstall with `pip install --no-build-isolation`, which builds _C")
    target = PACKAGE_DIR / ("_C" + sysconfig.get_config_var("EXT_SUFFIX"))
    with tempfile.TemporaryDirectory(prefix="sn_fused-build_cpp-") as tmp:
        dist = Distribution({
            "name": "sn_fused",
            "ext_modules": [CppExtension("sn_fused._C", [str(source)], extra_compile_args=["-O2"])],
            "cmdclass": {"build_ext": BuildExtension},
        })
        dist.verbose = int(verbose)
        command = dist.get_command_obj("build_ext")
        command.build_lib = os.path.join(tmp, "lib")
        command.build_temp = os.path.join(tmp, "temp")
        dist.run_command("build_ext")
        # Copied next to the target, then renamed over it (one file system): an _C already
        # there is replaced whole or not at all.
        partial = target.with_name(target.name + ".partial")
        shutil.copyfile(os.path.join(command.build_lib, "sn_fused", target.name), partial)
        os.replace(partial, target)
    return target


def _loads_in_a_new_process() -> subprocess.CompletedProcess:
    """What ``import sn_fused`` in a new process makes of the extension (this process may hold
    the package's first import, without ``_C`` or with an older one)."""
    check = ("import sn_fused.ops.spectral_norm as s; "
             "import os; print(os.path.realpath(s._cpp.__file__) if s._cpp is not None else 'not loaded')")
    env = {k: v for k, v in os.environ.items() if k != "SN_FUSED_CPP"}
    # (run from the directory that holds this package, which ``-c`` puts first on the path)
    return subprocess.run([sys.executable, "-c", check], cwd=PACKAGE_DIR.parent, env=env,
                          capture_output=True, text=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sn_fused.build_cpp", description=__doc__.split("\n\n")[0])
    parser.add_argument("--verbose", action="store_true", help="print the build's commands")
    args = parser.parse_args(argv)
    try:
        target = build(verbose=args.verbose)
    except Exception as error:  # the compiler's own errors are above (distutils' or ninja's output)
        print(f"sn_fused: building sn_fused._C failed: {error}", file=sys.stderr)
        return 1
    loaded = _loads_in_a_new_process()
    if loaded.returncode != 0 or loaded.stdout.strip() != str(target):
        print(f"sn_fused: built {target}, but a new process does not load it:\n"
              f"{loaded.stdout}{loaded.stderr}", file=sys.stderr)
        return 1
    print(f"sn_fused: built {target}; new processes read layers through it "
          f"(sn_fused.ops.spectral_norm.CPP_READS)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
