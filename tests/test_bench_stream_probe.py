"""``bench/stream_probe.py`` (the ceiling of a pass over A in the kernels' grid, timed on a GPU by
``bench/gpu_check.sh``): every launch it times computes its pass, checked against torch through
the interpreter (or on the GPU); its ``base`` launch tiles A as the kernels' streaming passes do;
its GPU report (run here with the device stubbed) times and checks every launch."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from conftest import fused_device_or_skip, run_module_on_cpu
from sn_fused.ops import spectral_norm as snm

device = fused_device_or_skip()


def test_every_launch_computes_its_pass():
    from bench import stream_probe

    # Small tiles: bands of uneven length (37 rows over 3 programs), rows over several column
    # blocks (300 columns in blocks of 64), row blocks and tiles strided, a grid of one tile or row
    # block each, TMA boxes beyond A's edges (the interpreter's descriptors).
    shapes = ((37, 50), (5, 300))
    launches = {shape: stream_probe.launches(*shape, 3, tile=64, stages=2) for shape in shapes}
    assert any(cfg["tma"] for cfg in launches[5, 300])  # (rows of 1200 bytes)
    assert not any(cfg["tma"] for cfg in launches[37, 50])  # (200: not 16-byte aligned)
    assert {cfg["order"] for cfg in launches[5, 300]} == {0, 1, 2}
    assert stream_probe.check(shapes=shapes) == sum(len(cfg["passes"]) for cfgs in launches.values() for cfg in cfgs)


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
    H200's SMs): the same tiles and warps as ``_launch_config`` gives them. Every launch keeps
    every program busy (a TMA box or a grid whose blocks are fewer than its programs would time a
    part of the card), and each (name, pass) is timed once."""
    from bench import stream_probe

    M, N = shape
    cfg = snm._launch_config(M, N, torch.device("cpu"), 132)
    assert not cfg.ON_CHIP
    launches = stream_probe.launches(M, N, 132)
    base = launches[0]
    assert base["name"] == "base" and base["G"] == cfg.grid
    assert (base["bm"], base["bn"], base["warps"]) == (cfg.BLOCK_M, cfg.BLOCK_N, cfg.num_warps)
    assert all(c["active"] == c["G"] for c in launches), [(c["name"], c["active"], c["G"]) for c in launches]
    names = [(c["name"], p) for c in launches for p in c["passes"]]
    assert len(names) == len(set(names))
    assert any(c["tma"] for c in launches) and all(c["order"] for c in launches if c["tma"])


def _stub_device(monkeypatch, stream_probe, kernel_sweep, run):
    """``probe`` on CPU tensors: 3 SMs, the timer runs its function once, ``run`` in place of the
    launch (returning a stand-in compiled kernel: 128 registers, 64 KB of shared memory)."""
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
    compiled = SimpleNamespace(n_regs=128, metadata=SimpleNamespace(shared=64 * 1024))
    monkeypatch.setattr(stream_probe, "run", lambda *args: run(*args) or compiled)
    monkeypatch.setattr(stream_probe, "DEVICE", device)
    monkeypatch.setattr(stream_probe, "TILE", 64)
    return timed


def test_gpu_report_of_every_launch(monkeypatch, capsys):
    """A line per launch and pass, each with its rate, how many programs an SM holds, and its
    result checked."""
    from bench import kernel_sweep, stream_probe

    timed = _stub_device(monkeypatch, stream_probe, kernel_sweep, stream_probe.run)
    results = stream_probe.probe(shapes=[(7, 40)])
    out = capsys.readouterr().out
    n = sum(len(c["passes"]) for c in stream_probe.launches(7, 40, 3))
    assert len(results) == len(timed) == 3 + n  # torch's mul, mv and copy_, and each launch's passes
    assert "WRONG" not in out and "failed" not in out
    assert all(r["right"] for r in results if r["name"] != "torch copy_")
    assert out.count("/SM\n") == n
    # 7x40 float32 scaled: 2 x 1120 bytes in 4 us; an SM holds as many programs as its registers
    # (128 per thread), its shared memory (64 KB each: 3) and its threads allow
    for r in (r for r in results if r["cfg"]):
        threads = 32 * r["cfg"]["warps"]
        assert r["cfg"]["per_sm"] == min(65536 // (128 * threads), 3, 2048 // threads), r
    base = next(r for r in results if r["name"] == "base" and r["pass_"] == "scale")
    assert base["tbs"] == pytest.approx(2 * 7 * 40 * 4 / 4e-6 / 1e12)


def test_gpu_report_says_what_a_launch_left_unwritten(monkeypatch, capsys):
    """The outputs are poisoned before each line is timed, so a launch that writes nothing is
    WRONG, not credited with the previous launch's result."""
    from bench import kernel_sweep, stream_probe

    run = stream_probe.run

    def run_but_strided_writes_nothing(kernel, cfg, *args):
        if cfg["name"] != "strided":
            run(kernel, cfg, *args)

    _stub_device(monkeypatch, stream_probe, kernel_sweep, run_but_strided_writes_nothing)
    results = stream_probe.probe(shapes=[(7, 40)])
    out = capsys.readouterr().out
    assert [(r["name"], r["pass_"]) for r in results if r["right"] is False] == [("strided", "scale"),
                                                                                 ("strided", "rowdot")], out
    assert out.count("WRONG RESULT") == 2


def test_main_without_a_gpu_says_what_it_checked():
    if device != "cpu":
        pytest.skip("the CPU mode of the entry point")
    out = run_module_on_cpu("bench.stream_probe")
    assert "the rates need a GPU" in out and "checked" in out
