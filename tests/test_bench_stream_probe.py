"""``bench/stream_probe.py`` (the ceiling of a pass over A in the kernels' grid, timed on a GPU by
``bench/gpu_check.sh``): every launch it times computes its pass, checked against torch through
the interpreter (or on the GPU), and its ``base`` launch tiles A as the kernels' streaming passes do."""

from __future__ import annotations

import pytest
import torch

from conftest import fused_device_or_skip, run_module_on_cpu
from sn_fused.ops import spectral_norm as snm

device = fused_device_or_skip()


def test_every_launch_computes_its_pass():
    from bench import stream_probe

    # Small tiles: bands of uneven length (37 rows over 3 programs), rows over several column
    # blocks (300 columns in blocks of 64), strided row blocks, a grid of one row block each, TMA
    # boxes beyond A's edges (the interpreter's descriptors).
    shapes = ((37, 50), (5, 300))
    assert any(cfg["tma"] for cfg in stream_probe.launches(5, 300, 3, tile=64, stages=2))  # (rows of 1200 bytes)
    assert not any(cfg["tma"] for cfg in stream_probe.launches(37, 50, 3, tile=64, stages=2))  # (200: not 16-aligned)
    assert stream_probe.check(shapes=shapes) == sum(len(stream_probe.launches(M, N, 3, tile=64, stages=2)) for M, N in shapes)


@pytest.mark.parametrize("kernel", ["scale", "rowdot"])
def test_a_wrong_launch_fails_the_check(kernel, monkeypatch):
    """The check sees a launch that leaves rows unwritten (the output is poisoned with NaN)."""
    from bench import stream_probe

    run = stream_probe.run

    def short(k, cfg, w, out, x):  # one row fewer: the last row stays as poisoned
        run(k, cfg, w[:-1], out[:-1], x) if k == kernel else run(k, cfg, w, out, x)

    monkeypatch.setattr(stream_probe, "run", short)
    with pytest.raises(AssertionError):
        stream_probe.check(shapes=((9, 40),))


@pytest.mark.parametrize("shape", [(1536, 13824), (4096, 4096), (768, 6912)])
def test_base_launch_tiles_as_the_kernels(shape):
    """``base`` is the kernels' streaming pass over A at one program per SM (132: an H100's or
    H200's SMs): the same tiles and warps as ``_launch_config`` gives them."""
    from bench import stream_probe

    M, N = shape
    cfg = snm._launch_config(M, N, torch.device("cpu"), 132)
    assert not cfg.ON_CHIP
    base = stream_probe.launches(M, N, 132)[0]
    assert base["name"] == "base" and base["G"] == cfg.grid
    assert (base["bm"], base["bn"], base["warps"]) == (cfg.BLOCK_M, cfg.BLOCK_N, cfg.num_warps)
    names = [r["name"] for r in stream_probe.launches(M, N, 132)]
    assert len(names) == len(set(names))


def test_main_without_a_gpu_says_what_it_checked():
    if device != "cpu":
        pytest.skip("the CPU mode of the entry point")
    out = run_module_on_cpu("bench.stream_probe")
    assert "the rates need a GPU" in out and "checked" in out
