"""Kept for the optional compiled parts that will live in ``csrc/``.

``pip install .`` is pure Python today: every kernel is Triton, compiled at
run time, so no CUDA toolkit is needed to install. When ``csrc/`` gains a
C++/CUDA extension it is registered here behind an opt-in environment
variable, so a plain install keeps working on machines without nvcc.
"""

from setuptools import setup

setup()
