"""``bench/host_time.py`` (part of the CPU-mode main job): it runs, and leaves the launcher as it was."""

from __future__ import annotations

import math

import pytest

from sn_fused.ops import INTERPRET
from sn_fused.ops import spectral_norm as snm


def test_host_time_measures_and_restores_the_launcher():
    from bench import host_time

    launch = snm._launch
    if not INTERPRET:
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
            host_time.measure(rounds=1, calls=1)
        return
    result = host_time.measure(rounds=2, calls=3)
    assert snm._launch is launch
    assert set(result["us"]) == {"sn_fused read", "sn_fused read + backward", "sn_fused read, no_grad",
                                 "floor read", "floor read + backward", "floor read, torch's getter",
                                 "no SN: view + backward"}
    assert all(math.isfinite(v) and v > 0 for v in result["us"].values()), result
    assert len(host_time.format_lines(result)) == len(result["us"]) + 2
    assert host_time.format_lines(dict(error="RuntimeError: x")) == [
        "Host time per layer read: not measured (RuntimeError: x)"]
