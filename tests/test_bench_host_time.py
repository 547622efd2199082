"""``bench/host_time.py`` (part of the CPU-mode main job): it runs, and leaves the launcher as it was."""

from __future__ import annotations

import math
from unittest import mock

import pytest
import torch

from sn_fused.ops import INTERPRET
from sn_fused.ops import spectral_norm as snm


def test_host_time_measures_and_restores_the_launcher():
    from bench import host_time

    launch, launch_uncached, keep, runners = snm._launch, snm._launch_uncached, snm._KEEP_RUNNERS, dict(snm._RUNNERS)
    cpp_reads = snm.CPP_READS
    if not INTERPRET:
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
            host_time.measure(rounds=1, calls=1)
        return
    with mock.patch.object(snm, "_direct_runner", side_effect=AssertionError("a real runner was made")):
        result = host_time.measure(rounds=2, calls=3)
    # Each call of the 3 sn_fused rows (1 warm-up + 2 rounds, 3 calls each) launches 4 times in all
    # (read, read + backward, no_grad read), through a kept runner but for the first forward and
    # the first backward, which make them: the timed path is the GPU's eager one.
    assert result["kept_runner_calls"] >= 3 * 3 * 4 - 2, result["kept_runner_calls"]
    assert (snm._launch, snm._launch_uncached, snm._KEEP_RUNNERS, snm.CPP_READS) == (
        launch, launch_uncached, keep, cpp_reads)
    assert snm._RUNNERS == runners  # its no-op runners are gone
    # ... and a read after it launches the kernel again: PyTorch's numbers (a kept no-op runner
    # would leave the output as allocated).
    import sn_fused
    from sn_fused import reference

    torch.manual_seed(0)
    m = sn_fused.spectral_norm(torch.nn.Linear(16, 8))
    p = m.parametrizations.weight[0]
    w = m.parametrizations.weight.original.detach()
    expected, _ = reference.spectral_norm_reference(w.double(), p._u.double(), p._v.double())
    torch.testing.assert_close(m.weight.double(), expected, rtol=1e-5, atol=1e-6)
    sn_rows = {"sn_fused read", "sn_fused read + backward", "sn_fused read, no_grad"}
    if snm.CPP_READS:  # the C++ read's rows, and each again with it off
        sn_rows |= {f"{row}, Python path" for row in sn_rows}
    assert set(result["us"]) == sn_rows | {"floor read", "floor read + backward", "floor read, torch's getter",
                                           "no SN: view + backward"}
    assert all(math.isfinite(v) and v > 0 for v in result["us"].values()), result
    assert len(host_time.format_lines(result)) == len(result["us"]) + 2
    assert host_time.format_lines(dict(error="RuntimeError: x")) == [
        "Host time per layer read: not measured (RuntimeError: x)"]
