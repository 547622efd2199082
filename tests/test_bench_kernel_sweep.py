"""``bench/kernel_sweep.py``'s interleaved eager A/B (``--eager-ab``, run on a GPU by
``bench/gpu_check.sh``): on CPU tensors through the interpreter it times every row, reads each
layer through the path its row names, and leaves the C++ read switched as it was."""

from __future__ import annotations

from unittest import mock

from conftest import fused_device_or_skip
from sn_fused.ops import spectral_norm as snm

device = fused_device_or_skip()


def test_eager_ab_times_every_row_through_its_read_path():
    from bench import kernel_sweep
    from sn_fused import parametrizations

    cpp_reads = snm.CPP_READS
    seen = []  # CPP_READS as each sn_fused read's op saw it
    checked = parametrizations._spectral_norm_checked  # where a layer's read decides: C++ or Python

    def spy(*args, **kwargs):
        seen.append(snm.CPP_READS)
        return checked(*args, **kwargs)

    with mock.patch.object(parametrizations, "_spectral_norm_checked", side_effect=spy):
        rows = kernel_sweep.eager_ab(shapes=[(3, 5), (3, 5), (1, 4)], budget_s=0.01, rounds=2, device=device)
    impls = ["sn_fused"] + (["sn_fused, Python read"] if cpp_reads else []) + ["PyTorch"]
    # Two distinct shapes and the whole list (3 tensors), each as fwd and f+b.
    assert [(r["shapes"], r["what"]) for r in rows] == [
        (s, w) for s in ("3x5", "1x4", "all 3") for w in ("fwd", "f+b")]
    assert all(list(r["us"]) == impls and all(t > 0 for t in r["us"].values()) for r in rows)
    assert snm.CPP_READS == cpp_reads
    # Each timed call reads 1 or 3 layers; 6 rows x 2 rounds at least, per read path.
    if cpp_reads:
        assert seen.count(False) >= 12 and seen.count(True) >= 12, seen
    else:
        assert seen.count(False) >= 12 and True not in seen, seen
