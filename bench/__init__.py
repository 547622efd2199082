"""Benchmarks of sn_fused against PyTorch's spectral norm (``python -m bench``; see BENCHMARKS.md).

Modules: ``shapes`` (the real layer shapes), ``models`` (the discriminators of
the training-step benchmark), ``harness`` (the one set of timers and cases),
``report`` (tables, JSON, markdown, plot), ``interpreter_check`` (CPU-mode
kernel check), ``test_bench_layers`` (pytest-benchmark).

Nothing is imported here: ``python -m bench`` must be able to choose
``TRITON_INTERPRET`` before anything imports Triton.
"""
