"""``bench/stream_probe.py`` (the ceiling of a pass over A in the kernels' grid, timed on a GPU by
``bench/gpu_check.sh``): every launch it times computes its pass, checked against torch through
the interpreter (or on the GPU), and its ``base`` launch tiles A as the kernels' streaming passes do."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import fused_device_or_skip
from sn_fused.ops import spectral_norm as snm

device = fused_device_or_skip()
ROOT = Path(__file__).resolve().parents[1]


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
    out = subprocess.run([sys.executable, "-m", "bench.stream_probe"], cwd=ROOT, capture_output=True, text=True,
                         timeout=600, env={**__import__("os").environ, "TRITON_INTERPRET": "1"})
    assert out.returncode == 0, out.stderr
    assert "the rates need a GPU" in out.stdout and "checked" in out.stdout


def test_gpu_report_of_every_launch(monkeypatch, capsys):
    """The GPU path's table on CPU tensors (the device, its timer and Triton's compiled kernel
    stubbed): a line per launch of both passes, each with its rate and how many programs an SM
    holds, and every launch's result checked."""
    from types import SimpleNamespace

    from bench import kernel_sweep, stream_probe

    props = SimpleNamespace(multi_processor_count=3, regs_per_multiprocessor=65536,
                            shared_memory_per_multiprocessor=228 * 1024, max_threads_per_multi_processor=2048)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: props)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *args: "stub")
    monkeypatch.setattr(kernel_sweep, "copy_bandwidth", lambda: 2e12)
    timed = []

    def graph_time_us(fn):
        fn()
        timed.append(fn)
        return 4.0

    monkeypatch.setattr(kernel_sweep, "graph_time_us", graph_time_us)
    run = stream_probe.run
    compiled = SimpleNamespace(n_regs=128, metadata=SimpleNamespace(shared=64 * 1024))
    monkeypatch.setattr(stream_probe, "run", lambda *args: run(*args) or compiled)
    monkeypatch.setattr(stream_probe, "DEVICE", device)
    monkeypatch.setattr(stream_probe, "TILE", 64)
    results = stream_probe.probe(shapes=[(7, 40)])
    out = capsys.readouterr().out
    n = len(stream_probe.launches(7, 40, 3))
    assert len(results) == len(timed) == 3 + n + (n - 2)  # torch's 3, scale's n, rowdot's n less 2 evict_first
    assert "WRONG" not in out and "failed" not in out
    # 7x40 float32 scaled: 2 x 1120 bytes in 4 us; an SM holds as many programs as its registers
    # (128 per thread), its shared memory (64 KB each: 3) and its threads allow
    for r in (r for r in results if r["cfg"]):
        threads = 32 * r["cfg"]["warps"]
        assert r["cfg"]["per_sm"] == min(65536 // (128 * threads), 3, 2048 // threads), r
    base = next(r for r in results if r["name"] == "base" and r["pass_"] == "scale")
    assert base["tbs"] == pytest.approx(2 * 7 * 40 * 4 / 4e-6 / 1e12)
    assert out.count("/SM\n") == 2 * n - 2
