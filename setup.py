"""Optional compiled part of sn_fused: ``sn_fused._C``, the eager read in C++ (``csrc/``).

``pip install .`` stays pure Python: every kernel is Triton, compiled at run time, and
the layer works without ``_C`` (it then reads through its Python ``autograd.Function``,
~9-15 us more host time per read on the CPUs measured, 20-30 us on an H100's host, where
eager reads are 7.0-8.6x PyTorch's with it and 4.4-5.5x without: bench/NOTES.md v13-v15).
The extension is built only on request, against the
torch it will run with (a torch C++ extension must match its torch build), and needs a
C++ compiler but no CUDA toolkit (it launches through sn_fused's Python runners)::

    SN_FUSED_BUILD_CPP=1 python setup.py build_ext --inplace      # in a checkout
    SN_FUSED_BUILD_CPP=1 pip install --no-build-isolation .       # installed

``tests/run.sh`` and ``bench/run.sh`` build it in place (``.ci/env.sh``).
"""

import os

from setuptools import setup

ext_modules, cmdclass = [], {}
if os.environ.get("SN_FUSED_BUILD_CPP") == "1":
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError as error:
        raise SystemExit("SN_FUSED_BUILD_CPP=1 builds sn_fused._C against the installed torch, which this "
                         f"build environment cannot import ({error}): use pip's --no-build-isolation") from error

    ext_modules = [CppExtension("sn_fused._C", ["csrc/spectral_norm_read.cpp"],
                                extra_compile_args=["-O2"])]
    cmdclass = {"build_ext": BuildExtension}

setup(ext_modules=ext_modules, cmdclass=cmdclass)
