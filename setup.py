"""Optional compiled part of sn_fused: ``sn_fused._C``, the eager read in C++ (``csrc/``).

Every kernel is Triton, compiled at run time, and the layer works without ``_C``: it then
reads through its Python ``autograd.Function``, ~9-15 us more host time per read on the
CPUs measured, 20-30 us on an H100's host, where eager reads are 7.0-8.6x PyTorch's with
it and 4.4-5.5x without (bench/NOTES.md v13-v15).

A torch C++ extension must be built against the torch it will run with, so ``_C`` is
built where this build can import that torch, and needs a C++ compiler (no CUDA toolkit:
it launches through sn_fused's Python runners). ``SN_FUSED_BUILD_CPP`` chooses:

- unset (default): build ``_C`` if torch imports here; if it does not (pip's isolated
  build, which has no torch) or the compile fails, install without it (and without any
  ``_C`` an earlier build left) and say so on stderr, which pip shows with ``-v``;
- ``1``: build it, and fail the build if that is not possible (what CI asks for);
- ``0``: never build it.

::

    pip install --no-build-isolation .                             # installed, with _C
    SN_FUSED_BUILD_CPP=1 python setup.py build_ext --inplace       # in a checkout

A plain ``pip install .`` builds in an isolated environment without torch, so it installs
the pure-Python package, with ``_C``'s source packed in it: ``python -m sn_fused.build_cpp``
then builds ``_C`` in the installed package. (Adding torch to ``build-system.requires`` would build against
whatever torch pip downloads there, not the one installed, and such an ``_C`` refuses to
load.) Whether an install has it: ``python -c "import sn_fused.ops.spectral_norm as s; print(s.CPP_READS)"``.
Packagers who build with ``--no-build-isolation`` by convention (conda, distributions) and
want a pure-Python package set ``SN_FUSED_BUILD_CPP=0``: a declared extension tags the wheel
for the platform even where its compile failed. ``tests/run.sh`` and ``bench/run.sh`` build
it in place (``.ci/env.sh``).
"""

import os
import sys

from setuptools import setup
from setuptools.command.build_py import build_py

_MODE = os.environ.get("SN_FUSED_BUILD_CPP", "")
if _MODE not in ("", "0", "1"):
    raise SystemExit(f"SN_FUSED_BUILD_CPP must be 0, 1 or unset, got {_MODE!r}")


_CPP_SOURCE = os.path.join("csrc", "spectral_norm_read.cpp")  # sn_fused._C's one source file


def _say(message):
    # (pip shows a build's output only with -v, or when the build fails)
    sys.stderr.write(f"sn_fused: {message}\n")


class _BuildPy(build_py):
    """setuptools' build_py; also packs ``_C``'s source as ``sn_fused/csrc/``, so that an install
    built without ``_C`` can compile it later against its torch (``python -m sn_fused.build_cpp``)."""

    def run(self):
        super().run()
        target = os.path.join(self.build_lib, "sn_fused", "csrc")
        self.mkpath(target)
        self.copy_file(_CPP_SOURCE, target)


ext_modules, cmdclass = [], {"build_py": _BuildPy}
if _MODE != "0":
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except Exception as error:  # ImportError, or a torch that fails to import otherwise (a missing library)
        if _MODE == "1":
            raise SystemExit("SN_FUSED_BUILD_CPP=1 builds sn_fused._C against the installed torch, which this "
                             f"build environment cannot import ({error}): use pip's --no-build-isolation") from error
        _say(f"building without sn_fused._C (the C++ eager read): torch does not import here ({error}); "
             "pip install --no-build-isolation builds it against the installed torch")
    else:
        class _BuildExtension(BuildExtension):
            """torch's BuildExtension; by default a failed compile leaves ``_C`` out instead of
            failing the install (the package is whole without it)."""

            def run(self):
                try:
                    super().run()
                except Exception as error:  # compiler missing or failing: any of distutils' or ninja's errors
                    if _MODE == "1":
                        raise
                    # An _C an earlier build left (in the build directory, which a wheel packs, or
                    # in place) is not this source's: the install goes on without any.
                    was_inplace = self.inplace
                    for inplace in (False, True):
                        self.inplace = inplace  # get_ext_fullpath's choice of directory
                        for ext in self.extensions:
                            path = self.get_ext_fullpath(ext.name)
                            if os.path.exists(path):
                                os.remove(path)
                    self.inplace = was_inplace
                    _say(f"building without sn_fused._C (the C++ eager read): its compile failed ({error}); "
                         "SN_FUSED_BUILD_CPP=1 makes that an error")

        ext_modules = [CppExtension("sn_fused._C", [_CPP_SOURCE],
                                    extra_compile_args=["-O2"])]
        cmdclass["build_ext"] = _BuildExtension

setup(ext_modules=ext_modules, cmdclass=cmdclass)
