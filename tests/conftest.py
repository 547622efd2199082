"""Shared test helpers."""

from __future__ import annotations

import contextlib

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


@contextlib.contextmanager
def on_chip_path(enabled: bool):
    """Let the kernels take their ON_CHIP path where it applies (the default), or never.

    Small weights take ON_CHIP by default, so without this the streaming kernels (phases R
    and F, the column-owner combine, the backward's re-read) would be tested on large
    weights only.
    """
    from sn_fused.ops import spectral_norm as snm

    with snm._launch_knobs(_ON_CHIP=enabled):
        yield


@pytest.fixture(params=[True, False], ids=["on-chip", "streaming"])
def on_chip(request):
    """Both paths of the kernels (see ``on_chip_path``); the value says which one runs."""
    with on_chip_path(request.param):
        yield request.param


def takes_on_chip(weight: torch.Tensor, dim: int, num_programs: int | None) -> bool:
    """Whether the launcher's plan for this weight reads it ON_CHIP (forward)."""
    from sn_fused.ops import spectral_norm as snm

    M = weight.shape[dim]
    return snm._launch_config(M, weight.numel() // M, weight.device, num_programs).ON_CHIP
