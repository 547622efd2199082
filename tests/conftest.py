"""Shared test helpers."""

from __future__ import annotations

import pytest
import torch

from sn_fused.ops import INTERPRET


def fused_device_or_skip() -> str:
    """The device whose tensors go through the Triton kernels: ``"cpu"`` under
    ``TRITON_INTERPRET=1``, else ``"cuda"``. Without either the calling test module is
    skipped (call it at module level)."""
    if INTERPRET:
        return "cpu"
    if torch.cuda.is_available():
        return "cuda"
    pytest.skip("needs TRITON_INTERPRET=1 (set before importing triton) or a CUDA GPU",
                allow_module_level=True)
